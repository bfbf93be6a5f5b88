//! A scripted fake of the Anthropic Messages API (SSE streaming) on 127.0.0.1, for the real
//! Claude Code CLI. Each main request (one that offers tools) takes the next step of the script;
//! side requests (titles, summaries: no tools) get a short text answer. Usage is reported as the
//! real API does: `message_start` carries the message's usage so far (with the cache split by
//! lifetime), and `message_delta` repeats every field, cumulative (`server_tool_use` included).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Response, StatusCode, Uri};
use futures::StreamExt;
use serde_json::{Value, json};

/// One content block of a scripted reply.
#[derive(Clone, Debug)]
pub enum Block {
    Text(String),
    ToolUse { name: String, input: Value },
}

/// One step of the script: what the next main request gets.
#[derive(Clone, Debug)]
pub enum Step {
    /// A streamed message with these blocks and usage (input, output, cache read, cache write).
    Reply { blocks: Vec<Block>, usage: [u64; 4] },
    /// An HTTP error status with an Anthropic-style error body.
    Error(u16),
    /// Starts streaming, then never finishes (the client must give up or be stopped), until
    /// `FakeAnthropic::end_hangs`.
    Hang,
}

impl Step {
    /// A final text answer (end_turn).
    pub fn text(t: &str) -> Self {
        Step::Reply { blocks: vec![Block::Text(t.into())], usage: [100, 20, 0, 0] }
    }
    /// One tool call.
    pub fn tool(name: &str, input: Value) -> Self {
        Step::Reply { blocks: vec![Block::ToolUse { name: name.into(), input }], usage: [100, 30, 0, 0] }
    }
    /// Sets the usage reported for this step.
    pub fn with_usage(self, usage: [u64; 4]) -> Self {
        match self {
            Step::Reply { blocks, .. } => Step::Reply { blocks, usage },
            other => other,
        }
    }
}

/// A request the fake received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub api_key: Option<String>,
    /// The `anthropic-beta` header, as sent.
    pub beta: Option<String>,
    pub body: Value,
    pub main: bool,
}

struct Inner {
    script: Mutex<VecDeque<Step>>,
    seen: Mutex<Vec<Seen>>,
    notify: tokio::sync::Notify,
    tool_ids: std::sync::atomic::AtomicU64,
    /// Set: hanging answers finish.
    hangs_end: tokio::sync::watch::Sender<bool>,
}

/// A running fake model server.
#[derive(Clone)]
pub struct FakeAnthropic {
    pub base_url: String,
    inner: Arc<Inner>,
}

impl FakeAnthropic {
    /// Starts the server with a script.
    pub async fn start(script: Vec<Step>) -> Self {
        let inner = Arc::new(Inner {
            script: Mutex::new(script.into()),
            seen: Mutex::new(Vec::new()),
            notify: tokio::sync::Notify::new(),
            tool_ids: Default::default(),
            hangs_end: tokio::sync::watch::channel(false).0,
        });
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base_url: format!("http://{addr}"), inner }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().expect("lock").clone()
    }

    /// The tool results the agent sent back, in order, from the last main request (which
    /// carries the whole conversation): (the tool's name, its text, `is_error`).
    #[allow(dead_code)]
    pub fn tool_results(&self) -> Vec<(String, String, bool)> {
        let Some(last) = self.seen().into_iter().rev().find(|s| s.main) else { return Vec::new() };
        let mut names = std::collections::HashMap::new();
        let mut out = Vec::new();
        for m in last.body["messages"].as_array().into_iter().flatten() {
            for b in m["content"].as_array().into_iter().flatten() {
                match b["type"].as_str() {
                    Some("tool_use") => {
                        names.insert(
                            b["id"].as_str().unwrap_or_default().to_string(),
                            b["name"].as_str().unwrap_or_default().to_string(),
                        );
                    }
                    Some("tool_result") => {
                        let text = match &b["content"] {
                            Value::String(t) => t.clone(),
                            Value::Array(parts) => {
                                parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n")
                            }
                            _ => String::new(),
                        };
                        let name =
                            names.get(b["tool_use_id"].as_str().unwrap_or_default()).cloned().unwrap_or_default();
                        out.push((name, text, b["is_error"].as_bool().unwrap_or(false)));
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// Main (tool-offering) requests so far.
    pub fn main_requests(&self) -> usize {
        self.seen().iter().filter(|s| s.main).count()
    }

    /// Replaces the steps not yet used (for scripts that name paths known only after start).
    pub fn set_script(&self, script: Vec<Step>) {
        *self.inner.script.lock().expect("lock") = script.into();
    }

    /// Hanging answers (`Step::Hang`), those streaming and those to come, finish now.
    pub fn end_hangs(&self) {
        self.inner.hangs_end.send_replace(true);
    }

    /// Steps not yet used.
    pub fn remaining(&self) -> usize {
        self.inner.script.lock().expect("lock").len()
    }

    /// Waits until at least `n` main requests arrived (bounded by `limit`).
    pub async fn wait_for_main_requests(&self, n: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.inner.notify.notified();
            if self.main_requests() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.main_requests() >= n;
            }
        }
    }
}

async fn handle(State(inner): State<Arc<Inner>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response<Body> {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let main = body.get("tools").and_then(Value::as_array).is_some_and(|t| !t.is_empty());
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(String::from);
    let beta = headers.get("anthropic-beta").and_then(|v| v.to_str().ok()).map(String::from);
    let path = uri.path().to_string();
    inner.seen.lock().expect("lock").push(Seen { path: path.clone(), api_key, beta, body: body.clone(), main });
    inner.notify.notify_waiters();
    if path.ends_with("/count_tokens") {
        return json_response(200, json!({"input_tokens": 10}));
    }
    if !path.ends_with("/v1/messages") {
        return json_response(
            404,
            json!({"type": "error", "error": {"type": "not_found_error", "message": "not here"}}),
        );
    }
    let model = body.get("model").and_then(Value::as_str).unwrap_or("claude-test").to_string();
    let step = if main { inner.script.lock().expect("lock").pop_front() } else { None };
    let step = step.unwrap_or_else(|| Step::text(if main { "(script exhausted)" } else { "ok" }));
    match step {
        Step::Error(status) => json_response(
            status,
            json!({"type": "error", "error": {"type": "api_error", "message": format!("scripted failure {status}")}}),
        ),
        Step::Reply { blocks, usage } => {
            let events = reply_events(&inner, &model, &blocks, usage);
            sse(futures::stream::iter(events).boxed())
        }
        Step::Hang => {
            let mut events = reply_events(&inner, &model, &[Block::Text("thinking…".into())], [100, 1, 0, 0]);
            let rest = events.split_off(3);
            let mut ended = inner.hangs_end.subscribe();
            let finish = async move {
                if ended.wait_for(|end| *end).await.is_err() {
                    futures::future::pending::<()>().await;
                }
                futures::stream::iter(rest)
            };
            sse(futures::stream::iter(events).chain(futures::stream::once(finish).flatten()).boxed())
        }
    }
}

fn json_response(status: u16, v: Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("request-id", "req_fake")
        .body(Body::from(v.to_string()))
        .expect("response")
}

fn sse(events: futures::stream::BoxStream<'static, String>) -> Response<Body> {
    let stream = events.map(|e| Ok::<_, Infallible>(Bytes::from(e)));
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("request-id", "req_fake")
        .body(Body::from_stream(stream))
        .expect("response")
}

fn ev(kind: &str, data: Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

fn reply_events(inner: &Inner, model: &str, blocks: &[Block], usage: [u64; 4]) -> Vec<String> {
    let n = inner.tool_ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut out = vec![ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": format!("msg_{n}"), "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": usage[0], "output_tokens": 1, "cache_read_input_tokens": usage[2], "cache_creation_input_tokens": usage[3],
                      "cache_creation": {"ephemeral_5m_input_tokens": usage[3], "ephemeral_1h_input_tokens": 0},
                      "service_tier": "standard"}}}),
    )];
    let mut tool = false;
    for (i, b) in blocks.iter().enumerate() {
        match b {
            Block::Text(t) => {
                out.push(ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}),
                ));
                out.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": t}}),
                ));
            }
            Block::ToolUse { name, input } => {
                tool = true;
                out.push(ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": {"type": "tool_use", "id": format!("toolu_{n}_{i}"), "name": name, "input": {}}}),
                ));
                out.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": input.to_string()}}),
                ));
            }
        }
        out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": i})));
    }
    let stop = if tool { "tool_use" } else { "end_turn" };
    out.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
               "usage": {"input_tokens": usage[0], "output_tokens": usage[1], "cache_read_input_tokens": usage[2], "cache_creation_input_tokens": usage[3],
                         "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0}}}),
    ));
    out.push(ev("message_stop", json!({"type": "message_stop"})));
    out
}
