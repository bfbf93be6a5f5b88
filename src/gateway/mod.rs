//! The model gateway: the agent talks to the Messages API through it with a token that works
//! only for this execution and only while it runs; the gateway adds the real API key (which the
//! agent never sees), relays the response with streaming intact, and meters the `usage` of
//! every response (from `message_start` and `message_delta` events, or a JSON body): the
//! operator counts the tokens, rather than trusting what the agent reports.
//!
//! `agentops run` starts one on loopback per execution (issue 9 adds the controller's).

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::api::Usage;

/// Largest request body relayed (a long conversation with images stays well under it).
const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// What the gateway counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metered {
    /// Tokens of every response relayed, of every kind.
    pub usage: Usage,
    /// Responses relayed (successful or not).
    pub responses: u64,
}

struct Shared {
    upstream: String,
    api_key: String,
    token: String,
    client: reqwest::Client,
    metered: Mutex<Metered>,
}

/// A running gateway; dropped or closed, its token no longer works (nothing listens).
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
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(concat!("agentops-gateway/", env!("CARGO_PKG_VERSION")))
            .tcp_nodelay(true)
            .build()
            .map_err(std::io::Error::other)?;
        let token = format!("agentops-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            token: token.clone(),
            client,
            metered: Mutex::new(Metered::default()),
        });
        let app = axum::Router::new()
            .fallback(relay)
            .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .with_state(shared.clone());
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
        self.shared.metered.lock().map(|m| *m).unwrap_or_default()
    }

    /// Stops listening: the token is worthless from now on.
    pub fn close(&self) {
        self.stop.cancel();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn refuse(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

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

async fn relay(State(s): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let presented = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")))
        .unwrap_or_default();
    let same = presented.len() == s.token.len()
        && presented.bytes().zip(s.token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !same {
        return refuse(StatusCode::UNAUTHORIZED, "authentication_error", "this gateway token is not valid");
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if !path.starts_with("/v1/") {
        return refuse(StatusCode::NOT_FOUND, "not_found_error", "the gateway relays the Messages API only (/v1/...)");
    }
    let mut req = s.client.request(method, format!("{}{path}", s.upstream)).body(body);
    for (name, value) in &headers {
        if !hop(name.as_str()) {
            req = req.header(name, value);
        }
    }
    let Ok(key) = HeaderValue::from_str(&s.api_key) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "the configured API key is not a valid header");
    };
    let resp = match req.header("x-api-key", key).send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "the model gateway cannot reach the upstream API");
            return refuse(StatusCode::BAD_GATEWAY, "api_error", "the model gateway cannot reach the Anthropic API");
        }
    };
    if let Ok(mut m) = s.metered.lock() {
        m.responses += 1;
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
    let shared = s.clone();
    let mut meter = Meter::default();
    let body = resp.bytes_stream().map(move |chunk| {
        if let Ok(bytes) = &chunk {
            let delta = if streaming { meter.feed(bytes) } else { meter.feed_json(bytes) };
            if delta != Usage::default()
                && let Ok(mut m) = shared.metered.lock()
            {
                m.usage.input_tokens += delta.input_tokens;
                m.usage.output_tokens += delta.output_tokens;
                m.usage.cache_read_input_tokens += delta.cache_read_input_tokens;
                m.usage.cache_creation_input_tokens += delta.cache_creation_input_tokens;
            }
        }
        chunk
    });
    out.body(Body::from_stream(body)).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
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
    /// Feeds SSE bytes; returns the usage they add.
    fn feed(&mut self, bytes: &[u8]) -> Usage {
        self.pending.extend_from_slice(bytes);
        let mut added = Usage::default();
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
                _ => {}
            }
        }
        added
    }

    /// Feeds a JSON body; the usage once it is complete.
    fn feed_json(&mut self, bytes: &[u8]) -> Usage {
        self.json.extend_from_slice(bytes);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.json) else { return Usage::default() };
        if v["type"] != "message" {
            return Usage::default();
        }
        let u = &v["usage"];
        let n = |k: &str| u[k].as_u64().unwrap_or(0);
        Usage {
            input_tokens: n("input_tokens"),
            output_tokens: n("output_tokens"),
            cache_read_input_tokens: n("cache_read_input_tokens"),
            cache_creation_input_tokens: n("cache_creation_input_tokens"),
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
                let u = m.feed(chunk);
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
