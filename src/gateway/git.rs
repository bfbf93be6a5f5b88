//! The git relay: a runner pod's clone and publish steps speak git's smart HTTP to the
//! controller (`/git/{namespace}/{name}/...`) with a token of their own; the controller adds
//! the execution's git credential (read from its Secret: no pod mounts it) and forwards to
//! `spec.repository.url`, and nowhere else. The clone step's token may only fetch; the publish
//! step's may also push, and only `refs/heads/<work branch>` (the command list of every push is
//! read before anything is forwarded). A runner pod then needs no route to the git host at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::git::GitCredentials;

/// Longest command list of a push read before the pack (a few refs; ours is one).
const MAX_COMMANDS: usize = 64 * 1024;

/// One execution's route to its repository.
pub struct Route {
    /// `spec.repository.url`.
    pub upstream: String,
    pub credentials: Option<GitCredentials>,
    /// The clone step's token: fetch only.
    pub clone_token: String,
    /// The publish step's token: fetch, and push of `refs/heads/<branch>` only.
    pub publish_token: String,
    pub branch: String,
}

/// The controller's relay: one route per running execution.
pub struct GitRelays {
    client: reqwest::Client,
    routes: Mutex<HashMap<(String, String), Arc<Route>>>,
    /// The commit each execution's last push sent its branch to, as the host accepted it
    /// (HTTP 200): what the controller checks the publish step's report against.
    pushes: Mutex<HashMap<(String, String), String>>,
    opener: std::sync::OnceLock<super::Opener>,
}

impl GitRelays {
    pub fn new() -> std::io::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(concat!("git/2.0 (agentops-relay/", env!("CARGO_PKG_VERSION"), ")"))
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(30))
            // A repository host's 3xx is answered to the pod as an error, never followed: a
            // redirect would send the operator's request (and its network position) wherever
            // the host points.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self {
            client,
            routes: Mutex::new(HashMap::new()),
            pushes: Mutex::new(HashMap::new()),
            opener: std::sync::OnceLock::new(),
        })
    }

    /// How routes this process has not opened get opened on first use (after a restart).
    pub fn set_opener(&self, opener: super::Opener) {
        let _ = self.opener.set(opener);
    }

    pub fn open(&self, ns: &str, name: &str, route: Route) {
        if let Ok(mut r) = self.routes.lock() {
            r.insert((ns.into(), name.into()), Arc::new(route));
        }
    }

    /// The execution ended: its tokens stop working.
    /// Whether an execution's route is open.
    pub fn is_open(&self, ns: &str, name: &str) -> bool {
        self.routes.lock().is_ok_and(|r| r.contains_key(&(ns.to_string(), name.to_string())))
    }

    pub fn close(&self, ns: &str, name: &str) {
        let key = (ns.to_string(), name.to_string());
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&key);
        }
        if let Ok(mut p) = self.pushes.lock() {
            p.remove(&key);
        }
    }

    /// What this relay saw of an execution's pushes while its route is open: None when it has
    /// no route for it (not relayed, or opened after a restart that lost the record), else the
    /// commit its branch was last pushed to (None: no push went through).
    pub fn pushed(&self, ns: &str, name: &str) -> Option<Option<String>> {
        let key = (ns.to_string(), name.to_string());
        self.routes.lock().ok()?.get(&key)?;
        Some(self.pushes.lock().ok()?.get(&key).cloned())
    }

    /// `/git/{namespace}/{name}/{info/refs, git-upload-pack, git-receive-pack}`.
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/git/{ns}/{name}/info/refs", axum::routing::get(info_refs))
            .route("/git/{ns}/{name}/{service}", axum::routing::post(service))
            .with_state(self)
    }

    async fn route(&self, ns: String, name: String) -> Option<Arc<Route>> {
        let key = (ns, name);
        if let Some(r) = self.routes.lock().ok()?.get(&key).cloned() {
            return Some(r);
        }
        let open = self.opener.get()?;
        if !open(key.0.clone(), key.1.clone()).await {
            return None;
        }
        self.routes.lock().ok()?.get(&key).cloned()
    }
}

/// What a token may do.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Grant {
    Fetch,
    Push,
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token presented (Basic password or Bearer), checked against the route's.
fn grant(route: &Route, headers: &HeaderMap) -> Option<Grant> {
    use base64::Engine;
    let auth = headers.get("authorization")?.to_str().ok()?;
    let token = if let Some(b) = auth.strip_prefix("Basic ") {
        let plain = base64::engine::general_purpose::STANDARD.decode(b.trim()).ok()?;
        let plain = String::from_utf8(plain).ok()?;
        plain.split_once(':').map(|(_, p)| p.to_string())?
    } else {
        auth.strip_prefix("Bearer ")?.trim().to_string()
    };
    if same(&token, &route.publish_token) {
        Some(Grant::Push)
    } else if same(&token, &route.clone_token) {
        Some(Grant::Fetch)
    } else {
        None
    }
}

/// The execution's route and what the presented token may do there.
async fn authorize(
    relays: &GitRelays,
    ns: String,
    name: String,
    headers: &HeaderMap,
) -> Result<(Arc<Route>, Grant), Response> {
    let route =
        relays.route(ns, name).await.ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "no running execution here"))?;
    let grant = grant(&route, headers).ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "this token is not valid"))?;
    Ok((route, grant))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let mut r = (status, format!("agentops git relay: {message}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Basic realm=\"agentops\""));
    }
    r
}

#[derive(serde::Deserialize)]
struct ServiceQuery {
    service: Option<String>,
}

async fn info_refs(
    State(relays): State<Arc<GitRelays>>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<ServiceQuery>,
    headers: HeaderMap,
) -> Response {
    let (route, grant) = match authorize(&relays, ns, name, &headers).await {
        Ok(ok) => ok,
        Err(refused) => return refused,
    };
    let service = q.service.unwrap_or_default();
    match (service.as_str(), grant) {
        ("git-upload-pack", _) | ("git-receive-pack", Grant::Push) => {}
        ("git-receive-pack", Grant::Fetch) => return refuse(StatusCode::FORBIDDEN, "the clone step may not push"),
        _ => return refuse(StatusCode::FORBIDDEN, "only git-upload-pack and git-receive-pack are relayed"),
    }
    let url = format!("{}/info/refs?service={service}", route.upstream.trim_end_matches('/'));
    forward(&relays.client, &route, Method::GET, &url, &headers, None).await
}

async fn service(
    State(relays): State<Arc<GitRelays>>,
    Path((ns, name, service)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (route, grant) = match authorize(&relays, ns.clone(), name.clone(), &headers).await {
        Ok(ok) => ok,
        Err(refused) => return refused,
    };
    let url = format!("{}/{service}", route.upstream.trim_end_matches('/'));
    match (service.as_str(), grant) {
        ("git-upload-pack", _) => forward(&relays.client, &route, Method::POST, &url, &headers, Some(body)).await,
        ("git-receive-pack", Grant::Push) => {
            // Read the command list (up to its flush-pkt) before anything goes upstream.
            let mut stream = body.into_data_stream();
            let mut head: Vec<u8> = Vec::new();
            let end = loop {
                if let Some(end) = commands_end(&head) {
                    break end;
                }
                if head.len() > MAX_COMMANDS {
                    return refuse(StatusCode::PAYLOAD_TOO_LARGE, "the push's command list is too long");
                }
                match stream.next().await {
                    Some(Ok(chunk)) => head.extend_from_slice(&chunk),
                    Some(Err(e)) => return refuse(StatusCode::BAD_REQUEST, &format!("reading the push: {e}")),
                    None => return refuse(StatusCode::BAD_REQUEST, "the push ended before its command list did"),
                }
            };
            let allowed = format!("refs/heads/{}", route.branch);
            let new = match pushed_commands(&head[..end]) {
                Ok(cmds) if !cmds.is_empty() && cmds.iter().all(|(r, _)| *r == allowed) => {
                    cmds.last().map(|(_, new)| new.clone()).unwrap_or_default()
                }
                Ok(cmds) => {
                    let refs: Vec<&String> = cmds.iter().map(|(r, _)| r).collect();
                    tracing::warn!(refs = ?refs, allowed, "git relay refused a push");
                    return refuse(StatusCode::FORBIDDEN, &format!("only {allowed} may be pushed"));
                }
                Err(e) => return refuse(StatusCode::BAD_REQUEST, &e),
            };
            let rest =
                futures::stream::once(async move { Ok::<_, axum::Error>(axum::body::Bytes::from(head)) }).chain(stream);
            let answer =
                forward(&relays.client, &route, Method::POST, &url, &headers, Some(Body::from_stream(rest))).await;
            if answer.status() == StatusCode::OK
                && let Ok(mut p) = relays.pushes.lock()
            {
                p.insert((ns.clone(), name.clone()), new);
            }
            answer
        }
        ("git-receive-pack", Grant::Fetch) => refuse(StatusCode::FORBIDDEN, "the clone step may not push"),
        _ => refuse(StatusCode::NOT_FOUND, "only git-upload-pack and git-receive-pack are relayed"),
    }
}

/// Where the command list of a receive-pack request ends (after its flush-pkt), once it is all there.
fn commands_end(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let len = std::str::from_utf8(buf.get(at..at + 4)?).ok().and_then(|h| usize::from_str_radix(h, 16).ok());
        match len {
            Some(0) => return Some(at + 4),
            Some(n) if n >= 4 => {
                if buf.len() < at + n {
                    return None;
                }
                at += n;
            }
            // Not a pkt-line: the whole buffer is handed to `pushed_refs`, which says so.
            _ => return Some(buf.len()),
        }
    }
}

/// The refs a push updates, from its command list.
#[cfg(test)]
fn pushed_refs(commands: &[u8]) -> Result<Vec<String>, String> {
    pushed_commands(commands).map(|c| c.into_iter().map(|(name, _)| name).collect())
}

/// The refs a push updates and the commit each is sent to, from its command list.
fn pushed_commands(commands: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut refs = Vec::new();
    let mut at = 0;
    while at + 4 <= commands.len() {
        let len = std::str::from_utf8(&commands[at..at + 4])
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or("the push is not git's protocol")?;
        if len == 0 {
            return Ok(refs);
        }
        if len < 4 || at + len > commands.len() {
            return Err("the push is not git's protocol".into());
        }
        let line = &commands[at + 4..at + len];
        let line = line.split(|b| *b == 0).next().unwrap_or_default();
        // Byte for byte: only the pkt-line's own newline goes; a look-alike such as
        // `refs/heads/main\u{a0}` stays what it is (and is refused by the caller).
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let mut parts = line.split(|b| *b == b' ');
        let (Some(_old), Some(new), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "a push command this relay does not take: {:?}",
                crate::api::report::truncate(&String::from_utf8_lossy(line), 100)
            ));
        };
        let Ok(name) = std::str::from_utf8(name) else {
            return Err("a pushed ref name is not UTF-8".into());
        };
        refs.push((name.to_string(), String::from_utf8_lossy(new).into_owned()));
        at += len;
    }
    Err("the push's command list has no end".into())
}

/// Headers passed between the step and the git host (never the step's Authorization).
const PASS: &[&str] = &["content-type", "accept", "content-encoding", "git-protocol", "accept-encoding"];

async fn forward(
    client: &reqwest::Client,
    route: &Route,
    method: Method,
    url: &str,
    headers: &HeaderMap,
    body: Option<Body>,
) -> Response {
    let mut req = client.request(method, url);
    for name in PASS {
        if let Some(v) = headers.get(*name) {
            req = req.header(*name, v);
        }
    }
    if let Some(c) = &route.credentials {
        req = req.basic_auth(&c.username, Some(&c.token));
    }
    if let Some(body) = body {
        req = req.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "the git relay cannot reach the repository");
            return refuse(StatusCode::BAD_GATEWAY, "cannot reach the repository");
        }
    };
    if resp.status().is_redirection() {
        let status = resp.status().as_u16();
        tracing::warn!(status, upstream = %route.upstream, "the git host answered a redirect; not followed");
        return refuse(
            StatusCode::BAD_GATEWAY,
            &format!(
                "the repository host answered HTTP {status} (a redirect, not followed): use the repository's final URL in spec.repository.url"
            ),
        );
    }
    let mut out = Response::builder().status(resp.status().as_u16());
    for (name, value) in resp.headers() {
        if PASS.contains(&name.as_str()) || name == "cache-control" {
            out = out.header(name, value);
        }
    }
    out.body(Body::from_stream(resp.bytes_stream())).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(s: &str) -> String {
        format!("{:04x}{s}", s.len() + 4)
    }

    #[test]
    fn reads_the_refs_of_a_push() {
        let z = "0".repeat(40);
        let one = format!(
            "{}0000PACK...",
            pkt(&format!("{z} {} refs/heads/agentops/x\0report-status side-band-64k\n", "a".repeat(40)))
        );
        let end = commands_end(one.as_bytes()).unwrap();
        assert_eq!(&one[end..], "PACK...");
        assert_eq!(pushed_refs(&one.as_bytes()[..end]).unwrap(), ["refs/heads/agentops/x"]);
        let two =
            format!("{}{}0000", pkt(&format!("{z} {z} refs/heads/a\0caps\n")), pkt(&format!("{z} {z} refs/tags/v1\n")));
        assert_eq!(pushed_refs(two.as_bytes()).unwrap(), ["refs/heads/a", "refs/tags/v1"]);
        // Incomplete: wait for more; garbage: refused.
        assert_eq!(commands_end(&two.as_bytes()[..10]), None);
        assert!(pushed_refs(b"GET / HTTP/1.1").is_err());
        assert!(pushed_refs(pkt("push-cert\0caps\n").as_bytes()).is_err());
        // Look-alikes stay what they are: nothing is trimmed but the pkt-line's newline.
        let nbsp = format!("{}0000", pkt(&format!("{z} {z} refs/heads/agentops/x\u{a0}\n")));
        assert_eq!(pushed_refs(nbsp.as_bytes()).unwrap(), ["refs/heads/agentops/x\u{a0}"]);
        let tab = format!("{}0000", pkt(&format!("{z} {z} refs/heads/agentops/x\t\n")));
        assert_eq!(pushed_refs(tab.as_bytes()).unwrap(), ["refs/heads/agentops/x\t"]);
    }
}
