//! Claude Code's `--output-format stream-json` lines, parsed one at a time, and the running
//! totals they add up to. Pure: no I/O.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use serde_json::Value;

use crate::api::{ToolCalls, Usage};

/// One line of the stream, reduced to what the runner uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The session started.
    Init { session_id: Option<String>, model: Option<String> },
    /// Claude Code is retrying a failed API call.
    ApiRetry { attempt: Option<u64>, status: Option<u64>, delay_ms: Option<u64> },
    /// One assistant message (or part of one: the CLI prints a line per content block).
    Assistant { message_id: Option<String>, usage: Option<Usage>, tool_uses: Vec<ToolUse>, text: String },
    /// The final line.
    Result(AgentResult),
    /// Anything else (user/tool results, other system lines).
    Other,
}

/// A tool call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolUse {
    pub id: String,
    pub name: String,
}

/// The `result` line: the CLI's own totals.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentResult {
    /// `success`, `error_max_turns`, `error_during_execution`, `error_max_budget_usd`, ...
    pub subtype: String,
    /// Whether the run failed. Judge by this, not the subtype: an API failure says `success`.
    pub is_error: bool,
    pub text: Option<String>,
    pub cost_usd: Option<f64>,
    pub usage: Option<Usage>,
    pub num_turns: Option<u64>,
    pub duration_ms: Option<u64>,
    pub api_error_status: Option<u64>,
    pub session_id: Option<String>,
    /// What `--json-schema` asked for, as the CLI validated it (`structured_output`).
    pub structured_output: Option<Value>,
    /// Calls the CLI refused by its permission rules (`permission_denials`).
    pub permission_denials: u64,
}

/// Why a line could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("JSON without a \"type\"")]
    NoType,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

fn usage_of(v: Option<&Value>) -> Option<Usage> {
    let w: WireUsage = serde_json::from_value(v?.clone()).ok()?;
    Some(Usage {
        input_tokens: w.input_tokens.unwrap_or(0),
        output_tokens: w.output_tokens.unwrap_or(0),
        cache_read_input_tokens: w.cache_read_input_tokens.unwrap_or(0),
        cache_creation_input_tokens: w.cache_creation_input_tokens.unwrap_or(0),
    })
}

fn str_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn u64_of(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// Parses one line. Unknown types and fields are tolerated; only non-JSON is an error.
pub fn parse_line(line: &str) -> Result<Event, ParseError> {
    let v: Value = serde_json::from_str(line.trim()).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let kind = v.get("type").and_then(Value::as_str).ok_or(ParseError::NoType)?;
    Ok(match kind {
        "system" => match v.get("subtype").and_then(Value::as_str) {
            Some("init") => Event::Init { session_id: str_of(&v, "session_id"), model: str_of(&v, "model") },
            Some("api_retry") => Event::ApiRetry {
                attempt: u64_of(&v, "attempt"),
                status: u64_of(&v, "error_status").or_else(|| u64_of(&v, "status")),
                delay_ms: u64_of(&v, "retry_delay_ms").or_else(|| u64_of(&v, "delay_ms")),
            },
            _ => Event::Other,
        },
        "assistant" => {
            let msg = v.get("message").cloned().unwrap_or(Value::Null);
            let mut tool_uses = Vec::new();
            let mut text = String::new();
            for block in msg.get("content").and_then(Value::as_array).into_iter().flatten() {
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => tool_uses.push(ToolUse {
                        id: str_of(block, "id").unwrap_or_default(),
                        name: str_of(block, "name").unwrap_or_else(|| "unknown".into()),
                    }),
                    Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or_default()),
                    _ => {}
                }
            }
            Event::Assistant { message_id: str_of(&msg, "id"), usage: usage_of(msg.get("usage")), tool_uses, text }
        }
        "result" => Event::Result(AgentResult {
            subtype: str_of(&v, "subtype").unwrap_or_default(),
            is_error: v.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            text: str_of(&v, "result"),
            cost_usd: v.get("total_cost_usd").and_then(Value::as_f64),
            usage: usage_of(v.get("usage")),
            num_turns: u64_of(&v, "num_turns"),
            duration_ms: u64_of(&v, "duration_ms"),
            api_error_status: u64_of(&v, "api_error_status"),
            session_id: str_of(&v, "session_id"),
            structured_output: v.get("structured_output").filter(|o| !o.is_null()).cloned(),
            permission_denials: v.get("permission_denials").and_then(Value::as_array).map_or(0, |d| d.len() as u64),
        }),
        _ => Event::Other,
    })
}

/// Running totals of one agent run, updated line by line.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub session_id: Option<String>,
    pub model: Option<String>,
    /// Usage per assistant message id: the CLI repeats a message's usage on each of its lines.
    per_message: HashMap<String, Usage>,
    anonymous_usage: Usage,
    seen_tools: HashSet<String>,
    pub tool_calls: ToolCalls,
    pub api_retries: u64,
    pub last_api_error_status: Option<u64>,
    pub last_text: Option<String>,
    pub result: Option<AgentResult>,
    pub malformed_lines: u64,
}

impl Tally {
    /// Adds one line; returns true when a total (usage, tools, turns, result) changed.
    pub fn push_line(&mut self, line: &str) -> bool {
        if line.trim().is_empty() {
            return false;
        }
        match parse_line(line) {
            Ok(ev) => self.apply(ev),
            Err(_) => {
                self.malformed_lines += 1;
                false
            }
        }
    }

    /// Adds one event; returns true when a total changed.
    pub fn apply(&mut self, ev: Event) -> bool {
        match ev {
            Event::Init { session_id, model } => {
                self.session_id = session_id.or(self.session_id.take());
                self.model = model.or(self.model.take());
                false
            }
            Event::ApiRetry { status, .. } => {
                self.api_retries += 1;
                self.last_api_error_status = status.or(self.last_api_error_status);
                false
            }
            Event::Assistant { message_id, usage, tool_uses, text } => {
                let mut changed = false;
                if let Some(u) = usage {
                    match message_id {
                        Some(id) => {
                            // Keep the largest figures seen for this message: later lines never report less.
                            let e = self.per_message.entry(id).or_default();
                            let merged = Usage {
                                input_tokens: e.input_tokens.max(u.input_tokens),
                                output_tokens: e.output_tokens.max(u.output_tokens),
                                cache_read_input_tokens: e.cache_read_input_tokens.max(u.cache_read_input_tokens),
                                cache_creation_input_tokens: e
                                    .cache_creation_input_tokens
                                    .max(u.cache_creation_input_tokens),
                            };
                            changed |= merged != *e;
                            *e = merged;
                        }
                        None => {
                            add(&mut self.anonymous_usage, &u);
                            changed = true;
                        }
                    }
                }
                for t in tool_uses {
                    if t.id.is_empty() || self.seen_tools.insert(t.id.clone()) {
                        self.tool_calls.total += 1;
                        *self.tool_calls.by_tool.entry(t.name).or_default() += 1;
                        changed = true;
                    }
                }
                if !text.is_empty() {
                    self.last_text = Some(text);
                }
                changed
            }
            Event::Result(r) => {
                if r.session_id.is_some() {
                    self.session_id = r.session_id.clone();
                }
                self.result = Some(r);
                true
            }
            Event::Other => false,
        }
    }

    /// Tokens used: the CLI's final figure when there is one, else the sum of the messages seen.
    pub fn usage(&self) -> Usage {
        if let Some(u) = self.result.as_ref().and_then(|r| r.usage) {
            return u;
        }
        let mut total = self.anonymous_usage;
        for u in self.per_message.values() {
            add(&mut total, u);
        }
        total
    }

    /// Turns: the CLI's count when there is one, else the assistant messages seen.
    pub fn num_turns(&self) -> u64 {
        self.result.as_ref().and_then(|r| r.num_turns).unwrap_or(self.per_message.len() as u64)
    }

    /// Cost in USD: the CLI's figure when the run ended, else an estimate from list prices.
    pub fn cost_usd(&self) -> f64 {
        self.result
            .as_ref()
            .and_then(|r| r.cost_usd)
            .unwrap_or_else(|| crate::gateway::prices::estimate_cost(self.model.as_deref(), &self.usage()))
    }
}

fn add(total: &mut Usage, u: &Usage) {
    total.input_tokens += u.input_tokens;
    total.output_tokens += u.output_tokens;
    total.cache_read_input_tokens += u.cache_read_input_tokens;
    total.cache_creation_input_tokens += u.cache_creation_input_tokens;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const INIT: &str = r#"{"type":"system","subtype":"init","session_id":"s-1","model":"claude-x"}"#;
    const A1: &str = r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"tool_use","id":"t1","name":"Write","input":{}}],"usage":{"input_tokens":100,"output_tokens":1}}}"#;
    const A1_LATER: &str = r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"done"}],"usage":{"input_tokens":100,"output_tokens":20}}}"#;
    const A2: &str = r#"{"type":"assistant","message":{"id":"m2","content":[{"type":"tool_use","id":"t2","name":"Bash","input":{}},{"type":"tool_use","id":"t3","name":"Write","input":{}}],"usage":{"input_tokens":50,"output_tokens":5,"cache_read_input_tokens":7}}}"#;
    const RESULT: &str = r#"{"type":"result","subtype":"success","is_error":false,"result":"all done","total_cost_usd":0.25,"num_turns":3,"session_id":"s-1","usage":{"input_tokens":151,"output_tokens":26,"cache_read_input_tokens":7,"cache_creation_input_tokens":0}}"#;

    #[test]
    fn live_totals_count_each_message_and_tool_once() {
        let mut t = Tally::default();
        for l in [INIT, A1, A1_LATER, A2, A2] {
            t.push_line(l);
        }
        assert_eq!(t.session_id.as_deref(), Some("s-1"));
        assert_eq!(
            t.usage(),
            Usage { input_tokens: 150, output_tokens: 25, cache_read_input_tokens: 7, cache_creation_input_tokens: 0 }
        );
        assert_eq!(t.tool_calls.total, 3);
        assert_eq!(t.tool_calls.by_tool["Write"], 2);
        assert_eq!(t.num_turns(), 2);
        assert!(t.cost_usd() > 0.0, "a run without a result line still has an estimated cost");
    }

    #[test]
    fn result_line_is_authoritative() {
        let mut t = Tally::default();
        for l in [INIT, A1, A2, RESULT] {
            t.push_line(l);
        }
        assert_eq!(t.usage().input_tokens, 151);
        assert_eq!(t.num_turns(), 3);
        assert_eq!(t.cost_usd(), 0.25);
        assert_eq!(t.result.as_ref().unwrap().text.as_deref(), Some("all done"));
    }

    #[test]
    fn api_failure_is_judged_by_is_error() {
        let line =
            r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":500,"result":"API Error: 500"}"#;
        let Event::Result(r) = parse_line(line).unwrap() else { panic!("not a result") };
        assert!(r.is_error);
        assert_eq!(r.api_error_status, Some(500));
    }

    #[test]
    fn retries_are_counted() {
        let mut t = Tally::default();
        t.push_line(r#"{"type":"system","subtype":"api_retry","attempt":1,"error_status":529,"retry_delay_ms":500}"#);
        assert_eq!((t.api_retries, t.last_api_error_status), (1, Some(529)));
    }

    #[test]
    fn malformed_and_truncated_lines_are_counted_not_fatal() {
        let mut t = Tally::default();
        for cut in 0..RESULT.len() {
            t.push_line(&RESULT[..cut]);
        }
        assert!(t.result.is_none());
        assert_eq!(t.malformed_lines, RESULT.len() as u64 - 1, "every non-empty prefix is malformed");
        assert_eq!(parse_line("[1,2]"), Err(ParseError::NoType));
        assert_eq!(parse_line(r#"{"type":"assistant","message":7}"#).map(|_| ()), Ok(()));
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(s in ".{0,300}") {
            let mut t = Tally::default();
            t.push_line(&s);
        }

        #[test]
        fn tool_totals_match_per_tool_counts(names in proptest::collection::vec("[A-Z][a-z]{0,5}", 0..20), dup in any::<bool>()) {
            let mut t = Tally::default();
            for (i, n) in names.iter().enumerate() {
                let line = format!(r#"{{"type":"assistant","message":{{"id":"m{i}","content":[{{"type":"tool_use","id":"t{i}","name":"{n}"}}]}}}}"#);
                t.push_line(&line);
                if dup { t.push_line(&line); }
            }
            prop_assert_eq!(t.tool_calls.total, names.len() as u64);
            prop_assert_eq!(t.tool_calls.by_tool.values().sum::<u64>(), t.tool_calls.total);
        }

        #[test]
        fn structured_garbage_never_panics(v in arb_json()) {
            let mut t = Tally::default();
            t.push_line(&v.to_string());
            let _ = t.usage();
            let _ = t.cost_usd();
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop_oneof![Just("assistant"), Just("result"), Just("system"), Just("tool_use"), Just("init"), Just("x")]
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("type".to_string()),
                        Just("message".to_string()),
                        Just("content".to_string()),
                        Just("usage".to_string()),
                        Just("id".to_string()),
                        Just("name".to_string()),
                        Just("subtype".to_string()),
                        Just("input_tokens".to_string())
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
