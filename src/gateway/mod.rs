//! The model gateway: the agent talks to the Messages API through it with a token that works
//! only for its execution and only while it runs; the gateway adds the real API key (which the
//! agent never sees), relays the response with streaming intact, and meters every response
//! (`usage` from `message_start` and `message_delta` events or a JSON body, the tools the model
//! called, the turns): the operator counts, rather than trusting what the agent reports. With a
//! budget, each request's worst case is held against it while the request is in flight (its
//! `max_tokens` lowered to what is left when needed): what is spent never exceeds the budget,
//! also under concurrent requests. A request the budget cannot pay for is refused, and the run
//! ends `BudgetExceeded`.
//!
//! `agentops run` starts one on loopback per execution ([`Gateway`]); the controller serves
//! one account per running execution on its own listener ([`Gateways`], under
//! `/gateway/{namespace}/{name}/`), with the key read from the execution's Secret: a runner
//! pod never holds it.

pub mod git;
pub mod prices;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::api::{ToolCalls, Usage};

/// Largest request body relayed (a long conversation with images stays well under it).
const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// Words of the refusal once the budget is spent (the runner maps them to `BudgetExceeded`).
pub const BUDGET_SPENT: &str = "agentops: spec.agent.maxBudgetUsd is spent";

/// What the gateway counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metered {
    /// Tokens of every response relayed, of every kind.
    pub usage: Usage,
    /// Cost of those tokens at each request's model's list price.
    pub cost_usd: f64,
    /// Responses relayed (successful or not).
    pub responses: u64,
    /// Messages the model completed (each a turn of the agent).
    pub turns: u64,
    /// Tools the model called, by name.
    pub tool_calls: ToolCalls,
    /// Requests refused because the budget was spent.
    pub refused_over_budget: u64,
    /// Requests refused because their method, path or query is not one the gateway relays.
    pub refused_not_allowed: u64,
    /// The last of those, as `METHOD path` (at most 200 bytes).
    pub last_refused: Option<String>,
    /// The worst case of the requests in flight, held against the budget until they end.
    pub reserved_usd: f64,
    /// Requests whose `max_tokens` was lowered to what the budget left could pay for.
    pub clamped: u64,
}

/// Requests one execution may have in flight at once (Claude Code sends a few: the main turn,
/// subagents, token counts). Beyond: 429, which the CLI retries later.
pub const MAX_IN_FLIGHT: usize = 16;

/// One execution's access: its token, the key added for it, what it spent.
pub struct Account {
    api_key: String,
    token: String,
    budget_usd: Option<f64>,
    metered: Mutex<Metered>,
    open: AtomicBool,
    /// Requests of this execution in flight, bounded (`MAX_IN_FLIGHT`): a runaway or hostile
    /// agent cannot hold more of the controller's memory and connections than this.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Called when the figures change (the controller wakes the execution's reconcile).
    on_change: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Account {
    pub fn new(api_key: &str, token: &str, budget_usd: Option<f64>) -> Self {
        Self {
            api_key: api_key.to_string(),
            token: token.to_string(),
            budget_usd,
            metered: Mutex::new(Metered::default()),
            open: AtomicBool::new(true),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            on_change: None,
        }
    }

    /// Counts what was already spent (recorded before this process opened the account).
    pub fn with_spent(self, usage: Usage, cost_usd: f64) -> Self {
        if let Ok(mut m) = self.metered.lock() {
            m.usage = usage;
            m.cost_usd = cost_usd;
        }
        self
    }

    /// Holds a request's worst case against the budget, lowering its `max_tokens` to what the
    /// budget left can pay for when needed. Err: the budget cannot pay for the request.
    fn reserve(self: &Arc<Self>, path: &str, body: Bytes) -> Result<(Option<Hold>, Bytes), String> {
        let Some(budget) = self.budget_usd else { return Ok((None, body)) };
        let req = serde_json::from_slice::<RequestModel>(&body).unwrap_or_default();
        let model = req.model.as_deref();
        // Tokens are never more than the request's bytes (text is ~4 bytes a token), priced at
        // the dearest input rate (a cache write); output at most `max_tokens`.
        let input = prices::estimate_cost(
            model,
            &Usage { cache_creation_input_tokens: body.len() as u64, ..Default::default() },
        );
        let per_output =
            prices::estimate_cost(model, &Usage { output_tokens: 1_000_000, ..Default::default() }) / 1_000_000.0;
        let free = path.starts_with("/v1/messages/count_tokens");
        let wanted = if free { 0 } else { req.max_tokens.unwrap_or(0) };
        let Ok(mut m) = self.metered.lock() else { return Err("the gateway's books are unreadable".into()) };
        let left = budget - m.cost_usd - m.reserved_usd;
        let refuse = |m: &mut Metered, why: String| {
            m.refused_over_budget += 1;
            Err(format!("{BUDGET_SPENT} ({why}; ${:.4} spent of ${budget})", m.cost_usd))
        };
        if m.cost_usd >= budget {
            return refuse(&mut m, "nothing left".into());
        }
        if free {
            return Ok((None, body));
        }
        let affordable = ((left - input) / per_output).floor().max(0.0) as u64;
        let granted = wanted.min(affordable);
        if granted < wanted.min(MIN_OUTPUT_TOKENS) || left < input {
            let why = format!(
                "${left:.4} left, ${:.4} held by requests in flight; this one could cost ${:.4}",
                m.reserved_usd,
                input + wanted as f64 * per_output
            );
            return refuse(&mut m, why);
        }
        let usd = input + granted as f64 * per_output;
        m.reserved_usd += usd;
        let body = if granted < wanted {
            m.clamped += 1;
            drop(m);
            with_max_tokens(&body, granted).unwrap_or(body)
        } else {
            body
        };
        Ok((Some(Hold { account: self.clone(), usd }), body))
    }

    /// Calls `f` whenever the figures change.
    pub fn on_change(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_change = Some(Box::new(f));
        self
    }

    pub fn metered(&self) -> Metered {
        self.metered.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The token stops working.
    pub fn close(&self) {
        self.open.store(false, Ordering::Relaxed);
    }

    fn accepts(&self, presented: &str) -> bool {
        self.open.load(Ordering::Relaxed)
            && presented.len() == self.token.len()
            && presented.bytes().zip(self.token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

fn client() -> std::io::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("agentops-gateway/", env!("CARGO_PKG_VERSION")))
        .tcp_nodelay(true)
        .build()
        .map_err(std::io::Error::other)
}

/// A fresh token for an account (two v4 UUIDs: 244 random bits).
pub fn new_token() -> String {
    format!("agentops-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    account: Arc<Account>,
}

/// A running gateway on loopback for one execution; dropped or closed, its token no longer
/// works (nothing listens).
pub struct Gateway {
    /// Where the agent sends its requests (`ANTHROPIC_BASE_URL`).
    pub base_url: String,
    /// The agent's credential (`ANTHROPIC_API_KEY`): good for this gateway only.
    pub token: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Gateway {
    /// Starts a gateway on 127.0.0.1 that relays to `upstream` with `api_key`.
    pub async fn start(upstream: &str, api_key: &str) -> std::io::Result<Self> {
        Self::start_with_budget(upstream, api_key, None).await
    }

    /// The same, refusing requests once `budget_usd` is spent (priced by each request's model).
    pub async fn start_with_budget(upstream: &str, api_key: &str, budget_usd: Option<f64>) -> std::io::Result<Self> {
        let token = new_token();
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: client()?,
            account: Arc::new(Account::new(api_key, &token, budget_usd)),
        });
        let app = axum::Router::new().fallback(relay_local).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        // Streamed events are small writes: without TCP_NODELAY each waits for the peer's
        // delayed ACK (~40 ms on loopback), several times per turn.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(until).await;
        });
        Ok(Self { base_url, token, shared, stop })
    }

    /// What was counted so far.
    pub fn metered(&self) -> Metered {
        self.shared.account.metered()
    }

    /// Stops listening: the token is worthless from now on.
    pub fn close(&self) {
        self.shared.account.close();
        self.stop.cancel();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay_local(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    relay(&shared.client, &shared.upstream, Some(&shared.account), method, &path, &headers, body).await
}

/// Opens the account or route of a running execution this process has not opened (after a
/// restart: accounts open on first use, not by reading every running execution's Secrets).
/// Returns whether it did.
pub type Opener = Arc<dyn Fn(String, String) -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// The controller's gateway: one account per running execution, keyed by namespace and name.
pub struct Gateways {
    upstream: String,
    client: reqwest::Client,
    accounts: Mutex<HashMap<(String, String), Arc<Account>>>,
    opener: std::sync::OnceLock<Opener>,
    /// Tokens of closed accounts: never opened again.
    retired: Mutex<std::collections::HashSet<String>>,
}

impl Gateways {
    /// Relays to `upstream` (e.g. `https://api.anthropic.com`).
    pub fn new(upstream: &str) -> std::io::Result<Self> {
        Ok(Self {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: client()?,
            accounts: Mutex::new(HashMap::new()),
            opener: std::sync::OnceLock::new(),
            retired: Mutex::new(Default::default()),
        })
    }

    /// How accounts this process has not opened get opened on first use.
    pub fn set_opener(&self, opener: Opener) {
        let _ = self.opener.set(opener);
    }

    /// Whether `token` belonged to an account that was closed.
    pub fn retired(&self, token: &str) -> bool {
        self.retired.lock().is_ok_and(|r| r.contains(token))
    }

    /// Opens (or replaces) the account of one execution.
    pub fn open(&self, ns: &str, name: &str, account: Account) {
        if let Ok(mut a) = self.accounts.lock()
            && let Some(old) = a.insert((ns.into(), name.into()), Arc::new(account))
        {
            old.close();
        }
    }

    /// Requests of one execution refused outside the allowlist, and the last one (read on
    /// every reconcile: only these two fields, not the whole account).
    pub fn refusals(&self, ns: &str, name: &str) -> Option<(u64, Option<String>)> {
        let a = self.accounts.lock().ok()?.get(&(ns.to_string(), name.to_string())).cloned()?;
        let m = a.metered.lock().ok()?;
        (m.refused_not_allowed > 0).then(|| (m.refused_not_allowed, m.last_refused.clone()))
    }

    /// What one execution's account counted, while it is open.
    pub fn metered(&self, ns: &str, name: &str) -> Option<Metered> {
        let a = self.accounts.lock().ok()?.get(&(ns.to_string(), name.to_string())).cloned()?;
        Some(a.metered())
    }

    /// Closes an execution's account: its token is refused from now on. Returns what it counted.
    pub fn close(&self, ns: &str, name: &str) -> Option<Metered> {
        let a = self.accounts.lock().ok()?.remove(&(ns.to_string(), name.to_string()))?;
        a.close();
        if let Ok(mut r) = self.retired.lock() {
            if r.len() > 100_000 {
                r.clear();
            }
            r.insert(a.token.clone());
        }
        Some(a.metered())
    }

    /// `/gateway/{namespace}/{name}/v1/...`, for the controller's runner listener.
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new().route("/gateway/{ns}/{name}/{*path}", axum::routing::any(relay_controller)).with_state(self)
    }
}

async fn relay_controller(
    State(g): State<Arc<Gateways>>,
    Path((ns, name, _)): Path<(String, String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The path as it came, never decoded: `%2F`, `%2E` and `..` reach the allowlist as they are.
    let raw = uri.path().strip_prefix("/gateway/").and_then(|rest| {
        let mut parts = rest.splitn(3, '/');
        let (n, e, tail) = (parts.next()?, parts.next()?, parts.next()?);
        (n == ns && e == name).then(|| format!("/{tail}"))
    });
    let Some(path) = raw else {
        return refuse(StatusCode::NOT_FOUND, "not_found_error", "the gateway relays the Messages API only");
    };
    let key = (ns, name);
    let mut account = g.accounts.lock().ok().and_then(|a| a.get(&key).cloned());
    if account.is_none()
        && let Some(open) = g.opener.get()
        && open(key.0.clone(), key.1.clone()).await
    {
        account = g.accounts.lock().ok().and_then(|a| a.get(&key).cloned());
    }
    // Unknown and finished executions look the same: no token works for them (`relay` says so
    // before it reads a byte of the body).
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    relay(&g.client, &g.upstream, account.as_ref(), method, &format!("{path}{query}"), &headers, body).await
}

/// Asks hyper to close the connection after this answer (the request body may be unread).
fn close(mut r: Response) -> Response {
    r.headers_mut().insert("connection", HeaderValue::from_static("close"));
    r
}

fn refuse(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

/// The only requests relayed: what the pinned Claude Code CLI sends (seen in its traffic:
/// `POST /v1/messages?beta=true`, and `count_tokens` for `/context`), matched on the raw path
/// and query, before any decoding. Anything else (`/v1/messages/batches`, `/v1/files`,
/// `/v1/../admin`, `%2F`, `%2E`) never reaches the upstream with the operator's key.
fn allowed(method: &Method, path_and_query: &str) -> bool {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    method == Method::POST
        && matches!(path, "/v1/messages" | "/v1/messages/count_tokens")
        && matches!(query, None | Some("beta=true"))
}

/// Request headers passed upstream; everything else the agent sends stays here. The
/// `accept-encoding` is the gateway's own: identity, so every byte relayed is metered.
const REQUEST_HEADERS: &[&str] = &["anthropic-version", "anthropic-beta", "content-type", "accept"];

/// Headers never copied from one side to the other.
fn hop(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "x-api-key"
            | "authorization"
    )
}

#[derive(serde::Deserialize, Default)]
struct RequestModel {
    model: Option<String>,
    max_tokens: Option<u64>,
}

/// A clamped request still gets room for a useful answer; below this, the budget is spent.
const MIN_OUTPUT_TOKENS: u64 = 2048;

/// A request's worst case held against its account's budget while it is in flight.
struct Hold {
    account: Arc<Account>,
    usd: f64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Ok(mut m) = self.account.metered.lock() {
            m.reserved_usd = (m.reserved_usd - self.usd).max(0.0);
        }
    }
}

/// The request with `max_tokens` set to `n` (and an extended-thinking budget kept below it).
fn with_max_tokens(body: &[u8], n: u64) -> Option<Bytes> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["max_tokens"] = n.into();
    if let Some(t) = v.get_mut("thinking").and_then(|t| t.get_mut("budget_tokens"))
        && t.as_u64().is_some_and(|b| b >= n)
    {
        *t = (n / 2).into();
    }
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// Relays one request for `account` (None: no running execution here). The token is checked
/// from the headers, and the path against the allowlist, before a byte of the body is read; an
/// unauthenticated request is answered at once and its connection closed with the body unread.
#[allow(clippy::too_many_arguments)]
async fn relay(
    client: &reqwest::Client,
    upstream: &str,
    account: Option<&Arc<Account>>,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let presented = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")))
        .unwrap_or_default();
    let Some(account) = account.filter(|a| a.accepts(presented)) else {
        return close(refuse(StatusCode::UNAUTHORIZED, "authentication_error", "this gateway token is not valid"));
    };
    if !allowed(&method, path) {
        tracing::warn!(%method, path = %crate::api::report::truncate(path, 200), "the model gateway refused a request outside its allowlist");
        if let Ok(mut m) = account.metered.lock() {
            m.refused_not_allowed += 1;
            m.last_refused = Some(format!("{method} {}", crate::api::report::truncate(path, 200)));
        }
        // The controller tells the execution's owner (an Event), at most once a second.
        if let Some(f) = &account.on_change {
            f();
        }
        return close(refuse(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "the gateway relays POST /v1/messages and /v1/messages/count_tokens only",
        ));
    }
    // Bounded per execution before its body is read (16 × 32 MiB at most in memory).
    let Ok(slot) = account.in_flight.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too many requests of this execution in flight at the model gateway; try again",
        );
    };
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return close(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "the request body is over the gateway's 32 MiB limit",
            ));
        }
    };
    // The budget is hard, also under concurrency: the worst case of every request in flight is
    // held against it until the request ends (`Hold`), and settled to the metered figure.
    let (hold, body) = match account.reserve(path, body) {
        Ok(ok) => ok,
        // 400: the CLI does not retry it, and ends the run with this message.
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "invalid_request_error", &why),
    };
    // The model prices the tokens (a request names it; the agent cannot change the price of
    // what it already spent).
    let model = serde_json::from_slice::<RequestModel>(&body).ok().and_then(|m| m.model);
    let mut req = client.request(method, format!("{upstream}{path}")).body(body);
    for name in REQUEST_HEADERS {
        if let Some(value) = headers.get(*name) {
            req = req.header(*name, value);
        }
    }
    req = req.header("accept-encoding", "identity");
    let Ok(key) = HeaderValue::from_str(&account.api_key) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "the configured API key is not a valid header");
    };
    let resp = match req.header("x-api-key", key).send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "the model gateway cannot reach the upstream API");
            return refuse(StatusCode::BAD_GATEWAY, "api_error", "the model gateway cannot reach the Anthropic API");
        }
    };
    if let Ok(mut m) = account.metered.lock() {
        m.responses += 1;
    }
    // Identity was asked for; a compressed answer could not be metered, so it is not relayed.
    if let Some(enc) = resp.headers().get("content-encoding").filter(|v| v.as_bytes() != b"identity") {
        tracing::warn!(encoding = ?enc, "the upstream API answered compressed; not relayed (it could not be metered)");
        return refuse(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "the upstream API answered compressed content, which the gateway cannot meter",
        );
    }
    let status = resp.status();
    let mut out = Response::builder().status(status.as_u16());
    for (name, value) in resp.headers() {
        if !hop(name.as_str()) {
            out = out.header(name, value);
        }
    }
    let streaming = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let account = account.clone();
    let mut meter = Meter::default();
    let body = resp.bytes_stream().map(move |chunk| {
        // Held until the response has streamed to its end (or the agent went away).
        let (_hold, _slot) = (&hold, &slot);
        if let Ok(bytes) = &chunk {
            let seen = if streaming { meter.feed(bytes) } else { meter.feed_json(bytes) };
            if !seen.is_empty() {
                if let Ok(mut m) = account.metered.lock() {
                    let u = &mut m.usage;
                    u.input_tokens += seen.usage.input_tokens;
                    u.output_tokens += seen.usage.output_tokens;
                    u.cache_read_input_tokens += seen.usage.cache_read_input_tokens;
                    u.cache_creation_input_tokens += seen.usage.cache_creation_input_tokens;
                    m.cost_usd += prices::estimate_cost(model.as_deref(), &seen.usage);
                    m.turns += seen.turns;
                    for tool in seen.tools {
                        m.tool_calls.total += 1;
                        *m.tool_calls.by_tool.entry(tool).or_default() += 1;
                    }
                }
                if let Some(f) = &account.on_change {
                    f();
                }
            }
        }
        chunk
    });
    out.body(Body::from_stream(body)).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// What one piece of a response added.
#[derive(Default)]
struct Seen {
    usage: Usage,
    turns: u64,
    tools: Vec<String>,
}

impl Seen {
    fn is_empty(&self) -> bool {
        self.usage == Usage::default() && self.turns == 0 && self.tools.is_empty()
    }
}

/// Longest tool name counted as is (longer ones, and more than this many names, are `other`).
const TOOL_NAME_LIMIT: usize = 64;

fn tool_name(name: &str) -> String {
    if name.len() <= TOOL_NAME_LIMIT && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-:.".contains(c)) {
        name.to_string()
    } else {
        "other".into()
    }
}

/// Reads usage out of a response as it streams by.
#[derive(Default)]
struct Meter {
    /// Bytes of an event not yet complete.
    pending: Vec<u8>,
    /// Output tokens of the current message counted so far (`message_delta` is cumulative).
    output: u64,
    /// A JSON (non-streaming) body, gathered to the end.
    json: Vec<u8>,
}

impl Meter {
    /// Feeds SSE bytes; returns what they add.
    fn feed(&mut self, bytes: &[u8]) -> Seen {
        self.pending.extend_from_slice(bytes);
        let mut seen = Seen::default();
        let added = &mut seen.usage;
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
            let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
            match event["type"].as_str() {
                Some("message_start") => {
                    let u = &event["message"]["usage"];
                    added.input_tokens += n(u, "input_tokens");
                    added.cache_read_input_tokens += n(u, "cache_read_input_tokens");
                    added.cache_creation_input_tokens += n(u, "cache_creation_input_tokens");
                    self.output = n(u, "output_tokens");
                    added.output_tokens += self.output;
                }
                Some("message_delta") => {
                    let total = n(&event["usage"], "output_tokens");
                    added.output_tokens += total.saturating_sub(self.output);
                    self.output = self.output.max(total);
                }
                Some("content_block_start") if event["content_block"]["type"] == "tool_use" => {
                    seen.tools.push(tool_name(event["content_block"]["name"].as_str().unwrap_or_default()));
                }
                Some("message_stop") => seen.turns += 1,
                _ => {}
            }
        }
        seen
    }

    /// Feeds a JSON body; what it adds once it is complete.
    fn feed_json(&mut self, bytes: &[u8]) -> Seen {
        // Bounded like the request: a body larger than this is not metered further.
        if self.json.len() + bytes.len() > MAX_REQUEST_BYTES {
            return Seen::default();
        }
        self.json.extend_from_slice(bytes);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.json) else { return Seen::default() };
        if v["type"] != "message" {
            return Seen::default();
        }
        let u = &v["usage"];
        let n = |k: &str| u[k].as_u64().unwrap_or(0);
        let tools = v["content"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter(|b| b["type"] == "tool_use")
                    .map(|b| tool_name(b["name"].as_str().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        Seen {
            usage: Usage {
                input_tokens: n("input_tokens"),
                output_tokens: n("output_tokens"),
                cache_read_input_tokens: n("cache_read_input_tokens"),
                cache_creation_input_tokens: n("cache_creation_input_tokens"),
            },
            turns: 1,
            tools,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_a_stream_split_anywhere() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":120,\"output_tokens\":1,\"cache_read_input_tokens\":10,\"cache_creation_input_tokens\":5}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":40}}\n\n",
        );
        for cut in [1usize, 7, 33, 100, stream.len()] {
            let mut m = Meter::default();
            let mut total = Usage::default();
            for chunk in stream.as_bytes().chunks(cut) {
                let u = m.feed(chunk).usage;
                total.input_tokens += u.input_tokens;
                total.output_tokens += u.output_tokens;
                total.cache_read_input_tokens += u.cache_read_input_tokens;
                total.cache_creation_input_tokens += u.cache_creation_input_tokens;
            }
            assert_eq!(
                (
                    total.input_tokens,
                    total.output_tokens,
                    total.cache_read_input_tokens,
                    total.cache_creation_input_tokens
                ),
                (120, 40, 10, 5),
                "chunks of {cut}"
            );
        }
    }
}
