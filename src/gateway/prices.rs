//! The price list: the one place that prices tokens. The gateway prices what it meters and
//! holds each request's worst case against a budget with it; the agent's stream uses it only
//! until the CLI reports its own cost (a run stopped by timeout or cancel).
//!
//! Rows are keyed by exact model ids (an alias and its dated snapshots), never by family: Opus
//! 4.1 and Opus 5.5 differ by almost 4×. A model the table does not know is priced at the
//! table's ceiling (every rate at the highest any row has), never at a cheaper row's: a new
//! model keeps working, over-counted, until the operator adds its row (`PriceTable::from_yaml`).

use serde::{Deserialize, Serialize};

use crate::api::Usage;

/// USD per million tokens of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    /// Uncached input tokens.
    pub input: f64,
    /// Output tokens (thinking included).
    pub output: f64,
    /// Input tokens written to the cache with the default 5-minute lifetime.
    pub cache_write_5m: f64,
    /// Input tokens written to the cache with the 1-hour lifetime.
    pub cache_write_1h: f64,
    /// Input tokens read from the cache (hits and refreshes).
    pub cache_read: f64,
}

impl Rates {
    /// Rates with the pricing page's cache multipliers: 1.25× (5m write), 2× (1h write), 0.1× (read).
    pub const fn list(input: f64, output: f64) -> Self {
        Self { input, output, cache_write_5m: input * 1.25, cache_write_1h: input * 2.0, cache_read: input * 0.1 }
    }

    /// The same rates with another cache-read rate (some models read the cache for less than 0.1×).
    pub const fn reading(self, cache_read: f64) -> Self {
        Self { cache_read, ..self }
    }

    fn scaled(self, k: f64) -> Self {
        Self {
            input: self.input * k,
            output: self.output * k,
            cache_write_5m: self.cache_write_5m * k,
            cache_write_1h: self.cache_write_1h * k,
            cache_read: self.cache_read * k,
        }
    }

    fn max(self, o: Self) -> Self {
        Self {
            input: self.input.max(o.input),
            output: self.output.max(o.output),
            cache_write_5m: self.cache_write_5m.max(o.cache_write_5m),
            cache_write_1h: self.cache_write_1h.max(o.cache_write_1h),
            cache_read: self.cache_read.max(o.cache_read),
        }
    }

    /// The dearest rate an input token can be billed at (a cache write, usually the 1-hour one).
    pub fn dearest_input(&self) -> f64 {
        self.input.max(self.cache_write_5m).max(self.cache_write_1h).max(self.cache_read)
    }

    fn all(&self) -> [f64; 5] {
        [self.input, self.output, self.cache_write_5m, self.cache_write_1h, self.cache_read]
    }
}

/// Rates that apply to every token of a request whose prompt (input + cache reads + cache
/// writes) is longer than a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContext {
    /// Prompts of more tokens than this are billed at `rates`.
    pub above_prompt_tokens: u64,
    pub rates: Rates,
}

/// One row: the list prices of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// The exact model ids this row prices (the alias and its dated snapshots).
    pub ids: Vec<String>,
    pub rates: Rates,
    /// Long-context rates, for models that have them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_context: Option<LongContext>,
    /// Fast mode (`speed: "fast"`): every rate times this. None: the model has no fast mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_multiplier: Option<f64>,
    /// Tokens of context (input and output) the model takes.
    pub context_window: u64,
    /// Its context window with the `context-1m` beta, when that beta widens it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window_1m_beta: Option<u64>,
}

/// Server tools billed per use, on top of the tokens they add.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerToolPrices {
    /// USD per web search (`usage.server_tool_use.web_search_requests`).
    pub web_search: f64,
    /// USD per web fetch (`usage.server_tool_use.web_fetch_requests`).
    pub web_fetch: f64,
}

/// Why a price table is refused.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("the price table does not parse: {0}")]
    Parse(String),
    #[error("the price table is not usable: {0}")]
    Invalid(String),
}

/// Model prices, by exact model id, and server tool prices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    /// Where the figures come from, and when they were read.
    pub source: String,
    pub models: Vec<ModelPrice>,
    pub server_tools: ServerToolPrices,
}

/// What one request is priced at: its model's row, or the table's ceiling for a model the table
/// does not know.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub rates: Rates,
    pub long_context: Option<LongContext>,
    pub fast_multiplier: Option<f64>,
    pub context_window: u64,
    pub context_window_1m_beta: Option<u64>,
    /// Whether the table has a row for the model.
    pub known: bool,
    pub server_tools: ServerToolPrices,
}

/// The usage of one message, as the API reports it (every field cumulative for the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// All cache writes (`cache_creation_input_tokens`).
    pub cache_creation_input_tokens: u64,
    /// Of those, the ones written for one hour (`cache_creation.ephemeral_1h_input_tokens`);
    /// the rest are priced as 5-minute writes.
    pub cache_creation_1h_input_tokens: u64,
    pub web_search_requests: u64,
    pub web_fetch_requests: u64,
}

impl MessageUsage {
    /// Cache writes of the 5-minute kind.
    pub fn cache_creation_5m_input_tokens(&self) -> u64 {
        self.cache_creation_input_tokens.saturating_sub(self.cache_creation_1h_input_tokens)
    }

    /// Tokens of the prompt (what long-context thresholds count).
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens
    }

    /// The four token counts of the status.
    pub fn tokens(&self) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_read_input_tokens: self.cache_read_input_tokens,
            cache_creation_input_tokens: self.cache_creation_input_tokens,
        }
    }
}

impl Price {
    /// The rates a request is billed at: long-context ones when its prompt is over the threshold,
    /// times the fast-mode multiplier when it ran fast (a model without one: the table's highest).
    pub fn rates(&self, prompt_tokens: u64, fast: bool, table_fast: f64) -> Rates {
        let rates = match self.long_context {
            Some(lc) if prompt_tokens > lc.above_prompt_tokens => lc.rates,
            _ => self.rates,
        };
        if fast { rates.scaled(self.fast_multiplier.unwrap_or(table_fast)) } else { rates }
    }

    /// The largest prompt a request can have (its context window, or the 1M one with the beta).
    pub fn max_prompt_tokens(&self, context_1m: bool) -> u64 {
        match self.context_window_1m_beta {
            Some(w) if context_1m => w.max(self.context_window),
            _ => self.context_window,
        }
    }

    /// Rates a request can be billed at whose prompt is at most `prompt_tokens`: the long-context
    /// ones too if the prompt may cross the threshold.
    pub fn worst_rates(&self, prompt_tokens: u64, fast: bool, table_fast: f64) -> Rates {
        let short = self.rates(0, fast, table_fast);
        match self.long_context {
            Some(lc) if prompt_tokens > lc.above_prompt_tokens => {
                short.max(self.rates(lc.above_prompt_tokens + 1, fast, table_fast))
            }
            _ => short,
        }
    }
}

/// Cost in USD of one message's usage at `price`.
pub fn message_cost(price: &Price, fast: bool, table_fast: f64, u: &MessageUsage) -> f64 {
    let r = price.rates(u.prompt_tokens(), fast, table_fast);
    (u.input_tokens as f64 * r.input
        + u.output_tokens as f64 * r.output
        + u.cache_read_input_tokens as f64 * r.cache_read
        + u.cache_creation_5m_input_tokens() as f64 * r.cache_write_5m
        + u.cache_creation_1h_input_tokens as f64 * r.cache_write_1h)
        / 1_000_000.0
        + u.web_search_requests as f64 * price.server_tools.web_search
        + u.web_fetch_requests as f64 * price.server_tools.web_fetch
}

impl PriceTable {
    /// Anthropic's list prices.
    ///
    /// Source: https://platform.claude.com/docs/en/about-claude/pricing (model pricing, long
    /// context, prompt caching, web search), the model pages
    /// https://platform.claude.com/docs/en/models/<model>/overview, and
    /// https://platform.claude.com/docs/build-with-claude/fast-mode; read 2026-12-06 (stored
    /// copies). Fable 5.2 / Mythos 5.2 rows as two price trackers quoted the pricing page on
    /// 2026-12-01 (the page's own row was not in the stored copy). Web fetch has no per-use
    /// charge (tokens only); code execution is billed by container-hour, which no response
    /// reports: the gateway refuses it rather than price it.
    pub fn list() -> Self {
        let row = |ids: &[&str], rates: Rates, context_window: u64| ModelPrice {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            rates,
            long_context: None,
            fast_multiplier: None,
            context_window,
            context_window_1m_beta: None,
        };
        const M: u64 = 1_000_000;
        const K200: u64 = 200_000;
        // Sonnet 4 and 4.5: 1M context with the beta, prompts over 200k at $6 / $22.50.
        let sonnet_4_long = |ids: &[&str]| ModelPrice {
            long_context: Some(LongContext { above_prompt_tokens: K200, rates: Rates::list(6.0, 22.5) }),
            context_window_1m_beta: Some(M),
            ..row(ids, Rates::list(3.0, 15.0), K200)
        };
        let fast = |r: ModelPrice, k: f64| ModelPrice { fast_multiplier: Some(k), ..r };
        Self {
            source: "https://platform.claude.com/docs/en/about-claude/pricing (read 2026-12-06)".into(),
            models: vec![
                row(&["claude-fable-5-2", "claude-mythos-5-2"], Rates::list(8.0, 40.0).reading(0.20), M),
                row(&["claude-fable-5-1", "claude-mythos-5-1"], Rates::list(10.0, 50.0).reading(0.25), M),
                row(&["claude-fable-5", "claude-mythos-5"], Rates::list(10.0, 50.0).reading(1.0), M),
                fast(row(&["claude-opus-5-5"], Rates::list(4.0, 20.0).reading(0.20), M), 2.0),
                fast(row(&["claude-opus-5"], Rates::list(5.0, 25.0), M), 2.0),
                fast(row(&["claude-opus-4-8"], Rates::list(5.0, 25.0), M), 2.0),
                row(&["claude-opus-4-7"], Rates::list(5.0, 25.0), M),
                row(&["claude-opus-4-6"], Rates::list(5.0, 25.0), M),
                row(&["claude-opus-4-5", "claude-opus-4-5-20251101"], Rates::list(5.0, 25.0), K200),
                row(&["claude-opus-4-1", "claude-opus-4-1-20250805"], Rates::list(15.0, 75.0), K200),
                row(&["claude-opus-4-0", "claude-opus-4-20250514"], Rates::list(15.0, 75.0), K200),
                row(&["claude-3-opus-20240229", "claude-3-opus-latest"], Rates::list(15.0, 75.0), K200),
                row(&["claude-sonnet-5-5"], Rates::list(2.0, 10.0).reading(0.10), M),
                row(&["claude-sonnet-5"], Rates::list(2.0, 10.0), M),
                row(&["claude-sonnet-4-6"], Rates::list(3.0, 15.0), M),
                sonnet_4_long(&["claude-sonnet-4-5", "claude-sonnet-4-5-20250929"]),
                sonnet_4_long(&["claude-sonnet-4-0", "claude-sonnet-4-20250514"]),
                row(&["claude-3-7-sonnet-20250219", "claude-3-7-sonnet-latest"], Rates::list(3.0, 15.0), K200),
                ModelPrice {
                    // Prompts over 100k: every token at the higher band.
                    long_context: Some(LongContext {
                        above_prompt_tokens: 100_000,
                        rates: Rates::list(0.50, 2.50).reading(0.05),
                    }),
                    ..row(&["claude-haiku-5-5"], Rates::list(0.10, 0.50).reading(0.01), M)
                },
                row(&["claude-haiku-4-5", "claude-haiku-4-5-20251001"], Rates::list(1.0, 5.0), K200),
                row(&["claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"], Rates::list(0.80, 4.0), K200),
                row(
                    &["claude-3-haiku-20240307"],
                    Rates { input: 0.25, output: 1.25, cache_write_5m: 0.30, cache_write_1h: 0.50, cache_read: 0.03 },
                    K200,
                ),
            ],
            // $10 per 1,000 searches.
            server_tools: ServerToolPrices { web_search: 0.01, web_fetch: 0.0 },
        }
    }

    /// The shared list-price table.
    pub fn list_shared() -> std::sync::Arc<Self> {
        static LIST: std::sync::OnceLock<std::sync::Arc<PriceTable>> = std::sync::OnceLock::new();
        LIST.get_or_init(|| std::sync::Arc::new(Self::list())).clone()
    }

    /// A table from YAML (the shape `to_yaml` writes), checked.
    pub fn from_yaml(text: &str) -> Result<Self, PriceError> {
        let t: Self = serde_norway::from_str(text).map_err(|e| PriceError::Parse(e.to_string()))?;
        t.checked()
    }

    /// A table from JSON, checked.
    pub fn from_json(text: &str) -> Result<Self, PriceError> {
        let t: Self = serde_json::from_str(text).map_err(|e| PriceError::Parse(e.to_string()))?;
        t.checked()
    }

    /// The table as YAML (for an operator to copy and edit).
    pub fn to_yaml(&self) -> Result<String, PriceError> {
        serde_norway::to_string(self).map_err(|e| PriceError::Parse(e.to_string()))
    }

    fn checked(self) -> Result<Self, PriceError> {
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}]");
            if m.ids.is_empty() {
                return Err(PriceError::Invalid(format!("{at}.ids is empty")));
            }
            for id in &m.ids {
                if !seen.insert(id.as_str()) {
                    return Err(PriceError::Invalid(format!("{at}.ids: {id:?} is priced twice")));
                }
            }
            let lc = m.long_context.map(|l| l.rates.all()).unwrap_or_default();
            let rates = m.rates.all().into_iter().chain(lc).chain(m.fast_multiplier);
            if rates.into_iter().any(|r| !r.is_finite() || r < 0.0) {
                return Err(PriceError::Invalid(format!("{at}: every rate is a finite number, at least 0")));
            }
            if m.fast_multiplier.is_some_and(|k| k < 1.0) {
                return Err(PriceError::Invalid(format!("{at}.fast_multiplier is below 1")));
            }
            if m.context_window == 0 {
                return Err(PriceError::Invalid(format!("{at}.context_window is 0")));
            }
        }
        let s = self.server_tools;
        if [s.web_search, s.web_fetch].iter().any(|r| !r.is_finite() || *r < 0.0) {
            return Err(PriceError::Invalid("server_tools: every price is a finite number, at least 0".into()));
        }
        Ok(self)
    }

    /// The price of `model`: its row, or the table's ceiling if it has none.
    pub fn price(&self, model: &str) -> Price {
        match self.models.iter().find(|m| m.ids.iter().any(|id| id == model)) {
            Some(m) => Price {
                rates: m.rates,
                long_context: m.long_context,
                fast_multiplier: m.fast_multiplier,
                context_window: m.context_window,
                context_window_1m_beta: m.context_window_1m_beta,
                known: true,
                server_tools: self.server_tools,
            },
            None => self.ceiling(),
        }
    }

    /// A price no row is above: every rate the highest of any row (long-context rates
    /// included), the largest context window. What an unknown model is billed at.
    pub fn ceiling(&self) -> Price {
        let mut rates = Rates::default();
        let mut window = 0;
        for m in &self.models {
            rates = rates.max(m.rates);
            if let Some(lc) = m.long_context {
                rates = rates.max(lc.rates);
            }
            window = window.max(m.context_window).max(m.context_window_1m_beta.unwrap_or(0));
        }
        Price {
            rates,
            long_context: None,
            fast_multiplier: None,
            context_window: window.max(1_000_000),
            context_window_1m_beta: None,
            known: false,
            server_tools: self.server_tools,
        }
    }

    /// The highest fast-mode multiplier of any row (what a fast answer of a model without one
    /// is billed at).
    pub fn max_fast_multiplier(&self) -> f64 {
        self.models.iter().filter_map(|m| m.fast_multiplier).fold(1.0, f64::max)
    }

    /// Cost of `u` (one message) for `model` (None: the ceiling).
    pub fn cost(&self, model: Option<&str>, fast: bool, u: &MessageUsage) -> f64 {
        let price = model.map(|m| self.price(m)).unwrap_or_else(|| self.ceiling());
        message_cost(&price, fast, self.max_fast_multiplier(), u)
    }
}

/// List-price estimate of `u` for `model`, cache writes at the 5-minute rate.
pub fn estimate_cost(model: Option<&str>, u: &Usage) -> f64 {
    let m = MessageUsage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cache_read_input_tokens: u.cache_read_input_tokens,
        cache_creation_input_tokens: u.cache_creation_input_tokens,
        ..Default::default()
    };
    PriceTable::list_shared().cost(model, false, &m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtok(input: u64, output: u64) -> MessageUsage {
        MessageUsage { input_tokens: input, output_tokens: output, ..Default::default() }
    }

    /// Every row as the pricing page lists it: (id, input, output, 5m write, 1h write, read).
    const PAGE: &[(&str, f64, f64, f64, f64, f64)] = &[
        ("claude-fable-5-2", 8.0, 40.0, 10.0, 16.0, 0.20),
        ("claude-mythos-5-2", 8.0, 40.0, 10.0, 16.0, 0.20),
        ("claude-fable-5-1", 10.0, 50.0, 12.50, 20.0, 0.25),
        ("claude-mythos-5-1", 10.0, 50.0, 12.50, 20.0, 0.25),
        ("claude-fable-5", 10.0, 50.0, 12.50, 20.0, 1.0),
        ("claude-mythos-5", 10.0, 50.0, 12.50, 20.0, 1.0),
        ("claude-opus-5-5", 4.0, 20.0, 5.0, 8.0, 0.20),
        ("claude-opus-5", 5.0, 25.0, 6.25, 10.0, 0.50),
        ("claude-opus-4-8", 5.0, 25.0, 6.25, 10.0, 0.50),
        ("claude-opus-4-7", 5.0, 25.0, 6.25, 10.0, 0.50),
        ("claude-opus-4-6", 5.0, 25.0, 6.25, 10.0, 0.50),
        ("claude-opus-4-5", 5.0, 25.0, 6.25, 10.0, 0.50),
        ("claude-opus-4-5-20251101", 5.0, 25.0, 6.25, 10.0, 0.50),
        ("claude-opus-4-1", 15.0, 75.0, 18.75, 30.0, 1.50),
        ("claude-opus-4-1-20250805", 15.0, 75.0, 18.75, 30.0, 1.50),
        ("claude-opus-4-0", 15.0, 75.0, 18.75, 30.0, 1.50),
        ("claude-opus-4-20250514", 15.0, 75.0, 18.75, 30.0, 1.50),
        ("claude-3-opus-20240229", 15.0, 75.0, 18.75, 30.0, 1.50),
        ("claude-sonnet-5-5", 2.0, 10.0, 2.50, 4.0, 0.10),
        ("claude-sonnet-5", 2.0, 10.0, 2.50, 4.0, 0.20),
        ("claude-sonnet-4-6", 3.0, 15.0, 3.75, 6.0, 0.30),
        ("claude-sonnet-4-5", 3.0, 15.0, 3.75, 6.0, 0.30),
        ("claude-sonnet-4-5-20250929", 3.0, 15.0, 3.75, 6.0, 0.30),
        ("claude-sonnet-4-0", 3.0, 15.0, 3.75, 6.0, 0.30),
        ("claude-sonnet-4-20250514", 3.0, 15.0, 3.75, 6.0, 0.30),
        ("claude-3-7-sonnet-20250219", 3.0, 15.0, 3.75, 6.0, 0.30),
        ("claude-haiku-5-5", 0.10, 0.50, 0.125, 0.20, 0.01),
        ("claude-haiku-4-5", 1.0, 5.0, 1.25, 2.0, 0.10),
        ("claude-haiku-4-5-20251001", 1.0, 5.0, 1.25, 2.0, 0.10),
        ("claude-3-5-haiku-20241022", 0.80, 4.0, 1.0, 1.6, 0.08),
        ("claude-3-haiku-20240307", 0.25, 1.25, 0.30, 0.50, 0.03),
    ];

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn every_row_prices_as_the_pricing_page_says() {
        let t = PriceTable::list();
        for &(id, input, output, w5, w1, read) in PAGE {
            let p = t.price(id);
            assert!(p.known, "{id} has a row");
            let r = p.rates;
            assert!(
                close(r.input, input)
                    && close(r.output, output)
                    && close(r.cache_write_5m, w5)
                    && close(r.cache_write_1h, w1)
                    && close(r.cache_read, read),
                "{id}: {r:?}"
            );
            // A thousand input and a thousand output tokens cost the page's figures / 1,000.
            assert!(close(t.cost(Some(id), false, &mtok(1_000, 1_000)), (input + output) / 1_000.0), "{id}");
        }
        let ids: usize = t.models.iter().map(|m| m.ids.len()).sum();
        assert!(ids >= PAGE.len(), "every id in the table is checked against the page or is an alias");
    }

    #[test]
    fn opus_4_1_and_fast_mode_are_priced_exactly() {
        let t = PriceTable::list();
        // 100k input, 10k output.
        let u = mtok(100_000, 10_000);
        assert!(close(t.cost(Some("claude-opus-4-1"), false, &u), 1.5 + 0.75));
        assert!(close(t.cost(Some("claude-opus-4-5"), false, &u), 0.5 + 0.25), "the old family price");
        // Fast mode: 2× on Opus 5.5 ($8 / $40), cache reads included ($0.40).
        assert!(close(t.cost(Some("claude-opus-5-5"), true, &u), 0.8 + 0.4));
        let read = MessageUsage { cache_read_input_tokens: 1_000_000, ..Default::default() };
        assert!(close(t.cost(Some("claude-opus-5-5"), true, &read), 0.40));
    }

    #[test]
    fn long_context_and_cache_lifetimes_and_server_tools() {
        let t = PriceTable::list();
        // Sonnet 4.5 over 200k prompt tokens: every token at $6 / $22.50.
        let long = mtok(250_000, 1_000);
        assert!(close(t.cost(Some("claude-sonnet-4-5"), false, &long), 1.5 + 0.0225));
        let short = mtok(150_000, 1_000);
        assert!(close(t.cost(Some("claude-sonnet-4-5"), false, &short), 0.45 + 0.015));
        // Haiku 5.5 over 100k: $0.50 / $2.50.
        assert!(close(t.cost(Some("claude-haiku-5-5"), false, &mtok(200_000, 0)), 0.10));
        // 1h cache writes at 2×, the rest at 1.25×.
        let writes = MessageUsage {
            cache_creation_input_tokens: 1_000_000,
            cache_creation_1h_input_tokens: 400_000,
            ..Default::default()
        };
        assert!(close(t.cost(Some("claude-sonnet-4-6"), false, &writes), 0.6 * 3.75 + 0.4 * 6.0));
        // Web search: $10 per 1,000.
        let search = MessageUsage { web_search_requests: 3, web_fetch_requests: 2, ..Default::default() };
        assert!(close(t.cost(Some("claude-haiku-4-5"), false, &search), 0.03));
    }

    #[test]
    fn an_unknown_model_is_never_cheaper_than_any_row() {
        let t = PriceTable::list();
        let ceiling = t.ceiling();
        assert!(!ceiling.known);
        for m in &t.models {
            for id in &m.ids {
                let p = t.price(id);
                let worst = p.worst_rates(u64::MAX, false, 1.0);
                for (c, r) in ceiling.rates.all().iter().zip(worst.all()) {
                    assert!(*c >= r, "{id}: {r} above the ceiling {c}");
                }
                for u in [mtok(1_000_000, 0), mtok(0, 1_000_000), mtok(300_000, 5_000)] {
                    assert!(t.cost(Some("claude-opus-9"), false, &u) >= t.cost(Some(id), false, &u), "{id}");
                }
            }
        }
        assert!(close(t.price("claude-opus-9").rates.output, 75.0));
        assert!(!t.price("claude-opus-4-1-2025").known, "no prefix matching");
    }

    #[test]
    fn the_table_round_trips_yaml_and_json_and_refuses_nonsense() {
        let t = PriceTable::list();
        let yaml = t.to_yaml().unwrap();
        assert_eq!(PriceTable::from_yaml(&yaml).unwrap(), t);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(PriceTable::from_json(&json).unwrap(), t);
        let bad = yaml.replacen("input: 8.0", "input: -8.0", 1);
        assert!(PriceTable::from_yaml(&bad).unwrap_err().to_string().contains("models[0]"));
        let twice = json.replacen("claude-mythos-5-2", "claude-fable-5-2", 1);
        assert!(PriceTable::from_json(&twice).unwrap_err().to_string().contains("priced twice"));
        assert!(
            PriceTable::from_yaml("source: x\nmodels: []\nserver_tools: {web_search: 0.01, web_fetch: 0, extra: 1}\n")
                .is_err()
        );
    }
}
