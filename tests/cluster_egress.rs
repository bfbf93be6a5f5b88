//! Egress by host name in a cluster (`spec.egressHosts`): the controller's egress proxy, against
//! the in-memory API server. The agent's `curl` in a real runner pod (the real CLI, the scripted
//! model) reaches an allowed host through the proxy and is refused another; the counts reach the
//! status, the metrics, an Event and the store. A restarted controller reopens a running
//! execution's proxy account on its first connection, with the figures its status recorded.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agentops::api::AgentExecution;
use agentops::controller::{self, ControllerConfig, ExecutorKind};
use agentops::gateway::egress::{EgressListener, Resolver};
use agentops::store::Store;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::kube_api::FakeKube;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BATCH: &str = "apis/batch/v1";
const CORE: &str = "api/v1";
const AX: &str = "apis/agentops.dev/v1alpha1";

/// Names of this test's own: `allowed.test` and `denied.test` resolve to loopback (where the
/// origin listens); anything else does not resolve.
fn resolver() -> Resolver {
    Arc::new(|host: String, port: u16| {
        Box::pin(async move {
            // The controller's proxy asks for names fully qualified (`allowed.test.`).
            match host.trim_end_matches('.') {
                "allowed.test" | "denied.test" => Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]),
                _ => Err(std::io::Error::other("no such host")),
            }
        })
    })
}

/// A loopback HTTP origin that answers every request with one line and counts what it read and
/// wrote, and its connections.
struct Origin {
    port: u16,
    connections: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

const GREETING: &str = "hello from the allowed host\n";

async fn origin() -> Origin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (connections, read, written) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (c, r, w) = (connections.clone(), read.clone(), written.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (r, w) = (r.clone(), w.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|x| x == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                r.fetch_add(head.len() as u64, Ordering::SeqCst);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{GREETING}",
                    GREETING.len()
                );
                if sock.write_all(answer.as_bytes()).await.is_ok() {
                    w.fetch_add(answer.len() as u64, Ordering::SeqCst);
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    Origin { port, connections, read, written }
}

struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<controller::Stopped>,
    /// The runners' endpoint (and the gateway, probes, metrics).
    base: String,
    /// The egress proxy's address.
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

/// Runs a controller (Job executor) whose runner pods report to its own listener, whose
/// gateway relays to `upstream`, and which serves the egress proxy on a listener of its own
/// with this test's resolver.
async fn controller(kube: &FakeKube, upstream: &str, store: Option<Store>) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
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
    // The origin is on loopback, which a controller's proxy otherwise never connects to.
    serve.egress = Some(EgressListener { listener: egress, resolver: resolver(), allow_local: true });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let client = kube.client();
    let task = tokio::spawn(async move {
        controller::run(client, config, store, ExecutorKind::Job, serve, None, async move {
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

/// An execution that may reach `allowed.test` at the origin's port (a name that resolves to
/// loopback: the `spec.egress` CIDR rule lets the proxy connect there).
fn execution(name: &str, repo: &str, port: u16) -> AgentExecution {
    serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution",
        "metadata": {"name": name},
        "spec": {"prompt": "fetch it", "timeout": "10m",
                 "repository": {"url": repo, "credentialsSecretRef": {"name": "git-cred"}},
                 "agent": {"apiKeySecretRef": {"name": "anthropic"}},
                 "egressHosts": [format!("allowed.test:{port}")],
                 "egress": [{"cidr": "127.0.0.1/32", "ports": [port]}]}
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

fn secret_data(kube: &FakeKube, ns: &str, name: &str) -> Option<std::collections::BTreeMap<String, Vec<u8>>> {
    use base64::Engine;
    let s = kube.get(CORE, "secrets", ns, name)?;
    let data = s["data"].as_object().cloned().unwrap_or_default();
    Some(
        data.into_iter()
            .map(|(k, v)| {
                (
                    k,
                    base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap_or_default())
                        .unwrap_or_default(),
                )
            })
            .collect(),
    )
}

/// The execution's egress proxy token, as its runner Secret holds it.
fn egress_token(kube: &FakeKube, name: &str) -> String {
    let data = secret_data(kube, "ns", &format!("agentops-runner-{name}")).expect("the runner Secret");
    String::from_utf8(data.get("egress").expect("an egress token").clone()).unwrap()
}

/// curl through a proxy; returns (HTTP code, body).
async fn curl(proxy: &str, extra: &[&str], url: &str) -> (String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "-x", proxy])
        .args(extra)
        .arg(url)
        .env_clear()
        .output()
        .await
        .expect("curl (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

fn events(kube: &FakeKube, reason: &str) -> Vec<Value> {
    kube.list("apis/events.k8s.io/v1", "events", "ns").into_iter().filter(|e| e["reason"] == reason).collect()
}

/// The Job path for real: the controller renders the Job with the proxy's address and a token
/// only the agent's container mounts; the test's kubelet runs the pod, with the agent's sandbox
/// on (its TCP port rules must let it reach the proxy); the real CLI's Bash tool runs `curl`
/// with the `http_proxy` the agent step set. The allowed host answers (as a plain
/// request and through a CONNECT tunnel), another host is refused by the proxy and never reached.
/// The status counts exactly what the origin saw: 2 connections, 1 refusal, its bytes each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_curl_in_a_pod_reaches_the_allowed_host_only_and_the_status_counts_it() {
    if let Some(why) = support::pod::available() {
        panic!("this test runs the Job's pod in mount and PID namespaces and needs root: {why}");
    }
    let o = origin().await;
    let port = o.port;
    // A host the agent tries to reach around the proxy (its variables ignored).
    let around = origin().await;
    let h = support::Harness::new(vec![]).await;
    let bash = |c: &str| support::Step::tool("Bash", json!({"command": c, "description": "fetch"}));
    h.model.set_script(vec![
        bash(&format!(
            "curl -sS -m 10 http://allowed.test:{port}/plain; curl -sS -m 10 -p http://allowed.test:{port}/tunnel; \
             curl -sS -m 10 http://denied.test:{port}/; echo; echo \"proxy=$http_proxy\" | sed 's/:[^:@]*@/:***@/'; \
             curl -sS -m 5 --noproxy '*' http://127.0.0.1:{}/around; true",
            around.port
        )),
        support::Step::text("Done."),
    ]);
    let kube = FakeKube::start().await;
    api_secrets(&kube, "ns").await;
    let store = Store::open(&h.dir.path().join("controller.db")).await.unwrap();
    let ctl = controller(&kube, &h.model.base_url, Some(store.clone())).await;
    let api: Api<AgentExecution> = Api::namespaced(kube.client(), "ns");
    api.create(&PostParams::default(), &execution("fetch", &h.git.url("demo"), port)).await.unwrap();
    let job = until("the Job", || kube.get(BATCH, "jobs", "ns", "agentops-fetch")).await;

    // The agent's container is told where the proxy is and where its token file is; the token
    // itself is in no env value, argument or annotation of the pod.
    let token = egress_token(&kube, "fetch");
    assert!(!job.to_string().contains(&token), "the token is not in the Job");
    let pod = &job["spec"]["template"]["spec"];
    let containers: Vec<Value> = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap())
        .cloned()
        .collect();
    let env_of = |c: &Value, name: &str| {
        c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).map(|e| e["value"].clone())
    };
    for c in &containers {
        let mounts: Vec<&str> =
            c["volumeMounts"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
        let agent = c["name"] == "agent";
        assert_eq!(mounts.contains(&"egress-token"), agent, "{}: {mounts:?}", c["name"]);
        assert_eq!(env_of(c, "AGENTOPS_EGRESS_PROXY").is_some(), agent, "{}", c["name"]);
    }
    let agent = containers.iter().find(|c| c["name"] == "agent").unwrap();
    assert_eq!(env_of(agent, "AGENTOPS_EGRESS_PROXY"), Some(json!(format!("http://127.0.0.1:{}", ctl.proxy.port()))));
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "egress-token").unwrap();
    assert_eq!(volume["secret"]["items"], json!([{"key": "egress", "path": "token"}]), "{volume}");

    // The kubelet's part: run the pod the controller rendered.
    let dir = h.dir.path().join("node");
    let ended = {
        let (kube, job) = (kube.clone(), job.clone());
        tokio::task::spawn_blocking(move || {
            let mut image = support::pod::Image::local(std::path::Path::new(env!("CARGO_BIN_EXE_agentops")));
            image.env.push(("AGENTOPS_NO_SANDBOX".into(), "false".into()));
            support::pod::run_pod(&job, &|name| secret_data(&kube, "ns", name), &image, &dir)
        })
        .await
        .unwrap()
    };
    for e in &ended {
        assert_eq!(e.exit_code, 0, "step {}: {}\n{}\n{}", e.name, e.message, e.stdout, e.stderr);
    }
    support::pod::report(&kube, "ns", "agentops-fetch", &ended);
    let done = until("the end", || {
        let ax = kube.get(AX, "agentexecutions", "ns", "fetch")?;
        ax["status"]["phase"].as_str().filter(|p| ["Succeeded", "Failed"].contains(p))?;
        Some(ax)
    })
    .await;
    let st = &done["status"];
    assert_eq!(st["phase"], "Succeeded", "{st}");

    // What curl got, as the model saw it in the tool result.
    let results = h.model.tool_results();
    let (_, out, _) = results.first().expect("the Bash call's result");
    assert_eq!(out.matches(GREETING.trim()).count(), 2, "the plain request and the tunnel: {out}");
    assert!(
        out.contains(&format!("agentops egress: denied.test:{port} is not in the execution's egress.hosts")),
        "{out}"
    );
    assert!(out.contains(&format!("proxy=http://ns.fetch:***@127.0.0.1:{}", ctl.proxy.port())), "{out}");
    assert!(!out.contains(&token), "curl printed no token");
    // The origin saw the two allowed connections only: the refused one never left the proxy.
    assert_eq!(o.connections.load(Ordering::SeqCst), 2);
    // Around the proxy: nothing (here the agent's sandbox refuses the port; in a cluster the
    // runner NetworkPolicy does too).
    assert!(out.contains(&format!("Failed to connect to 127.0.0.1 port {}", around.port)), "{out}");
    assert_eq!(around.connections.load(Ordering::SeqCst), 0, "the agent went around the proxy");

    // The status counts exactly that: bytes as the origin read and wrote them.
    let egress = &st["egress"];
    assert_eq!(egress["connections"], 2, "{egress}");
    assert_eq!(egress["refused"], 1, "{egress}");
    assert_eq!(egress["refusedHosts"], json!([format!("denied.test:{port}")]), "{egress}");
    assert_eq!(egress["bytesOut"], json!(o.read.load(Ordering::SeqCst)), "{egress}");
    assert_eq!(egress["bytesIn"], json!(o.written.load(Ordering::SeqCst)), "{egress}");
    assert!(egress["bytesIn"].as_u64().unwrap() > 2 * GREETING.len() as u64, "{egress}");

    // The refusal is a warning Event on the execution.
    let event = until("an EgressRefused event", || events(&kube, "EgressRefused").into_iter().next()).await;
    let text = event.to_string();
    assert!(text.contains("Warning") && text.contains(&format!("denied.test:{port}")), "{text}");

    // The store keeps the record (source `egress`), the metrics the counts.
    let row = store.get_execution(done["metadata"]["uid"].as_str().unwrap()).await.unwrap();
    let logs = store.logs(&row.id).await.unwrap();
    let lines: Vec<&str> = logs.iter().filter(|l| l.source == "egress").map(|l| l.line.as_str()).collect();
    assert!(lines.iter().any(|l| l.starts_with("egress: 2 connections, 1 refused")), "{lines:?}");
    assert!(lines.contains(&format!("refused denied.test:{port}").as_str()), "{lines:?}");
    let said =
        format!("egress through the controller's proxy http://127.0.0.1:{} for allowed.test:{port}", ctl.proxy.port());
    assert!(logs.iter().any(|l| l.line.contains(&said)), "the agent step says where its egress goes");
    // No log line, output or termination message of any step carries the token.
    assert!(logs.iter().all(|l| !l.line.contains(&token)), "a log line holds the token");
    for e in &ended {
        assert!(![&e.message, &e.stdout, &e.stderr].iter().any(|t| t.contains(&token)), "step {}", e.name);
    }
    let metrics = support::http().get(format!("{}/metrics", ctl.base)).send().await.unwrap().text().await.unwrap();
    for line in [
        "agentops_egress_connections_total{namespace=\"ns\",result=\"allowed\"} 2",
        "agentops_egress_connections_total{namespace=\"ns\",result=\"refused\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let bytes_out =
        format!("agentops_egress_bytes_total{{namespace=\"ns\",result=\"out\"}} {}", o.read.load(Ordering::SeqCst));
    assert!(metrics.contains(&bytes_out), "{bytes_out}");

    // The run is over: its token is refused (407), nothing counted, the origin not reached.
    let proxy = format!("http://ns.fetch:{token}@{}", ctl.proxy);
    let (code, _) = curl(&proxy, &[], &format!("http://allowed.test:{port}/late")).await;
    assert_eq!(code, "407");
    assert_eq!(o.connections.load(Ordering::SeqCst), 2);
    ctl.stop().await;
}

/// A controller restarts while an execution runs: the new one has never seen its token, and
/// opens its proxy account on the first connection (reading the runner Secret then), counting
/// on from what the status recorded. A wrong token, or a running execution's name with another
/// execution's token, is still refused; so is a token of an execution that is not running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_reopens_a_running_executions_proxy_on_first_use() {
    let o = origin().await;
    let port = o.port;
    let model = support::FakeAnthropic::start(vec![]).await;
    let git = support::GitServer::start("x-access-token", Some(support::TOKEN)).await;
    git.create_repo("r", &[("README.md", "# r\n")]);
    let kube = FakeKube::start().await;
    api_secrets(&kube, "ns").await;
    let first = controller(&kube, &model.base_url, None).await;
    let api: Api<AgentExecution> = Api::namespaced(kube.client(), "ns");
    api.create(&PostParams::default(), &execution("long", &git.url("r"), port)).await.unwrap();
    until("Running", || (kube.get(AX, "agentexecutions", "ns", "long")?["status"]["phase"] == "Running").then_some(()))
        .await;
    let token = egress_token(&kube, "long");
    let via = |proxy: SocketAddr, user: &str, token: &str| format!("http://{user}:{token}@{proxy}");

    // Before the restart: one connection made, one refused (and told in an Event).
    let (code, body) = curl(&via(first.proxy, "ns.long", &token), &[], &format!("http://allowed.test:{port}/a")).await;
    assert_eq!((code.as_str(), body.as_str()), ("200", GREETING));
    let (code, body) = curl(&via(first.proxy, "ns.long", &token), &[], &format!("http://denied.test:{port}/")).await;
    assert_eq!(code, "403", "{body}");
    let counted =
        |kube: &FakeKube| kube.get(AX, "agentexecutions", "ns", "long").map(|ax| ax["status"]["egress"].clone());
    until("the counts in the status", || {
        counted(&kube).filter(|e| e["connections"] == 1 && e["refused"] == 1 && e["bytesIn"].as_u64() > Some(0))
    })
    .await;
    until("an EgressRefused event", || events(&kube, "EgressRefused").into_iter().next()).await;
    first.stop().await;

    let second = controller(&kube, &model.base_url, None).await;
    // Control: its token under a name that is not running, or under no name, opens nothing;
    // its name with a guessed token opens its account (from the Secret) but is refused.
    for (user, tok) in [("ns.nosuch", token.as_str()), ("", token.as_str()), ("ns.long", "agentops-guess")] {
        let (code, _) = curl(&via(second.proxy, user, tok), &[], &format!("http://allowed.test:{port}/x")).await;
        assert_eq!(code, "407", "{user}");
    }
    assert_eq!(o.connections.load(Ordering::SeqCst), 1, "no refused attempt reached the origin");
    // Its own name and token: opened at once (the Secret read now), and it connects.
    let (code, body) =
        curl(&via(second.proxy, "ns.long", &token), &["-p"], &format!("http://allowed.test:{port}/b")).await;
    assert_eq!((code.as_str(), body.as_str()), ("200", GREETING), "the first connection after the restart");
    assert_eq!(o.connections.load(Ordering::SeqCst), 2);
    // The figures go on from the status's: 2 connections, the refusal counted once, no new Event.
    let e = until("the counts after the restart", || counted(&kube).filter(|e| e["connections"] == 2)).await;
    assert_eq!(e["refused"], 1, "{e}");
    assert_eq!(e["refusedHosts"], json!([format!("denied.test:{port}")]), "{e}");
    assert_eq!(e["bytesIn"], json!(o.written.load(Ordering::SeqCst)), "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events(&kube, "EgressRefused").len(), 1, "the refusal before the restart is not told again");
    second.stop().await;
}
