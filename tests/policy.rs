//! Cluster policy (`AgentPolicy`): defaults reach an execution that sets nothing, every maximum
//! and allowlist refuses an execution that asks for more (naming the policy and the field),
//! several policies combine to the strictest, and the controller records and counts it all.
//! The pure rules are tested through the public functions the controller and `agentops run`
//! call; the controller is the real one against the in-memory API server; `agentops run
//! --policy` runs the real CLI against the scripted model.

mod support;

use std::time::Duration;

use agentops::api::{self, AgentExecution, AgentPolicy, policy};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::cluster::{namespace, start, until};
use support::kube_api::FakeKube;
use support::*;

const AX: &str = "apis/agentops.dev/v1alpha1";
const BATCH: &str = "apis/batch/v1";
const CORE: &str = "api/v1";

fn policies(yaml: &str) -> Vec<AgentPolicy> {
    api::parse_policies(yaml).expect("policies")
}

/// What `agentops run --policy` and the controller do: defaults, resolve, check.
fn apply(manifest: &str, all: &[AgentPolicy], ns_labels: &[(&str, &str)]) -> Result<api::Resolved, String> {
    let mut m = api::parse_manifest(manifest).map_err(|e| e.to_string())?;
    let ns = m.execution.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let mut labels: std::collections::BTreeMap<String, String> =
        ns_labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    labels.insert(policy::NAME_LABEL.into(), ns);
    let selected = policy::selecting(all, &labels);
    let template = m.templates.first().cloned();
    policy::apply_defaults(&mut m.execution, template.as_ref(), &selected);
    let mut r = api::resolve(&m.execution, &m.templates).map_err(|e| e.to_string())?;
    r.policy = Some(policy::check(&r, &selected, false).map_err(|e| e.to_string())?);
    Ok(r)
}

fn execution_yaml(spec_extra: &str) -> String {
    format!(
        "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: x, namespace: team-a}}\nspec:\n  prompt: do it\n  repository: {{url: 'https://git.example.com/r.git'}}\n{spec_extra}"
    )
}

const COMPANY: &str = r#"
apiVersion: agentops.dev/v1alpha1
kind: AgentPolicy
metadata: {name: company}
spec:
  defaults: {model: claude-sonnet-4-6, maxBudgetUsd: 10, timeout: 1h, maxTurns: 100}
  maximums: {maxBudgetUsd: 50, timeout: 4h, maxTurns: 300}
  allowed:
    models: ["claude-sonnet-*", claude-opus-4-1]
    agentImages: [registry.example.com]
    egress: [{cidr: 10.0.0.0/8, ports: [443]}]
    egressHosts: ["*.npmjs.org", pypi.org]
    insecureRepositories: false
  instructions: COMPANY-RULE-5c1e never commit secrets.
"#;

/// Each maximum and allowlist refuses an execution that asks for more, naming the field and
/// the policy; the same execution within the limits passes (so every row can fail).
#[test]
fn every_maximum_and_allowlist_refuses_naming_the_policy_and_the_field() {
    let all = policies(COMPANY);
    // (what the execution sets, the field named, a value within the limit that passes)
    let table: &[(&str, &str, &str)] = &[
        ("  agent: {maxBudgetUsd: 60}\n", "spec.agent.maxBudgetUsd", "  agent: {maxBudgetUsd: 50}\n"),
        ("  agent: {maxTurns: 301}\n", "spec.agent.maxTurns", "  agent: {maxTurns: 300}\n"),
        ("  timeout: 5h\n", "spec.timeout", "  timeout: 4h\n"),
        ("  agent: {model: claude-haiku-4-5}\n", "spec.agent.model", "  agent: {model: claude-sonnet-4-5}\n"),
        (
            "  pod: {agentImage: 'docker.io/library/golang:1.23'}\n",
            "spec.pod.agentImage",
            "  pod: {agentImage: 'registry.example.com/team/go:1.23'}\n",
        ),
        (
            "  pod: {agentImage: 'registry.example.com.evil.io/go:1'}\n",
            "spec.pod.agentImage",
            "  pod: {agentImage: 'registry.example.com/go@sha256:00'}\n",
        ),
        (
            "  egress: [{cidr: 0.0.0.0/0, ports: [443]}]\n",
            "spec.egress[0]",
            "  egress: [{cidr: 10.1.0.0/16, ports: [443]}]\n",
        ),
        (
            "  egress: [{cidr: 10.1.0.0/16, ports: [22]}]\n",
            "spec.egress[0]",
            "  egress: [{cidr: 10.1.0.0/16, ports: [443]}]\n",
        ),
        ("  egressHosts: [evil.example.com]\n", "spec.egressHosts[0]", "  egressHosts: [registry.npmjs.org]\n"),
        ("  egressHosts: ['pypi.org:80']\n", "spec.egressHosts[0]", "  egressHosts: ['pypi.org:443']\n"),
        ("  egressHosts: ['*.example.org']\n", "spec.egressHosts[0]", "  egressHosts: ['*.a.npmjs.org']\n"),
    ];
    for (asks, field, within) in table {
        let err = apply(&execution_yaml(asks), &all, &[]).expect_err(asks);
        assert!(err.starts_with(&format!("{field}: ")), "{asks:?} names {field}: {err}");
        assert!(err.contains("AgentPolicy \"company\""), "{asks:?} names the policy: {err}");
        apply(&execution_yaml(within), &all, &[]).unwrap_or_else(|e| panic!("{within:?} is allowed: {e}"));
    }
    // insecure repositories: plain HTTP to another machine.
    let insecure =
        execution_yaml("").replace("https://git.example.com/r.git", "http://git.example.com/r.git") + "  # plain\n";
    let insecure = insecure.replace(
        "repository: {url: 'http://git.example.com/r.git'}",
        "repository: {url: 'http://git.example.com/r.git', insecure: true}",
    );
    let err = apply(&insecure, &all, &[]).unwrap_err();
    assert!(err.starts_with("spec.repository.insecure: ") && err.contains("\"company\""), "{err}");
    let mut relaxed = all.clone();
    relaxed[0].spec.allowed.insecure_repositories = None;
    apply(&insecure, &relaxed, &[]).expect("allowed without the rule");
    // The local executor: refused when the policy says so and the controller would use it.
    let r = apply(&execution_yaml(""), &all, &[]).unwrap();
    let mut strict = all.clone();
    strict[0].spec.allowed.local_executor = Some(false);
    let refs: Vec<&AgentPolicy> = strict.iter().collect();
    let err = policy::check(&r, &refs, true).unwrap_err().to_string();
    assert!(err.contains("local executor") && err.contains("\"company\""), "{err}");
    policy::check(&r, &refs, false).expect("the Job executor is fine");
}

/// An execution that sets nothing gets the policy's defaults (model, budget, timeout, turns,
/// instructions appended to its own), recorded on it; the template's values win over them.
#[test]
fn defaults_fill_what_the_execution_and_template_leave_unset() {
    let all = policies(COMPANY);
    let r = apply(&execution_yaml("  agent: {instructions: 'TEAM-RULE tabs.'}\n"), &all, &[]).unwrap();
    assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-6"));
    assert_eq!(r.max_budget_usd, Some(10.0));
    assert_eq!(r.max_turns, Some(100));
    assert_eq!(r.timeout, Duration::from_secs(3600));
    let text = r.agent_config.instructions.clone().unwrap();
    assert!(text.starts_with("TEAM-RULE tabs.") && text.ends_with("COMPANY-RULE-5c1e never commit secrets."), "{text}");
    let rec = r.policy.unwrap();
    assert_eq!(rec.policies, vec!["company"]);
    assert_eq!((rec.max_budget_usd, rec.max_turns, rec.timeout.as_deref()), (Some(10.0), Some(100), Some("1h")));

    // The template's values win over the policy's defaults.
    let with_template = format!(
        "{}  templateRef: {{name: t}}\n---\napiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {{name: t}}\nspec:\n  timeout: 2h\n  agent: {{model: claude-opus-4-1, maxBudgetUsd: 20}}\n",
        execution_yaml("")
    );
    let r = apply(&with_template, &all, &[]).unwrap();
    assert_eq!((r.model.as_deref(), r.max_budget_usd), (Some("claude-opus-4-1"), Some(20.0)));
    assert_eq!(r.timeout, Duration::from_secs(7200));
}

/// Two policies selecting one namespace: the smallest maximum, every allowlist, the defaults
/// kept under the smallest maximum; a policy whose selector does not match has no say.
#[test]
fn two_policies_combine_to_the_strictest() {
    let payments = r#"
apiVersion: agentops.dev/v1alpha1
kind: AgentPolicy
metadata: {name: payments}
spec:
  namespaceSelector: {matchLabels: {team: payments}}
  maximums: {maxBudgetUsd: 5, timeout: 30m}
  allowed: {models: [claude-sonnet-4-6]}
"#;
    let all = policies(&format!("{COMPANY}---{payments}"));
    // Not selected: only the company's limits.
    let r = apply(&execution_yaml("  agent: {maxBudgetUsd: 20, model: claude-sonnet-4-5}\n"), &all, &[]).unwrap();
    assert_eq!(r.policy.unwrap().policies, vec!["company"]);
    // Selected: the smaller budget, the shorter timeout, the narrower model list.
    let team = [("team", "payments")];
    let err = apply(&execution_yaml("  agent: {maxBudgetUsd: 20}\n"), &all, &team).unwrap_err();
    assert!(err.contains("\"payments\"") && err.starts_with("spec.agent.maxBudgetUsd"), "{err}");
    let err = apply(&execution_yaml("  agent: {model: claude-sonnet-4-5}\n"), &all, &team).unwrap_err();
    assert!(err.contains("\"payments\"") && err.starts_with("spec.agent.model"), "{err}");
    let err = apply(&execution_yaml("  agent: {model: claude-opus-4-1}\n"), &all, &team).unwrap_err();
    assert!(err.contains("\"payments\""), "allowed by company, not by payments: {err}");
    // Nothing set: the defaults under the strictest maximums, and it passes both.
    let r = apply(&execution_yaml(""), &all, &team).unwrap();
    assert_eq!(r.max_budget_usd, Some(5.0), "company's default 10 is above payments' maximum 5");
    assert_eq!(r.timeout, Duration::from_secs(1800));
    let rec = r.policy.unwrap();
    assert_eq!(rec.policies, vec!["company", "payments"]);
    let models = rec.models.unwrap();
    assert!(policy::models_allow(&models, "claude-sonnet-4-6"));
    assert!(!policy::models_allow(&models, "claude-sonnet-4-5"), "payments' list is narrower");
    assert!(!policy::models_allow(&models, "claude-opus-4-1"));
}

#[test]
fn a_bad_policy_is_refused_naming_its_field() {
    for (bad, field) in [
        ("spec: {maximums: {timeout: soon}}", "spec.maximums.timeout"),
        ("spec: {defaults: {maxBudgetUsd: -1}}", "spec.defaults.maxBudgetUsd"),
        ("spec: {allowed: {egressHosts: ['*.com']}}", "spec.allowed.egressHosts[0]"),
        ("spec: {allowed: {egress: [{cidr: 10.0.0.0/99}]}}", "spec.allowed.egress[0].cidr"),
        ("spec: {maximum: {maxBudgetUsd: 5}}", "spec.maximum"),
        ("spec: {namespaceSelector: {matchExpressions: [{key: team, operator: Bogus}]}}", "spec.namespaceSelector"),
    ] {
        let yaml = format!("apiVersion: agentops.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {{name: p}}\n{bad}\n");
        let err = api::parse_policies(&yaml).expect_err(bad);
        assert!(err.field.starts_with(field), "{bad}: {err}");
    }
}

// --- The controller ---------------------------------------------------------------------

fn execution(name: &str, agent: Value) -> AgentExecution {
    serde_json::from_value(json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution",
        "metadata": {"name": name},
        "spec": {"prompt": "do it",
                 "repository": {"url": "https://git.example.com/r.git", "credentialsSecretRef": {"name": "git-cred"}},
                 "agent": json_with(json!({"apiKeySecretRef": {"name": "anthropic"}}), agent)}
    }))
    .unwrap()
}

fn json_with(mut a: Value, b: Value) -> Value {
    if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
    a
}

fn manifest_of(kube: &FakeKube, ns: &str, name: &str) -> String {
    let secret = kube.get(CORE, "secrets", ns, &format!("agentops-runner-{name}")).expect("the runner's manifest");
    let b64 = secret["data"]["manifest.yaml"].as_str().expect("manifest key");
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
}

/// Against the real controller: a policy's defaults reach an execution that sets nothing (its
/// Job's deadline, its runner's manifest, `status.policy`); two policies refuse what the
/// stricter forbids (Stalled/InvalidSpec naming the policy and the field, an Event, no Job),
/// counted once on the policy's status, which also lists the namespaces it selects; in a
/// namespace the stricter does not select the same execution runs; relaxing the policy lets
/// the refused execution start by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_applies_policies_and_reports_them() {
    let kube = FakeKube::start().await;
    namespace(&kube, "pay", json!({"team": "payments"})).await;
    namespace(&kube, "web", json!({"team": "web"})).await;
    let policies_api: Api<AgentPolicy> = Api::all(kube.client());
    let payments = r#"
apiVersion: agentops.dev/v1alpha1
kind: AgentPolicy
metadata: {name: payments}
spec:
  namespaceSelector: {matchLabels: {team: payments}}
  maximums: {maxBudgetUsd: 5}
"#;
    for p in policies(&format!("{COMPANY}---{payments}")) {
        policies_api.create(&PostParams::default(), &p).await.unwrap();
    }
    let (ctl, base) = start(&kube, None, None, Default::default()).await;
    let pay: Api<AgentExecution> = Api::namespaced(kube.client(), "pay");
    let web: Api<AgentExecution> = Api::namespaced(kube.client(), "web");

    // Sets nothing: the defaults, under the stricter maximum.
    pay.create(&PostParams::default(), &execution("plain", json!({}))).await.unwrap();
    let job = until("plain's Job", || kube.get(BATCH, "jobs", "pay", "agentops-plain")).await;
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 3600 + 60, "the policy's default timeout (1h)");
    let manifest = manifest_of(&kube, "pay", "plain");
    for want in ["model: claude-sonnet-4-6", "maxBudgetUsd: 5.0", "maxTurns: 100", "COMPANY-RULE-5c1e"] {
        assert!(manifest.contains(want), "the runner's manifest has {want}: {manifest}");
    }
    let status = until("plain's status.policy", || {
        let ax = kube.get(AX, "agentexecutions", "pay", "plain")?;
        ax["status"]["policy"].is_object().then(|| ax["status"]["policy"].clone())
    })
    .await;
    assert_eq!(status["policies"], json!(["company", "payments"]));
    assert_eq!(status["maxBudgetUsd"], 5.0);
    assert_eq!(status["model"], "claude-sonnet-4-6");
    assert_eq!(status["timeout"], "1h");

    // Asks for more than payments allows: refused, named, no Job.
    pay.create(&PostParams::default(), &execution("greedy", json!({"maxBudgetUsd": 20.0}))).await.unwrap();
    let st = until("greedy refused", || {
        let ax = kube.get(AX, "agentexecutions", "pay", "greedy")?;
        (ax["status"]["reason"] == "InvalidSpec").then(|| ax["status"].clone())
    })
    .await;
    let message = st["message"].as_str().unwrap();
    assert!(
        message.starts_with("spec.agent.maxBudgetUsd: is $20") && message.contains("AgentPolicy \"payments\""),
        "{message}"
    );
    let stalled = st["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Stalled" && c["status"] == "True");
    assert!(stalled, "{st}");
    assert!(kube.get(BATCH, "jobs", "pay", "agentops-greedy").is_none());
    let event = until("the refusal's Event", || {
        kube.list("apis/events.k8s.io/v1", "events", "pay")
            .into_iter()
            .find(|e| e["regarding"]["name"] == "greedy" && e["note"].as_str().is_some_and(|n| n.contains("payments")))
    })
    .await;
    assert_eq!(event["type"], "Warning", "{event}");

    // The same in a namespace payments does not select: company's maximum (50) allows it.
    web.create(&PostParams::default(), &execution("greedy", json!({"maxBudgetUsd": 20.0}))).await.unwrap();
    until("web's greedy Job", || kube.get(BATCH, "jobs", "web", "agentops-greedy")).await;

    // The policy's status: the namespaces it selects, the one refusal (counted once, although
    // the refused execution is looked at again every recheck).
    let pstatus = until("payments' status", || {
        let p = kube
            .get(AX, "agentpolicies", "", "payments")
            .or_else(|| kube.get(AX, "agentpolicies", "default", "payments"))?;
        (p["status"]["refused"] == 1).then(|| p["status"].clone())
    })
    .await;
    assert_eq!(pstatus["namespaces"], json!(["pay"]));
    assert_eq!(pstatus["namespaceCount"], 1);
    tokio::time::sleep(Duration::from_millis(600)).await; // three rechecks of the refused execution
    let company = until("company's status", || {
        let p = kube
            .get(AX, "agentpolicies", "", "company")
            .or_else(|| kube.get(AX, "agentpolicies", "default", "company"))?;
        p["status"]["namespaceCount"].as_u64().filter(|n| *n >= 2).map(|_| p["status"].clone())
    })
    .await;
    assert_eq!(company["refused"], 0);
    let metrics = support::http().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("agentops_policy_refusals_total{policy=\"payments\"} 1\n"), "{metrics}");
    let names: Vec<&str> = company["namespaces"].as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
    assert!(names.contains(&"pay") && names.contains(&"web"), "{names:?}");

    // Relaxed: the refused execution starts by itself.
    let patch = json!({"spec": {"maximums": {"maxBudgetUsd": 25.0}}});
    policies_api.patch("payments", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    until("greedy's Job once allowed", || kube.get(BATCH, "jobs", "pay", "agentops-greedy")).await;
    let p = kube
        .get(AX, "agentpolicies", "", "payments")
        .or_else(|| kube.get(AX, "agentpolicies", "default", "payments"))
        .unwrap();
    assert_eq!(p["status"]["refused"], 1, "still one refusal: {}", p["status"]);
    ctl.stop().await;
}

// --- agentops run --policy ------------------------------------------------------------------

fn agentops(h: &Harness) -> tokio::process::Command {
    h.agentops(env!("CARGO_BIN_EXE_agentops"))
}

/// `agentops run --policy FILE`: an execution asking for more exits 2 naming the policy and
/// the field, before any model request or clone; within the policy, its defaults reach the
/// real CLI (the instructions in the first request, the model named in every request), and a
/// model outside the list is refused by the gateway even when the agent asks for it itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_a_policy_file_refuses_with_exit_2_and_applies_defaults() {
    // The agent also asks the gateway for another model itself (its token and URL are in its env).
    let other_model = r#"curl -s -X POST "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' -d '{"model":"claude-opus-4-1","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'"#;
    let h = Harness::new(vec![
        Step::tool("Bash", json!({"command": other_model})),
        Step::tool("Write", json!({"file_path": "work.txt", "content": "done\n"})),
        Step::text("Wrote work.txt."),
    ])
    .await;
    let policy_file = h.dir.path().join("policy.yaml");
    std::fs::write(
        &policy_file,
        "apiVersion: agentops.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: company}\nspec:\n  defaults: {model: claude-sonnet-4-6}\n  maximums: {maxBudgetUsd: 2}\n  allowed: {models: [claude-sonnet-4-6]}\n  instructions: COMPANY-RULE-9d2b keep commits small.\n",
    )
    .unwrap();
    let greedy = h.dir.path().join("greedy.yaml");
    std::fs::write(&greedy, h.manifest("greedy", "    maxBudgetUsd: 5\n")).unwrap();
    let mut c = agentops(&h);
    c.args(["run", "-q", "--policy"]).arg(&policy_file).arg("-f").arg(&greedy);
    let out = c.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("spec.agent.maxBudgetUsd") && stderr.contains("AgentPolicy \"company\""), "{stderr}");
    assert_eq!(h.model.seen().len(), 0, "no model request");
    let branches = std::process::Command::new("git")
        .args(["branch", "--list", "agentops/greedy"])
        .current_dir(h.git.repo_path("demo"))
        .output()
        .unwrap();
    assert!(branches.stdout.is_empty(), "nothing pushed");

    // A bad policy file is refused too, naming its field.
    let bad = h.dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: agentops.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: p}\nspec: {maximums: {timeout: soon}}\n").unwrap();
    let mut c = agentops(&h);
    c.args(["run", "-q", "--policy"]).arg(&bad).arg("-f").arg(&greedy);
    let out = c.output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.maximums.timeout"));

    // Within the policy: its defaults reach the run.
    let fine = h.dir.path().join("fine.yaml");
    std::fs::write(&fine, h.manifest("fine", "")).unwrap();
    let mut c = agentops(&h);
    c.args(["run", "-q", "--policy"]).arg(&policy_file).arg("-f").arg(&fine).args(["-o", "json"]);
    let out = c.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let seen = h.model.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(s.body["model"], "claude-sonnet-4-6", "every request names the allowed model: {}", s.path);
    }
    let first = seen.iter().find(|s| s.main).unwrap();
    assert!(first.body.to_string().contains("COMPANY-RULE-9d2b"), "the company's instructions reach the agent");
    let results = h.model.tool_results();
    let (_, curl, _) = results.iter().find(|(name, _, _)| name == "Bash").expect("the Bash call's result");
    assert!(curl.contains("not allowed by the cluster's AgentPolicy"), "the gateway refused the other model: {curl}");
}
