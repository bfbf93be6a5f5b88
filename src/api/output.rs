//! The agent's structured output, judged against `spec.agent.outputSchema`. The CLI validates
//! it too; we do it again because the status is our word, not the agent's.

use serde_json::Value;

use super::{Reason, limits};

/// The output to keep, or why the run fails (`InvalidOutput`, `OutputTooLarge`) and a message
/// naming the first schema error.
pub fn judge_output(schema: &Value, output: Option<&Value>) -> Result<Value, (Reason, String)> {
    let Some(output) = output else {
        return Err((
            Reason::InvalidOutput,
            "the agent ended without the structured output spec.agent.outputSchema asks for".into(),
        ));
    };
    let size = output.to_string().len();
    if size > limits::MAX_OUTPUT_BYTES {
        return Err((
            Reason::OutputTooLarge,
            format!(
                "the agent's structured output is {size} bytes as JSON; at most {} (ask for less in spec.agent.outputSchema)",
                limits::MAX_OUTPUT_BYTES
            ),
        ));
    }
    let validator = jsonschema::validator_for(schema)
        .map_err(|e| (Reason::InvalidOutput, format!("spec.agent.outputSchema is not a valid JSON Schema: {e}")))?;
    if let Some(e) = validator.iter_errors(output).next() {
        let at = e.instance_path().to_string();
        let at = if at.is_empty() { "the top level".to_string() } else { at };
        return Err((
            Reason::InvalidOutput,
            format!("the agent's structured output does not follow spec.agent.outputSchema: at {at}: {e}"),
        ));
    }
    Ok(output.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_output_is_kept_and_the_rest_say_why() {
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
        assert_eq!(judge_output(&schema, Some(&json!({"n": 1}))), Ok(json!({"n": 1})));
        let (r, m) = judge_output(&schema, Some(&json!({"n": "one"}))).unwrap_err();
        assert_eq!(r, Reason::InvalidOutput);
        assert!(m.contains("/n") && m.contains("integer"), "{m}");
        let (r, m) = judge_output(&schema, Some(&json!({}))).unwrap_err();
        assert!(r == Reason::InvalidOutput && m.contains("\"n\""), "{m}");
        assert_eq!(judge_output(&schema, None).unwrap_err().0, Reason::InvalidOutput);
        let big = json!({"n": 1, "pad": "x".repeat(20_000)});
        assert_eq!(judge_output(&schema, Some(&big)).unwrap_err().0, Reason::OutputTooLarge);
    }
}
