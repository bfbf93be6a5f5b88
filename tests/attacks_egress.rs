//! Attack review of the controller's egress proxy (egress by host name in a cluster).
//! `attack_*` assert the secure behaviour (each failed while its hole existed, before the fix);
//! `held_*` show what held.
//! All traffic stays on loopback: names are mapped by injected resolvers.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentops::api::AgentExecution;
use agentops::controller::{self, ControllerConfig, ExecutorKind};
use agentops::gateway::egress::{CidrRule, EgressListener, EgressPolicy, EgressProxy, HostRule, Resolver};
use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::kube_api::FakeKube;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const AX: &str = "apis/agentops.dev/v1alpha1";
const CORE: &str = "api/v1";

// ---------------------------------------------------------------- helpers

/// `allowed.test`, `other.test` → 127.0.0.1; `mixed.test` → 10.0.0.1 and 127.0.0.1;
/// `mapped.test` → ::ffff:127.0.0.1; `nat64.test` → 64:ff9b::7f00:1 (127.0.0.1);
/// `meta.test` → 169.254.169.254. Every name asked is recorded.
fn resolver(asked: Arc<Mutex<Vec<String>>>) -> Resolver {
    Arc::new(move |host: String, port: u16| {
        asked.lock().unwrap().push(host.clone());
        Box::pin(async move {
            let v4 = |a: [u8; 4]| SocketAddr::from((a, port));
            // The controller's proxy asks for names fully qualified (`allowed.test.`).
            match host.trim_end_matches('.') {
                "allowed.test" | "other.test" | "sub.allowed.test" => Ok(vec![v4([127, 0, 0, 1])]),
                "mixed.test" => Ok(vec![v4([10, 0, 0, 1]), v4([127, 0, 0, 1])]),
                "mapped.test" => Ok(vec![SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), port)]),
                "nat64.test" => Ok(vec![SocketAddr::new("64:ff9b::7f00:1".parse().unwrap(), port)]),
                "meta.test" => Ok(vec![v4([169, 254, 169, 254])]),
                _ => Err(std::io::Error::other("no such host")),
            }
        })
    })
}

/// A loopback origin that counts connections and answers every request head with a line.
struct Origin {
    port: u16,
    connections: Arc<AtomicU64>,
}

async fn origin() -> Origin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicU64::new(0));
    let c = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                loop {
                    match tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                    while let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..at + 4);
                        let body = "hello\n";
                        let a = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                        if sock.write_all(a.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Origin { port, connections }
}

fn auth(user: &str, token: &str) -> String {
    format!(
        "Proxy-Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
    )
}

/// Sends `text` on a fresh connection to the proxy; returns what came back within 3 s.
async fn raw(proxy: SocketAddr, text: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let _ = s.write_all(text.as_bytes()).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

// ---------------------------------------------------------------- exhaustion

/// 128 connections that never send a byte (no token needed: any pod that reaches the proxy port,
/// e.g. any tenant's runner) fill `MAX_UNPROVEN`; every further connection, a running
/// execution's with its valid token included, is accepted and dropped at once, for as long as
/// the attacker renews them (each is held 30 s). One tenant denies egress to every tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_silent_unauthenticated_connections_lock_every_execution_out() {
    let o = origin().await;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let proxy =
        EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver(asked), Duration::from_secs(30)).await.unwrap();
    proxy.open(
        "tok-victim",
        EgressPolicy {
            hosts: vec![HostRule::parse(&format!("allowed.test:{}", o.port)).unwrap()],
            cidrs: vec![CidrRule::parse("127.0.0.1/32", vec![o.port]).unwrap()],
        },
    );
    let mut silent = Vec::new();
    for _ in 0..130 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = raw(
        proxy.addr,
        &format!(
            "GET http://allowed.test:{}/ HTTP/1.1\r\nHost: allowed.test\r\n{}\r\n",
            o.port,
            auth("ns.victim", "tok-victim")
        ),
    )
    .await;
    drop(silent);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "a running execution with its valid token was turned away while 130 silent, unauthenticated \
         connections were open: got {answer:?}"
    );
}

// ---------------------------------------------------------------- hostile text

/// A CONNECT target of 15,000 characters is kept whole in the refusal record, and so in
/// `status.egress.refusedHosts` (20 of them: ~300 KB in every status write and watch event; the
/// CRD sets no maxLength), the store's log and the proxy's answer. A DNS name is ≤ 253.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_refused_host_name_is_bounded_in_the_status() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let proxy =
        EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver(asked), Duration::from_secs(30)).await.unwrap();
    proxy.open("tok", EgressPolicy { hosts: vec![HostRule::parse("allowed.test").unwrap()], cidrs: vec![] });
    for i in 0..20 {
        let host = format!("{i}{}", "a".repeat(15_000));
        let answer = raw(proxy.addr, &format!("CONNECT {host}:443 HTTP/1.1\r\n{}\r\n", auth("ns.x", "tok"))).await;
        // Refused as not a host name at all (400, not recorded), or as not allowed (403).
        let line = status_line(&answer);
        assert!(line.contains("400") || line.contains("403"), "{line}");
    }
    let s = proxy.tally("tok").unwrap().summary();
    let total: usize = s.refused_hosts.iter().map(|h| h.len()).sum();
    assert!(
        s.refused_hosts.iter().all(|h| h.len() <= 300),
        "status.egress.refusedHosts carries {} entries, {total} bytes in all (longest {})",
        s.refused_hosts.len(),
        s.refused_hosts.iter().map(|h| h.len()).max().unwrap_or(0)
    );
}

/// Escape sequences and bidi overrides in a host name do not reach the summary (status, Event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_escape_sequences_in_a_refused_host_are_cleaned() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let proxy =
        EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver(asked), Duration::from_secs(30)).await.unwrap();
    proxy.open("tok", EgressPolicy { hosts: vec![HostRule::parse("allowed.test").unwrap()], cidrs: vec![] });
    let host = "evil\u{1b}]52;c;cHduZWQ=\u{7}\u{1b}[2K\u{202e}moc.test";
    let answer = raw(proxy.addr, &format!("CONNECT {host}:443 HTTP/1.1\r\n{}\r\n", auth("ns.x", "tok"))).await;
    let line = status_line(&answer);
    assert!(line.contains("400") || line.contains("403"), "{answer:?}");
    let s = proxy.tally("tok").unwrap().summary();
    assert!(s.refused_hosts.len() <= 1);
    assert!(
        s.refused_hosts.iter().all(|h| !h.chars().any(|c| c.is_control() || c == '\u{202e}')),
        "{:?}",
        s.refused_hosts
    );
}

// ---------------------------------------------------------------- reaching what is not allowed

/// Request-target tricks against a proxy whose CIDR rule would let anything on 127.0.0.1 through:
/// only `allowed.test:<A>` is in the host rules. `other.test` (and origin B) must never be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_target_tricks_reach_only_the_named_host_and_port() {
    let a = origin().await;
    let b = origin().await;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let proxy =
        EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver(asked), Duration::from_secs(30)).await.unwrap();
    proxy.open(
        "tok",
        EgressPolicy {
            hosts: vec![
                HostRule::parse(&format!("allowed.test:{}", a.port)).unwrap(),
                HostRule::parse(&format!("*.allowed.test:{}", a.port)).unwrap(),
            ],
            cidrs: vec![CidrRule::parse("127.0.0.0/8", vec![]).unwrap()],
        },
    );
    let au = auth("ns.x", "tok");
    let (pa, pb) = (a.port, b.port);
    let refused = [
        format!("CONNECT allowed.test:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT other.test:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT ALLOWED.TEST.:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT allowed.test:{pa}:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT 127.0.0.1:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT 2130706433:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT 0x7f.1:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT [::ffff:127.0.0.1]:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT allowed.test.other.test:{pb} HTTP/1.1\r\n{au}\r\n"),
        format!("CONNECT xallowed.test:{pa} HTTP/1.1\r\n{au}\r\n"),
        format!("GET http://allowed.test:{pa}@other.test:{pb}/ HTTP/1.1\r\n{au}\r\n"),
        format!("GET http://other.test:{pb}#@allowed.test:{pa}/ HTTP/1.1\r\n{au}\r\n"),
        format!("GET http://other.test:{pb}\\@allowed.test:{pa}/ HTTP/1.1\r\n{au}\r\n"),
        format!("GET http://2130706433:{pb}/ HTTP/1.1\r\n{au}\r\n"),
        format!("GET http://0x7f.1:{pb}/ HTTP/1.1\r\n{au}\r\n"),
        format!("GET http://[::ffff:7f00:1]:{pb}/ HTTP/1.1\r\n{au}\r\n"),
        format!("GET https://allowed.test:{pa}/ HTTP/1.1\r\n{au}\r\n"),
        format!("GET /relative HTTP/1.1\r\nHost: allowed.test:{pa}\r\n{au}\r\n"),
        format!("GET http://allowed.test:{pa}/ HTTP/2.0\r\n{au}\r\n"),
    ];
    for req in &refused {
        let answer = raw(proxy.addr, req).await;
        assert!(!answer.starts_with("HTTP/1.1 200"), "{req:?} → {answer:?}");
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 0, "origin B was reached");
    assert_eq!(a.connections.load(Ordering::SeqCst), 0, "origin A was reached by a refused form");

    // Pipelining / keep-alive: a second request on the same connection naming another host goes
    // to the same upstream socket (the allowed host's address), never to a new destination.
    let answer = raw(
        proxy.addr,
        &format!(
            "GET http://allowed.test:{pa}/ HTTP/1.1\r\nConnection: keep-alive\r\n{au}\r\n\
             GET http://other.test:{pb}/ HTTP/1.1\r\nHost: other.test\r\n{au}\r\n"
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let answer = raw(
        proxy.addr,
        &format!("CONNECT sub.allowed.test:{pa} HTTP/1.1\r\n{au}\r\nCONNECT other.test:{pb} HTTP/1.1\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(b.connections.load(Ordering::SeqCst), 0, "a pipelined request switched hosts");
}

/// The controller's proxy (no `allow_local`): loopback and link-local are refused whatever the
/// rules say: an address named in a rule, a /0 CIDR, IPv4-mapped and NAT64 forms, and a hostile
/// DNS answer mixing a private and a loopback address. Origin A (on loopback) is never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_the_controllers_proxy_never_reaches_loopback_or_metadata() {
    let a = origin().await;
    let pa = a.port;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = EgressProxy::serve_controllers(
        EgressListener { listener, resolver: resolver(asked), allow_local: false },
        Duration::from_secs(30),
    )
    .unwrap();
    let hosts = [
        "allowed.test",
        "mixed.test",
        "mapped.test",
        "nat64.test",
        "meta.test",
        "127.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "0.0.0.0",
        "169.254.169.254",
    ];
    proxy.open(
        "tok",
        EgressPolicy {
            hosts: hosts.iter().map(|h| HostRule::parse(&format!("{h}:{pa}")).unwrap()).collect(),
            cidrs: vec![CidrRule::parse("0.0.0.0/0", vec![]).unwrap(), CidrRule::parse("::/0", vec![]).unwrap()],
        },
    );
    let au = auth("ns.x", "tok");
    for h in hosts {
        for req in
            [format!("CONNECT {h}:{pa} HTTP/1.1\r\n{au}\r\n"), format!("GET http://{h}:{pa}/ HTTP/1.1\r\n{au}\r\n")]
        {
            let answer = raw(proxy.addr, &req).await;
            assert!(!answer.starts_with("HTTP/1.1 200"), "{req:?} → {answer:?}");
        }
    }
    assert_eq!(a.connections.load(Ordering::SeqCst), 0, "the controller's proxy reached loopback");
}

/// In a cluster the controller's resolver is getaddrinfo with the pod's `search` list and
/// `ndots:5`: `pypi.org` is tried as `pypi.org.<ns>.svc.cluster.local`, then
/// `pypi.org.svc.cluster.local` (Service `pypi` in a namespace named `org`) before the real name.
/// Whoever can create that Service (headless, with endpoints at any public address) answers for
/// every tenant's `pypi.org`. The proxy should ask for the absolute name (`pypi.org.`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_the_proxy_resolves_relative_names_through_the_search_list() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = EgressProxy::serve_controllers(
        EgressListener { listener, resolver: resolver(asked.clone()), allow_local: false },
        Duration::from_secs(30),
    )
    .unwrap();
    proxy.open("tok", EgressPolicy { hosts: vec![HostRule::parse("pypi.org").unwrap()], cidrs: vec![] });
    let answer = raw(proxy.addr, &format!("CONNECT pypi.org:443 HTTP/1.1\r\n{}\r\n", auth("ns.x", "tok"))).await;
    assert!(status_line(&answer).contains("403"), "{answer:?}");
    let asked = asked.lock().unwrap().clone();
    assert!(
        asked.iter().all(|n| n.ends_with('.')),
        "the resolver was given a relative name (the search list applies): {asked:?}"
    );
}

/// A retired token (the run ended), and a token with another execution's user name, stay
/// refused / counted to the token's own account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_the_token_alone_decides_the_account() {
    let o = origin().await;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let proxy =
        EgressProxy::start("127.0.0.1:0".parse().unwrap(), resolver(asked), Duration::from_secs(30)).await.unwrap();
    let policy = |port| EgressPolicy {
        hosts: vec![HostRule::parse(&format!("allowed.test:{port}")).unwrap()],
        cidrs: vec![CidrRule::parse("127.0.0.1/32", vec![]).unwrap()],
    };
    proxy.open("tok-a", policy(o.port));
    proxy.open("tok-b", policy(1));
    let req =
        |user: &str, tok: &str| format!("GET http://allowed.test:{}/ HTTP/1.1\r\n{}\r\n", o.port, auth(user, tok));
    // B's token under A's user name gets B's rules (port 1 only): refused.
    assert!(raw(proxy.addr, &req("ns.a", "tok-b")).await.contains("403"));
    assert!(raw(proxy.addr, &req("ns.a", "tok-a ")).await.contains("407"), "a padded token");
    assert!(raw(proxy.addr, &req("ns.a", "TOK-A")).await.contains("407"), "case");
    proxy.close("tok-a");
    assert!(raw(proxy.addr, &req("ns.a", "tok-a")).await.contains("407"), "retired");
    assert_eq!(o.connections.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------- the opener (cluster)

struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<controller::Stopped>,
    base: String,
    proxy: SocketAddr,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

async fn controller(kube: &FakeKube, upstream: &str) -> Running {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let egress = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = egress.local_addr().unwrap();
    let mut config = ControllerConfig {
        recheck_stalled: Duration::from_millis(200),
        retry_after: Duration::from_millis(200),
        model_upstream: upstream.to_string(),
        ..Default::default()
    };
    config.job.report_url = Some(base.clone());
    let mut serve =
        agentops::server::serve(agentops::server::Listeners { api: Some(http), probes: None, egress: None });
    serve.egress = Some(EgressListener {
        listener: egress,
        resolver: resolver(Arc::new(Mutex::new(Vec::new()))),
        allow_local: false,
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let client = kube.client();
    let task = tokio::spawn(async move {
        controller::run(client, config, None, ExecutorKind::Job, serve, None, async move {
            let _ = rx.await;
        })
        .await
    });
    Running { stop: Some(tx), task, base, proxy }
}

async fn api_secrets(kube: &FakeKube, ns: &str) {
    let api: Api<Secret> = Api::namespaced(kube.client(), ns);
    for (name, key, value) in [("git-cred", "token", support::TOKEN), ("anthropic", "api-key", support::API_KEY)] {
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {key: value}})).unwrap();
        api.create(&PostParams::default(), &s).await.unwrap();
    }
}

/// An execution WITHOUT egressHosts (the common case): its proxy user is never opened, so every
/// proxy login naming it runs the shared opener.
fn plain_execution(name: &str, repo: &str) -> AgentExecution {
    plain_execution_with(name, repo, json!({"apiKeySecretRef": {"name": "anthropic"}}))
}

fn plain_execution_with(name: &str, repo: &str, agent: serde_json::Value) -> AgentExecution {
    serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution",
        "metadata": {"name": name},
        "spec": {"prompt": "work", "timeout": "10m",
                 "repository": {"url": repo, "credentialsSecretRef": {"name": "git-cred"}},
                 "agent": agent}
    }))
    .unwrap()
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn secret_value(kube: &FakeKube, ns: &str, name: &str, key: &str) -> String {
    let s = kube.get(CORE, "secrets", ns, name).expect("secret");
    let b = s["data"][key].as_str().expect("key");
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
}

async fn running_plain(kube: &FakeKube, git: &support::GitServer, name: &str) {
    let api: Api<AgentExecution> = Api::namespaced(kube.client(), "ns");
    api.create(&PostParams::default(), &plain_execution(name, &git.url("r"))).await.unwrap();
    until("Running", || (kube.get(AX, "agentexecutions", "ns", name)?["status"]["phase"] == "Running").then_some(()))
        .await;
}

/// Anyone who reaches the proxy port (no token: a wrong one) names a running execution that has
/// no egressHosts: the proxy's opener runs `executor::reopen`, which REPLACES the execution's
/// live model-gateway account with a fresh one whose spend is the status's figure. A model answer
/// in flight is metered into the discarded account: what it adds at its end (output tokens,
/// cost) never reaches the status, nor `maxBudgetUsd`'s check. The execution's own agent can do
/// this to itself in a loop (its name is in its hostname, its namespace in resolv.conf).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_an_unauthenticated_proxy_login_makes_in_flight_model_spend_vanish() {
    let model = support::FakeAnthropic::start(vec![support::Step::text("first"), support::Step::Hang]).await;
    let git = support::GitServer::start("x-access-token", Some(support::TOKEN)).await;
    git.create_repo("r", &[("README.md", "# r\n")]);
    let kube = FakeKube::start().await;
    api_secrets(&kube, "ns").await;
    let ctl = controller(&kube, &model.base_url).await;
    running_plain(&kube, &git, "victim").await;
    let token = secret_value(&kube, "ns", "agentops-runner-victim", "model");
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 8, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "Write", "input_schema": {"type": "object"}}]});
    let send = || {
        support::http()
            .post(format!("{}/gateway/ns/victim/v1/messages", ctl.base))
            .header("x-api-key", &token)
            .json(&body)
            .send()
    };
    // Turn 1, complete; turn 2 in flight.
    let first = send().await.unwrap();
    let _ = first.text().await;
    let mut answer = send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let _ = answer.chunk().await;
    let status = |kube: &FakeKube| kube.get(AX, "agentexecutions", "ns", "victim").unwrap()["status"].clone();
    until("turn 1 in the status", || (status(&kube)["numTurns"].as_u64()? >= 1).then_some(())).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = status(&kube);

    // The attack: one proxy login with a wrong token, naming the victim.
    let said = raw(ctl.proxy, &format!("CONNECT x.test:443 HTTP/1.1\r\n{}\r\n", auth("ns.victim", "wrong"))).await;
    assert!(status_line(&said).contains("407"), "{said:?}");

    model.end_hangs();
    while let Ok(Some(_)) = answer.chunk().await {}
    // Turn 2's end (message_stop) should reach the status: 2 turns.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = json!(null);
    while std::time::Instant::now() < deadline {
        last = status(&kube);
        if last["numTurns"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctl.stop().await;
    let pick = |s: &serde_json::Value| json!({"numTurns": s["numTurns"], "usage": s["usage"], "costUsd": s["costUsd"]});
    assert!(
        last["numTurns"].as_u64().unwrap_or(0) >= 2,
        "after one unauthenticated proxy login the turn in flight was never counted: before {} after {}",
        pick(&before),
        pick(&last)
    );
}

/// The same reopen hands the agent a fresh account with no request in flight: the gateway's
/// bound of MAX_IN_FLIGHT (16) concurrent model requests per execution (and the reservations
/// behind `maxBudgetUsd`) resets with every proxy login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_proxy_login_resets_the_gateways_in_flight_bound() {
    use agentops::gateway::MAX_IN_FLIGHT;
    let model = support::FakeAnthropic::start((0..60).map(|_| support::Step::Hang).collect()).await;
    let git = support::GitServer::start("x-access-token", Some(support::TOKEN)).await;
    git.create_repo("r", &[("README.md", "# r\n")]);
    let kube = FakeKube::start().await;
    api_secrets(&kube, "ns").await;
    let ctl = controller(&kube, &model.base_url).await;
    running_plain(&kube, &git, "victim").await;
    let token = secret_value(&kube, "ns", "agentops-runner-victim", "model");
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 8, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "Write", "input_schema": {"type": "object"}}]});
    let client = support::http();
    let send = || {
        client
            .post(format!("{}/gateway/ns/victim/v1/messages", ctl.base))
            .header("x-api-key", &token)
            .json(&body)
            .send()
    };
    let mut open = Vec::new();
    let mut codes = Vec::new();
    for _ in 0..MAX_IN_FLIGHT + 4 {
        let a = send().await.unwrap();
        codes.push(a.status().as_u16());
        if a.status() == 200 {
            open.push(a);
        }
    }
    assert_eq!(open.len(), MAX_IN_FLIGHT, "the bound holds before the attack: {codes:?}");
    let mut extra = 0;
    for _ in 0..3 {
        let said = raw(ctl.proxy, &format!("CONNECT x.test:443 HTTP/1.1\r\n{}\r\n", auth("ns.victim", "wrong"))).await;
        assert!(status_line(&said).contains("407"), "{said:?}");
        for _ in 0..MAX_IN_FLIGHT {
            let a = send().await.unwrap();
            if a.status() == 200 {
                extra += 1;
                open.push(a);
            }
        }
    }
    let upstream = model.main_requests();
    model.end_hangs();
    drop(open);
    ctl.stop().await;
    assert_eq!(
        extra, 0,
        "3 proxy logins with a wrong token let {extra} more model requests run at once ({upstream} in flight upstream; bound {MAX_IN_FLIGHT})"
    );
}

/// The same login, repeated: each one read the execution's runner Secret and API-key Secret
/// (and its template, ConfigMaps, the store) — unauthenticated traffic turned into API requests,
/// without end, since that user is never marked open. Now: a user whose account could not be
/// opened is not looked up again for 30 s (at most one read of its runner Secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_unauthenticated_proxy_logins_cost_no_secret_reads() {
    let model = support::FakeAnthropic::start(vec![]).await;
    let git = support::GitServer::start("x-access-token", Some(support::TOKEN)).await;
    git.create_repo("r", &[("README.md", "# r\n")]);
    let kube = FakeKube::start().await;
    api_secrets(&kube, "ns").await;
    let ctl = controller(&kube, &model.base_url).await;
    running_plain(&kube, &git, "victim").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = kube.requests().len();
    for _ in 0..10 {
        let said = raw(ctl.proxy, &format!("CONNECT x.test:443 HTTP/1.1\r\n{}\r\n", auth("ns.victim", "wrong"))).await;
        assert!(status_line(&said).contains("407"), "{said:?}");
    }
    let reads: Vec<(String, String)> =
        kube.requests()[before..].iter().filter(|(m, p)| m == "GET" && p.contains("/secrets/")).cloned().collect();
    ctl.stop().await;
    assert!(
        reads.len() <= 1,
        "10 logins with a wrong token caused {} Secret reads: {:?}",
        reads.len(),
        &reads[..reads.len().min(4)]
    );
}

// ---------------------------------------------------------------- addresses named as hosts

const CIDR_POLICY: &str = r#"
apiVersion: agentops.dev/v1alpha1
kind: AgentPolicy
metadata: {name: company}
spec:
  allowed:
    egress: [{cidr: 10.20.0.0/16, ports: [5432]}]
"#;

/// A platform team limits private reach with `allowed.egress` (10.20.0.0/16 port 5432 only) and
/// sets no `allowed.egressHosts`. A tenant writes the cluster's API server, another team's
/// Service, or the controller's own pod/Service IP as a HOST rule: the policy admits it (host
/// rules are checked only against `allowed.egressHosts`), and the controller's proxy connects to
/// an address written as a host without any CIDR rule (`connect`'s `named`), from the
/// controller's pod. The CIDR allowlist is bypassed.
#[test]
fn attack_an_address_written_as_a_host_bypasses_the_policys_cidr_allowlist() {
    use agentops::api::{self, policy};
    let all = api::parse_policies(CIDR_POLICY).unwrap();
    let mut admitted = Vec::new();
    for host in ["10.96.0.1:443", "10.244.3.7:9090", "192.168.1.1:22", "[fd00::1]:443"] {
        let yaml = format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: x, namespace: team-a}}\nspec:\n  prompt: do it\n  repository: {{url: 'https://git.example.com/r.git'}}\n  egressHosts: ['{host}']\n"
        );
        let mut m = api::parse_manifest(&yaml).unwrap();
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(policy::NAME_LABEL.to_string(), "team-a".to_string());
        let selected = policy::selecting(&all, &labels);
        policy::apply_defaults(&mut m.execution, None, &selected);
        let r = api::resolve(&m.execution, &m.templates).unwrap();
        if policy::check(&r, &selected, false).is_ok() {
            admitted.push(host);
        }
    }
    assert!(
        admitted.is_empty(),
        "private addresses outside the policy's CIDR allowlist admitted as hosts: {admitted:?}"
    );
}

/// The proxy half of it: the controller's proxy (loopback stands in for a ClusterIP here, as the
/// repository's own tests do with `allow_local`) connects to an address named as a host with no
/// CIDR rule at all, while the same address reached by a name is refused as private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_the_controllers_proxy_reaches_a_private_address_named_as_a_host_without_a_cidr_rule() {
    let a = origin().await;
    let asked = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = EgressProxy::serve_controllers(
        EgressListener { listener, resolver: resolver(asked), allow_local: true },
        Duration::from_secs(30),
    )
    .unwrap();
    proxy.open(
        "tok",
        EgressPolicy {
            hosts: vec![
                HostRule::parse(&format!("127.0.0.1:{}", a.port)).unwrap(),
                HostRule::parse(&format!("allowed.test:{}", a.port)).unwrap(),
            ],
            cidrs: vec![],
        },
    );
    let au = auth("ns.x", "tok");
    let by_name = raw(proxy.addr, &format!("CONNECT allowed.test:{} HTTP/1.1\r\n{au}\r\n", a.port)).await;
    assert!(status_line(&by_name).contains("403"), "control: by name it is private: {by_name:?}");
    let by_address = raw(proxy.addr, &format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n{au}\r\n", a.port)).await;
    assert!(
        !by_address.starts_with("HTTP/1.1 200"),
        "a private address written as a host was connected with no CIDR rule: {:?}",
        status_line(&by_address)
    );
}

/// IPv6 forms that embed an IPv4 address and are treated as public: the local-use NAT64 prefix
/// (64:ff9b:1::/48, RFC 8215) and SIIT's IPv4-translated ::ffff:0:0/96. Where a cluster runs a
/// NAT64/SIIT gateway with such a prefix, a hostile DNS AAAA answer reaches private IPv4.
#[test]
fn attack_embedded_ipv4_forms_are_not_public() {
    use agentops::gateway::egress::is_public;
    let public: Vec<&str> = ["64:ff9b:1::a00:1", "64:ff9b:1:0:0:0:a9fe:a9fe", "::ffff:0:a9fe:a9fe", "::ffff:0:a00:1"]
        .into_iter()
        .filter(|a| is_public(a.parse().unwrap()))
        .collect();
    assert!(public.is_empty(), "treated as public: {public:?}");
}

/// `agent.maxBudgetUsd: 0.05`: one request in flight holds the whole budget (its worst case), so
/// a second is refused. One proxy login with a wrong token reopens the account without the hold:
/// the second request is relayed, past the execution's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_proxy_login_drops_the_budget_hold_of_requests_in_flight() {
    let model = support::FakeAnthropic::start((0..10).map(|_| support::Step::Hang).collect()).await;
    let git = support::GitServer::start("x-access-token", Some(support::TOKEN)).await;
    git.create_repo("r", &[("README.md", "# r\n")]);
    let kube = FakeKube::start().await;
    api_secrets(&kube, "ns").await;
    let ctl = controller(&kube, &model.base_url).await;
    let api: Api<AgentExecution> = Api::namespaced(kube.client(), "ns");
    let ax = plain_execution_with(
        "victim",
        &git.url("r"),
        json!({"apiKeySecretRef": {"name": "anthropic"}, "maxBudgetUsd": 0.05}),
    );
    api.create(&PostParams::default(), &ax).await.unwrap();
    until("Running", || {
        (kube.get(AX, "agentexecutions", "ns", "victim")?["status"]["phase"] == "Running").then_some(())
    })
    .await;
    let token = secret_value(&kube, "ns", "agentops-runner-victim", "model");
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 64000, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "Write", "input_schema": {"type": "object"}}]});
    let client = support::http();
    let send = || {
        client
            .post(format!("{}/gateway/ns/victim/v1/messages", ctl.base))
            .header("x-api-key", &token)
            .json(&body)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = send().await.unwrap();
    let control = second.status().as_u16();
    assert_ne!(control, 200, "control: the budget is held by the first request");
    drop(second);
    let said = raw(ctl.proxy, &format!("CONNECT x.test:443 HTTP/1.1\r\n{}\r\n", auth("ns.victim", "wrong"))).await;
    assert!(status_line(&said).contains("407"), "{said:?}");
    let third = send().await.unwrap();
    let after = third.status().as_u16();
    let upstream = model.main_requests();
    model.end_hangs();
    drop((first, third));
    ctl.stop().await;
    assert_ne!(
        after, 200,
        "after one proxy login a request past maxBudgetUsd was relayed (before: {control}; {upstream} at the model)"
    );
}

/// Right after a start (before the watch has listed), the opener asks the API server for the
/// execution a proxy user names. The user name is unauthenticated text: `/` and `..` in it must
/// never reach an API path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_proxy_user_name_never_reaches_an_api_path() {
    let kube = FakeKube::start().await;
    let ctl = controller(&kube, "http://127.0.0.1:9").await;
    let mut tries = Vec::new();
    for _ in 0..40 {
        for user in
            ["ns.x/../../../../api/v1/namespaces/ns/secrets/victim", "ns/../../secrets.victim", "ns.x%2F..%2Fvictim"]
        {
            let (proxy, text) = (ctl.proxy, format!("CONNECT x.test:443 HTTP/1.1\r\n{}\r\n", auth(user, "t")));
            tries.push(tokio::spawn(async move { raw(proxy, &text).await }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tries {
        let _ = t.await;
    }
    let reqs = kube.requests();
    ctl.stop().await;
    let bad: Vec<_> = reqs.iter().filter(|(_, p)| p.contains("victim")).collect();
    assert!(
        bad.is_empty(),
        "{} API requests built from an unauthenticated proxy user name, e.g. {:?}",
        bad.len(),
        bad.first()
    );
}
