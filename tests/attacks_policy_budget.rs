//! Attack tests (security review of AgentPolicy / AgentBudget) against the real controller and
//! its gateway, driven like `tests/budget.rs`. Each `attack_*` test asserts the secure behaviour
//! (it failed while the hole existed, before the fix).

mod support;

use std::time::Duration;

use agentops::api::{AgentBudget, AgentExecution, AgentPolicy};
use agentops::controller::budgets::Clock;
use agentops::store::Store;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::cluster::{model_token, namespace, secrets, start, until};
use support::kube_api::FakeKube;

const AX: &str = "apis/agentops.dev/v1alpha1";
const BATCH: &str = "apis/batch/v1";

fn execution(name: &str, agent: Value) -> AgentExecution {
    let mut a = json!({"model": "claude-sonnet-4-6", "apiKeySecretRef": {"name": "anthropic"}});
    for (k, v) in agent.as_object().unwrap() {
        a[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution",
        "metadata": {"name": name},
        "spec": {"prompt": "do it", "timeout": "1h",
                 "repository": {"url": "https://git.example.com/r.git", "credentialsSecretRef": {"name": "git-cred"}},
                 "agent": a}
    }))
    .unwrap()
}

fn request(model: &str) -> Value {
    json!({"model": model, "max_tokens": 4096, "stream": true,
           "messages": [{"role": "user", "content": "x".repeat(90_000)}],
           "tools": [{"name": "Write", "input_schema": {"type": "object"}}]})
}

async fn ask(base: &str, ns: &str, name: &str, token: &str, model: &str) -> (u16, String) {
    let r = support::http()
        .post(format!("{base}/gateway/{ns}/{name}/v1/messages"))
        .header("x-api-key", token)
        .json(&request(model))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn running(kube: &FakeKube, ns: &str, name: &str) {
    until(&format!("{ns}/{name} Running"), || {
        (kube.get(AX, "agentexecutions", ns, name)?["status"]["phase"] == "Running").then_some(())
    })
    .await;
}

/// The policy's model list binds the agent at the gateway... until the controller restarts (or
/// leadership moves): the reopened account is built from `resolve` after `policy::freeze`,
/// which restores the model but not `status.policy.models`, so `with_models(None)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_restarted_controller_forgets_the_gateways_model_list() {
    let answer = support::Step::text("ok").with_usage([1_000, 100, 0, 0]);
    let model = support::FakeAnthropic::start(vec![answer; 16]).await;
    let kube = FakeKube::start().await;
    namespace(&kube, "pay", json!({"team": "payments"})).await;
    let p: AgentPolicy = serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "pci"},
        "spec": {"allowed": {"models": ["claude-sonnet-4-6"]}}
    }))
    .unwrap();
    Api::<AgentPolicy>::all(kube.client()).create(&PostParams::default(), &p).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("controller.db")).await.unwrap();
    let (ctl, base) = start(&kube, Some(&model.base_url), Some(store.clone()), Clock::default()).await;
    Api::<AgentExecution>::namespaced(kube.client(), "pay")
        .create(&PostParams::default(), &execution("a", json!({})))
        .await
        .unwrap();
    running(&kube, "pay", "a").await;
    let t = model_token(&kube, "pay", "a");
    assert_eq!(ask(&base, "pay", "a", &t, "claude-sonnet-4-6").await.0, 200);
    // A hostile model name: refused (403), and its Event carries no escape sequence.
    let (status, _) = ask(&base, "pay", "a", &t, "claude-opus-4-1\n\u{1b}]52;c;ZXZpbA==\u{7}\u{1b}[2K").await;
    assert_eq!(status, 403, "before the restart the list holds");
    let ev = until("GatewayRefused event", || {
        kube.list("apis/events.k8s.io/v1", "events", "pay").into_iter().find(|e| e["reason"] == "GatewayRefused")
    })
    .await;
    assert!(!ev["note"].as_str().unwrap().contains('\u{1b}'), "{ev}");
    let before = model.main_requests();

    ctl.stop().await;
    let (ctl, base) = start(&kube, Some(&model.base_url), Some(store.clone()), Clock::default()).await;
    let (status, text) = ask(&base, "pay", "a", &t, "claude-opus-4-1").await;
    let relayed = model.main_requests() - before;
    ctl.stop().await;
    assert_eq!(
        (status, relayed),
        (403, 0),
        "after a restart the gateway relayed a model the AgentPolicy forbids: {status} {text}"
    );
}

/// Policies and budgets selecting by label fail OPEN for a namespace the controller's Namespace
/// cache does not know (yet): `labels_of` gives it only its name label, so a selector-based
/// PCI policy and team budget skip it. In a cluster this is the window between a Namespace's
/// creation (or relabelling) and the controller's watch seeing it; GitOps applies the
/// Namespace and the execution together. Here the Namespace object never arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_namespace_not_yet_in_the_cache_escapes_selector_policies_and_budgets() {
    let model = support::FakeAnthropic::start(vec![support::Step::text("ok"); 4]).await;
    let kube = FakeKube::start().await;
    namespace(&kube, "other", json!({"team": "web"})).await; // so the caches are not empty
    secrets(&kube, "pay").await; // the namespace "pay" (team=payments) is not in the cache yet
    let p: AgentPolicy = serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "pci"},
        "spec": {"namespaceSelector": {"matchLabels": {"team": "payments"}},
                 "maximums": {"maxBudgetUsd": 1},
                 "allowed": {"models": ["claude-haiku-4-5"]}}
    }))
    .unwrap();
    Api::<AgentPolicy>::all(kube.client()).create(&PostParams::default(), &p).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("controller.db")).await.unwrap();
    let (ctl, _base) = start(&kube, Some(&model.base_url), Some(store), Clock::default()).await;
    Api::<AgentExecution>::namespaced(kube.client(), "pay")
        .create(&PostParams::default(), &execution("big", json!({"model": "claude-opus-4-1", "maxBudgetUsd": 5000.0})))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = kube.get(BATCH, "jobs", "pay", "agentops-big");
    let st = kube.get(AX, "agentexecutions", "pay", "big").map(|a| a["status"].clone());
    ctl.stop().await;
    assert!(
        job.is_none(),
        "an opus execution with a $5000 budget started in a namespace the PCI policy selects by label (the cache did not know it): {st:?}"
    );
}

/// Deleting an AgentBudget and creating it again with the same name (GitOps replace, a Helm
/// reinstall, `kubectl replace --force`) gives the pool a fresh spend of $0 for the SAME period:
/// the budget task remembers it `loaded` the period already and never reads the store's figure
/// again, and the new object has no status. The team spends its whole limit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_budget_deleted_and_recreated_starts_the_period_again_at_zero() {
    let answer = support::Step::text("ok").with_usage([90_000, 1_000, 0, 0]);
    let model = support::FakeAnthropic::start(vec![answer; 32]).await;
    let kube = FakeKube::start().await;
    namespace(&kube, "pay", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("controller.db")).await.unwrap();
    let budget = || -> AgentBudget {
        serde_json::from_value(json!({
            "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentBudget", "metadata": {"name": "pay-daily"},
            "spec": {"namespaces": ["pay"], "limitUsd": 1.5, "period": "day"}
        }))
        .unwrap()
    };
    let budgets: Api<AgentBudget> = Api::all(kube.client());
    budgets.create(&PostParams::default(), &budget()).await.unwrap();
    let (ctl, base) = start(&kube, Some(&model.base_url), Some(store.clone()), Clock::default()).await;
    Api::<AgentExecution>::namespaced(kube.client(), "pay")
        .create(&PostParams::default(), &execution("a", json!({})))
        .await
        .unwrap();
    running(&kube, "pay", "a").await;
    let t = model_token(&kube, "pay", "a");
    let mut ok = 0;
    while ask(&base, "pay", "a", &t, "claude-sonnet-4-6").await.0 == 200 {
        ok += 1;
        assert!(ok < 10);
    }
    let first = model.main_requests();
    tokio::time::sleep(Duration::from_millis(600)).await; // the store and status written
    budgets.delete("pay-daily", &Default::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await; // the task sees it gone
    budgets.create(&PostParams::default(), &budget()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await; // and back, re-aimed at the account
    let mut again = 0;
    while ask(&base, "pay", "a", &t, "claude-sonnet-4-6").await.0 == 200 {
        again += 1;
        if again >= 10 {
            break;
        }
    }
    let spent = model.main_requests() as f64 * (90_000.0 * 3.0 / 1e6 + 1_000.0 * 15.0 / 1e6);
    let status = kube.get(AX, "agentbudgets", "", "pay-daily").map(|b| b["status"].clone());
    let stored = store
        .budget_spent(
            "pay-daily",
            &jiff::Timestamp::now()
                .to_zoned(jiff::tz::TimeZone::UTC)
                .date()
                .to_zoned(jiff::tz::TimeZone::UTC)
                .unwrap()
                .timestamp()
                .to_string(),
        )
        .await;
    ctl.stop().await;
    assert_eq!(
        again, 0,
        "after delete+recreate the same day's budget paid {again} more requests ({first} before): ${spent:.3} spent against a $1.50 limit; status {status:?}, store {stored:?}"
    );
}

/// One request of a prompt-injected agent marks its whole team's budget `exhausted` (new
/// executions of every covered namespace wait Queued/BudgetExhausted until the period resets,
/// and the flag is stored) while almost all of it is left: "a pool that cannot pay it even
/// alone" is judged by the refused request's OWN worst case, which the agent chooses (a
/// document by URL is held at the model's whole 1M context window: ~$6 on claude-sonnet-4-6,
/// more with fast mode on a model that has it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_one_hostile_request_marks_the_team_budget_exhausted() {
    use agentops::gateway::{Account, Pool};
    use std::sync::Arc;
    let model = support::FakeAnthropic::start(vec![support::Step::text("ok"); 4]).await;
    let gateways = Arc::new(agentops::gateway::Gateways::new(&model.base_url).unwrap());
    let pool = Arc::new(Pool::new("team", 5.0, "p", 0.0));
    gateways.open("ns", "evil", Account::new(support::API_KEY, "tok", None).with_pools(vec![pool.clone()]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = gateways.clone().router();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let body = json!({"model": "claude-sonnet-4-6", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "url", "url": "https://example.invalid/x.pdf"}},
        {"type": "text", "text": "hi"}]}]});
    let r = support::http()
        .post(format!("{base}/gateway/ns/evil/v1/messages"))
        .header("x-api-key", "tok")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, text) = (r.status().as_u16(), r.text().await.unwrap());
    server.abort();
    let books = pool.books();
    assert_eq!(status, 400, "{text}");
    assert!(
        !pool.exhausted(),
        "one refused request (its own worst case $6.00) marked a $5.00 team budget with $0.00 spent exhausted: {books:?}; {text}"
    );
}

/// Whether policies apply is decided from `status.agentConfigHash` ("started"): whoever can
/// write an execution's status (a tenant granted `agentops.dev/*`, a backup restored with
/// status, a second tool) turns every policy off for it, and it starts unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_status_with_an_agent_config_hash_skips_every_policy() {
    use kube::api::{Patch, PatchParams};
    let model = support::FakeAnthropic::start(vec![support::Step::text("ok"); 4]).await;
    let kube = FakeKube::start().await;
    namespace(&kube, "pay", json!({"team": "payments"})).await;
    let p: AgentPolicy = serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "pci"},
        "spec": {"maximums": {"maxBudgetUsd": 1}, "allowed": {"models": ["claude-haiku-4-5"]}}
    }))
    .unwrap();
    Api::<AgentPolicy>::all(kube.client()).create(&PostParams::default(), &p).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("controller.db")).await.unwrap();
    let (ctl, _base) = start(&kube, Some(&model.base_url), Some(store), Clock::default()).await;
    let api: Api<AgentExecution> = Api::namespaced(kube.client(), "pay");
    api.create(&PostParams::default(), &execution("big", json!({"model": "claude-opus-4-1", "maxBudgetUsd": 5000.0})))
        .await
        .unwrap();
    until("refused", || {
        (kube.get(AX, "agentexecutions", "pay", "big")?["status"]["reason"] == "InvalidSpec").then_some(())
    })
    .await;
    let patch = json!({"status": {"agentConfigHash": "0"}});
    api.patch_status("big", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = kube.get(BATCH, "jobs", "pay", "agentops-big");
    let st = kube.get(AX, "agentexecutions", "pay", "big").map(|a| a["status"]["phase"].clone());
    ctl.stop().await;
    assert!(job.is_none(), "a refused opus/$5000 execution started once its status claimed a config hash: {st:?}");
}

/// What held at the gateway: a model list refuses case, whitespace and look-alike names,
/// count_tokens naming another model, a `model` key twice (also spelled with a JSON escape),
/// a non-string model, batches and other paths; nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_the_gateways_model_list_refuses_tricks() {
    use agentops::gateway::Account;
    use std::sync::Arc;
    let model = support::FakeAnthropic::start(vec![support::Step::text("ok"); 4]).await;
    let gateways = Arc::new(agentops::gateway::Gateways::new(&model.base_url).unwrap());
    let models = Some(vec!["pci\u{1f}claude-sonnet-4-6".to_string()]);
    gateways.open("ns", "a", Account::new(support::API_KEY, "tok", Some(5.0)).with_models(models));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = gateways.clone().router();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let msg = r#""max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]"#;
    let cases: Vec<(&str, String)> = vec![
        ("/v1/messages", format!(r#"{{"model": "claude-opus-4-1", {msg}}}"#)),
        ("/v1/messages", format!(r#"{{"model": "CLAUDE-SONNET-4-6", {msg}}}"#)),
        ("/v1/messages", format!(r#"{{"model": "claude-sonnet-4-6 ", {msg}}}"#)),
        ("/v1/messages", format!(r#"{{"model": "claude-sonnet-4-6", "mod\u0065l": "claude-opus-4-1", {msg}}}"#)),
        ("/v1/messages", format!(r#"{{"model": "claude-opus-4-1", "model": "claude-sonnet-4-6", {msg}}}"#)),
        ("/v1/messages", format!(r#"{{"model": ["claude-sonnet-4-6"], {msg}}}"#)),
        ("/v1/messages?beta=true", format!("{{\"model\": \"claude-sonnet-4-6\\u0000x\", {msg}}}")),
        (
            "/v1/messages/count_tokens",
            r#"{"model": "claude-opus-4-1", "messages": [{"role": "user", "content": "hi"}]}"#.into(),
        ),
        (
            "/v1/messages/batches",
            format!(r#"{{"requests": [{{"custom_id": "x", "params": {{"model": "claude-opus-4-1", {msg}}}}}]}}"#),
        ),
        ("/v1/messages?beta=true&x=1", format!(r#"{{"model": "claude-sonnet-4-6", {msg}}}"#)),
        ("/v1/complete", r#"{"model": "claude-opus-4-1", "prompt": "x", "max_tokens_to_sample": 10}"#.into()),
    ];
    let mut relayed = Vec::new();
    for (path, body) in &cases {
        let r = support::http()
            .post(format!("{base}/gateway/ns/a{path}"))
            .header("x-api-key", "tok")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        if r.status().is_success() {
            relayed.push(format!("{path} {body}"));
        }
    }
    let upstream = model.seen().len();
    server.abort();
    assert!(relayed.is_empty() && upstream == 0, "relayed: {relayed:#?}; upstream saw {upstream}");
}
