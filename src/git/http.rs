//! Git's smart HTTP protocol carried by reqwest instead of libgit2's built-in HTTP client.
//!
//! Why: libgit2 writes a POST's headers and body in separate small writes without
//! TCP_NODELAY, so each negotiation round stalls on Nagle + delayed ACK (~40 ms here), and it
//! offers no keep-alive pool, proxy or TLS choice of ours. libgit2 still speaks the git
//! protocol (negotiation, pack indexing); this module only moves the bytes. It also means the
//! token goes straight into an Authorization header that we build: libgit2 never sees it.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::sync::{Once, OnceLock};

use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use git2::{Error, ErrorClass, ErrorCode, Remote};

use super::GitCredentials;

thread_local! {
    /// Credentials for the git operation running on this thread (set by `with_credentials`).
    static CREDENTIALS: RefCell<Option<GitCredentials>> = const { RefCell::new(None) };
    /// Whether the server refused the credentials (401/403) during that operation.
    static AUTH_REJECTED: Cell<bool> = const { Cell::new(false) };
    /// Commits the server is known to have (the base we cloned from it), added to its
    /// receive-pack advertisement as `.have` lines (see `with_haves`).
    static HAVES: RefCell<Vec<git2::Oid>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` (a push) with `haves` taken as objects the server has, as if it had advertised
/// them with `.have` lines, git's own way of saying "I have these, not as refs".
///
/// Why: libgit2 builds a push's pack from the local commits minus those the server advertises.
/// The base we cloned is one the server has, but it is not advertised when it is not a ref tip
/// (a SHA or tag's commit, or the branch moved on during the run); libgit2 would then send the
/// base's whole tree again (the size of the repository, not of the change). Telling it the
/// server has the base keeps the pack to the new objects in every case. Should the server have
/// lost the base meanwhile (a force-push and a gc), its connectivity check refuses the push
/// with its own message, which is reported.
pub(super) fn with_haves<T>(haves: &[git2::Oid], f: impl FnOnce() -> T) -> T {
    let previous = HAVES.with(|h| h.replace(haves.to_vec()));
    let out = f();
    HAVES.with(|h| *h.borrow_mut() = previous);
    out
}

/// Longest receive-pack advertisement read whole to add `.have` lines (100,000 refs is ~7 MiB).
const MAX_ADVERTISEMENT: u64 = 64 << 20;

/// Adds a `.have` pkt-line for each of `haves` at the end of a smart HTTP ref advertisement
/// (`# service=...`, flush, ref lines, flush). None when `adv` is not one.
fn add_haves(adv: &[u8], haves: &[git2::Oid]) -> Option<Vec<u8>> {
    let mut at = 0;
    let mut flushes = 0;
    while flushes < 2 {
        let len = usize::from_str_radix(std::str::from_utf8(adv.get(at..at + 4)?).ok()?, 16).ok()?;
        match len {
            0 => flushes += 1,
            n if n >= 4 => {}
            _ => return None,
        }
        if len == 0 && flushes == 2 {
            break;
        }
        at += len.max(4);
    }
    let mut out = Vec::with_capacity(adv.len() + haves.len() * 52);
    out.extend_from_slice(&adv[..at]);
    for oid in haves {
        let line = format!("{oid} .have\n");
        out.extend_from_slice(format!("{:04x}{line}", line.len() + 4).as_bytes());
    }
    out.extend_from_slice(&adv[at..]);
    Some(out)
}

/// Runs `f` with `creds` available to the HTTP transport on this thread. Also returns whether
/// the server refused them: libgit2 turns our transport's errors into plain network errors.
pub(super) fn with_credentials<T>(creds: Option<&GitCredentials>, f: impl FnOnce() -> T) -> (T, bool) {
    register();
    let previous = CREDENTIALS.with(|c| c.replace(creds.cloned()));
    AUTH_REJECTED.with(|r| r.set(false));
    let out = f();
    CREDENTIALS.with(|c| *c.borrow_mut() = previous);
    (out, AUTH_REJECTED.with(|r| r.replace(false)))
}

fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::blocking::Client::builder()
            .user_agent(concat!("git/2.0 (agentops/", env!("CARGO_PKG_VERSION"), ")"))
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(30))
            // Pack transfers can be long: no overall timeout (cancel and deadline abort them).
            .timeout(None)
            .build()
            .unwrap_or_default()
    })
}

/// Registers the transport for http:// and https:// once per process.
fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for scheme in ["http", "https"] {
            // SAFETY: called once, before any transport of these schemes is in use (every git
            // operation of ours goes through `with_credentials` first).
            let registered = unsafe { git2::transport::register(scheme, factory) };
            if let Err(e) = registered {
                tracing::warn!(scheme, error = %e, "cannot register the git HTTP transport; libgit2's own is used");
            }
        }
    });
}

fn factory(remote: &Remote<'_>) -> Result<Transport, Error> {
    let creds = CREDENTIALS.with(|c| c.borrow().clone());
    Transport::smart(remote, true, Http { creds })
}

struct Http {
    creds: Option<GitCredentials>,
}

impl SmartSubtransport for Http {
    fn action(&self, url: &str, action: Service) -> Result<Box<dyn SmartSubtransportStream>, Error> {
        let base = url.trim_end_matches('/');
        let (service, ls) = match action {
            Service::UploadPackLs => ("git-upload-pack", true),
            Service::UploadPack => ("git-upload-pack", false),
            Service::ReceivePackLs => ("git-receive-pack", true),
            Service::ReceivePack => ("git-receive-pack", false),
        };
        let stream = Stream {
            creds: self.creds.clone(),
            url: if ls { format!("{base}/info/refs?service={service}") } else { format!("{base}/{service}") },
            service,
            ls,
            body: Vec::new(),
            response: None,
        };
        Ok(Box::new(stream))
    }

    fn close(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// One request: writes collect the body; the first read sends it and streams the answer.
struct Stream {
    creds: Option<GitCredentials>,
    url: String,
    service: &'static str,
    ls: bool,
    body: Vec<u8>,
    response: Option<Answer>,
}

/// A response as it streams in, or read whole (an advertisement we added `.have` lines to).
enum Answer {
    Live(reqwest::blocking::Response),
    Read(std::io::Cursor<Vec<u8>>),
}

fn io_error(e: Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl Stream {
    fn send(&mut self) -> Result<reqwest::blocking::Response, Error> {
        let req = if self.ls {
            client().get(&self.url)
        } else {
            client()
                .post(&self.url)
                .header("content-type", format!("application/x-{}-request", self.service))
                .header("accept", format!("application/x-{}-result", self.service))
                .body(std::mem::take(&mut self.body))
        };
        let req = match &self.creds {
            Some(c) => req.basic_auth(&c.username, Some(&c.token)),
            None => req,
        };
        let resp = req.header("pragma", "no-cache").send().map_err(|e| {
            // Never echo the URL with a query of ours into errors: it holds nothing secret,
            // but keep messages short and about the cause.
            let kind = if e.is_connect() || e.is_timeout() { "cannot connect" } else { "request failed" };
            Error::new(ErrorCode::GenericError, ErrorClass::Net, format!("{kind}: {}", error_chain(&e)))
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            AUTH_REJECTED.with(|r| r.set(true));
            return Err(Error::new(
                ErrorCode::Auth,
                ErrorClass::Http,
                format!("authentication failed (HTTP {})", status.as_u16()),
            ));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(Error::new(ErrorCode::NotFound, ErrorClass::Http, "repository not found (HTTP 404)"));
        }
        if !status.is_success() {
            return Err(Error::new(
                ErrorCode::GenericError,
                ErrorClass::Http,
                format!("unexpected HTTP status {}", status.as_u16()),
            ));
        }
        if self.ls {
            let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if ctype != format!("application/x-{}-advertisement", self.service) {
                return Err(Error::new(
                    ErrorCode::GenericError,
                    ErrorClass::Http,
                    format!("not a smart git HTTP server (content-type {ctype:?})"),
                ));
            }
        }
        Ok(resp)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

impl Stream {
    fn answer(&mut self) -> Result<Answer, Error> {
        let resp = self.send()?;
        let haves = HAVES.with(|h| h.borrow().clone());
        if !(self.ls && self.service == "git-receive-pack") || haves.is_empty() {
            return Ok(Answer::Live(resp));
        }
        let mut adv = Vec::new();
        let mut limited = resp.take(MAX_ADVERTISEMENT + 1);
        limited
            .read_to_end(&mut adv)
            .map_err(|e| Error::new(ErrorCode::GenericError, ErrorClass::Net, e.to_string()))?;
        if adv.len() as u64 > MAX_ADVERTISEMENT {
            return Err(Error::new(
                ErrorCode::GenericError,
                ErrorClass::Net,
                "the server's ref advertisement is over 64 MiB",
            ));
        }
        let adv = add_haves(&adv, &haves).ok_or_else(|| {
            Error::new(ErrorCode::GenericError, ErrorClass::Net, "the server's ref advertisement is not git's protocol")
        })?;
        Ok(Answer::Read(std::io::Cursor::new(adv)))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.response.is_none() {
            self.response = Some(self.answer().map_err(io_error)?);
        }
        match self.response.as_mut() {
            Some(Answer::Live(r)) => r.read(buf),
            Some(Answer::Read(c)) => c.read(buf),
            None => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.body.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(s: &str) -> String {
        format!("{:04x}{s}", s.len() + 4)
    }

    #[test]
    fn have_lines_go_at_the_end_of_the_advertisement() {
        let base = git2::Oid::from_str(&"b".repeat(40)).unwrap();
        let head = pkt(&format!("{} refs/heads/main\0report-status\n", "a".repeat(40)));
        let adv = format!("{}0000{head}0000", pkt("# service=git-receive-pack\n"));
        let out = String::from_utf8(add_haves(adv.as_bytes(), &[base]).unwrap()).unwrap();
        let have = pkt(&format!("{base} .have\n"));
        assert_eq!(out, format!("{}0000{head}{have}0000", pkt("# service=git-receive-pack\n")));
        // Not an advertisement: refused rather than guessed at.
        assert!(add_haves(b"<html>", &[base]).is_none());
        assert!(add_haves(format!("{}0000{head}", pkt("# service=x\n")).as_bytes(), &[base]).is_none());
    }
}
