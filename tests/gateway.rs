//! The model gateway against the scripted Messages API: the agent's token is checked, the real
//! key is added, streaming is relayed, usage is counted exactly (also across a failed attempt),
//! and a token is worthless for another gateway and once its run is over. Then the attacks of a
//! prompt-injected agent on the budget, each against an upstream double that bills at list
//! price what it served, with a control showing what the attack achieves without the defence.

mod support;

use agentops::gateway::Gateway;
use serde_json::json;
use support::{API_KEY, FakeAnthropic, Step};

async fn ask(base: &str, token: &str) -> reqwest::Result<reqwest::Response> {
    // Tools make it a "main" request, which the scripted server answers from its script.
    let body = json!({"model": "claude-opus-4-6", "max_tokens": 64, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "Write", "input_schema": {"type": "object"}}]});
    support::http().post(format!("{base}/v1/messages")).header("x-api-key", token).json(&body).send().await
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
    // The listener goes with the task close stops: wait for that, not a fixed while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ask(&gw.base_url, &gw.token).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "the run is over, yet the gateway still answers");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The controller's gateway: one account per execution, under its path.
async fn controller_gateway(upstream: &str) -> (std::sync::Arc<agentops::gateway::Gateways>, String) {
    serve_gateways(agentops::gateway::Gateways::new(upstream).unwrap()).await
}

/// The same, with remote MCP servers allowed on loopback (the fake ones are on 127.0.0.1).
async fn local_mcp_gateway(upstream: &str) -> (std::sync::Arc<agentops::gateway::Gateways>, String) {
    serve_gateways(agentops::gateway::Gateways::new(upstream).unwrap().allowing_local_mcp().unwrap()).await
}

async fn serve_gateways(g: agentops::gateway::Gateways) -> (std::sync::Arc<agentops::gateway::Gateways>, String) {
    let g = std::sync::Arc::new(g);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = g.clone().router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (g, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_gateway_counts_per_execution_and_stops_at_the_budget() {
    use agentops::gateway::{Account, BUDGET_SPENT};
    let model = FakeAnthropic::start(vec![
        Step::Error(529),
        Step::tool("Bash", json!({"command": "ls"})).with_usage([1_000_000, 100_000, 0, 0]),
        Step::text("never sent"),
    ])
    .await;
    let (g, base) = controller_gateway(&model.base_url).await;
    // Opus 4.6's list price: 1M input tokens and 100k output tokens are $5 + $2.50.
    g.open("team-a", "fix", Account::new(API_KEY, "token-a", Some(7.0)));
    g.open("team-b", "other", Account::new(API_KEY, "token-b", None));
    let url = |ns: &str, name: &str| format!("{base}/gateway/{ns}/{name}");

    // Another execution's token, or the right token under another execution: refused.
    assert_eq!(ask(&url("team-a", "fix"), "token-b").await.unwrap().status(), 401);
    assert_eq!(ask(&url("team-b", "other"), "token-a").await.unwrap().status(), 401);
    assert_eq!(ask(&url("team-a", "nope"), "token-a").await.unwrap().status(), 401);
    assert!(model.seen().is_empty(), "nothing refused reached the model");

    // A retried overload, then a tool call: counted exactly, priced by the request's model.
    assert_eq!(ask(&url("team-a", "fix"), "token-a").await.unwrap().status(), 529);
    let body = ask(&url("team-a", "fix"), "token-a").await.unwrap().text().await.unwrap();
    assert!(body.contains("tool_use"), "{body}");
    let m = g.metered("team-a", "fix").unwrap();
    assert_eq!((m.responses, m.turns, m.tool_calls.total), (2, 1, 1));
    assert_eq!(m.tool_calls.by_tool.get("Bash"), Some(&1));
    assert_eq!((m.usage.input_tokens, m.usage.output_tokens), (1_000_000, 100_000));
    assert!((m.cost_usd - 7.5).abs() < 1e-9, "priced at the list price: {}", m.cost_usd);
    assert_eq!(g.metered("team-b", "other").unwrap().responses, 0, "the other execution spent nothing");

    // The budget ($7) is spent: the next request is refused with words the runner recognises,
    // and never reaches the model.
    let before = model.seen().len();
    let refused = ask(&url("team-a", "fix"), "token-a").await.unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains(BUDGET_SPENT));
    assert_eq!(model.seen().len(), before);
    assert_eq!(g.metered("team-a", "fix").unwrap().refused_over_budget, 1);

    // The execution ends: its token no longer works, and what it spent stays with the caller.
    let last = g.close("team-a", "fix").unwrap();
    assert_eq!(last.usage.input_tokens, 1_000_000);
    assert_eq!(ask(&url("team-a", "fix"), "token-a").await.unwrap().status(), 401);
}

/// The controller's git relay on 127.0.0.1, and its base URL.
async fn relay_server() -> (std::sync::Arc<agentops::gateway::git::GitRelays>, String) {
    let relays = std::sync::Arc::new(agentops::gateway::git::GitRelays::new().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = relays.clone().router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (relays, base)
}

/// An execution's route to `upstream` with the test server's credential, for `agentops/fix`.
fn route_to(upstream: String) -> agentops::gateway::git::Route {
    agentops::gateway::git::Route {
        upstream,
        credentials: Some(agentops::git::GitCredentials {
            username: "x-access-token".into(),
            token: support::TOKEN.into(),
        }),
        clone_token: "clone-tok".into(),
        publish_token: "publish-tok".into(),
        branch: "agentops/fix".into(),
    }
}

/// The controller's git relay, driven by the real git CLI over smart HTTP against the test git
/// server: the clone token fetches and cannot push; the publish token pushes the work branch
/// and nothing else; tokens die with the execution; the credential is the relay's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_git_relay_adds_the_credential_and_lets_only_the_work_branch_through() {
    let server = support::GitServer::start("x-access-token", Some(support::TOKEN)).await;
    server.create_repo("demo", &[("README.md", "hello\n")]);
    let (relays, base) = relay_server().await;
    relays.open("ns", "fix", route_to(server.url("demo")));
    let url = |token: &str| format!("{}/git/ns/fix", base.replace("http://", &format!("http://agentops:{token}@")));
    let dir = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(dir.path())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir.path())
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // The clone token fetches (the relay adds the real credential)...
    let (ok, err) = tokio::task::block_in_place(|| git(&["clone", "-q", &url("clone-tok"), "w"]));
    assert!(ok, "{err}");
    let work = dir.path().join("w");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&work)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("HOME", dir.path())
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    tokio::task::block_in_place(|| {
        std::fs::write(work.join("fix.txt"), "fixed\n").unwrap();
        assert!(run(&["add", "fix.txt"]).0 && run(&["commit", "-qm", "fix"]).0);
        // ...but cannot push.
        let (ok, err) = run(&["push", &url("clone-tok"), "HEAD:refs/heads/agentops/fix"]);
        assert!(!ok && err.contains("403"), "{err}");
        // The publish token may not push another branch, a tag, or two refs at once.
        for refspec in [
            &["HEAD:refs/heads/main"][..],
            &["HEAD:refs/tags/v1"],
            &["HEAD:refs/heads/agentops/fix", "HEAD:refs/heads/x"],
        ] {
            let mut args = vec!["push", "-q"];
            let u = url("publish-tok");
            args.push(&u);
            args.extend_from_slice(refspec);
            let (ok, err) = run(&args);
            assert!(!ok, "{refspec:?} was refused: {err}");
        }
        assert_eq!(server.branch_head("demo", "x"), None);
        // The work branch goes through.
        let (ok, err) = run(&["push", "-q", &url("publish-tok"), "HEAD:refs/heads/agentops/fix"]);
        assert!(ok, "{err}");
    });
    assert_eq!(server.show("demo", "agentops/fix", "fix.txt").as_deref(), Some("fixed\n"));
    assert!(server.show("demo", "main", "fix.txt").is_none(), "main untouched");
    // A wrong token, the real credential itself, and every token once the execution ended: refused.
    for token in ["nope", support::TOKEN] {
        let (ok, err) = tokio::task::block_in_place(|| git(&["ls-remote", &url(token)]));
        assert!(!ok && err.contains("this token is not valid"), "{token}: {err}");
    }
    relays.close("ns", "fix");
    let (ok, _) = tokio::task::block_in_place(|| git(&["ls-remote", &url("publish-tok")]));
    assert!(!ok);
}

/// The relay follows no redirect of the repository host (the target is never contacted and
/// the pod gets an error naming the status), and reads a push's ref byte for byte: a
/// look-alike of the work branch is refused before anything reaches the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_git_relay_follows_no_redirect_and_takes_refs_byte_for_byte() {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Where a redirect would lead, counting every request it gets.
    let target_hits = std::sync::Arc::new(AtomicU64::new(0));
    let target = {
        let hits = target_hits.clone();
        let app = axum::Router::new().fallback(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            async { "internal service" }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        url
    };
    // A repository host that redirects everything there.
    let host = {
        let to = format!("{target}/internal");
        let app = axum::Router::new().fallback(move || {
            let to = to.clone();
            async move { (axum::http::StatusCode::FOUND, [("location", to)], "moved") }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/repo.git", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        url
    };
    let server = support::GitServer::start("x-access-token", Some(support::TOKEN)).await;
    server.create_repo("demo", &[("README.md", "hello\n")]);
    let (relays, base) = relay_server().await;
    let client = support::http();

    relays.open("ns", "redirected", route_to(host));
    let resp = client
        .get(format!("{base}/git/ns/redirected/info/refs?service=git-upload-pack"))
        .basic_auth("agentops", Some("clone-tok"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(text.contains("HTTP 302") && text.contains("not followed"), "{text}");
    assert_eq!(target_hits.load(Ordering::SeqCst), 0, "the redirect's target was never contacted");

    relays.open("ns", "fix", route_to(server.url("demo")));
    let pkt = |s: &str| format!("{:04x}{s}", s.len() + 4);
    let (z, one) = ("0".repeat(40), "1".repeat(40));
    for name in ["refs/heads/agentops/fix\u{a0}", "refs/heads/agentops/fix\t", " refs/heads/agentops/fix"] {
        let body = format!("{}0000PACK", pkt(&format!("{z} {one} {name}\0report-status\n")));
        let resp = client
            .post(format!("{base}/git/ns/fix/git-receive-pack"))
            .basic_auth("agentops", Some("publish-tok"))
            .header("content-type", "application/x-git-receive-pack-request")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(resp.status() == 403 || resp.status() == 400, "{name:?}: {}", resp.status());
    }
    assert_eq!(server.stats().receive_pack.load(Ordering::Relaxed), 0, "nothing reached the host");
}

/// One request written by hand on a fresh connection (no client library normalises the path:
/// `..` and `%2F` go as they are). `body` None: headers only, announcing a 32 MiB body that is
/// never sent. Returns the status, or 0 when the connection ended without one.
async fn raw(base: &str, method: &str, path: &str, token: &str, headers: &str, body: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let length = body.map_or(32 << 20, str::len);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {token}\r\ncontent-type: application/json\r\n{headers}content-length: {length}\r\n\r\n{}",
        body.unwrap_or_default()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// An upstream that records what reaches it and answers one metered message; when `gzip_always`
/// it labels its answer gzip whatever was asked (as a misbehaving or hostile upstream could).
async fn recording_upstream(
    gzip_always: bool,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, axum::http::HeaderMap)>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = axum::Router::new().fallback({
        let seen = seen.clone();
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let compressed = gzip_always
                    || headers.get("accept-encoding").and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("gzip"));
                seen.lock().unwrap().push((uri.to_string(), headers));
                let sse = concat!(
                    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":1000,\"output_tokens\":1}}}\n\n",
                    "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":500}}\n\n",
                    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
                );
                let mut r = axum::response::IntoResponse::into_response(([("content-type", "text/event-stream")], sse));
                if compressed {
                    r.headers_mut().insert("content-encoding", axum::http::HeaderValue::from_static("gzip"));
                }
                r
            }
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

/// The attacks of issue 18 on the model gateway, played with a raw client: compressed answers
/// (which the gateway could not meter), paths and methods beyond the Messages API, encoded
/// traversals, extra headers, and unauthenticated uploads. The upstream sees only what it must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_relays_only_the_messages_api_and_meters_every_byte() {
    let (upstream, seen) = recording_upstream(false).await;
    let gw = Gateway::start(&upstream, API_KEY).await.unwrap();
    let (g, cbase) = controller_gateway(&upstream).await;
    g.open("ns", "fix", agentops::gateway::Account::new(API_KEY, "tok-c", None));
    let msg = r#"{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[]}"#;

    // The agent asks for gzip and adds headers of its own: the upstream is asked for identity
    // and gets the allowlisted headers only; every token is metered.
    let extra = "accept-encoding: gzip, br\r\nx-evil: 1\r\ncookie: s=1\r\nanthropic-version: 2023-06-01\r\nanthropic-beta: claude-code-20250219\r\nx-forwarded-for: 10.0.0.1\r\n";
    assert_eq!(raw(&gw.base_url, "POST", "/v1/messages?beta=true", &gw.token, extra, Some(msg)).await, 200);
    assert_eq!(raw(&cbase, "POST", "/gateway/ns/fix/v1/messages?beta=true", "tok-c", extra, Some(msg)).await, 200);
    // The upstream recorded each request before it answered.
    assert_eq!(seen.lock().unwrap().len(), 2);
    for (path, h) in seen.lock().unwrap().iter() {
        assert_eq!(path, "/v1/messages?beta=true");
        assert_eq!(h.get("accept-encoding").unwrap(), "identity");
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(h.get("anthropic-beta").unwrap(), "claude-code-20250219");
        for dropped in ["x-evil", "cookie", "x-forwarded-for"] {
            assert!(h.get(dropped).is_none(), "{dropped} reached the upstream");
        }
        assert_eq!(h.get("x-api-key").unwrap(), API_KEY);
    }
    assert_eq!((gw.metered().usage.input_tokens, gw.metered().usage.output_tokens), (1000, 500));
    assert_eq!(g.metered("ns", "fix").unwrap().usage.output_tokens, 500);
    let reached = seen.lock().unwrap().len();
    assert_eq!(reached, 2);

    // Everything else, with a valid token: 404, and nothing reaches the upstream.
    for (method, path) in [
        ("POST", "/v1/messages/batches"),
        ("GET", "/v1/messages"),
        ("POST", "/v1/files"),
        ("POST", "/v1/../admin"),
        ("POST", "/v1/messages/../../admin"),
        ("POST", "/v1/messages%2F..%2Fbatches"),
        ("POST", "/v1/%2E%2E/admin"),
        ("POST", "/v1/messages?beta=true&x=1"),
        ("POST", "//v1/messages"),
    ] {
        assert_eq!(raw(&gw.base_url, method, path, &gw.token, "", Some(msg)).await, 404, "{method} {path}");
        let under = format!("/gateway/ns/fix{path}");
        assert_eq!(raw(&cbase, method, &under, "tok-c", "", Some(msg)).await, 404, "{method} {under}");
    }
    for path in ["/gateway/ns/fix%2Fx/v1/messages", "/gateway/ns/%66ix/v1/messages"] {
        assert_ne!(raw(&cbase, "POST", path, "tok-c", "", Some(msg)).await, 200, "{path}");
    }
    assert_eq!(seen.lock().unwrap().len(), reached, "no refused request reached the upstream");
    assert_eq!(gw.metered().refused_not_allowed, 9);

    // Unauthenticated uploads are answered from their headers: a 32 MiB body announced and
    // never sent still gets its 401 at once.
    for _ in 0..24 {
        assert_eq!(raw(&gw.base_url, "POST", "/v1/messages", "wrong", "", None).await, 401);
        assert_eq!(raw(&cbase, "POST", "/gateway/ns/fix/v1/messages", "wrong", "", None).await, 401);
        assert_eq!(raw(&cbase, "POST", "/gateway/ns/nobody/v1/messages", "tok-c", "", None).await, 401);
    }

    // An upstream that answers compressed whatever it is asked: not relayed (it could not be metered).
    let (gzipping, _) = recording_upstream(true).await;
    let gw2 = Gateway::start(&gzipping, API_KEY).await.unwrap();
    assert_eq!(raw(&gw2.base_url, "POST", "/v1/messages", &gw2.token, "", Some(msg)).await, 502);
    let m = gw2.metered();
    assert_eq!(m.usage.output_tokens, 0);
    // The upstream billed it, by an amount the gateway cannot read: its worst case is counted.
    assert!(m.settled_at_worst_case == 1 && m.cost_usd > 0.0, "{m:?}");
}

/// An upstream as the real API bills: input tokens at most the request's bytes / 4, and every
/// request using all of its `max_tokens` (the worst a real answer can do), after a pause so
/// that concurrent requests overlap.
async fn honest_upstream() -> String {
    let app = axum::Router::new().fallback(|body: axum::body::Bytes| async move {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let out = v["max_tokens"].as_u64().unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let sse = format!(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"usage\":{{\"input_tokens\":{},\"output_tokens\":1}}}}}}\n\n\
             event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":{out}}}}}\n\n\
             event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n",
            body.len() / 4
        );
        ([("content-type", "text/event-stream")], sse)
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

/// Ten concurrent requests of Claude Code's size (`max_tokens` 128,000 at Opus 5.5's $20/M:
/// $2.56 each at worst) against a $1 budget: what is spent stays within the budget. A request the
/// budget can pay only part of goes with a lower `max_tokens`; the rest are refused with the
/// words the runner maps to `BudgetExceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_hard_under_concurrent_requests_and_survives_a_restart() {
    use agentops::gateway::{Account, BUDGET_SPENT};
    let upstream = honest_upstream().await;
    let (g, base) = controller_gateway(&upstream).await;
    g.open("ns", "spender", Account::new(API_KEY, "tok", Some(1.0)));
    let body = json!({"model": "claude-opus-5-5", "max_tokens": 128000, "stream": true,
                      "messages": [{"role": "user", "content": "x".repeat(20_000)}]});
    let client = support::http();
    let requests = (0..10).map(|_| {
        let req = client.post(format!("{base}/gateway/ns/spender/v1/messages")).header("x-api-key", "tok").json(&body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    });
    let answers = futures::future::join_all(requests).await;
    let m = g.metered("ns", "spender").unwrap();
    assert!(m.cost_usd <= 1.0, "spent ${} of a $1 budget", m.cost_usd);
    assert!(m.cost_usd > 0.5, "the budget was used, not refused outright: ${}", m.cost_usd);
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok >= 1 && m.clamped >= 1, "{ok} relayed, {} clamped", m.clamped);
    for (status, text) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 400, "{text}");
        assert!(text.contains(BUDGET_SPENT), "{text}");
    }
    assert_eq!(m.reserved_usd, 0.0, "nothing is held once every request ended");

    // A restart: the account reopens with what the status recorded, and the budget holds.
    let spent = g.close("ns", "spender").unwrap();
    g.open("ns", "spender", Account::new(API_KEY, "tok", Some(1.0)).with_spent(spent.usage, spent.cost_usd));
    let r = client.post(format!("{base}/gateway/ns/spender/v1/messages")).header("x-api-key", "tok").json(&body);
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains(BUDGET_SPENT));
}

/// Plain JSON answers are metered as exactly as streamed ones, and the upstream's errors (429
/// with `Retry-After`, 529 overloaded) reach the agent as they are, costing nothing and holding
/// nothing against the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_metered_and_upstream_errors_pass_through_at_no_cost() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().fallback({
        let calls = calls.clone();
        move || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                use axum::response::IntoResponse;
                match n {
                    0 => (
                        axum::http::StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "7"), ("content-type", "application/json")],
                        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
                    )
                        .into_response(),
                    1 => (
                        axum::http::StatusCode::from_u16(529).unwrap(),
                        [("content-type", "application/json")],
                        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                    )
                        .into_response(),
                    _ => (
                        [("content-type", "application/json")],
                        r#"{"type":"message","content":[{"type":"tool_use","name":"Read","input":{}}],"usage":{"input_tokens":1200,"output_tokens":80,"cache_read_input_tokens":30,"cache_creation_input_tokens":4}}"#,
                    )
                        .into_response(),
                }
            }
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let gw = agentops::gateway::Gateway::start_with_budget(&upstream, API_KEY, Some(10.0)).await.unwrap();
    let body = json!({"model": "claude-sonnet-4-6", "max_tokens": 1000, "messages": []});
    let post = || {
        support::http().post(format!("{}/v1/messages", gw.base_url)).header("x-api-key", &gw.token).json(&body).send()
    };
    let limited = post().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");
    assert!(limited.text().await.unwrap().contains("rate_limit_error"));
    let overloaded = post().await.unwrap();
    assert_eq!(overloaded.status(), 529);
    assert!(overloaded.text().await.unwrap().contains("overloaded_error"));
    let m = gw.metered();
    assert_eq!((m.cost_usd, m.usage.total(), m.reserved_usd), (0.0, 0, 0.0), "errors cost nothing and hold nothing");

    let ok = post().await.unwrap();
    assert_eq!(ok.status(), 200);
    ok.text().await.unwrap();
    let m = gw.metered();
    let u = &m.usage;
    assert_eq!(
        (u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens),
        (1200, 80, 30, 4)
    );
    assert_eq!((m.turns, m.tool_calls.total, m.reserved_usd), (1, 1, 0.0));
    assert!(
        (m.cost_usd - (1200.0 * 3.0 + 80.0 * 15.0 + 30.0 * 0.3 + 4.0 * 3.75) / 1e6).abs() < 1e-12,
        "{}",
        m.cost_usd
    );
}

/// A runaway agent opens request after request: at most `MAX_IN_FLIGHT` of one execution are
/// relayed at once (each held until the upstream's answer has ended), the rest get 429 before
/// their body is read; another execution is not affected. An answer the agent hangs up on keeps
/// its place until the upstream ends it; then the place is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_per_execution() {
    use agentops::gateway::{Account, MAX_IN_FLIGHT};
    let model = FakeAnthropic::start((0..40).map(|_| Step::Hang).collect()).await;
    let (g, base) = controller_gateway(&model.base_url).await;
    g.open("ns", "greedy", Account::new(API_KEY, "tok-g", None));
    g.open("ns", "other", Account::new(API_KEY, "tok-o", None));
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 8, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "Write", "input_schema": {"type": "object"}}]});
    let client = support::http();
    let send = |name: &str, token: &str| {
        client.post(format!("{base}/gateway/ns/{name}/v1/messages")).header("x-api-key", token).json(&body).send()
    };
    let answers = futures::future::join_all((0..MAX_IN_FLIGHT + 4).map(|_| send("greedy", "tok-g"))).await;
    let mut open = Vec::new();
    let mut refused = 0;
    for a in answers {
        let a = a.unwrap();
        match a.status().as_u16() {
            200 => open.push(a),
            429 => refused += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((open.len(), refused), (MAX_IN_FLIGHT, 4));
    assert_eq!(model.main_requests(), MAX_IN_FLIGHT, "the refused ones never reached the model");
    assert_eq!(send("other", "tok-o").await.unwrap().status(), 200, "another execution has its own places");
    // The agent hangs up on one answer: the upstream is still producing it, so its place is kept.
    drop(open.pop());
    wait_for("the gateway to see the hang-up", || g.metered("ns", "greedy").is_some_and(|m| m.agent_left == 1)).await;
    assert_eq!(send("greedy", "tok-g").await.unwrap().status(), 429, "hanging up frees nothing");
    // The upstream ends its answers: every place is free again.
    model.end_hangs();
    let mut again = 0;
    for _ in 0..50 {
        let r = send("greedy", "tok-g").await.unwrap();
        if r.status() == 200 {
            again += 1;
            open.push(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(again, 1, "a freed place is taken again");
}

// ---- The attacks of a prompt-injected agent with a shell, the gateway token and `maxBudgetUsd: 1`.

/// Serves `app` on 127.0.0.1; its base URL.
async fn serve(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

/// An SSE body of these events.
fn sse(events: &[serde_json::Value]) -> String {
    events.iter().map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap())).collect()
}

/// What an upstream double billed, at list price, for what it served.
#[derive(Clone, Default)]
struct Bill(std::sync::Arc<std::sync::Mutex<(f64, usize)>>);

impl Bill {
    fn add(&self, usd: f64) {
        let mut b = self.0.lock().unwrap();
        b.0 += usd;
        b.1 += 1;
    }
    fn usd(&self) -> f64 {
        self.0.lock().unwrap().0
    }
    fn requests(&self) -> usize {
        self.0.lock().unwrap().1
    }
}

/// An upstream that reads `max_tokens` as a lenient parser would (the first of two keys; a
/// float; a string) and produces that many output tokens of Opus 5.5 ($4 / $20 per MTok).
async fn lenient_upstream(bill: Bill) -> String {
    serve(axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let bill = bill.clone();
        async move {
            let text = String::from_utf8_lossy(&body);
            let at = text.find("\"max_tokens\":").unwrap() + "\"max_tokens\":".len();
            let raw: String = text[at..].chars().take_while(|c| !matches!(c, ',' | '}')).collect();
            let out = raw.trim().trim_matches('"').parse::<f64>().unwrap() as u64;
            let input = body.len() as u64 / 4;
            bill.add((input as f64 * 4.0 + out as f64 * 20.0) / 1e6);
            let usage = json!({"input_tokens": input, "output_tokens": out});
            (
                [("content-type", "application/json")],
                json!({"type": "message", "content": [], "usage": usage}).to_string(),
            )
        }
    }))
    .await
}

/// Attack 1: a body serde reads one way and the upstream another. Control: serde reads
/// `max_tokens` 1 (or nothing) from each, so the old gateway reserved no output, while the
/// upstream reads 128,000 and bills $2.56 per request against a $1 budget. Now each is refused
/// with a 400 naming the field, and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_upstream_could_read_otherwise_is_refused_naming_the_field() {
    let bodies = [
        r#"{"model":"claude-opus-5-5","max_tokens":128000,"max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"claude-opus-5-5","max_tokens":128000.0,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"claude-opus-5-5","max_tokens":"128000","messages":[{"role":"user","content":"hi"}]}"#,
    ];
    // Control: what serde read, and what the upstream bills for the same bodies sent straight.
    let control = Bill::default();
    let direct = lenient_upstream(control.clone()).await;
    for body in bodies {
        let serde_read = serde_json::from_str::<serde_json::Value>(body).unwrap()["max_tokens"].as_u64();
        assert!(serde_read.unwrap_or(0) <= 1, "serde reads {serde_read:?} from {body}");
        let r = support::http().post(format!("{direct}/v1/messages")).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(control.usd() > 3.0 * 2.56, "the upstream billed ${} for three 'tiny' requests", control.usd());

    let bill = Bill::default();
    let upstream = lenient_upstream(bill.clone()).await;
    let gw = agentops::gateway::Gateway::start_with_budget(&upstream, API_KEY, Some(1.0)).await.unwrap();
    let post = |body: &'static str, beta: Option<&'static str>| {
        let mut r = support::http()
            .post(format!("{}/v1/messages", gw.base_url))
            .header("x-api-key", &gw.token)
            .header("content-type", "application/json");
        if let Some(b) = beta {
            r = r.header("anthropic-beta", b);
        }
        r.body(body).send()
    };
    for (body, field) in bodies.iter().zip([
        "\\\"max_tokens\\\" appears twice",
        "\\\"max_tokens\\\" must be a whole number",
        "\\\"max_tokens\\\" must be a whole number",
    ]) {
        let r = post(body, None).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let text = r.text().await.unwrap();
        assert!(text.contains("invalid_request_error") && text.contains(field), "{body}: {text}");
    }
    // A field with a price the gateway does not know: refused the same way.
    for (body, beta, field) in [
        (r#"{"model":["claude-opus-5-5"],"max_tokens":1,"messages":[]}"#, None, "\\\"model\\\" must be a string"),
        (r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"speed":"ludicrous"}"#, None, "\\\"speed\\\""),
        (
            r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[],"service_tier":"priority"}"#,
            None,
            "\\\"service_tier\\\"",
        ),
        (
            r#"{"model":"claude-opus-5-5","max_tokens":1,"messages":[]}"#,
            Some("cache-keepalive-2026-09-03"),
            "anthropic-beta",
        ),
    ] {
        let r = post(body, beta).await.unwrap();
        assert_eq!(r.status(), 400);
        let text = r.text().await.unwrap();
        assert!(text.contains(field), "{body}: {text}");
    }
    assert_eq!(bill.requests(), 0, "no refused request reached the upstream");
    assert_eq!(gw.metered().refused_invalid, 7);
    assert_eq!(gw.metered().cost_usd, 0.0);
}

/// The list rates an upstream double bills per model: (input, output) USD per MTok, and the
/// fast-mode multiplier.
fn list_rates(model: &str, fast: bool) -> (f64, f64) {
    let (i, o) = match model {
        "claude-opus-4-1" => (15.0, 75.0),
        "claude-opus-5-5" => (4.0, 20.0),
        other => panic!("the double has no price for {other}"),
    };
    let k = if fast { 2.0 } else { 1.0 };
    (i * k, o * k)
}

/// Attack 2: dear models charged at a cheaper family's price. Each answer is 100,000 input and
/// 10,000 output tokens; the upstream bills `claude-opus-4-1` at $15 / $75 ($2.25) and Opus
/// 5.5 in fast mode at 2× $4 / $20 ($1.20). Control: the family price (Opus 4.5's $5 / $25)
/// was $0.75 for each. The gateway's figures equal the upstream's bill, by model; an unknown
/// model is priced at the table's ceiling; an operator's table replaces the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opus_4_1_and_fast_mode_are_billed_at_their_own_list_price() {
    let bill = Bill::default();
    let upstream = {
        let bill = bill.clone();
        serve(axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let bill = bill.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let model = v["model"].as_str().unwrap().to_string();
                let fast = v["speed"] == "fast";
                if model != "claude-opus-9" {
                    let (i, o) = list_rates(&model, fast);
                    bill.add((100_000.0 * i + 10_000.0 * o) / 1e6);
                }
                let speed = if fast { "fast" } else { "standard" };
                let events = [
                    json!({"type": "message_start", "message": {"model": model, "usage": {"input_tokens": 100_000, "output_tokens": 1, "speed": speed}}}),
                    json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"input_tokens": 100_000, "output_tokens": 10_000, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0}}}),
                    json!({"type": "message_stop"}),
                ];
                ([("content-type", "text/event-stream")], sse(&events))
            }
        }))
        .await
    };
    let family_price: f64 = (100_000.0 * 5.0 + 10_000.0 * 25.0) / 1e6;
    assert!((family_price - 0.75).abs() < 1e-12);

    let g = std::sync::Arc::new(agentops::gateway::Gateways::new(&upstream).unwrap());
    let base = serve(g.clone().router()).await;
    g.open("ns", "fix", agentops::gateway::Account::new(API_KEY, "tok", Some(10.0)));
    let ask = |model: &str, fast: bool| {
        let mut body = json!({"model": model, "max_tokens": 10_000, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
        let mut r = support::http().post(format!("{base}/gateway/ns/fix/v1/messages")).header("x-api-key", "tok");
        if fast {
            body["speed"] = json!("fast");
            r = r.header("anthropic-beta", "fast-mode-2026-02-01");
        }
        async move { r.json(&body).send().await.unwrap().text().await.unwrap() }
    };
    ask("claude-opus-4-1", false).await;
    ask("claude-opus-5-5", true).await;
    let m = g.metered("ns", "fix").unwrap();
    let by = |model: &str| m.by_model[model].cost_usd;
    assert!((by("claude-opus-4-1") - 2.25).abs() < 1e-12, "{}", by("claude-opus-4-1"));
    assert!((by("claude-opus-5-5") - 1.20).abs() < 1e-12, "{}", by("claude-opus-5-5"));
    assert!((m.cost_usd - bill.usd()).abs() < 1e-12, "the gateway's ${} is the upstream's ${}", m.cost_usd, bill.usd());
    assert!(
        m.cost_usd > 2.0 * family_price * 2.0,
        "${} against ${} at the family price",
        m.cost_usd,
        2.0 * family_price
    );
    assert_eq!(m.model.as_deref(), Some("claude-opus-5-5"), "the last model relayed");
    assert_eq!((m.by_model["claude-opus-4-1"].usage.output_tokens, m.turns), (10_000, 2));

    // A model the table does not know: the highest rates of any row ($15 / $75), never less.
    ask("claude-opus-9", false).await;
    let m = g.metered("ns", "fix").unwrap();
    assert!((m.by_model["claude-opus-9"].cost_usd - 2.25).abs() < 1e-12);

    // The operator's table: Opus 4.1 at $1 / $1 for every account opened from then on.
    let mut table = agentops::gateway::prices::PriceTable::list();
    let row = table.models.iter_mut().find(|r| r.ids.iter().any(|id| id == "claude-opus-4-1")).unwrap();
    row.rates = agentops::gateway::prices::Rates::list(1.0, 1.0);
    let table = agentops::gateway::prices::PriceTable::from_yaml(&table.to_yaml().unwrap()).unwrap();
    let g2 = std::sync::Arc::new(agentops::gateway::Gateways::new(&upstream).unwrap().with_prices(table));
    let base2 = serve(g2.clone().router()).await;
    g2.open("ns", "cheap", agentops::gateway::Account::new(API_KEY, "tok2", None));
    let body = json!({"model": "claude-opus-4-1", "max_tokens": 10_000, "stream": true, "messages": []});
    let r = support::http().post(format!("{base2}/gateway/ns/cheap/v1/messages")).header("x-api-key", "tok2");
    r.json(&body).send().await.unwrap().text().await.unwrap();
    assert!((g2.metered("ns", "cheap").unwrap().cost_usd - 0.11).abs() < 1e-12, "the operator's price");
}

/// Attack 3: a message with web searches, whose input grows during the message. The upstream
/// streams usage as the real API does (`message_delta` cumulative, every field) and bills
/// `claude-sonnet-4-6` at list: 22,000 input ($3), 900 output ($15), 500 cache reads ($0.30),
/// 1,000 one-hour cache writes ($6) and 3 searches ($0.01): $0.11565. Control: reading input
/// from `message_start` only, no searches and writes at 1.25× reports $0.0234. The gateway's
/// figures equal the upstream's, streamed and as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cumulative_usage_and_server_tools_are_metered_as_the_upstream_bills() {
    let start = json!({"input_tokens": 2_000, "output_tokens": 1, "cache_read_input_tokens": 500, "cache_creation_input_tokens": 1_000,
                       "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1_000}, "service_tier": "standard"});
    let delta = |input: u64, output: u64, searches: u64| {
        json!({"type": "message_delta", "delta": {"stop_reason": null}, "usage": {"input_tokens": input, "output_tokens": output,
               "cache_read_input_tokens": 500, "cache_creation_input_tokens": 1_000,
               "server_tool_use": {"web_search_requests": searches, "web_fetch_requests": 0}}})
    };
    let events = vec![
        json!({"type": "message_start", "message": {"model": "claude-sonnet-4-6", "usage": start}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "server_tool_use", "name": "web_search"}}),
        delta(12_000, 300, 2),
        delta(22_000, 900, 3),
        json!({"type": "message_stop"}),
    ];
    let upstream_bill: f64 = (22_000.0 * 3.0 + 900.0 * 15.0 + 500.0 * 0.30 + 1_000.0 * 6.0) / 1e6 + 3.0 * 0.01;
    let naive: f64 = (2_000.0 * 3.0 + 900.0 * 15.0 + 500.0 * 0.30 + 1_000.0 * 3.75) / 1e6;
    assert!((naive - 0.0234).abs() < 1e-12 && (upstream_bill - 0.11565).abs() < 1e-12);
    let json_body = json!({"type": "message", "content": [{"type": "text", "text": "found"}], "usage": {
        "input_tokens": 22_000, "output_tokens": 900, "cache_read_input_tokens": 500, "cache_creation_input_tokens": 1_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1_000},
        "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 0}}});
    let upstream = serve(axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let (events, json_body) = (events.clone(), json_body.clone());
        async move {
            use axum::response::IntoResponse;
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if v["stream"] == true {
                ([("content-type", "text/event-stream")], sse(&events)).into_response()
            } else {
                ([("content-type", "application/json")], json_body.to_string()).into_response()
            }
        }
    }))
    .await;
    for stream in [true, false] {
        let gw = Gateway::start(&upstream, API_KEY).await.unwrap();
        let body = json!({"model": "claude-sonnet-4-6", "max_tokens": 1000, "stream": stream,
                          "messages": [{"role": "user", "content": "search"}],
                          "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]});
        let r = support::http().post(format!("{}/v1/messages", gw.base_url)).header("x-api-key", &gw.token).json(&body);
        let text = r.send().await.unwrap().text().await.unwrap();
        assert!(text.contains(if stream { "message_stop" } else { "found" }), "the answer relayed: {text}");
        let m = gw.metered();
        let u = m.usage;
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens),
            (22_000, 900, 500, 1_000),
            "stream {stream}"
        );
        assert_eq!((m.cache_creation_1h_input_tokens, m.web_search_requests, m.turns), (1_000, 3, 1));
        assert!(
            (m.cost_usd - upstream_bill).abs() < 1e-12,
            "stream {stream}: ${} against the upstream's ${upstream_bill}",
            m.cost_usd
        );
    }
}

/// Attack 4: the agent reads half of a long answer and hangs up. The upstream produces 33,000
/// output tokens of Claude Haiku 4.5 ($5 / MTok) whatever the client does. Control: the client
/// saw about half of the tokens when it left, which is what a meter on the client's side of the
/// stream counted. The gateway reads the answer to its end: it meters all 33,000, bills what the
/// upstream billed, and holds the reservation until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_hangs_up_half_way_still_pays_for_the_whole_answer() {
    const STEPS: u64 = 66;
    let bill = Bill::default();
    // The upstream streams the first half, then the rest once the client has hung up.
    let (hung_up, second_half) = tokio::sync::watch::channel(false);
    let upstream = {
        let bill = bill.clone();
        serve(axum::Router::new().fallback(move || {
            let (bill, mut second_half) = (bill.clone(), second_half.clone());
            async move {
                bill.add((1_000.0 * 1.0 + 33_000.0 * 5.0) / 1e6);
                let mut events = vec![json!({"type": "message_start", "message": {"usage": {"input_tokens": 1_000, "output_tokens": 1}}})];
                for i in 1..=STEPS {
                    events.push(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x".repeat(200)}}));
                    events.push(json!({"type": "message_delta", "delta": {"stop_reason": null}, "usage": {"input_tokens": 1_000, "output_tokens": i * 500}}));
                }
                events.push(json!({"type": "message_stop"}));
                let rest = events.split_off(events.len() / 2);
                let paced = |events: Vec<serde_json::Value>| {
                    futures::StreamExt::then(futures::stream::iter(events), |e| async move {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(sse(&[e])))
                    })
                };
                let later = futures::StreamExt::flatten(futures::stream::once(async move {
                    let _ = second_half.wait_for(|go| *go).await;
                    paced(rest)
                }));
                let chunks = futures::StreamExt::chain(paced(events), later);
                ([("content-type", "text/event-stream")], axum::body::Body::from_stream(chunks))
            }
        }))
        .await
    };
    let gw = agentops::gateway::Gateway::start_with_budget(&upstream, API_KEY, Some(5.0)).await.unwrap();
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 40_000, "stream": true, "messages": [{"role": "user", "content": "long"}]});
    let mut r = support::http()
        .post(format!("{}/v1/messages", gw.base_url))
        .header("x-api-key", &gw.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    let mut client_count = 0;
    while let Some(chunk) = r.chunk().await.unwrap() {
        seen.push_str(&String::from_utf8_lossy(&chunk));
        client_count = seen
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|e| e["usage"]["output_tokens"].as_u64())
            .max()
            .unwrap_or(0);
        if client_count >= 16_500 {
            break;
        }
    }
    drop(r);
    assert_eq!(client_count, 16_500, "the client left having seen half");
    wait_for("the gateway to see the hang-up", || gw.metered().agent_left == 1).await;
    assert!(gw.metered().reserved_usd > 0.0, "the reservation is held while the upstream still produces");
    assert!(gw.metered().usage.output_tokens <= 16_500);
    hung_up.send_replace(true);
    assert!(gw.settled(std::time::Duration::from_secs(10)).await, "the answer was read to its end");
    let m = gw.metered();
    assert_eq!((m.usage.output_tokens, m.usage.input_tokens, m.turns), (33_000, 1_000, 1));
    assert!((m.cost_usd - bill.usd()).abs() < 1e-12, "the gateway's ${} is the upstream's ${}", m.cost_usd, bill.usd());
    assert_eq!((m.reserved_usd, m.settled_at_worst_case), (0.0, 0));

    // The same without streaming: the agent hangs up before the answer's head arrives. The
    // upstream still bills its 20,000 tokens, and so does the gateway.
    let slow = Bill::default();
    let upstream = {
        let slow = slow.clone();
        serve(axum::Router::new().fallback(move || {
            let slow = slow.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                slow.add((1_000.0 * 1.0 + 20_000.0 * 5.0) / 1e6);
                let usage = json!({"input_tokens": 1_000, "output_tokens": 20_000});
                (
                    [("content-type", "application/json")],
                    json!({"type": "message", "content": [], "usage": usage}).to_string(),
                )
            }
        }))
        .await
    };
    let gw = agentops::gateway::Gateway::start_with_budget(&upstream, API_KEY, Some(5.0)).await.unwrap();
    let body =
        json!({"model": "claude-haiku-4-5", "max_tokens": 40_000, "messages": [{"role": "user", "content": "long"}]});
    let r = support::http().post(format!("{}/v1/messages", gw.base_url)).header("x-api-key", &gw.token).json(&body);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(100), r.send()).await.is_err(),
        "the agent left first"
    );
    assert!(gw.settled(std::time::Duration::from_secs(10)).await);
    let m = gw.metered();
    assert_eq!(m.usage.output_tokens, 20_000);
    assert!((m.cost_usd - slow.usd()).abs() < 1e-12 && slow.requests() == 1, "${} against ${}", m.cost_usd, slow.usd());
}

/// An upstream that fetches the document a request names by URL: 150,000 input tokens of
/// Claude Haiku 4.5 ($1 / $5), and a 100-token answer, once `go` is set (requests overlap).
async fn document_fetching_upstream(
    bill: Bill,
    go: tokio::sync::watch::Receiver<bool>,
    arrived: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    serve(axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let (bill, mut go, arrived) = (bill.clone(), go.clone(), arrived.clone());
        async move {
            arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let by_url = v["messages"][0]["content"][0]["source"]["type"] == "url";
            let input = if by_url { 150_000 } else { body.len() as u64 / 4 };
            let output = v["max_tokens"].as_u64().unwrap().min(100);
            let _ = go.wait_for(|go| *go).await;
            bill.add((input as f64 * 1.0 + output as f64 * 5.0) / 1e6);
            let events = [
                json!({"type": "message_start", "message": {"usage": {"input_tokens": input, "output_tokens": 1}}}),
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"input_tokens": input, "output_tokens": output}}),
                json!({"type": "message_stop"}),
            ];
            ([("content-type", "text/event-stream")], sse(&events))
        }
    }))
    .await
}

/// Attack 5: twelve concurrent small requests, each naming a document by URL that the upstream
/// reads as 150,000 input tokens ($0.1505 each). Control: admitted all at once (their bytes
/// promise a few tokens), they cost $1.806 against a $1 budget. The gateway holds each at
/// Haiku 4.5's whole context window (200,000 tokens at the $2 one-hour write rate, plus output:
/// $0.405): two fit in $1, the rest are refused, and the upstream's bill stays within $1, also
/// over a second wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_documents_by_url_cannot_overshoot_the_budget() {
    use agentops::gateway::{Account, BUDGET_SPENT};
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 1000, "stream": true,
                      "messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "https://example.com/big.pdf"}}]}]});
    let client = support::http();
    let burst = |url: String, token: &'static str| {
        let reqs = (0..12).map(|_| {
            let r = client.post(url.clone()).header("x-api-key", token).json(&body);
            async move {
                let r = r.send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        });
        futures::future::join_all(reqs)
    };
    // Control: every request admitted.
    let control = Bill::default();
    let direct =
        document_fetching_upstream(control.clone(), tokio::sync::watch::channel(true).1, Default::default()).await;
    let answers = burst(format!("{direct}/v1/messages"), "none").await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    assert!((control.usd() - 12.0 * 0.1505).abs() < 1e-9, "${}", control.usd());

    let bill = Bill::default();
    let (go, wait) = tokio::sync::watch::channel(false);
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstream = document_fetching_upstream(bill.clone(), wait, arrived.clone()).await;
    let (g, base) = controller_gateway(&upstream).await;
    g.open("ns", "docs", Account::new(API_KEY, "tok", Some(1.0)));
    let url = format!("{base}/gateway/ns/docs/v1/messages");
    // The upstream answers once all twelve were either relayed or refused: all overlap.
    let release = async {
        for _ in 0..500 {
            let refused = g.metered("ns", "docs").unwrap().refused_over_budget as usize;
            if arrived.load(std::sync::atomic::Ordering::SeqCst) + refused >= 12 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        go.send_replace(true);
    };
    let (answers, ()) = tokio::join!(burst(url.clone(), "tok"), release);
    let admitted = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(admitted, 2, "what $1 holds at $0.405 each");
    for (status, text) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 400);
        assert!(text.contains(BUDGET_SPENT) && text.contains("whole context window"), "{text}");
    }
    assert!(bill.usd() <= 1.0 && (bill.usd() - 2.0 * 0.1505).abs() < 1e-9, "${}", bill.usd());
    // A second burst, once the first is over: still within $1.
    let answers = burst(url, "tok").await;
    assert!(answers.iter().filter(|(s, _)| *s == 200).count() >= 1);
    let m = g.metered("ns", "docs").unwrap();
    assert!(bill.usd() <= 1.0, "the upstream billed ${}", bill.usd());
    assert!((m.cost_usd - bill.usd()).abs() < 1e-9, "the gateway's ${} is the upstream's ${}", m.cost_usd, bill.usd());
    assert_eq!(m.reserved_usd, 0.0);
}

/// The pinned Claude Code CLI through the gateway: every request it sends (its betas, its
/// bodies) passes the strict reading, and the models it names by default have rows of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pinned_clis_requests_pass_the_strict_reading_and_price_by_their_own_rows() {
    use agentops::gateway::{prices::PriceTable, request::ALLOWED_BETAS};
    let model = FakeAnthropic::start(vec![
        Step::tool("Write", json!({"file_path": "a.txt", "content": "a\n"})).with_usage([3_000, 40, 1_000, 200]),
        Step::text("done"),
    ])
    .await;
    let gw = agentops::gateway::Gateway::start_with_budget(&model.base_url, API_KEY, Some(50.0)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (home, work) = (dir.path().join("home"), dir.path().join("work"));
    std::fs::create_dir_all(home.join("tmp")).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(support::claude_bin())
            .args(["-p", "write a.txt", "--output-format", "stream-json", "--verbose"])
            .args(["--permission-mode", "bypassPermissions", "--no-session-persistence"])
            .current_dir(&work)
            .env("HOME", &home)
            .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
            .env("TMPDIR", home.join("tmp"))
            .env("IS_SANDBOX", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_TELEMETRY", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("ANTHROPIC_BASE_URL", &gw.base_url)
            .env("ANTHROPIC_API_KEY", &gw.token)
            .output(),
    )
    .await
    .expect("the CLI finished")
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(std::fs::read_to_string(work.join("a.txt")).unwrap(), "a\n", "the run worked through the gateway");
    let m = gw.metered();
    assert_eq!((m.refused_invalid, m.refused_over_budget), (0, 0), "nothing the CLI sent was refused");
    let table = PriceTable::list();
    let seen = model.seen();
    assert!(seen.iter().filter(|s| s.main).count() >= 2);
    for s in &seen {
        for beta in s.beta.iter().flat_map(|b| b.split(',')) {
            assert!(ALLOWED_BETAS.contains(&beta.trim()), "{beta}");
        }
        let id = s.body["model"].as_str().unwrap();
        assert!(table.price(id).known, "the CLI's model {id} has a row");
    }
    assert_eq!(m.model.as_deref(), Some("claude-opus-5-5"), "the CLI's default model");
    assert!(m.cost_usd > 0.0 && m.by_model.keys().all(|k| table.price(k).known), "{:?}", m.by_model.keys());
}

/// One execution's agent uploads bodies of 20 MiB at once to an upstream that takes nothing
/// (each body stays in the gateway's memory until sent): the execution's budget of bytes
/// (48 MiB) refuses the rest with 429, before it is all read, while another execution's
/// request is still read and forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bytes_in_memory_are_bounded_per_execution() {
    use agentops::gateway::Account;
    use agentops::gateway::bodies::EXECUTION_BYTES;
    // An upstream that accepts connections and never reads.
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", stall.local_addr().unwrap());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = stall.accept().await {
            keep.lock().unwrap().push(sock);
        }
    });
    let (g, base) = controller_gateway(&upstream).await;
    g.open("ns", "greedy", Account::new(API_KEY, "tok-g", None));
    g.open("ns", "other", Account::new(API_KEY, "tok-o", None));
    let big = |n: usize| {
        let pad = "x".repeat(n);
        json!({"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": pad}]})
            .to_string()
    };
    let body = big(20 << 20);
    let client = support::http();
    let send = |name: &'static str, token: &'static str, body: String| {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let r = client
                .post(format!("{base}/gateway/ns/{name}/v1/messages"))
                .header("x-api-key", token)
                .header("content-type", "application/json")
                .body(body)
                .send();
            match tokio::time::timeout(std::time::Duration::from_secs(5), r).await {
                Ok(Ok(r)) => Some((r.status().as_u16(), r.text().await.unwrap_or_default())),
                Ok(Err(_)) => Some((0, String::new())),
                Err(_) => None, // still held upstream: it was read and forwarded
            }
        })
    };
    let greedy: Vec<_> = (0..4).map(|_| send("greedy", "tok-g", body.clone())).collect();
    let mut refused = 0;
    let mut forwarded = 0;
    for t in greedy {
        match t.await.unwrap() {
            Some((429, text)) => {
                assert!(text.contains("request bytes"), "{text}");
                refused += 1;
            }
            // Refused before its body was read: the connection closed under the upload, which
            // the client sees as a send error rather than the 429.
            Some((0, _)) => refused += 1,
            None => forwarded += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(forwarded * (20 << 20) <= EXECUTION_BYTES, "at most the budget forwarded: {forwarded}");
    assert!(refused >= 2 && forwarded >= 1, "refused {refused}, forwarded {forwarded}");
    // Another execution is not starved by the greedy one.
    let other = send("other", "tok-o", big(1 << 20)).await.unwrap();
    assert_eq!(other, None, "the other execution's request was read and forwarded");
}

/// One tenant's four executions declare 30 MiB bodies and send none of them (holding the room
/// their length claims): three fit their namespace's share (96 MiB), the fourth is refused, and
/// another namespace's agent is still served by the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_namespace_cannot_take_the_gateways_room_from_another() {
    use agentops::gateway::Account;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let model = FakeAnthropic::start(vec![Step::text("hi")]).await;
    let (g, base) = controller_gateway(&model.base_url).await;
    for i in 0..4 {
        g.open("tenant-a", &format!("a{i}"), Account::new(API_KEY, &format!("tok-a{i}"), None));
    }
    g.open("tenant-b", "b", Account::new(API_KEY, "tok-b", None));
    let addr = base.trim_start_matches("http://").to_string();
    let mut stalled = Vec::new();
    let mut answers = Vec::new();
    for i in 0..4 {
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /gateway/tenant-a/a{i}/v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: tok-a{i}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{",
            30 << 20
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let answer = tokio::time::timeout(std::time::Duration::from_millis(500), sock.read(&mut buf)).await;
        answers.push(answer.ok().and_then(|r| r.ok()).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()));
        stalled.push(sock);
    }
    assert!(answers[..3].iter().all(Option::is_none), "three fit the namespace's share: {answers:?}");
    assert!(answers[3].as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 429")), "{answers:?}");
    let r = ask(&format!("{base}/gateway/tenant-b/b"), "tok-b").await.unwrap();
    assert_eq!(r.status(), 200, "another tenant is served");
    drop(stalled);
}

/// Waits (at most 10 s) until `done` says yes: the event a negative assertion follows.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The controller's gateway relays an execution's remote MCP server at
/// `/gateway/{ns}/{name}/mcp/{server}`: only with the execution's token (checked before the
/// body is read), only to the configured URL (no other path, no query, no other server, no
/// redirect followed: a redirect would carry the header elsewhere), adding the Secret-backed
/// header and never the agent's token; relayed requests are counted by server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_relays_mcp_only_to_the_configured_url_with_its_header() {
    use agentops::api::{McpHeader, McpServer, SecretKeyRef};
    use agentops::gateway::{Account, mcp};
    use std::sync::atomic::{AtomicUsize, Ordering};
    const VALUE: &str = "hdr-value-5e8d2a91";
    let tracker = support::fake_mcp::FakeMcp::start().await;
    // Where a hostile (or compromised) server would send the header by redirecting.
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let elsewhere = serve(axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { "got it" }
    }))
    .await;
    let target = format!("{elsewhere}/steal");
    let redirecting =
        serve(axum::Router::new().fallback(move || async move { axum::response::Redirect::temporary(&target) })).await;
    let server = |name: &str, url: String| McpServer {
        name: name.into(),
        url: Some(url),
        headers_from: vec![McpHeader {
            name: "X-Tracker-Token".into(),
            secret_key_ref: SecretKeyRef { name: "tracker-token".into(), key: None },
        }],
        ..Default::default()
    };
    let servers = [server("tracker", tracker.url.clone()), server("moved", format!("{redirecting}/mcp"))];
    let routes = mcp::routes(&servers, &mcp::McpRules::default(), |_, _| Ok(VALUE.to_string())).unwrap();
    let (g, base) = local_mcp_gateway("http://127.0.0.1:9").await;
    g.open("ns", "ax", Account::new(API_KEY, "token-of-ax", None).with_mcp(routes));
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}});
    let post = |path: &str, token: Option<&str>| {
        let mut req = support::http()
            .post(format!("{base}/gateway/ns/ax/mcp/{path}"))
            .header("accept", "application/json, text/event-stream")
            .json(&init);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };

    assert_eq!(post("tracker", None).await.unwrap().status(), 401);
    assert_eq!(post("tracker", Some(API_KEY)).await.unwrap().status(), 401, "not even the API key");
    assert!(tracker.seen().is_empty(), "nothing reached the server");

    let ok = post("tracker", Some("token-of-ax")).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["mcp-session-id"], "session-7d2a", "the session header comes back");
    assert!(ok.text().await.unwrap().contains("\"serverInfo\""));
    let seen = tracker.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-tracker-token"), Some(VALUE));
    assert_eq!(seen[0].header("authorization"), None, "the agent's token stays at the gateway");

    for path in ["tracker/other", "tracker?endpoint=%2Fsteal", "tracker%2F..%2Fx", "unknown", "tracker/"] {
        let status = post(path, Some("token-of-ax")).await.unwrap().status();
        assert_eq!(status, 404, "{path}");
    }
    assert_eq!(tracker.seen().len(), 1, "none of those reached the server");
    assert_eq!(post("moved", Some("token-of-ax")).await.unwrap().status(), 502, "a redirect is not followed");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect's target got nothing");
    let m = g.metered("ns", "ax").unwrap();
    assert_eq!(m.mcp_requests.get("tracker"), Some(&1));
    assert_eq!(m.refused_not_allowed, 5, "{:?}", m.last_refused);

    g.close("ns", "ax");
    assert_eq!(post("tracker", Some("token-of-ax")).await.unwrap().status(), 401, "the run is over");
}

/// The gateway enforces the MCP part of the agent's permission rules itself: the agent has a
/// shell, reads its route and token from its MCP config and can POST any JSON-RPC to it without
/// the CLI. A `tools/call` of a tool the rules deny (or an allow list does not name) is answered
/// with a JSON-RPC error and never reaches the server; `tools/list` answers offer only the
/// allowed tools; what is not JSON-RPC is refused. The control: the same call without the rules
/// reaches the server with its header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_mcp_tool_calls_the_rules_do_not_allow() {
    use agentops::api::{AgentConfig, McpHeader, McpServer, Permissions, SecretKeyRef};
    use agentops::gateway::{Account, mcp};
    let tracker = support::fake_mcp::FakeMcp::start().await;
    let servers = [McpServer {
        name: "tracker".into(),
        url: Some(tracker.url.clone()),
        headers_from: vec![McpHeader {
            name: "X-Tracker-Token".into(),
            secret_key_ref: SecretKeyRef { name: "tracker-token".into(), key: None },
        }],
        ..Default::default()
    }];
    let config = |allow: &[&str], deny: &[&str]| AgentConfig {
        permissions: Some(Permissions {
            allow: allow.iter().map(|r| r.to_string()).collect(),
            deny: deny.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (g, base) = local_mcp_gateway("http://127.0.0.1:9").await;
    let open = |name: &str, rules: mcp::McpRules| {
        let routes = mcp::routes(&servers, &rules, |_, _| Ok("hdr-value-2b7c".to_string())).unwrap();
        g.open("ns", name, Account::new(API_KEY, &format!("token-of-{name}"), None).with_mcp(routes));
    };
    open("control", mcp::McpRules::default());
    open("denied", mcp::McpRules::of(&config(&[], &["mcp__tracker__delete_all"]), &[], &[]));
    open("listed", mcp::McpRules::of(&AgentConfig::default(), &["mcp__tracker__lookup".into(), "Bash".into()], &[]));
    open("whole", mcp::McpRules::of(&config(&["mcp__tracker"], &[]), &[], &[]));
    open("starred", mcp::McpRules::of(&AgentConfig::default(), &[], &["mcp__tracker__*".into()]));
    let post = |name: &str, body: String| {
        support::http()
            .post(format!("{base}/gateway/ns/{name}/mcp/tracker"))
            .bearer_auth(format!("token-of-{name}"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", "session-7d2a")
            .body(body)
            .send()
    };
    let call =
        |tool: &str| json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": tool}}).to_string();
    let calls = || tracker.seen().iter().filter(|s| s.body["method"] == "tools/call").count();

    // The control: without rules the agent's own POST reaches the server, header added.
    let ok = post("control", call("delete_all")).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(calls(), 1);
    assert_eq!(tracker.seen()[0].header("x-tracker-token"), Some("hdr-value-2b7c"));

    let refused = post("denied", call("delete_all")).await.unwrap();
    assert_eq!(refused.status(), 403);
    let answer: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(answer["id"], 7, "{answer}");
    assert!(
        answer["error"]["message"].as_str().unwrap().contains("do not allow the MCP tool mcp__tracker__delete_all"),
        "{answer}"
    );
    // A batch hiding it, and a name the CLI would write the same way, are refused too.
    let batch = format!("[{},{}]", call("lookup"), call("delete_all"));
    assert_eq!(post("denied", batch).await.unwrap().status(), 403);
    assert_eq!(post("denied", call("delete.all")).await.unwrap().status(), 403);
    assert_eq!(calls(), 1, "none of those reached the server");
    assert_eq!(post("denied", call("lookup")).await.unwrap().status(), 200, "what is not denied runs");
    assert_eq!(calls(), 2);
    for not_jsonrpc in ["delete_all", "{\"method\":\"tools/call\",\"params\":{\"name\":\"delete_all\"}}", "[]", "7"] {
        assert_eq!(post("denied", not_jsonrpc.into()).await.unwrap().status(), 400, "{not_jsonrpc}");
    }
    let m = g.metered("ns", "denied").unwrap();
    assert_eq!(m.refused_not_allowed, 7, "{:?}", m.last_refused);
    assert_eq!(m.mcp_requests.get("tracker"), Some(&1), "only the allowed call was relayed");

    // An allow list naming MCP tools: only those; `mcp__server` allows all; `mcp__server__*` denies all.
    assert_eq!(post("listed", call("delete_all")).await.unwrap().status(), 403);
    assert_eq!(post("listed", call("lookup")).await.unwrap().status(), 200);
    assert_eq!(post("whole", call("delete_all")).await.unwrap().status(), 200);
    assert_eq!(post("starred", call("lookup")).await.unwrap().status(), 403);

    // The tool list offers only what may be called.
    let list = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}).to_string();
    let names = |v: serde_json::Value| -> Vec<String> {
        v["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names(post("control", list.clone()).await.unwrap().json().await.unwrap()), ["lookup", "delete_all"]);
    assert_eq!(names(post("denied", list.clone()).await.unwrap().json().await.unwrap()), ["lookup"]);
    assert_eq!(names(post("starred", list).await.unwrap().json().await.unwrap()), Vec::<String>::new());
}

/// SSE transport: the agent POSTs only to an endpoint the server announced on its stream, named
/// by the opaque id the gateway gave it; a path of its own choosing on the server's origin
/// (`?endpoint=/admin/...`, the old form) is refused and never gets the header. Tool lists on the
/// stream are filtered like JSON ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_relays_sse_posts_only_to_announced_endpoints() {
    use agentops::api::{AgentConfig, McpHeader, McpServer, McpTransport, Permissions, SecretKeyRef};
    use agentops::gateway::{Account, mcp};
    let tracker = support::fake_mcp::FakeMcp::start().await;
    let servers = [McpServer {
        name: "tracker".into(),
        url: Some(tracker.sse_url.clone()),
        transport: Some(McpTransport::Sse),
        headers_from: vec![McpHeader {
            name: "X-Tracker-Token".into(),
            secret_key_ref: SecretKeyRef { name: "tracker-token".into(), key: None },
        }],
        ..Default::default()
    }];
    let config = AgentConfig {
        permissions: Some(Permissions { deny: vec!["mcp__tracker__delete_all".into()], ..Default::default() }),
        ..Default::default()
    };
    let rules = mcp::McpRules::of(&config, &[], &[]);
    let routes = mcp::routes(&servers, &rules, |_, _| Ok("hdr-value-91c3".to_string())).unwrap();
    let (g, base) = local_mcp_gateway("http://127.0.0.1:9").await;
    g.open("ns", "ax", Account::new(API_KEY, "token-of-ax", None).with_mcp(routes));
    let route = format!("{base}/gateway/ns/ax/mcp/tracker");
    let mut stream = support::http().get(&route).bearer_auth("token-of-ax").send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut seen = String::new();
    let mut read_until = async |what: &str, seen: &mut String| {
        while !seen.contains(what) {
            let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), stream.chunk()).await;
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap().unwrap()));
        }
    };
    read_until("\n\n", &mut seen).await;
    assert!(
        !seen.contains("messages") && !seen.contains("session-7d2a"),
        "the server's endpoint stays at the gateway: {seen}"
    );
    let id = seen.split("data: ?endpoint=").nth(1).unwrap().trim().to_string();
    let post = |query: String, body: serde_json::Value| {
        support::http().post(format!("{route}?{query}")).bearer_auth("token-of-ax").json(&body).send()
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}});
    for query in ["endpoint=%2Fadmin%2Frotate-keys%3Fall%3D1", "endpoint=%2Fmessages%3FsessionId%3Dsession-7d2a"] {
        assert_eq!(post(query.into(), init.clone()).await.unwrap().status(), 404, "{query}");
    }
    assert_eq!(tracker.seen().len(), 1, "only the stream's GET reached the server");
    assert_eq!(post(format!("endpoint={id}"), init).await.unwrap().status(), 202);
    let posted = tracker.seen();
    assert_eq!((posted[1].path.as_str(), posted[1].header("x-tracker-token")), ("/messages", Some("hdr-value-91c3")));
    read_until("serverInfo", &mut seen).await;

    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    assert_eq!(post(format!("endpoint={id}"), list).await.unwrap().status(), 202);
    // The gateway passes whole events: the answer is all there once its id is.
    read_until("\"id\":2", &mut seen).await;
    let listed = seen.split("data: ").last().unwrap();
    assert!(listed.contains("lookup") && !listed.contains("delete_all"), "{listed}");
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "delete_all"}});
    assert_eq!(post(format!("endpoint={id}"), call).await.unwrap().status(), 403);
    assert_eq!(tracker.seen().len(), 3, "the refused call did not reach the server");
}

/// In a cluster the relay runs in the controller, whose loopback holds its own unauthenticated
/// ports (metrics) and whose link-local range holds the cloud metadata service: a remote MCP
/// server there is refused, on the address connected to (a name resolving to 127.0.0.1 too),
/// with the field named. The control: the same server reached by a gateway that allows loopback
/// (as `agentops run` on one machine does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_gateway_refuses_mcp_servers_on_its_own_loopback() {
    use agentops::api::McpServer;
    use agentops::gateway::{Account, mcp};
    let tracker = support::fake_mcp::FakeMcp::start().await;
    let port = url::Url::parse(&tracker.url).unwrap().port().unwrap();
    let servers: Vec<McpServer> = [
        ("ip", format!("http://127.0.0.1:{port}/mcp")),
        ("name", format!("http://localhost:{port}/mcp")),
        ("mapped", format!("http://[::ffff:127.0.0.1]:{port}/mcp")),
        ("metadata", "http://169.254.169.254/latest/meta-data/".to_string()),
        ("zero", format!("http://0.0.0.0:{port}/mcp")),
    ]
    .into_iter()
    .map(|(name, url)| McpServer { name: name.into(), url: Some(url), ..Default::default() })
    .collect();
    let routes = mcp::routes(&servers, &mcp::McpRules::default(), |_, _| Ok(String::new())).unwrap();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}});
    let post = |base: &str, name: &str| {
        support::http()
            .post(format!("{base}/gateway/ns/ax/mcp/{name}"))
            .bearer_auth("token-of-ax")
            .header("accept", "application/json, text/event-stream")
            .json(&init)
            .send()
    };
    let (local, local_base) = local_mcp_gateway("http://127.0.0.1:9").await;
    local.open("ns", "ax", Account::new(API_KEY, "token-of-ax", None).with_mcp(routes.clone()));
    assert_eq!(post(&local_base, "ip").await.unwrap().status(), 200, "the control: loopback reached");
    assert_eq!(post(&local_base, "name").await.unwrap().status(), 200);
    assert_eq!(tracker.seen().len(), 2);

    let (g, base) = controller_gateway("http://127.0.0.1:9").await;
    g.open("ns", "ax", Account::new(API_KEY, "token-of-ax", None).with_mcp(routes));
    for name in ["ip", "mapped", "metadata", "zero"] {
        let refused = post(&base, name).await.unwrap();
        assert_eq!(refused.status(), 403, "{name}");
        let text = refused.text().await.unwrap();
        assert!(text.contains(&format!("spec.agent.mcpServers[{name}].url")) && text.contains("loopback"), "{text}");
    }
    let by_name = post(&base, "name").await.unwrap();
    assert_eq!(by_name.status(), 502);
    let text = by_name.text().await.unwrap();
    assert!(text.contains("spec.agent.mcpServers[name].url resolves only to loopback"), "{text}");
    assert_eq!(tracker.seen().len(), 2, "nothing more reached the server");
}

/// A server that reflects its request headers into its answer (a debug endpoint, or a hostile
/// server) does not hand the Secret's value to the agent: the gateway redacts the values it
/// added, also when one is split across chunks. The control: the server's own answer has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_redacts_its_header_values_from_mcp_answers() {
    use agentops::api::{McpHeader, McpServer, SecretKeyRef};
    use agentops::gateway::{Account, mcp};
    const VALUE: &str = "Bearer tracker-secret-77c1e0";
    // Answers with the header it got, cut in two chunks in the middle of the value.
    let reflecting = serve(axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        let got = headers.get("authorization").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let text = format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{{\"echo\":\"{got}\"}}}}");
        let (a, b) = text.split_at(text.find("secret").unwrap());
        let chunks = vec![Ok::<_, std::convert::Infallible>(a.to_string()), Ok(b.to_string())];
        ([("content-type", "application/json")], axum::body::Body::from_stream(futures::stream::iter(chunks)))
    }))
    .await;
    let control = support::http().post(&reflecting).header("authorization", VALUE).send().await.unwrap();
    assert!(control.text().await.unwrap().contains(VALUE), "the control: the server reflects it");

    let servers = [McpServer {
        name: "mirror".into(),
        url: Some(format!("{reflecting}/mcp")),
        headers_from: vec![McpHeader {
            name: "Authorization".into(),
            secret_key_ref: SecretKeyRef { name: "mirror-token".into(), key: None },
        }],
        ..Default::default()
    }];
    let routes = mcp::routes(&servers, &mcp::McpRules::default(), |_, _| Ok(VALUE.to_string())).unwrap();
    let (g, base) = local_mcp_gateway("http://127.0.0.1:9").await;
    g.open("ns", "ax", Account::new(API_KEY, "token-of-ax", None).with_mcp(routes));
    let answer = support::http()
        .post(format!("{base}/gateway/ns/ax/mcp/mirror"))
        .bearer_auth("token-of-ax")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let text = answer.text().await.unwrap();
    assert!(!text.contains("tracker-secret-77c1e0"), "{text}");
    assert_eq!(text, r#"{"jsonrpc":"2.0","id":1,"result":{"echo":"[redacted]"}}"#);
}
