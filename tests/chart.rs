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

fn validate(rendered: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, rendered).unwrap();
    for version in ["1.33.0", "1.37.0"] {
        // As a module: the console script may not be on PATH yet (pyenv shims).
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .expect("kubernetes-validate (run scripts/setup)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // ServiceMonitor is a CRD of the Prometheus operator: no built-in schema to check it by.
        let real_errors: Vec<&str> =
            text.lines().filter(|l| l.contains("ERROR") && !l.contains("servicemonitor")).collect();
        assert!(real_errors.is_empty(), "{name} against {version}:\n{text}");
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
        .args(["--set", "controller.executor=lambda"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("executor"), "{}", String::from_utf8_lossy(&out.stderr));
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

#[test]
fn chart_rbac_covers_what_the_controller_does() {
    let rbac = std::fs::read_to_string(chart().join("templates/rbac.yaml")).unwrap();
    for needle in [
        "agentexecutions/status",
        "agenttemplates",
        "jobs",
        "persistentvolumeclaims",
        "events.k8s.io",
        "leases",
        "secrets",
        "pods",
    ] {
        assert!(rbac.contains(needle), "RBAC grants {needle}");
    }
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
