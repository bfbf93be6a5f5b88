//! The controller's HTTP endpoints: `/healthz`, `/readyz`, `/metrics`, and a read-only JSON
//! API over the store (`/api/v1/executions`, `/api/v1/executions/{namespace}/{name}`,
//! `/api/v1/workspaces`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kube::runtime::reflector::Store as Cache;
use serde::Deserialize;

use crate::api::{AgentExecution, Phase};
use crate::controller::metrics::{Metrics, PhaseLabel};
use crate::controller::reports::Reports;
use crate::runner::Summary;
use crate::store::{Store, StoreError};

/// What the endpoints read.
pub struct ServerState {
    pub cache: Cache<AgentExecution>,
    pub metrics: Arc<Metrics>,
    pub store: Option<Store>,
    /// True once the watch caches are synced.
    pub ready: Arc<AtomicBool>,
    /// Where runner reports go (None: reports are refused).
    pub reports: Option<Arc<Reports>>,
}

/// The router.
pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/executions", get(list_executions))
        .route("/api/v1/executions/{namespace}/{name}", get(get_execution))
        .route("/api/v1/workspaces", get(list_workspaces))
        .route("/api/v1/runner/{namespace}/{name}/report", post(runner_report))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<ServerState>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        "ok".into_response()
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
}

fn store_error(e: StoreError) -> Response {
    let code =
        if matches!(e, StoreError::NotFound(_)) { StatusCode::NOT_FOUND } else { StatusCode::INTERNAL_SERVER_ERROR };
    (code, Json(serde_json::json!({"error": e.to_string()}))).into_response()
}

fn no_store() -> Response {
    (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": "this controller runs without a store"}))).into_response()
}

async fn list_executions(State(s): State<Arc<ServerState>>, Query(q): Query<ListQuery>) -> Response {
    let Some(store) = &s.store else {
        return no_store();
    };
    match store.list_executions(q.limit.unwrap_or(100).clamp(1, 1000)).await {
        Ok(mut rows) => {
            for r in &mut rows {
                r.diff = None;
                r.output_json = None;
            }
            Json(rows).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn get_execution(State(s): State<Arc<ServerState>>, Path((namespace, name)): Path<(String, String)>) -> Response {
    let Some(store) = &s.store else {
        return no_store();
    };
    let row = match store.find_execution(&namespace, &name).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let logs = match store.logs(&row.id).await {
        Ok(l) => l,
        Err(e) => return store_error(e),
    };
    let mut v = serde_json::to_value(&row).unwrap_or_default();
    v["logs"] = serde_json::to_value(logs).unwrap_or_default();
    Json(v).into_response()
}

async fn list_workspaces(State(s): State<Arc<ServerState>>) -> Response {
    let Some(store) = &s.store else {
        return no_store();
    };
    match store.list_workspaces().await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => store_error(e),
    }
}

/// A runner's progress or final report, authenticated by its execution's token.
async fn runner_report(
    State(s): State<Arc<ServerState>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(report): Json<Summary>,
) -> Response {
    let Some(reports) = &s.reports else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if token.is_empty() || !reports.verify(&namespace, &name, token).await {
        return (StatusCode::UNAUTHORIZED, "unknown execution or wrong token").into_response();
    }
    reports.accept(&namespace, &name, report);
    StatusCode::ACCEPTED.into_response()
}
