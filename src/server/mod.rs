//! The controller's HTTP endpoints, on two listeners:
//!
//! - probes and metrics (`/healthz`, `/readyz`, `/metrics`), unauthenticated, on their own port;
//! - the read API over the store (`/api/v1/executions`, `/api/v1/executions/{namespace}/{name}`,
//!   `/api/v1/workspaces`), for callers whose bearer token the cluster accepts (TokenReview) and
//!   only for namespaces where RBAC lets them read AgentExecutions (SubjectAccessReview);
//! - the runners' report endpoint (`/api/v1/runner/{namespace}/{name}/report`), for the
//!   execution's own token only, and only while that execution runs.

pub mod auth;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::UserInfo;
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use serde::Deserialize;

pub use auth::{Authorizer, is_dns_label, is_dns_subdomain};

use crate::api::Summary;
use crate::api::{AgentExecution, Phase};
use crate::controller::metrics::{Metrics, PhaseLabel};
use crate::controller::reports::Reports;
use crate::gateway::bodies::{self, BodyBudget, BodyError};
use crate::store::{Store, StoreError};

/// Largest runner report accepted (a summary with a 4 KiB result is about 6 KiB).
pub const MAX_REPORT_BYTES: usize = 64 * 1024;
/// Largest batch of log lines (200 lines of at most 4 KiB, JSON-escaped).
pub const MAX_LOGS_BYTES: usize = 2 * 1024 * 1024;
/// Largest diff (1 MiB, cut and marked by the runner, JSON-escaped).
pub const MAX_DIFF_BYTES: usize = 3 * 1024 * 1024;

/// What the endpoints read.
pub struct ServerState {
    pub cache: Cache<AgentExecution>,
    pub metrics: Arc<Metrics>,
    pub store: Option<Store>,
    /// True once the watch caches are synced and this instance leads.
    pub ready: Arc<AtomicBool>,
    /// True while this instance leads (always, without leader election).
    pub leading: Arc<AtomicBool>,
    /// Where runner reports go (None: reports are refused).
    pub reports: Option<Arc<Reports>>,
    /// Checks readers of the API. None: the read API is closed (every request 401).
    pub auth: Option<Arc<Authorizer>>,
    /// Bytes of runner request bodies in memory at once, all runners together.
    pub bodies: BodyBudget,
}

/// The server's listeners.
#[derive(Default)]
pub struct Listeners {
    /// The authenticated read API, the runners' report endpoint, the gateway and the relay.
    pub api: Option<tokio::net::TcpListener>,
    /// `/healthz`, `/readyz`, `/metrics`. None: served on `api` as well (tests).
    pub probes: Option<tokio::net::TcpListener>,
    /// The egress proxy's (runner pods' `HTTPS_PROXY` for `egressHosts`). None: not served.
    pub egress: Option<tokio::net::TcpListener>,
}

/// Serves what the controller exposes on `listeners`: this module owns the routes and who may
/// read them (`main` composes the two).
pub fn serve(listeners: Listeners) -> crate::controller::Serve {
    let api_addr = listeners.api.as_ref().and_then(|l| l.local_addr().ok());
    let start = Box::new(move |e: crate::controller::Exposed| {
        let state = Arc::new(ServerState {
            cache: e.cache,
            metrics: e.metrics,
            store: e.store,
            ready: e.ready,
            leading: e.leading,
            reports: Some(e.reports),
            auth: Some(Arc::new(Authorizer::new(e.client))),
            bodies: BodyBudget::new(crate::gateway::bodies::RUNNER_ENDPOINT_BYTES),
        });
        let probes = probes_router(state.clone());
        let api = api_router(state).merge(e.relayed);
        let spawn = |listener: tokio::net::TcpListener, app: Router| {
            tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, app).await {
                    tracing::error!(error = %err, "HTTP server stopped");
                }
            })
        };
        match (listeners.api, listeners.probes) {
            (Some(a), Some(p)) => vec![spawn(a, api), spawn(p, probes)],
            (Some(a), None) => vec![spawn(a, api.merge(probes))],
            (None, Some(p)) => vec![spawn(p, probes)],
            (None, None) => vec![],
        }
    });
    let egress = listeners.egress.map(|listener| crate::gateway::egress::EgressListener {
        listener,
        resolver: crate::gateway::egress::system_resolver(),
        allow_local: false,
    });
    crate::controller::Serve { api_addr, start, egress }
}

/// Probes and metrics.
pub fn probes_router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The authenticated read API and the runners' report endpoint.
pub fn api_router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/api/v1/executions", get(list_executions))
        .route("/api/v1/executions/{namespace}/{name}", get(get_execution))
        .route("/api/v1/workspaces", get(list_workspaces))
        // Bodies are read by the handlers, after the caller's token is checked (`runner_body`).
        .route("/api/v1/runner/{namespace}/{name}/report", post(runner_report))
        .route("/api/v1/runner/{namespace}/{name}/logs", post(runner_logs))
        .route("/api/v1/runner/{namespace}/{name}/diff", post(runner_diff))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<ServerState>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        "ok".into_response()
    } else if !s.leading.load(Ordering::Relaxed) {
        // Leader election: this one takes over when the Lease is free.
        (StatusCode::SERVICE_UNAVAILABLE, "standby: waiting for the leader lease").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    }
}

async fn metrics(State(s): State<Arc<ServerState>>) -> Response {
    // Phase gauges and queue depth come from the watch cache at scrape time.
    let mut counts = std::collections::HashMap::<Phase, i64>::new();
    for ax in s.cache.state() {
        *counts.entry(ax.status.as_ref().map(|st| st.phase).unwrap_or_default()).or_default() += 1;
    }
    for phase in [
        Phase::Pending,
        Phase::Queued,
        Phase::Running,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Cancelled,
        Phase::TimedOut,
    ] {
        s.metrics
            .executions
            .get_or_create(&PhaseLabel { phase: phase.as_str().into() })
            .set(counts.get(&phase).copied().unwrap_or(0));
    }
    s.metrics.queue_depth.set(counts.get(&Phase::Queued).copied().unwrap_or(0));
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
        .into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct ShowQuery {
    #[serde(default)]
    logs: bool,
    #[serde(default)]
    diff: bool,
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({"error": message.into()}))).into_response()
}

fn store_error(e: StoreError) -> Response {
    let code =
        if matches!(e, StoreError::NotFound(_)) { StatusCode::NOT_FOUND } else { StatusCode::INTERNAL_SERVER_ERROR };
    error(code, e.to_string())
}

fn no_store() -> Response {
    error(StatusCode::NOT_FOUND, "this controller runs without a store")
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The caller, or the response that refuses them.
async fn caller(s: &ServerState, headers: &HeaderMap) -> Result<(Arc<Authorizer>, UserInfo), Response> {
    let unauthorized = |m: &str| {
        let mut r = error(StatusCode::UNAUTHORIZED, m);
        r.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
        r
    };
    let Some(auth) = s.auth.clone() else {
        return Err(unauthorized("the read API is not enabled on this controller"));
    };
    let Some(token) = bearer(headers) else {
        return Err(unauthorized(
            "a bearer token is required: a Kubernetes token of a user who may read AgentExecutions \
             (`agentops executions list --server URL` sends the kubeconfig's)",
        ));
    };
    match auth.authenticate(token).await {
        Ok(Some(user)) => Ok((auth, user)),
        Ok(None) => Err(unauthorized("the cluster does not accept this token")),
        Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// The namespaces a caller may list: None for all of them.
async fn readable(
    auth: &Authorizer,
    user: &UserInfo,
    store: &Store,
    only: Option<&str>,
) -> Result<Option<Vec<String>>, Response> {
    let unavailable = |e: auth::AuthError| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    if let Some(ns) = only {
        if !is_dns_label(ns) {
            return Err(error(StatusCode::BAD_REQUEST, "namespace: not a valid namespace name"));
        }
        return match auth.allowed(user, ns, "list").await.map_err(unavailable)? {
            true => Ok(Some(vec![ns.to_string()])),
            false => Err(forbidden(user, "list", ns)),
        };
    }
    if auth.allowed(user, "", "list").await.map_err(unavailable)? {
        return Ok(None);
    }
    let mut allowed = Vec::new();
    for ns in store.namespaces().await.map_err(store_error)? {
        if auth.allowed(user, &ns, "list").await.map_err(unavailable)? {
            allowed.push(ns);
        }
    }
    Ok(Some(allowed))
}

fn forbidden(user: &UserInfo, verb: &str, ns: &str) -> Response {
    let who = user.username.as_deref().unwrap_or("?");
    error(
        StatusCode::FORBIDDEN,
        format!("{who} cannot {verb} agentexecutions.agentops.dev in namespace {ns} (grant it with RBAC)"),
    )
}

async fn list_executions(
    State(s): State<Arc<ServerState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let (auth, user) = match caller(&s, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(store) = &s.store else {
        return no_store();
    };
    let namespaces = match readable(&auth, &user, store, q.namespace.as_deref()).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    match store.list_executions_in(namespaces.as_deref(), q.limit.unwrap_or(100).clamp(1, 1000)).await {
        Ok(rows) => Json(rows.iter().map(|r| r.summary()).collect::<Vec<_>>()).into_response(),
        Err(e) => store_error(e),
    }
}

async fn get_execution(
    State(s): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<ShowQuery>,
) -> Response {
    if !is_dns_label(&namespace) || !is_dns_subdomain(&name) {
        return error(StatusCode::BAD_REQUEST, "namespace and name must be Kubernetes names (DNS-1123)");
    }
    let (auth, user) = match caller(&s, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match auth.allowed(&user, &namespace, "get").await {
        Ok(true) => {}
        Ok(false) => return forbidden(&user, "get", &namespace),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    let Some(store) = &s.store else {
        return no_store();
    };
    let row = match store.find_execution(&namespace, &name).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    // The report (the shape of `agentops run -o json`), with logs and diff when asked for.
    let mut v = serde_json::to_value(row.summary()).unwrap_or_default();
    if q.diff {
        v["diff"] = serde_json::to_value(&row.diff).unwrap_or_default();
    }
    if !q.logs {
        return Json(v).into_response();
    }
    // The logs are streamed a page at a time, as `"logs": [...]` at the end of the object: a
    // read holds one page in memory, whatever the execution printed.
    let Ok(mut head) = serde_json::to_vec(&v) else { return StatusCode::INTERNAL_SERVER_ERROR.into_response() };
    head.pop(); // the closing brace
    head.extend_from_slice(if head.len() > 1 { b",\"logs\":[" } else { b"\"logs\":[" });
    let (store, id) = (store.clone(), row.id.clone());
    let pages = futures::stream::unfold(Some((i64::MIN, true)), move |state| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            let (after, first) = state?;
            match store.logs_page(&id, after, LOG_PAGE).await {
                Ok(lines) if lines.is_empty() => Some((Ok(Bytes::from_static(b"]}")), None)),
                Ok(lines) => {
                    let last = lines.last().map_or(after, |l| l.seq);
                    let mut chunk = Vec::new();
                    for (i, l) in lines.iter().enumerate() {
                        if !(first && i == 0) {
                            chunk.push(b',');
                        }
                        let _ = serde_json::to_writer(&mut chunk, l);
                    }
                    Some((Ok(Bytes::from(chunk)), Some((last, false))))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) }).chain(pages);
    ([(axum::http::header::CONTENT_TYPE, "application/json")], Body::from_stream(body)).into_response()
}

/// Log lines read from the store at a time when a report's logs are streamed.
const LOG_PAGE: i64 = 500;

async fn list_workspaces(
    State(s): State<Arc<ServerState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let (auth, user) = match caller(&s, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(store) = &s.store else {
        return no_store();
    };
    let namespaces = match readable(&auth, &user, store, q.namespace.as_deref()).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    match store.list_workspaces_in(namespaces.as_deref()).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => store_error(e),
    }
}

/// The execution a runner endpoint is about, once its path, its state and the token are checked.
async fn runner_caller(
    s: &ServerState,
    namespace: &str,
    name: &str,
    headers: &HeaderMap,
) -> Result<(Arc<Reports>, String), Response> {
    if !is_dns_label(namespace) || !is_dns_subdomain(name) {
        return Err(error(StatusCode::BAD_REQUEST, "namespace and name must be Kubernetes names (DNS-1123)"));
    }
    let Some(reports) = s.reports.clone() else {
        return Err(StatusCode::NOT_FOUND.into_response());
    };
    let ax = s.cache.get(&ObjectRef::new(name).within(namespace));
    let running = ax.as_ref().is_some_and(|ax| {
        let phase = ax.status.as_ref().map(|st| st.phase).unwrap_or_default();
        !phase.is_terminal() && ax.metadata.deletion_timestamp.is_none()
    });
    if !running {
        return Err(error(StatusCode::NOT_FOUND, "no running execution by that name"));
    }
    let uid = ax.and_then(|ax| ax.metadata.uid.clone()).unwrap_or_default();
    let token = bearer(headers).unwrap_or_default();
    if uid.is_empty() || token.is_empty() || !reports.verify(&uid, namespace, name, token).await {
        return Err(error(StatusCode::UNAUTHORIZED, "unknown execution or wrong token"));
    }
    Ok((reports, uid))
}

/// A runner request's body, read (at most `limit` bytes) only after its caller was checked, in
/// the room the runner endpoints have (`RUNNER_ENDPOINT_BYTES`, all runners together).
async fn runner_body(
    s: &ServerState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<(Bytes, bodies::Held), Response> {
    match bodies::read(body, bodies::declared_length(headers), limit, &[&s.bodies]).await {
        Ok(read) => Ok(read),
        Err(BodyError::TooLarge) => {
            Err(close(error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over this endpoint's {limit} bytes"))))
        }
        Err(BodyError::Busy) => {
            let mut r = close(error(StatusCode::SERVICE_UNAVAILABLE, "the controller is busy; try again"));
            r.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
            Err(r)
        }
        Err(BodyError::Broken(e)) => Err(close(error(StatusCode::BAD_REQUEST, format!("the body broke off: {e}")))),
        Err(BodyError::TooSlow) => Err(close(error(StatusCode::REQUEST_TIMEOUT, "the body did not arrive in time"))),
    }
}

/// Asks hyper to close the connection after this answer (its body may be unread).
fn close(mut r: Response) -> Response {
    r.headers_mut().insert("connection", axum::http::HeaderValue::from_static("close"));
    r
}

/// A runner's progress or final report, authenticated by its execution's token. Both path
/// segments are checked before they are used anywhere; only executions in the watch cache
/// that have not finished are served; the body is bounded (413 above `MAX_REPORT_BYTES`).
async fn runner_report(
    State(s): State<Arc<ServerState>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (reports, uid) = match runner_caller(&s, &namespace, &name, &headers).await {
        Ok(caller) => caller,
        // Answered with its body unread; the connection goes with it.
        Err(r) => return close(r),
    };
    let (body, _held) = match runner_body(&s, &headers, body, MAX_REPORT_BYTES).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let report: Summary = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a report: {e}")),
    };
    reports.accept(&uid, &namespace, &name, crate::controller::reports::bounded(report));
    StatusCode::ACCEPTED.into_response()
}

/// One log line a runner sends.
#[derive(Deserialize)]
struct RunnerLogLine {
    seq: i64,
    source: String,
    line: String,
    at: String,
}

/// Log lines of a cluster run, kept in the controller's store (the record of cluster runs).
async fn runner_logs(
    State(s): State<Arc<ServerState>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let uid = match runner_caller(&s, &namespace, &name, &headers).await {
        Ok((_, uid)) => uid,
        Err(r) => return close(r),
    };
    let (body, _held) = match runner_body(&s, &headers, body, MAX_LOGS_BYTES).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let lines: Vec<RunnerLogLine> = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not log lines: {e}")),
    };
    let Some(store) = &s.store else { return StatusCode::ACCEPTED.into_response() };
    let rows: Vec<(i64, String, String, String)> = lines
        .into_iter()
        .take(1000)
        .map(|l| {
            let source: String = l.source.chars().take(64).collect();
            (l.seq, source, crate::api::report::truncate(&l.line, 4096), l.at.chars().take(40).collect())
        })
        .collect();
    match store.append_logs(&uid, &rows).await {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct RunnerDiff {
    diff: String,
}

/// The diff of a cluster run, kept in the controller's store.
async fn runner_diff(
    State(s): State<Arc<ServerState>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let uid = match runner_caller(&s, &namespace, &name, &headers).await {
        Ok((_, uid)) => uid,
        Err(r) => return close(r),
    };
    let (body, _held) = match runner_body(&s, &headers, body, MAX_DIFF_BYTES).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let d: RunnerDiff = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a diff: {e}")),
    };
    let Some(store) = &s.store else { return StatusCode::ACCEPTED.into_response() };
    match store.set_diff(&uid, &crate::api::report::truncate(&d.diff, 1024 * 1024)).await {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(e) => store_error(e),
    }
}
