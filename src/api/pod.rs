//! Pod settings (`spec.pod` of an AgentTemplate and an AgentExecution, and the chart's
//! `runner.pod` as the cluster's default under both): where a runner pod is scheduled, what it
//! may use, extra metadata, plain env for the agent, and the team's own agent image.
//!
//! Layers merge field by field, the later winning (cluster default → template → execution):
//! maps merge key by key, lists and Kubernetes structs (`affinity`) replace. What makes a runner
//! pod safe is not a setting: the types here have no field for a security context, host
//! namespaces, volumes or the service account, and [`PodSettings::check`] refuses the ways the
//! remaining fields could reach them (an env name the runner uses, `valueFrom`, a label our
//! NetworkPolicy selects on, an AppArmor or seccomp annotation), naming the field path. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::ManifestError;

/// Env names the runner sets or reads itself (also refused: names with a prefix of
/// [`RESERVED_ENV_PREFIXES`]).
pub const RESERVED_ENV_NAMES: &[&str] = &[
    "HOME",
    "TMPDIR",
    "IS_SANDBOX",
    "DISABLE_TELEMETRY",
    "DISABLE_AUTOUPDATER",
    "DISABLE_ERROR_REPORTING",
    "GIT_CONFIG_NOSYSTEM",
    "GIT_TERMINAL_PROMPT",
];
/// Env prefixes that belong to the operator: its runner's contract, the model's address and
/// key, Claude Code's own switches, the dynamic loader (the agent's container starts our binary
/// through it), and what the kubelet injects.
pub const RESERVED_ENV_PREFIXES: &[&str] = &["AGENTOPS_", "ANTHROPIC_", "CLAUDE_", "LD_", "KUBERNETES_"];
/// Labels the operator sets on a runner pod (its NetworkPolicy selects on them) and those the
/// Job controller and Kueue set.
pub const RESERVED_LABELS: &[&str] = &[
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "agentops.dev/execution",
    "kueue.x-k8s.io/queue-name",
    "job-name",
    "controller-uid",
    "batch.kubernetes.io/job-name",
    "batch.kubernetes.io/controller-uid",
];
/// Label prefixes the operator keeps for itself.
pub const RESERVED_LABEL_PREFIXES: &[&str] = &["agentops.dev/", "kueue.x-k8s.io/", "batch.kubernetes.io/"];
/// Annotations that would change a container's confinement (AppArmor, the legacy seccomp ones).
pub const RESERVED_ANNOTATIONS: &[&str] = &[
    "container.apparmor.security.beta.kubernetes.io/agentops-bin",
    "container.apparmor.security.beta.kubernetes.io/clone",
    "container.apparmor.security.beta.kubernetes.io/agent",
    "container.apparmor.security.beta.kubernetes.io/publish",
    "container.apparmor.security.beta.kubernetes.io/finish",
    "seccomp.security.alpha.kubernetes.io/pod",
    "container.seccomp.security.alpha.kubernetes.io/agentops-bin",
    "container.seccomp.security.alpha.kubernetes.io/clone",
    "container.seccomp.security.alpha.kubernetes.io/agent",
    "container.seccomp.security.alpha.kubernetes.io/publish",
    "container.seccomp.security.alpha.kubernetes.io/finish",
];
/// Annotation prefixes refused whatever follows (any container name, our own keys).
pub const RESERVED_ANNOTATION_PREFIXES: &[&str] = &[
    "agentops.dev/",
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/",
    "container.seccomp.security.alpha.kubernetes.io/",
];

/// Bounds (mirrored in the CRD schema).
pub const MAX_ENV: usize = 64;
pub const MAX_ENV_NAME: usize = 256;
pub const MAX_ENV_VALUE: usize = 32 * 1024;
pub const MAX_MAP_ENTRIES: usize = 64;
pub const MAX_LIST: usize = 32;
pub const MAX_IMAGE: usize = 512;
pub const MAX_ANNOTATIONS_BYTES: usize = 64 * 1024;

/// Fields of a pod or container spec that are the operator's, with why; a manifest that sets
/// one under `spec.pod` is refused with this message instead of "unknown field".
pub const OPERATOR_FIELDS: &[(&str, &str)] = &[
    (
        "securityContext",
        "every runner container runs as non-root, with a read-only root filesystem, no capabilities, no privilege escalation and seccomp RuntimeDefault",
    ),
    ("privileged", "no runner container is privileged"),
    ("capabilities", "runner containers drop every capability"),
    ("allowPrivilegeEscalation", "runner containers never escalate privileges"),
    ("readOnlyRootFilesystem", "runner containers have a read-only root filesystem"),
    ("runAsUser", "runner containers run as the operator's non-root uid"),
    ("runAsGroup", "runner containers run as the operator's non-root gid"),
    ("runAsNonRoot", "runner containers always run as non-root"),
    ("seccompProfile", "runner containers use seccomp RuntimeDefault"),
    ("appArmorProfile", "runner containers keep the node's default AppArmor profile"),
    ("hostNetwork", "runner pods use no host namespace"),
    ("hostPID", "runner pods use no host namespace"),
    ("hostIPC", "runner pods use no host namespace"),
    ("hostUsers", "runner pods use no host namespace"),
    ("volumes", "the runner pod's volumes are the operator's (no hostPath)"),
    ("volumeMounts", "each step mounts only what it needs"),
    ("serviceAccountName", "runner pods have no service-account token"),
    ("serviceAccount", "runner pods have no service-account token"),
    ("automountServiceAccountToken", "runner pods have no service-account token"),
    ("shareProcessNamespace", "each container sees only its own processes"),
    ("containers", "the steps' containers are the operator's"),
    ("initContainers", "the steps' containers are the operator's"),
    ("command", "each container runs its step"),
    ("args", "each container runs its step"),
    ("image", "set spec.pod.agentImage: the other steps run the operator's image"),
    ("envFrom", "give plain values in spec.pod.env"),
];

/// Pod settings of runner pods. In a template, an execution, or the controller's default.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    cel,
    validation = Rule::new(env_values_rule()).message("spec.pod.env[].valueFrom is refused: give plain values (credentials reach runner pods through the operator, never the agent's env)"),
    validation = Rule::new(env_names_rule()).message(kube::core::Message::Message(env_names_message())),
    validation = Rule::new(labels_rule()).message(kube::core::Message::Expression(labels_message())),
    validation = Rule::new(annotations_rule()).message(kube::core::Message::Expression(annotations_message())),
    validation = Rule::new(claims_rule("default")).message("spec.pod.resources.default.claims is refused: runner pods claim no dynamic resources"),
    validation = Rule::new(claims_rule("clone")).message("spec.pod.resources.clone.claims is refused: runner pods claim no dynamic resources"),
    validation = Rule::new(claims_rule("agent")).message("spec.pod.resources.agent.claims is refused: runner pods claim no dynamic resources"),
    validation = Rule::new(claims_rule("publish")).message("spec.pod.resources.publish.claims is refused: runner pods claim no dynamic resources"),
    validation = Rule::new(claims_rule("finish")).message("spec.pod.resources.finish.claims is refused: runner pods claim no dynamic resources"),
    validation = Rule::new("!has(self.agentImage) || self.agentImage.matches('^[^\\\\s]+$')").message("spec.pod.agentImage must be an image reference without spaces, e.g. golang:1.23"),
)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// Requests and limits per step; each step's start from `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<StepResources>,
    /// Node labels the pod must match (merged key by key with the layer below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pod tolerates (replaces the layer below's list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node and pod (anti-)affinity (replaces the layer below's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How runner pods spread over topology domains (replaces the layer below's list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// The pod's PriorityClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
    /// The pod's RuntimeClass (e.g. gVisor or Kata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub runtime_class_name: Option<String>,
    /// Secrets (in the execution's namespace) used to pull the images (e.g. `agentImage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Extra labels on the pod (merged; the operator's own cannot be set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub labels: Option<BTreeMap<String, String>>,
    /// Extra annotations on the pod (merged; AppArmor and seccomp ones are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Plain environment variables for the agent (values only; replaces the layer below's
    /// list). At most 64; names the runner uses are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_env")]
    pub env: Option<Vec<EnvVar>>,
    /// The image the agent's container runs (the team's toolchain: e.g. `golang:1.23`); the
    /// operator brings agentops and the Claude Code CLI into it. Clone, publish and finish keep
    /// the operator's image. Default: the operator's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub agent_image: Option<String>,
}

/// Requests and limits of each step's container.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepResources {
    /// For every step that sets none of its own (each step's own keys win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<ResourceRequirements>,
    /// The agent's step: Claude Code and the builds it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<ResourceRequirements>,
    /// The post/onError hooks' step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<ResourceRequirements>,
}

/// The k8s EnvVar schema with bounds, so the apiserver can cost the CEL rules over it.
fn bounded_env(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Option<Vec<EnvVar>>>();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("maxItems".into(), MAX_ENV.into());
        if let Some(props) = obj.get_mut("items").and_then(|i| i.get_mut("properties")) {
            if let Some(name) = props.get_mut("name").and_then(|n| n.as_object_mut()) {
                name.insert("maxLength".into(), MAX_ENV_NAME.into());
            }
            if let Some(value) = props.get_mut("value").and_then(|n| n.as_object_mut()) {
                value.insert("maxLength".into(), MAX_ENV_VALUE.into());
            }
        }
    }
    schema
}

fn claims_rule(step: &str) -> String {
    format!("!has(self.resources) || !has(self.resources.{step}) || !has(self.resources.{step}.claims)")
}

fn cel_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
    format!("[{}]", quoted.join(", "))
}

fn env_values_rule() -> String {
    "!has(self.env) || self.env.all(e, !has(e.valueFrom))".into()
}

fn env_names_rule() -> String {
    let prefixes: Vec<String> = RESERVED_ENV_PREFIXES.iter().map(|p| format!("!e.name.startsWith('{p}')")).collect();
    format!(
        "!has(self.env) || self.env.all(e, !(e.name in {}) && {})",
        cel_list(RESERVED_ENV_NAMES),
        prefixes.join(" && ")
    )
}

fn env_names_message() -> String {
    format!(
        "spec.pod.env[].name is the runner's own; pick another name (refused: {} and names starting with {})",
        RESERVED_ENV_NAMES.join(", "),
        RESERVED_ENV_PREFIXES.join(", ")
    )
}

// Exact keys only: a rule that walked every key with startsWith would be costed by the
// apiserver on keys of unbounded length. The prefixes are `check`'s (the controller stalls).
fn labels_rule() -> String {
    format!("!has(self.labels) || !{}.exists(k, k in self.labels)", cel_list(RESERVED_LABELS))
}

fn annotations_rule() -> String {
    format!("!has(self.annotations) || !{}.exists(k, k in self.annotations)", cel_list(RESERVED_ANNOTATIONS))
}

// The message names the key, as `check` does.
fn labels_message() -> String {
    format!(
        "'spec.pod.labels[' + {}.filter(k, k in self.labels)[0] + '] is a label the operator sets (its NetworkPolicy selects runner pods by them); use another key'",
        cel_list(RESERVED_LABELS)
    )
}

fn annotations_message() -> String {
    format!(
        "'spec.pod.annotations[' + {}.filter(k, k in self.annotations)[0] + '] is refused: AppArmor and seccomp annotations would change how the operator confines the steps'",
        cel_list(RESERVED_ANNOTATIONS)
    )
}

fn merge_map(
    below: &Option<BTreeMap<String, String>>,
    over: &Option<BTreeMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    match (below, over) {
        (None, None) => None,
        (Some(b), None) => Some(b.clone()),
        (None, Some(o)) => Some(o.clone()),
        (Some(b), Some(o)) => {
            let mut m = b.clone();
            m.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(m)
        }
    }
}

/// Requests and limits merged key by key (`over`'s win); `claims` replace.
pub fn merge_resources(
    below: Option<&ResourceRequirements>,
    over: Option<&ResourceRequirements>,
) -> Option<ResourceRequirements> {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let map = |b: Option<&BTreeMap<String, Quantity>>, o: Option<&BTreeMap<String, Quantity>>| match (b, o) {
        (None, None) => None,
        (b, o) => {
            let mut m = b.cloned().unwrap_or_default();
            m.extend(o.cloned().unwrap_or_default());
            Some(m)
        }
    };
    match (below, over) {
        (None, None) => None,
        (Some(b), None) => Some(b.clone()),
        (None, Some(o)) => Some(o.clone()),
        (Some(b), Some(o)) => Some(ResourceRequirements {
            requests: map(b.requests.as_ref(), o.requests.as_ref()),
            limits: map(b.limits.as_ref(), o.limits.as_ref()),
            claims: o.claims.clone().or_else(|| b.claims.clone()),
        }),
    }
}

impl StepResources {
    fn merged(&self, over: &StepResources) -> StepResources {
        let m = |b: &Option<ResourceRequirements>, o: &Option<ResourceRequirements>| {
            merge_resources(b.as_ref(), o.as_ref())
        };
        StepResources {
            default: m(&self.default, &over.default),
            clone: m(&self.clone, &over.clone),
            agent: m(&self.agent, &over.agent),
            publish: m(&self.publish, &over.publish),
            finish: m(&self.finish, &over.finish),
        }
    }

    /// A step's requests and limits: `default`, with the step's own keys winning.
    pub fn for_step(&self, step: super::contract::Step) -> Option<ResourceRequirements> {
        use super::contract::Step;
        let own = match step {
            Step::Clone => &self.clone,
            Step::Agent => &self.agent,
            Step::Publish => &self.publish,
            Step::Finish => &self.finish,
        };
        merge_resources(self.default.as_ref(), own.as_ref())
    }

    fn entries(&self) -> [(&'static str, &Option<ResourceRequirements>); 5] {
        [
            ("default", &self.default),
            ("clone", &self.clone),
            ("agent", &self.agent),
            ("publish", &self.publish),
            ("finish", &self.finish),
        ]
    }
}

impl PodSettings {
    /// These settings with `over`'s on top: field by field, maps merge, lists replace.
    pub fn merged(&self, over: &PodSettings) -> PodSettings {
        let resources = match (&self.resources, &over.resources) {
            (None, None) => None,
            (b, o) => Some(b.clone().unwrap_or_default().merged(&o.clone().unwrap_or_default())),
        };
        PodSettings {
            resources,
            node_selector: merge_map(&self.node_selector, &over.node_selector),
            tolerations: over.tolerations.clone().or_else(|| self.tolerations.clone()),
            affinity: over.affinity.clone().or_else(|| self.affinity.clone()),
            topology_spread_constraints: over
                .topology_spread_constraints
                .clone()
                .or_else(|| self.topology_spread_constraints.clone()),
            priority_class_name: over.priority_class_name.clone().or_else(|| self.priority_class_name.clone()),
            runtime_class_name: over.runtime_class_name.clone().or_else(|| self.runtime_class_name.clone()),
            image_pull_secrets: over.image_pull_secrets.clone().or_else(|| self.image_pull_secrets.clone()),
            labels: merge_map(&self.labels, &over.labels),
            annotations: merge_map(&self.annotations, &over.annotations),
            env: over.env.clone().or_else(|| self.env.clone()),
            agent_image: over.agent_image.clone().or_else(|| self.agent_image.clone()),
        }
    }

    /// A step's requests and limits.
    pub fn resources_for(&self, step: super::contract::Step) -> Option<ResourceRequirements> {
        self.resources.as_ref().and_then(|r| r.for_step(step))
    }

    /// Checks every value, naming the field as `{at}.field` (e.g. `spec.pod.env[0].name`).
    pub fn check(&self, at: &str) -> Result<(), ManifestError> {
        let err = |field: String, message: String| Err(ManifestError::new(field, message));
        if let Some(r) = &self.resources {
            for (step, req) in r.entries() {
                if req.as_ref().is_some_and(|q| q.claims.is_some()) {
                    return err(
                        format!("{at}.resources.{step}.claims"),
                        "is refused: runner pods claim no dynamic resources; set requests and limits".into(),
                    );
                }
            }
        }
        for (field, len, max) in [
            ("nodeSelector", self.node_selector.as_ref().map_or(0, |m| m.len()), MAX_MAP_ENTRIES),
            ("tolerations", self.tolerations.as_ref().map_or(0, |m| m.len()), MAX_LIST),
            ("topologySpreadConstraints", self.topology_spread_constraints.as_ref().map_or(0, |m| m.len()), MAX_LIST),
            ("imagePullSecrets", self.image_pull_secrets.as_ref().map_or(0, |m| m.len()), MAX_LIST),
            ("labels", self.labels.as_ref().map_or(0, |m| m.len()), MAX_MAP_ENTRIES),
            ("annotations", self.annotations.as_ref().map_or(0, |m| m.len()), MAX_MAP_ENTRIES),
            ("env", self.env.as_ref().map_or(0, |m| m.len()), MAX_ENV),
        ] {
            if len > max {
                return err(format!("{at}.{field}"), format!("has {len} entries; at most {max}"));
            }
        }
        for (field, name) in
            [("priorityClassName", &self.priority_class_name), ("runtimeClassName", &self.runtime_class_name)]
        {
            if let Some(n) = name
                && !is_dns_subdomain(n)
            {
                return err(format!("{at}.{field}"), format!("{n:?} is not a Kubernetes object name"));
            }
        }
        for (i, s) in self.image_pull_secrets.iter().flatten().enumerate() {
            if !is_dns_subdomain(&s.name) {
                return err(format!("{at}.imagePullSecrets[{i}].name"), format!("{:?} is not a Secret name", s.name));
            }
        }
        for (i, e) in self.env.iter().flatten().enumerate() {
            let field = format!("{at}.env[{i}]");
            if e.value_from.is_some() {
                return err(
                    format!("{field}.valueFrom"),
                    "is refused: give a plain value; credentials reach runner pods through the operator (the model through its gateway, git through its relay), never the agent's env".into(),
                );
            }
            if e.name.is_empty()
                || e.name.len() > MAX_ENV_NAME
                || e.name.contains('=')
                || e.name.chars().any(char::is_control)
            {
                return err(format!("{field}.name"), format!("{:?} is not an environment variable name", e.name));
            }
            if RESERVED_ENV_NAMES.contains(&e.name.as_str())
                || RESERVED_ENV_PREFIXES.iter().any(|p| e.name.starts_with(p))
            {
                return err(
                    format!("{field}.name"),
                    format!(
                        "{:?} is the runner's own; pick another name (refused: {} and names starting with {})",
                        e.name,
                        RESERVED_ENV_NAMES.join(", "),
                        RESERVED_ENV_PREFIXES.join(", ")
                    ),
                );
            }
            if e.value.as_ref().is_some_and(|v| v.len() > MAX_ENV_VALUE) {
                return err(format!("{field}.value"), format!("is longer than {MAX_ENV_VALUE} bytes"));
            }
        }
        for (k, v) in self.labels.iter().flatten() {
            let field = format!("{at}.labels[{k}]");
            if RESERVED_LABELS.contains(&k.as_str()) || RESERVED_LABEL_PREFIXES.iter().any(|p| k.starts_with(p)) {
                return err(
                    field,
                    "is a label the operator sets (its NetworkPolicy selects runner pods by them); use another key"
                        .into(),
                );
            }
            if !is_qualified_name(k) {
                return err(
                    field,
                    "is not a label key (prefix/name, at most 63 characters of A-Z a-z 0-9 - _ .)".into(),
                );
            }
            if !is_label_value(v) {
                return err(field, format!("{v:?} is not a label value (at most 63 characters of A-Z a-z 0-9 - _ .)"));
            }
        }
        let mut bytes = 0;
        for (k, v) in self.annotations.iter().flatten() {
            let field = format!("{at}.annotations[{k}]");
            if RESERVED_ANNOTATIONS.contains(&k.as_str())
                || RESERVED_ANNOTATION_PREFIXES.iter().any(|p| k.starts_with(p))
            {
                return err(
                    field,
                    "is refused: AppArmor and seccomp annotations would change the operator's confinement of the steps (and agentops.dev/ keys are its own)".into(),
                );
            }
            if !is_qualified_name(k) {
                return err(field, "is not an annotation key (prefix/name)".into());
            }
            bytes += k.len() + v.len();
        }
        if bytes > MAX_ANNOTATIONS_BYTES {
            return err(format!("{at}.annotations"), format!("are {bytes} bytes; at most {MAX_ANNOTATIONS_BYTES}"));
        }
        if let Some(image) = &self.agent_image
            && (image.is_empty()
                || image.len() > MAX_IMAGE
                || image.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return err(
                format!("{at}.agentImage"),
                format!(
                    "{image:?} is not an image reference; write e.g. golang:1.23 or registry.example.com/team/toolchain:1"
                ),
            );
        }
        Ok(())
    }
}

impl PodSettings {
    /// Every step's requests within its limits once the layers are merged (a limit set in one
    /// layer under a request of another would make the Job invalid). `at` names the field.
    pub fn check_requests_within_limits(&self, at: &str) -> Result<(), ManifestError> {
        use super::contract::Step;
        for step in [Step::Clone, Step::Agent, Step::Publish, Step::Finish] {
            let Some(r) = self.resources_for(step) else { continue };
            let (Some(requests), Some(limits)) = (&r.requests, &r.limits) else { continue };
            for (resource, request) in requests {
                let Some(limit) = limits.get(resource) else { continue };
                match (quantity(&request.0), quantity(&limit.0)) {
                    (Some(q), Some(l)) if q > l => {
                        return Err(ManifestError::new(
                            format!("{at}.resources.{}", step.name()),
                            format!(
                                "requests {resource} {} over its limit {} (with the layers below merged in); raise the limit or lower the request",
                                request.0, limit.0
                            ),
                        ));
                    }
                    (None, _) | (_, None) => {
                        let bad = if quantity(&request.0).is_none() { &request.0 } else { &limit.0 };
                        return Err(ManifestError::new(
                            format!("{at}.resources.{}", step.name()),
                            format!("{resource} {bad:?} is not a quantity (e.g. 500m, 2, 4Gi)"),
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// A Kubernetes quantity (`500m`, `1.5`, `4Gi`, `1e3`, `2k`) as a number; None if it is not one.
pub fn quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.len() > 1 && (s.starts_with('e') || s.starts_with('E')) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor).filter(|q| q.is_finite() && *q >= 0.0)
}

/// The message for a field under `spec.pod` that the types do not have because it is the
/// operator's (None: a plain unknown field). `path` is relative to `spec.pod`.
pub fn operator_field(path: &str) -> Option<&'static str> {
    let first = path.split(['.', '[']).next().unwrap_or_default();
    OPERATOR_FIELDS.iter().find(|(f, _)| *f == first).map(|(_, why)| *why)
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

fn is_qualified_name(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::contract::Step;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn pod(yaml: &str) -> PodSettings {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn maps_merge_lists_replace_and_the_upper_layer_wins_field_by_field() {
        let below = pod(
            "nodeSelector: {pool: general, zone: a}\ntolerations: [{key: a, operator: Exists}]\npriorityClassName: low\nlabels: {team: x}\nenv: [{name: A, value: '1'}, {name: B, value: '2'}]\nresources: {default: {requests: {cpu: 500m, memory: 1Gi}, limits: {memory: 4Gi}}}\n",
        );
        let over = pod(
            "nodeSelector: {pool: gpu}\ntolerations: [{key: gpu, operator: Exists}]\nlabels: {cost-center: '42'}\nenv: [{name: C, value: '3'}]\nresources: {agent: {limits: {memory: 8Gi}}}\nagentImage: golang:1.23\n",
        );
        let m = below.merged(&over);
        let ns = m.node_selector.clone().unwrap();
        assert_eq!((ns["pool"].as_str(), ns["zone"].as_str()), ("gpu", "a"));
        let tol: Vec<_> = m.tolerations.clone().unwrap().into_iter().map(|t| t.key.unwrap()).collect();
        assert_eq!(tol, ["gpu"], "a list replaces");
        assert_eq!(m.priority_class_name.as_deref(), Some("low"), "kept from below");
        assert_eq!(m.labels.clone().unwrap().len(), 2);
        let env: Vec<_> = m.env.clone().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(env, ["C"]);
        assert_eq!(m.agent_image.as_deref(), Some("golang:1.23"));
        let agent = m.resources_for(Step::Agent).unwrap();
        assert_eq!(agent.limits.unwrap()["memory"], Quantity("8Gi".into()));
        assert_eq!(agent.requests.unwrap()["cpu"], Quantity("500m".into()), "the default's other keys stay");
        let clone = m.resources_for(Step::Clone).unwrap();
        assert_eq!(clone.limits.unwrap()["memory"], Quantity("4Gi".into()));
        // An empty list clears the one below.
        let cleared = m.merged(&pod("tolerations: []\n"));
        assert_eq!(cleared.tolerations, Some(vec![]));
    }

    #[test]
    fn quantities_read_as_kubernetes_reads_them() {
        for (text, value) in [
            ("500m", 0.5),
            ("2", 2.0),
            ("1.5", 1.5),
            ("4Gi", 4.0 * 1024f64.powi(3)),
            ("2k", 2000.0),
            ("1e3", 1000.0),
            ("1E3", 1000.0),
            ("1E", 1e18),
        ] {
            assert_eq!(quantity(text), Some(value), "{text}");
        }
        for bad in ["", "Gi", "4GB", "-1", "1.2.3", "e3"] {
            assert_eq!(quantity(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_limit_of_one_layer_under_a_request_of_another_is_refused() {
        let chart = pod("resources: {default: {requests: {memory: 1Gi, cpu: 500m}}}\n");
        let template = pod("resources: {agent: {limits: {memory: 512Mi}}}\n");
        let err = chart.merged(&template).check_requests_within_limits("spec.pod").unwrap_err();
        assert_eq!(err.field, "spec.pod.resources.agent");
        assert!(err.message.contains("memory 1Gi over its limit 512Mi"), "{err}");
        // Raised, it is fine; and a layer alone says nothing it does not know.
        let raised = template.merged(&pod("resources: {agent: {limits: {memory: 2Gi}}}\n"));
        chart.merged(&raised).check_requests_within_limits("spec.pod").unwrap();
        template.check_requests_within_limits("spec.pod").unwrap();
        let bad = pod("resources: {default: {requests: {memory: lots}, limits: {memory: 1Gi}}}\n");
        assert!(bad.check_requests_within_limits("spec.pod").unwrap_err().message.contains("not a quantity"));
    }

    #[test]
    fn the_cel_rules_refuse_what_check_refuses() {
        for yaml in [
            "env: [{name: X, valueFrom: {secretKeyRef: {name: s, key: k}}}]",
            "env: [{name: HOME, value: /}]",
            "env: [{name: AGENTOPS_MODEL_URL, value: x}]",
            "env: [{name: ANTHROPIC_BASE_URL, value: x}]",
            "env: [{name: CLAUDE_CONFIG_DIR, value: x}]",
            "env: [{name: LD_PRELOAD, value: x}]",
            "labels: {app.kubernetes.io/component: web}",
            "labels: {agentops.dev/execution: other}",
            "annotations: {container.apparmor.security.beta.kubernetes.io/agent: unconfined}",
            "resources: {agent: {claims: [{name: gpu}]}}",
            "agentImage: 'a b'",
        ] {
            let p = pod(yaml);
            assert!(p.check("spec.pod").is_err(), "check refuses {yaml}");
            let v = serde_json::to_value(&p).unwrap();
            assert!(PodSettings::validate_cel(&v, None).is_err(), "CEL refuses {yaml}");
        }
        let ok = pod(
            "env: [{name: GOFLAGS, value: -mod=mod}, {name: PATH, value: /usr/local/go/bin:/usr/bin:/bin}]\nlabels: {team: a}\nannotations: {example.com/owner: a}\nagentImage: golang:1.23\n",
        );
        ok.check("spec.pod").unwrap();
        PodSettings::validate_cel(&serde_json::to_value(&ok).unwrap(), None).unwrap();
    }
}
