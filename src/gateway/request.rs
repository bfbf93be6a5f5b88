//! What a request asks for, read strictly (pure: headers and body in, a `Request` or the words
//! of a refusal out), and its worst case.
//!
//! The gateway reserves what a request can cost before relaying it, from what it reads in the
//! body. If the upstream could read the body differently (a key twice: serde keeps the last,
//! another parser the first; `128000.0` or `"128000"` for `max_tokens`), or the request has a
//! price the gateway does not know (a beta, a speed, a service tier), it could cost anything: such
//! a request is refused, naming the field, and never relayed.

use axum::http::HeaderMap;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::prices::PriceTable;

/// Betas relayed. Those the pinned Claude Code CLI sends (seen in its traffic and its list of
/// betas), which change nothing billed, and the billing ones the gateway prices: fast mode
/// (`speed: "fast"`), the 1M context window (its worst case and long-context rates), 1-hour
/// cache writes, web search (per search), files (input reserved at the context window). Any
/// other beta may change what a request costs (a keep-alive billed later, a fallback to another
/// model, an advisor model, code execution's container-hours): refused.
pub const ALLOWED_BETAS: &[&str] = &[
    "claude-code-20250219",
    "interleaved-thinking-2025-05-14",
    "context-management-2025-06-27",
    "per-turn-control-2026-07-01",
    "mid-conversation-tool-changes-2026-07-01",
    "mid-conversation-system-2026-04-07",
    "mid-conversation-system-clear-at-2026-08-21",
    "thinking-token-count-2026-05-13",
    "thinking-display-updates-2026-08-18",
    "thinking-resumption-2026-07-17",
    "thinking-binding-controls-2026-08-01",
    "redact-thinking-2026-02-12",
    "advanced-tool-use-2025-11-20",
    "tool-search-tool-2025-10-19",
    "effort-2025-11-24",
    "structured-outputs-2025-12-15",
    "token-counting-2024-11-01",
    "prompt-caching-scope-2026-01-05",
    "timing-2026-09-09",
    "request-tags-2026-08-21",
    // Billing, priced:
    FAST_MODE_BETA,
    CONTEXT_1M_BETA,
    "extended-cache-ttl-2025-04-11",
    "web-search-2025-03-05",
    "files-api-2025-04-14",
];

/// The beta that turns on `speed: "fast"`.
pub const FAST_MODE_BETA: &str = "fast-mode-2026-02-01";
/// The beta that widens some models' context window to 1M tokens.
pub const CONTEXT_1M_BETA: &str = "context-1m-2025-08-07";

/// Tokens held for the system prompt the API adds (tool use) on top of the body's bytes.
const PROMPT_OVERHEAD_TOKENS: u64 = 4_096;
/// Tokens held for each inline image on top of its bytes (the API bills by pixels, not bytes).
const IMAGE_TOKENS: u64 = 5_000;

/// A request as the gateway read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub model: String,
    /// The output it may produce (0 for `count_tokens`).
    pub max_tokens: u64,
    /// Token counting: free.
    pub free: bool,
    pub fast: bool,
    pub context_1m: bool,
    /// Why its input is not bounded by its bytes (content by reference, server tools that add
    /// input), if it is not: then its input is reserved at the model's whole context window.
    pub unbounded_input: Option<String>,
    /// Inline images.
    pub images: u64,
    /// Server tool uses it may make (`max_uses`).
    pub web_searches: u64,
    pub web_fetches: u64,
    /// The body's size in bytes.
    pub bytes: u64,
}

/// A request's worst case, in USD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorstCase {
    /// Input (every token at the dearest input rate) and server tools.
    pub fixed_usd: f64,
    /// Each output token.
    pub per_output_usd: f64,
    /// Prompt tokens held.
    pub prompt_tokens: u64,
}

impl WorstCase {
    /// With `output` tokens of output.
    pub fn usd(&self, output: u64) -> f64 {
        self.fixed_usd + output as f64 * self.per_output_usd
    }
}

impl Request {
    /// What it can cost at most, at `prices`.
    pub fn worst_case(&self, prices: &PriceTable) -> WorstCase {
        let price = prices.price(&self.model);
        let window = price.max_prompt_tokens(self.context_1m);
        let prompt = match self.unbounded_input {
            Some(_) => window,
            None => (self.bytes + self.images * IMAGE_TOKENS + PROMPT_OVERHEAD_TOKENS).min(window),
        };
        let rates = price.worst_rates(prompt, self.fast, prices.max_fast_multiplier());
        let tools = self.web_searches as f64 * price.server_tools.web_search
            + self.web_fetches as f64 * price.server_tools.web_fetch;
        WorstCase {
            fixed_usd: prompt as f64 * rates.dearest_input() / 1e6 + tools,
            per_output_usd: rates.output / 1e6,
            prompt_tokens: prompt,
        }
    }
}

/// The words of a refusal (HTTP 400 `invalid_request_error`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("agentops gateway: {0}")]
pub struct Refusal(pub String);

fn refuse<T>(why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(why.into()))
}

/// Reads a request to `path` (already on the allowlist) strictly.
pub fn read(path: &str, headers: &HeaderMap, body: &[u8], prices: &PriceTable) -> Result<Request, Refusal> {
    let free = path.starts_with("/v1/messages/count_tokens");
    let v = parse_strict(body)?;
    let Value::Object(o) = &v else { return refuse("the request body must be a JSON object") };
    let model = match o.get("model") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => m.clone(),
        _ => return refuse("\"model\" must be a string naming a model"),
    };
    let max_tokens = match (o.get("max_tokens"), free) {
        (None, true) => 0,
        (Some(n), _) => match n.as_u64() {
            Some(n) => n,
            None => return refuse(format!("\"max_tokens\" must be a whole number, at least 0 (got {n})")),
        },
        (None, false) => return refuse("\"max_tokens\" is required"),
    };
    let betas = betas(headers)?;
    let context_1m = betas.iter().any(|b| b == CONTEXT_1M_BETA);
    let fast = match o.get("speed") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "standard" => false,
        Some(Value::String(s)) if s == "fast" => true,
        Some(s) => return refuse(format!("\"speed\" must be \"standard\" or \"fast\" (got {s})")),
    };
    if fast && prices.price(&model).fast_multiplier.is_none() {
        return refuse(format!("\"speed\": \"fast\" has no price for model {model:?} at this gateway"));
    }
    match o.get("service_tier") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "auto" || s == "standard_only" => {}
        Some(s) => return refuse(format!("\"service_tier\" must be \"auto\" or \"standard_only\" (got {s})")),
    }
    match o.get("inference_geo") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() || s == "global" => {}
        Some(s) => return refuse(format!("\"inference_geo\" {s} has no price at this gateway")),
    }
    if o.contains_key("container") {
        return refuse("\"container\" (code execution) is billed by container-hour, which the gateway cannot meter");
    }
    let mut req = Request {
        model,
        max_tokens,
        free,
        fast,
        context_1m,
        unbounded_input: None,
        images: 0,
        web_searches: 0,
        web_fetches: 0,
        bytes: body.len() as u64,
    };
    if o.get("mcp_servers").and_then(Value::as_array).is_some_and(|s| !s.is_empty()) {
        req.unbounded_input = Some("\"mcp_servers\" (remote tool results)".into());
    }
    match o.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            for (i, t) in tools.iter().enumerate() {
                tool(&mut req, i, t)?;
            }
        }
        Some(_) => return refuse("\"tools\" must be a list"),
    }
    match o.get("system") {
        Some(Value::Array(blocks)) => blocks.iter().for_each(|b| block(&mut req, b, "system")),
        Some(Value::String(_)) | None | Some(Value::Null) => {}
        Some(_) => return refuse("\"system\" must be a string or a list of blocks"),
    }
    match o.get("messages") {
        Some(Value::Array(messages)) => {
            for (i, m) in messages.iter().enumerate() {
                match &m["content"] {
                    Value::Array(blocks) => blocks.iter().for_each(|b| block(&mut req, b, &format!("messages[{i}]"))),
                    Value::String(_) => {}
                    _ => return refuse(format!("\"messages[{i}].content\" must be a string or a list of blocks")),
                }
            }
        }
        None if free => {}
        _ => return refuse("\"messages\" must be a list"),
    }
    Ok(req)
}

/// Every `anthropic-beta` value, each one allowed.
fn betas(headers: &HeaderMap) -> Result<Vec<String>, Refusal> {
    let mut out = Vec::new();
    for value in headers.get_all("anthropic-beta") {
        let Ok(value) = value.to_str() else { return refuse("the \"anthropic-beta\" header is not text") };
        for beta in value.split(',').map(str::trim).filter(|b| !b.is_empty()) {
            if !ALLOWED_BETAS.contains(&beta) {
                let beta = crate::api::report::truncate(beta, 80);
                return refuse(format!(
                    "the \"anthropic-beta\" header's {beta:?} is not one the gateway can price; it relays {}",
                    ALLOWED_BETAS.join(", ")
                ));
            }
            out.push(beta.to_string());
        }
    }
    Ok(out)
}

/// Client tools (run by the agent: the body holds all they add) and the server tools the
/// gateway prices; anything else is refused.
fn tool(req: &mut Request, i: usize, t: &Value) -> Result<(), Refusal> {
    let kind = match t.get("type") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::String(k)) => k.as_str(),
        Some(_) => return refuse(format!("\"tools[{i}].type\" must be a string")),
    };
    const CLIENT: &[&str] = &["custom", "bash_", "text_editor_", "computer_", "memory_", "tool_search_tool_"];
    if CLIENT.iter().any(|p| kind == *p || (p.ends_with('_') && kind.starts_with(p))) {
        return Ok(());
    }
    let uses = || match t.get("max_uses").map(Value::as_u64) {
        Some(Some(n)) => Ok(n),
        Some(None) => refuse(format!("\"tools[{i}].max_uses\" must be a whole number")),
        None => refuse(format!("\"tools[{i}].max_uses\" is required: a {kind} tool without it has no bound")),
    };
    if kind.starts_with("web_search_") {
        req.web_searches += uses()?;
        req.unbounded_input.get_or_insert_with(|| format!("a {kind} tool (its results are input)"));
    } else if kind.starts_with("web_fetch_") {
        req.web_fetches += uses()?;
        req.unbounded_input.get_or_insert_with(|| format!("a {kind} tool (its pages are input)"));
    } else if kind == "mcp_toolset" {
        req.unbounded_input.get_or_insert_with(|| "an mcp_toolset (remote tool results)".into());
    } else {
        let kind = crate::api::report::truncate(kind, 80);
        return refuse(format!(
            "\"tools[{i}].type\" {kind:?} is a server tool the gateway cannot price (it prices web_search and web_fetch)"
        ));
    }
    Ok(())
}

/// Content block types whose tokens are all in the body (besides images and documents).
const INLINE_BLOCKS: &[&str] = &[
    "text",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "server_tool_use",
    "mcp_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "mcp_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "tool_search_tool_result",
    "tool_reference",
];

/// Notes what one content block adds that its bytes do not show.
fn block(req: &mut Request, b: &Value, at: &str) {
    let kind = b["type"].as_str().unwrap_or_default();
    let by_reference = |req: &mut Request, what: String| {
        req.unbounded_input.get_or_insert_with(|| format!("{what} in {at}"));
    };
    match kind {
        "image" => match b["source"]["type"].as_str() {
            Some("base64") => req.images += 1,
            other => by_reference(req, format!("an image by {}", other.unwrap_or("reference"))),
        },
        "document" => match b["source"]["type"].as_str() {
            Some("text") => {}
            Some("content") => {
                if let Value::Array(inner) = &b["source"]["content"] {
                    inner.iter().for_each(|c| block(req, c, at));
                }
            }
            // A PDF's tokens follow its pages (text and an image of each), not its bytes.
            Some("base64") if b["source"]["media_type"] != "application/pdf" => {}
            Some("base64") => by_reference(req, "a PDF".into()),
            other => by_reference(req, format!("a document by {}", other.unwrap_or("reference"))),
        },
        "tool_result" => {
            if let Value::Array(inner) = &b["content"] {
                inner.iter().for_each(|c| block(req, c, at));
            }
        }
        "search_result" => match &b["content"] {
            Value::Array(inner) => inner.iter().for_each(|c| block(req, c, at)),
            _ => by_reference(req, "a search_result without its content".into()),
        },
        k if INLINE_BLOCKS.contains(&k) => {}
        other => {
            let other = crate::api::report::truncate(other, 80);
            by_reference(req, format!("a {other:?} block"))
        }
    }
}

/// The body as JSON, refused if it is not JSON or has a key twice in any object.
fn parse_strict(body: &[u8]) -> Result<Value, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = match serde_path_to_error::deserialize::<_, Strict>(&mut de) {
        Ok(Strict(v)) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let at = if path == "." || path.is_empty() { String::new() } else { format!(" at {path}") };
            return refuse(format!("the request body is not strict JSON{at}: {inner}"));
        }
    };
    if let Err(e) = de.end() {
        return refuse(format!("the request body is not strict JSON: {e}"));
    }
    Ok(v)
}

/// A JSON value whose objects have each key once.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(n).map(Value::Number).unwrap_or(Value::Null))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let key = crate::api::report::truncate(&key, 80);
                return Err(de::Error::custom(format!("the key {key:?} appears twice")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn read_body(body: &str) -> Result<Request, Refusal> {
        read("/v1/messages", &HeaderMap::new(), body.as_bytes(), &PriceTable::list())
    }

    #[test]
    fn bodies_the_upstream_could_read_otherwise_are_refused_naming_the_field() {
        let ok = r#"{"model":"claude-opus-5-5","max_tokens":1024,"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(read_body(ok).unwrap().max_tokens, 1024);
        for (body, names) in [
            (
                r#"{"model":"claude-opus-5-5","max_tokens":1,"max_tokens":128000,"messages":[]}"#,
                "\"max_tokens\" appears twice",
            ),
            (
                r#"{"model":"claude-opus-5-5","max_tokens":1,"max\u005ftokens":128000,"messages":[]}"#,
                "\"max_tokens\" appears twice",
            ),
            (
                r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[{"role":"user","content":[{"type":"text","text":"a","text":"b"}]}]}"#,
                "at messages[0].content[0]",
            ),
            (
                r#"{"model":"claude-opus-5-5","max_tokens":128000.0,"messages":[]}"#,
                "\"max_tokens\" must be a whole number",
            ),
            (
                r#"{"model":"claude-opus-5-5","max_tokens":"128000","messages":[]}"#,
                "\"max_tokens\" must be a whole number",
            ),
            (r#"{"model":"claude-opus-5-5","max_tokens":-1,"messages":[]}"#, "\"max_tokens\" must be a whole number"),
            (r#"{"model":"claude-opus-5-5","max_tokens":1e5,"messages":[]}"#, "\"max_tokens\" must be a whole number"),
            (r#"{"model":"claude-opus-5-5","messages":[]}"#, "\"max_tokens\" is required"),
            (r#"{"model":["claude-opus-5-5"],"max_tokens":1,"messages":[]}"#, "\"model\" must be a string"),
            (r#"[{"model":"claude-opus-5-5","max_tokens":1}]"#, "must be a JSON object"),
            (r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[]} {"max_tokens":9}"#, "not strict JSON"),
            (r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"speed":"turbo"}"#, "\"speed\" must be"),
            (
                r#"{"model":"claude-opus-4-1","max_tokens":1,"messages":[],"speed":"fast"}"#,
                "\"speed\": \"fast\" has no price",
            ),
            (
                r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"service_tier":"priority"}"#,
                "\"service_tier\"",
            ),
            (r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"inference_geo":"us"}"#, "\"inference_geo\""),
            (r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"container":"c1"}"#, "\"container\""),
            (
                r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"tools":[{"type":"code_execution_20250825","name":"x"}]}"#,
                "\"tools[0].type\"",
            ),
            (
                r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
                "\"tools[0].max_uses\" is required",
            ),
            (r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"tools":{}}"#, "\"tools\" must be a list"),
            ("not json", "not strict JSON"),
        ] {
            let err = read_body(body).expect_err(body).0;
            assert!(err.contains(names), "{body}: {err}");
        }
    }

    #[test]
    fn betas_are_allowlisted_and_the_billing_ones_are_read() {
        let body = br#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"speed":"fast"}"#;
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.append("anthropic-beta", HeaderValue::from_str(v).unwrap());
            read("/v1/messages", &h, body, &PriceTable::list())
        };
        let cli = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,per-turn-control-2026-07-01,mid-conversation-tool-changes-2026-07-01,thinking-token-count-2026-05-13,advanced-tool-use-2025-11-20,effort-2025-11-24,thinking-display-updates-2026-08-18";
        assert!(with(cli).is_ok(), "what the pinned CLI sends");
        let r = with("fast-mode-2026-02-01, context-1m-2025-08-07").unwrap();
        assert!(r.fast && r.context_1m);
        for beta in ["cache-keepalive-2026-09-03", "server-side-fallback-2026-07-01", "advisor-tool-2026-03-01", "b1"] {
            let err = with(&format!("{cli},{beta}")).unwrap_err().0;
            assert!(err.contains("anthropic-beta") && err.contains(beta), "{err}");
        }
    }

    #[test]
    fn content_by_reference_and_server_tools_unbound_the_input() {
        let t = PriceTable::list();
        let small =
            read_body(r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        assert_eq!(small.unbounded_input, None);
        let w = small.worst_case(&t);
        assert_eq!(w.prompt_tokens, small.bytes + 4_096);
        for (content, why) in [
            (r#"[{"type":"document","source":{"type":"url","url":"https://example.com/a.pdf"}}]"#, "document by url"),
            (r#"[{"type":"document","source":{"type":"file","file_id":"file_1"}}]"#, "document by file"),
            (r#"[{"type":"image","source":{"type":"url","url":"https://example.com/a.png"}}]"#, "image by url"),
            (
                r#"[{"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"JVBE"}}]"#,
                "a PDF",
            ),
            (
                r#"[{"type":"tool_result","tool_use_id":"t","content":[{"type":"image","source":{"type":"file","file_id":"f"}}]}]"#,
                "image by file",
            ),
            (r#"[{"type":"search_result","source":"x","title":"y"}]"#, "search_result"),
            (r#"[{"type":"container_upload","file_id":"f"}]"#, "\"container_upload\""),
        ] {
            let body = format!(
                r#"{{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{{"role":"user","content":{content}}}]}}"#
            );
            let r = read_body(&body).unwrap();
            assert!(
                r.unbounded_input.as_deref().is_some_and(|w| w.contains(why)),
                "{content}: {:?}",
                r.unbounded_input
            );
            // Haiku 4.5: its 200k window at the 1-hour write rate, $2/MTok.
            let w = r.worst_case(&t);
            assert_eq!(w.prompt_tokens, 200_000);
            assert!((w.usd(100) - (0.4 + 100.0 * 5.0 / 1e6)).abs() < 1e-12, "{}", w.usd(100));
        }
        let search = read_body(r#"{"model":"claude-opus-5-5","max_tokens":100,"messages":[{"role":"user","content":"q"}],"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":8}]}"#).unwrap();
        assert_eq!(search.web_searches, 8);
        let w = search.worst_case(&t);
        // Opus 5.5: 1M tokens at $8 (1h writes), 8 searches at $0.01.
        assert!((w.fixed_usd - (8.0 + 0.08)).abs() < 1e-9, "{}", w.fixed_usd);
        let inline = read_body(r#"{"model":"claude-haiku-4-5","max_tokens":1,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBO"}},{"type":"document","source":{"type":"text","media_type":"text/plain","data":"abc"}}]}]}"#).unwrap();
        assert_eq!((inline.unbounded_input, inline.images), (None, 1));
    }

    #[test]
    fn the_context_1m_beta_and_long_context_rates_raise_the_worst_case() {
        let t = PriceTable::list();
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":1000,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"u"}}]}]}"#;
        let plain = read("/v1/messages", &HeaderMap::new(), body, &t).unwrap().worst_case(&t);
        assert_eq!(plain.prompt_tokens, 200_000);
        assert!((plain.usd(1000) - (200_000.0 * 6.0 + 1000.0 * 15.0) / 1e6).abs() < 1e-12);
        let mut h = HeaderMap::new();
        h.insert("anthropic-beta", HeaderValue::from_static(CONTEXT_1M_BETA));
        let wide = read("/v1/messages", &h, body, &t).unwrap().worst_case(&t);
        assert_eq!(wide.prompt_tokens, 1_000_000);
        // Over 200k: $6 input (1h write $12), $22.50 output.
        assert!((wide.usd(1000) - (1_000_000.0 * 12.0 + 1000.0 * 22.5) / 1e6).abs() < 1e-9);
    }

    #[test]
    fn token_counting_needs_no_max_tokens() {
        let r = read(
            "/v1/messages/count_tokens",
            &HeaderMap::new(),
            br#"{"model":"claude-opus-5-5","messages":[]}"#,
            &PriceTable::list(),
        );
        assert!(r.unwrap().free);
    }
}
