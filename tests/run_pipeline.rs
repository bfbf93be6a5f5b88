//! The one-machine pipeline end to end: real git over smart HTTP, the real Claude Code CLI
//! against a scripted model, a real SQLite store.

mod support;

use std::time::Duration;

use agentops::api::Phase;
use serde_json::json;
use support::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_with_write_edit_bash_is_committed_and_pushed() {
    let h = Harness::new(happy_script()).await;
    let s = h.run(&h.manifest("happy", "")).await;
    assert_eq!(s.phase, Phase::Succeeded, "{s:#?}");
    assert_eq!(s.reason.as_deref(), Some("Completed"));

    // The remote has the branch at our commit, with the agent's work.
    let head = h.git.branch_head("demo", "agentops/happy").expect("branch pushed");
    assert_eq!(Some(&head), s.git.commit.as_ref());
    assert!(s.git.pushed);
    assert_eq!(h.git.show("demo", &head, "greeting.txt").as_deref(), Some("Hello, agentops!\n"));
    assert!(h.git.show("demo", &head, "README.md").unwrap().contains("Hello from the agent."));
    assert_eq!(h.git.show("demo", &head, "build.txt").as_deref(), Some("built\n"));
    assert_eq!(h.git.show("demo", &head, "src/lib.txt"), None, "deletions are committed too");
    // One commit on top of main, by the operator's author.
    let main = h.git.branch_head("demo", "main").unwrap();
    assert_eq!(h.git.git("demo", &["rev-parse", &format!("{head}^")]).trim(), main);
    assert_eq!(h.git.git("demo", &["log", "-1", "--format=%an <%ae>", &head]).trim(), "agentops <agentops@localhost>");
    assert_eq!((s.git.changed_files, s.git.deletions > 0), (4, true), "{:?}", s.git);

    // Usage and tool calls come from the agent's stream.
    assert_eq!(s.tool_calls.by_tool.get("Write"), Some(&1));
    assert_eq!(s.tool_calls.by_tool.get("Edit"), Some(&1));
    assert_eq!(s.tool_calls.by_tool.get("Bash"), Some(&1));
    assert_eq!(s.tool_calls.total, 4);
    assert!(s.usage.input_tokens >= 520 && s.usage.output_tokens >= 150, "{:?}", s.usage);
    assert_eq!(
        s.tokens_used,
        s.usage.input_tokens
            + s.usage.output_tokens
            + s.usage.cache_read_input_tokens
            + s.usage.cache_creation_input_tokens
    );
    assert!(s.cost_usd > 0.0);
    assert!(s.num_turns >= 5, "turns {}", s.num_turns);
    assert!(s.session_id.is_some());
    assert_eq!(s.result.as_deref(), Some("Added greeting.txt, edited README.md, built."));
    assert_eq!(h.model.remaining(), 0, "every scripted step was used");
    // The agent got the key from the secret, nothing else.
    assert!(h.model.seen().iter().all(|r| r.api_key.as_deref() == Some(API_KEY)));

    // The store agrees with the summary.
    let row = h.store.get_execution(&s.id).await.unwrap();
    assert_eq!(row.status, "Succeeded");
    assert_eq!(row.tokens_used as u64, s.tokens_used);
    assert_eq!(row.git_commit, s.git.commit);
    assert!(row.pushed);
    assert!(row.diff.as_deref().unwrap().contains("+Hello, agentops!"));
    let logs = h.store.logs(&s.id).await.unwrap();
    assert!(logs.iter().any(|l| l.source == "agent" && l.line.contains("\"type\":\"result\"")));
    // The workspace was removed (default retention) and its record says so.
    let ws = h.store.list_workspaces().await.unwrap();
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].status, "cleaned");
    assert!(ws[0].cleanup_at.is_some() && ws[0].completed_at.is_some());
    assert!(!std::path::Path::new(&ws[0].path).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_changes_means_no_commit_and_no_push() {
    let h = Harness::new(vec![Step::text("Nothing needs changing.")]).await;
    let s = h.run(&h.manifest("quiet", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Succeeded, Some("NoChanges")), "{s:#?}");
    assert_eq!(s.git.commit, None);
    assert!(!s.git.pushed);
    assert_eq!(h.git.branch_head("demo", "agentops/quiet"), None);
    assert_eq!(h.git.stats().receive_pack.load(std::sync::atomic::Ordering::Relaxed), 0, "no push attempted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_5xx_then_recovery_succeeds_and_counts_the_retry() {
    let mut script = vec![Step::Error(500)];
    script.extend(happy_script());
    let h = Harness::new(script).await;
    let s = h.run(&h.manifest("flaky", "")).await;
    assert_eq!(s.phase, Phase::Succeeded, "{s:#?}");
    assert!(s.api_retries >= 1, "retries {}", s.api_retries);
    assert!(h.git.branch_head("demo", "agentops/flaky").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_api_failure_fails_and_pushes_nothing() {
    let h = Harness::new(vec![Step::Error(500), Step::Error(500), Step::Error(500), Step::Error(500)]).await;
    let s = h.run(&h.manifest("down", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("ApiError")), "{s:#?}");
    assert!(s.message.as_deref().unwrap().contains("HTTP 500"), "{:?}", s.message);
    assert_eq!(h.git.branch_head("demo", "agentops/down"), None);
    let row = h.store.get_execution(&s.id).await.unwrap();
    assert_eq!(row.status, "Failed");
    assert!(row.error_message.unwrap().contains("500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_turns_stops_the_agent_and_pushes_nothing() {
    let h = Harness::new(happy_script()).await;
    let s = h
        .run(
            &h.manifest("short", "  timeout: 2m\n")
                .replace("apiKeySecretRef: {name: anthropic}", "apiKeySecretRef: {name: anthropic}\n    maxTurns: 2"),
        )
        .await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("MaxTurns")), "{s:#?}");
    assert!(s.tokens_used > 0, "usage of the turns taken is kept");
    assert_eq!(h.git.branch_head("demo", "agentops/short"), None);
    assert!(h.model.remaining() >= 2, "the agent stopped early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_a_hanging_agent_and_keeps_usage() {
    let h = Harness::new(vec![Step::tool("Write", json!({"file_path": "a.txt", "content": "a\n"})), Step::Hang]).await;
    let started = std::time::Instant::now();
    let s = h.run(&h.manifest("slow", "  timeout: 4s\n")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::TimedOut, Some("Timeout")), "{s:#?}");
    assert!(started.elapsed() < Duration::from_secs(12), "stopped promptly: {:?}", started.elapsed());
    assert!(s.tokens_used > 0 && s.cost_usd > 0.0, "partial usage kept: {s:?}");
    assert_eq!(s.tool_calls.total, 1);
    assert_eq!(h.git.branch_head("demo", "agentops/slow"), None);
    assert_eq!(h.store.get_execution(&s.id).await.unwrap().status, "TimedOut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_run_stops_within_seconds_and_keeps_partial_usage() {
    let h = Harness::new(vec![
        Step::tool("Write", json!({"file_path": "a.txt", "content": "a\n"})).with_usage([300, 50, 0, 0]),
        Step::Hang,
    ])
    .await;
    let cancel = CancellationToken::new();
    let run = {
        let yaml = h.manifest("stopme", "");
        let cancel = cancel.clone();
        let h = &h;
        async move { h.try_run(&yaml, cancel).await }
    };
    let trigger = async {
        assert!(h.model.wait_for_main_requests(2, Duration::from_secs(60)).await, "agent reached its second turn");
        // While the agent runs, the store already shows its usage (not only at the end).
        let live = loop {
            let rows = h.store.list_executions(1).await.unwrap();
            if rows.first().is_some_and(|r| r.tool_calls >= 1) {
                break rows.into_iter().next().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(live.status, "Running");
        assert!(live.input_tokens >= 300 && live.cost_usd > 0.0, "live usage: {live:?}");
        let at = std::time::Instant::now();
        cancel.cancel();
        at
    };
    let (s, cancelled_at) = tokio::join!(run, trigger);
    let s = s.unwrap();
    assert!(cancelled_at.elapsed() < Duration::from_secs(5), "stopped within 5 s: {:?}", cancelled_at.elapsed());
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Cancelled, Some("Cancelled")), "{s:#?}");
    assert!(s.usage.input_tokens >= 300, "partial usage kept: {:?}", s.usage);
    assert_eq!(s.tool_calls.total, 1);
    let row = h.store.get_execution(&s.id).await.unwrap();
    assert_eq!((row.status.as_str(), row.input_tokens >= 300), ("Cancelled", true));
    assert_eq!(h.git.branch_head("demo", "agentops/stopme"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_hook_veto_stops_before_the_agent() {
    let h = Harness::new(happy_script()).await;
    let hooks =
        "  hooks:\n    pre:\n      - name: policy\n        command: [sh, -c, 'echo vetoed by policy; exit 3']\n";
    let s = h.run(&h.manifest("veto", hooks)).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("PreHookRejected")), "{s:#?}");
    assert!(s.message.as_deref().unwrap().contains("policy"));
    assert_eq!(h.model.main_requests(), 0, "the agent never started");
    assert_eq!(h.git.branch_head("demo", "agentops/veto"), None);
    let logs = h.store.logs(&s.id).await.unwrap();
    assert!(logs.iter().any(|l| l.source == "hook:pre:policy" && l.line == "vetoed by policy"), "{logs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_git_token_fails_clearly_without_a_retry_storm() {
    let h = Harness::new(happy_script()).await;
    write_secret(&h.opts.secrets_dir, "git-cred", "token", "ghp_wrong");
    let s = h.run(&h.manifest("badtoken", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("CloneFailed")), "{s:#?}");
    let msg = s.message.unwrap();
    assert!(msg.contains("authentication") && msg.contains("credentialsSecretRef"), "{msg}");
    let unauthorized = h.git.stats().unauthorized.load(std::sync::atomic::Ordering::Relaxed);
    assert!(unauthorized <= 3, "{unauthorized} rejected requests");
    assert_eq!(h.model.main_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_repository_fails_clearly() {
    let h = Harness::new(happy_script()).await;
    let yaml = h.manifest("nowhere", "").replace(&h.git.url("demo"), "http://127.0.0.1:9/nothing.git");
    let s = h.run(&yaml).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("CloneFailed")), "{s:#?}");
    assert!(s.message.unwrap().contains("cannot reach http://127.0.0.1:9/nothing.git"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_file_is_invalid_input_and_creates_nothing() {
    let h = Harness::new(happy_script()).await;
    std::fs::remove_file(h.opts.secrets_dir.join("anthropic/api-key")).unwrap();
    let err = h.try_run(&h.manifest("nokey", ""), CancellationToken::new()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("spec.agent.apiKeySecretRef") && msg.contains("anthropic/api-key"), "{msg}");
    assert_eq!(err.exit_code(), agentops::runner::EXIT_INVALID);
    assert!(h.store.list_executions(10).await.unwrap().is_empty());
    assert!(h.store.list_workspaces().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_crash_without_result_is_a_failure() {
    let mut h = Harness::new(happy_script()).await;
    let fake = h.dir.path().join("crashing-claude");
    // 2 MiB of noise on stderr first: only its last 4 KiB are kept (and logged).
    std::fs::write(
        &fake,
        "#!/bin/sh\nhead -c 2097152 /dev/zero | tr '\\0' 'n' | fold -w 100 >&2\necho >&2\necho 'Error: segfault in the agent' >&2\nexit 7\n",
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&fake).unwrap().permissions(), 0o755);
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    h.opts.claude_bin = fake;
    let s = h.run(&h.manifest("crash", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("AgentCrashed")), "{s:#?}");
    let msg = s.message.clone().unwrap();
    assert!(msg.contains("status 7") && msg.contains("Error: segfault in the agent"), "{msg}");
    let logs = h.store.logs(&s.id).await.unwrap();
    let stderr: Vec<&str> = logs.iter().filter(|l| l.source == "agent-stderr").map(|l| l.line.as_str()).collect();
    assert_eq!(stderr.last(), Some(&"Error: segfault in the agent"));
    let kept: usize = stderr.iter().map(|l| l.len() + 1).sum();
    assert!(kept <= 4096 + 1, "the last 4 KiB of 2 MiB: {kept} bytes");
}

/// One stdout line of 17 MiB (over the 16 MiB bound) is skipped to its newline, not held in
/// memory or stored, and the lines after it are read: the run ends on the CLI's result line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stdout_line_is_skipped_and_the_result_after_it_is_read() {
    let mut h = Harness::new(happy_script()).await;
    let fake = h.dir.path().join("long-line-claude");
    std::fs::write(
        &fake,
        "#!/bin/sh\nhead -c 17825792 /dev/zero | tr '\\0' 'x'\necho\n\
         echo '{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"read past the long line\",\"num_turns\":1}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    h.opts.claude_bin = fake;
    let s = h.run(&h.manifest("longline", "")).await;
    assert_eq!(s.result.as_deref(), Some("read past the long line"), "{s:#?}");
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Succeeded, Some("NoChanges")), "{s:#?}");
    let logs = h.store.logs(&s.id).await.unwrap();
    assert!(logs.iter().all(|l| l.line.len() <= 16 * 1024), "no 17 MiB line reached the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_exit_zero_is_a_failure_not_no_changes() {
    let mut h = Harness::new(happy_script()).await;
    let fake = h.dir.path().join("silent-claude");
    std::fs::write(&fake, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    h.opts.claude_bin = fake;
    let s = h.run(&h.manifest("silent", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("AgentCrashed")), "{s:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rejected_fails_with_the_server_message_and_keeps_the_workspace() {
    let h = Harness::new(happy_script()).await;
    h.git.reject_pushes("demo", "branch protected by policy");
    let s = h.run(&h.manifest("rejected", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("PushRejected")), "{s:#?}");
    let msg = s.message.unwrap();
    assert!(msg.contains("pre-receive") || msg.contains("rejected"), "{msg}");
    assert!(s.git.commit.is_some() && !s.git.pushed);
    let ws = std::path::Path::new(s.workspace.as_deref().unwrap());
    assert!(ws.join("repo/greeting.txt").exists(), "workspace kept with the work");
    assert_eq!(h.store.list_workspaces().await.unwrap()[0].status, "error");
}

/// A webhook receiver on 127.0.0.1 that keeps every JSON body it gets.
async fn webhook_sink(status: u16) -> (String, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use axum::http::StatusCode;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = axum::Router::new().fallback({
        let got = got.clone();
        move |body: axum::body::Bytes| async move {
            got.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or_default());
            (StatusCode::from_u16(status).unwrap(), "received")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_hooks_receive_the_result_and_error_hooks_the_error() {
    // Success: a command hook and a webhook both get the summary with the pushed commit.
    let h = Harness::new(happy_script()).await;
    let (url, got) = webhook_sink(200).await;
    // The command hook runs in the agent's sandbox: it prints what it got (the log keeps it).
    let hooks = format!(
        "  hooks:\n    post:\n      - name: show\n        command: [cat]\n      - url: {url}\n    onError:\n      - url: {url}\n"
    );
    let s = h.run(&h.manifest("posthooks", &hooks)).await;
    assert_eq!(s.phase, Phase::Succeeded, "{s:#?}");
    let logs = h.store.logs(&s.id).await.unwrap();
    let printed = logs.iter().find(|l| l.source == "hook:post:show").map(|l| l.line.clone()).unwrap_or_default();
    let from_cmd: serde_json::Value = serde_json::from_str(&printed).unwrap();
    let from_web = got.lock().unwrap().clone();
    assert_eq!(from_web.len(), 1, "only the post webhook was called: {from_web:?}");
    for payload in [&from_cmd, &from_web[0]] {
        assert_eq!(payload["phase"], "post");
        assert_eq!(payload["outcome"]["reason"], "Completed");
        assert_eq!(payload["summary"]["git"]["commit"].as_str(), s.git.commit.as_deref());
        assert_eq!(payload["summary"]["git"]["pushed"], true);
        assert_eq!(payload["execution"]["name"], "posthooks");
        assert_eq!(payload["summary"]["toolCalls"]["total"], 4);
        // The same summary as the printed one: when it started and how long it has run.
        assert_eq!(payload["summary"]["startTime"].as_str(), s.start_time.as_deref());
        assert!(payload["summary"]["durationMs"].as_u64().unwrap() > 0, "{payload}");
        assert_eq!(payload["summary"]["git"]["baseBranch"], "main");
        assert!(payload["summary"]["git"]["baseCommit"].as_str().is_some_and(|c| c.len() == 40));
    }

    // Failure: the error webhook gets the reason and message; a failing post hook is not called.
    let h = Harness::new(vec![Step::Error(500), Step::Error(500), Step::Error(500)]).await;
    let (url, got) = webhook_sink(200).await;
    let hooks = format!("  hooks:\n    post:\n      - url: {url}/post\n    onError:\n      - url: {url}\n");
    let s = h.run(&h.manifest("errhooks", &hooks)).await;
    assert_eq!(s.reason.as_deref(), Some("ApiError"));
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["phase"], "onError");
    assert_eq!(got[0]["outcome"]["phase"], "Failed");
    assert_eq!(got[0]["outcome"]["reason"], "ApiError");
    assert!(got[0]["outcome"]["message"].as_str().unwrap().contains("HTTP 500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_post_webhook_fails_the_execution() {
    let h = Harness::new(happy_script()).await;
    let (url, got) = webhook_sink(503).await;
    let s = h.run(&h.manifest("posthookfail", &format!("  hooks:\n    post:\n      - url: {url}\n"))).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("PostHookFailed")), "{s:#?}");
    assert!(s.message.clone().unwrap().contains("503"));
    assert_eq!(got.lock().unwrap().len(), 1);
    // The branch was pushed before the hook ran, and the summary says so.
    assert!(s.git.pushed, "{s:#?}");
    assert_eq!(h.git.branch_head("demo", "agentops/posthookfail"), s.git.commit);
    // The hook got the pushed commit.
    assert_eq!(got.lock().unwrap()[0]["summary"]["git"]["commit"].as_str(), s.git.commit.as_deref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watchdog_stops_a_silent_agent() {
    let h = Harness::new(vec![Step::Hang]).await;
    let yaml = h
        .manifest("idle", "")
        .replace("apiKeySecretRef: {name: anthropic}", "apiKeySecretRef: {name: anthropic}\n    idleTimeout: 3s");
    let started = std::time::Instant::now();
    let s = h.run(&yaml).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("AgentIdle")), "{s:#?}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_limit_stops_the_agent() {
    // Turns that bill plausibly (input below the request's size): each request's worst case is
    // held against the budget (Claude Code asks for max_tokens 128,000: $3.20 on Opus), so the
    // requests go with max_tokens lowered to what is left, until nothing useful is left.
    let turn = |f: &str| Step::tool("Write", json!({"file_path": f, "content": "x\n"})).with_usage([10_000, 100, 0, 0]);
    let h =
        Harness::new(vec![turn("a"), turn("b"), turn("c"), turn("d"), turn("e"), turn("f"), Step::text("done")]).await;
    let yaml = h
        .manifest("budget", "")
        .replace("apiKeySecretRef: {name: anthropic}", "apiKeySecretRef: {name: anthropic}\n    maxBudgetUsd: 0.5");
    let s = h.run(&yaml).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("BudgetExceeded")), "{s:#?}");
    assert!(s.cost_usd > 0.0 && s.cost_usd <= 0.5, "a hard budget: spent ${}", s.cost_usd);
    assert!(h.model.remaining() >= 1, "the agent was stopped before its last turn");
    assert_eq!(h.git.branch_head("demo", "agentops/budget"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_timeout_kills_its_whole_group_and_its_output_is_capped() {
    let h = Harness::new(happy_script()).await;
    // A grandchild that would outlive a kill of the direct child, and 10 MB of output. (The
    // hook runs in the sandbox, in a PID namespace of its own: the test finds the grandchild by
    // its command line.)
    let script = "sleep 3017 & head -c 10000000 /dev/zero | tr '\\\\0' x; sleep 300";
    let hooks = format!(
        "  hooks:\n    pre:\n      - name: slow\n        timeout: 2s\n        command: [sh, -c, \"{script}\"]\n"
    );
    let s = h.run(&h.manifest("slowhook", &hooks)).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("PreHookRejected")), "{s:#?}");
    assert!(s.message.as_deref().unwrap().contains("longer than 2s"), "{s:#?}");
    // Killed with the group (a zombie until reaped counts as gone).
    let alive = || {
        std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()).any(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            cmd == b"sleep\x003017\x00" && !state.split(") ").nth(1).is_some_and(|r| r.starts_with('Z'))
        })
    };
    let mut gone = false;
    for _ in 0..50 {
        if !alive() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone, "the hook's background sleep 3017 was killed with its group");
    assert_eq!(h.model.main_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_output_is_kept_up_to_a_cap() {
    let h = Harness::new(happy_script()).await;
    let hooks = "  hooks:\n    pre:\n      - name: loud\n        command: [sh, -c, \"head -c 5000000 /dev/zero | tr '\\\\0' y; echo; exit 1\"]\n";
    let s = h.run(&h.manifest("loudhook", hooks)).await;
    assert_eq!(s.reason.as_deref(), Some("PreHookRejected"), "{s:#?}");
    let logs = h.store.logs(&s.id).await.unwrap();
    let kept: usize =
        logs.iter().filter(|l| l.source == "hook:pre:loud" && l.line.starts_with('y')).map(|l| l.line.len()).sum();
    assert!(kept > 0 && kept <= agentops::runner::HOOK_OUTPUT_LIMIT, "kept {kept} bytes of 5 MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_finishes_the_store_row_as_failed_never_running() {
    let h = Harness::new(happy_script()).await;
    let r = h.resolved(&h.manifest("panics", ""));
    let inner = h.env();
    let env = move |k: &str| if k == "AGENTOPS_TEST_PANIC" { Some("1".into()) } else { inner(k) };
    let s = agentops::runner::run_execution(&h.store, &h.opts, &r, &env, CancellationToken::new()).await.unwrap();
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("InternalError")), "{s:#?}");
    let row = h.store.get_execution(&s.id).await.unwrap();
    assert_eq!(row.status, "Failed", "the store row is finished");
    assert!(row.completed_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhooks_answer_is_read_up_to_a_cap() {
    // A receiver that answers 5 MB (and 500): the runner keeps at most the cap of it.
    let app = axum::Router::new().fallback(|| async {
        let body = format!("{}\n", "z".repeat(99)).repeat(50_000);
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, body)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let h = Harness::new(happy_script()).await;
    let hooks = format!("  hooks:\n    pre:\n      - name: chatty\n        url: {url}\n");
    let s = h.run(&h.manifest("chatty", &hooks)).await;
    assert_eq!(s.reason.as_deref(), Some("PreHookRejected"), "{s:#?}");
    let logs = h.store.logs(&s.id).await.unwrap();
    let kept: usize =
        logs.iter().filter(|l| l.source == "hook:pre:chatty" && l.line.starts_with('z')).map(|l| l.line.len()).sum();
    assert!(kept > 0 && kept <= agentops::runner::HOOK_OUTPUT_LIMIT, "kept {kept} bytes of 5 MB");
}

/// One Write and a final answer: the smallest real change an agent makes.
fn write_script(file: &str) -> Vec<Step> {
    vec![Step::tool("Write", json!({"file_path": file, "content": "written by the agent\n"})), Step::text("Wrote it.")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_starts_from_the_default_branch_a_tag_or_a_commit_and_says_which() {
    let h = Harness::new(vec![]).await;
    // A repository whose default branch is `master` (no `main` anywhere), with history.
    h.git.create_repo_on("legacy", "master", &[("app.txt", "app\n")]);
    let on_legacy = |name: &str, extra: &str| h.manifest(name, extra).replace(&h.git.url("demo"), &h.git.url("legacy"));
    let rev = |r: &str| h.git.git("legacy", &["rev-parse", r]).trim().to_string();
    let old = rev("master~2");
    for (name, git_ref, base, base_branch) in [
        ("default", None, rev("master"), "master".to_string()),
        ("tag", Some("v0.1"), rev("v0.1^{commit}"), "v0.1".to_string()),
        ("sha", Some(old.as_str()), old.clone(), old.clone()),
    ] {
        h.model.set_script(write_script(&format!("{name}.txt")));
        let yaml = on_legacy(name, "");
        let yaml = match git_ref {
            Some(r) => yaml.replace("    credentialsSecretRef:", &format!("    ref: '{r}'\n    credentialsSecretRef:")),
            None => yaml,
        };
        let s = h.run(&yaml).await;
        assert_eq!((s.phase, s.reason.as_deref()), (Phase::Succeeded, Some("Completed")), "{name}: {s:#?}");
        assert_eq!(s.git.base_commit.as_deref(), Some(base.as_str()), "{name}");
        assert_eq!(s.git.base_branch.as_deref(), Some(base_branch.as_str()), "{name}");
        let head = h.git.branch_head("legacy", &format!("agentops/{name}")).expect("pushed");
        assert_eq!(rev(&format!("{head}^")), base, "{name}: one commit on the base");
        assert_eq!(h.git.show("legacy", &head, &format!("{name}.txt")).as_deref(), Some("written by the agent\n"));
    }
    h.git.git("legacy", &["fsck", "--strict", "--no-dangling"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_base_moving_on_the_remote_during_the_agents_turn_does_not_matter() {
    let h = Harness::new(vec![
        Step::tool("Write", json!({"file_path": "mine.txt", "content": "mine\n"})),
        Step::tool("Bash", json!({"command": "sleep 3", "description": "think"})),
        Step::text("Done."),
    ])
    .await;
    let base = h.git.branch_head("demo", "main").unwrap();
    // Someone pushes to main once the agent has started.
    let mover = {
        let (model, bare) = (h.model.clone(), h.git.repo_path("demo"));
        tokio::spawn(async move {
            while model.main_requests() < 2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let work = tempfile::tempdir().unwrap();
            let w = work.path();
            support::git_server::git(w, &["clone", "-q", &bare.to_string_lossy(), "w"]);
            std::fs::write(w.join("w/theirs.txt"), "theirs\n").unwrap();
            support::git_server::git(&w.join("w"), &["add", "-A"]);
            support::git_server::git(
                &w.join("w"),
                &["-c", "user.name=p", "-c", "user.email=p@p", "commit", "-qm", "theirs"],
            );
            support::git_server::git(&w.join("w"), &["push", "-q", "origin", "main"]);
            // The order of the two pushes: theirs is in, ours is not yet.
            let ours = std::process::Command::new("git")
                .args([
                    "--git-dir",
                    &bare.to_string_lossy(),
                    "rev-parse",
                    "--verify",
                    "-q",
                    "refs/heads/agentops/moving",
                ])
                .output()
                .unwrap();
            !ours.status.success()
        })
    };
    let s = h.run(&h.manifest("moving", "")).await;
    assert!(mover.await.unwrap(), "main moved before the work branch was pushed");
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Succeeded, Some("Completed")), "{s:#?}");
    let main = h.git.branch_head("demo", "main").unwrap();
    assert_ne!(main, base, "main moved during the run");
    let head = h.git.branch_head("demo", "agentops/moving").unwrap();
    assert_eq!(h.git.git("demo", &["rev-parse", &format!("{head}^")]).trim(), base, "the work is on the base it saw");
    assert_eq!(h.git.show("demo", &head, "theirs.txt"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_work_branch_fails_before_the_agent_unless_the_run_continues_it() {
    let h = Harness::new(write_script("next.txt")).await;
    let develop = h.git.branch_head("demo", "develop").unwrap();

    // Work branch `develop` exists and the run starts from main: refused before any token is spent.
    let s = h.run(&h.manifest("clash", "  git: {branch: develop}\n")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("BranchExists")), "{s:#?}");
    let msg = s.message.unwrap();
    assert!(msg.contains("develop") && msg.contains("spec.git.branch") && msg.contains("spec.repository.ref"), "{msg}");
    assert_eq!(h.model.seen().len(), 0, "the agent never ran");
    assert_eq!(h.git.branch_head("demo", "develop"), Some(develop.clone()), "untouched");

    // Started from `develop`: the commit goes on top of it, a fast-forward.
    let yaml = h
        .manifest("continue", "  git: {branch: develop}\n")
        .replace("    credentialsSecretRef:", "    ref: develop\n    credentialsSecretRef:");
    let s = h.run(&yaml).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Succeeded, Some("Completed")), "{s:#?}");
    let head = h.git.branch_head("demo", "develop").unwrap();
    assert_eq!(Some(&head), s.git.commit.as_ref());
    assert_eq!(h.git.git("demo", &["rev-parse", "develop^"]).trim(), develop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_content_survives_an_agents_run_and_the_counts_are_gits() {
    let h = Harness::new(vec![
        Step::tool("Bash", json!({"command": support::git_server::REAL_EDITS, "description": "edit"})),
        Step::text("Edited."),
    ])
    .await;
    let pointer = h.git.add_real_content("demo");
    let base = h.git.branch_head("demo", "main").unwrap();
    let s = h.run(&h.manifest("content", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Succeeded, Some("Completed")), "{s:#?}");
    let msg = s.message.clone().unwrap_or_default();
    assert!(msg.contains("submodule vendor/lib") && msg.contains("not committed"), "{msg}");
    let commit = s.git.commit.clone().unwrap();
    let git_stat = h.git.check_real_edits("demo", &commit, &base, &pointer);
    assert_eq!((s.git.changed_files, s.git.insertions, s.git.deletions), git_stat, "{:?}", s.git);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_fails_for_a_moment_is_tried_again_and_a_rejection_is_not() {
    let h = Harness::new(write_script("retry.txt")).await;
    // Two 503s (a host or relay in trouble), then the push goes through.
    h.git.fail_pushes(2);
    let s = h.run(&h.manifest("retry", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Succeeded, Some("Completed")), "{s:#?}");
    assert_eq!(h.git.stats().receive_pack.load(std::sync::atomic::Ordering::Relaxed), 3, "two failures, one push");
    assert_eq!(h.git.branch_head("demo", "agentops/retry"), s.git.commit);
    let logs = h.store.logs(&s.id).await.unwrap();
    assert!(logs.iter().any(|l| l.line.contains("trying again")), "the retry is in the run's log");

    // A rejection (here a pre-receive hook) is final: one attempt, no retry.
    h.git.reject_pushes("demo", "protected");
    h.model.set_script(write_script("again.txt"));
    let before = h.git.stats().receive_pack.load(std::sync::atomic::Ordering::Relaxed);
    let s = h.run(&h.manifest("rejected-once", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("PushRejected")), "{s:#?}");
    assert_eq!(h.git.stats().receive_pack.load(std::sync::atomic::Ordering::Relaxed), before + 1);
}

/// Runs `yaml`, cancelling it once the host has stalled `n` requests; the summary, and when the
/// cancel was asked for.
async fn run_cancelled_at(
    h: &Harness,
    yaml: &str,
    cancel: &CancellationToken,
    stalled: &dyn Fn() -> u64,
    n: u64,
) -> (agentops::runner::Summary, std::time::Instant) {
    let trigger = async {
        while stalled() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
        std::time::Instant::now()
    };
    let (s, at) = tokio::join!(h.try_run(yaml, cancel.clone()), trigger);
    (s.unwrap(), at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_host_that_stalls_ends_the_run_at_its_timeout_or_on_cancel() {
    use std::sync::atomic::Ordering;
    let h = Harness::new(write_script("stall.txt")).await;
    let stalled = || h.git.stats().stalled.load(Ordering::Relaxed);

    // The clone: headers, then nothing. The run's timeout ends it, before any agent starts.
    h.git.stall_after_headers(Some("git-upload-pack"));
    let started = std::time::Instant::now();
    let s = h.run(&h.manifest("stall-clone", "  timeout: 4s\n")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::TimedOut, Some("Timeout")), "{s:#?}");
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    assert_eq!((stalled(), h.model.main_requests()), (1, 0));
    assert_eq!(h.store.get_execution(&s.id).await.unwrap().status, "TimedOut");

    // Cancel during the stalled clone: within a second or two.
    let cancel = CancellationToken::new();
    let yaml = h.manifest("stall-cancel", "");
    let (s, at) = run_cancelled_at(&h, &yaml, &cancel, &stalled, 2).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Cancelled, Some("Cancelled")), "{s:#?}");
    assert!(at.elapsed() < Duration::from_secs(3), "{:?}", at.elapsed());

    // The push: the agent's work is committed, the host stalls, cancel ends the run at once.
    h.git.stall_after_headers(Some("git-receive-pack"));
    let cancel = CancellationToken::new();
    let yaml = h.manifest("stall-push", "  workspace: {retain: Retain}\n");
    let (s, at) = run_cancelled_at(&h, &yaml, &cancel, &stalled, 3).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Cancelled, Some("Cancelled")), "{s:#?}");
    assert!(at.elapsed() < Duration::from_secs(3), "{:?}", at.elapsed());
    assert!(s.git.commit.is_some() && !s.git.pushed, "{:?}", s.git);
    assert_eq!(h.git.branch_head("demo", "agentops/stall-push"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_refusal_reaches_the_status_in_its_words_and_is_not_retried() {
    use std::sync::atomic::Ordering;
    let h = Harness::new(write_script("refused.txt")).await;
    let pushes = || h.git.stats().receive_pack.load(Ordering::Relaxed);
    let shown = |m: &str| !m.chars().any(|c| c.is_control());

    // Issue 24: what the pre-receive hook said reaches the status (and the store), cleaned.
    h.git.reject_pushes("demo", "protected branch: agentops/* needs review\x1b]0;pwned\x07");
    let s = h.run(&h.manifest("hook", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("PushRejected")), "{s:#?}");
    let msg = s.message.unwrap();
    assert!(msg.contains("protected branch: agentops/* needs review"), "{msg}");
    assert!(shown(&msg), "{msg:?}");
    assert_eq!(pushes(), 1, "a refusal is not retried");
    let row = h.store.get_execution(&s.id).await.unwrap();
    assert!(row.message.unwrap().contains("protected branch: agentops/* needs review"));
    std::fs::remove_file(h.git.repo_path("demo").join("hooks/pre-receive")).unwrap();

    // Issue 23: a fatal error on side band 3 is the host's word, not "cannot reach": once, at once.
    h.git.fail_fatally("git-receive-pack", "the repository is over its quota\x1b[31m");
    h.model.set_script(write_script("refused.txt"));
    let started = std::time::Instant::now();
    let s = h.run(&h.manifest("fatal", "")).await;
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Failed, Some("PushRejected")), "{s:#?}");
    let msg = s.message.unwrap();
    assert!(msg.contains("fatal: the repository is over its quota") && shown(&msg), "{msg:?}");
    assert!(!msg.contains("cannot reach"), "{msg}");
    assert_eq!(pushes(), 2, "one push request, no retry");
    assert!(started.elapsed() < Duration::from_secs(40), "no minute of retries: {:?}", started.elapsed());
    let logs = h.store.logs(&s.id).await.unwrap();
    assert!(!logs.iter().any(|l| l.line.contains("trying again")), "{logs:?}");
}

fn bash(command: &str) -> Step {
    Step::tool("Bash", json!({"command": command, "description": "plant"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_the_agent_plants_in_git_and_the_work_tree_never_hang_the_run() {
    use std::os::unix::fs::FileTypeExt;
    let h = Harness::new(vec![
        // Issue 23: publish opened `.git/objects/info/alternates` and waited forever.
        bash("mkfifo .git/objects/info/alternates pipe.fifo && ls -l .git/objects/info/alternates pipe.fifo"),
        Step::tool("Write", json!({"file_path": "legit.txt", "content": "the real fix\n"})),
        Step::text("Done."),
    ])
    .await;
    let started = std::time::Instant::now();
    let s = h.run(&h.manifest("fifo", "  timeout: 20s\n  workspace: {retain: Retain}\n")).await;
    assert!(started.elapsed() < Duration::from_secs(20), "ended within its timeout: {:?}", started.elapsed());
    assert_eq!((s.phase, s.reason.as_deref()), (Phase::Succeeded, Some("Completed")), "{s:#?}");
    // The attack was in place, and nobody waits on either FIFO.
    let repo = std::path::Path::new(s.workspace.as_deref().unwrap()).join("repo");
    for fifo in [repo.join(".git/objects/info/alternates"), repo.join("pipe.fifo")] {
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "{}", fifo.display());
        use std::os::unix::fs::OpenOptionsExt;
        let nobody_reads = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&fifo)
            .is_err();
        assert!(nobody_reads, "{} is not open anywhere", fifo.display());
    }
    // The FIFO in the work tree is left out of the commit, as git leaves it, and the user is told.
    let head = h.git.branch_head("demo", "agentops/fifo").expect("pushed");
    assert_eq!(h.git.show("demo", &head, "legit.txt").as_deref(), Some("the real fix\n"));
    assert_eq!(h.git.show("demo", &head, "pipe.fifo"), None);
    let msg = s.message.unwrap();
    assert!(msg.contains("left out of the commit, as git leaves them: pipe.fifo (a FIFO)"), "{msg}");
    assert_eq!(h.store.get_execution(&s.id).await.unwrap().status, "Succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_way_is_failed_when_the_store_is_next_opened_and_a_live_one_is_not() {
    let h = Harness::new(vec![Step::Hang]).await;
    let bin = env!("CARGO_BIN_EXE_agentops");
    let file = h.dir.path().join("killed.yaml");
    std::fs::write(&file, h.manifest("killed", "")).unwrap();
    let mut run = h.agentops(bin).args(["run", "-q", "-o", "json", "-f"]).arg(&file).spawn().unwrap();
    assert!(h.model.wait_for_main_requests(1, Duration::from_secs(60)).await, "the agent is at work");
    let list = || async {
        let out = h.agentops(bin).args(["executions", "list", "--json"]).output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        rows.into_iter().find(|r| r["name"] == "killed").expect("the row")
    };
    // Control: a run whose process is alive is left Running by another process opening the store.
    let row = list().await;
    assert_eq!(row["phase"], "Running", "{row}");

    // SIGKILL: no handler runs, nothing is written. The next open of the store ends the row.
    let pid = nix::unistd::Pid::from_raw(run.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    run.wait().await.unwrap();
    let row = list().await;
    assert_eq!((row["phase"].as_str(), row["reason"].as_str()), (Some("Failed"), Some("RunnerLost")), "{row}");
    let msg = row["message"].as_str().unwrap();
    assert!(msg.contains("agentops stopped before the execution ended") && msg.contains("is gone"), "{msg}");
    let id = row["id"].as_str().unwrap();
    let out = h.agentops(bin).args(["executions", "show", id]).output().await.unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.starts_with("Failed killed (RunnerLost): agentops stopped"), "{shown}");
    assert_eq!(h.store.list_workspaces().await.unwrap()[0].status, "error", "the workspace is kept");
    h.model.end_hangs();
}

/// `spec.pod.env` reaches the agent on one machine too: the execution's list replaces the
/// template's (lists replace), and the agent's Bash sees exactly it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_env_reaches_the_agent_and_the_executions_list_replaces_the_templates() {
    let h = Harness::new(vec![
        Step::tool("Bash", json!({"command": "echo \"team=$TEAM b=${B:-unset}\"", "description": "env"})),
        Step::text("Done."),
    ])
    .await;
    let template = "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {name: team}\nspec:\n  pod: {env: [{name: TEAM, value: from-template}, {name: B, value: b}]}\n---\n";
    let yaml = format!(
        "{template}{}",
        h.manifest("env", "  templateRef: {name: team}\n  pod: {env: [{name: TEAM, value: from-execution}]}\n")
    );
    let s = h.run(&yaml).await;
    assert_eq!(s.phase, Phase::Succeeded, "{s:#?}");
    let seen: String = h.model.seen().iter().map(|r| r.body.to_string()).collect();
    assert!(seen.contains("team=from-execution b=unset"), "{seen}");
}
