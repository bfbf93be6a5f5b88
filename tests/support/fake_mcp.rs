//! A remote MCP server over real HTTP on 127.0.0.1, in both transports of the MCP
//! specification. Streamable HTTP at `/mcp`: `POST` carries one JSON-RPC message and is answered
//! with JSON (a request) or 202 (a notification); the first answer gives an `Mcp-Session-Id`,
//! which later requests must send; `GET` (no server-initiated stream here) is 405; `DELETE` ends
//! the session. HTTP+SSE at `/sse`: a `GET` opens the event stream, whose first event
//! (`endpoint`) names where to POST (`/messages?sessionId=...`); each POST is answered 202 and
//! its answer arrives as a `message` event on the stream. It offers the tool `lookup` and
//! records every request's headers.
//! It also offers `delete_all`, which no team should let an agent call (the rules' target).

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A request the server received.
#[derive(Clone, Debug)]
pub struct McpSeen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl McpSeen {
    /// The value of header `name` (lowercase), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Inner {
    seen: Mutex<Vec<McpSeen>>,
    /// The open SSE stream's sender (one session at a time).
    sse: Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>,
}

/// A running fake remote MCP server.
#[derive(Clone)]
pub struct FakeMcp {
    /// Its streamable HTTP URL (`http://127.0.0.1:PORT/mcp`).
    pub url: String,
    /// Its HTTP+SSE URL (`http://127.0.0.1:PORT/sse`).
    pub sse_url: String,
    inner: Arc<Inner>,
}

const SESSION: &str = "session-7d2a";

impl FakeMcp {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url: format!("http://{addr}/mcp"), sse_url: format!("http://{addr}/sse"), inner }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<McpSeen> {
        self.inner.seen.lock().expect("lock").clone()
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let pairs = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    inner.seen.lock().expect("lock").push(McpSeen {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers: pairs,
        body: body.clone(),
    });
    match (uri.path(), &method) {
        ("/sse", &Method::GET) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let _ = tx.send(format!("event: endpoint\ndata: /messages?sessionId={SESSION}\n\n"));
            *inner.sse.lock().expect("lock") = Some(tx);
            let events = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|e| (Ok::<_, std::convert::Infallible>(Bytes::from(e)), rx))
            });
            return Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(axum::body::Body::from_stream(events))
                .expect("response");
        }
        ("/messages", &Method::POST) => {
            if uri.query() != Some(&format!("sessionId={SESSION}")) {
                return (StatusCode::BAD_REQUEST, "unknown session").into_response();
            }
            if let Some(answer) = answer(&body) {
                let sender = inner.sse.lock().expect("lock").clone();
                if let Some(tx) = sender {
                    let _ = tx.send(format!("event: message\ndata: {answer}\n\n"));
                }
            }
            return StatusCode::ACCEPTED.into_response();
        }
        ("/mcp", _) => {}
        _ => return StatusCode::NOT_FOUND.into_response(),
    }
    match method {
        Method::GET => return StatusCode::METHOD_NOT_ALLOWED.into_response(),
        Method::DELETE => return StatusCode::OK.into_response(),
        Method::POST => {}
        _ => return StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
    let method_name = body["method"].as_str().unwrap_or_default();
    let session = headers.get("mcp-session-id").and_then(|v| v.to_str().ok());
    if method_name != "initialize" && session != Some(SESSION) {
        return (StatusCode::BAD_REQUEST, "missing or unknown Mcp-Session-Id").into_response();
    }
    match answer(&body) {
        None => StatusCode::ACCEPTED.into_response(),
        Some(a) => ([("content-type", "application/json"), ("mcp-session-id", SESSION)], a.to_string()).into_response(),
    }
}

/// The JSON-RPC answer to one message (None: a notification).
fn answer(body: &Value) -> Option<Value> {
    let method_name = body["method"].as_str().unwrap_or_default();
    let id = body.get("id").cloned()?;
    let result = match method_name {
        "initialize" => json!({
            "protocolVersion": body["params"]["protocolVersion"].as_str().unwrap_or("2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "tracker", "version": "1.0.0"},
        }),
        "tools/list" => json!({"tools": [{
            "name": "lookup",
            "description": "Looks up an issue in the team's tracker",
            "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        }, {
            "name": "delete_all",
            "description": "Deletes every issue in the tracker",
            "inputSchema": {"type": "object", "properties": {}},
        }]}),
        "tools/call" => {
            let q = body["params"]["arguments"]["q"].as_str().unwrap_or_default();
            json!({"content": [{"type": "text", "text": format!("tracker says: {q} is PAY-311, open")}]})
        }
        "ping" => json!({}),
        other => {
            return Some(
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("no {other}")}}),
            );
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}
