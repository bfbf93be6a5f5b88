//! Bad input, as a user types it: each manifest below is refused by `agentops run` with exit
//! status 2 and a message naming the field, before anything is created (no store row, no
//! workspace, no request to the model, no branch on the remote). The same bounds are in the
//! CRD: `kubectl apply` refuses what `agentops run` refuses.

mod support;

use std::time::{Duration, Instant};

use agentops::api::{AgentExecution, AgentExecutionSpec, parse_manifest, resolve};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::*;

async fn run(h: &Harness, yaml: &str) -> (i32, String) {
    let file = h.dir.path().join("bad.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = h.agentops(env!("CARGO_BIN_EXE_agentops")).args(["run", "-q", "-f"]).arg(&file).output().await.unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Each case: what is appended under `spec:` (or a whole replacement of the manifest), the field
/// the error must name, and a word the message must contain.
fn cases(h: &Harness) -> Vec<(&'static str, String, &'static str, &'static str)> {
    let demo = h.git.url("demo");
    let m = |extra: &str| h.manifest("bad", extra);
    let with_url = |url: &str| m("").replace(&demo, url);
    vec![
        ("absurd timeout", m("  timeout: 400000000000y\n"), "spec.timeout", "not a duration"),
        (
            "egress to a host name",
            m("  egress: [{cidr: registry.npmjs.org/32, ports: [443]}]\n"),
            "spec.egress[0].cidr",
            "not an IP block",
        ),
        (
            "egress prefix too long",
            m("  egress: [{cidr: 10.0.0.0/33, ports: [443]}]\n"),
            "spec.egress[0].cidr",
            "not an IP block",
        ),
        ("egress without ports", m("  egress: [{cidr: 10.0.0.0/8, ports: []}]\n"), "spec.egress[0].ports", "TCP ports"),
        ("huge timeout", m("  timeout: 999999999h\n"), "spec.timeout", "limit is 168h"),
        ("timeout over the bound", m("  timeout: 169h\n"), "spec.timeout", "limit is 168h"),
        (
            "huge idle timeout",
            m("  agent: {idleTimeout: 999999999h, apiKeySecretRef: {name: anthropic}}\n")
                .replace("  agent:\n    apiKeySecretRef: {name: anthropic}\n", ""),
            "spec.agent.idleTimeout",
            "limit is 24h",
        ),
        (
            "hook timeout",
            m("  hooks: {pre: [{command: [\"true\"], timeout: 2h}]}\n"),
            "spec.hooks.pre[0].timeout",
            "limit is 1h",
        ),
        ("ttl", m("  ttlSecondsAfterFinished: 99999999999\n"), "spec.ttlSecondsAfterFinished", "90 days"),
        (
            "nan budget",
            m("  agent: {maxBudgetUsd: .nan, apiKeySecretRef: {name: anthropic}}\n")
                .replace("  agent:\n    apiKeySecretRef: {name: anthropic}\n", ""),
            "spec.agent.maxBudgetUsd",
            "finite",
        ),
        (
            "inf budget",
            m("  agent: {maxBudgetUsd: .inf, apiKeySecretRef: {name: anthropic}}\n")
                .replace("  agent:\n    apiKeySecretRef: {name: anthropic}\n", ""),
            "spec.agent.maxBudgetUsd",
            "finite",
        ),
        (
            "token in the query",
            with_url(&format!("{demo}?access_token={TOKEN}")),
            "spec.repository.url",
            "query string",
        ),
        ("token in the fragment", with_url(&format!("{demo}#{TOKEN}")), "spec.repository.url", "fragment"),
        (
            "token as userinfo",
            with_url(&demo.replace("http://", &format!("http://x:{TOKEN}@"))),
            "spec.repository.url",
            "credentials",
        ),
        (
            "credentials over http to another host",
            with_url("http://git.example.com/demo.git"),
            "spec.repository.url",
            "insecure",
        ),
        ("prompt too long", m("").replace("Update the demo repository", &"x".repeat(262_145)), "spec.prompt", "262144"),
        (
            "system prompt too long",
            m(&format!(
                "  agent: {{appendSystemPrompt: {}, apiKeySecretRef: {{name: anthropic}}}}\n",
                "y".repeat(65_537)
            ))
            .replace("  agent:\n    apiKeySecretRef: {name: anthropic}\n", ""),
            "spec.agent.appendSystemPrompt",
            "65536",
        ),
        (
            "too many hooks",
            m(&format!("  hooks: {{post: [{}]}}\n", vec!["{command: [\"true\"]}"; 17].join(", "))),
            "spec.hooks.post",
            "at most 16",
        ),
        (
            "unknown pull request placeholder",
            m("  git:\n    pullRequest: {title: \"fix {{nmae}}\"}\n"),
            "spec.git.pullRequest.title",
            "unknown placeholder {{nmae}}",
        ),
        (
            "pull request on an unknown host",
            m("  git:\n    pullRequest: {}\n"),
            "spec.repository.provider",
            "set github or gitlab",
        ),
        (
            "output field without a schema",
            m("  git:\n    pullRequest: {body: \"{{output.title}}\"}\n"),
            "spec.git.pullRequest.body",
            "outputSchema is not set",
        ),
        (
            "output schema that is no schema",
            m("    outputSchema: {type: 12}\n"),
            "spec.agent.outputSchema",
            "not a valid JSON Schema",
        ),
        ("deep YAML", m(&format!("  worker: {}{}\n", "[".repeat(100_000), "]".repeat(100_000))), "(yaml)", "nesting"),
        ("huge file", m(&format!("  worker: {}\n", "z".repeat(1_100_000))), "(file)", "1 MiB"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_is_refused_naming_its_field_and_nothing_is_created() {
    let h = Harness::new(happy_script()).await;
    for (what, yaml, field, word) in cases(&h) {
        let started = Instant::now();
        let (code, stderr) = run(&h, &yaml).await;
        let took = started.elapsed();
        assert_eq!(code, 2, "{what}: exit status 2 (invalid input), stderr: {stderr}");
        assert!(stderr.contains(field) && stderr.contains(word), "{what}: names {field} and says {word:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(!stderr.contains(TOKEN), "{what}: the token is never echoed: {stderr}");
        assert!(took < Duration::from_secs(10), "{what}: refused at once, took {took:?}");
    }
    // Nothing was created or sent anywhere.
    assert!(h.store.list_executions(100).await.unwrap().is_empty(), "no store row");
    assert!(!h.opts.workspace_root.exists(), "no workspace");
    assert_eq!(h.model.main_requests(), 0, "no request to the model");
    let branches = h.git.git("demo", &["branch", "--list"]);
    assert!(!branches.contains("agentops/"), "nothing pushed: {branches}");
}

/// Every way `spec.pod` could override a security setting of the operator's, in an execution
/// and in its template: `agentops run` exits 2 naming the field path, nothing created. The
/// same settings without the override run (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_security_override_in_pod_settings_is_refused_with_its_field_path() {
    let h = Harness::new(happy_script()).await;
    let fields = "cannot be set";
    let ours = "the runner's own";
    let table: Vec<(&str, &str, &str)> = vec![
        ("securityContext: {privileged: true}", "spec.pod.securityContext", fields),
        ("privileged: true", "spec.pod.privileged", fields),
        ("capabilities: {add: [SYS_ADMIN]}", "spec.pod.capabilities", fields),
        ("allowPrivilegeEscalation: true", "spec.pod.allowPrivilegeEscalation", fields),
        ("readOnlyRootFilesystem: false", "spec.pod.readOnlyRootFilesystem", fields),
        ("runAsUser: 0", "spec.pod.runAsUser", fields),
        ("runAsGroup: 0", "spec.pod.runAsGroup", fields),
        ("runAsNonRoot: false", "spec.pod.runAsNonRoot", fields),
        ("seccompProfile: {type: Unconfined}", "spec.pod.seccompProfile", fields),
        ("appArmorProfile: {type: Unconfined}", "spec.pod.appArmorProfile", fields),
        ("hostNetwork: true", "spec.pod.hostNetwork", fields),
        ("hostPID: true", "spec.pod.hostPID", fields),
        ("hostIPC: true", "spec.pod.hostIPC", fields),
        ("hostUsers: true", "spec.pod.hostUsers", fields),
        ("volumes: [{name: root, hostPath: {path: /}}]", "spec.pod.volumes", fields),
        ("volumeMounts: [{name: root, mountPath: /host}]", "spec.pod.volumeMounts", fields),
        ("serviceAccountName: default", "spec.pod.serviceAccountName", fields),
        ("automountServiceAccountToken: true", "spec.pod.automountServiceAccountToken", fields),
        ("shareProcessNamespace: true", "spec.pod.shareProcessNamespace", fields),
        ("initContainers: [{name: x, image: busybox}]", "spec.pod.initContainers", fields),
        ("command: [sh]", "spec.pod.command", fields),
        ("envFrom: [{secretRef: {name: anthropic}}]", "spec.pod.envFrom", fields),
        (
            "env: [{name: OK, value: '1'}, {name: KEY, valueFrom: {secretKeyRef: {name: anthropic, key: api-key}}}]",
            "spec.pod.env[1].valueFrom",
            "plain value",
        ),
        ("env: [{name: HOME, value: /tmp}]", "spec.pod.env[0].name", ours),
        ("env: [{name: TMPDIR, value: /x}]", "spec.pod.env[0].name", ours),
        ("env: [{name: IS_SANDBOX, value: '0'}]", "spec.pod.env[0].name", ours),
        ("env: [{name: AGENTOPS_MODEL_URL, value: 'http://evil'}]", "spec.pod.env[0].name", ours),
        ("env: [{name: ANTHROPIC_BASE_URL, value: 'http://evil'}]", "spec.pod.env[0].name", ours),
        ("env: [{name: ANTHROPIC_API_KEY, value: sk}]", "spec.pod.env[0].name", ours),
        ("env: [{name: CLAUDE_CONFIG_DIR, value: /x}]", "spec.pod.env[0].name", ours),
        ("env: [{name: LD_PRELOAD, value: /x.so}]", "spec.pod.env[0].name", ours),
        ("env: [{name: KUBERNETES_SERVICE_HOST, value: x}]", "spec.pod.env[0].name", ours),
        ("labels: {app.kubernetes.io/component: web}", "spec.pod.labels[app.kubernetes.io/component]", "NetworkPolicy"),
        ("labels: {agentops.dev/execution: other}", "spec.pod.labels[agentops.dev/execution]", "NetworkPolicy"),
        ("labels: {agentops.dev/anything: x}", "spec.pod.labels[agentops.dev/anything]", "NetworkPolicy"),
        ("labels: {job-name: x}", "spec.pod.labels[job-name]", "NetworkPolicy"),
        (
            "annotations: {container.apparmor.security.beta.kubernetes.io/agent: unconfined}",
            "spec.pod.annotations[container.apparmor.security.beta.kubernetes.io/agent]",
            "AppArmor",
        ),
        (
            "annotations: {seccomp.security.alpha.kubernetes.io/pod: unconfined}",
            "spec.pod.annotations[seccomp.security.alpha.kubernetes.io/pod]",
            "seccomp",
        ),
        ("resources: {agent: {claims: [{name: gpu}]}}", "spec.pod.resources.agent.claims", "claim"),
        ("agentImage: 'golang:1.23 --privileged'", "spec.pod.agentImage", "image reference"),
    ];
    assert!(table.len() >= 40, "{}", table.len());
    let template = |pod: &str| {
        format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {{name: team}}\nspec:\n  pod: {{{pod}}}\n---\n"
        )
    };
    for (pod, field, word) in &table {
        // In the execution.
        let (code, stderr) = run(&h, &h.manifest("bad", &format!("  pod: {{{pod}}}\n"))).await;
        assert_eq!(code, 2, "{pod}: exit 2, stderr: {stderr}");
        assert!(stderr.contains(field) && stderr.contains(word), "{pod}: names {field} and says {word:?}: {stderr}");
        // In its template (a field the types do not have fails the template's document).
        let yaml = template(pod) + &h.manifest("bad", "  templateRef: {name: team}\n");
        let (code, stderr) = run(&h, &yaml).await;
        assert_eq!(code, 2, "template {pod}: exit 2, stderr: {stderr}");
        let in_template = if *word == fields {
            format!("document 1: {field}")
        } else {
            field.replace("spec.pod", "the AgentTemplate's spec.pod")
        };
        assert!(stderr.contains(&in_template), "template {pod}: names {in_template}: {stderr}");
    }
    assert!(h.store.list_executions(100).await.unwrap().is_empty(), "nothing ran");
    // The control: the same kinds of settings, without the override, resolve.
    let ok = h.manifest(
        "ok",
        "  pod: {env: [{name: GOFLAGS, value: -mod=mod}], labels: {team: a}, annotations: {example.com/x: y}, nodeSelector: {pool: a}, resources: {agent: {limits: {memory: 8Gi}}}, agentImage: 'golang:1.23'}\n",
    );
    let r = h.resolved(&ok);
    assert_eq!(r.pod.agent_image.as_deref(), Some("golang:1.23"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_true_accepts_plain_http_credentials_and_loopback_needs_nothing() {
    let h = Harness::new(happy_script()).await;
    // Loopback over http with a credential is fine (this is every other test).
    let ok = h.resolved(&h.manifest("ok", ""));
    assert!(ok.repo_url.starts_with("http://127.0.0.1"));
    let remote = h.manifest("remote", "").replace(&h.git.url("demo"), "http://git.example.com/demo.git");
    let m =
        parse_manifest(&remote.replace("credentialsSecretRef", "insecure: true\n    credentialsSecretRef")).unwrap();
    resolve(&m.execution, &m.templates).expect("insecure: true accepts it");
    let spec = serde_json::to_value(&m.execution.spec).unwrap();
    AgentExecutionSpec::validate_cel(&spec, None).expect("and so does the CRD");
}

/// The bounds of `resolve` and the CRD's CEL rules agree: each spec is refused by both, naming
/// the same field, or accepted by both.
#[test]
fn the_crd_refuses_what_resolve_refuses() {
    let base = json!({"prompt": "p", "repository": {"url": "https://git.example.com/r.git"}});
    let refused = [
        (json!({"timeout": "169h"}), "spec.timeout"),
        (json!({"timeout": "1 day"}), "spec.timeout"),
        (json!({"timeout": "1.5h"}), "spec.timeout"),
        (json!({"timeout": "0s"}), "spec.timeout"),
        (json!({"agent": {"idleTimeout": "25h"}}), "spec.agent.idleTimeout"),
        (
            json!({"hooks": {"onError": [{"url": "https://h.example.com", "timeout": "61m"}]}}),
            "spec.hooks.onError[0].timeout",
        ),
        (json!({"ttlSecondsAfterFinished": 7_776_001}), "spec.ttlSecondsAfterFinished"),
        (json!({"agent": {"maxBudgetUsd": 10_000.5}}), "spec.agent.maxBudgetUsd"),
        (json!({"agent": {"maxTurns": 10_001}}), "spec.agent.maxTurns"),
        (json!({"repository": {"url": "https://u:p@git.example.com/r.git"}}), "spec.repository.url"),
        (json!({"repository": {"url": "https://tok@git.example.com/r.git"}}), "spec.repository.url"),
        (json!({"repository": {"url": "https://git.example.com/r.git?access_token=x"}}), "spec.repository.url"),
        (json!({"repository": {"url": "https://git.example.com/r.git#x"}}), "spec.repository.url"),
        (
            json!({"repository": {"url": "http://git.example.com/r.git", "credentialsSecretRef": {"name": "c"}}}),
            "spec.repository.url",
        ),
        (json!({"prompt": "é".repeat(262_145)}), "spec.prompt"),
        (json!({"agent": {"appendSystemPrompt": "s".repeat(65_537)}}), "spec.agent.appendSystemPrompt"),
        (json!({"agent": {"instructions": "i".repeat(65_537)}}), "spec.agent.instructions"),
        (json!({"agent": {"settingSources": ["project", "local"]}}), "spec.agent.settingSources"),
        (
            json!({"agent": {"mcpServers": [{"name": "t", "command": "x", "url": "https://h/mcp"}]}}),
            "spec.agent.mcpServers[0]",
        ),
        (json!({"agent": {"mcpServers": [{"name": "t"}]}}), "spec.agent.mcpServers[0]"),
        (json!({"egress": [{"cidr": "10.0.0.0/33", "ports": [443]}]}), "spec.egress[0].cidr"),
        (json!({"egress": [{"cidr": "2a04:4e42::/129", "ports": [443]}]}), "spec.egress[0].cidr"),
        (
            json!({"repository": {"url": "https://git.example.com/r.git", "ref": "main:refs/heads/x"}}),
            "spec.repository.ref",
        ),
        (json!({"repository": {"url": "https://git.example.com/r.git", "ref": "a b"}}), "spec.repository.ref"),
        (json!({"repository": {"url": "https://git.example.com/r.git", "ref": "a..b"}}), "spec.repository.ref"),
        (json!({"repository": {"url": "https://git.example.com/r.git", "ref": "feature/"}}), "spec.repository.ref"),
        (
            json!({"pod": {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}}),
            "spec.pod.env[0].valueFrom",
        ),
        (
            json!({"pod": {"env": [{"name": "A", "value": "1"}, {"name": "HOME", "value": "/"}]}}),
            "spec.pod.env[1].name",
        ),
        (json!({"pod": {"env": [{"name": "AGENTOPS_STREAM_DIR", "value": "/"}]}}), "spec.pod.env[0].name"),
        (json!({"pod": {"env": [{"name": "ANTHROPIC_BASE_URL", "value": "http://x"}]}}), "spec.pod.env[0].name"),
        (json!({"pod": {"env": [{"name": "CLAUDE_CODE_USE_BEDROCK", "value": "1"}]}}), "spec.pod.env[0].name"),
        (json!({"pod": {"env": [{"name": "LD_PRELOAD", "value": "/x.so"}]}}), "spec.pod.env[0].name"),
        (
            json!({"pod": {"labels": {"app.kubernetes.io/component": "web"}}}),
            "spec.pod.labels[app.kubernetes.io/component]",
        ),
        (json!({"pod": {"labels": {"agentops.dev/execution": "x"}}}), "spec.pod.labels[agentops.dev/execution]"),
        (
            json!({"pod": {"annotations": {"container.apparmor.security.beta.kubernetes.io/agent": "unconfined"}}}),
            "spec.pod.annotations[container.apparmor.security.beta.kubernetes.io/agent]",
        ),
        (
            json!({"pod": {"annotations": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}}}),
            "spec.pod.annotations[seccomp.security.alpha.kubernetes.io/pod]",
        ),
        (
            json!({"pod": {"resources": {"default": {"claims": [{"name": "gpu"}]}}}}),
            "spec.pod.resources.default.claims",
        ),
        (json!({"pod": {"agentImage": "golang:1.23 x"}}), "spec.pod.agentImage"),
    ];
    for (patch, field) in refused {
        let spec = merged(&base, &patch);
        let err = resolve(&execution(&spec), &[]).expect_err(&format!("resolve refuses {patch}"));
        assert_eq!(err.field, field, "{patch}: {err}");
        let cel = AgentExecutionSpec::validate_cel(&spec, None).expect_err(&format!("the CRD refuses {patch} too"));
        // Its message names the same field, as CEL can name one: `[]` for any index, `*` for
        // any hook phase. (The rules themselves say `self.…`, never `spec.…`.)
        let generic = cel_name(field);
        let said = format!("{cel:?}");
        assert!(
            said.contains(&format!("message: \"{generic} ")) || said.contains(&format!(" {generic} ")),
            "{field}: {said}"
        );
    }
    let accepted = [
        json!({"timeout": "168h"}),
        json!({"timeout": "1h30m"}),
        json!({"agent": {"idleTimeout": "24h", "maxBudgetUsd": 10_000.0, "maxTurns": 10_000}}),
        json!({"hooks": {"pre": [{"command": ["true"], "timeout": "1h"}]}}),
        json!({"ttlSecondsAfterFinished": 7_776_000}),
        json!({"repository": {"url": "http://127.0.0.1:8080/r.git", "credentialsSecretRef": {"name": "c"}}}),
        json!({"repository": {"url": "http://localhost/r.git", "credentialsSecretRef": {"name": "c"}}}),
        json!({"repository": {"url": "http://git.example.com/r.git"}}),
        json!({"repository": {"url": "http://git.example.com/r.git", "insecure": true, "credentialsSecretRef": {"name": "c"}}}),
        // ASCII: the cel crate's size() counts bytes where the apiserver counts characters.
        json!({"prompt": "x".repeat(262_144)}),
        json!({"agent": {"instructions": "i".repeat(65_536), "settingSources": ["user", "project"],
                         "mcpServers": [{"name": "t", "command": "x"}, {"name": "r", "url": "https://h.example.com/mcp"}]}}),
        json!({"egress": [{"cidr": "10.0.0.0/8", "ports": [443]}, {"cidr": "2a04:4e42::/32", "ports": [443]}]}),
        json!({"egress": [{"cidr": "151.101.1.1/32", "ports": [443]}, {"cidr": "::1/128", "ports": [80]}]}),
        json!({"repository": {"url": "https://git.example.com/r.git", "ref": "release/1.x"}}),
        json!({"repository": {"url": "https://git.example.com/r.git", "ref": "refs/pull/7/head"}}),
        json!({"repository": {"url": "https://git.example.com/r.git", "ref": "0123456789abcdef0123456789abcdef01234567"}}),
        json!({"pod": {"env": [{"name": "GOFLAGS", "value": "-mod=mod"}, {"name": "PATH", "value": "/usr/local/go/bin:/usr/bin"}],
                       "labels": {"team": "payments", "app.kubernetes.io/part-of": "payments"},
                       "annotations": {"example.com/owner": "payments"},
                       "resources": {"agent": {"limits": {"memory": "8Gi"}}},
                       "nodeSelector": {"pool": "build"}, "runtimeClassName": "gvisor",
                       "tolerations": [{"key": "build", "operator": "Exists"}], "agentImage": "golang:1.23"}}),
    ];
    for patch in accepted {
        let spec = merged(&base, &patch);
        resolve(&execution(&spec), &[]).unwrap_or_else(|e| panic!("resolve accepts {patch}: {e}"));
        AgentExecutionSpec::validate_cel(&spec, None).unwrap_or_else(|e| panic!("the CRD accepts {patch}: {e:?}"));
    }
}

/// `field` as a CEL message can name it: `spec.egress[0].cidr` → `spec.egress[].cidr`,
/// `spec.hooks.onError[0].timeout` → `spec.hooks.*[].timeout`.
fn cel_name(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(at) = rest.find('[') {
        out += &rest[..at];
        let close = rest[at..].find(']').map_or(rest.len(), |c| at + c);
        out += if rest[at + 1..close].bytes().all(|b| b.is_ascii_digit()) { "[]" } else { &rest[at..=close] };
        rest = &rest[(close + 1).min(rest.len())..];
    }
    out += rest;
    for phase in ["pre", "post", "onError"] {
        out = out.replace(&format!("spec.hooks.{phase}[]"), "spec.hooks.*[]");
    }
    out
}

fn merged(base: &Value, patch: &Value) -> Value {
    let mut v = base.clone();
    json_patch::merge(&mut v, patch);
    v
}

fn execution(spec: &Value) -> AgentExecution {
    AgentExecution::new("a", serde_json::from_value(spec.clone()).unwrap())
}

/// Arbitrary manifests: every one ends in Ok or an error naming a field, quickly, never a panic.
fn yamlish() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        Just("1e999".to_string()),
        Just("-1e999".to_string()),
        Just(".nan".to_string()),
        Just("99999999999999999999999999".to_string()),
        Just("~".to_string()),
        "[a-z0-9 :@?#/.]{0,20}".prop_map(|s| format!("{s:?}")),
        (0i64..i64::MAX).prop_map(|n| n.to_string()),
    ];
    let field = prop_oneof![
        Just("prompt"),
        Just("timeout"),
        Just("repository"),
        Just("agent"),
        Just("hooks"),
        Just("ttlSecondsAfterFinished"),
        Just("priority"),
        Just("maxBudgetUsd"),
        Just("idleTimeout"),
        Just("url"),
        Just("pre"),
        Just("command"),
    ];
    let leaf = (field.clone(), scalar).prop_map(|(k, v)| format!("{k}: {v}"));
    let tree = leaf.prop_recursive(6, 64, 6, move |inner| {
        (field.clone(), prop::collection::vec(inner, 0..6), any::<bool>()).prop_map(|(k, kids, flow)| {
            if flow {
                format!("{k}: {{{}}}", kids.join(", "))
            } else {
                format!("{k}: [{}]", kids.iter().map(|c| format!("{{{c}}}")).collect::<Vec<_>>().join(", "))
            }
        })
    });
    (prop::collection::vec(tree, 0..6), 0usize..200_000).prop_map(|(fields, depth)| {
        // Now and then, flow nesting far deeper than any manifest.
        let deep = if depth % 3 == 1 {
            format!(", workItem: {}{}", "[".repeat(depth), "]".repeat(depth))
        } else {
            String::new()
        };
        format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: p}}\nspec: {{repository: {{url: 'https://h.example.com/r.git'}}, prompt: p{deep}, {}}}\n",
            fields.join(", ")
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn any_manifest_ends_in_ok_or_a_field_error_quickly(text in yamlish()) {
        let started = Instant::now();
        let result = parse_manifest(&text).and_then(|m| resolve(&m.execution, &m.templates));
        if let Err(e) = &result {
            prop_assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}");
        }
        prop_assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}

/// Every bound of `api::limits` is fed its first bad value and refused by `resolve`, naming the
/// field (the CLI and the controller both call it); the value just at the bound is accepted.
#[test]
fn every_bound_in_limits_refuses_its_first_bad_value() {
    use agentops::api::limits::*;
    let base = json!({"prompt": "p", "repository": {"url": "https://git.example.com/r.git"}});
    let gh = |pr: Value| json!({"repository": {"url": "https://github.com/o/r.git", "provider": "github"}, "git": {"pullRequest": pr}});
    let schema_of = |bytes: usize| json!({"type": "object", "description": "d".repeat(bytes)});
    let cases: Vec<(&str, Value, Value, &str)> = vec![
        (
            "URL length",
            json!({"repository": {"url": format!("https://git.example.com/{}.git", "r".repeat(MAX_URL_CHARS))}}),
            json!({"repository": {"url": format!("https://g.io/{}", "r".repeat(MAX_URL_CHARS - 13))}}),
            "spec.repository.url",
        ),
        (
            "hook arguments",
            json!({"hooks": {"pre": [{"command": vec!["a"; MAX_HOOK_ARGS + 1]}]}}),
            json!({"hooks": {"pre": [{"command": vec!["a"; MAX_HOOK_ARGS]}]}}),
            "spec.hooks.pre[0].command",
        ),
        (
            "hook argument length",
            json!({"hooks": {"post": [{"command": ["echo", "a".repeat(MAX_HOOK_ARG_CHARS + 1)]}]}}),
            json!({"hooks": {"post": [{"command": ["echo", "a".repeat(MAX_HOOK_ARG_CHARS)]}]}}),
            "spec.hooks.post[0].command",
        ),
        (
            "tool rules",
            json!({"agent": {"allowedTools": vec!["Read"; MAX_TOOL_RULES + 1]}}),
            json!({"agent": {"allowedTools": vec!["Read"; MAX_TOOL_RULES]}}),
            "spec.agent.allowedTools",
        ),
        (
            "tool rule length",
            json!({"agent": {"disallowedTools": [format!("Bash({})", "x".repeat(MAX_TOOL_RULE_CHARS))]}}),
            json!({"agent": {"disallowedTools": [format!("Bash({})", "x".repeat(MAX_TOOL_RULE_CHARS - 6))]}}),
            "spec.agent.disallowedTools",
        ),
        (
            "instructions",
            json!({"agent": {"instructions": "i".repeat(MAX_INSTRUCTIONS_CHARS + 1)}}),
            json!({"agent": {"instructions": "i".repeat(MAX_INSTRUCTIONS_CHARS)}}),
            "spec.agent.instructions",
        ),
        (
            "permission rules as JSON",
            json!({"agent": {"settings": {"permissions": {"deny": (0..65).map(|i| format!("R{i:04}{}", "x".repeat(1015))).collect::<Vec<_>>()}}}}),
            json!({"agent": {"settings": {"permissions": {"deny": (0..64).map(|i| format!("R{i:04}{}", "x".repeat(1015))).collect::<Vec<_>>()}}}}),
            "spec.agent.settings.permissions",
        ),
        (
            "MCP servers",
            json!({"agent": {"mcpServers": (0..=MAX_MCP_SERVERS).map(|i| json!({"name": format!("s{i}"), "command": "x"})).collect::<Vec<_>>()}}),
            json!({"agent": {"mcpServers": (0..MAX_MCP_SERVERS).map(|i| json!({"name": format!("s{i}"), "command": "x"})).collect::<Vec<_>>()}}),
            "spec.agent.mcpServers",
        ),
        (
            "skills and subagents' files",
            json!({"agent": {"skills": [{"name": "s", "files": {"SKILL.md": "s".repeat(MAX_AGENT_FILES_BYTES + 1)}}]}}),
            json!({"agent": {"skills": [{"name": "s", "files": {"SKILL.md": "s".repeat(MAX_AGENT_FILES_BYTES)}}]}}),
            "spec.agent.skills",
        ),
        (
            "egress rules",
            json!({"egress": vec![json!({"cidr": "10.0.0.0/8", "ports": [443]}); MAX_EGRESS_RULES + 1]}),
            json!({"egress": vec![json!({"cidr": "10.0.0.0/8", "ports": [443]}); MAX_EGRESS_RULES]}),
            "spec.egress",
        ),
        (
            "egress ports",
            json!({"egress": [{"cidr": "10.0.0.0/8", "ports": (1..=MAX_EGRESS_PORTS as u16 + 1).collect::<Vec<_>>()}]}),
            json!({"egress": [{"cidr": "10.0.0.0/8", "ports": (1..=MAX_EGRESS_PORTS as u16).collect::<Vec<_>>()}]}),
            "spec.egress[0].ports",
        ),
        (
            "output schema size",
            json!({"agent": {"outputSchema": schema_of(MAX_OUTPUT_SCHEMA_BYTES)}}),
            json!({"agent": {"outputSchema": schema_of(MAX_OUTPUT_SCHEMA_BYTES - 64)}}),
            "spec.agent.outputSchema",
        ),
        (
            "pull request title",
            gh(json!({"title": "t".repeat(MAX_PR_TITLE_CHARS + 1)})),
            gh(json!({"title": "t".repeat(MAX_PR_TITLE_CHARS)})),
            "spec.git.pullRequest.title",
        ),
        (
            "pull request body",
            gh(json!({"body": "b".repeat(MAX_PR_BODY_CHARS + 1)})),
            gh(json!({"body": "b".repeat(MAX_PR_BODY_CHARS)})),
            "spec.git.pullRequest.body",
        ),
        (
            "pull request labels",
            gh(json!({"labels": (0..=MAX_PR_NAMES).map(|i| format!("l{i}")).collect::<Vec<_>>()})),
            gh(json!({"labels": (0..MAX_PR_NAMES).map(|i| format!("l{i}")).collect::<Vec<_>>()})),
            "spec.git.pullRequest.labels",
        ),
        (
            "budget",
            json!({"agent": {"maxBudgetUsd": MAX_BUDGET_USD + 0.01}}),
            json!({"agent": {"maxBudgetUsd": MAX_BUDGET_USD}}),
            "spec.agent.maxBudgetUsd",
        ),
        (
            "budget zero",
            json!({"agent": {"maxBudgetUsd": 0.0}}),
            json!({"agent": {"maxBudgetUsd": 0.01}}),
            "spec.agent.maxBudgetUsd",
        ),
        (
            "turns",
            json!({"agent": {"maxTurns": MAX_TURNS + 1}}),
            json!({"agent": {"maxTurns": MAX_TURNS}}),
            "spec.agent.maxTurns",
        ),
        (
            "ttl",
            json!({"ttlSecondsAfterFinished": MAX_TTL_SECONDS + 1}),
            json!({"ttlSecondsAfterFinished": MAX_TTL_SECONDS}),
            "spec.ttlSecondsAfterFinished",
        ),
    ];
    for (what, bad, good, field) in cases {
        let err = resolve(&execution(&merged(&base, &bad)), &[]).expect_err(&format!("{what}: refused"));
        assert_eq!(err.field, field, "{what}: {err}");
        resolve(&execution(&merged(&base, &good)), &[])
            .unwrap_or_else(|e| panic!("{what}: at the bound accepted: {e}"));
    }
}
