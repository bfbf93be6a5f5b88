//! Git's smart HTTP protocol carried by reqwest instead of libgit2's built-in HTTP client.
//!
//! Why: libgit2 writes a POST's headers and body in separate small writes without
//! TCP_NODELAY, so each negotiation round stalls on Nagle + delayed ACK (~40 ms here), and it
//! offers no keep-alive pool, proxy or TLS choice of ours. libgit2 still speaks the git
//! protocol (negotiation, pack indexing); this module only moves the bytes. It also means the
//! token goes straight into an Authorization header that we build: libgit2 never sees it.
//!
//! Every wait for the host is bounded: when nothing moves either way for the read timeout
//! (60 s: no byte received, none of the request taken) the operation fails as stalled, and the
//! operation's stop flag (cancel, the deadline) ends any wait within a tenth of a second.
//! libgit2 checks that flag only in its progress callbacks, which a silent host never calls.
//! The host's own words are kept for the error message: its fatal error (side band 3, or an
//! `ERR` pkt-line), which libgit2 drops or reports as a network failure, and the last lines it
//! wrote on side band 2 (`remote:` lines: a pre-receive hook saying why it refused).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use git2::{Error, ErrorClass, ErrorCode, Remote};

use super::GitCredentials;

/// How long the host may send nothing and take nothing before the operation fails as stalled.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a wait looks at the stop flag and the read timeout.
const TICK: Duration = Duration::from_millis(100);
/// How much of what the host wrote on side band 2 is kept (the end of it).
const REMOTE_KEEP: usize = 4096;
/// Longest fatal error of the host kept.
const HOST_ERROR_KEEP: usize = 1024;

thread_local! {
    /// Credentials for the git operation running on this thread (set by `with_credentials`).
    static CREDENTIALS: RefCell<Option<GitCredentials>> = const { RefCell::new(None) };
    /// The stop flag of that operation: non-null only while `with_credentials` runs, whose
    /// caller's borrow of the flag outlives it (see `Scope`).
    static STOP: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
    /// A read timeout other than `READ_TIMEOUT` for operations on this thread (`with_read_timeout`).
    static TIMEOUT: Cell<Option<Duration>> = const { Cell::new(None) };
    /// What the transport saw during that operation.
    static SEEN: RefCell<Seen> = const { RefCell::new(Seen::new()) };
    /// Commits the server is known to have (the base we cloned from it), added to its
    /// receive-pack advertisement as `.have` lines (see `with_haves`).
    static HAVES: RefCell<Vec<git2::Oid>> = const { RefCell::new(Vec::new()) };
}

/// What the transport saw during one operation, beyond what libgit2 reports.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// The server refused the credentials (401/403): libgit2 turns our transport's errors into
    /// plain network errors.
    pub auth_rejected: bool,
    /// Nothing moved for this long: the operation was given up.
    pub stalled: Option<Duration>,
    /// The host's fatal error (side band 3 or an `ERR` pkt-line), without control characters.
    pub host_error: Option<String>,
    /// The end of what the host wrote on side band 2, raw.
    remote: Vec<u8>,
}

impl Seen {
    const fn new() -> Self {
        Self { auth_rejected: false, stalled: None, host_error: None, remote: Vec::new() }
    }

    /// The host's last `remote:` lines, without its progress meters (lines it rewrites with
    /// `\r`) and control characters, joined by "; ".
    pub fn remote_text(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.remote);
        let lines: Vec<String> = text
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .filter(|l| !l.contains('\r'))
            .map(|l| crate::api::text::clean_line(l.trim()).trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        (!lines.is_empty()).then(|| lines.join("; "))
    }
}

/// Runs `f` with git reads on this thread timing out after `timeout` instead of `READ_TIMEOUT`.
pub fn with_read_timeout<T>(timeout: Duration, f: impl FnOnce() -> T) -> T {
    let previous = TIMEOUT.with(|t| t.replace(Some(timeout)));
    let out = f();
    TIMEOUT.with(|t| t.set(previous));
    out
}

fn read_timeout() -> Duration {
    TIMEOUT.with(Cell::get).unwrap_or(READ_TIMEOUT)
}

fn stop_requested() -> bool {
    STOP.with(|s| {
        let flag = s.get();
        // SAFETY: non-null only inside `with_credentials`, which holds the borrow it came from
        // for as long as it is set (`Scope` resets it on the way out, panics included).
        !flag.is_null() && unsafe { (*flag).load(Ordering::Relaxed) }
    })
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

/// Runs `f` with `creds` and `stop` available to the HTTP transport on this thread, and returns
/// what the transport saw (a refusal of the credentials, a stall, the host's words).
pub(super) fn with_credentials<T>(
    creds: Option<&GitCredentials>,
    stop: &AtomicBool,
    f: impl FnOnce() -> T,
) -> (T, Seen) {
    register();
    let _scope =
        Scope { credentials: CREDENTIALS.with(|c| c.replace(creds.cloned())), stop: STOP.with(|s| s.replace(stop)) };
    SEEN.with(|s| s.take());
    let out = f();
    (out, SEEN.with(|s| s.take()))
}

/// What `with_credentials` replaced, put back when it ends (or unwinds).
struct Scope {
    credentials: Option<GitCredentials>,
    stop: *const AtomicBool,
}

impl Drop for Scope {
    fn drop(&mut self) {
        CREDENTIALS.with(|c| *c.borrow_mut() = self.credentials.take());
        STOP.with(|s| s.set(self.stop));
    }
}

/// The runtime the transport's requests run on (its own: git work runs on blocking threads).
fn runtime() -> Result<&'static tokio::runtime::Runtime, Error> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("agentops-git-http")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| {
            Error::new(ErrorCode::GenericError, ErrorClass::Net, format!("cannot start the git HTTP runtime: {e}"))
        })
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .user_agent(concat!("git/2.0 (agentops/", env!("CARGO_PKG_VERSION"), ")"))
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(30))
            // Pack transfers can be long: no overall timeout. A stall is caught by `Watch`, and
            // cancel and the deadline end any wait.
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
            watch: Watch::new(read_timeout()),
            sniffer: Sniffer::default(),
            failed: None,
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
    watch: Watch,
    sniffer: Sniffer,
    /// Set once the host reported a fatal error: the reads after it fail with it.
    failed: Option<String>,
}

/// A response as it streams in (the part of a chunk not yet read), or read whole (an
/// advertisement we added `.have` lines to).
enum Answer {
    Live(reqwest::Response, Bytes),
    Read(std::io::Cursor<Vec<u8>>),
}

/// Request bodies go out in pieces this big, so that a host taking them is seen moving.
const PIECE: usize = 64 << 10;

/// When something last moved in one request (a byte received, a piece of the body taken).
#[derive(Clone)]
struct Watch {
    since: Instant,
    /// Milliseconds from `since` to the last move.
    last: Arc<AtomicU64>,
    timeout: Duration,
}

/// Why a wait ended before its answer.
enum Interrupted {
    Stopped,
    Stalled(Duration),
}

impl Watch {
    fn new(timeout: Duration) -> Self {
        Self { since: Instant::now(), last: Arc::new(AtomicU64::new(0)), timeout }
    }

    fn moved(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.since.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    /// Runs `fut` to its end from this (blocking) thread on the transport's runtime, unless the
    /// operation's stop flag is set or nothing moves for the read timeout first.
    fn wait<T>(&self, fut: impl Future<Output = T>) -> std::io::Result<T> {
        let rt = runtime().map_err(std::io::Error::other)?;
        let watch = async {
            loop {
                tokio::time::sleep(TICK).await;
                if stop_requested() {
                    return Interrupted::Stopped;
                }
                if self.idle() >= self.timeout {
                    return Interrupted::Stalled(self.timeout);
                }
            }
        };
        let run = || {
            rt.handle().block_on(async {
                tokio::select! {
                    biased;
                    out = fut => Ok(out),
                    why = watch => Err(why),
                }
            })
        };
        // Called from a blocking thread (the runner's `spawn_blocking`), or from a worker of a
        // multi-threaded runtime, which gives its thread up for the wait; a current-thread
        // runtime cannot, and is told so rather than panicking.
        let out = match tokio::runtime::Handle::try_current() {
            Err(_) => run(),
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            Ok(_) => {
                return Err(std::io::Error::other(
                    "the git transport blocks: call it from spawn_blocking, not a current-thread runtime",
                ));
            }
        };
        out.map_err(|why| match why {
            Interrupted::Stopped => {
                std::io::Error::other("stopped: the execution was cancelled or reached its timeout")
            }
            Interrupted::Stalled(d) => {
                SEEN.with(|s| s.borrow_mut().stalled = Some(d));
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the git host sent nothing for {} s: the connection stalled", d.as_secs()),
                )
            }
        })
    }

    /// The next chunk of `response` (None: its end).
    fn chunk(&self, response: &mut reqwest::Response) -> std::io::Result<Option<Bytes>> {
        let chunk = self.wait(response.chunk())?.map_err(|e| std::io::Error::other(error_chain(&e)))?;
        self.moved();
        Ok(chunk)
    }
}

fn net_error(message: impl Into<String>) -> std::io::Error {
    std::io::Error::other(message.into())
}

impl Stream {
    fn send(&mut self) -> std::io::Result<reqwest::Response> {
        // The watch starts now: libgit2 may have spent long building the body (a push's pack).
        self.watch.moved();
        let req = if self.ls {
            client().get(&self.url)
        } else {
            let body = Bytes::from(std::mem::take(&mut self.body));
            let len = body.len();
            let watch = self.watch.clone();
            let pieces: Vec<Bytes> = (0..len).step_by(PIECE).map(|at| body.slice(at..(at + PIECE).min(len))).collect();
            let stream = futures::stream::iter(pieces.into_iter().map(move |piece| {
                watch.moved();
                Ok::<_, std::io::Error>(piece)
            }));
            client()
                .post(&self.url)
                .header("content-type", format!("application/x-{}-request", self.service))
                .header("accept", format!("application/x-{}-result", self.service))
                .header("content-length", len)
                .body(reqwest::Body::wrap_stream(stream))
        };
        let req = match &self.creds {
            Some(c) => req.basic_auth(&c.username, Some(&c.token)),
            None => req,
        };
        let resp = self.watch.wait(req.header("pragma", "no-cache").send())?.map_err(|e| {
            // Never echo the URL with a query of ours into errors: it holds nothing secret,
            // but keep messages short and about the cause.
            let kind = if e.is_connect() || e.is_timeout() { "cannot connect" } else { "request failed" };
            net_error(format!("{kind}: {}", error_chain(&e)))
        })?;
        self.watch.moved();
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            SEEN.with(|s| s.borrow_mut().auth_rejected = true);
            return Err(net_error(format!("authentication failed (HTTP {})", status.as_u16())));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(net_error("repository not found (HTTP 404)"));
        }
        if !status.is_success() {
            return Err(net_error(format!("unexpected HTTP status {}", status.as_u16())));
        }
        if self.ls {
            let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if ctype != format!("application/x-{}-advertisement", self.service) {
                return Err(net_error(format!("not a smart git HTTP server (content-type {ctype:?})")));
            }
        }
        Ok(resp)
    }

    fn answer(&mut self) -> std::io::Result<Answer> {
        let mut resp = self.send()?;
        let haves = HAVES.with(|h| h.borrow().clone());
        if !(self.ls && self.service == "git-receive-pack") || haves.is_empty() {
            return Ok(Answer::Live(resp, Bytes::new()));
        }
        let mut adv = Vec::new();
        while let Some(chunk) = self.watch.chunk(&mut resp)? {
            adv.extend_from_slice(&chunk);
            if adv.len() as u64 > MAX_ADVERTISEMENT {
                return Err(net_error("the server's ref advertisement is over 64 MiB"));
            }
        }
        let adv =
            add_haves(&adv, &haves).ok_or_else(|| net_error("the server's ref advertisement is not git's protocol"))?;
        Ok(Answer::Read(std::io::Cursor::new(adv)))
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

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(error) = &self.failed {
            return Err(net_error(format!("the git host reported an error: {error}")));
        }
        if self.response.is_none() {
            self.response = Some(self.answer()?);
        }
        let n = match self.response.as_mut() {
            Some(Answer::Live(resp, chunk)) => {
                while chunk.is_empty() {
                    match self.watch.chunk(resp)? {
                        Some(next) => *chunk = next,
                        None => return Ok(0),
                    }
                }
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk.split_to(n));
                n
            }
            Some(Answer::Read(c)) => c.read(buf)?,
            None => 0,
        };
        if let Some(error) = self.sniffer.feed(&buf[..n]) {
            self.failed = Some(error);
        }
        Ok(n)
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

/// Reads an answer's pkt-lines as they pass to libgit2, for what the host says besides the
/// data: side band 2 (its `remote:` text) and its fatal errors (side band 3, `ERR` lines), kept
/// in `SEEN`. Side band 1 (the pack) is skipped, not looked into. Anything that is not a
/// pkt-line (a pack sent without side band) ends the reading.
#[derive(Default)]
struct Sniffer {
    off: bool,
    /// The length header read so far.
    head: Vec<u8>,
    /// Payload bytes of the current pkt-line still to come.
    left: usize,
    /// At the first byte of a payload.
    first: bool,
    /// The current pkt-line is side band 1.
    data: bool,
    /// The current pkt-line's payload (the start of it), when not side band 1.
    payload: Vec<u8>,
}

impl Sniffer {
    /// Reads the next bytes of the answer; returns the host's fatal error when one ends in them.
    fn feed(&mut self, mut bytes: &[u8]) -> Option<String> {
        let mut fatal = None;
        while !bytes.is_empty() && !self.off {
            if self.left == 0 {
                let take = (4 - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.head.len() < 4 {
                    break;
                }
                let len = std::str::from_utf8(&self.head).ok().and_then(|h| usize::from_str_radix(h, 16).ok());
                self.head.clear();
                match len {
                    // Flush, delimiter, end of response, empty line.
                    Some(0..=2 | 4) => {}
                    Some(n) if n > 4 => (self.left, self.first) = (n - 4, true),
                    _ => self.off = true,
                }
                continue;
            }
            let take = self.left.min(bytes.len());
            if self.first {
                (self.first, self.data) = (false, bytes[0] == 1);
                self.payload.clear();
            }
            if !self.data {
                let room = (REMOTE_KEEP + 1).saturating_sub(self.payload.len()).min(take);
                self.payload.extend_from_slice(&bytes[..room]);
            }
            self.left -= take;
            bytes = &bytes[take..];
            if self.left == 0 && !self.data {
                fatal = fatal.or_else(|| self.judge());
            }
        }
        fatal
    }

    /// Keeps what the pkt-line just read says, if the host said something.
    fn judge(&mut self) -> Option<String> {
        let p = std::mem::take(&mut self.payload);
        let error = match p.as_slice() {
            [2, text @ ..] => {
                SEEN.with(|s| {
                    let remote = &mut s.borrow_mut().remote;
                    remote.extend_from_slice(text);
                    let over = remote.len().saturating_sub(REMOTE_KEEP);
                    remote.drain(..over);
                });
                return None;
            }
            [3, text @ ..] => text,
            [b'E', b'R', b'R', b' ', text @ ..] => text,
            _ => return None,
        };
        let text = String::from_utf8_lossy(error);
        let mut text = crate::api::text::clean(text.trim()).trim().to_string();
        if text.len() > HOST_ERROR_KEEP {
            let cut = (0..=HOST_ERROR_KEEP).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            text.truncate(cut);
            text.push('…');
        }
        let text = if text.is_empty() { "(no message)".to_string() } else { text };
        SEEN.with(|s| {
            s.borrow_mut().host_error.get_or_insert_with(|| text.clone());
        });
        Some(text)
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

    /// Feeds `answer` to a sniffer in pieces of `step` bytes; returns its fatal error and `SEEN`.
    fn sniff(answer: &[u8], step: usize) -> (Option<String>, Seen) {
        SEEN.with(|s| s.take());
        let mut sniffer = Sniffer::default();
        let fatal = answer.chunks(step).fold(None, |f, piece| f.or(sniffer.feed(piece)));
        (fatal, SEEN.with(|s| s.take()))
    }

    #[test]
    fn the_hosts_words_are_read_from_the_answer_in_any_pieces() {
        let band = |b: u8, text: &str| {
            let mut p = format!("{:04x}", text.len() + 5).into_bytes();
            p.push(b);
            p.extend_from_slice(text.as_bytes());
            p
        };
        let mut answer = pkt("NAK\n").into_bytes();
        answer.extend(band(2, "Counting objects: 50%\rCounting objects: 100%\n"));
        answer.extend(band(1, "PACK\u{3}\u{2}ERR not this: band 1 is data"));
        answer.extend(band(2, "protected branch: agentops/* needs review\u{1b}]0;pwned\u{7}\n"));
        answer.extend(band(3, "fatal: over quota\u{1b}[31m\n"));
        answer.extend(b"0000");
        for step in [1, 3, 7, answer.len()] {
            let (fatal, seen) = sniff(&answer, step);
            assert_eq!(fatal.as_deref(), Some("fatal: over quota[31m"), "step {step}");
            assert_eq!(seen.host_error, fatal);
            assert_eq!(
                seen.remote_text().as_deref(),
                Some("protected branch: agentops/* needs review]0;pwned"),
                "step {step}"
            );
        }
        // An ERR line (a ref advertisement refused).
        let (fatal, _) = sniff(pkt("ERR access denied: the account is suspended\n").as_bytes(), 5);
        assert_eq!(fatal.as_deref(), Some("access denied: the account is suspended"));
        // Ref lines and a pack sent without side band say nothing, whatever they hold.
        let refs = format!(
            "{}0000{}",
            pkt("# service=git-upload-pack\n"),
            pkt(&format!("{} refs/heads/ERR\n", "a".repeat(40)))
        );
        assert_eq!(sniff(refs.as_bytes(), 4).0, None);
        let raw = [pkt("NAK\n").into_bytes(), b"PACK\0\0\0\x02\x03ERR x".to_vec()].concat();
        let (fatal, seen) = sniff(&raw, 2);
        assert_eq!((fatal, seen.remote_text(), seen.host_error), (None, None, None));
    }
}
