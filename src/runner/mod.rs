//! The pipeline of one execution: workspace → clone → pre-hooks → agent → collect →
//! commit/push → post-hooks (or error hooks) → report. Runs the same on one machine
//! (`agentops run`) and inside a Job's pod (`agentops runner`).

pub mod bundle;
mod hooks;
mod recorder;
pub mod secrets;
pub mod steps;
mod workspace;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentStop, Tally};
use crate::api::{GitResult, Phase, Reason, Resolved, RetainPolicy};
use crate::git::{self, GitError};
use crate::store::{NewExecution, Progress, Store, StoreError, WorkspaceStatus, now};

pub use crate::api::report::*;
pub use hooks::{HookError, MAX_OUTPUT as HOOK_OUTPUT_LIMIT, http_client};
pub use recorder::{Recorder, ReportTarget, post_diff, post_logs, post_report};
pub use secrets::{Redactor, SecretError, Secrets};
pub use workspace::Workspace;

/// Where things are on this machine.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Directory under which workspaces are created.
    pub workspace_root: PathBuf,
    /// The Claude Code CLI.
    pub claude_bin: PathBuf,
    /// Secrets laid out as `<dir>/<secret>/<key>`.
    pub secrets_dir: PathBuf,
    /// Print progress lines to stderr.
    pub progress: bool,
    /// Where live progress is posted (the controller's runner endpoint), if anywhere.
    pub report: Option<ReportTarget>,
    /// Confine the agent with Landlock (None: unconfined, `--no-sandbox`).
    pub sandbox: Option<SandboxPolicy>,
    /// The model gateway the agent uses when it is not this process's own (a runner pod's
    /// agent step: the controller's gateway, with this execution's token). None: `agentops`
    /// starts a gateway on loopback with the API key.
    pub gateway: Option<ModelRoute>,
    /// The controller's git relay for this execution, when git goes through it (a runner pod's
    /// clone and publish steps): its URL stands for `spec.repository.url`, its token for the
    /// git credential.
    pub git_relay: Option<ModelRoute>,
    /// The controller's egress proxy (`base_url`: `http://host:port`) and this execution's
    /// token for it, when the execution has `egressHosts` (a runner pod's agent step). None on
    /// one machine: the run starts a proxy of its own.
    pub egress: Option<ModelRoute>,
    /// Open the pull request `spec.git.pullRequest` asks for after the push (`agentops run`,
    /// which holds the credential). False in a runner pod: the controller opens it.
    pub open_pull_request: bool,
    /// The operator's binaries in a team's agent image (`agentops bundle`): the CLI is started
    /// through the bundle's loader and libraries. None: the CLI runs as it is.
    pub bundle: Option<PathBuf>,
}

/// Where the agent reaches the model, and with what token (never the API key).
#[derive(Clone)]
pub struct ModelRoute {
    pub base_url: String,
    pub token: String,
}

impl std::fmt::Debug for ModelRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRoute").field("base_url", &self.base_url).field("token", &"***").finish()
    }
}

/// The commit the agent's work goes on top of, as the clone found it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Base {
    pub commit: String,
    pub source_ref: String,
    pub source_branch: String,
}

/// What the agent's sandbox adds to its workspace and the system directories.
#[derive(Debug, Clone, Default)]
pub struct SandboxPolicy {
    /// More directories the agent may read (toolchains, e.g. `~/.rustup`).
    pub extra_read: Vec<PathBuf>,
    /// Never granted, nor any directory holding them (the secrets dir, the store, HOME).
    pub protected: Vec<PathBuf>,
}

/// Why an execution could not even start. Everything after the start ends in a Summary.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RunError {
    /// Exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Secret(_) => EXIT_INVALID,
            RunError::Store(_) => EXIT_FAILED,
        }
    }
}

/// How the execution ended, before it is written down.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Outcome {
    phase: Phase,
    reason: Reason,
    message: String,
}

impl Outcome {
    fn new(phase: Phase, reason: Reason, message: impl Into<String>) -> Self {
        Self { phase, reason, message: message.into() }
    }
    fn failed(reason: Reason, message: impl Into<String>) -> Self {
        Self::new(Phase::Failed, reason, message)
    }
}

/// Limits of the final result text kept in the summary and status.
pub(crate) const RESULT_LIMIT: usize = 4096;

/// State of one execution while it runs.
struct Run<'a> {
    id: String,
    r: &'a Resolved,
    opts: &'a RunOptions,
    secrets: Secrets,
    redactor: Redactor,
    rec: Recorder,
    cancel: CancellationToken,
    deadline: Instant,
    /// Set when cancel or the deadline fires: aborts a clone or push in progress.
    abort: Arc<AtomicBool>,
    ws: Option<Workspace>,
    tally: Tally,
    git: GitResult,
    diff: Option<String>,
    /// A commit exists that did not reach the remote: the workspace must be kept.
    unpushed: bool,
    hook_failure: Option<String>,
    /// What the model gateway counted (the operator's own figures: usage, cost, turns, tools,
    /// model), when it relayed the run.
    metered: Option<crate::gateway::Metered>,
    /// What the egress proxy counted (`egressHosts`).
    egress: Option<crate::api::EgressSummary>,
    /// Where git goes: `spec.repository.url`, or the controller's relay for it (a pod's steps).
    git_url: String,
    /// When the execution started (for every summary, the hooks' too).
    started: Instant,
    start_time: String,
    /// Where the steps keep what they trust and the agent cannot write: a pod's private
    /// volume; on one machine (None) the workspace's root, outside the agent's sandbox.
    private: Option<PathBuf>,
}

/// What the egress proxy counted (see `EgressTally::summary`).
fn egress_summary(t: &crate::gateway::egress::EgressTally) -> crate::api::EgressSummary {
    t.summary()
}

/// The TCP ports the agent's sandbox lets it connect to: its model endpoint's (the gateway's)
/// and those of `spec.egress`.
fn agent_ports(model_url: Option<&str>, egress: &[crate::api::EgressRule]) -> Vec<u16> {
    let model =
        url::Url::parse(model_url.unwrap_or("https://api.anthropic.com")).ok().and_then(|u| u.port_or_known_default());
    model.into_iter().chain(egress.iter().flat_map(|e| e.ports.iter().copied())).collect()
}

/// How long a push that failed for a transient reason is tried again.
const PUSH_RETRY_FOR: Duration = Duration::from_secs(60);

/// The clone's index, kept where the agent cannot write: its stat data lets publish hash only
/// the files that changed (see `git::Publish::prepare`).
const CLONE_INDEX: &str = "clone.index";

/// Runs one execution to its end and returns its summary. `env` looks up the process
/// environment (API key fallback and pass-through variables).
pub async fn run_execution(
    store: &Store,
    opts: &RunOptions,
    r: &Resolved,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
    cancel: CancellationToken,
) -> Result<Summary, RunError> {
    // Secrets first: a missing one is bad input, and nothing is created.
    let secrets = secrets::load(r, &opts.secrets_dir, env)?;
    let redactor = Redactor::new(&secrets);
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    store.create_execution(&NewExecution::new(&id, r)).await?;
    let started = Instant::now();
    let start_time = now();
    store.mark_running(&id, &start_time).await?;
    let (run, watcher) =
        Run::new_at(store, opts, r, cancel, secrets, redactor, id.clone(), started, start_time.clone(), 0);
    // A bug that panics below must not leave the row Running forever: finish it as Failed.
    let run = std::panic::AssertUnwindSafe(run_started(store, r, env, run, watcher));
    match futures::FutureExt::catch_unwind(run).await {
        Ok(done) => done,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            let summary = Summary {
                id: id.clone(),
                name: r.name.clone(),
                namespace: r.namespace.clone(),
                phase: Phase::Failed,
                reason: Some(Reason::InternalError),
                message: Some(format!("agentops stopped on an internal error ({what}); please report it")),
                start_time: Some(start_time),
                completion_time: Some(now()),
                duration_ms: started.elapsed().as_millis() as u64,
                ..Default::default()
            };
            store.finish_execution(&summary, summary.message.as_deref(), None).await?;
            Ok(summary)
        }
    }
}

async fn run_started(
    store: &Store,
    r: &Resolved,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
    mut run: Run<'_>,
    watcher: tokio::task::JoinHandle<()>,
) -> Result<Summary, RunError> {
    run.say(&format!("▶ {} ({}): {}", r.name, run.id, r.repo_url));
    // Fault injection for the test of the panic guard; compiled out of release builds.
    if cfg!(debug_assertions) && env("AGENTOPS_TEST_PANIC").is_some() {
        panic!("injected by AGENTOPS_TEST_PANIC");
    }
    let outcome = run.pipeline(store, env).await;
    let summary = run.end(outcome).await;
    watcher.abort();
    let Run { rec, ws, unpushed, diff, .. } = run;
    rec.finish().await;
    let ok = summary.phase == Phase::Succeeded;
    let error = (!ok).then(|| summary.message.clone().unwrap_or_default());
    store.finish_execution(&summary, error.as_deref(), diff.as_deref()).await?;
    if let Some(ws) = ws {
        store
            .set_workspace_status(&ws.id, if ok { WorkspaceStatus::Completed } else { WorkspaceStatus::Error })
            .await?;
        let remove = match r.retain {
            RetainPolicy::Delete => true,
            RetainPolicy::Retain => false,
            RetainPolicy::RetainOnFailure => ok,
        };
        // Never delete the only copy of work that did not reach the remote.
        if remove && !unpushed {
            store.set_workspace_status(&ws.id, WorkspaceStatus::Cleaning).await?;
            match Workspace::remove(&ws.root) {
                Ok(()) => store.set_workspace_status(&ws.id, WorkspaceStatus::Cleaned).await?,
                Err(e) => {
                    tracing::warn!(workspace = %ws.root.display(), error = %e, "cannot remove workspace")
                }
            }
        }
    }
    Ok(summary)
}

impl<'a> Run<'a> {
    /// A run from `started` on, and the task that aborts git work on cancel or the deadline. Its
    /// log lines are numbered from `first_log_seq` (each step of a pod has its own range).
    #[allow(clippy::too_many_arguments)]
    fn new_at(
        store: &Store,
        opts: &'a RunOptions,
        r: &'a Resolved,
        cancel: CancellationToken,
        secrets: Secrets,
        redactor: Redactor,
        id: String,
        started: Instant,
        start_time: String,
        first_log_seq: i64,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let deadline = started + r.timeout;
        let abort = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (abort, cancel) = (abort.clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                abort.store(true, Ordering::Relaxed);
            })
        };
        let run = Run {
            rec: Recorder::start_at(store.clone(), id.clone(), redactor.clone(), opts.report.clone(), first_log_seq),
            id,
            r,
            opts,
            secrets,
            redactor,
            cancel,
            deadline,
            abort,
            ws: None,
            tally: Tally::default(),
            git: GitResult { branch: Some(r.branch.clone()), ..Default::default() },
            diff: None,
            unpushed: false,
            hook_failure: None,
            metered: None,
            egress: None,
            git_url: opts.git_relay.as_ref().map_or_else(|| r.repo_url.clone(), |g| g.base_url.clone()),
            started,
            start_time,
            private: None,
        };
        (run, watcher)
    }

    /// The post hooks (after a success) or the error hooks, then the summary.
    async fn end(&mut self, mut outcome: Outcome) -> Summary {
        if outcome.phase == Phase::Succeeded
            && let Err(e) = self.hooks("post", &outcome).await
        {
            outcome = Outcome::failed(Reason::PostHookFailed, e.to_string());
        }
        if outcome.phase != Phase::Succeeded {
            // Error hooks run whatever stopped the execution; their own failure is only logged.
            let _ = self.hooks("onError", &outcome).await;
        }
        self.summary(&outcome)
    }

    /// The egress proxy of this run (one machine): the `egressHosts`, the `spec.egress` CIDR
    /// rules (addresses it may connect to although not public) and the model gateway on
    /// loopback. Returns it with the agent's token.
    async fn start_egress_proxy(
        &self,
        gateway: &str,
    ) -> std::io::Result<(crate::gateway::egress::EgressProxy, String)> {
        use crate::gateway::egress::{CidrRule, EgressPolicy, EgressProxy, HostRule};
        let mut hosts = self.r.egress_hosts.clone();
        if let Ok(u) = url::Url::parse(gateway)
            && let (Some(h), Some(port)) = (u.host_str(), u.port_or_known_default())
            && let Ok(rule) = HostRule::parse(&format!("{h}:{port}"))
        {
            hosts.push(rule);
        }
        let cidrs = self.r.egress.iter().filter_map(|e| CidrRule::parse(&e.cidr, e.ports.clone()).ok()).collect();
        let proxy = EgressProxy::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            crate::gateway::egress::system_resolver(),
            std::time::Duration::from_secs(300),
        )
        .await?;
        let token = crate::gateway::new_token();
        proxy.open(&token, EgressPolicy { hosts, cidrs });
        let names: Vec<String> = self.r.egress_hosts.iter().map(|h| format!("{}:{}", h.host, h.port)).collect();
        self.say(&format!("  egress proxy on {} for {}", proxy.addr, names.join(", ")));
        Ok((proxy, token))
    }

    fn say(&self, line: &str) {
        self.rec.log("runner", line);
        if self.opts.progress {
            eprintln!("{}", crate::api::text::clean(&self.redactor.redact(line)));
        }
    }

    /// Cancelled or timed out, if either happened.
    fn stopped(&self) -> Option<Outcome> {
        if self.cancel.is_cancelled() {
            Some(Outcome::new(Phase::Cancelled, Reason::Cancelled, "cancelled; the usage spent so far is recorded"))
        } else if Instant::now() >= self.deadline {
            Some(Outcome::new(
                Phase::TimedOut,
                Reason::Timeout,
                format!("the execution exceeded its timeout of {}", humantime::format_duration(self.r.timeout)),
            ))
        } else {
            None
        }
    }

    async fn pipeline(&mut self, store: &Store, env: &(dyn Fn(&str) -> Option<String> + Sync)) -> Outcome {
        let base = match self.clone_part(store).await {
            Ok(b) => b,
            Err(o) => return o,
        };
        if let Some(o) = self.agent_part(env, None).await {
            return o;
        }
        let outcome = self.publish_part(&base).await;
        if self.opts.open_pull_request {
            return self.pull_request_part(outcome).await;
        }
        outcome
    }

    /// After a push, the pull request `spec.git.pullRequest` asks for, opened (or the open one
    /// for the branch updated) with the repository's credential, which the agent never held.
    /// A failure keeps the pushed branch and says what the API answered.
    async fn pull_request_part(&mut self, outcome: Outcome) -> Outcome {
        let Some(pr) = self.r.pull_request.as_ref() else { return outcome };
        if outcome.phase != Phase::Succeeded || outcome.reason != Reason::Completed || !self.git.pushed {
            return outcome;
        }
        let Some(token) = self.secrets.git.as_ref().map(|c| c.token.clone()) else {
            return Outcome::failed(
                Reason::PullRequestFailed,
                "a pull request needs a token: set spec.repository.credentialsSecretRef; the branch was pushed",
            );
        };
        let summary = self.summary(&outcome);
        self.say(&format!("  opening a pull request for {}", self.r.branch));
        let rec = &self.rec;
        let opened = tokio::select! {
            r = crate::forge::open_for(pr, self.r, &summary, crate::forge::Origin::Local, &token,
                                       crate::forge::Retry::default(), |m| rec.log("runner", m)) => r,
            _ = self.cancel.cancelled() => return self.stopped().unwrap_or(outcome),
        };
        match opened {
            Ok(p) => {
                self.say(&format!("  pull request {} ({}): {}", p.number, p.state, p.url));
                self.git.set_pull_request(p);
                outcome
            }
            Err(why) => Outcome::failed(Reason::PullRequestFailed, why),
        }
    }

    fn private_dir(&self, ws: &Workspace) -> PathBuf {
        self.private.clone().unwrap_or_else(|| ws.root.clone())
    }

    /// The workspace and the clone: the base the work goes on.
    async fn clone_part(&mut self, store: &Store) -> Result<Base, Outcome> {
        let ws = match Workspace::create(&self.opts.workspace_root, &self.id) {
            Ok(ws) => ws,
            Err(e) => {
                let where_ = self.opts.workspace_root.display();
                return Err(Outcome::failed(
                    Reason::WorkspaceFailed,
                    format!("cannot create a workspace under {where_}: {e}"),
                ));
            }
        };
        if let Err(e) = store.create_workspace(&ws.id, &self.id, &ws.root.to_string_lossy()).await {
            return Err(Outcome::failed(Reason::StoreFailed, e.to_string()));
        }
        self.ws = Some(ws.clone());

        // Clone.
        self.say(&format!("  cloning {} (depth {})", self.r.repo_url, self.r.depth));
        let cloned = {
            let (r, dest, creds, abort, url) =
                (self.r.clone(), ws.repo.clone(), self.secrets.git.clone(), self.abort.clone(), self.git_url.clone());
            tokio::task::spawn_blocking(move || {
                git::clone(&url, &dest, r.git_ref.as_deref(), r.depth, creds.as_ref(), &r.branch, &abort)
                    .map(|(_, c)| c)
            })
            .await
        };
        let cloned = match cloned {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let reason =
                    if matches!(e, GitError::BranchExists { .. }) { Reason::BranchExists } else { Reason::CloneFailed };
                return Err(self.stopped().unwrap_or_else(|| Outcome::failed(reason, e.to_string())));
            }
            Err(e) => return Err(Outcome::failed(Reason::CloneFailed, format!("clone task failed: {e}"))),
        };
        let t = cloned.timings;
        self.say(&format!(
            "  cloned {} at {} in {} ms (init {}, fetch {}, checkout {})",
            cloned.source_branch,
            &cloned.base.to_string()[..12],
            (t.init + t.fetch + t.checkout).as_millis(),
            t.init.as_millis(),
            t.fetch.as_millis(),
            t.checkout.as_millis()
        ));
        // Only a speed-up: without it, publish hashes every file of the work tree.
        if let Err(e) = std::fs::copy(ws.repo.join(".git/index"), self.private_dir(&ws).join(CLONE_INDEX)) {
            tracing::warn!(error = %e, "cannot keep the clone's index; publish will hash every file");
        }
        self.git.base_branch = self.r.base_branch.clone().or_else(|| Some(cloned.source_branch.clone()));
        self.git.base_commit = Some(cloned.base.to_string());
        if let Some(o) = self.stopped() {
            return Err(o);
        }
        Ok(Base {
            commit: cloned.base.to_string(),
            source_ref: cloned.source_ref.clone(),
            source_branch: cloned.source_branch.clone(),
        })
    }

    /// Pre-hooks and the agent (its stream lines also go to `stream` when given). None: go on
    /// and publish the work.
    async fn agent_part(
        &mut self,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
        mut stream: Option<&mut (dyn std::io::Write + Send)>,
    ) -> Option<Outcome> {
        let ws = self.ws.clone()?;
        // Pre-hooks.
        if let Err(e) = self.hooks("pre", &Outcome::new(Phase::Running, Reason::Running, "")).await {
            return Some(self.stopped().unwrap_or_else(|| Outcome::failed(Reason::PreHookRejected, e.to_string())));
        }
        if let Some(o) = self.stopped() {
            return Some(o);
        }

        // Agent.
        self.say(&format!("  agent {} starting", self.r.model.as_deref().unwrap_or("(default model)")));
        // The agent never holds the API key: it talks to a gateway on loopback with a token good
        // for this run only; the gateway adds the key and counts every token.
        let gateway = match self.secrets.api_key.as_deref() {
            _ if self.opts.gateway.is_some() => None,
            Some(key) => {
                let upstream = env("ANTHROPIC_BASE_URL").unwrap_or_else(|| "https://api.anthropic.com".into());
                // Remote MCP servers go through it too: it adds their Secret-backed headers.
                let headers = &self.secrets.mcp_headers;
                let routes = crate::gateway::mcp::routes(
                    &self.r.agent_config.mcp_servers,
                    &crate::gateway::mcp::McpRules::of(
                        &self.r.agent_config,
                        &self.r.allowed_tools,
                        &self.r.disallowed_tools,
                    ),
                    |s, h| {
                        headers
                            .get(&(s.name.clone(), h.name.clone()))
                            .cloned()
                            .ok_or_else(|| format!("no value for header {} of MCP server {:?}", h.name, s.name))
                    },
                );
                let routes = match routes {
                    Ok(r) => r,
                    Err(e) => return Some(Outcome::failed(Reason::AgentStartFailed, e)),
                };
                let prices = crate::gateway::prices::PriceTable::list_shared();
                match crate::gateway::Gateway::start_with_mcp(&upstream, key, self.r.max_budget_usd, prices, routes)
                    .await
                {
                    Ok(g) => {
                        g.restrict_models(self.r.policy.as_ref().and_then(|p| p.models.clone()));
                        g.restrict_turns(self.r.max_turns);
                        Some(g)
                    }
                    Err(e) => {
                        return Some(Outcome::failed(
                            Reason::AgentStartFailed,
                            format!("cannot start the model gateway: {e}"),
                        ));
                    }
                }
            }
            None => None,
        };
        // This process's own gateway, or the one it was given (the controller's).
        let route = match &gateway {
            Some(g) => Some(ModelRoute { base_url: g.base_url.clone(), token: g.token.clone() }),
            None => self.opts.gateway.clone(),
        };
        // Egress by host name (`egressHosts`), on one machine: a proxy of this run on loopback
        // that connects only to those hosts (and the model gateway, which the CLI may send
        // through it), with a token of this run. The sandbox lets the agent reach its port.
        let egress = match (&gateway, self.r.egress_hosts.is_empty()) {
            (Some(g), false) => match self.start_egress_proxy(&g.base_url).await {
                Ok(p) => Some(p),
                Err(e) => {
                    return Some(Outcome::failed(
                        Reason::AgentStartFailed,
                        format!("cannot start the egress proxy: {e}"),
                    ));
                }
            },
            _ => None,
        };
        // In a runner pod: the controller's proxy, with this execution's token and its name as
        // the user (which names the account a restarted controller reopens). The gateway is
        // not behind it: the pod reaches the controller directly (`NO_PROXY`).
        let controllers = self.opts.egress.as_ref().filter(|_| gateway.is_none() && !self.r.egress_hosts.is_empty());
        let pod_proxy = controllers.and_then(|e| {
            let mut u = url::Url::parse(&e.base_url).ok()?;
            u.set_username(&crate::gateway::egress::proxy_user(&self.r.namespace, &self.r.name)).ok()?;
            u.set_password(Some(&e.token)).ok()?;
            // `http://user:token@host:port`, as tools expect a proxy (no path).
            Some(u.to_string().trim_end_matches('/').to_string())
        });
        if let Some(e) = controllers {
            if pod_proxy.is_none() {
                return Some(Outcome::failed(
                    Reason::AgentStartFailed,
                    format!("the egress proxy's address {:?} is not a URL (AGENTOPS_EGRESS_PROXY)", e.base_url),
                ));
            }
            let names: Vec<String> = self.r.egress_hosts.iter().map(|h| format!("{}:{}", h.host, h.port)).collect();
            self.say(&format!("  egress through the controller's proxy {} for {}", e.base_url, names.join(", ")));
        }
        let proxy_url = egress.as_ref().map(|(p, token)| format!("http://agent:{token}@{}", p.addr)).or(pod_proxy);
        let no_proxy = match (&egress, &route) {
            (None, Some(g)) if controllers.is_some() => {
                url::Url::parse(&g.base_url).ok().and_then(|u| u.host_str().map(String::from))
            }
            _ => None,
        };
        let agent_env = |k: &str| match (&route, k) {
            (Some(g), "ANTHROPIC_BASE_URL") => Some(g.base_url.clone()),
            (_, "HTTPS_PROXY" | "HTTP_PROXY" | "https_proxy" | "http_proxy") if proxy_url.is_some() => {
                proxy_url.clone()
            }
            (_, "NO_PROXY" | "no_proxy") if proxy_url.is_some() => no_proxy.clone(),
            _ => env(k),
        };
        // The team's configuration: files in the agent's private HOME, never in the checkout.
        // Remote MCP servers: the gateway's route for them, with the agent's own token.
        let mcp_route = route.as_ref().map(|g| agent::config::McpRoute {
            base_url: format!("{}/mcp", g.base_url.trim_end_matches('/')),
            token: g.token.clone(),
        });
        if let Err(e) = agent::config::write_files(&self.r.agent_config, &ws.home, mcp_route.as_ref()) {
            return Some(Outcome::failed(
                Reason::AgentStartFailed,
                format!("cannot write the agent's configuration into its HOME: {e}"),
            ));
        }
        let cmd = agent::build_command(
            self.r,
            &self.opts.claude_bin,
            &ws.repo,
            &ws.home,
            route.as_ref().map(|g| g.token.as_str()),
            agent_env,
        );
        let mut cmd = cmd;
        if let Some(dir) = &self.opts.bundle {
            cmd = bundle::through_loader(cmd, dir);
        }
        if let Some(policy) = &self.opts.sandbox {
            let mut protected = policy.protected.clone();
            protected.push(self.opts.secrets_dir.clone());
            let model_url = agent_env("ANTHROPIC_BASE_URL");
            let mut ports = agent_ports(model_url.as_deref(), &self.r.egress);
            ports.extend(egress.as_ref().map(|(p, _)| p.addr.port()));
            ports.extend(
                controllers.and_then(|e| url::Url::parse(&e.base_url).ok()).and_then(|u| u.port_or_known_default()),
            );
            // The bundle's loader and libraries start the CLI: the agent may read (and run)
            // them; they are the operator's binaries, nothing secret.
            let mut extra_read = policy.extra_read.clone();
            extra_read.extend(self.opts.bundle.iter().cloned());
            cmd.sandbox = Some(
                agent::Sandbox::for_agent(
                    &ws.repo,
                    &ws.home,
                    &self.opts.claude_bin,
                    env("PATH").as_deref(),
                    &extra_read,
                    &protected,
                    &ports,
                )
                .with_udp(agent::sandbox::needs_dns(model_url.as_deref(), &ports)),
            );
            match agent::sandbox::kernel_abi() {
                None => {
                    let own = if agent::sandbox::isolation_supported() { " and namespaces of its own" } else { "" };
                    self.say(&format!(
                        "  warning: this kernel has no Landlock: the agent's files, ports and signals are not \
                         confined (its seccomp filter{own} still are; --sandbox-require refuses such a kernel)"
                    ))
                }
                Some(abi) => {
                    let isolated = agent::sandbox::isolation_supported();
                    let (_, missing) = agent::sandbox::protections(Some(abi), isolated);
                    let own = if isolated { ", namespaces of its own" } else { "" };
                    self.say(&format!("  sandbox: Landlock ABI {abi}{own}"));
                    if !missing.is_empty() {
                        self.say(&format!("  warning: this kernel's Landlock lacks: {}", missing.join("; ")));
                    }
                }
            }
        }
        let (rec, echo) = (&self.rec, self.opts.progress);
        let mut shown_tools = 0;
        let outcome =
            agent::run_agent(&cmd, self.deadline, self.r.idle_timeout, &self.cancel, |line, tally, changed| {
                rec.log("agent", line);
                if let Some(out) = stream.as_mut() {
                    // The steps after this one read the stream back (a runner pod's publish and
                    // finish containers); a write error only loses figures the gateway also has.
                    let _ = writeln!(out, "{line}");
                }
                if changed {
                    rec.progress(progress_of(tally));
                    if echo && tally.tool_calls.total != shown_tools {
                        shown_tools = tally.tool_calls.total;
                        eprintln!(
                            "  turn {} · {} tokens · ${:.4} · {} tool calls",
                            tally.num_turns(),
                            tally.usage().total(),
                            tally.cost_usd(),
                            shown_tools
                        );
                    }
                }
            })
            .await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                let bin = self.opts.claude_bin.display();
                return Some(Outcome::failed(
                    Reason::AgentStartFailed,
                    format!("cannot start the agent {bin}: {e}; install Claude Code or pass --claude-bin"),
                ));
            }
        };
        if !outcome.stderr_tail.trim().is_empty() {
            for line in outcome.stderr_tail.lines() {
                self.rec.log("agent-stderr", line);
            }
        }
        if let Some(t) = egress.as_ref().and_then(|(p, token)| p.close(token)) {
            let e = egress_summary(&t);
            let refused = if e.refused_hosts.is_empty() {
                String::new()
            } else {
                format!(" (refused: {})", e.refused_hosts.join(", "))
            };
            self.say(&format!(
                "  egress: {} connections, {} refused{refused}; {} bytes out, {} in",
                e.connections, e.refused, e.bytes_out, e.bytes_in
            ));
            self.egress = Some(e);
            for c in t.refusals.iter() {
                self.rec
                    .log("egress", &format!("refused {}:{}: {}", c.host, c.port, c.refused.as_deref().unwrap_or("")));
            }
        }
        self.say(&format!(
            "  agent stopped after {} ms ({:?}): {} turns, {} tool calls, {} tokens, ${:.4}",
            outcome.duration.as_millis(),
            outcome.stop,
            outcome.tally.num_turns(),
            outcome.tally.tool_calls.total,
            outcome.tally.usage().total(),
            outcome.tally.cost_usd()
        ));
        self.tally = outcome.tally;
        if let Some(g) = gateway {
            // The run is over for the model: the agent's token stops working now. Answers still
            // streaming from the upstream are metered to their end first (bounded).
            g.close();
            // Stopped (cancel, timeout, silence): within seconds, with what is metered by then.
            let exited = matches!(outcome.stop, AgentStop::Exited(_));
            let wait = if exited { Duration::from_secs(30) } else { Duration::from_secs(2) };
            if !g.settled(wait).await {
                self.say(&format!(
                    "  warning: an answer was still streaming after {} s; the figures are those metered until then",
                    wait.as_secs()
                ));
            }
            let m = g.metered();
            self.say(&format!("  gateway: {} responses, {} tokens counted", m.responses, m.usage.total()));
            self.metered = Some(m);
        }
        self.rec.progress(progress_of(&self.tally));
        self.judge_agent(&outcome.stop, &outcome.stderr_tail).or_else(|| self.judge_output())
    }

    /// With `spec.agent.outputSchema`: the run fails unless the agent's structured output
    /// follows it (checked before anything is committed).
    fn judge_output(&self) -> Option<Outcome> {
        let schema = self.r.output_schema.as_ref()?;
        let given = self.tally.result.as_ref().and_then(|r| r.structured_output.as_ref());
        crate::api::output::judge_output(schema, given).err().map(|(reason, message)| Outcome::failed(reason, message))
    }

    /// Commit and push the work on top of `base`.
    async fn publish_part(&mut self, base: &Base) -> Outcome {
        let Some(ws) = self.ws.clone() else {
            return Outcome::failed(Reason::InternalError, "publish without a workspace");
        };
        let base_oid = match git2::Oid::from_str(&base.commit) {
            Ok(o) => o,
            Err(e) => return Outcome::failed(Reason::CommitFailed, format!("base commit {:?}: {e}", base.commit)),
        };
        // Collect, commit and push from the operator's own repository: nothing the agent wrote
        // in .git/ or a HOME is read (see git::Publish).
        let base_ref = base.source_ref.clone();
        let url = self.git_url.clone();
        let prepared = {
            let (workdir, gitdir, base, creds, abort) =
                (ws.repo.clone(), ws.root.join("publish.git"), base_oid, self.secrets.git.clone(), self.abort.clone());
            let index = self.private_dir(&ws).join(CLONE_INDEX);
            tokio::task::spawn_blocking(move || -> Result<_, GitError> {
                let publish = git::Publish::prepare(&workdir, &gitdir, base, &url, &base_ref, creds.as_ref(), &abort)?
                    .with_stat_cache(&index);
                let staged = publish.stage()?;
                Ok((publish, staged))
            })
            .await
        };
        let (publish, staged) = match prepared {
            Ok(Ok((p, Some(s)))) => (p, s),
            Ok(Ok((_, None))) => {
                self.say("  no changes: nothing to commit");
                return Outcome::new(
                    Phase::Succeeded,
                    Reason::NoChanges,
                    "the agent changed nothing; no commit, no push",
                );
            }
            Ok(Err(e)) => return Outcome::failed(Reason::CommitFailed, e.to_string()),
            Err(e) => return Outcome::failed(Reason::CommitFailed, format!("commit task failed: {e}")),
        };
        // The text diff, and the binary files it leaves out (read as text: a token is ASCII).
        let in_binary =
            match publish.any_binary(&staged, |bytes| self.redactor.finds_secret(&String::from_utf8_lossy(bytes))) {
                Ok(found) => found,
                Err(e) => return Outcome::failed(Reason::CommitFailed, format!("cannot read the changed files: {e}")),
            };
        if self.redactor.finds_secret(&staged.patch) || in_binary {
            return Outcome::failed(
                Reason::SecretInChanges,
                "the agent's changes contain a credential (git token or API key, plain or encoded); nothing was committed or pushed",
            );
        }
        self.git.changed_files = staged.stats.changed_files;
        self.git.insertions = staged.stats.insertions;
        self.git.deletions = staged.stats.deletions;
        self.diff = Some(staged.patch.clone());
        let skipped = staged.note();
        if !skipped.is_empty() {
            self.say(&format!("  note: {}", skipped.trim_start_matches("; ")));
        }
        let publish = std::sync::Arc::new(std::sync::Mutex::new(publish));
        let committed = {
            let (publish, r) = (publish.clone(), self.r.clone());
            tokio::task::spawn_blocking(move || -> Result<git2::Oid, GitError> {
                let sig = git2::Signature::now(&r.author.name, &r.author.email)?;
                let p = publish.lock().map_err(|_| GitError::Other(git2::Error::from_str("publish lock")))?;
                p.commit(&staged, &r.branch, &sig, &r.commit_message)
            })
            .await
        };
        let oid = match committed {
            Ok(Ok(oid)) => oid,
            Ok(Err(e)) => return Outcome::failed(Reason::CommitFailed, e.to_string()),
            Err(e) => return Outcome::failed(Reason::CommitFailed, format!("commit task failed: {e}")),
        };
        self.git.commit = Some(oid.to_string());
        self.unpushed = true;
        self.say(&format!(
            "  committed {} ({} files, +{} -{})",
            &oid.to_string()[..12],
            self.git.changed_files,
            self.git.insertions,
            self.git.deletions
        ));
        if !self.r.push {
            self.unpushed = false;
            return Outcome::new(
                Phase::Succeeded,
                Reason::Committed,
                "committed; push is disabled (spec.git.push: false)",
            );
        }
        if let Some(o) = self.stopped() {
            return o;
        }

        // Push: refs/heads/<branch> to spec.repository.url, nothing else anywhere else. A
        // transient failure is retried with backoff for up to a minute: the host (or the
        // controller's relay) unreachable or answering 5xx, and through the relay a 401 (right
        // after a controller restart it does not know the execution yet). A rejection is final.
        let (first_try, mut delay) = (Instant::now(), Duration::from_secs(1));
        let pushed = loop {
            let (publish, r, creds, abort, url) =
                (publish.clone(), self.r.clone(), self.secrets.git.clone(), self.abort.clone(), self.git_url.clone());
            let pushed = tokio::task::spawn_blocking(move || -> Result<(), GitError> {
                let p = publish.lock().map_err(|_| GitError::Other(git2::Error::from_str("publish lock")))?;
                p.push(&url, &r.branch, creds.as_ref(), &abort)
            })
            .await;
            let transient = match &pushed {
                Ok(Err(GitError::Unreachable { .. })) => true,
                Ok(Err(GitError::Auth { .. } | GitError::AuthRequired { .. })) => self.opts.git_relay.is_some(),
                _ => false,
            };
            if !transient || first_try.elapsed() + delay > PUSH_RETRY_FOR || self.stopped().is_some() {
                break pushed;
            }
            if let Ok(Err(e)) = &pushed {
                self.say(&format!("  push failed ({e}); trying again in {} s", delay.as_secs()));
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.cancel.cancelled() => {}
            }
            delay = (delay * 2).min(Duration::from_secs(15));
        };
        match pushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let reason = match e {
                    GitError::PushRejected { .. } => Reason::PushRejected,
                    GitError::BranchExists { .. } => Reason::BranchExists,
                    _ => Reason::PushFailed,
                };
                let keep = format!("{e}; the commit is kept in {}", ws.root.join("publish.git").display());
                return self.stopped().unwrap_or_else(|| Outcome::failed(reason, keep));
            }
            Err(e) => return Outcome::failed(Reason::PushFailed, format!("push task failed: {e}")),
        }
        self.git.pushed = true;
        self.unpushed = false;
        self.say(&format!("  pushed {} to {}", self.r.branch, self.r.repo_url));
        Outcome::new(
            Phase::Succeeded,
            Reason::Completed,
            format!("pushed {} to {}{skipped}", self.r.branch, self.r.repo_url),
        )
    }

    /// Maps how the agent stopped (and its result line) to an outcome; None means go on.
    fn judge_agent(&self, stop: &AgentStop, stderr: &str) -> Option<Outcome> {
        let t = &self.tally;
        match stop {
            AgentStop::Cancelled | AgentStop::TimedOut => self.stopped(),
            AgentStop::Idle => {
                let idle = humantime::format_duration(self.r.idle_timeout);
                Some(Outcome::failed(
                    Reason::AgentIdle,
                    format!("the agent printed nothing for {idle} and was stopped (spec.agent.idleTimeout)"),
                ))
            }
            AgentStop::Exited(code) => {
                let Some(res) = &t.result else {
                    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
                    let code = code.map_or_else(|| "a signal".to_string(), |c| format!("status {c}"));
                    return Some(Outcome::failed(
                        Reason::AgentCrashed,
                        format!("the agent exited with {code} without a result: {}", self.redactor.redact(last)),
                    ));
                };
                if !res.is_error && res.subtype == "success" {
                    return None;
                }
                let text = res.text.as_deref().unwrap_or_default();
                // The agent's word, so bounded and shown clean (it lands in the status and the
                // publish step's termination message, which a node cuts at 3 KiB).
                let subtype = clean(&truncate(&res.subtype, 64)).into_owned();
                let text = &clean(&truncate(text, 300)).into_owned();
                Some(match subtype.as_str() {
                    s if s.contains("structured_output") => Outcome::failed(
                        Reason::InvalidOutput,
                        format!(
                            "the agent did not give output that follows spec.agent.outputSchema ({s}): {}",
                            self.redactor.redact(&truncate(text, 300))
                        ),
                    ),
                    "error_max_turns" => Outcome::failed(
                        Reason::MaxTurns,
                        format!(
                            "the agent used its {} turns (spec.agent.maxTurns) before finishing; nothing was pushed",
                            self.r.max_turns.unwrap_or_default()
                        ),
                    ),
                    s if s.contains("budget") => Outcome::failed(
                        Reason::BudgetExceeded,
                        format!(
                            "the agent reached spec.agent.maxBudgetUsd (${}); nothing was pushed",
                            self.r.max_budget_usd.unwrap_or_default()
                        ),
                    ),
                    _ if text.contains(crate::gateway::TURNS_SPENT) => Outcome::failed(
                        Reason::MaxTurns,
                        format!(
                            "the agent's requests passed the gateway's backstop of spec.agent.maxTurns ({}): {}; nothing was pushed",
                            self.r.max_turns.unwrap_or_default(),
                            self.redactor.redact(&truncate(text, 300))
                        ),
                    ),
                    _ if text.contains(crate::gateway::TEAM_BUDGET_SPENT) => Outcome::failed(
                        Reason::BudgetExhausted,
                        format!(
                            "the namespace's team budget is spent for this period and the operator's gateway refused the next request; nothing was pushed: {}",
                            self.redactor.redact(&truncate(text, 300))
                        ),
                    ),
                    _ if text.contains(crate::gateway::BUDGET_SPENT) => Outcome::failed(
                        Reason::BudgetExceeded,
                        format!(
                            "the run spent spec.agent.maxBudgetUsd (${}) and the operator's gateway refused the next request; nothing was pushed",
                            self.r.max_budget_usd.unwrap_or_default()
                        ),
                    ),
                    _ if res.api_error_status.is_some() => Outcome::failed(
                        Reason::ApiError,
                        format!(
                            "the Anthropic API failed with HTTP {} after {} retries: {}",
                            res.api_error_status.unwrap_or_default(),
                            t.api_retries,
                            self.redactor.redact(&truncate(text, 300))
                        ),
                    ),
                    s => Outcome::failed(
                        Reason::AgentError,
                        format!("the agent ended with {s}: {}", self.redactor.redact(&truncate(text, 300))),
                    ),
                })
            }
        }
    }

    /// Runs the hooks of one phase in order; stops at the first failure.
    async fn hooks(&mut self, phase: &str, outcome: &Outcome) -> Result<(), HookError> {
        let list = match phase {
            "pre" => &self.r.pre_hooks,
            "post" => &self.r.post_hooks,
            _ => &self.r.error_hooks,
        };
        let Some(ws) = self.ws.clone() else {
            return Ok(());
        };
        if list.is_empty() {
            return Ok(());
        }
        let context = serde_json::json!({
            "phase": phase,
            "execution": {"id": self.id, "name": self.r.name, "namespace": self.r.namespace,
                          "worker": self.r.worker, "workItem": self.r.work_item},
            "prompt": self.r.prompt,
            "repository": {"url": self.r.repo_url, "ref": self.r.git_ref, "branch": self.r.branch},
            "workspace": ws.repo,
            "outcome": (phase != "pre").then(|| serde_json::json!({
                "phase": outcome.phase, "reason": outcome.reason, "message": self.redactor.redact(&outcome.message)})),
            "summary": (phase != "pre").then(|| self.summary(outcome)),
        });
        let home = match fresh_hook_home(&ws) {
            Ok(h) => h,
            Err(e) => {
                let name = list.first().map(|h| h.name.clone()).unwrap_or_default();
                let e = HookError::Start { name, message: format!("cannot make the hooks' HOME: {e}") };
                self.hook_failure = Some(e.to_string());
                return Err(e);
            }
        };
        let sandbox = self.opts.sandbox.as_ref().map(|policy| {
            let mut protected = policy.protected.clone();
            protected.push(self.opts.secrets_dir.clone());
            let ports: Vec<u16> = self.r.egress.iter().flat_map(|e| e.ports.iter().copied()).collect();
            let path = std::env::var("PATH").ok();
            agent::Sandbox::for_agent(
                &ws.repo,
                &home,
                &self.opts.claude_bin,
                path.as_deref(),
                &policy.extra_read,
                &protected,
                &ports,
            )
            .with_udp(agent::sandbox::needs_dns(None, &ports))
        });
        for hook in list {
            let source = format!("hook:{phase}:{}", hook.name);
            self.say(&format!("  hook {phase} {}", hook.name));
            let env =
                hooks::HookEnv { cwd: &ws.repo, home: &home, phase, execution_id: &self.id, sandbox: sandbox.as_ref() };
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            let mut h = hook.clone();
            if phase == "pre" {
                h.timeout = h.timeout.min(remaining.max(std::time::Duration::from_millis(1)));
            }
            let rec = &self.rec;
            let res = tokio::select! {
                r = hooks::run_hook(&h, &context, &env, |l| rec.log(&source, &l)) => r,
                _ = self.cancel.cancelled(), if phase == "pre" => Err(HookError::Timeout { name: h.name.clone(), secs: 0 }),
            };
            if let Err(e) = res {
                self.rec.log(&source, &e.to_string());
                self.hook_failure = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    fn summary(&self, o: &Outcome) -> Summary {
        let (start_time, started) = (self.start_time.as_str(), self.started);
        let t = &self.tally;
        // Counted by the operator when the gateway relayed the run: usage, cost, turns, tools and
        // the model are the gateway's, never the agent's stream (which anything in the sandbox
        // can write into). Without a gateway (none relayed anything), as the agent reports.
        let metered = self.metered.as_ref().filter(|m| m.responses > 0);
        let usage = metered.map_or_else(|| t.usage(), |m| m.usage);
        let cost_usd = metered.map_or_else(|| t.cost_usd(), |m| m.cost_usd);
        // Only output that follows the schema is ever reported (the run failed otherwise).
        let output = self.r.output_schema.as_ref().and_then(|schema| {
            crate::api::output::judge_output(schema, t.result.as_ref().and_then(|r| r.structured_output.as_ref())).ok()
        });
        let result = t.result.as_ref().and_then(|r| r.text.clone()).or_else(|| t.last_text.clone());
        Summary {
            id: self.id.clone(),
            name: self.r.name.clone(),
            namespace: self.r.namespace.clone(),
            phase: o.phase,
            reason: Some(o.reason.clone()),
            message: Some(clean(&self.redactor.redact(&o.message)).into_owned()).filter(|m| !m.is_empty()),
            start_time: Some(start_time.to_string()).filter(|s| !s.is_empty()),
            completion_time: Some(now()),
            duration_ms: started.elapsed().as_millis() as u64,
            tokens_used: usage.total(),
            usage,
            cost_usd,
            num_turns: metered.map_or_else(|| t.num_turns(), |m| m.turns),
            // Names the model made up stay out of terminals and the status: odd ones are `other`.
            tool_calls: metered.map_or_else(|| t.tool_calls.clone(), |m| m.tool_calls.clone()).bounded(usize::MAX),
            session_id: t.session_id.clone(),
            result: result.map(|r| clean(&self.redactor.redact(&truncate(&r, RESULT_LIMIT))).into_owned()),
            output,
            model: match metered {
                Some(m) => m.model.clone(),
                None => t.model.clone(),
            }
            .or_else(|| self.r.model.clone()),
            api_retries: t.api_retries,
            git: self.git.clone(),
            workspace: self.ws.as_ref().map(|w| w.root.to_string_lossy().into_owned()),
            agent_config: Some(self.r.agent_config.record()),
            mcp_requests: self.metered.as_ref().map(|m| m.mcp_requests.clone()).unwrap_or_default(),
            permission_denials: t.result.as_ref().map_or(0, |r| r.permission_denials),
            egress: self.egress.clone(),
        }
    }
}

/// The hooks' HOME: `hook-home/` beside the checkout, emptied and made again before each phase,
/// so nothing the agent (or an earlier hook) left there is read (a symlink planted in its place
/// is removed, not followed).
fn fresh_hook_home(ws: &Workspace) -> std::io::Result<PathBuf> {
    let home = ws.root.join("hook-home");
    match std::fs::symlink_metadata(&home) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&home)?,
        Ok(_) => std::fs::remove_file(&home)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&home)?;
    }
    std::fs::create_dir(home.join("tmp"))?;
    Ok(home)
}

use crate::api::text::clean;

fn progress_of(t: &Tally) -> Progress {
    Progress {
        usage: t.usage(),
        cost_usd: t.cost_usd(),
        num_turns: t.num_turns(),
        tool_calls: t.tool_calls.clone(),
        session_id: t.session_id.clone(),
    }
}
