//! Attack tests (security review of AgentPolicy): the pure rules, through the same public
//! functions the controller and `agentops run --policy` call. Each `attack_*` test asserts the
//! secure behaviour (it failed while the hole existed, before the fix); `held_*` tests show what held.

use agentops::api::{self, AgentPolicy, policy};

fn policies(yaml: &str) -> Vec<AgentPolicy> {
    api::parse_policies(yaml).expect("policies")
}

fn apply(manifest: &str, all: &[AgentPolicy]) -> Result<api::Resolved, String> {
    let mut m = api::parse_manifest(manifest).map_err(|e| e.to_string())?;
    let ns = m.execution.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(policy::NAME_LABEL.to_string(), ns);
    let selected = policy::selecting(all, &labels);
    let template = m.templates.first().cloned();
    policy::apply_defaults(&mut m.execution, template.as_ref(), &selected);
    let mut r = api::resolve(&m.execution, &m.templates).map_err(|e| e.to_string())?;
    r.policy = Some(policy::check(&r, &selected, false).map_err(|e| e.to_string())?);
    Ok(r)
}

fn execution_yaml(spec_extra: &str) -> String {
    format!(
        "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: x, namespace: team-a}}\nspec:\n  prompt: do it\n  repository: {{url: 'https://git.example.com/r.git'}}\n  agent: {{model: claude-sonnet-4-6}}\n{spec_extra}"
    )
}

const POLICY: &str = r#"
apiVersion: agentops.dev/v1alpha1
kind: AgentPolicy
metadata: {name: company}
spec:
  maximums: {maxBudgetUsd: 50, timeout: 4h, maxTurns: 300}
  allowed:
    models: ["claude-sonnet-*"]
    agentImages: [registry.example.com, "registry.example.com/team/tool:1.0"]
    egress: [{cidr: 10.20.0.0/16, ports: [443]}]
"#;

/// An IPv4-mapped (`::ffff:a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) network with a short IPv6
/// prefix passes a policy that allows one IPv4 /16: `CidrRule::covers` canonicalises the
/// network *address* to IPv4 but compares the *prefix length* as if it were IPv4. The
/// NetworkPolicy then gets `64:ff9b::a14:0/16` (all of 0064::/16, which contains the whole
/// NAT64 prefix 64:ff9b::/96 = every IPv4 address through a NAT64 gateway) or
/// `::ffff:10.20.0.0/16` (0000::/16, every IPv4-mapped address).
#[test]
fn attack_egress_ipv4_mapped_and_nat64_cidrs_pass_an_ipv4_allowlist() {
    let all = policies(POLICY);
    let mut escaped = Vec::new();
    for cidr in ["::ffff:10.20.0.0/16", "64:ff9b::a14:0/16", "::ffff:10.20.0.0/20", "64:ff9b::a14:0/17"] {
        let asks = format!("  egress: [{{cidr: '{cidr}', ports: [443]}}]\n");
        if apply(&execution_yaml(&asks), &all).is_ok() {
            escaped.push(cidr);
        }
    }
    assert!(escaped.is_empty(), "IPv6 blocks far wider than 10.20.0.0/16 passed the policy: {escaped:?}");
}

/// An "exact reference" in `allowed.agentImages` (`registry.example.com/team/tool:1.0`) also
/// allows `...tool:1.0@sha256:<anything>`: with a tag and a digest, runtimes pull the digest,
/// so any image ever pushed to that repository runs, not the pinned tag.
#[test]
fn attack_image_exact_tag_reference_allows_any_digest() {
    let all = policies(&POLICY.replace("registry.example.com, ", ""));
    let digest = "a".repeat(64);
    let asks = format!("  pod: {{agentImage: 'registry.example.com/team/tool:1.0@sha256:{digest}'}}\n");
    assert!(
        apply(&execution_yaml(&asks), &all).is_err(),
        "an exact tag reference allowed an arbitrary digest of the repository"
    );
}

/// A registry entry (`registry.example.com`) also allows `registry.example.com:latest` (or
/// `@sha256:...`): with no `/`, container runtimes read that as Docker Hub's
/// `docker.io/library/registry.example.com:latest`, not an image of the company registry.
#[test]
fn attack_image_registry_entry_allows_a_docker_hub_name() {
    let all = policies(POLICY);
    let asks = "  pod: {agentImage: 'registry.example.com:latest'}\n";
    assert!(
        apply(&execution_yaml(asks), &all).is_err(),
        "registry.example.com:latest (docker.io/library/...) passed a registry allowlist"
    );
}

/// What held: model tricks, image tricks, timeout forms, turns overflow, env model names,
/// the deprecated template image, template-side values.
#[test]
fn held_policy_tricks_are_refused() {
    let all = policies(POLICY);
    let refused: &[&str] = &[
        // models: case, whitespace, unicode look-alikes, another family
        "  agent: {model: Claude-Sonnet-4-6}\n",
        "  agent: {model: claude-opus-4-1}\n",
        "  agent: {model: ' claude-sonnet-4-6'}\n",
        "  agent: {model: \"claude\u{2010}sonnet-4-6\"}\n",
        // images
        "  pod: {agentImage: 'registry.example.com.evil.io/x:1'}\n",
        "  pod: {agentImage: 'registry.example.com./x:1'}\n",
        "  pod: {agentImage: 'registry.example.com:443/x:1'}\n",
        "  pod: {agentImage: 'REGISTRY.EXAMPLE.COM/x:1'}\n",
        "  pod: {agentImage: 'registry.example.com@evil.io/x'}\n",
        // timeouts
        "  timeout: 4h1s\n",
        "  timeout: 1h 30m\n",
        "  timeout: 5h\n",
        "  timeout: 999999999h\n",
        "  timeout: 14400001ms\n",
        // turns
        "  agent: {maxTurns: 301}\n",
        "  agent: {maxTurns: 4294967297}\n",
        "  agent: {maxTurns: -1}\n",
        // budget
        "  agent: {maxBudgetUsd: 50.0000001}\n",
        "  agent: {maxBudgetUsd: .inf}\n",
        "  agent: {maxBudgetUsd: .nan}\n",
        // egress
        "  egress: [{cidr: 10.20.0.0/15, ports: [443]}]\n",
        "  egress: [{cidr: 10.21.0.0/16, ports: [443]}]\n",
        "  egress: [{cidr: 10.20.0.0/16, ports: [443, 22]}]\n",
        "  egress: [{cidr: 10.20.0.0/16, ports: []}]\n",
        "  egress: [{cidr: 0.0.0.0/0, ports: [443]}]\n",
        "  egress: [{cidr: '::/0', ports: [443]}]\n",
        // env can not name the model
        "  pod: {env: [{name: ANTHROPIC_MODEL, value: claude-opus-4-1}]}\n",
        "  pod: {env: [{name: ANTHROPIC_SMALL_FAST_MODEL, value: claude-opus-4-1}]}\n",
        "  pod: {env: [{name: CLAUDE_CODE_SUBAGENT_MODEL, value: claude-opus-4-1}]}\n",
    ];
    let mut passed = Vec::new();
    for asks in refused {
        if let Ok(r) = apply(&execution_yaml(asks), &all) {
            passed.push(format!("{asks:?} -> model {:?} image {:?}", r.model, r.pod.agent_image));
        }
    }
    // Template-side: the deprecated spec.image and the template's model are checked too.
    let template = |t: &str| {
        format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {{name: t, namespace: team-a}}\nspec: {t}\n---\napiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: x, namespace: team-a}}\nspec:\n  templateRef: {{name: t}}\n  prompt: do it\n  repository: {{url: 'https://git.example.com/r.git'}}\n"
        )
    };
    for t in [
        "{image: 'docker.io/library/golang:1.23', agent: {model: claude-sonnet-4-6}}",
        "{agent: {model: claude-opus-4-1}}",
        "{timeout: 9h, agent: {model: claude-sonnet-4-6}}",
        "{egress: [{cidr: 1.2.3.0/24, ports: [443]}], agent: {model: claude-sonnet-4-6}}",
    ] {
        if apply(&template(t), &all).is_ok() {
            passed.push(format!("template {t}"));
        }
    }
    assert!(passed.is_empty(), "passed a policy they should not: {passed:#?}");
}
