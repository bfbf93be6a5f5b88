//! The model gateway against the scripted Messages API: the agent's token is checked, the real
//! key is added, streaming is relayed, usage is counted exactly (also across a failed attempt),
//! and a token is worthless for another gateway and once its run is over.

mod support;

use agentops::gateway::Gateway;
use serde_json::json;
use support::{API_KEY, FakeAnthropic, Step};

async fn ask(base: &str, token: &str) -> reqwest::Result<reqwest::Response> {
    // Tools make it a "main" request, which the scripted server answers from its script.
    let body = json!({"model": "claude-test", "max_tokens": 64, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "Write", "input_schema": {"type": "object"}}]});
    reqwest::Client::new().post(format!("{base}/v1/messages")).header("x-api-key", token).json(&body).send().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_with_the_real_key_and_counts_exactly() {
    let model = FakeAnthropic::start(vec![
        Step::Error(500),
        Step::text("hello").with_usage([120, 40, 10, 5]),
        Step::text("again").with_usage([200, 7, 0, 0]),
    ])
    .await;
    let gw = Gateway::start(&model.base_url, API_KEY).await.unwrap();
    assert!(!gw.token.contains(API_KEY));

    // Not its token: refused before anything reaches the model.
    let wrong = ask(&gw.base_url, API_KEY).await.unwrap();
    assert_eq!(wrong.status(), 401, "not even the real key works here");
    assert!(model.seen().is_empty());

    // A 5xx, then two answers streamed through: usage is what the model said, exactly.
    assert_eq!(ask(&gw.base_url, &gw.token).await.unwrap().status(), 500);
    let ok = ask(&gw.base_url, &gw.token).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = ok.text().await.unwrap();
    assert!(text.contains("message_start") && text.contains("hello"), "the stream intact: {text}");
    ask(&gw.base_url, &gw.token).await.unwrap().text().await.unwrap();
    let m = gw.metered();
    assert_eq!(m.responses, 3);
    let u = m.usage;
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens),
        (320, 47, 10, 5)
    );
    assert!(model.seen().iter().all(|s| s.api_key.as_deref() == Some(API_KEY)), "the model got the real key");

    // Another execution's gateway token does not work here, and after close nothing does.
    let other = Gateway::start(&model.base_url, API_KEY).await.unwrap();
    assert_eq!(ask(&gw.base_url, &other.token).await.unwrap().status(), 401);
    gw.close();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(ask(&gw.base_url, &gw.token).await.is_err(), "the run is over: nothing listens");
}
