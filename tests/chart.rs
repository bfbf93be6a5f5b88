//! The Helm chart and the GitOps health checks, checked with the real tools `scripts/setup`
//! installs: helm (lint, template) and kubernetes-validate (strict, Kubernetes 1.33 and 1.37);
//! the Argo CD health check runs in Lua 5.4 against sample statuses.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn helm() -> PathBuf {
    let p = root().join(".tools/bin/helm");
    assert!(p.exists(), "{} is missing: run scripts/setup", p.display());
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/setup)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chart() -> PathBuf {
    root().join("charts/agentops")
}

fn render(values: Option<&str>) -> String {
    let mut c = Command::new(helm());
    c.args(["template", "agentops", "--namespace", "agentops-system", "--include-crds"]).arg(chart());
    if let Some(v) = values {
        c.arg("--values").arg(chart().join(v));
    }
    run(&mut c)
}

/// Every rendered document, parsed.
fn documents(rendered: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(rendered)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn validate(rendered: &str, name: &str) {
    // ServiceMonitor is a CRD of the Prometheus operator: there is no built-in schema to check it
    // by, so it is left out; AgentPolicy is ours, checked by our own parser (`policies_from_values`);
    // every other document must pass, and any non-zero exit fails.
    let kept: Vec<String> = documents(rendered)
        .into_iter()
        .filter(|d| d["kind"] != "ServiceMonitor" && d["kind"] != "AgentPolicy")
        .map(|d| serde_norway::to_string(&d).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, kept.join("---\n")).unwrap();
    for version in ["1.33.0", "1.37.0"] {
        // As a module: the console script may not be on PATH yet (pyenv shims).
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .expect("kubernetes-validate (run scripts/setup)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{name} against {version} (exit {:?}):\n{text}", out.status.code());
    }
}

#[test]
fn chart_lints_renders_and_validates_with_default_and_other_values() {
    run(Command::new(helm()).args(["lint", "--strict"]).arg(chart()));
    run(Command::new(helm()).args(["lint", "--strict", "--values"]).arg(chart().join("ci-values.yaml")).arg(chart()));
    let default = render(None);
    validate(&default, "default");
    assert!(default.contains("kind: CustomResourceDefinition"));
    assert!(
        default.contains("kind: PersistentVolumeClaim") && default.contains("type: Recreate"),
        "store on a PVC by default"
    );
    assert!(default.contains("kind: Role\n"), "leader election gets its Lease role");
    assert!(default.contains("port: metrics"), "probes on the metrics port");

    let other = render(Some("ci-values.yaml"));
    validate(&other, "ci-values");
    for needle in [
        "kind: ServiceMonitor",
        "image: \"registry.example.com/agentops:9.9.9\"",
        "value: \"registry.example.com/agentops-runner:9.9.9\"",
        "value: \"claude-sonnet-4-5\"",
        "cidr: \"160.79.104.0/23\"",
        "value: \"http://agentops.agentops-system.svc:9090\"",
    ] {
        assert!(other.contains(needle), "ci-values render has {needle}");
    }
    assert!(!other.contains("kind: PersistentVolumeClaim"), "no store PVC when persistence is off");
}

#[test]
fn values_that_break_the_schema_are_refused() {
    let out = Command::new(helm())
        .args(["template", "x"])
        .arg(chart())
        .args(["--set", "controller.executor=local"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the schema no longer offers the local executor");
    assert!(String::from_utf8_lossy(&out.stderr).contains("executor"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(helm())
        .args(["template", "x"])
        .arg(chart())
        .args(["--set", "rbac.watchNamespaces={Not_A_Namespace}"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "watchNamespaces are namespace names");
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let a = std::fs::read_to_string(root().join("crds/agentops.yaml")).unwrap();
    let b = std::fs::read_to_string(chart().join("crds/agentops.yaml")).unwrap();
    assert!(
        a == b,
        "charts/agentops/crds/agentops.yaml differs from crds/: cp crds/agentops.yaml charts/agentops/crds/"
    );
}

type Grant = (String, String, String, String, String);

/// Every RBAC grant the chart renders, as (kind of role, namespace, apiGroup, resource, verb).
fn grants(rendered: &str) -> std::collections::BTreeSet<Grant> {
    let mut out = std::collections::BTreeSet::new();
    for d in documents(rendered) {
        let kind = d["kind"].as_str().unwrap_or_default().to_string();
        if kind != "Role" && kind != "ClusterRole" {
            continue;
        }
        let ns = d["metadata"]["namespace"].as_str().unwrap_or("agentops-system").to_string();
        for rule in d["rules"].as_array().unwrap() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for v in rule["verbs"].as_array().unwrap() {
                        let s = |x: &serde_json::Value| x.as_str().unwrap().to_string();
                        out.insert((
                            kind.clone(),
                            if kind == "Role" { ns.clone() } else { "*".into() },
                            s(g),
                            s(r),
                            s(v),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn expect(kind: &str, ns: &str, group: &str, resource: &str, verbs: &[&str]) -> Vec<Grant> {
    verbs.iter().map(|v| (kind.into(), ns.into(), group.into(), resource.into(), v.to_string())).collect()
}

/// What every install grants cluster-wide, and the leader-election Role.
fn base_grants() -> Vec<Grant> {
    [
        expect(
            "ClusterRole",
            "*",
            "agentops.dev",
            "agentexecutions",
            &["get", "list", "watch", "patch", "update", "delete"],
        ),
        expect("ClusterRole", "*", "agentops.dev", "agentexecutions/status", &["get", "patch", "update"]),
        expect("ClusterRole", "*", "agentops.dev", "agenttemplates", &["get", "list", "watch"]),
        expect("ClusterRole", "*", "agentops.dev", "agentpolicies", &["get", "list", "watch"]),
        expect("ClusterRole", "*", "agentops.dev", "agentpolicies/status", &["get", "patch"]),
        expect("ClusterRole", "*", "", "namespaces", &["get", "list", "watch"]),
        expect("ClusterRole", "*", "agentops.dev", "agentbudgets", &["get", "list", "watch"]),
        expect("ClusterRole", "*", "agentops.dev", "agentbudgets/status", &["get", "patch"]),
        expect("Role", "default", "events.k8s.io", "events", &["create", "patch"]),
        expect("ClusterRole", "*", "authentication.k8s.io", "tokenreviews", &["create"]),
        expect("ClusterRole", "*", "authorization.k8s.io", "subjectaccessreviews", &["create"]),
        expect(
            "Role",
            "agentops-system",
            "coordination.k8s.io",
            "leases",
            &["get", "list", "watch", "create", "update", "patch"],
        ),
    ]
    .concat()
}

/// What the controller needs where executions run.
fn runner_grants(kind: &str, ns: &str) -> Vec<Grant> {
    [
        expect(kind, ns, "batch", "jobs", &["get", "list", "watch", "create", "patch", "delete"]),
        expect(kind, ns, "", "persistentvolumeclaims", &["get", "create", "patch", "delete"]),
        expect(kind, ns, "", "pods", &["list"]),
        expect(kind, ns, "", "secrets", &["get", "create"]),
        expect(kind, ns, "", "configmaps", &["get"]),
        // An execution's egress policy is made with a server-side apply, which the API server
        // authorises as `create` when the object does not exist yet (as for Jobs and PVCs).
        expect(kind, ns, "networking.k8s.io", "networkpolicies", &["create", "patch"]),
        expect(kind, ns, "events.k8s.io", "events", &["create", "patch"]),
    ]
    .concat()
}

#[test]
fn rbac_grants_exactly_what_the_controller_uses_in_both_modes() {
    // Default: Secrets (and Jobs, which could mount them) only in the served namespaces.
    let mut c = Command::new(helm());
    c.args(["template", "agentops", "--namespace", "agentops-system"]).arg(chart());
    c.args(["--set", "rbac.watchNamespaces={team-a,team-b}"]);
    let namespaced = run(&mut c);
    let want: std::collections::BTreeSet<Grant> = [
        base_grants(),
        runner_grants("Role", "agentops-system"),
        runner_grants("Role", "team-a"),
        runner_grants("Role", "team-b"),
    ]
    .concat()
    .into_iter()
    .collect();
    let got = grants(&namespaced);
    assert_eq!(got, want, "extra: {:?}\nmissing: {:?}", got.difference(&want), want.difference(&got));
    assert!(
        namespaced.contains("value: \"agentops-system,team-a,team-b\""),
        "the controller serves the same namespaces"
    );
    assert!(!got.iter().any(|(k, _, _, r, _)| k == "ClusterRole" && r == "secrets"), "no cluster-wide Secret access");
    assert!(!got.iter().any(|(_, _, _, r, v)| r == "secrets" && (v == "list" || v == "watch")), "never lists Secrets");

    // Opt-in cluster-wide mode: the same rules, in one ClusterRole.
    let mut c = Command::new(helm());
    c.args(["template", "agentops", "--namespace", "agentops-system", "--set", "rbac.clusterWide=true"]).arg(chart());
    let wide = run(&mut c);
    let want: std::collections::BTreeSet<Grant> =
        [base_grants(), runner_grants("ClusterRole", "*")].concat().into_iter().collect();
    let got = grants(&wide);
    assert_eq!(got, want, "extra: {:?}\nmissing: {:?}", got.difference(&want), want.difference(&got));
    assert!(wide.contains("name: AGENTOPS_NAMESPACES, value: \"\""), "cluster-wide serves every namespace");
}

#[test]
fn runner_pods_are_bounded_and_have_no_default_egress() {
    let default = render(None);
    let docs = documents(&default);
    let policy = docs.iter().find(|d| d["kind"] == "NetworkPolicy").expect("runner NetworkPolicy");
    let egress = policy["spec"]["egress"].as_array().unwrap();
    assert!(
        egress.iter().all(|e| e["to"].as_array().is_none_or(|to| to.iter().all(|t| t.get("ipBlock").is_none()))),
        "no CIDR (no internet) by default: {egress:?}"
    );
    let ports: Vec<i64> = egress
        .iter()
        .flat_map(|e| e["ports"].as_array().unwrap().iter().map(|p| p["port"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        ports,
        [53, 53, 8080, 8082],
        "DNS, the controller's API port and its egress proxy's port, not its metrics port"
    );
    // The proxy's port is the controller's, on the Service runner pods are told about.
    let service = docs.iter().find(|d| d["kind"] == "Service").expect("Service");
    let egress_port = service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "egress").cloned();
    assert_eq!(
        egress_port.map(|p| (p["port"].clone(), p["targetPort"].clone())),
        Some((serde_json::json!(8082), serde_json::json!("egress")))
    );
    assert!(default.contains("name: AGENTOPS_EGRESS_ADDR, value: \"0.0.0.0:8082\""), "the controller listens there");
    assert!(default.contains(":8082\"}"), "runner pods are told the Service's proxy port");
    // Every rule names where it goes: DNS only to the cluster's DNS pods, never to any address
    // on port 53 (a datagram carrying the repository left a pod that way).
    assert!(egress.iter().all(|e| e["to"].as_array().is_some_and(|to| !to.is_empty())), "{egress:?}");
    let dns = &egress[0]["to"][0];
    assert_eq!(dns["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "kube-system", "{dns}");
    assert_eq!(dns["podSelector"]["matchLabels"]["k8s-app"], "kube-dns", "{dns}");
    // A cluster that names its DNS differently, with a node-local cache.
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        "networkPolicy:\n  dns:\n    namespace: dns\n    podLabels: {app: coredns}\n    cidrs: [169.254.20.10/32]\n",
    )
    .unwrap();
    let custom = render(Some(values.path().to_str().unwrap()));
    let policy = documents(&custom).into_iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
    let to = &policy["spec"]["egress"][0]["to"];
    assert_eq!(to[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "dns");
    assert_eq!(to[0]["podSelector"]["matchLabels"]["app"], "coredns");
    assert_eq!(to[1]["ipBlock"]["cidr"], "169.254.20.10/32");
    // The policy selects the pods the controller really renders (their labels, not a copy).
    let ax: agentops::api::AgentExecution = serde_json::from_value(serde_json::json!({
        "apiVersion": "agentops.dev/v1alpha1", "kind": "AgentExecution",
        "metadata": {"name": "np", "namespace": "default", "uid": "u-1"},
        "spec": {"prompt": "p", "repository": {"url": "https://git.example.com/r.git"}}
    }))
    .unwrap();
    let r = agentops::api::resolve(&ax, &[]).unwrap();
    let job = agentops::controller::desired::desired_job(&ax, &r, &Default::default());
    let pod_labels = serde_json::to_value(&job).unwrap()["spec"]["template"]["metadata"]["labels"].clone();
    let selector = policy["spec"]["podSelector"]["matchLabels"].as_object().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(&pod_labels[k], v, "the chart's NetworkPolicy selects {k}={v}; runner pods carry {pod_labels}");
    }
    assert!(
        default.contains(
            r#"AGENTOPS_RUNNER_POD, value: "{\"resources\":{\"default\":{\"limits\":{\"ephemeral-storage\":\"20Gi\",\"memory\":\"4Gi\"}"#
        ),
        "{default}"
    );
    assert!(!default.contains("AGENTOPS_RUNNER_RESOURCES"), "the deprecated value is set only when given");
}

/// The value of one env variable of the controller's Deployment in a render.
fn deployment_env(rendered: &str, name: &str) -> Option<String> {
    let docs = documents(rendered);
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment")?;
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].as_array()?;
    env.iter().find(|e| e["name"] == name).and_then(|e| e["value"].as_str()).map(String::from)
}

/// The chart's `runner.pod` reaches every runner pod's Job as the cluster's default, under the
/// template's and the execution's; a default that overrides a security setting is refused by
/// the values schema (a field the operator keeps) or by the controller at start (an env name).
#[test]
fn the_charts_runner_pod_is_the_default_of_every_job() {
    use agentops::controller::desired::{JobConfig, desired_job};
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        "runner:\n  pod:\n    resources:\n      default: {requests: {cpu: 250m, memory: 512Mi}, limits: {memory: 2Gi}}\n      agent: {limits: {memory: 6Gi}}\n    nodeSelector: {pool: agents}\n    tolerations: [{key: agents, operator: Exists, effect: NoSchedule}]\n    runtimeClassName: gvisor\n    priorityClassName: batch\n    imagePullSecrets: [{name: mirror}]\n    labels: {platform: agents}\n    annotations: {example.com/owner: platform}\n    env: [{name: GOPROXY, value: 'https://proxy.example.com'}]\n",
    )
    .unwrap();
    let rendered = render(Some(values.path().to_str().unwrap()));
    validate(&rendered, "runner-pod");
    let json = deployment_env(&rendered, "AGENTOPS_RUNNER_POD").expect("AGENTOPS_RUNNER_POD");
    let pod = agentops::cli::runner_pod_settings(
        Some(&json),
        deployment_env(&rendered, "AGENTOPS_RUNNER_RESOURCES").as_deref(),
    )
    .unwrap();
    // A template sets the node pool; the execution adds nothing: the chart's rest reaches the Job.
    let text = "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {name: t}\nspec: {pod: {nodeSelector: {pool: team-a}}}\n---\napiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {name: a, namespace: team-a, uid: u}\nspec: {prompt: p, templateRef: {name: t}, repository: {url: 'https://git.example.com/r.git'}}\n";
    let m = agentops::api::parse_manifest(text).unwrap();
    let r = agentops::api::resolve(&m.execution, &m.templates).unwrap();
    let job = serde_json::to_value(desired_job(&m.execution, &r, &JobConfig { pod, ..Default::default() })).unwrap();
    let spec = &job["spec"]["template"]["spec"];
    assert_eq!(spec["nodeSelector"], serde_json::json!({"pool": "team-a"}), "the template's key wins");
    assert_eq!(spec["tolerations"][0]["key"], "agents");
    assert_eq!(spec["runtimeClassName"], "gvisor");
    assert_eq!(spec["priorityClassName"], "batch");
    assert_eq!(spec["imagePullSecrets"][0]["name"], "mirror");
    assert_eq!(job["spec"]["template"]["metadata"]["labels"]["platform"], "agents");
    assert_eq!(job["spec"]["template"]["metadata"]["annotations"]["example.com/owner"], "platform");
    for c in spec["initContainers"].as_array().unwrap().iter().chain(spec["containers"].as_array().unwrap()) {
        let memory = if c["name"] == "agent" { "6Gi" } else { "2Gi" };
        assert_eq!(c["resources"]["limits"]["memory"], memory, "{}", c["name"]);
        assert_eq!(c["resources"]["requests"]["cpu"], "250m", "{}", c["name"]);
        let has_env = c["env"].as_array().unwrap().iter().any(|e| e["name"] == "GOPROXY");
        assert_eq!(has_env, c["name"] == "agent", "{}: only the agent gets the team's env", c["name"]);
    }
    // The deprecated runner.resources still feeds the default when runner.pod gives none.
    std::fs::write(
        values.path(),
        "runner:\n  resources: {limits: {memory: 3Gi}}\n  pod: {resources: {default: null}}\n",
    )
    .unwrap();
    let old = render(Some(values.path().to_str().unwrap()));
    let pod = agentops::cli::runner_pod_settings(
        deployment_env(&old, "AGENTOPS_RUNNER_POD").as_deref(),
        deployment_env(&old, "AGENTOPS_RUNNER_RESOURCES").as_deref(),
    )
    .unwrap();
    let limits = pod.resources.unwrap().default.unwrap().limits.unwrap();
    assert_eq!(limits["memory"].0, "3Gi");
    // Security settings are not values: the schema refuses them, naming the field.
    for (set, word) in [
        ("runner.pod.securityContext.privileged=true", "securityContext"),
        ("runner.pod.hostNetwork=true", "hostNetwork"),
        ("runner.pod.volumes[0].name=host", "volumes"),
        ("runner.pod.env[0].name=X,runner.pod.env[0].valueFrom.secretKeyRef.name=s", "valueFrom"),
    ] {
        let out = Command::new(helm()).args(["template", "x"]).arg(chart()).args(["--set", set]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(word), "{set}: {err}");
    }
    // What the schema cannot say, the controller says before it starts, naming the field.
    let out = Command::new(env!("CARGO_BIN_EXE_agentops"))
        .args(["controller", "--executor", "job", "--report-url", "http://127.0.0.1:9"])
        .env(
            "AGENTOPS_RUNNER_POD",
            r#"{"env": [{"name": "GOPATH", "value": "/go"}, {"name": "ANTHROPIC_BASE_URL", "value": "http://x"}]}"#,
        )
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--runner-pod (the chart's runner.pod).env[1].name") && err.contains("ANTHROPIC_BASE_URL"),
        "{err}"
    );
}

#[test]
fn chart_wiring_matches_the_controller() {
    let rbac = std::fs::read_to_string(chart().join("templates/rbac.yaml")).unwrap();
    assert!(rbac.contains("leases"));
    // The controller flags the chart sets exist (one source of truth: the CLI).
    let deployment = std::fs::read_to_string(chart().join("templates/deployment.yaml")).unwrap();
    let help = run(Command::new(env!("CARGO_BIN_EXE_agentops")).args(["controller", "--help"]));
    for env in deployment.lines().filter_map(|l| l.split("name: ").nth(1)).filter_map(|l| l.split(',').next()) {
        if env.starts_with("AGENTOPS_") {
            assert!(help.contains(env), "the Deployment sets {env}, which `agentops controller` does not read");
        }
    }
}

fn health(status: serde_json::Value, generation: i64) -> (String, String) {
    let script = std::fs::read_to_string(root().join("gitops/argocd-health.lua")).unwrap();
    let obj = serde_json::json!({"metadata": {"generation": generation}, "status": status});
    let harness = format!(
        "local json = [[{}]]\n{}\nobj = decode(json)\nlocal function check()\n{}\nend\nlocal hs = check()\nprint(hs.status .. '|' .. (hs.message or ''))\n",
        obj,
        LUA_JSON,
        script.replace("return hs", "do return hs end")
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("h.lua");
    std::fs::write(&file, harness).unwrap();
    let out = run(Command::new("lua5.4").arg(&file));
    let (s, m) = out.trim().split_once('|').unwrap();
    (s.to_string(), m.to_string())
}

/// A tiny JSON decoder for the test harness (Argo CD hands the script a Lua table).
const LUA_JSON: &str = r#"
function decode(s)
  local pos = 1
  local function ws() pos = s:find("[^%s]", pos) or #s + 1 end
  local value
  local function str()
    local e = s:find('"', pos + 1, true)
    local r = s:sub(pos + 1, e - 1); pos = e + 1; return r
  end
  value = function()
    ws()
    local c = s:sub(pos, pos)
    if c == "{" then
      local t = {}; pos = pos + 1; ws()
      if s:sub(pos, pos) == "}" then pos = pos + 1; return t end
      while true do
        ws(); local k = str(); ws(); pos = pos + 1
        t[k] = value(); ws()
        local d = s:sub(pos, pos); pos = pos + 1
        if d == "}" then return t end
      end
    elseif c == "[" then
      local t = {}; pos = pos + 1; ws()
      if s:sub(pos, pos) == "]" then pos = pos + 1; return t end
      while true do
        t[#t + 1] = value(); ws()
        local d = s:sub(pos, pos); pos = pos + 1
        if d == "]" then return t end
      end
    elseif c == '"' then return str()
    elseif s:sub(pos, pos + 3) == "true" then pos = pos + 4; return true
    elseif s:sub(pos, pos + 4) == "false" then pos = pos + 5; return false
    elseif s:sub(pos, pos + 3) == "null" then pos = pos + 4; return nil
    else
      local e = s:find("[,%]}%s]", pos) or #s + 1
      local n = tonumber(s:sub(pos, e - 1)); pos = e; return n
    end
  end
  return value()
end
"#;

#[test]
fn argocd_health_follows_the_phase() {
    use serde_json::json;
    let cases = [
        (json!({"phase": "Queued", "message": "position 2 of 5", "observedGeneration": 1}), "Progressing"),
        (json!({"phase": "Running", "observedGeneration": 1}), "Progressing"),
        (json!({"phase": "Succeeded", "message": "pushed", "observedGeneration": 1}), "Healthy"),
        (json!({"phase": "Failed", "message": "PushRejected", "observedGeneration": 1}), "Degraded"),
        (json!({"phase": "TimedOut", "observedGeneration": 1}), "Degraded"),
        (json!({"phase": "Cancelled", "observedGeneration": 1}), "Degraded"),
        (
            json!({"phase": "Pending", "observedGeneration": 1, "conditions": [{"type": "Stalled", "status": "True"}]}),
            "Degraded",
        ),
        (
            json!({"phase": "Pending", "observedGeneration": 1, "conditions": [{"type": "Stalled", "status": "False"}]}),
            "Progressing",
        ),
        (json!({"phase": "Succeeded", "observedGeneration": 0}), "Progressing"),
    ];
    for (status, want) in cases {
        let (got, message) = health(status.clone(), 1);
        assert_eq!(got, want, "{status} -> {message}");
    }
    let (got, _) = health(serde_json::Value::Null, 1);
    assert_eq!(got, "Progressing", "no status yet");
}

#[test]
fn argocd_configmap_embeds_the_same_script() {
    let script = std::fs::read_to_string(root().join("gitops/argocd-health.lua")).unwrap();
    let cm: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(root().join("gitops/argocd-cm.yaml")).unwrap()).unwrap();
    assert_eq!(cm["data"]["resource.customizations.health.agentops.dev_AgentExecution"].as_str().unwrap(), script);
    assert!(Path::new(&root().join("gitops/flux-kustomization.yaml")).exists());
}

/// Flux's health of an object with the example's `healthCheckExprs`, in the order of RFC 0009
/// (fluxcd/pkg runtime/cel): observedGeneration first, then inProgress, failed, current.
fn flux_health(obj: &serde_json::Value) -> &'static str {
    let k: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(root().join("gitops/flux-kustomization.yaml")).unwrap())
            .unwrap();
    let exprs = &k["spec"]["healthCheckExprs"][0];
    if obj["status"]["observedGeneration"] != obj["metadata"]["generation"] {
        return "InProgress";
    }
    let eval = |name: &str| -> bool {
        let program = cel::Program::compile(exprs[name].as_str().unwrap()).unwrap();
        let mut ctx = cel::Context::default();
        for var in ["metadata", "spec", "status"] {
            ctx.add_variable_from_value(var, cel::to_value(&obj[var]).unwrap());
        }
        matches!(program.execute(&ctx), Ok(cel::Value::Bool(true)))
    };
    if eval("inProgress") {
        "InProgress"
    } else if eval("failed") {
        "Failed"
    } else if eval("current") {
        "Current"
    } else {
        "Unknown"
    }
}

#[test]
fn flux_reports_a_stalled_execution_as_failed_not_in_progress() {
    use serde_json::json;
    let obj = |status: serde_json::Value| json!({"metadata": {"generation": 1}, "spec": {}, "status": status});
    let stalled = json!({"type": "Stalled", "status": "True", "reason": "SecretNotFound"});
    let cases = [
        (json!({"phase": "Pending", "observedGeneration": 1, "conditions": [stalled]}), "Failed"),
        (json!({"phase": "Pending", "observedGeneration": 1}), "InProgress"),
        (
            json!({"phase": "Queued", "observedGeneration": 1, "conditions": [{"type": "Stalled", "status": "False"}]}),
            "InProgress",
        ),
        (json!({"phase": "Running", "observedGeneration": 1}), "InProgress"),
        (json!({"phase": "Succeeded", "observedGeneration": 1}), "Current"),
        (json!({"phase": "Failed", "observedGeneration": 1}), "Failed"),
        (json!({"phase": "TimedOut", "observedGeneration": 1}), "Failed"),
        (json!({"phase": "Cancelled", "observedGeneration": 1}), "Failed"),
        (json!({"phase": "Succeeded", "observedGeneration": 0}), "InProgress"),
    ];
    for (status, want) in cases {
        assert_eq!(flux_health(&obj(status.clone())), want, "{status}");
    }
}

/// The chart installs the policies of its values, each one our parser and checks accept (the
/// default bounds every run: a budget and a timeout with maximums over them); other values
/// replace them, and an empty list installs none.
#[test]
fn policies_from_values_are_installed_and_valid() {
    let policies_of = |rendered: &str| -> Vec<serde_json::Value> {
        documents(rendered).into_iter().filter(|d| d["kind"] == "AgentPolicy").collect()
    };
    let rendered = render(None);
    let found = policies_of(&rendered);
    assert_eq!(found.len(), 1, "{found:?}");
    let text: Vec<String> = found.iter().map(|d| serde_norway::to_string(d).unwrap()).collect();
    let parsed = agentops::api::parse_policies(&text.join("---\n")).expect("the chart's policy is valid");
    let p = &parsed[0];
    assert_eq!(p.metadata.name.as_deref(), Some("default"));
    assert_eq!(p.spec.defaults.max_budget_usd, Some(10.0));
    assert_eq!(p.spec.maximums.max_budget_usd, Some(50.0));
    assert_eq!(p.spec.maximums.timeout.as_deref(), Some("8h"));
    assert_eq!(p.spec.allowed.insecure_repositories, Some(false));
    assert!(p.spec.namespace_selector.is_none(), "the default policy selects every namespace");

    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("v.yaml");
    std::fs::write(
        &values,
        "policies:\n  - name: payments\n    spec:\n      namespaceSelector: {matchLabels: {team: payments}}\n      maximums: {maxBudgetUsd: 5}\n      allowed: {models: [claude-sonnet-4-6]}\n",
    )
    .unwrap();
    let out = Command::new(helm()).args(["template", "x"]).arg(chart()).arg("--values").arg(&values).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found = policies_of(&String::from_utf8_lossy(&out.stdout));
    let text: Vec<String> = found.iter().map(|d| serde_norway::to_string(d).unwrap()).collect();
    let parsed = agentops::api::parse_policies(&text.join("---\n")).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].spec.allowed.models.as_deref(), Some(&["claude-sonnet-4-6".to_string()][..]));
    let out =
        Command::new(helm()).args(["template", "x"]).arg(chart()).args(["--set-json", "policies=[]"]).output().unwrap();
    assert!(policies_of(&String::from_utf8_lossy(&out.stdout)).is_empty());
}
