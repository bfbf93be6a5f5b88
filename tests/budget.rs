//! Team budgets (`AgentBudget`) held live by the controller's gateway: three executions of one
//! namespace spend concurrently against the scripted model and their sum never passes the
//! budget; a fourth waits `Queued`/`BudgetExhausted` until the period resets (an injectable
//! clock, no sleeps for time to pass); a restarted controller keeps the spend (the store); the
//! status, the gauges and the 80 % Event say so.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use agentops::api::{AgentBudget, AgentExecution};
use agentops::controller::budgets::Clock;
use agentops::gateway::{Account, Pool, TEAM_BUDGET_SPENT};
use agentops::store::Store;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::cluster::{model_token, namespace, start, until};
use support::kube_api::FakeKube;

const AX: &str = "apis/agentops.dev/v1alpha1";
const BATCH: &str = "apis/batch/v1";

fn execution(name: &str) -> AgentExecution {
    serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution",
        "metadata": {"name": name},
        "spec": {"prompt": "do it", "timeout": "1h",
                 "repository": {"url": "https://git.example.com/r.git", "credentialsSecretRef": {"name": "git-cred"}},
                 "agent": {"model": "claude-sonnet-4-6", "apiKeySecretRef": {"name": "anthropic"}}}
    }))
    .unwrap()
}

/// ~90,000 tokens of prompt: the gateway holds ~$0.60 for it (1 token per byte at the dearest
/// input rate, plus 4,096 output tokens), and the scripted model bills $0.285 (90,000 input and
/// 1,000 output tokens of claude-sonnet-4-6): every answer costs less than its hold, as a real
/// one does.
fn big_request() -> Value {
    json!({"model": "claude-sonnet-4-6", "max_tokens": 4096, "stream": true,
           "messages": [{"role": "user", "content": "x".repeat(90_000)}],
           "tools": [{"name": "Write", "input_schema": {"type": "object"}}]})
}

const PER_ANSWER: f64 = 90_000.0 * 3.0 / 1e6 + 1_000.0 * 15.0 / 1e6;

/// ~4,000 tokens of prompt, billed 4,000 input and 100 output tokens.
fn small_request() -> Value {
    json!({"model": "claude-sonnet-4-6", "max_tokens": 4096, "stream": true,
           "messages": [{"role": "user", "content": "x".repeat(4_000)}],
           "tools": [{"name": "Write", "input_schema": {"type": "object"}}]})
}

fn small_answer() -> support::Step {
    support::Step::text("ok").with_usage([4_000, 100, 0, 0])
}

const PER_SMALL: f64 = 4_000.0 * 3.0 / 1e6 + 100.0 * 15.0 / 1e6;

async fn ask(base: &str, ns: &str, name: &str, token: &str) -> (u16, String) {
    ask_with(base, ns, name, token, &big_request()).await
}

async fn ask_with(base: &str, ns: &str, name: &str, token: &str, body: &Value) -> (u16, String) {
    let r = support::http()
        .post(format!("{base}/gateway/{ns}/{name}/v1/messages"))
        .header("x-api-key", token)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn budget_status(kube: &FakeKube) -> Option<Value> {
    let b = kube
        .get(AX, "agentbudgets", "", "pay-daily")
        .or_else(|| kube.get(AX, "agentbudgets", "default", "pay-daily"))?;
    Some(b["status"].clone())
}

/// The whole story against the real controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_budget_holds_concurrent_executions_queues_survives_a_restart_and_resets() {
    let answer = support::Step::text("ok").with_usage([90_000, 1_000, 0, 0]);
    let model = support::FakeAnthropic::start(vec![answer; 64]).await;
    let kube = FakeKube::start().await;
    namespace(&kube, "pay", json!({})).await;
    namespace(&kube, "web", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("controller.db")).await.unwrap();
    // 2026-12-06T12:00:00Z, moved by the test.
    let now = Arc::new(AtomicI64::new(1_796_558_400));
    let clock = {
        let now = now.clone();
        Clock::new(move || jiff::Timestamp::from_second(now.load(Ordering::Relaxed)).unwrap())
    };
    let limit = 2.0;
    let budget: AgentBudget = serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentBudget", "metadata": {"name": "pay-daily"},
        "spec": {"namespaces": ["pay"], "limitUsd": limit, "period": "day", "timeZone": "UTC"}
    }))
    .unwrap();
    Api::<AgentBudget>::all(kube.client()).create(&PostParams::default(), &budget).await.unwrap();
    let (ctl, base) = start(&kube, Some(&model.base_url), Some(store.clone()), clock.clone()).await;
    let pay: Api<AgentExecution> = Api::namespaced(kube.client(), "pay");
    let names = ["a", "b", "c"];
    for n in names {
        pay.create(&PostParams::default(), &execution(n)).await.unwrap();
    }
    for n in names {
        until("Running", || (kube.get(AX, "agentexecutions", "pay", n)?["status"]["phase"] == "Running").then_some(()))
            .await;
    }
    let tokens: Vec<String> = names.iter().map(|n| model_token(&kube, "pay", n)).collect();

    // Three executions, four requests each, all at once.
    let mut tasks = Vec::new();
    for (i, n) in names.iter().enumerate() {
        for _ in 0..4 {
            let (base, n, t) = (base.clone(), n.to_string(), tokens[i].clone());
            tasks.push(tokio::spawn(async move { ask(&base, "pay", &n, &t).await }));
        }
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        match status {
            200 => ok += 1,
            400 => {
                assert!(text.contains(TEAM_BUDGET_SPENT) && text.contains("pay-daily"), "{text}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert!(refused > 0 && ok > 0, "{ok} answered, {refused} refused");
    // Refused for the holds of the others in flight, not for want of money: one at a time, the
    // executions spend on until a big request cannot be paid; that leaves room for small ones,
    // so the budget is not exhausted yet.
    loop {
        let (status, text) = ask(&base, "pay", "b", &tokens[1]).await;
        if status != 200 {
            assert!(text.contains(TEAM_BUDGET_SPENT), "{text}");
            break;
        }
        ok += 1;
    }
    let mut spent = ok as f64 * PER_ANSWER;
    pay.create(&PostParams::default(), &execution("early")).await.unwrap();
    until("early's Job: the budget has room for small requests", || kube.get(BATCH, "jobs", "pay", "agentops-early"))
        .await;
    // Small requests until not even one fits: now it is exhausted.
    model.set_script(vec![small_answer(); 200]);
    let mut small = 0;
    loop {
        let (status, text) = ask_with(&base, "pay", "c", &tokens[2], &small_request()).await;
        if status != 200 {
            assert!(text.contains(TEAM_BUDGET_SPENT), "{text}");
            break;
        }
        small += 1;
        assert!(small < 200, "the budget never ran out");
    }
    assert!(small > 0);
    spent += small as f64 * PER_SMALL;
    let ok = ok + small;
    assert_eq!(model.main_requests(), ok, "refused requests never reached the model");
    assert!(spent <= limit, "the sum spent ({spent}) never passes the budget ({limit})");
    // The budget's status and each execution's status agree with the model's bill.
    let st = until("the budget's spend in its status", || {
        let st = budget_status(&kube)?;
        ((st["spentUsd"].as_f64()? - spent).abs() < 1e-6).then_some(st)
    })
    .await;
    assert_eq!(st["limitUsd"], limit);
    assert_eq!(st["resetsAt"], "2026-12-07T00:00:00+00:00");
    // The gauges say the same.
    let metrics = support::http().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let gauge = |name: &str| -> f64 {
        let prefix = format!("{name}{{budget=\"pay-daily\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{prefix}: {metrics}"));
        line[prefix.len()..].trim().parse().unwrap()
    };
    assert!((gauge("agentops_team_budget_spent_usd") - spent).abs() < 1e-6);
    assert_eq!(gauge("agentops_team_budget_limit_usd"), limit);
    assert_eq!(gauge("agentops_team_budget_resets_at_seconds"), 1_796_601_600.0);
    assert_eq!(st["running"], 4, "a, b, c and early");
    let sum = until("the executions' costs", || {
        let sum: f64 = names
            .iter()
            .map(|n| {
                kube.get(AX, "agentexecutions", "pay", n).and_then(|a| a["status"]["costUsd"].as_f64()).unwrap_or(0.0)
            })
            .sum();
        ((sum - spent).abs() < 1e-6).then_some(sum)
    })
    .await;
    assert!(sum <= limit);
    // 80 %: one warning Event about the budget.
    if spent >= 0.8 * limit {
        let events = until("the 80 % Event", || {
            let e: Vec<Value> = kube
                .list("apis/events.k8s.io/v1", "events", "default")
                .into_iter()
                .filter(|e| e["reason"] == "BudgetAlmostSpent")
                .collect();
            (!e.is_empty()).then_some(e)
        })
        .await;
        assert_eq!(events[0]["type"], "Warning");
        assert_eq!(events[0]["regarding"]["kind"], "AgentBudget");
    }

    // A fourth execution waits, saying when the budget resets; another namespace is not held.
    pay.create(&PostParams::default(), &execution("d")).await.unwrap();
    let st = until("d Queued", || {
        let ax = kube.get(AX, "agentexecutions", "pay", "d")?;
        (ax["status"]["reason"] == "BudgetExhausted").then(|| ax["status"].clone())
    })
    .await;
    assert_eq!(st["phase"], "Queued");
    let message = st["message"].as_str().unwrap();
    assert!(message.contains("pay-daily") && message.contains("resets at 2026-12-07T00:00:00+00:00"), "{message}");
    assert!(kube.get(BATCH, "jobs", "pay", "agentops-d").is_none());
    Api::<AgentExecution>::namespaced(kube.client(), "web")
        .create(&PostParams::default(), &execution("w"))
        .await
        .unwrap();
    until("web's Job", || kube.get(BATCH, "jobs", "web", "agentops-w")).await;

    // A restart keeps the spend: the new controller refuses the next request and keeps d waiting.
    ctl.stop().await;
    let (kept, exhausted) = store.budget_spent("pay-daily", "2026-12-06T00:00:00Z").await.unwrap().unwrap();
    assert!((kept - spent).abs() < 1e-9 && exhausted, "{kept} {exhausted}");
    let (ctl, base) = start(&kube, Some(&model.base_url), Some(store.clone()), clock.clone()).await;
    let (status, text) = ask(&base, "pay", "a", &tokens[0]).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains(TEAM_BUDGET_SPENT), "{text}");
    assert_eq!(model.main_requests(), ok);
    tokio::time::sleep(Duration::from_millis(500)).await; // two rechecks of d
    assert!(kube.get(BATCH, "jobs", "pay", "agentops-d").is_none(), "d still waits after the restart");

    // The next day: the period resets, d starts by itself, and a running execution may spend again.
    now.store(1_796_601_600 + 60, Ordering::Relaxed); // 2026-12-07T00:01:00Z
    until("d's Job after the reset", || kube.get(BATCH, "jobs", "pay", "agentops-d")).await;
    let st = until("the new period in the status", || {
        let st = budget_status(&kube)?;
        (st["resetsAt"] == "2026-12-08T00:00:00+00:00").then_some(st)
    })
    .await;
    assert_eq!(st["spentUsd"], 0.0);
    let (status, text) = ask(&base, "pay", "a", &tokens[0]).await;
    assert_eq!(status, 200, "{text}");
    ctl.stop().await;
}

/// The gateway alone: accounts of one pool, many concurrent requests each, against a budget
/// several times smaller than what they ask for. The pool's spend never passes its limit, and
/// it counts exactly what the accounts counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_never_overshoots_under_concurrency() {
    let answer = support::Step::text("ok").with_usage([90_000, 1_000, 0, 0]);
    let model = support::FakeAnthropic::start(vec![answer; 200]).await;
    let gateways = Arc::new(agentops::gateway::Gateways::new(&model.base_url).unwrap());
    let pool = Arc::new(Pool::new("team", 3.0, "p", 0.0));
    let names: Vec<String> = (0..5).map(|i| format!("x{i}")).collect();
    for n in &names {
        gateways.open(
            "ns",
            n,
            Account::new(support::API_KEY, &format!("tok-{n}"), None).with_pools(vec![pool.clone()]),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = gateways.clone().router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut tasks = Vec::new();
    for n in &names {
        for _ in 0..8 {
            let (base, n) = (base.clone(), n.clone());
            tasks.push(tokio::spawn(async move { ask(&base, "ns", &n, &format!("tok-{n}")).await }));
        }
    }
    let mut ok = 0usize;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        if status == 200 {
            ok += 1;
        } else {
            assert!(text.contains(TEAM_BUDGET_SPENT), "{status} {text}");
        }
    }
    // Refused under the holds of the others, or for a big request: not exhausted, as long as a
    // small request still fits.
    assert!(!pool.books().exhausted, "{:?}", pool.books());
    let mut small = 0usize;
    model.set_script(vec![small_answer(); 400]);
    loop {
        let (status, text) = ask_with(&base, "ns", "x0", "tok-x0", &small_request()).await;
        if status != 200 {
            assert!(text.contains(TEAM_BUDGET_SPENT), "{text}");
            break;
        }
        small += 1;
    }
    let books = pool.books();
    let counted: f64 = names.iter().map(|n| gateways.metered("ns", n).unwrap().cost_usd).sum();
    assert!((books.spent_usd - counted).abs() < 1e-9, "{books:?} vs {counted}");
    assert!((books.spent_usd - (ok as f64 * PER_ANSWER + small as f64 * PER_SMALL)).abs() < 1e-9);
    assert!(books.spent_usd <= 3.0, "{books:?}");
    assert!(ok >= 4, "the budget was used, not refused early: {ok} answered, {books:?}");
    assert_eq!(books.reserved_usd, 0.0, "every hold released");
    assert!(books.refused > 0 && books.exhausted);
}

/// A budget created while an execution runs holds that execution's next request; deleted, it
/// lets it go again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_created_mid_run_holds_the_running_execution() {
    let answer = support::Step::text("ok").with_usage([90_000, 1_000, 0, 0]);
    let model = support::FakeAnthropic::start(vec![answer; 8]).await;
    let kube = FakeKube::start().await;
    namespace(&kube, "late", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("controller.db")).await.unwrap();
    let (ctl, base) = start(&kube, Some(&model.base_url), Some(store), Clock::default()).await;
    let api: Api<AgentExecution> = Api::namespaced(kube.client(), "late");
    api.create(&PostParams::default(), &execution("r")).await.unwrap();
    until("Running", || (kube.get(AX, "agentexecutions", "late", "r")?["status"]["phase"] == "Running").then_some(()))
        .await;
    let token = model_token(&kube, "late", "r");
    assert_eq!(ask(&base, "late", "r", &token).await.0, 200, "no budget yet");
    // $0.50: less than one request's worst case (~$0.66).
    let budget: AgentBudget = serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentBudget", "metadata": {"name": "late-budget"},
        "spec": {"namespaces": ["late"], "limitUsd": 0.5, "period": "week"}
    }))
    .unwrap();
    let budgets: Api<AgentBudget> = Api::all(kube.client());
    budgets.create(&PostParams::default(), &budget).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = ask(&base, "late", "r", &token).await;
        if status == 400 {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "the new budget never held the running execution");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(text.contains(TEAM_BUDGET_SPENT) && text.contains("late-budget"), "{text}");
    budgets.delete("late-budget", &Default::default()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ask(&base, "late", "r", &token).await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "the deleted budget still held it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctl.stop().await;
}

/// End to end with the real CLI: an agent whose model requests go through a controller gateway
/// whose team budget is spent stops `Failed`/`BudgetExhausted`, saying so, and nothing is
/// pushed. (One machine's run relays through its own gateway to the controller's route, with
/// the account's token as its key: the same refusal a runner pod's agent gets.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stops_budget_exhausted_when_its_team_budget_is_spent() {
    use agentops::api::Phase;
    use agentops::gateway::Gateways;
    let h = support::Harness::new(vec![
        support::Step::tool("Write", json!({"file_path": "work.txt", "content": "done\n"})),
        support::Step::text("Wrote work.txt."),
    ])
    .await;
    let gateways = Arc::new(Gateways::new(&h.model.base_url).unwrap());
    // $0.01: less than any request of the CLI's can cost.
    let pool = Arc::new(Pool::new("payments-monthly", 0.01, "p", 0.0));
    gateways.open("pay", "x", Account::new(support::API_KEY, "team-token", None).with_pools(vec![pool.clone()]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/gateway/pay/x", listener.local_addr().unwrap());
    let app = gateways.clone().router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    support::write_secret(&h.opts.secrets_dir, "anthropic", "api-key", "team-token");
    let env = move |k: &str| match k {
        "ANTHROPIC_BASE_URL" => Some(base.clone()),
        "CLAUDE_CODE_MAX_RETRIES" => Some("0".into()),
        "ANTHROPIC_API_KEY" => None,
        other => std::env::var(other).ok(),
    };
    let r = h.resolved(&h.manifest("teamspent", "    model: claude-sonnet-4-6\n"));
    let s = agentops::runner::run_execution(&h.store, &h.opts, &r, &env, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("BudgetExhausted")), "{s:#?}");
    let message = s.message.clone().unwrap_or_default();
    assert!(message.contains("team budget") && message.contains("payments-monthly"), "{message}");
    assert!(!s.git.pushed, "nothing pushed");
    assert_eq!(h.model.main_requests(), 0, "the refused request never reached the model");
    assert!(pool.books().refused > 0 && pool.books().exhausted);
}

/// `maxTurns` binds an agent that calls the gateway itself, not only the CLI: past the backstop
/// (twice the turns and ten more: subagents' and side requests count at the gateway) every
/// request is refused with words the runner maps to `MaxTurns`, and never reaches the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_calling_the_gateway_itself_stops_at_the_turn_backstop() {
    let model = support::FakeAnthropic::start(vec![small_answer(); 40]).await;
    let gateways = Arc::new(agentops::gateway::Gateways::new(&model.base_url).unwrap());
    gateways.open("ns", "t", Account::new(support::API_KEY, "tok-t", None).with_max_turns(Some(3)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = gateways.clone().router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let backstop = agentops::gateway::turn_backstop(3);
    assert_eq!(backstop, 16);
    for i in 0..backstop {
        let (status, text) = ask_with(&base, "ns", "t", "tok-t", &small_request()).await;
        assert_eq!(status, 200, "answer {i}: {text}");
    }
    let (status, text) = ask_with(&base, "ns", "t", "tok-t", &small_request()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains(agentops::gateway::TURNS_SPENT), "{text}");
    assert_eq!(model.main_requests() as u64, backstop, "the refused request never reached the model");
}
