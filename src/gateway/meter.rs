//! Reads usage out of a response as it goes by (pure: bytes in, what they add out).
//!
//! The API reports a message's usage in `message_start` and again in each `message_delta`, every
//! field cumulative for the message (`input_tokens`, the cache fields, `output_tokens`,
//! `server_tool_use`): input grows during a message that uses server tools. So each field is
//! counted as the largest value seen for its message, once; a JSON (non-streaming) body carries
//! the final figures.

use super::prices::{MessageUsage, Price, message_cost};

/// Longest tool name counted as is (longer ones, and odd characters, are `other`).
const TOOL_NAME_LIMIT: usize = 64;

/// A name from the model or the agent, safe to keep as a key: itself, or `other`.
pub(crate) fn tool_name(name: &str) -> String {
    if !name.is_empty()
        && name.len() <= TOOL_NAME_LIMIT
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-:.".contains(c))
    {
        name.to_string()
    } else {
        "other".into()
    }
}

/// What one piece of a response added.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Seen {
    pub usage: MessageUsage,
    pub cost_usd: f64,
    pub turns: u64,
    pub tools: Vec<String>,
}

impl Seen {
    pub fn is_empty(&self) -> bool {
        self.usage == MessageUsage::default() && self.cost_usd == 0.0 && self.turns == 0 && self.tools.is_empty()
    }
}

/// Largest JSON body gathered for metering (a larger one is settled at its reservation).
const MAX_JSON_BYTES: usize = 32 * 1024 * 1024;

/// Meters one response.
pub(crate) struct Meter {
    price: Price,
    /// The request asked for fast mode (an answer that says which speed served it wins).
    fast: bool,
    table_fast: f64,
    streaming: bool,
    /// Bytes of an event not yet complete.
    pending: Vec<u8>,
    /// A JSON body, gathered to its end.
    json: Vec<u8>,
    json_too_large: bool,
    /// The current message: the largest of each field seen, its speed, and what it was billed.
    message: MessageUsage,
    message_fast: bool,
    message_cost: f64,
    /// The answer reached its end (`message_stop`, an `error` event, or a whole JSON message).
    ended: bool,
}

impl Meter {
    pub fn new(price: Price, fast: bool, table_fast: f64, streaming: bool) -> Self {
        Self {
            price,
            fast,
            table_fast,
            streaming,
            pending: Vec::new(),
            json: Vec::new(),
            json_too_large: false,
            message: MessageUsage::default(),
            message_fast: fast,
            message_cost: 0.0,
            ended: false,
        }
    }

    /// Whether the answer was read to its end (else what it cost is not known).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Feeds bytes of the body; returns what they add.
    pub fn feed(&mut self, bytes: &[u8]) -> Seen {
        if !self.streaming {
            if self.json.len() + bytes.len() > MAX_JSON_BYTES {
                self.json_too_large = true;
            } else {
                self.json.extend_from_slice(bytes);
            }
            return Seen::default();
        }
        self.pending.extend_from_slice(bytes);
        let mut seen = Seen::default();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
            match event["type"].as_str() {
                Some("message_start") => {
                    self.message = MessageUsage::default();
                    self.message_cost = 0.0;
                    let u = &event["message"]["usage"];
                    self.message_fast = speed(u).unwrap_or(self.fast);
                    self.apply(u, &mut seen);
                }
                Some("message_delta") => self.apply(&event["usage"], &mut seen),
                Some("content_block_start") if event["content_block"]["type"] == "tool_use" => {
                    seen.tools.push(tool_name(event["content_block"]["name"].as_str().unwrap_or_default()));
                }
                Some("message_stop") => {
                    seen.turns += 1;
                    self.ended = true;
                }
                Some("error") => self.ended = true,
                _ => {}
            }
        }
        seen
    }

    /// The body ended: what a JSON body adds.
    pub fn finish(&mut self) -> Seen {
        let mut seen = Seen::default();
        if self.streaming || self.json_too_large {
            return seen;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.json) else {
            // Not JSON (an error page): nothing to bill, and nothing left to read.
            self.ended = true;
            return seen;
        };
        self.ended = true;
        if v["type"] != "message" {
            return seen;
        }
        self.message_fast = speed(&v["usage"]).unwrap_or(self.fast);
        self.apply(&v["usage"], &mut seen);
        seen.turns = 1;
        seen.tools = v["content"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter(|b| b["type"] == "tool_use")
                    .map(|b| tool_name(b["name"].as_str().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        seen
    }

    /// Takes a (cumulative) usage object into the current message; adds what grew to `seen`.
    fn apply(&mut self, u: &serde_json::Value, seen: &mut Seen) {
        let n = |v: &serde_json::Value| v.as_u64();
        let before = self.message;
        let m = &mut self.message;
        let grow = |field: &mut u64, v: Option<u64>| *field = (*field).max(v.unwrap_or(0));
        grow(&mut m.input_tokens, n(&u["input_tokens"]));
        grow(&mut m.output_tokens, n(&u["output_tokens"]));
        grow(&mut m.cache_read_input_tokens, n(&u["cache_read_input_tokens"]));
        let split = &u["cache_creation"];
        let (w5, w1) = (n(&split["ephemeral_5m_input_tokens"]).unwrap_or(0), n(&split["ephemeral_1h_input_tokens"]));
        grow(&mut m.cache_creation_1h_input_tokens, w1);
        let total = n(&u["cache_creation_input_tokens"]).unwrap_or(0).max(w5 + w1.unwrap_or(0));
        grow(&mut m.cache_creation_input_tokens, Some(total));
        let tools = &u["server_tool_use"];
        grow(&mut m.web_search_requests, n(&tools["web_search_requests"]));
        grow(&mut m.web_fetch_requests, n(&tools["web_fetch_requests"]));
        let cost = message_cost(&self.price, self.message_fast, self.table_fast, m);
        let a = &mut seen.usage;
        a.input_tokens += m.input_tokens - before.input_tokens;
        a.output_tokens += m.output_tokens - before.output_tokens;
        a.cache_read_input_tokens += m.cache_read_input_tokens - before.cache_read_input_tokens;
        a.cache_creation_input_tokens += m.cache_creation_input_tokens - before.cache_creation_input_tokens;
        a.cache_creation_1h_input_tokens += m.cache_creation_1h_input_tokens - before.cache_creation_1h_input_tokens;
        a.web_search_requests += m.web_search_requests - before.web_search_requests;
        a.web_fetch_requests += m.web_fetch_requests - before.web_fetch_requests;
        // Cost is of the message as a whole (a long-context tier applies to all its tokens).
        seen.cost_usd += cost - self.message_cost;
        self.message_cost = cost;
    }
}

/// The speed an answer says served it (`usage.speed`), when it says.
fn speed(u: &serde_json::Value) -> Option<bool> {
    match u["speed"].as_str()? {
        "fast" => Some(true),
        "standard" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::prices::PriceTable;

    fn meter(model: &str, streaming: bool) -> Meter {
        let t = PriceTable::list();
        Meter::new(t.price(model), false, t.max_fast_multiplier(), streaming)
    }

    fn sum(a: &mut Seen, b: Seen) {
        let (x, y) = (&mut a.usage, b.usage);
        x.input_tokens += y.input_tokens;
        x.output_tokens += y.output_tokens;
        x.cache_read_input_tokens += y.cache_read_input_tokens;
        x.cache_creation_input_tokens += y.cache_creation_input_tokens;
        x.cache_creation_1h_input_tokens += y.cache_creation_1h_input_tokens;
        x.web_search_requests += y.web_search_requests;
        x.web_fetch_requests += y.web_fetch_requests;
        a.cost_usd += b.cost_usd;
        a.turns += b.turns;
        a.tools.extend(b.tools);
    }

    #[test]
    fn cumulative_usage_is_counted_once_per_message_split_anywhere() {
        // As the API sends it with a server tool: input grows during the message, and every
        // message_delta repeats every field, cumulative.
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":120,\"output_tokens\":1,\"cache_read_input_tokens\":10,\"cache_creation_input_tokens\":5,\"cache_creation\":{\"ephemeral_5m_input_tokens\":5,\"ephemeral_1h_input_tokens\":0}}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"name\":\"Bash\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":2120,\"output_tokens\":30,\"cache_read_input_tokens\":10,\"cache_creation_input_tokens\":5,\"server_tool_use\":{\"web_search_requests\":1,\"web_fetch_requests\":0}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":4120,\"output_tokens\":40,\"cache_read_input_tokens\":10,\"cache_creation_input_tokens\":5,\"server_tool_use\":{\"web_search_requests\":2,\"web_fetch_requests\":0}}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        for cut in [1usize, 7, 33, 100, stream.len()] {
            let mut m = meter("claude-sonnet-4-6", true);
            let mut total = Seen::default();
            for chunk in stream.as_bytes().chunks(cut) {
                sum(&mut total, m.feed(chunk));
            }
            sum(&mut total, m.finish());
            let u = total.usage;
            assert_eq!(
                (u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens),
                (4120, 40, 10, 5),
                "chunks of {cut}"
            );
            assert_eq!((u.web_search_requests, total.turns, total.tools.clone()), (2, 1, vec!["Bash".to_string()]));
            let want = (4120.0 * 3.0 + 40.0 * 15.0 + 10.0 * 0.3 + 5.0 * 3.75) / 1e6 + 0.02;
            assert!((total.cost_usd - want).abs() < 1e-12, "{} vs {want}", total.cost_usd);
            assert!(m.ended());
        }
    }

    #[test]
    fn a_json_answer_is_metered_at_its_end_with_cache_lifetimes() {
        let body = br#"{"type":"message","content":[{"type":"tool_use","name":"Read","input":{}}],"usage":{"input_tokens":1000,"output_tokens":100,"cache_creation_input_tokens":3000,"cache_creation":{"ephemeral_5m_input_tokens":1000,"ephemeral_1h_input_tokens":2000},"server_tool_use":{"web_search_requests":1}}}"#;
        let mut m = meter("claude-opus-4-1", false);
        let mut total = Seen::default();
        for chunk in body.chunks(10) {
            sum(&mut total, m.feed(chunk));
        }
        assert!(total.is_empty(), "nothing before the end");
        sum(&mut total, m.finish());
        assert_eq!(total.usage.cache_creation_1h_input_tokens, 2000);
        let want = (1000.0 * 15.0 + 100.0 * 75.0 + 1000.0 * 18.75 + 2000.0 * 30.0) / 1e6 + 0.01;
        assert!((total.cost_usd - want).abs() < 1e-12, "{}", total.cost_usd);
        assert_eq!((total.turns, total.tools.len()), (1, 1));
    }

    #[test]
    fn a_stream_cut_before_message_stop_has_not_ended() {
        let mut m = meter("claude-haiku-4-5", true);
        m.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n");
        assert!(!m.ended());
        m.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n");
        assert!(m.ended(), "an error event ends the answer");
    }

    #[test]
    fn names_from_outside_are_bounded() {
        assert_eq!(tool_name("mcp__srv__do.it"), "mcp__srv__do.it");
        assert_eq!(tool_name(&"x".repeat(65)), "other");
        assert_eq!(tool_name("a b"), "other");
        assert_eq!(tool_name(""), "other");
    }
}
