//! The children of an execution, as the controller wants them: the workspace PVC (or an
//! emptyDir) and the Job that runs `agentops runner`. Pure: same input, same objects.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::pod::StepResources;
use crate::api::{AgentExecution, PodSettings, Resolved};

use crate::api::contract as var;
pub use crate::api::contract::paths::{
    EGRESS_TOKEN_DIR, GIT_TOKEN_DIR, HOME_DIR, MANIFEST_DIR, MANIFEST_KEY, MODEL_TOKEN_DIR, PRIVATE_DIR,
    REPORT_TOKEN_DIR, SECRETS_DIR, STREAM_DIR, TMP_DIR, WORKSPACE_DIR,
};

/// Name of the Secret holding what an execution's pod is given: its manifest and its runner's
/// tokens (each container mounts only its own keys).
pub fn runner_secret_name(ax: &AgentExecution) -> String {
    runner_secret_name_of(&ax.name_any())
}

/// `runner_secret_name` of the execution called `execution`.
pub fn runner_secret_name_of(execution: &str) -> String {
    child_name("agentops-runner", execution)
}

/// Renders the manifest the runner reads: the execution and its template, without status or
/// server metadata.
pub fn runner_manifest(
    ax: &AgentExecution,
    template: Option<&crate::api::AgentTemplate>,
) -> Result<String, super::context::Error> {
    let mut out = String::new();
    if let Some(t) = template {
        let doc = serde_json::json!({"apiVersion": crate::api::API_VERSION, "kind": "AgentTemplate",
                         "metadata": {"name": t.name_any(), "namespace": t.namespace()}, "spec": t.spec});
        out.push_str(&serde_norway::to_string(&doc).map_err(|e| super::context::Error::Manifest(e.to_string()))?);
        out.push_str("---\n");
    }
    let doc = serde_json::json!({"apiVersion": crate::api::API_VERSION, "kind": "AgentExecution",
                     "metadata": {"name": ax.name_any(), "namespace": ax.namespace()}, "spec": ax.spec});
    out.push_str(&serde_norway::to_string(&doc).map_err(|e| super::context::Error::Manifest(e.to_string()))?);
    Ok(out)
}

/// The runner's report endpoint on the controller, for one execution.
pub fn report_url(base: &str, ax: &AgentExecution) -> String {
    format!(
        "{}/api/v1/runner/{}/{}/report",
        base.trim_end_matches('/'),
        ax.namespace().unwrap_or_else(|| "default".into()),
        ax.name_any()
    )
}

/// Label on every child: the execution's name.
pub const EXECUTION_LABEL: &str = "agentops.dev/execution";
/// Kueue's queue label, passed from the execution to the Job.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Seconds the Job may run past the execution's timeout (the runner stops itself first).
const DEADLINE_GRACE_SECS: i64 = 60;

/// Settings of the controller that shape every Job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    /// Runner image (holds `agentops`, git and Claude Code).
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// Storage class for workspace PVCs when the execution names none; None: emptyDir.
    pub default_storage_class: Option<String>,
    /// Workspace size when the execution gives none.
    pub default_workspace_size: String,
    /// UID/GID the runner runs as.
    pub runner_uid: i64,
    /// The cluster's default pod settings (the chart's `runner.pod`), under the template's and
    /// the execution's; checked when the controller starts.
    pub pod: PodSettings,
    /// Base URL of the controller's HTTP endpoint, where runners report progress.
    pub report_url: Option<String>,
    /// Model for executions that name none (Claude Code reads `ANTHROPIC_MODEL`).
    pub default_model: Option<String>,
    /// Clone and publish reach git through the controller's relay (with `report_url`): no git
    /// credential in the pod. Off: those two containers mount it and talk to the git host.
    pub git_relay: bool,
    /// The controller's egress proxy as runner pods reach it (`http://host:port`): the agent
    /// of an execution with `egressHosts` gets it as its `HTTPS_PROXY`/`HTTP_PROXY`.
    pub egress_proxy: Option<String>,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            image: "ghcr.io/agentops/agentops:latest".into(),
            image_pull_policy: None,
            default_storage_class: None,
            default_workspace_size: "10Gi".into(),
            runner_uid: 10001,
            pod: default_pod_settings(),
            report_url: None,
            default_model: None,
            git_relay: true,
            egress_proxy: None,
        }
    }
}

/// Runner pods' resources when the controller is given none: enough for Claude Code and a
/// build, bounded so that one execution cannot take a node (memory, and the node's disk
/// through logs and emptyDirs).
pub fn default_runner_resources() -> Option<ResourceRequirements> {
    let q = |v: &str| Quantity(v.into());
    Some(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("500m")),
            ("memory".to_string(), q("1Gi")),
            ("ephemeral-storage".to_string(), q("1Gi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q("4Gi")), ("ephemeral-storage".to_string(), q("20Gi"))])),
        ..Default::default()
    })
}

/// The cluster's default pod settings when the controller is given none: the default
/// resources for every step.
pub fn default_pod_settings() -> PodSettings {
    PodSettings {
        resources: Some(StepResources { default: default_runner_resources(), ..Default::default() }),
        ..Default::default()
    }
}

/// Every container's security settings: not a pod setting, never overridden.
fn locked_down() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        ..Default::default()
    }
}

/// The init container that brings the operator's binaries into a team's agent image, its
/// volume, and where the agent's container mounts it (read-only).
pub const BUNDLE_CONTAINER: &str = "agentops-bin";
pub const BUNDLE_VOLUME: &str = "agentops-bin";
pub use crate::api::contract::paths::BUNDLE_DIR;
/// The bundle's size limit: the Claude Code CLI (about 230 MB), agentops and their libraries.
pub const BUNDLE_SIZE: &str = "1Gi";

/// Size of the runner's private HOME and TMPDIR volumes.
pub const SCRATCH_SIZE: &str = "1Gi";

/// A child name: `<prefix>-<execution>`, cut to 63 characters with a stable hash when longer.
pub fn child_name(prefix: &str, execution: &str) -> String {
    let full = format!("{prefix}-{execution}");
    if full.len() <= 63 {
        return full;
    }
    // FNV-1a: stable across versions and platforms, unlike DefaultHasher.
    let hash = execution.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let keep = 63 - 9;
    let mut cut = full[..keep].to_string();
    while cut.ends_with('-') || cut.ends_with('.') {
        cut.pop();
    }
    format!("{cut}-{:08x}", hash as u32)
}

/// The Job's name for an execution (deterministic: a restarted controller finds it again).
pub fn job_name(ax: &AgentExecution) -> String {
    child_name("agentops", &ax.name_any())
}

/// The workspace PVC's name.
pub fn pvc_name(ax: &AgentExecution) -> String {
    child_name("agentops-ws", &ax.name_any())
}

fn labels(ax: &AgentExecution) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "agentops".to_string()),
        ("app.kubernetes.io/component".to_string(), "runner".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "agentops".to_string()),
        (EXECUTION_LABEL.to_string(), truncate_label(&ax.name_any())),
    ]);
    if let Some(q) = ax.labels().get(KUEUE_QUEUE_LABEL) {
        l.insert(KUEUE_QUEUE_LABEL.to_string(), q.clone());
    }
    l
}

fn truncate_label(v: &str) -> String {
    v.chars().take(63).collect::<String>().trim_end_matches(['-', '_', '.']).to_string()
}

fn meta(ax: &AgentExecution, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ax.namespace(),
        labels: Some(labels(ax)),
        owner_references: ax.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The workspace PVC, when the execution (or the controller's default) names a storage class.
pub fn desired_pvc(ax: &AgentExecution, cfg: &JobConfig) -> Option<PersistentVolumeClaim> {
    let ws = &ax.spec.workspace;
    let class = ws.storage_class_name.clone().or_else(|| cfg.default_storage_class.clone())?;
    let size = ws.size.clone().unwrap_or_else(|| cfg.default_workspace_size.clone());
    let mut metadata = meta(ax, pvc_name(ax));
    // Owned (and so deleted with the execution) only when its policy does not keep it; a kept
    // workspace is released by the controller when the run succeeded (RetainOnFailure) or never.
    if ws.retain.unwrap_or_default() != crate::api::RetainPolicy::Delete {
        metadata.owner_references = None;
    }
    Some(PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(class),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), Quantity(size))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The git relay of one execution on the controller (stands for `spec.repository.url`).
pub fn git_url(base: &str, ax: &AgentExecution) -> String {
    format!(
        "{}/git/{}/{}",
        base.trim_end_matches('/'),
        ax.namespace().unwrap_or_else(|| "default".into()),
        ax.name_any()
    )
}

/// The model gateway of one execution on the controller (the agent's `ANTHROPIC_BASE_URL`).
pub fn model_url(base: &str, ax: &AgentExecution) -> String {
    format!(
        "{}/gateway/{}/{}",
        base.trim_end_matches('/'),
        ax.namespace().unwrap_or_else(|| "default".into()),
        ax.name_any()
    )
}

/// Name of the NetworkPolicy an execution's egress rules become.
pub fn egress_policy_name(ax: &AgentExecution) -> String {
    child_name("agentops-egress", &ax.name_any())
}

/// The egress an execution adds for its own runner pod (`spec.egress` and its template's), as
/// a NetworkPolicy owned by the execution; None when it adds none. NetworkPolicies add up: the
/// chart's policy for every runner pod (DNS and the controller only) stays the base.
pub fn desired_network_policy(ax: &AgentExecution, r: &Resolved) -> Option<serde_json::Value> {
    if r.egress.is_empty() {
        return None;
    }
    let rules: Vec<serde_json::Value> = r
        .egress
        .iter()
        .map(|e| {
            serde_json::json!({
                "to": [{"ipBlock": {"cidr": e.cidr}}],
                "ports": e.ports.iter().map(|p| serde_json::json!({"protocol": "TCP", "port": p})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let meta = meta(ax, egress_policy_name(ax));
    Some(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": {
                EXECUTION_LABEL: truncate_label(&ax.name_any()),
                "app.kubernetes.io/component": "runner",
            }},
            "policyTypes": ["Egress"],
            "egress": rules,
        }
    }))
}

/// The Job that runs the execution: one container per step, each mounting only what it needs
/// (see `runner::steps`). No container holds the Anthropic key (the controller's gateway adds
/// it); the agent's holds no credential at all: not the git token, not the report token, no
/// service-account token.
pub fn desired_job(ax: &AgentExecution, r: &Resolved, cfg: &JobConfig) -> Job {
    use crate::api::contract::Step;
    // The cluster's default, then the template's and the execution's (already in `r.pod`).
    let settings = cfg.pod.merged(&r.pod);
    let agent_image = settings.agent_image.clone().filter(|i| !i.trim().is_empty());
    let env = |k: &str, v: &str| EnvVar { name: k.into(), value: Some(v.into()), ..Default::default() };
    let scratch = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(Quantity(SCRATCH_SIZE.into())), ..Default::default() }),
        ..Default::default()
    };
    let secret_items = |name: &str, secret: String, items: &[(&str, &str)], optional: bool| Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o400),
            items: Some(
                items
                    .iter()
                    .map(|(key, path)| k8s_openapi::api::core::v1::KeyToPath {
                        key: key.to_string(),
                        path: path.to_string(),
                        mode: None,
                    })
                    .collect(),
            ),
            optional: optional.then_some(true),
        }),
        ..Default::default()
    };
    let mut volumes = vec![scratch("home"), scratch("tmp"), scratch("private"), scratch("stream")];
    if agent_image.is_some() {
        volumes.push(Volume {
            name: BUNDLE_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(BUNDLE_SIZE.into())),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    volumes.push(match desired_pvc(ax, cfg) {
        Some(_) => Volume {
            name: "workspace".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc_name(ax),
                read_only: None,
            }),
            ..Default::default()
        },
        None => Volume {
            name: "workspace".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(
                    ax.spec.workspace.size.clone().unwrap_or_else(|| cfg.default_workspace_size.clone()),
                )),
                ..Default::default()
            }),
            ..Default::default()
        },
    });
    let runner_secret = runner_secret_name(ax);
    volumes.push(secret_items("manifest", runner_secret.clone(), &[(MANIFEST_KEY, MANIFEST_KEY)], false));
    let relay = cfg.report_url.as_ref().filter(|_| cfg.git_relay).map(|base| git_url(base, ax));
    // The git credential: only its key (and the optional username), for clone and publish; and
    // not at all when git goes through the controller's relay.
    let git_secret = r.credentials.as_ref().filter(|_| relay.is_none()).map(|c| {
        let key = c.key.clone().unwrap_or_else(|| "token".into());
        // Optional: a missing `username` is fine; a missing token fails the clone by name.
        volumes.push(secret_items("git-credential", c.name.clone(), &[(&key, &key), ("username", "username")], true));
        c.name.clone()
    });
    let report = cfg.report_url.as_ref().map(|base| report_url(base, ax));
    // Egress by host name: the controller's proxy, with a token only the agent's container mounts.
    let egress = cfg.egress_proxy.as_ref().filter(|_| report.is_some() && !r.egress_hosts.is_empty());
    if report.is_some() {
        let tokens = runner_secret;
        volumes.push(secret_items(
            "report-token",
            tokens.clone(),
            &[(super::reports::REPORT_TOKEN_KEY, "token")],
            false,
        ));
        volumes.push(secret_items("model-token", tokens.clone(), &[(super::reports::MODEL_TOKEN_KEY, "token")], false));
        if egress.is_some() {
            volumes.push(secret_items(
                "egress-token",
                tokens.clone(),
                &[(super::reports::EGRESS_TOKEN_KEY, "token")],
                false,
            ));
        }
        if relay.is_some() {
            use super::reports::{GIT_CLONE_TOKEN_KEY, GIT_PUBLISH_TOKEN_KEY};
            volumes.push(secret_items("git-clone-token", tokens.clone(), &[(GIT_CLONE_TOKEN_KEY, "token")], false));
            volumes.push(secret_items("git-publish-token", tokens, &[(GIT_PUBLISH_TOKEN_KEY, "token")], false));
        }
    }
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    };
    // A node keeps 12 KiB ÷ (containers + init containers) of each termination message: each
    // step is told the count of this pod.
    let containers = 4 + usize::from(agent_image.is_some());
    let container = |step: Step| {
        let db = match step {
            Step::Agent => format!("{STREAM_DIR}/{}", crate::api::contract::AGENT_DB),
            _ => format!("{PRIVATE_DIR}/runner.db"),
        };
        let mut envs = vec![
            env(var::MANIFEST_FILE, &format!("{MANIFEST_DIR}/{MANIFEST_KEY}")),
            env(var::WORKSPACE_ROOT, WORKSPACE_DIR),
            env(var::STREAM_DIR, STREAM_DIR),
            env(var::DB, &db),
        ];
        let mut mounts = vec![mount("manifest", MANIFEST_DIR, true), mount("workspace", WORKSPACE_DIR, false)];
        match step {
            Step::Clone | Step::Publish => {
                // No HOME of the agent's: git reads no dotfile it wrote.
                envs.extend([env("HOME", PRIVATE_DIR), env("TMPDIR", PRIVATE_DIR)]);
                envs.push(env(var::PRIVATE_DIR, PRIVATE_DIR));
                mounts.push(mount("private", PRIVATE_DIR, false));
                mounts.push(mount("stream", STREAM_DIR, step == Step::Publish));
                if let Some(secret) = &git_secret {
                    envs.push(env(var::SECRETS_DIR, SECRETS_DIR));
                    mounts.push(mount("git-credential", &format!("{SECRETS_DIR}/{secret}"), true));
                }
                if let Some(url) = &relay {
                    // The fetch-only token for clone; publish's may push the work branch only.
                    let vol = if step == Step::Clone { "git-clone-token" } else { "git-publish-token" };
                    envs.push(env(var::GIT_URL, url));
                    envs.push(env(var::GIT_TOKEN_FILE, &format!("{GIT_TOKEN_DIR}/token")));
                    mounts.push(mount(vol, GIT_TOKEN_DIR, true));
                }
                if step == Step::Publish
                    && let Some(url) = &report
                {
                    envs.push(env(var::REPORT_URL, url));
                    envs.push(env(var::REPORT_TOKEN_FILE, &format!("{REPORT_TOKEN_DIR}/token")));
                    mounts.push(mount("report-token", REPORT_TOKEN_DIR, true));
                }
            }
            Step::Agent => {
                envs.extend([env("HOME", HOME_DIR), env("TMPDIR", TMP_DIR)]);
                mounts.extend([mount("home", HOME_DIR, false), mount("tmp", TMP_DIR, false)]);
                mounts.push(mount("stream", STREAM_DIR, false));
                if let Some(base) = &cfg.report_url {
                    envs.push(env(var::MODEL_URL, &model_url(base, ax)));
                    envs.push(env(var::MODEL_TOKEN_FILE, &format!("{MODEL_TOKEN_DIR}/token")));
                    mounts.push(mount("model-token", MODEL_TOKEN_DIR, true));
                }
                if let Some(proxy) = egress {
                    envs.push(env(var::EGRESS_PROXY, proxy));
                    envs.push(env(var::EGRESS_TOKEN_FILE, &format!("{EGRESS_TOKEN_DIR}/token")));
                    mounts.push(mount("egress-token", EGRESS_TOKEN_DIR, true));
                }
                if let Some(m) = &cfg.default_model {
                    envs.push(env("ANTHROPIC_MODEL", m));
                }
                // Under a policy's model list the CLI's background requests use the run's model
                // (the gateway refuses any other model).
                if let (Some(m), Some(_)) = (&r.model, r.policy.as_ref().and_then(|p| p.models.as_ref())) {
                    envs.extend([env("ANTHROPIC_SMALL_FAST_MODEL", m), env("ANTHROPIC_DEFAULT_HAIKU_MODEL", m)]);
                }
                if agent_image.is_some() {
                    // The image's `ENV` reaches the step's process too: what decides its
                    // sandbox and its last words is set here, where a container's env wins.
                    envs.extend([
                        env(var::NO_SANDBOX, "false"),
                        // (clap takes no empty list: the bundle, which the agent reads anyway.)
                        env(var::SANDBOX_READ, BUNDLE_DIR),
                        env(var::TERMINATION_LOG, "/dev/termination-log"),
                    ]);
                    // The operator's binaries, brought into the team's image by the bundle step.
                    envs.push(env(var::CLAUDE_BIN, &format!("{BUNDLE_DIR}/{}", crate::runner::bundle::CLAUDE)));
                    envs.push(env(var::BUNDLE_DIR, BUNDLE_DIR));
                    mounts.push(mount(BUNDLE_VOLUME, BUNDLE_DIR, true));
                }
                // The team's plain env for the agent (checked: no name of ours, no valueFrom);
                // the step passes exactly these names on to Claude Code.
                let own: Vec<&EnvVar> = settings.env.iter().flatten().collect();
                if !own.is_empty() {
                    envs.extend(own.iter().map(|e| env(&e.name, e.value.as_deref().unwrap_or_default())));
                    let names: Vec<&str> = own.iter().map(|e| e.name.as_str()).collect();
                    envs.push(env(var::AGENT_ENV, &names.join(",")));
                }
            }
            Step::Finish => {
                envs.extend([env("HOME", HOME_DIR), env("TMPDIR", TMP_DIR)]);
                envs.push(env(var::PRIVATE_DIR, PRIVATE_DIR));
                mounts.extend([mount("home", HOME_DIR, false), mount("tmp", TMP_DIR, false)]);
                mounts.push(mount("private", PRIVATE_DIR, false));
                mounts.push(mount("stream", STREAM_DIR, true));
            }
        }
        envs.push(env(var::POD_CONTAINERS, &containers.to_string()));
        // The agent's step runs in the team's image when it names one, started through the
        // bundle's own loader (whatever libc the image has); every other step, which holds a
        // token or runs hooks, runs the operator's image.
        let (image, pull, command) = match (&agent_image, step) {
            (Some(image), Step::Agent) => (
                image.clone(),
                None,
                vec![
                    format!("{BUNDLE_DIR}/{}", crate::runner::bundle::LOADER),
                    "--library-path".into(),
                    format!("{BUNDLE_DIR}/{}", crate::runner::bundle::LIB_DIR),
                    format!("{BUNDLE_DIR}/{}", crate::runner::bundle::AGENTOPS),
                    "step".into(),
                    step.name().into(),
                ],
            ),
            _ => (
                cfg.image.clone(),
                cfg.image_pull_policy.clone(),
                vec!["agentops".into(), "step".into(), step.name().into()],
            ),
        };
        Container {
            name: step.name().into(),
            image: Some(image),
            image_pull_policy: pull,
            command: Some(command),
            env: Some(envs),
            volume_mounts: Some(mounts),
            resources: settings.resources_for(step),
            termination_message_policy: Some("File".into()),
            security_context: Some(locked_down()),
            ..Default::default()
        }
    };
    let mut init_containers = Vec::new();
    if agent_image.is_some() {
        // Copies agentops, the pinned Claude Code CLI, their libraries and the dynamic loader
        // from the operator's image into the volume the agent's container mounts read-only (as
        // Tekton injects its entrypoint).
        init_containers.push(Container {
            name: BUNDLE_CONTAINER.into(),
            image: Some(cfg.image.clone()),
            image_pull_policy: cfg.image_pull_policy.clone(),
            command: Some(vec!["agentops".into(), "bundle".into(), BUNDLE_DIR.into()]),
            volume_mounts: Some(vec![mount(BUNDLE_VOLUME, BUNDLE_DIR, false)]),
            resources: settings.resources.as_ref().and_then(|r| r.default.clone()),
            termination_message_policy: Some("File".into()),
            security_context: Some(locked_down()),
            ..Default::default()
        });
    }
    init_containers.extend([container(Step::Clone), container(Step::Agent), container(Step::Publish)]);
    debug_assert_eq!(init_containers.len() + 1, containers);
    // Ours last: a label of the team's never replaces one our NetworkPolicy selects on (and
    // `resolve` refuses them anyway).
    let mut pod_labels = settings.labels.clone().unwrap_or_default();
    let labels = labels(ax);
    pod_labels.extend(labels.clone());
    let suspend = labels.contains_key(KUEUE_QUEUE_LABEL).then_some(true);
    Job {
        metadata: meta(ax, job_name(ax)),
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(r.timeout.as_secs() as i64 + DEADLINE_GRACE_SECS),
            // Kueue admits a suspended Job by unsuspending it.
            suspend,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: settings.annotations.clone().filter(|a| !a.is_empty()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    // Each container sees only its own processes.
                    share_process_namespace: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(cfg.runner_uid),
                        run_as_group: Some(cfg.runner_uid),
                        fs_group: Some(cfg.runner_uid),
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        ..Default::default()
                    }),
                    init_containers: Some(init_containers),
                    containers: vec![container(Step::Finish)],
                    volumes: Some(volumes),
                    node_selector: settings.node_selector.clone().filter(|m| !m.is_empty()),
                    tolerations: settings.tolerations.clone().filter(|l| !l.is_empty()),
                    affinity: settings.affinity.clone(),
                    topology_spread_constraints: settings.topology_spread_constraints.clone().filter(|l| !l.is_empty()),
                    priority_class_name: settings.priority_class_name.clone(),
                    runtime_class_name: settings.runtime_class_name.clone(),
                    image_pull_secrets: settings.image_pull_secrets.clone().filter(|l| !l.is_empty()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{parse_manifest, resolve};

    fn ax(extra: &str) -> (AgentExecution, Resolved) {
        let text = format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: fix-bug, namespace: team-a, uid: u-1}}\nspec:\n  prompt: fix it\n  timeout: 10m\n  repository: {{url: 'https://example.com/r.git', credentialsSecretRef: {{name: git-cred}}}}\n  agent: {{apiKeySecretRef: {{name: anthropic}}}}\n{extra}"
        );
        let m = parse_manifest(&text).unwrap();
        let r = resolve(&m.execution, &m.templates).unwrap();
        (m.execution, r)
    }

    fn mounts(c: &Container) -> Vec<(String, String, bool)> {
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.clone(), m.mount_path.clone(), m.read_only == Some(true)))
            .collect()
    }

    #[test]
    fn each_step_is_a_locked_down_container_mounting_only_what_it_needs() {
        let (ax, r) = ax("");
        let cfg = JobConfig { report_url: Some("http://ctl.agentops.svc:8080".into()), ..Default::default() };
        let job = desired_job(&ax, &r, &cfg);
        assert_eq!(job.metadata.name.as_deref(), Some("agentops-fix-bug"));
        assert_eq!(job.metadata.namespace.as_deref(), Some("team-a"));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("AgentExecution", Some(true)));
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.active_deadline_seconds, Some(600 + 60));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.share_process_namespace, Some(false));
        assert_eq!(pod.security_context.as_ref().unwrap().seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        // HOME and TMPDIR (and the steps' scratch) are emptyDirs of 1Gi at most.
        for name in ["home", "tmp", "private", "stream"] {
            let v = pod.volumes.iter().flatten().find(|v| v.name == name).unwrap_or_else(|| panic!("{name}"));
            let size = v.empty_dir.as_ref().and_then(|e| e.size_limit.clone()).map(|q| q.0);
            assert_eq!(size.as_deref(), Some("1Gi"), "{name}");
        }
        let init = pod.init_containers.clone().unwrap();
        let names: Vec<&str> = init.iter().chain(&pod.containers).map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["clone", "agent", "publish", "finish"], "steps in order; finish is the main container");
        // A node keeps 12 KiB ÷ containers of each termination message: the runner's bound.
        assert_eq!(names.len(), crate::api::report::RUNNER_CONTAINERS);
        let all: Vec<&Container> = init.iter().chain(&pod.containers).collect();
        for c in &all {
            assert_eq!(
                c.command.clone().unwrap(),
                vec!["agentops".to_string(), "step".into(), c.name.clone()],
                "{} runs its step",
                c.name
            );
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(
                (sc.read_only_root_filesystem, sc.allow_privilege_escalation, sc.run_as_non_root),
                (Some(true), Some(false), Some(true))
            );
            assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
            // Secrets are files, never env values; so is the manifest (env values are capped at 128 KiB).
            let env = c.env.as_ref().unwrap();
            assert!(env.iter().all(|e| e.value_from.is_none()));
            assert!(mounts(c).contains(&("manifest".into(), MANIFEST_DIR.into(), true)));
            assert!(c.restart_policy.is_none(), "no sidecar");
        }
        let by = |n: &str| *all.iter().find(|c| c.name == n).unwrap();
        let vols = pod.volumes.clone().unwrap();
        let has = |n: &str, vol: &str| mounts(by(n)).iter().any(|m| m.0 == vol);
        // The agent: no credential of any kind, no hand-over it could forge.
        for vol in ["git-credential", "report-token", "private"] {
            assert!(!has("agent", vol), "the agent's container mounts no {vol}");
        }
        assert!(has("agent", "model-token"), "only its gateway token");
        let env: Vec<String> = by("agent").env.clone().unwrap().iter().map(|e| e.name.clone()).collect();
        assert!(!env.iter().any(|e| e.contains("SECRETS") || e.contains("REPORT")), "{env:?}");
        let url = by("agent").env.clone().unwrap().into_iter().find(|e| e.name == "AGENTOPS_MODEL_URL").unwrap();
        assert_eq!(url.value.as_deref(), Some("http://ctl.agentops.svc:8080/gateway/team-a/fix-bug"));
        // Git goes through the controller's relay: no pod mounts the credential; clone has a
        // fetch-only token, publish one that may push the work branch.
        assert!(vols.iter().all(|v| v.name != "git-credential"));
        assert!(has("clone", "git-clone-token") && !has("clone", "git-publish-token"));
        assert!(has("publish", "git-publish-token") && !has("publish", "git-clone-token"));
        let git_env = |n: &str| by(n).env.clone().unwrap().into_iter().find(|e| e.name == "AGENTOPS_GIT_URL").unwrap();
        assert_eq!(git_env("clone").value.as_deref(), Some("http://ctl.agentops.svc:8080/git/team-a/fix-bug"));
        assert!(git_env("publish").value.is_some());
        for vol in ["git-clone-token", "git-publish-token"] {
            assert!(!has("agent", vol) && !has("finish", vol));
        }
        // The report token: publish only.
        assert!(!has("clone", "report-token") && has("publish", "report-token"));
        for vol in ["git-credential", "report-token", "model-token"] {
            assert!(!has("finish", vol), "finish (hooks over the agent's workspace) mounts no {vol}");
        }
        assert!(!has("clone", "model-token") && !has("publish", "model-token"));
        // The Anthropic key is mounted nowhere: the controller's gateway adds it.
        assert!(vols.iter().all(|v| v.secret.as_ref().is_none_or(|s| s.secret_name.as_deref() != Some("anthropic"))));
        // Each credential volume holds only the keys it needs.
        let items = |vol: &str| {
            let v = vols.iter().find(|v| v.name == vol).unwrap();
            v.secret.as_ref().unwrap().items.clone().unwrap().into_iter().map(|i| i.key).collect::<Vec<_>>()
        };
        assert_eq!(items("model-token"), ["model"]);
        assert_eq!(items("git-clone-token"), ["git-clone"]);
        assert_eq!(items("report-token"), ["token"]);
        // The stream is the agent's to write; the steps after it only read it.
        assert!(mounts(by("publish")).contains(&("stream".into(), STREAM_DIR.into(), true)));
        assert!(mounts(by("finish")).contains(&("stream".into(), STREAM_DIR.into(), true)));
        // No storage class anywhere: the workspace is an emptyDir and there is no PVC.
        assert!(desired_pvc(&ax, &JobConfig::default()).is_none());
        assert!(vols.iter().any(|v| v.name == "workspace" && v.empty_dir.is_some()));
    }

    /// The runner contract: every variable a Job sets on a step's container is one that
    /// `agentops step` reads (a flag's env), or one the process itself uses (HOME, TMPDIR, the
    /// model for Claude Code). A renamed flag or a typo in the Job fails here, not in a cluster.
    #[test]
    fn every_variable_the_job_sets_is_one_the_step_reads() {
        use clap::CommandFactory;
        let cli = crate::cli::Cli::command();
        let step = cli.find_subcommand("step").expect("agentops step");
        let mut read: Vec<String> = step
            .get_arguments()
            .chain(cli.get_arguments())
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        read.extend(
            ["HOME", "TMPDIR", "ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL"]
                .map(String::from),
        );
        // The team's own variables are the agent's: the step passes them on by name.
        let team = "  pod: {agentImage: 'golang:1.23', env: [{name: GOFLAGS, value: -mod=mod}]}\n";
        let hosts = "  egressHosts: [pypi.org]\n";
        for (spec, relay) in [("", true), ("", false), (team, true), (hosts, true)] {
            let (ax, r) = ax(spec);
            let cfg = JobConfig {
                report_url: Some("http://ctl:8080".into()),
                git_relay: relay,
                default_model: Some("m".into()),
                egress_proxy: Some("http://ctl:8082".into()),
                ..Default::default()
            };
            let pod = desired_job(&ax, &r, &cfg).spec.unwrap().template.spec.unwrap();
            let agent = pod.init_containers.iter().flatten().find(|c| c.name == "agent").unwrap();
            let proxied = agent.env.iter().flatten().any(|e| e.name == crate::api::contract::EGRESS_PROXY);
            assert_eq!(proxied, spec == hosts, "only an execution with egressHosts is told the proxy");
            for c in pod.init_containers.unwrap().iter().chain(&pod.containers) {
                for e in c.env.iter().flatten() {
                    let teams = c.name == "agent" && e.name == "GOFLAGS";
                    assert!(
                        read.contains(&e.name) || teams,
                        "{} sets {} which `agentops step` does not read",
                        c.name,
                        e.name
                    );
                }
            }
        }
    }

    #[test]
    fn without_the_relay_only_clone_and_publish_mount_the_git_key() {
        let (ax, r) = ax("");
        let cfg = JobConfig { report_url: Some("http://ctl:8080".into()), git_relay: false, ..Default::default() };
        let pod = desired_job(&ax, &r, &cfg).spec.unwrap().template.spec.unwrap();
        let all: Vec<Container> = pod.init_containers.unwrap().into_iter().chain(pod.containers).collect();
        let with_git: Vec<&str> =
            all.iter().filter(|c| mounts(c).iter().any(|m| m.0 == "git-credential")).map(|c| c.name.as_str()).collect();
        assert_eq!(with_git, ["clone", "publish"]);
        let v = pod.volumes.unwrap().into_iter().find(|v| v.name == "git-credential").unwrap();
        let keys: Vec<String> = v.secret.unwrap().items.unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, ["token", "username"], "only the credential's keys, not the whole Secret");
    }

    fn env_of(c: &Container, name: &str) -> Option<String> {
        c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone())
    }

    fn all_containers(job: &Job) -> Vec<Container> {
        let pod = job.spec.clone().unwrap().template.spec.unwrap();
        pod.init_containers.unwrap_or_default().into_iter().chain(pod.containers).collect()
    }

    #[test]
    fn a_teams_agent_image_runs_only_the_agent_step_with_the_operators_binaries() {
        // The deprecated spec.image of a template means the same as spec.pod.agentImage.
        for template in ["image: golang:1.23", "pod: {agentImage: 'golang:1.23'}"] {
            let text = format!(
                "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {{name: t}}\nspec: {{{template}}}\n---\napiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {{name: a, namespace: n, uid: u}}\nspec: {{prompt: p, templateRef: {{name: t}}, repository: {{url: 'https://h/r.git'}}}}\n"
            );
            let m = parse_manifest(&text).unwrap();
            let r = resolve(&m.execution, &m.templates).unwrap();
            let cfg = JobConfig { report_url: Some("http://ctl:8080".into()), ..Default::default() };
            let job = desired_job(&m.execution, &r, &cfg);
            let all = all_containers(&job);
            let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names, [BUNDLE_CONTAINER, "clone", "agent", "publish", "finish"], "the bundle comes first");
            let ours = Some(cfg.image.clone());
            for c in &all {
                let expected = if c.name == "agent" { Some("golang:1.23".to_string()) } else { ours.clone() };
                assert_eq!(c.image, expected, "{}", c.name);
                assert_eq!(c.security_context, Some(locked_down()), "{}", c.name);
                if c.name != BUNDLE_CONTAINER {
                    // Each step is told the pod's count: a node keeps 12 KiB ÷ 5 of its message.
                    assert_eq!(env_of(c, var::POD_CONTAINERS).as_deref(), Some("5"), "{}", c.name);
                }
            }
            let by = |n: &str| all.iter().find(|c| c.name == n).unwrap();
            assert_eq!(by(BUNDLE_CONTAINER).command.clone().unwrap(), ["agentops", "bundle", BUNDLE_DIR]);
            assert!(mounts(by(BUNDLE_CONTAINER)).contains(&(BUNDLE_VOLUME.into(), BUNDLE_DIR.into(), false)));
            assert_eq!(mounts(by(BUNDLE_CONTAINER)).len(), 1, "the bundle step sees nothing but its volume");
            // The agent starts our binary through the bundle's loader, whatever libc the image has.
            assert_eq!(
                by("agent").command.clone().unwrap(),
                [
                    "/agentops-bin/ld.so",
                    "--library-path",
                    "/agentops-bin/lib",
                    "/agentops-bin/agentops",
                    "step",
                    "agent"
                ]
            );
            assert!(mounts(by("agent")).contains(&(BUNDLE_VOLUME.into(), BUNDLE_DIR.into(), true)), "read-only");
            assert_eq!(env_of(by("agent"), var::CLAUDE_BIN).as_deref(), Some("/agentops-bin/claude"));
            assert_eq!(env_of(by("agent"), var::BUNDLE_DIR).as_deref(), Some(BUNDLE_DIR));
            // The image's ENV cannot turn the agent's sandbox off or widen it: the container's
            // env, which wins over an image's, says so.
            assert_eq!(env_of(by("agent"), var::NO_SANDBOX).as_deref(), Some("false"));
            assert_eq!(env_of(by("agent"), var::SANDBOX_READ).as_deref(), Some(BUNDLE_DIR));
            for n in ["clone", "publish", "finish"] {
                assert!(!mounts(by(n)).iter().any(|m| m.0 == BUNDLE_VOLUME), "{n} runs its own image's agentops");
                assert_eq!(by(n).command.clone().unwrap(), ["agentops", "step", n]);
            }
        }
        // Without one, the pod is the four steps of the operator's image.
        let (ax, r) = ax("");
        let all = all_containers(&desired_job(&ax, &r, &JobConfig::default()));
        assert_eq!(all.len(), 4);
        assert!(all.iter().all(|c| c.image == Some(JobConfig::default().image)));
        assert!(all.iter().all(|c| env_of(c, var::POD_CONTAINERS).as_deref() == Some("4")));
    }

    /// The chart's default, the template and the execution, as the Job carries them: the
    /// execution wins field by field, maps merge, lists replace.
    #[test]
    fn pod_settings_reach_the_job_field_by_field() {
        let q = |v: &str| Quantity(v.into());
        let text = "apiVersion: agentops.dev/v1alpha1\nkind: AgentTemplate\nmetadata: {name: t}\nspec:\n  pod:\n    nodeSelector: {pool: build, disk: ssd}\n    runtimeClassName: gvisor\n    tolerations: [{key: build, operator: Exists, effect: NoSchedule}]\n    env: [{name: GOFLAGS, value: -mod=mod}]\n    labels: {team: payments}\n    resources: {agent: {requests: {cpu: '2'}, limits: {memory: 8Gi}}}\n---\napiVersion: agentops.dev/v1alpha1\nkind: AgentExecution\nmetadata: {name: a, namespace: n, uid: u}\nspec:\n  prompt: p\n  templateRef: {name: t}\n  repository: {url: 'https://h/r.git'}\n  pod:\n    tolerations: [{key: gpu, operator: Equal, value: 'true', effect: NoSchedule}]\n    labels: {cost-center: '42'}\n    annotations: {example.com/ticket: ENG-1}\n    imagePullSecrets: [{name: mirror}]\n    env: [{name: CI, value: 'true'}]\n    priorityClassName: batch-high\n    affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: arch, operator: In, values: [amd64]}]}]}}}\n    topologySpreadConstraints: [{maxSkew: 1, topologyKey: zone, whenUnsatisfiable: ScheduleAnyway}]\n";
        let m = parse_manifest(text).unwrap();
        let r = resolve(&m.execution, &m.templates).unwrap();
        // The chart's runner.pod.
        let default: PodSettings = serde_json::from_value(serde_json::json!({
            "nodeSelector": {"pool": "general", "kubernetes.io/os": "linux"},
            "priorityClassName": "batch-low",
            "labels": {"team": "unknown", "tier": "agents"},
            "resources": {"default": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
                          "finish": {"limits": {"memory": "1Gi"}}},
        }))
        .unwrap();
        let cfg = JobConfig { pod: default, ..Default::default() };
        let job = desired_job(&m.execution, &r, &cfg);
        let template = job.spec.clone().unwrap().template;
        let pod = template.spec.clone().unwrap();
        let ns = pod.node_selector.clone().unwrap();
        assert_eq!(
            ns,
            BTreeMap::from([
                ("disk".to_string(), "ssd".to_string()),
                ("kubernetes.io/os".into(), "linux".into()),
                ("pool".into(), "build".into())
            ]),
            "maps merge, the upper layer's keys win"
        );
        let tolerations = pod.tolerations.clone().unwrap();
        assert_eq!(tolerations.len(), 1, "a list replaces the one below");
        assert_eq!((tolerations[0].key.as_deref(), tolerations[0].value.as_deref()), (Some("gpu"), Some("true")));
        assert_eq!(pod.runtime_class_name.as_deref(), Some("gvisor"), "the template's, kept");
        assert_eq!(pod.priority_class_name.as_deref(), Some("batch-high"), "the execution's over the chart's");
        assert_eq!(pod.image_pull_secrets.clone().unwrap()[0].name, "mirror");
        let terms = &pod
            .affinity
            .clone()
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms[0].match_expressions.clone().unwrap()[0].values, Some(vec!["amd64".to_string()]));
        assert_eq!(pod.topology_spread_constraints.clone().unwrap()[0].topology_key, "zone");
        let meta = template.metadata.unwrap();
        let labels = meta.labels.unwrap();
        assert_eq!(
            (labels["team"].as_str(), labels["tier"].as_str(), labels["cost-center"].as_str()),
            ("payments", "agents", "42")
        );
        assert_eq!(labels["app.kubernetes.io/component"], "runner", "ours stay");
        assert_eq!(labels[EXECUTION_LABEL], "a");
        assert_eq!(meta.annotations.unwrap()["example.com/ticket"], "ENG-1");
        // Resources per step: the chart's default, each step's own keys on top.
        let all = all_containers(&job);
        let res = |n: &str| all.iter().find(|c| c.name == n).unwrap().resources.clone().unwrap();
        let agent = res("agent");
        assert_eq!(agent.requests.clone().unwrap()["cpu"], q("2"));
        assert_eq!(agent.requests.unwrap()["memory"], q("1Gi"));
        assert_eq!(agent.limits.unwrap()["memory"], q("8Gi"));
        assert_eq!(res("clone").requests.unwrap()["cpu"], q("500m"));
        assert_eq!(res("clone").limits.unwrap()["memory"], q("4Gi"));
        assert_eq!(res("finish").limits.unwrap()["memory"], q("1Gi"));
        // The agent's env: the execution's list replaced the template's; the step passes it on.
        let agent_c = all.iter().find(|c| c.name == "agent").unwrap();
        assert_eq!(env_of(agent_c, "CI").as_deref(), Some("true"));
        assert_eq!(env_of(agent_c, "GOFLAGS"), None);
        assert_eq!(env_of(agent_c, var::AGENT_ENV).as_deref(), Some("CI"));
        for c in all.iter().filter(|c| c.name != "agent") {
            assert_eq!(env_of(c, "CI"), None, "{} gets no team env", c.name);
        }
        // The security settings are the same as without any pod settings.
        let plain_r = Resolved { pod: PodSettings::default(), ..r.clone() };
        let plain = desired_job(&m.execution, &plain_r, &JobConfig::default()).spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.security_context, plain.security_context);
        assert_eq!(
            (pod.automount_service_account_token, pod.share_process_namespace, pod.host_network, pod.host_pid),
            (Some(false), Some(false), None, None)
        );
        assert_eq!(pod.volumes, plain.volumes);
        for c in &all {
            assert_eq!(c.security_context, Some(locked_down()), "{}", c.name);
        }
    }

    #[test]
    fn the_default_resources_reach_every_step() {
        let (ax, r) = ax("");
        let all = all_containers(&desired_job(&ax, &r, &JobConfig::default()));
        for c in &all {
            assert_eq!(c.resources, default_runner_resources(), "{}", c.name);
        }
    }

    #[test]
    fn pvc_from_the_spec_with_owner_and_size() {
        let (ax, r) = ax("  workspace: {storageClassName: fast, size: 5Gi}\n");
        let pvc = desired_pvc(&ax, &JobConfig::default()).unwrap();
        assert_eq!(pvc.metadata.name.as_deref(), Some("agentops-ws-fix-bug"));
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(spec.resources.unwrap().requests.unwrap()["storage"], Quantity("5Gi".into()));
        assert!(pvc.metadata.owner_references.is_some());
        let job = desired_job(&ax, &r, &JobConfig::default());
        let vols = job.spec.unwrap().template.spec.unwrap().volumes.unwrap();
        assert_eq!(
            vols.iter().find(|v| v.name == "workspace").unwrap().persistent_volume_claim.as_ref().unwrap().claim_name,
            "agentops-ws-fix-bug"
        );
    }

    #[test]
    fn kueue_label_passes_through_and_suspends() {
        let (mut ax, r) = ax("");
        ax.metadata.labels = Some(BTreeMap::from([(KUEUE_QUEUE_LABEL.to_string(), "team-queue".to_string())]));
        let job = desired_job(&ax, &r, &JobConfig::default());
        assert_eq!(job.metadata.labels.unwrap()[KUEUE_QUEUE_LABEL], "team-queue");
        assert_eq!(job.spec.unwrap().suspend, Some(true));
    }

    #[test]
    fn long_names_are_cut_stably() {
        let long = "x".repeat(80);
        let a = child_name("agentops", &long);
        assert!(a.len() <= 63);
        assert_eq!(a, child_name("agentops", &long));
        assert_ne!(a, child_name("agentops", &"x".repeat(81)));
    }
}
