//! Against a real cluster (ignored by default). Needs a kubeconfig whose user may create CRDs,
//! namespaces, Secrets, Jobs, PVCs and events:
//!
//!     KUBECONFIG=~/.kube/config cargo test --test cluster -- --ignored --test-threads=1
//!
//! It installs the CRDs from `crds/`, runs the controller in-process (Job executor) in a fresh
//! namespace, and checks the Job it creates (the four step containers, the agent's without a
//! credential), the NetworkPolicy of its egress, and the Stalled path; it does not need the runner
//! image to be pullable. It deletes its namespace at the end.

use std::time::Duration;

use agentops::api::AgentExecution;
use agentops::controller::{self, ControllerConfig, ExecutorKind};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::json;

async fn eventually<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    for _ in 0..120 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn controller_on_a_real_cluster() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await.expect("a kubeconfig");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("agentops-test").force();
    for crd in [AgentExecution::crd(), agentops::api::AgentTemplate::crd()] {
        crds.patch(crd.metadata.name.as_deref().unwrap(), &pp, &Patch::Apply(&crd)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // CRD establishment
    let ns = format!("agentops-test-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap())
        .await
        .unwrap();

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let ctl = {
        let client = client.clone();
        tokio::spawn(async move {
            controller::run(
                client,
                {
                    let mut c = ControllerConfig::default();
                    // Runner pods would reach this controller here; the test does not run them.
                    c.job.report_url = Some("http://agentops.invalid:8080".into());
                    c
                },
                None,
                ExecutorKind::Job,
                Default::default(),
                None,
                async move {
                    let _ = rx.await;
                },
            )
            .await
        })
    };
    let api: Api<AgentExecution> = Api::namespaced(client.clone(), &ns);
    let ax: AgentExecution = serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution", "metadata": {"name": "hello"},
        "spec": {"prompt": "p", "repository": {"url": "https://github.com/octocat/Hello-World.git", "credentialsSecretRef": {"name": "git-cred"}},
                 "agent": {"apiKeySecretRef": {"name": "anthropic"}},
                 "egress": [{"cidr": "151.101.0.0/16", "ports": [443]}]}
    }))
    .unwrap();
    api.create(&PostParams::default(), &ax).await.unwrap();
    // CEL at admission: a spec change is refused.
    let err = api.patch("hello", &PatchParams::default(), &Patch::Merge(json!({"spec": {"prompt": "other"}}))).await;
    assert!(err.is_err(), "spec is immutable");
    // The missing Secret stalls it; creating the Secret starts a Job.
    eventually("Stalled", || async {
        (api.get("hello").await.ok()?.status?.reason? == "SecretNotFound").then_some(())
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, key) in [("git-cred", "token"), ("anthropic", "api-key")] {
        let s: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {key: "x"}})).unwrap();
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = eventually("Job", || async { jobs.get_opt("agentops-hello").await.ok()? }).await;
    let pod = job.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    // The API server took the four step containers; the agent's mounts no credential.
    let init = pod.init_containers.clone().unwrap_or_default();
    let names: Vec<&str> = init.iter().chain(&pod.containers).map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["clone", "agent", "publish", "finish"]);
    let agent = &init[1];
    let mounts: Vec<&str> = agent.volume_mounts.iter().flatten().map(|m| m.name.as_str()).collect();
    assert!(!mounts.contains(&"git-credential") && !mounts.contains(&"report-token"), "{mounts:?}");
    // The execution's egress became a NetworkPolicy the API server accepted, for its pod only.
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let np = policies.get("agentops-egress-hello").await.expect("the execution's NetworkPolicy");
    let spec = np.spec.unwrap();
    assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap()["agentops.dev/execution"], "hello");
    assert_eq!(spec.egress.unwrap()[0].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr, "151.101.0.0/16");
    // Cancel stops it.
    api.patch("hello", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}}))).await.unwrap();
    eventually("Cancelled", || async {
        (api.get("hello").await.ok()?.status?.phase.as_str() == "Cancelled").then_some(())
    })
    .await;

    let _ = tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), ctl).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
