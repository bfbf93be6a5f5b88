//! The command line: `run`, `crd`, `executions`, `workspaces`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_NO_BORDERS};
use tokio_util::sync::CancellationToken;

use crate::api::text::{clean, clean_line};
use crate::api::{self, parse_manifest, resolve};
use crate::runner::{self, EXIT_INVALID, RunOptions, Workspace};
use crate::store::{Store, WorkspaceStatus};

/// Run the Claude Code agent against git repositories, on one machine or in Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "agentops", version, about)]
pub struct Cli {
    /// SQLite store file [default: $XDG_DATA_HOME/agentops/agentops.db]
    #[arg(long, global = true, env = api::contract::DB)]
    pub db: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an AgentExecution manifest on this machine and print a summary.
    ///
    /// Exit status: 0 succeeded, 1 failed, 2 invalid input (nothing ran), 3 timed out, 4 cancelled.
    Run(RunArgs),
    /// Run the execution in $AGENTOPS_MANIFEST_FILE (or $AGENTOPS_MANIFEST) (used inside the Job's
    /// pod and by the local executor): the JSON summary goes to stdout and to the termination log.
    Runner(RunnerArgs),
    /// Run one step of an execution in a runner pod's container (clone, agent, publish, finish).
    Step(Box<StepArgs>),
    /// Copy agentops, the Claude Code CLI, their libraries and loader into DIR (the init
    /// container of a runner pod whose agent runs in a team's image).
    #[command(hide = true)]
    Bundle(BundleArgs),
    /// Run the Kubernetes operator (kubeconfig from $KUBECONFIG, ~/.kube/config or in-cluster).
    Controller(Box<ControllerArgs>),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Recorded executions.
    #[command(subcommand)]
    Executions(ExecutionsCmd),
    /// Workspaces on this machine.
    #[command(subcommand)]
    Workspaces(WorkspacesCmd),
}

/// Output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Options of `agentops run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The manifest: one AgentExecution, optionally with AgentTemplates (multi-document YAML).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Summary format on stdout.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// No progress lines on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// AgentPolicy documents (YAML) applied as a cluster applies them: defaults under the
    /// template, maximums and allowlists over the result; one that asks for more exits 2.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

/// Where things are on this machine (shared by `run`, `runner` and the local executor).
#[derive(clap::Args, Debug, Clone)]
pub struct MachineArgs {
    /// Directory for workspaces [default: the system temp dir].
    #[arg(long, env = api::contract::WORKSPACE_ROOT)]
    pub workspace_root: Option<PathBuf>,
    /// The Claude Code CLI.
    #[arg(long, env = api::contract::CLAUDE_BIN, default_value = "claude")]
    pub claude_bin: PathBuf,
    /// Secrets as files `<dir>/<secret-name>/<key>` [default: $XDG_CONFIG_HOME/agentops/secrets].
    #[arg(long, env = api::contract::SECRETS_DIR)]
    pub secrets_dir: Option<PathBuf>,
    /// Run the agent unconfined. By default it runs under Landlock: it writes only its
    /// workspace and private HOME, and reads only system and toolchain directories.
    #[arg(long, env = api::contract::NO_SANDBOX)]
    pub no_sandbox: bool,
    /// More directories the sandboxed agent may read (toolchains, e.g. ~/.rustup; comma-separated).
    #[arg(long, env = api::contract::SANDBOX_READ, value_delimiter = ',')]
    pub sandbox_read: Vec<PathBuf>,
    /// Refuse to run unless every protection of the sandbox is in force (Landlock ABI 6 or
    /// later: files, TCP ports, device ioctls, signals, abstract sockets; and namespaces of
    /// its own).
    #[arg(long, env = api::contract::SANDBOX_REQUIRE, conflicts_with = "no_sandbox")]
    pub sandbox_require: bool,
    /// Start the Claude Code CLI through the loader and libraries of this bundle (`agentops
    /// bundle`: a runner pod's agent container in a team's image).
    #[arg(long, env = api::contract::BUNDLE_DIR)]
    pub bundle_dir: Option<PathBuf>,
}

impl MachineArgs {
    /// With `--sandbox-require`: why this kernel cannot run the agent fully confined, if it cannot.
    pub fn sandbox_refusal(&self) -> Option<String> {
        if !self.sandbox_require {
            return None;
        }
        let abi = crate::agent::sandbox::kernel_abi();
        let (_, missing) = crate::agent::sandbox::protections(abi, crate::agent::sandbox::isolation_supported());
        (!missing.is_empty()).then(|| {
            let have = abi.map_or_else(|| "no Landlock".to_string(), |a| format!("Landlock ABI {a}"));
            format!(
                "--sandbox-require: this machine has {have}, which lacks: {} (needs Landlock ABI {} and user namespaces); nothing was started",
                missing.join("; "),
                crate::agent::sandbox::FULL_ABI
            )
        })
    }
}

impl MachineArgs {
    /// Run options with the defaults applied.
    pub fn options(self, progress: bool, report: Option<runner::ReportTarget>) -> RunOptions {
        // The sandbox never grants the store, the secrets dir (added by the runner) or HOME.
        let mut protected = vec![std::env::var_os("AGENTOPS_DB").map(PathBuf::from).unwrap_or_else(default_db)];
        protected.extend(std::env::var_os("HOME").map(PathBuf::from));
        RunOptions {
            workspace_root: self.workspace_root.unwrap_or_else(std::env::temp_dir),
            claude_bin: self.claude_bin,
            secrets_dir: self.secrets_dir.unwrap_or_else(default_secrets_dir),
            progress,
            report,
            sandbox: (!self.no_sandbox).then_some(runner::SandboxPolicy { extra_read: self.sandbox_read, protected }),
            gateway: None,
            git_relay: None,
            egress: None,
            open_pull_request: false,
            bundle: self.bundle_dir,
        }
    }
}

/// Options of `agentops runner`.
#[derive(clap::Args, Debug)]
pub struct RunnerArgs {
    /// The AgentExecution (and its AgentTemplate) as YAML.
    #[arg(long, env = api::contract::MANIFEST, hide_env_values = true, required_unless_present = "manifest_file")]
    pub manifest: Option<String>,
    /// A file holding the manifest (what the controller gives its runners).
    #[arg(long, env = api::contract::MANIFEST_FILE, conflicts_with = "manifest")]
    pub manifest_file: Option<PathBuf>,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// The controller's endpoint for this execution's progress reports.
    #[arg(long, env = api::contract::REPORT_URL)]
    pub report_url: Option<String>,
    /// File holding the token for those reports.
    #[arg(long, env = api::contract::REPORT_TOKEN_FILE)]
    pub report_token_file: Option<PathBuf>,
    /// Where Kubernetes reads the container's final message (the compact summary).
    #[arg(long, env = api::contract::TERMINATION_LOG, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// Options of `agentops step`: each container of a runner pod runs one step.
#[derive(clap::Args, Debug)]
pub struct StepArgs {
    /// The step this container runs.
    #[arg(value_enum)]
    pub step: runner::steps::Step,
    /// A file holding the manifest.
    #[arg(long, env = api::contract::MANIFEST_FILE)]
    pub manifest_file: PathBuf,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// The hand-over directory the agent's container does not mount.
    #[arg(long, env = api::contract::PRIVATE_DIR)]
    pub private_dir: Option<PathBuf>,
    /// The agent's stream directory.
    #[arg(long, env = api::contract::STREAM_DIR)]
    pub stream_dir: PathBuf,
    /// The controller's endpoint for this execution's reports (publish).
    #[arg(long, env = api::contract::REPORT_URL)]
    pub report_url: Option<String>,
    /// File holding the token for those reports (publish).
    #[arg(long, env = api::contract::REPORT_TOKEN_FILE)]
    pub report_token_file: Option<PathBuf>,
    /// The model gateway for this execution (agent): the controller's.
    #[arg(long, env = api::contract::MODEL_URL)]
    pub model_url: Option<String>,
    /// File holding this execution's gateway token (agent).
    #[arg(long, env = api::contract::MODEL_TOKEN_FILE)]
    pub model_token_file: Option<PathBuf>,
    /// The controller's egress proxy, `http://host:port` (agent, with `egressHosts`).
    #[arg(long, env = api::contract::EGRESS_PROXY)]
    pub egress_proxy: Option<String>,
    /// File holding this execution's egress proxy token (agent).
    #[arg(long, env = api::contract::EGRESS_TOKEN_FILE)]
    pub egress_token_file: Option<PathBuf>,
    /// The controller's git relay for this execution (clone, publish).
    #[arg(long, env = api::contract::GIT_URL)]
    pub git_url: Option<String>,
    /// File holding this step's relay token (clone, publish).
    #[arg(long, env = api::contract::GIT_TOKEN_FILE)]
    pub git_token_file: Option<PathBuf>,
    /// Where Kubernetes reads the container's final message.
    #[arg(long, env = api::contract::TERMINATION_LOG, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
    /// Containers and init containers of this pod: a node keeps 12 KiB ÷ that of each
    /// termination message.
    #[arg(long, env = api::contract::POD_CONTAINERS, default_value_t = api::report::RUNNER_CONTAINERS)]
    pub pod_containers: usize,
    /// Names of the team's env variables (`spec.pod.env`) passed on to the agent (agent).
    #[arg(long, env = api::contract::AGENT_ENV, value_delimiter = ',')]
    pub agent_env: Vec<String>,
}

/// Options of `agentops bundle`.
#[derive(clap::Args, Debug)]
pub struct BundleArgs {
    /// Where to put agentops, the Claude Code CLI, their libraries and the loader.
    pub dir: PathBuf,
    /// The Claude Code CLI to bundle.
    #[arg(long, env = api::contract::CLAUDE_BIN, default_value = "claude")]
    pub claude_bin: PathBuf,
    /// Where Kubernetes reads the container's final message.
    #[arg(long, env = api::contract::TERMINATION_LOG, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// How runners are run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorArg {
    /// A Kubernetes Job per execution.
    Job,
    /// A child process of the controller (single node, tests).
    Local,
}

/// Options of `agentops controller`.
#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// Where runners run.
    #[arg(long, env = "AGENTOPS_EXECUTOR", value_enum, default_value = "job")]
    pub executor: ExecutorArg,
    /// Executions running at once, over all namespaces (0: unlimited).
    #[arg(long, env = "AGENTOPS_MAX_CONCURRENT", default_value_t = 10)]
    pub max_concurrent: usize,
    /// Executions running at once in one namespace (0: unlimited).
    #[arg(long, env = "AGENTOPS_MAX_PER_NAMESPACE", default_value_t = 0)]
    pub max_per_namespace: usize,
    /// Runner image for Jobs.
    #[arg(long, env = "AGENTOPS_RUNNER_IMAGE", default_value = "ghcr.io/agentops/agentops:0.1.0")]
    pub image: String,
    /// Timeout for executions whose spec and template set none, e.g. `2h` (default 1h).
    #[arg(long, env = "AGENTOPS_DEFAULT_TIMEOUT")]
    pub default_timeout: Option<String>,
    /// Model for executions whose spec and template name none (empty: Claude Code's default).
    #[arg(long, env = "AGENTOPS_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Storage class for workspace PVCs when an execution names none (empty: emptyDir).
    #[arg(long, env = "AGENTOPS_STORAGE_CLASS")]
    pub storage_class: Option<String>,
    /// Workspace size when an execution gives none.
    #[arg(long, env = "AGENTOPS_WORKSPACE_SIZE", default_value = "10Gi")]
    pub workspace_size: String,
    /// Local executor: where its runners find workspaces, Claude Code and secrets.
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Elect a leader among replicas with a Lease; only the leader reconciles.
    #[arg(long, env = "AGENTOPS_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "AGENTOPS_LEASE_NAME", default_value = "agentops-controller")]
    pub lease_name: String,
    /// Namespace of the Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Base URL at which runner pods reach this controller (its Service): their reports and
    /// the model gateway (required with `--executor job`).
    #[arg(long, env = api::contract::REPORT_URL)]
    pub report_url: Option<String>,
    /// Runner pods' clone and publish steps reach git through this controller, which adds the
    /// credential (no git credential in any pod, and pods need no route to the git host).
    /// `false`: those two containers mount the credential and talk to the git host.
    #[arg(long, env = "AGENTOPS_GIT_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub git_relay: bool,
    /// Where the model gateway sends runner pods' requests [default: $ANTHROPIC_BASE_URL, else
    /// https://api.anthropic.com].
    #[arg(long, env = "AGENTOPS_ANTHROPIC_BASE_URL")]
    pub anthropic_base_url: Option<String>,
    /// Address of the authenticated JSON API and the runners' report endpoint.
    #[arg(long, env = "AGENTOPS_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: std::net::SocketAddr,
    /// Address of the egress proxy runner pods' agents use for `egressHosts` (HTTP CONNECT and
    /// plain HTTP, each execution's own token as the proxy password).
    #[arg(long, env = "AGENTOPS_EGRESS_ADDR", default_value = "0.0.0.0:8082")]
    pub egress_addr: std::net::SocketAddr,
    /// Where runner pods reach the egress proxy, `http://host:port` [default: the host of
    /// --report-url at the port of --egress-addr].
    #[arg(long, env = "AGENTOPS_EGRESS_URL")]
    pub egress_url: Option<String>,
    /// Address of /healthz, /readyz and /metrics (unauthenticated; keep it off the runners' path).
    #[arg(long, env = "AGENTOPS_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    pub metrics_addr: std::net::SocketAddr,
    /// Serve executions only in these namespaces (comma-separated; empty: every namespace).
    /// The chart's default grants Jobs, PVCs and Secrets only there (a Role per namespace).
    #[arg(long, env = "AGENTOPS_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// CPU, memory and ephemeral-storage requests and limits of runner pods, as JSON
    /// (a Kubernetes ResourceRequirements) [default: requests cpu 500m, memory 1Gi,
    /// ephemeral-storage 1Gi; limits memory 4Gi, ephemeral-storage 20Gi].
    #[arg(long, env = "AGENTOPS_RUNNER_RESOURCES")]
    pub runner_resources: Option<String>,
    /// The cluster's default pod settings of runner pods, as JSON (the `spec.pod` of a template:
    /// resources per step, nodeSelector, tolerations, affinity, priorityClassName,
    /// runtimeClassName, imagePullSecrets, labels, annotations, env, agentImage); templates and
    /// executions override it field by field. `--runner-resources` is its `resources.default`
    /// when it gives none.
    #[arg(long, env = "AGENTOPS_RUNNER_POD")]
    pub runner_pod: Option<String>,
    /// Let `--executor local` run inside a cluster. Its runners (the agent, hooks) then run in
    /// the controller's own container, next to its service-account token: accept that only
    /// for a throwaway single-user cluster.
    #[arg(long, env = "AGENTOPS_ALLOW_LOCAL_EXECUTOR_IN_CLUSTER")]
    pub allow_local_executor_in_cluster: bool,
}

/// Where `executions` reads from: this machine's store, or a controller's API.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Read the store of the controller at this URL (e.g. after `kubectl port-forward
    /// svc/agentops 8080`), as the kubeconfig's user: the controller shows only namespaces
    /// where that user may read AgentExecutions.
    #[arg(long, env = "AGENTOPS_SERVER")]
    pub server: Option<String>,
    /// Bearer token for --server [default: the current kubeconfig context's token].
    #[arg(long, env = "AGENTOPS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Only this namespace (with --server).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

/// `agentops executions ...`
#[derive(Subcommand, Debug)]
pub enum ExecutionsCmd {
    /// The newest executions.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// One execution: by id or unique id prefix, or `namespace/name` with --server.
    Show {
        id: String,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Include the log lines.
        #[arg(long)]
        logs: bool,
        /// Include the diff that was committed.
        #[arg(long)]
        diff: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `agentops workspaces ...`
#[derive(Subcommand, Debug)]
pub enum WorkspacesCmd {
    /// All workspaces and their status.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove finished workspaces older than a duration.
    Clean {
        /// e.g. 24h, 30m, 0s for all finished workspaces.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Show what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

fn default_db() -> PathBuf {
    directories::ProjectDirs::from("dev", "agentops", "agentops")
        .map(|d| d.data_dir().join("agentops.db"))
        .unwrap_or_else(|| PathBuf::from("agentops.db"))
}

fn default_secrets_dir() -> PathBuf {
    directories::ProjectDirs::from("dev", "agentops", "agentops")
        .map(|d| d.config_dir().join("secrets"))
        .unwrap_or_else(|| PathBuf::from("secrets"))
}

/// Runs the parsed command; returns the process exit status.
pub async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let db = cli.db.clone().unwrap_or_else(default_db);
    if matches!(cli.command, Command::Run(_) | Command::Runner(_) | Command::Step(_)) {
        // Not dumpable: the agent (same uid) cannot read this process's /proc/<pid>/environ
        // or memory, where the secrets it loaded live.
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(error = %e, "cannot make the process non-dumpable");
        }
    }
    match cli.command {
        Command::Crd => {
            print!("{}", crate::crd::crds_yaml()?);
            Ok(0)
        }
        Command::Run(args) => run(&db, args).await,
        Command::Runner(args) => {
            // Whatever stops the runner, its last words reach the controller: a report on
            // success, else the error, in the termination log (4 KiB at most, as Kubernetes keeps).
            let log = args.termination_log.clone();
            let result = runner(&db, args).await;
            if let Err(e) = &result {
                let _ = std::fs::write(&log, runner::truncate(&format!("error: {e:#}"), 3900));
            }
            result
        }
        Command::Step(args) => {
            let (log, step) = (args.termination_log.clone(), args.step);
            let result = step_main(&db, *args).await;
            if let Err(e) = &result {
                let _ = std::fs::write(&log, runner::truncate(&format!("error: step {}: {e:#}", step.name()), 3900));
            }
            result
        }
        Command::Bundle(args) => match runner::bundle::bundle(&args.dir, &args.claude_bin) {
            Ok(files) => {
                eprintln!("bundled {} files into {}", files.len(), args.dir.display());
                Ok(0)
            }
            Err(e) => {
                let message = format!("error: bundle: {e}");
                eprintln!("{message}");
                let _ = std::fs::write(&args.termination_log, runner::truncate(&message, 2000));
                Ok(1)
            }
        },
        Command::Controller(args) => controller(&db, *args).await,
        Command::Executions(cmd) => match cmd.remote().server.clone() {
            Some(server) => remote_executions(&server, cmd).await,
            None => executions(&Store::open(&db).await?, cmd).await,
        },
        Command::Workspaces(cmd) => workspaces(&Store::open(&db).await?, cmd).await,
    }
}

async fn run(db: &std::path::Path, args: RunArgs) -> anyhow::Result<i32> {
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.file.display());
            return Ok(EXIT_INVALID);
        }
    };
    if let Some(why) = args.machine.sandbox_refusal() {
        eprintln!("error: {why}");
        return Ok(EXIT_INVALID);
    }
    let policies = match &args.policy {
        None => Vec::new(),
        Some(file) => match std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| api::parse_policies(&t).map_err(|e| e.to_string()))
        {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: --policy {}: {e}", file.display());
                return Ok(EXIT_INVALID);
            }
        },
    };
    let mut opts = args.machine.options(!args.quiet, None);
    // On one machine this process holds the repository's credential: it opens the pull request.
    // (In a cluster the controller does, after the runner pod reported the push.)
    opts.open_pull_request = true;
    let source = args.file.display().to_string();
    let Ok(summary) = execute(db, &text, &source, &opts, &policies).await? else {
        return Ok(EXIT_INVALID);
    };
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string(&summary)?)?,
        Output::Text => write!(out, "{}", summary.human())?,
    }
    Ok(summary.exit_code())
}

async fn runner(db: &std::path::Path, args: RunnerArgs) -> anyhow::Result<i32> {
    let report = match (&args.report_url, &args.report_token_file) {
        (Some(url), Some(file)) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the report token {}", file.display()))?;
            Some(runner::ReportTarget { url: url.clone(), token: token.trim().to_string() })
        }
        _ => None,
    };
    let opts = args.machine.options(true, report.clone());
    let (text, source) = match (&args.manifest, &args.manifest_file) {
        (Some(text), _) => (text.clone(), "AGENTOPS_MANIFEST".to_string()),
        (None, Some(file)) => (
            std::fs::read_to_string(file).with_context(|| format!("cannot read the manifest {}", file.display()))?,
            file.display().to_string(),
        ),
        (None, None) => anyhow::bail!("no manifest: set AGENTOPS_MANIFEST_FILE or AGENTOPS_MANIFEST"),
    };
    // The controller applied the cluster's policies to the manifest it wrote.
    let summary = match execute(db, &text, &source, &opts, &[]).await? {
        Ok(s) => s,
        Err(invalid) => {
            let _ = std::fs::write(&args.termination_log, runner::truncate(&format!("error: {invalid}"), 3900));
            return Ok(EXIT_INVALID);
        }
    };
    println!("{}", serde_json::to_string(&summary)?);
    // The final report goes both ways: to the controller, and (below) the termination log.
    if let Some(target) = &report {
        // The diff first (the controller's store keeps cluster runs' records), bounded.
        let diff = Store::open(db).await.ok();
        let diff = match &diff {
            Some(store) => store.get_execution(&summary.id).await.ok().and_then(|row| row.diff),
            None => None,
        };
        if let Some(diff) = diff {
            runner::post_diff(target, &runner::truncate(&diff, DIFF_LIMIT)).await;
        }
        for attempt in 0..3u64 {
            if runner::post_report(target, &serde_json::to_value(&summary)?).await {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500 * (attempt + 1))).await;
        }
    }
    // Best effort: outside a pod there is no termination log.
    let _ = std::fs::write(&args.termination_log, runner::termination_message(&summary));
    Ok(summary.exit_code())
}

async fn step_main(db: &std::path::Path, args: StepArgs) -> anyhow::Result<i32> {
    use runner::steps::{StepDirs, StepEnd, run_step};
    // An endpoint given with the file holding its token: (URL, token).
    let endpoint = |url: &Option<String>, file: &Option<PathBuf>, what: &str| -> anyhow::Result<_> {
        let (Some(url), Some(file)) = (url, file) else { return Ok(None) };
        let token =
            std::fs::read_to_string(file).with_context(|| format!("cannot read the {what} {}", file.display()))?;
        Ok(Some((url.clone(), token.trim().to_string())))
    };
    let report = endpoint(&args.report_url, &args.report_token_file, "report token")?
        .map(|(url, token)| runner::ReportTarget { url, token });
    let gateway = endpoint(&args.model_url, &args.model_token_file, "model gateway token")?
        .map(|(base_url, token)| runner::ModelRoute { base_url, token });
    let git_relay = endpoint(&args.git_url, &args.git_token_file, "git relay token")?
        .map(|(base_url, token)| runner::ModelRoute { base_url, token });
    let egress = endpoint(&args.egress_proxy, &args.egress_token_file, "egress proxy token")?
        .map(|(base_url, token)| runner::ModelRoute { base_url, token });
    let limit = api::report::termination_message_limit(args.pod_containers);
    let agent_env = args.agent_env.clone();
    let mut opts = args.machine.options(true, report);
    opts.gateway = gateway;
    opts.git_relay = git_relay;
    opts.egress = egress;
    let text = std::fs::read_to_string(&args.manifest_file)
        .with_context(|| format!("cannot read the manifest {}", args.manifest_file.display()))?;
    let resolved = parse_manifest(&text)
        .and_then(|m| resolve(&m.execution, &m.templates))
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.manifest_file.display()))?;
    let dirs = StepDirs {
        private: args.private_dir.clone().unwrap_or_else(|| args.stream_dir.clone()),
        stream: args.stream_dir.clone(),
    };
    let store = Store::open(db).await?;
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    // The team's env reaches the agent by the names the Job lists (the cluster default's too).
    let env = |k: &str| match k {
        api::contract::AGENT_ENV => Some(agent_env.join(",")),
        _ => std::env::var(k).ok(),
    };
    let end = run_step(args.step, &store, &opts, &resolved, &dirs, &env, cancel).await;
    // Closed, the store is one file: the next step may read it from a read-only mount.
    store.close().await;
    match end? {
        StepEnd::Next => Ok(0),
        StepEnd::Published(said) => {
            let _ = std::fs::write(&args.termination_log, runner::termination_message_within(&said, limit));
            Ok(0)
        }
        StepEnd::Done(summary) => {
            println!("{}", serde_json::to_string(&summary)?);
            let _ = std::fs::write(&args.termination_log, runner::termination_message_within(&summary, limit));
            Ok(0)
        }
    }
}

/// The diff a runner sends to the controller, at most (marked when cut).
const DIFF_LIMIT: usize = 1024 * 1024;

/// Validates and runs one manifest. Err(message): invalid input (already reported on stderr).
async fn execute(
    db: &std::path::Path,
    text: &str,
    source: &str,
    opts: &RunOptions,
    policies: &[api::AgentPolicy],
) -> anyhow::Result<Result<runner::Summary, String>> {
    let resolved = match parse_manifest(text).and_then(|m| with_policies(m, policies)) {
        Ok(r) => r,
        Err(e) => {
            let message = format!("{source}: {e}");
            eprintln!("error: {message}");
            return Ok(Err(message));
        }
    };
    let store = Store::open(db).await?;
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    let env = |k: &str| std::env::var(k).ok();
    match runner::run_execution(&store, opts, &resolved, &env, cancel).await {
        Ok(s) => Ok(Ok(s)),
        Err(e) => {
            eprintln!("error: {e}");
            if e.exit_code() == EXIT_INVALID { Ok(Err(e.to_string())) } else { Err(e.into()) }
        }
    }
}

/// Resolves a manifest under the policies that select its namespace (on one machine a namespace
/// has only its name label), as a controller does.
fn with_policies(mut m: api::Manifest, policies: &[api::AgentPolicy]) -> Result<api::Resolved, api::ManifestError> {
    use api::policy;
    let ns = m.execution.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let labels = std::collections::BTreeMap::from([(policy::NAME_LABEL.to_string(), ns)]);
    let selected = policy::selecting(policies, &labels);
    let template = m
        .execution
        .spec
        .template_ref
        .as_ref()
        .and_then(|r| m.templates.iter().find(|t| t.metadata.name.as_deref() == Some(r.name.as_str())).cloned());
    policy::apply_defaults(&mut m.execution, template.as_ref(), &selected);
    let mut r = resolve(&m.execution, &m.templates)?;
    if !selected.is_empty() {
        r.policy = Some(policy::check(&r, &selected, false)?);
    }
    Ok(r)
}

/// The cluster's default pod settings from `--runner-pod` and `--runner-resources`, checked as a
/// template's would be.
pub fn runner_pod_settings(pod: Option<&str>, resources: Option<&str>) -> anyhow::Result<crate::api::PodSettings> {
    let mut settings: crate::api::PodSettings = match pod.map(str::trim).filter(|p| !p.is_empty()) {
        None => Default::default(),
        Some(json) => {
            let mut de = serde_json::Deserializer::from_str(json);
            serde_path_to_error::deserialize(&mut de)
                .map_err(|e| anyhow::anyhow!("--runner-pod (the chart's runner.pod): {}: {}", e.path(), e.inner()))?
        }
    };
    let resources = match resources.map(str::trim).filter(|r| !r.is_empty()) {
        None => crate::controller::desired::default_runner_resources(),
        Some(json) => serde_json::from_str(json).with_context(|| {
            format!("--runner-resources {json:?} is not a ResourceRequirements in JSON (e.g. {{\"limits\": {{\"memory\": \"4Gi\"}}}})")
        })?,
    };
    let steps = settings.resources.get_or_insert_with(Default::default);
    if steps.default.is_none() {
        steps.default = resources;
    }
    let at = "--runner-pod (the chart's runner.pod)";
    settings
        .check(at)
        .and_then(|()| settings.check_requests_within_limits(at))
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
    Ok(settings)
}

async fn controller(db: &std::path::Path, args: ControllerArgs) -> anyhow::Result<i32> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Checked before anything else: a default that overrides a security setting never starts.
    let pod = runner_pod_settings(args.runner_pod.as_deref(), args.runner_resources.as_deref())?;
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API: check KUBECONFIG or run in a cluster")?;
    let store = Store::open(db).await?;
    let config = crate::controller::ControllerConfig {
        job: crate::controller::desired::JobConfig {
            image: args.image,
            default_storage_class: args.storage_class.filter(|s| !s.is_empty()),
            default_workspace_size: args.workspace_size,
            report_url: args.report_url.filter(|u| !u.is_empty()),
            default_model: args.default_model.filter(|m| !m.is_empty()),
            git_relay: args.git_relay,
            egress_proxy: args.egress_url.filter(|u| !u.is_empty()),
            pod,
            ..Default::default()
        },
        limits: crate::controller::queue::Limits {
            global: (args.max_concurrent > 0).then_some(args.max_concurrent),
            per_namespace: (args.max_per_namespace > 0).then_some(args.max_per_namespace),
        },
        default_timeout: args.default_timeout.filter(|t| !t.is_empty()),
        namespaces: {
            let set: std::collections::BTreeSet<String> =
                args.namespaces.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
            if let Some(bad) = set.iter().find(|n| !crate::server::is_dns_label(n)) {
                anyhow::bail!("--namespaces: {bad:?} is not a namespace name");
            }
            (!set.is_empty()).then_some(set)
        },
        ..Default::default()
    };
    let mut config = config;
    if let Some(u) = args.anthropic_base_url.filter(|u| !u.is_empty()) {
        anyhow::ensure!(
            u.starts_with("https://") || u.starts_with("http://"),
            "--anthropic-base-url {u:?} is not an http(s) URL"
        );
        config.model_upstream = u;
    }
    if args.executor == ExecutorArg::Job && config.job.report_url.is_none() {
        anyhow::bail!(
            "--report-url is required with --executor job: runner pods reach the model gateway and report through \
             it (e.g. http://agentops-controller.agentops-system.svc:8080)"
        );
    }
    if let Some(t) = &config.default_timeout {
        let max = crate::api::limits::MAX_TIMEOUT;
        let ok = crate::api::is_plain_duration(t)
            && humantime::parse_duration(t).is_ok_and(|d| d <= crate::api::limits::max_duration(max));
        anyhow::ensure!(ok, "--default-timeout {t:?} is not a duration from 1s to {max} (e.g. 30m, 2h)");
    }
    let executor = match args.executor {
        ExecutorArg::Job => crate::controller::ExecutorKind::Job,
        ExecutorArg::Local => {
            if let Some(evidence) = in_cluster_evidence()
                && !args.allow_local_executor_in_cluster
            {
                anyhow::bail!(
                    "refusing --executor local inside a cluster ({evidence}): the agent and hooks would run in this \
                     container, next to the controller's service-account token. Use --executor job, or pass \
                     --allow-local-executor-in-cluster to accept that risk"
                );
            }
            let o = args.machine.options(false, None);
            let mut env = vec![
                ("AGENTOPS_CLAUDE_BIN".to_string(), o.claude_bin.display().to_string()),
                ("AGENTOPS_SECRETS_DIR".to_string(), o.secrets_dir.display().to_string()),
            ];
            let root = o.workspace_root;
            env.push(("AGENTOPS_WORKSPACE_ROOT".into(), root.display().to_string()));
            // Each runner keeps its own log store; the controller's store holds the record.
            env.push(("AGENTOPS_DB".into(), root.join("agentops-runner.db").display().to_string()));
            env.push(("AGENTOPS_TERMINATION_LOG".into(), "/dev/null".into()));
            crate::controller::ExecutorKind::Local { bin: std::env::current_exe()?, env }
        }
    };
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let http = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--http-addr)", args.http_addr))?;
    let probes = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--metrics-addr)", args.metrics_addr))?;
    if let Some(u) = &config.job.egress_proxy {
        let ok = url::Url::parse(u).is_ok_and(|p| p.scheme() == "http" && p.host().is_some() && p.port().is_some());
        anyhow::ensure!(ok, "--egress-url {u:?} is not http://host:port (where runner pods reach the egress proxy)");
    }
    // Only runner pods use it (a local runner starts a proxy of its own).
    let egress = match args.executor {
        ExecutorArg::Job => Some(
            tokio::net::TcpListener::bind(args.egress_addr)
                .await
                .with_context(|| format!("cannot listen on {} (--egress-addr)", args.egress_addr))?,
        ),
        ExecutorArg::Local => None,
    };
    let listeners = crate::server::serve(crate::server::Listeners { api: Some(http), probes: Some(probes), egress });
    let leader = if args.leader_election {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("agentops-{}", std::process::id()));
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(&args.lease_namespace)
            .with_identity(identity)
            .build()
            .await
            .context("cannot set up leader election (pass --leader-election=false for a single instance)")?;
        let (rx, _task) = manager.watch().await;
        Some(rx)
    } else {
        None
    };
    let stopped = crate::controller::run(client, config, Some(store), executor, listeners, leader, shutdown).await;
    if stopped == crate::controller::Stopped::LostLeadership {
        eprintln!("error: lost the leader lease; exiting so that a new instance starts clean");
        return Ok(1);
    }
    Ok(0)
}

/// Why this process looks like it runs in a Kubernetes pod, if it does.
fn in_cluster_evidence() -> Option<String> {
    const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Some("KUBERNETES_SERVICE_HOST is set".into());
    }
    std::path::Path::new(TOKEN).exists().then(|| format!("{TOKEN} exists"))
}

/// Ctrl-C or SIGTERM cancels the execution (the agent is stopped, usage kept).
async fn cancel_on_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("cancelling: stopping the agent (usage so far is kept)");
    cancel.cancel();
}

async fn executions(store: &Store, cmd: ExecutionsCmd) -> anyhow::Result<i32> {
    match cmd {
        ExecutionsCmd::List { limit, json, .. } => {
            let rows = store.list_executions(limit).await?;
            if json {
                let reports: Vec<runner::Summary> = rows.iter().map(|r| r.summary()).collect();
                println!("{}", serde_json::to_string_pretty(&reports)?);
                return Ok(0);
            }
            let mut t = Table::new();
            t.load_style(UTF8_NO_BORDERS)
                .set_header(["ID", "NAME", "PHASE", "REASON", "TOKENS", "COST", "TURNS", "DURATION", "CREATED"]);
            for r in rows {
                t.add_row([
                    r.id,
                    format!("{}/{}", r.namespace, r.name),
                    r.status,
                    r.reason.unwrap_or_default(),
                    r.tokens_used.to_string(),
                    format!("${:.4}", r.cost_usd),
                    r.num_turns.to_string(),
                    r.duration_ms.map(|d| format!("{:.1}s", d as f64 / 1000.0)).unwrap_or_default(),
                    r.created_at,
                ]);
            }
            println!("{}", clean(&t.to_string()));
            Ok(0)
        }
        ExecutionsCmd::Show { id, logs, diff, json, .. } => {
            let row = store.get_execution(&id).await?;
            let log_lines = if logs { store.logs(&row.id).await? } else { Vec::new() };
            if json {
                // The report (the shape of `run -o json`), with logs and diff when asked for.
                let mut v = serde_json::to_value(row.summary())?;
                if logs {
                    v["logs"] = serde_json::to_value(&log_lines)?;
                }
                if diff {
                    v["diff"] = serde_json::to_value(&row.diff)?;
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let summary: Option<runner::Summary> =
                row.output_json.as_deref().and_then(|j| serde_json::from_str(j).ok());
            match summary {
                Some(s) => print!("{}", s.human()),
                None => println!(
                    "{}",
                    clean_line(&format!(
                        "{} {}/{} {} (running or interrupted)",
                        row.status, row.namespace, row.name, row.id
                    ))
                ),
            }
            if diff {
                println!("{}", clean(row.diff.as_deref().unwrap_or("(no diff)")));
            }
            for l in log_lines {
                println!("{} [{}] {}", l.at, clean_line(&l.source), clean_line(&l.line));
            }
            Ok(0)
        }
    }
}

impl ExecutionsCmd {
    fn remote(&self) -> &RemoteArgs {
        match self {
            ExecutionsCmd::List { remote, .. } | ExecutionsCmd::Show { remote, .. } => remote,
        }
    }
}

/// The bearer token of the current kubeconfig context (a `token` or a `tokenFile`).
async fn kubeconfig_token() -> anyhow::Result<String> {
    use secrecy::ExposeSecret;
    let config = kube::Config::infer().await.context("cannot read a kubeconfig (set KUBECONFIG, or pass --token)")?;
    let auth = &config.auth_info;
    if let Some(t) = &auth.token {
        return Ok(t.expose_secret().to_string());
    }
    if let Some(file) = &auth.token_file {
        let t =
            std::fs::read_to_string(file).with_context(|| format!("cannot read the kubeconfig's tokenFile {file}"))?;
        return Ok(t.trim().to_string());
    }
    anyhow::bail!(
        "the kubeconfig's user has no bearer token (it signs in with a client certificate or an exec plugin); \
         pass --token, e.g. --token \"$(kubectl create token <service-account>)\""
    )
}

/// `executions list|show --server URL`: the controller's API, as the kubeconfig's user.
async fn remote_executions(server: &str, cmd: ExecutionsCmd) -> anyhow::Result<i32> {
    let base = url::Url::parse(server).with_context(|| format!("--server {server:?} is not a URL"))?;
    let loopback = match base.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    anyhow::ensure!(
        base.scheme() == "https" || (base.scheme() == "http" && loopback),
        "--server must be https://, or http:// to this machine (kubectl port-forward): a token is sent to it"
    );
    let remote = cmd.remote().clone();
    let token = match remote.token.filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => kubeconfig_token().await?,
    };
    let base = server.trim_end_matches('/');
    let (path, json) = match &cmd {
        ExecutionsCmd::List { limit, json, .. } => {
            let ns = remote.namespace.as_deref().map(|n| format!("&namespace={n}")).unwrap_or_default();
            (format!("/api/v1/executions?limit={limit}{ns}"), *json)
        }
        ExecutionsCmd::Show { id, json, .. } => {
            let (ns, name) = match (id.split_once('/'), &remote.namespace) {
                (Some((ns, name)), _) => (ns.to_string(), name.to_string()),
                (None, Some(ns)) => (ns.clone(), id.clone()),
                (None, None) => anyhow::bail!("with --server, name the execution as namespace/name (or pass -n)"),
            };
            for part in [&ns, &name] {
                anyhow::ensure!(crate::server::is_dns_subdomain(part), "{part:?} is not a Kubernetes name");
            }
            (format!("/api/v1/executions/{ns}/{name}"), *json)
        }
    };
    let resp = runner::http_client()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach the controller at {base}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        let why = body["error"].as_str().unwrap_or("no details");
        eprintln!("error: the controller answered HTTP {}: {}", status.as_u16(), clean(why));
        return Ok(1);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(0);
    }
    let rows = match &body {
        serde_json::Value::Array(rows) => rows.clone(),
        one => vec![one.clone()],
    };
    let mut t = Table::new();
    t.load_style(UTF8_NO_BORDERS).set_header(["NAME", "PHASE", "REASON", "TOKENS", "COST", "TURNS", "STARTED"]);
    for r in rows {
        let text = |k: &str| r[k].as_str().unwrap_or_default().to_string();
        t.add_row([
            format!("{}/{}", text("namespace"), text("name")),
            text("phase"),
            text("reason"),
            r["tokensUsed"].as_u64().unwrap_or_default().to_string(),
            format!("${:.4}", r["costUsd"].as_f64().unwrap_or_default()),
            r["numTurns"].as_u64().unwrap_or_default().to_string(),
            text("startTime"),
        ]);
    }
    println!("{}", clean(&t.to_string()));
    Ok(0)
}

async fn workspaces(store: &Store, cmd: WorkspacesCmd) -> anyhow::Result<i32> {
    match cmd {
        WorkspacesCmd::List { json } => {
            let rows = store.list_workspaces().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            let mut t = Table::new();
            t.load_style(UTF8_NO_BORDERS).set_header(["ID", "STATUS", "PATH", "CREATED", "COMPLETED", "CLEANED"]);
            for r in rows {
                t.add_row([
                    r.id,
                    r.status,
                    r.path,
                    r.created_at,
                    r.completed_at.unwrap_or_default(),
                    r.cleanup_at.unwrap_or_default(),
                ]);
            }
            println!("{}", clean(&t.to_string()));
            Ok(0)
        }
        WorkspacesCmd::Clean { older_than, dry_run } => {
            let cutoff =
                chrono::Utc::now() - chrono::Duration::from_std(older_than).context("--older-than is too large")?;
            let cutoff = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let stale = store.stale_workspaces(&cutoff).await?;
            let mut removed = 0;
            for w in &stale {
                if dry_run {
                    println!("would remove {} ({})", w.path, w.status);
                    continue;
                }
                store.set_workspace_status(&w.id, WorkspaceStatus::Cleaning).await?;
                match Workspace::remove(std::path::Path::new(&w.path)) {
                    Ok(()) => {
                        store.set_workspace_status(&w.id, WorkspaceStatus::Cleaned).await?;
                        println!("removed {}", w.path);
                        removed += 1;
                    }
                    Err(e) => eprintln!("cannot remove {}: {e}", w.path),
                }
            }
            if !dry_run {
                println!("{removed} workspace(s) removed");
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller's defaults are the README's (its flag table).
    #[test]
    fn the_controllers_defaults_are_the_readmes() {
        let cli = Cli::try_parse_from(["agentops", "controller"]).expect("no flag is required");
        let Command::Controller(a) = cli.command else { panic!("not the controller") };
        assert_eq!(a.http_addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(a.metrics_addr, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(a.max_concurrent, 10);
        assert!(a.git_relay && a.leader_election);
        assert_eq!(a.anthropic_base_url, None, "then $ANTHROPIC_BASE_URL, else api.anthropic.com");
    }
}
