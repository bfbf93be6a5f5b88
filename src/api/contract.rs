//! The runner contract, the language the controller and the runner both speak: what a runner
//! (`agentops runner`, `agentops step <name>`) is given, by environment variable, the steps of
//! its pod, and where things are in it. The Job builder
//! (`controller::desired`), the local executor and the runner's own flags (`cli.rs`) all name
//! these constants, and a test checks that every variable a Job sets is one the step reads.

/// The manifest (the execution and its template) as a file: a Secret mounted read-only in a pod,
/// a 0600 file for the local executor. A file, because one environment value holds 128 KiB.
pub const MANIFEST_FILE: &str = "AGENTOPS_MANIFEST_FILE";
/// The manifest itself (the local runner on one machine, small manifests only).
pub const MANIFEST: &str = "AGENTOPS_MANIFEST";
/// Where workspaces are created.
pub const WORKSPACE_ROOT: &str = "AGENTOPS_WORKSPACE_ROOT";
/// Secrets as files `<dir>/<secret>/<key>`.
pub const SECRETS_DIR: &str = "AGENTOPS_SECRETS_DIR";
/// The runner's own store.
pub const DB: &str = "AGENTOPS_DB";
/// The controller's report endpoint for this execution, and the file with its token.
pub const REPORT_URL: &str = "AGENTOPS_REPORT_URL";
pub const REPORT_TOKEN_FILE: &str = "AGENTOPS_REPORT_TOKEN_FILE";
/// The controller's model gateway for this execution, and the file with the agent's token.
pub const MODEL_URL: &str = "AGENTOPS_MODEL_URL";
pub const MODEL_TOKEN_FILE: &str = "AGENTOPS_MODEL_TOKEN_FILE";
/// The controller's egress proxy (`http://host:port`, an execution with `egressHosts`), and
/// the file with the agent's token for it (the proxy password; never in the environment).
pub const EGRESS_PROXY: &str = "AGENTOPS_EGRESS_PROXY";
pub const EGRESS_TOKEN_FILE: &str = "AGENTOPS_EGRESS_TOKEN_FILE";
/// The controller's git relay for this execution, and the file with this step's token.
pub const GIT_URL: &str = "AGENTOPS_GIT_URL";
pub const GIT_TOKEN_FILE: &str = "AGENTOPS_GIT_TOKEN_FILE";
/// The steps' hand-over directories (see `runner::steps`).
pub const PRIVATE_DIR: &str = "AGENTOPS_PRIVATE_DIR";
pub const STREAM_DIR: &str = "AGENTOPS_STREAM_DIR";
/// Where the final message goes (Kubernetes' termination log).
pub const TERMINATION_LOG: &str = "AGENTOPS_TERMINATION_LOG";
/// Containers (and init containers) of this runner pod: a node keeps 12 KiB ÷ that of each
/// termination message.
pub const POD_CONTAINERS: &str = "AGENTOPS_POD_CONTAINERS";
/// The Claude Code CLI the agent step starts.
pub const CLAUDE_BIN: &str = "AGENTOPS_CLAUDE_BIN";
/// The operator's binaries brought into a team's agent image (`agentops bundle`): the agent
/// step starts the CLI through the bundle's loader and libraries.
pub const BUNDLE_DIR: &str = "AGENTOPS_BUNDLE_DIR";
/// The agent's sandbox switches (`--no-sandbox`, `--sandbox-read`; `--sandbox-require` only
/// makes it stricter): a container of a team's image sets the first two itself, so that the
/// image's `ENV` cannot.
pub const NO_SANDBOX: &str = "AGENTOPS_NO_SANDBOX";
pub const SANDBOX_READ: &str = "AGENTOPS_SANDBOX_READ";
pub const SANDBOX_REQUIRE: &str = "AGENTOPS_SANDBOX_REQUIRE";
/// Names of the team's plain env variables (`spec.pod.env`, and the cluster default's) that the
/// agent step passes on to the agent, comma-separated.
pub const AGENT_ENV: &str = "AGENTOPS_AGENT_ENV";

/// Paths in a runner pod.
pub mod paths {
    /// Secrets mounted as `<dir>/<secret>/<key>` (with `--git-relay=false`).
    pub const SECRETS_DIR: &str = "/var/run/secrets/agentops";
    /// The workspace volume.
    pub const WORKSPACE_DIR: &str = "/workspace";
    /// The report token (publish).
    pub const REPORT_TOKEN_DIR: &str = "/var/run/secrets/agentops-report";
    /// The manifest Secret, and the file in it.
    pub const MANIFEST_DIR: &str = "/var/run/agentops/manifest";
    pub const MANIFEST_KEY: &str = "manifest.yaml";
    /// Hand-over volume the agent's container does not mount (clone, publish, finish).
    pub const PRIVATE_DIR: &str = "/var/run/agentops/private";
    /// The agent's stream volume.
    pub const STREAM_DIR: &str = "/var/run/agentops/stream";
    /// The agent's model gateway token.
    pub const MODEL_TOKEN_DIR: &str = "/var/run/secrets/agentops-model";
    /// The agent's egress proxy token.
    pub const EGRESS_TOKEN_DIR: &str = "/var/run/secrets/agentops-egress";
    /// The clone and publish steps' git relay token.
    pub const GIT_TOKEN_DIR: &str = "/var/run/secrets/agentops-git";
    /// The bundle (`agentops bundle`) in a pod whose agent container runs a team's image.
    pub const BUNDLE_DIR: &str = "/agentops-bin";
    /// HOME and TMPDIR of the agent and finish steps.
    pub const HOME_DIR: &str = "/home/agentops";
    pub const TMP_DIR: &str = "/tmp";
}

/// The steps of a runner pod, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Step {
    Clone,
    Agent,
    Publish,
    Finish,
}

impl Step {
    /// The container's (and the subcommand's) name.
    pub fn name(self) -> &'static str {
        match self {
            Step::Clone => "clone",
            Step::Agent => "agent",
            Step::Publish => "publish",
            Step::Finish => "finish",
        }
    }

    /// Log lines of each step are numbered in their own range, in step order.
    pub fn first_log_seq(self) -> i64 {
        match self {
            Step::Clone => 0,
            Step::Agent => 1_000_000,
            Step::Publish => 2_000_000,
            Step::Finish => 3_000_000,
        }
    }
}

/// The agent step's own store, in the stream directory (the controller reads its log lines).
pub const AGENT_DB: &str = "agent.db";
