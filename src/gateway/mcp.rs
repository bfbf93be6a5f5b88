//! Remote MCP servers behind the gateway. The agent's MCP config points at
//! `<gateway>/mcp/{server}` (in a cluster `/gateway/{ns}/{name}/mcp/{server}`) with its own
//! execution token; the gateway checks the token, adds the server's Secret-backed headers and
//! forwards to the configured URL only: streamable HTTP (POST, GET, DELETE at the URL itself) and
//! SSE (a GET of the URL for the event stream, whose `endpoint` event is rewritten to come back
//! here; POSTs to that endpoint, on the URL's own origin only). No redirect is followed (a
//! redirect would carry the headers elsewhere); request bodies are read against the same byte
//! budgets as the model's (`bodies`); requests are counted by server. The header values never
//! leave this process except towards the configured server.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures::StreamExt;

use super::bodies::{self, BodyBudget, BodyError};
use super::{Account, close, refuse};
use crate::api::McpTransport;

/// Largest MCP request body relayed (JSON-RPC messages are small).
pub const MAX_MCP_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// MCP requests (and open event streams) of one execution at once.
pub const MAX_MCP_IN_FLIGHT: usize = 8;
/// Largest tool list read whole to be filtered.
const MAX_MCP_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// Longest an upstream MCP answer may go without a byte before it is given up.
const MCP_SILENCE: std::time::Duration = std::time::Duration::from_secs(300);

/// Request headers passed to the server (besides the configured ones).
const REQUEST_HEADERS: &[&str] = &["content-type", "accept", "mcp-session-id", "mcp-protocol-version", "last-event-id"];
/// Response headers passed back to the agent.
const RESPONSE_HEADERS: &[&str] = &["content-type", "mcp-session-id", "cache-control"];

/// One remote server as the gateway reaches it.
#[derive(Clone)]
pub struct McpUpstream {
    pub url: url::Url,
    pub transport: McpTransport,
    /// Added to every request; values from Secrets.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The MCP part of the agent's permission rules, frozen when the execution started.
    pub rules: Arc<McpRules>,
    /// SSE transport: the endpoints the server announced (`endpoint` events), by the opaque id
    /// the agent was given instead; POSTs go to these exact URLs only. Shared by the clones.
    pub endpoints: Arc<std::sync::Mutex<Vec<(String, url::Url)>>>,
}

/// Announced endpoints remembered per server (the oldest is forgotten first).
const MAX_ENDPOINTS: usize = 16;
/// Largest SSE event the gateway parses (an event is held whole until its end).
const MAX_SSE_EVENT_BYTES: usize = 8 * 1024 * 1024;

impl McpUpstream {
    /// Remembers an endpoint the server announced; gives the agent's id for it.
    fn announce(&self, target: url::Url) -> Option<String> {
        let mut known = self.endpoints.lock().ok()?;
        if let Some((id, _)) = known.iter().find(|(_, u)| *u == target) {
            return Some(id.clone());
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        if known.len() >= MAX_ENDPOINTS {
            known.remove(0);
        }
        known.push((id.clone(), target));
        Some(id)
    }

    /// The announced endpoint of an id the agent presents.
    fn endpoint(&self, id: &str) -> Option<url::Url> {
        self.endpoints.lock().ok()?.iter().find(|(i, _)| i == id).map(|(_, u)| u.clone())
    }
}

/// The MCP part of the agent's permission rules (`permissions` and `allowedTools` /
/// `disallowedTools`), which the gateway enforces on `tools/call` itself: the agent has a shell
/// and can POST to its route without the CLI. Claude Code's forms: `mcp__server` (every tool of
/// the server), `mcp__server__*`, `mcp__server__tool`. A deny (or ask: nobody answers) rule wins;
/// with allow rules naming MCP tools, only those run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct McpRules {
    deny: Vec<String>,
    /// None: no allow rule names an MCP tool (every tool not denied runs).
    allow: Option<Vec<String>>,
}

impl McpRules {
    /// The rules of a resolved configuration and its tool lists.
    pub fn of(c: &crate::api::AgentConfig, allowed_tools: &[String], disallowed_tools: &[String]) -> Self {
        let p = c.permissions.clone().unwrap_or_default();
        let mcp = |r: &&String| r.trim().starts_with("mcp__");
        let own = |r: &String| r.trim().to_string();
        let deny = p.deny.iter().chain(&p.ask).chain(disallowed_tools).filter(mcp).map(own).collect();
        let allow: Vec<String> = p.allow.iter().chain(allowed_tools).filter(mcp).map(own).collect();
        Self { deny, allow: (!allow.is_empty()).then_some(allow) }
    }

    /// Whether the tool `tool` (as the server names it) of `server` may be called.
    pub fn allows(&self, server: &str, tool: &str) -> bool {
        // The CLI's own name for the tool: anything but [A-Za-z0-9_-] becomes '_'.
        let tool: String =
            tool.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
        let (whole, any, exact) =
            (format!("mcp__{server}"), format!("mcp__{server}__*"), format!("mcp__{server}__{tool}"));
        let names = |r: &String| *r == whole || *r == any || *r == exact;
        !self.deny.iter().any(names) && self.allow.as_ref().is_none_or(|a| a.iter().any(names))
    }
}

impl std::fmt::Debug for McpUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("McpUpstream").field("url", &self.url.as_str()).field("headers", &names).finish()
    }
}

/// The remote servers of one execution, by name.
pub type McpRoutes = BTreeMap<String, McpUpstream>;

/// Builds the routes of `servers` (the resolved remote ones) with their header values, which
/// `value` looks up (server name, header name), and the rules their tool calls obey. Errors name
/// the server and header.
pub fn routes(
    servers: &[crate::api::McpServer],
    rules: &McpRules,
    mut value: impl FnMut(&crate::api::McpServer, &crate::api::McpHeader) -> Result<String, String>,
) -> Result<McpRoutes, String> {
    let mut out = McpRoutes::new();
    let rules = Arc::new(rules.clone());
    for s in servers {
        let Some(url) = &s.url else { continue };
        let url = url::Url::parse(url).map_err(|e| format!("MCP server {:?}: {e}", s.name))?;
        let mut headers = Vec::new();
        for h in &s.headers_from {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("MCP server {:?}: {:?} is not a header name", s.name, h.name))?;
            let v = value(s, h)?;
            let mut v = HeaderValue::from_str(&v).map_err(|_| {
                format!("MCP server {:?}: the Secret value for header {} is not a valid header value", s.name, h.name)
            })?;
            v.set_sensitive(true);
            headers.push((name, v));
        }
        out.insert(
            s.name.clone(),
            McpUpstream {
                url,
                transport: s.transport.unwrap_or_default(),
                headers,
                rules: rules.clone(),
                endpoints: Default::default(),
            },
        );
    }
    Ok(out)
}

/// Whether an MCP server's address is one the controller refuses to connect to: loopback (its
/// own unauthenticated ports), link-local (169.254.0.0/16 with the cloud metadata service,
/// fe80::/10), unspecified (0.0.0.0/8, `::`: this host) and the IPv6 metadata address. Private
/// ranges stay allowed: an in-cluster MCP server is a Service.
pub fn is_controller_local(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => a.is_loopback() || a.is_link_local() || a.octets()[0] == 0,
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xffc0) == 0xfe80
                || a == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && (s[6] >> 8 == 127 || s[6] == 0xa9fe || s[6] >> 8 == 0))
        }
    }
}

/// Resolves names and keeps only the addresses the controller may connect to
/// (`is_controller_local`): a name that resolves to 127.0.0.1 reaches nothing.
struct NoLocalAddresses;

impl reqwest::dns::Resolve for NoLocalAddresses {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<std::net::SocketAddr> = found.into_iter().filter(|a| !is_controller_local(a.ip())).collect();
            if kept.is_empty() {
                return Err(format!("{host} resolves only to loopback, link-local or unspecified addresses").into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client that follows no redirect: the server's headers go to its URL and nowhere else.
/// Without `local`, it connects to no loopback, link-local or unspecified address (the
/// controller's: see `is_controller_local`); on one machine (`agentops run`) `local` is true.
pub fn client(local: bool) -> std::io::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("agentops-gateway/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(30));
    if !local {
        builder = builder.dns_resolver(Arc::new(NoLocalAddresses)).no_proxy();
    }
    builder.build().map_err(std::io::Error::other)
}

/// Relays one request of the agent to the remote server `server`; `rest` is the path after
/// `/mcp/{server}` (empty), `query` the raw query.
#[allow(clippy::too_many_arguments)]
pub async fn relay(
    client: &reqwest::Client,
    local: bool,
    account: Option<&Arc<Account>>,
    process: &[Option<&BodyBudget>],
    server: &str,
    rest: &str,
    query: Option<&str>,
    method: Method,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or_default();
    let Some(account) = account.filter(|a| a.accepts(presented)) else {
        return close(refuse(StatusCode::UNAUTHORIZED, "authentication_error", "this gateway token is not valid"));
    };
    let Some(upstream) = account.mcp.get(server).cloned() else {
        count_refused(account, &method, server);
        return close(refuse(StatusCode::NOT_FOUND, "not_found_error", "no such MCP server for this execution"));
    };
    // Where it goes: the configured URL itself; with SSE also an endpoint the server announced
    // on the stream (the agent names it by the id it was given; never a URL of its own).
    let target = match (upstream.transport, rest, query, &method) {
        (_, "", None, m) if *m == Method::POST || *m == Method::GET || *m == Method::DELETE => {
            Some(upstream.url.clone())
        }
        (McpTransport::Sse, "", Some(q), m) if *m == Method::POST => {
            q.strip_prefix("endpoint=").and_then(|id| upstream.endpoint(id))
        }
        _ => None,
    };
    let Some(target) = target else {
        count_refused(account, &method, server);
        return close(refuse(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "the gateway relays the configured MCP URL only",
        ));
    };
    // An address given as such is not resolved: checked here (names: by `client`'s resolver).
    let literal = match target.host() {
        Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    };
    if !local && literal.is_some_and(is_controller_local) {
        count_refused(account, &method, server);
        return close(refuse(
            StatusCode::FORBIDDEN,
            "permission_error",
            &format!(
                "spec.agent.mcpServers[{server}].url: the controller does not connect to loopback, link-local or \
                 unspecified addresses; give the server's Service or public name"
            ),
        ));
    }
    let Ok(slot) = account.mcp_in_flight.clone().try_acquire_owned() else {
        return refuse(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "too many MCP requests in flight; try again");
    };
    let budgets: Vec<&BodyBudget> = std::iter::once(&account.bodies).chain(process.iter().flatten().copied()).collect();
    let (bytes, held) = match bodies::read(body, bodies::declared_length(headers), MAX_MCP_REQUEST_BYTES, &budgets)
        .await
    {
        Ok(read) => read,
        Err(BodyError::TooLarge) => {
            return close(refuse(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", "over the 4 MiB MCP limit"));
        }
        Err(BodyError::Busy) => {
            return close(refuse(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "the gateway is full; try again"));
        }
        Err(BodyError::Broken(_)) | Err(BodyError::TooSlow) => {
            return close(refuse(StatusCode::BAD_REQUEST, "invalid_request_error", "the body did not arrive whole"));
        }
    };
    // What goes is what was checked: the body re-serialized from the parsed message (no
    // duplicate key or other parser difference between the gateway and the server).
    let (bytes, lists_tools) = if method == Method::POST {
        match check_body(&bytes, server, &upstream.rules) {
            Ok(checked) => checked,
            Err(refusal) => {
                count_refused(account, &method, server);
                if let Some(f) = &account.on_change {
                    f();
                }
                return *refusal;
            }
        }
    } else {
        (bytes, false)
    };
    if let Ok(mut m) = account.metered.lock() {
        *m.mcp_requests.entry(server.to_string()).or_default() += 1;
    }
    if let Some(f) = &account.on_change {
        f();
    }
    let mut out = client.request(method, target.as_str());
    for name in REQUEST_HEADERS {
        for value in headers.get_all(*name) {
            out = out.header(*name, value);
        }
    }
    for (name, value) in &upstream.headers {
        out = out.header(name, value);
    }
    let sent = if bytes.is_empty() { out.send().await } else { out.body(bytes).send().await };
    drop(held);
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            // The error may name the URL; never the headers (reqwest does not print them).
            tracing::warn!(server, "the gateway cannot reach a remote MCP server");
            let why = if !local && format!("{e:?}").contains("resolves only to loopback") {
                format!(
                    "spec.agent.mcpServers[{server}].url resolves only to loopback, link-local or unspecified \
                     addresses, which the controller does not connect to"
                )
            } else {
                "the gateway cannot reach the MCP server".to_string()
            };
            return refuse(StatusCode::BAD_GATEWAY, "api_error", &why);
        }
    };
    if resp.status().is_redirection() {
        return refuse(
            StatusCode::BAD_GATEWAY,
            "api_error",
            &format!("the MCP server answered a redirect ({}); the gateway follows none", resp.status()),
        );
    }
    let mut answer = Response::builder().status(resp.status().as_u16());
    for name in RESPONSE_HEADERS {
        for value in resp.headers().get_all(*name) {
            answer = answer.header(*name, value);
        }
    }
    let json_answer = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if lists_tools && json_answer {
        // The tool list, filtered to what the rules allow: the model is not offered a tool whose
        // call would be refused.
        let mut resp = resp;
        let mut whole = Vec::new();
        loop {
            match tokio::time::timeout(MCP_SILENCE, resp.chunk()).await {
                Ok(Ok(Some(chunk))) if whole.len() + chunk.len() <= MAX_MCP_ANSWER_BYTES => {
                    whole.extend_from_slice(&chunk)
                }
                Ok(Ok(None)) => break,
                _ => {
                    return refuse(
                        StatusCode::BAD_GATEWAY,
                        "api_error",
                        "the MCP server's tool list did not arrive whole",
                    );
                }
            }
        }
        drop(slot);
        let body = match serde_json::from_slice::<serde_json::Value>(&whole) {
            Ok(mut v) => {
                filter_tools(&mut v, server, &upstream.rules);
                Bytes::from(v.to_string())
            }
            Err(_) => Bytes::from(whole),
        };
        let mut redactor = Redactor::new(&upstream.headers);
        let body = [redactor.feed(&body), redactor.finish()].concat();
        return answer
            .body(Body::from(body))
            .unwrap_or_else(|_| refuse(StatusCode::BAD_GATEWAY, "api_error", "no answer"));
    }
    let event_stream = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    // An event stream is parsed event by event across chunks: `endpoint` events are rewritten
    // (or dropped), tool lists filtered; anything else passes as it came.
    let events = event_stream.then(|| SseRelay::new(upstream.clone(), server.to_string()));
    let redactor = Redactor::new(&upstream.headers);
    let upstream_bytes = resp.bytes_stream();
    let stream = futures::stream::unfold(Some((upstream_bytes, slot, events, redactor)), |state| async move {
        let (mut up, slot, mut events, mut redactor) = state?;
        loop {
            let next = tokio::time::timeout(MCP_SILENCE, up.next()).await.ok().flatten();
            let item = match (next, events.as_mut()) {
                (Some(Ok(chunk)), Some(ev)) => match ev.feed(&chunk) {
                    Ok(out) => redactor.feed(&out),
                    Err(e) => return Some((Err(std::io::Error::other(e)), None)),
                },
                (Some(Ok(chunk)), None) => redactor.feed(&chunk),
                (Some(Err(e)), _) => return Some((Err(std::io::Error::other(e)), None)),
                // The end: what the redactor held back (a value's start that never went on).
                (None, _) => {
                    let rest = redactor.finish();
                    return (!rest.is_empty()).then_some((Ok(rest), None));
                }
            };
            if item.is_empty() {
                continue;
            }
            return Some((Ok(item), Some((up, slot, events, redactor))));
        }
    });
    answer.body(Body::from_stream(stream)).unwrap_or_else(|_| refuse(StatusCode::BAD_GATEWAY, "api_error", "no answer"))
}

fn count_refused(account: &Account, method: &Method, server: &str) {
    if let Ok(mut m) = account.metered.lock() {
        m.refused_not_allowed += 1;
        m.last_refused = Some(format!("{method} MCP {}", crate::api::report::truncate(server, 64)));
    }
}

/// Checks a POSTed body: one JSON-RPC message or a batch of them, each `jsonrpc: "2.0"`; a
/// `tools/call` must name a tool the rules allow. Gives the body to forward (re-serialized) and
/// whether it asks for `tools/list`, or the refusal to answer.
fn check_body(bytes: &[u8], server: &str, rules: &McpRules) -> Result<(Bytes, bool), Box<Response>> {
    let not_jsonrpc = || {
        Box::new(close(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the gateway relays JSON-RPC 2.0 messages only",
        )))
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| not_jsonrpc())?;
    let messages: Vec<&serde_json::Value> = match &value {
        serde_json::Value::Array(a) if !a.is_empty() => a.iter().collect(),
        serde_json::Value::Object(_) => vec![&value],
        _ => return Err(not_jsonrpc()),
    };
    let mut refused = None;
    let mut lists_tools = false;
    for m in &messages {
        if !m.is_object() || m.get("jsonrpc").and_then(|v| v.as_str()) != Some("2.0") {
            return Err(not_jsonrpc());
        }
        match m.get("method") {
            None => {}
            Some(serde_json::Value::String(name)) if name == "tools/call" => {
                let tool = m.get("params").and_then(|p| p.get("name")).and_then(|n| n.as_str());
                match tool {
                    Some(tool) if rules.allows(server, tool) => {}
                    Some(tool) => refused = Some(crate::api::report::truncate(tool, 128)),
                    None => return Err(not_jsonrpc()),
                }
            }
            Some(serde_json::Value::String(name)) => lists_tools |= name == "tools/list",
            Some(_) => return Err(not_jsonrpc()),
        }
    }
    if let Some(tool) = refused {
        let message = format!("the agent's permission rules do not allow the MCP tool mcp__{server}__{tool}");
        let errors: Vec<serde_json::Value> = messages
            .iter()
            .filter_map(|m| m.get("id"))
            .map(|id| serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32600, "message": message}}))
            .collect();
        let body = match (&value, errors.as_slice()) {
            (serde_json::Value::Object(_), [one]) => one.to_string(),
            _ => serde_json::Value::Array(errors).to_string(),
        };
        return Err(Box::new(close(
            Response::builder()
                .status(StatusCode::FORBIDDEN)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap_or_else(|_| refuse(StatusCode::FORBIDDEN, "permission_error", "not allowed")),
        )));
    }
    Ok((Bytes::from(value.to_string()), lists_tools))
}

/// Keeps, in a JSON-RPC answer (or batch), only the tools the rules allow in `result.tools`.
fn filter_tools(value: &mut serde_json::Value, server: &str, rules: &McpRules) {
    match value {
        serde_json::Value::Array(a) => a.iter_mut().for_each(|v| filter_tools(v, server, rules)),
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::Array(tools)) = o.get_mut("result").and_then(|r| r.get_mut("tools")) {
                tools.retain(|t| t.get("name").and_then(|n| n.as_str()).is_some_and(|n| rules.allows(server, n)));
            }
        }
        _ => {}
    }
}

/// Takes the header values the gateway adds out of the server's answers: a server that
/// reflects its request headers into its body must not hand them to the agent. A value split
/// across chunks is caught by holding back the end of a chunk while it could begin one (only
/// then: a whole event is not delayed); each value, and a `Scheme token` value's token alone, is
/// replaced by `[redacted]`. Values shorter than 8 bytes are left alone (they would match
/// anything).
struct Redactor {
    values: Vec<Vec<u8>>,
    held: Vec<u8>,
}

const REDACTED: &[u8] = b"[redacted]";

impl Redactor {
    fn new(headers: &[(HeaderName, HeaderValue)]) -> Self {
        let mut values: Vec<Vec<u8>> = Vec::new();
        for (_, v) in headers {
            let v = v.as_bytes();
            values.push(v.to_vec());
            if let Some(at) = v.iter().position(|b| *b == b' ') {
                values.push(v[at + 1..].to_vec());
            }
        }
        values.retain(|v| v.len() >= 8);
        // The longest first: a value containing another is replaced whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self { values, held: Vec::new() }
    }

    /// The bytes of `chunk` (after what was held) that can go, redacted.
    fn feed(&mut self, chunk: &[u8]) -> Bytes {
        if self.values.is_empty() {
            return Bytes::copy_from_slice(chunk);
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'scan: while i < buf.len() {
            for v in &self.values {
                if buf[i..].starts_with(v) {
                    out.extend_from_slice(REDACTED);
                    i += v.len();
                    continue 'scan;
                }
            }
            // Could a value begin here and go on in the next chunk?
            if self.values.iter().any(|v| v.len() > buf.len() - i && v.starts_with(&buf[i..])) {
                self.held = buf[i..].to_vec();
                break;
            }
            out.push(buf[i]);
            i += 1;
        }
        Bytes::from(out)
    }

    /// What was held at the end of the stream (no value: it ended).
    fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.held))
    }
}

/// An event stream relayed event by event. Lines end with CRLF, LF or CR (the SSE
/// specification's three), possibly split across chunks; an event ends at an empty line and is
/// held whole until then (at most `MAX_SSE_EVENT_BYTES`). An `endpoint` event is replaced by one
/// naming an opaque id (the server's endpoint is remembered, `McpUpstream::announce`), or dropped
/// when its endpoint is not on the server's origin; a JSON-RPC answer carrying `result.tools` is
/// filtered to the tools the rules allow; any other event passes byte for byte.
struct SseRelay {
    upstream: McpUpstream,
    server: String,
    /// The current line so far.
    line: Vec<u8>,
    /// The last line ended with CR: an LF right after it belongs to that line end.
    after_cr: bool,
    /// The current event's bytes as received.
    raw: Vec<u8>,
    /// Its `event` and `data` fields so far.
    kind: Option<String>,
    data: Option<String>,
    /// Its other lines (`id`, `retry`, comments), to write back with a changed event.
    other: Vec<String>,
}

impl SseRelay {
    fn new(upstream: McpUpstream, server: String) -> Self {
        Self {
            upstream,
            server,
            line: Vec::new(),
            after_cr: false,
            raw: Vec::new(),
            kind: None,
            data: None,
            other: Vec::new(),
        }
    }

    /// Takes a chunk of the stream; gives the bytes to pass on (whole events only).
    fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, &'static str> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    self.raw.push(b);
                    continue;
                }
            }
            self.raw.push(b);
            if self.raw.len() > MAX_SSE_EVENT_BYTES {
                return Err("an MCP server's event is larger than the gateway relays");
            }
            match b {
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if line.is_empty() {
                        self.end_event(&mut out);
                    } else {
                        self.field(&line);
                    }
                }
                _ => self.line.push(b),
            }
        }
        Ok(Bytes::from(out))
    }

    /// One line of an event (the SSE specification's field parsing).
    fn field(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let (name, value) = match line.split_once(':') {
            Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match name {
            "event" => self.kind = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => self.other.push(line.into_owned()),
        }
    }

    /// The current event is complete: pass it, change it or drop it.
    fn end_event(&mut self, out: &mut Vec<u8>) {
        let raw = std::mem::take(&mut self.raw);
        let (kind, data, other) = (self.kind.take(), self.data.take(), std::mem::take(&mut self.other));
        let kind = kind.unwrap_or_default();
        let rewritten = |data: &str| {
            let mut e: String = other.iter().map(|l| format!("{l}\n")).collect();
            if !kind.is_empty() {
                e.push_str(&format!("event: {kind}\n"));
            }
            for l in data.split('\n') {
                e.push_str(&format!("data: {l}\n"));
            }
            e.push('\n');
            e
        };
        if kind.trim() == "endpoint" {
            // Where the client POSTs: only an endpoint on the server's origin, named by an id.
            let target = data.as_deref().and_then(|d| self.upstream.url.join(d.trim()).ok());
            let id =
                target.filter(|u| u.origin() == self.upstream.url.origin()).and_then(|u| self.upstream.announce(u));
            match id {
                Some(id) => out.extend_from_slice(rewritten(&format!("?endpoint={id}")).as_bytes()),
                None => tracing::warn!(server = self.server, "dropped an MCP endpoint event the gateway cannot relay"),
            }
            return;
        }
        if let Some(d) = &data
            && d.contains("\"tools\"")
            && let Ok(mut v) = serde_json::from_str::<serde_json::Value>(d)
        {
            filter_tools(&mut v, &self.server, &self.upstream.rules);
            out.extend_from_slice(rewritten(&v.to_string()).as_bytes());
            return;
        }
        out.extend_from_slice(&raw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> McpUpstream {
        McpUpstream {
            url: url::Url::parse(url).unwrap(),
            transport: McpTransport::Sse,
            headers: Vec::new(),
            rules: Default::default(),
            endpoints: Default::default(),
        }
    }

    /// Feeds the chunks; gives what the agent receives.
    fn relayed(up: &McpUpstream, chunks: &[&[u8]]) -> String {
        let mut relay = SseRelay::new(up.clone(), "tracker".into());
        let out: Vec<u8> = chunks.iter().flat_map(|c| relay.feed(c).unwrap().to_vec()).collect();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_endpoint_event_becomes_an_id_and_nothing_else_changes() {
        let up = upstream("https://mcp.example.com/sse");
        let out =
            relayed(&up, &[b"event: endpoint\ndata: /messages?sessionId=abc\n\nevent: message\ndata: {\"x\":1}\n\n"]);
        let id = up.endpoints.lock().unwrap()[0].0.clone();
        assert_eq!(out, format!("event: endpoint\ndata: ?endpoint={id}\n\nevent: message\ndata: {{\"x\":1}}\n\n"));
        assert_eq!(up.endpoint(&id).unwrap().as_str(), "https://mcp.example.com/messages?sessionId=abc");
        assert!(up.endpoint("/admin/rotate-keys?all=1").is_none(), "only an id the server's event made");
    }

    #[test]
    fn an_endpoint_event_split_across_chunks_or_ended_by_cr_is_still_rewritten() {
        for chunks in [
            &[&b"event: endpoint\n"[..], b"data: /messages?sessionId=abc\n\n"][..],
            &[b"event: endpoint\r", b"data: /messages?sessionId=abc\r\r"],
            &[b"event: endpoint\r", b"\ndata: /messages?session", b"Id=abc\r\n", b"\r", b"\n"],
            &[b"event:endpoint\ndata:/messages?sessionId=abc\n", b"\n"],
        ] {
            let up = upstream("https://mcp.example.com/sse");
            let out = relayed(&up, chunks);
            assert!(!out.contains("messages"), "{chunks:?}: {out:?}");
            assert!(out.starts_with("event: endpoint\ndata: ?endpoint="), "{chunks:?}: {out:?}");
            assert_eq!(up.endpoints.lock().unwrap().len(), 1);
        }
    }

    #[test]
    fn an_endpoint_event_that_cannot_be_rewritten_is_dropped() {
        let up = upstream("https://mcp.example.com/sse");
        let out = relayed(
            &up,
            &[b"event: endpoint\ndata: https://attacker.example.net/steal\n\nevent: message\ndata: 1\n\n"],
        );
        assert_eq!(out, "event: message\ndata: 1\n\n");
        assert!(up.endpoints.lock().unwrap().is_empty());
    }

    #[test]
    fn tool_rules_match_the_clis_forms() {
        let c = |allow: &[&str], deny: &[&str]| crate::api::AgentConfig {
            permissions: Some(crate::api::Permissions {
                allow: allow.iter().map(|r| r.to_string()).collect(),
                deny: deny.iter().map(|r| r.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let rules = McpRules::of(&c(&["mcp__t__lookup", "Bash"], &["mcp__t__drop"]), &[], &[]);
        assert!(rules.allows("t", "lookup"));
        assert!(!rules.allows("t", "drop") && !rules.allows("t", "other") && !rules.allows("u", "lookup"));
        let rules = McpRules::of(&c(&["mcp__t"], &["mcp__u__*"]), &[], &[]);
        assert!(rules.allows("t", "anything") && !rules.allows("u", "x"));
        assert!(McpRules::of(&c(&["Bash"], &[]), &[], &[]).allows("t", "x"), "no MCP allow rule: not restricted");
        let rules = McpRules::of(&crate::api::AgentConfig::default(), &[], &["mcp__t__a.b".into()]);
        assert!(rules.allows("t", "a.b"), "a rule names the CLI's form of the tool (a_b), not the server's");
        let rules = McpRules::of(&crate::api::AgentConfig::default(), &[], &["mcp__t__a_b".into()]);
        assert!(!rules.allows("t", "a.b"));
    }

    #[test]
    fn header_values_are_redacted_even_split_across_chunks() {
        let mut v = HeaderValue::from_static("Bearer tok-5e8d2a91c3");
        v.set_sensitive(true);
        let headers = [(HeaderName::from_static("authorization"), v)];
        let mut r = Redactor::new(&headers);
        let out: Vec<u8> =
            [r.feed(b"you sent Bearer tok-5e8"), r.feed(b"d2a91c3 and tok-5e8d2a91c3!\n\n"), r.finish()].concat();
        assert_eq!(String::from_utf8(out).unwrap(), "you sent [redacted] and [redacted]!\n\n");
        // An event's end is not held back: only a possible start of a value is.
        let mut r = Redactor::new(&headers);
        assert_eq!(&r.feed(b"event: message\ndata: 1\n\n")[..], b"event: message\ndata: 1\n\n");
        assert_eq!(&r.feed(b"tok-5e")[..], b"");
        assert_eq!(&r.finish()[..], b"tok-5e", "a start that never went on is passed at the end");
    }
}
