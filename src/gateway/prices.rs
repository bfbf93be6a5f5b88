//! The price list: the one place that prices tokens. The gateway prices what it meters and
//! holds each request's worst case against a budget with it; the agent's stream uses it only
//! until the CLI reports its own cost (a run stopped by timeout or cancel).

use crate::api::Usage;

/// List-price estimate (USD per million tokens by model family): Haiku $1/$5, Sonnet $3/$15,
/// anything else Opus's $5/$25; cache reads at a tenth of the input price, cache writes at 1.25×.
pub fn estimate_cost(model: Option<&str>, u: &Usage) -> f64 {
    let model = model.unwrap_or_default();
    let (input, output) = if model.contains("haiku") {
        (1.0, 5.0)
    } else if model.contains("sonnet") {
        (3.0, 15.0)
    } else {
        (5.0, 25.0)
    };
    (u.input_tokens as f64 * input
        + u.output_tokens as f64 * output
        + u.cache_read_input_tokens as f64 * input * 0.1
        + u.cache_creation_input_tokens as f64 * input * 1.25)
        / 1_000_000.0
}
