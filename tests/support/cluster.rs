//! The real controller in a test process against the in-memory API server: start and stop it,
//! namespaces with the executions' Secrets, waiting for what the API server shows, a runner's
//! model token. Shared by the policy, budget and attack tests.

use std::time::Duration;

use agentops::controller::budgets::Clock;
use agentops::controller::{self, ControllerConfig, ExecutorKind};
use agentops::store::Store;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use super::kube_api::FakeKube;

/// A controller running in this process until `stop`.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<controller::Stopped>,
}

impl Running {
    /// Stops it gracefully (at most 10 s).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A controller with the Job executor and its API listener (runner reports, the gateway, and
/// with no probes listener `/metrics`); its gateway relays to `upstream` (None: the default,
/// never reached). Returns the listener's URL.
pub async fn start(kube: &FakeKube, upstream: Option<&str>, store: Option<Store>, clock: Clock) -> (Running, String) {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", http.local_addr().expect("addr"));
    let mut config = ControllerConfig {
        recheck_stalled: Duration::from_millis(200),
        retry_after: Duration::from_millis(200),
        clock,
        ..Default::default()
    };
    config.job.report_url = Some(base.clone());
    // Nobody pushes in these played pods: git through the relay is the pod tests' part.
    config.job.git_relay = false;
    if let Some(u) = upstream {
        config.model_upstream = u.to_string();
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let client = kube.client();
    let task = tokio::spawn(async move {
        controller::run(
            client,
            config,
            store,
            ExecutorKind::Job,
            agentops::server::serve(agentops::server::Listeners { api: Some(http), probes: None, egress: None }),
            None,
            async move {
                let _ = rx.await;
            },
        )
        .await
    });
    (Running { stop: Some(tx), task }, base)
}

/// A Namespace with these labels, holding the Secrets the executions name (`git-cred`,
/// `anthropic`).
pub async fn namespace(kube: &FakeKube, name: &str, labels: Value) {
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("a namespace");
    Api::<Namespace>::all(kube.client()).create(&PostParams::default(), &ns).await.expect("create namespace");
    secrets(kube, name).await;
}

/// The Secrets the executions name (`git-cred`, `anthropic`), in `name` (without a Namespace
/// object: one the controller's watch has not seen).
pub async fn secrets(kube: &FakeKube, name: &str) {
    let api: Api<Secret> = Api::namespaced(kube.client(), name);
    for (secret, key, value) in [("git-cred", "token", super::TOKEN), ("anthropic", "api-key", super::API_KEY)] {
        let s: Secret = serde_json::from_value(json!({"metadata": {"name": secret}, "stringData": {key: value}}))
            .expect("a secret");
        api.create(&PostParams::default(), &s).await.expect("create secret");
    }
}

/// Polls until `f` returns Some (at most 20 s).
pub async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The model gateway token the controller gave an execution's runner (its runner Secret).
pub fn model_token(kube: &FakeKube, ns: &str, name: &str) -> String {
    use base64::Engine;
    let s = kube.get("api/v1", "secrets", ns, &format!("agentops-runner-{name}")).expect("runner Secret");
    let b64 = s["data"]["model"].as_str().expect("model token");
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).expect("base64")).expect("utf-8")
}
