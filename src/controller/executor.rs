//! Where the runner of an execution runs: a Kubernetes Job (the default), or a child process
//! on the controller's machine (`--executor local`, for single-node installs and end-to-end
//! tests without a kubelet). Both report the runner's JSON summary at the end: the Job through
//! its pod's termination message, the child through its stdout.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::Resource;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::desired::{self, JobConfig};
use super::jobstate::JobState;
use super::ledger::{self, Ledger, LocalRun};
use super::reconcile::{Error, FIELD_MANAGER, delete_ignoring_missing};
use super::reports::{Reports, new_token, owned_by};
use crate::api::Summary;
use crate::api::contract;
use crate::api::{AgentExecution, Resolved};

/// What the controller can see of an execution's runner.
#[derive(Debug, Clone)]
pub enum Observation {
    /// No runner exists.
    NotStarted,
    /// The runner exists but may not start yet: its Job is suspended until Kueue admits it.
    Suspended,
    /// The runner is working; `progress` holds its latest figures when it reports them.
    Running { progress: Option<Summary> },
    /// The runner ended; `summary` is its report, when it could deliver one, and `cause` its
    /// own last words when it could not (an error line, a termination message).
    Finished { summary: Option<Summary>, failed: bool, deadline_exceeded: bool, cause: Option<String> },
}

/// The longest cause of a runner failure kept for the status message.
const CAUSE_LIMIT: usize = 1024;

/// The two ways of running the runner.
pub enum Executor {
    /// Kubernetes Jobs; `jobs` are the controller's watch caches of them, `ledger` says which
    /// this process just created.
    Job {
        jobs: Vec<kube::runtime::reflector::Store<JobState>>,
        ledger: Arc<Ledger>,
    },
    Local(LocalExecutor),
}

impl Executor {
    /// Name of the runner (the Job's name, also used for the local process).
    pub fn runner_name(&self, ax: &AgentExecution) -> String {
        desired::job_name(ax)
    }

    /// Looks at the runner, with every report it has: the termination message or the child's
    /// output, merged with the report channel (progress while it runs; the final report when
    /// the other way lost it). Reconcile never looks anywhere else.
    pub async fn observe(&self, client: &Client, ax: &AgentExecution, reports: &Reports) -> Result<Observation, Error> {
        let (ns, name) = super::context::key(ax);
        let uid = ledger::uid(ax);
        let (observed, words) = match self {
            Executor::Job { jobs, ledger } => observe_job(client, ax, jobs, ledger).await?,
            Executor::Local(l) => (l.observe(ax), PodWords::default()),
        };
        let pod = matches!(self, Executor::Job { .. });
        // The operator's own count (the gateway's) is the usage; the runner's report adds what
        // only it knows (result, git, workspace).
        let metered = reports.metered(&ns, &name);
        // What the egress proxy counted, likewise the operator's own figure.
        let egress = reports.egress(&ns, &name);
        // Turns, tools and the model too: what a pod's steps say of them is the agent's word
        // (its stream, which anything in its container can write into).
        let counted = |mut s: Summary| {
            if let Some(m) = &metered {
                s.usage = m.usage;
                s.tokens_used = m.usage.total();
                s.cost_usd = m.cost_usd;
                s.num_turns = m.turns;
                s.tool_calls = m.tool_calls.clone();
                s.model = m.model.clone().or(s.model);
                s.mcp_requests = m.mcp_requests.clone();
            }
            if egress.is_some() {
                s.egress = egress.clone();
            }
            s
        };
        let latest = || reports.latest(&uid);
        Ok(match observed {
            Observation::Running { progress } => {
                let running = || {
                    if metered.is_some() {
                        return Some(Summary { phase: crate::api::Phase::Running, ..Default::default() });
                    }
                    // Egress counted before the gateway metered anything (or after a restart, with
                    // its figures not yet counted again): the status's own figures stand.
                    egress.as_ref()?;
                    let st = ax.status.clone().unwrap_or_default();
                    Some(Summary {
                        phase: crate::api::Phase::Running,
                        usage: st.usage,
                        tokens_used: st.tokens_used,
                        cost_usd: st.cost_usd,
                        num_turns: st.num_turns,
                        tool_calls: st.tool_calls,
                        session_id: st.session_id,
                        ..Default::default()
                    })
                };
                Observation::Running { progress: progress.or_else(latest).or_else(running).map(counted) }
            }
            Observation::Finished { summary, failed, deadline_exceeded, cause } if pod => {
                // Each step's word on what it can know (see `verdict`): the publish step's report,
                // the relay's record, the finish step's message and exit status.
                let reported = latest();
                let publish = words.publish.or_else(|| reported.clone().filter(|s| s.phase.is_terminal()));
                let relay = reports.relay_pushed(&ns, &name);
                let summary = super::verdict::judge(summary, words.finish_exit, publish, relay).map(|mut s| {
                    // What only the publish step's report had room for (the termination message
                    // may have cut it): the structured output, the final text, every tool's count.
                    if let Some(l) = reported {
                        s.output = s.output.or(l.output);
                        if l.result.as_ref().is_some_and(|r| r.len() >= s.result.as_ref().map_or(0, |t| t.len())) {
                            s.result = l.result;
                        }
                        if l.tool_calls.total >= s.tool_calls.total && l.tool_calls.total > 0 {
                            s.tool_calls = l.tool_calls;
                        }
                    }
                    counted(s)
                });
                Observation::Finished { summary, failed, deadline_exceeded, cause }
            }
            Observation::Finished { summary, failed, deadline_exceeded, cause } => {
                let summary = summary.or_else(|| latest().filter(|s| s.phase.is_terminal())).map(|mut s| {
                    // What git did is the publish step's word, sent before the hooks of `finish`
                    // ran (they run commands over the agent's workspace, beside that termination log).
                    if let Some(git) = latest().map(|l| l.git).filter(|g| g.commit.is_some() || g.pushed) {
                        s.git = git;
                    }
                    // The structured output, when the termination message had no room for it.
                    if s.output.is_none() {
                        s.output = latest().and_then(|l| l.output);
                    }
                    counted(s)
                });
                Observation::Finished { summary, failed, deadline_exceeded, cause }
            }
            other => other,
        })
    }

    /// Starts the runner (idempotent: an existing Job is adopted, never duplicated).
    pub async fn start(
        &self,
        client: &Client,
        ax: &AgentExecution,
        r: &Resolved,
        manifest: &str,
        cfg: &JobConfig,
        reports: &Reports,
    ) -> Result<(), Error> {
        match self {
            Executor::Job { .. } => {
                let ns = ax.namespace().unwrap_or_else(|| "default".into());
                let pp = PatchParams::apply(FIELD_MANAGER).force();
                // One Secret owned by the execution holds what the pod is given: the manifest
                // (the prompt may be private) and the runner's tokens (reports, the model
                // gateway, the git relay); each container mounts only its own keys.
                let egress = reports.serves_egress() && !r.egress_hosts.is_empty();
                let tokens = create_runner_secret(client, ax, &ns, manifest, cfg.report_url.is_some(), egress).await?;
                if let Some(tokens) = tokens {
                    tokens.open(reports, ax, r).await?;
                }
                if let Some(policy) = desired::desired_network_policy(ax, r) {
                    let api: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
                        Api::namespaced(client.clone(), &ns);
                    api.patch(&desired::egress_policy_name(ax), &pp, &Patch::Apply(&policy)).await?;
                }
                if let Some(pvc) = desired::desired_pvc(ax, cfg) {
                    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
                    api.patch(&pvc.name_any(), &pp, &Patch::Apply(&with_type(&pvc, "v1", "PersistentVolumeClaim")))
                        .await?;
                }
                let job = desired::desired_job(ax, r, cfg);
                let api: Api<Job> = Api::namespaced(client.clone(), &ns);
                api.patch(&job.name_any(), &pp, &Patch::Apply(&with_type(&job, "batch/v1", "Job"))).await?;
                Ok(())
            }
            Executor::Local(l) => l.start(client, ax, r, manifest, reports).await,
        }
    }

    /// Stops the runner. The local runner is given a few seconds to report its partial usage.
    pub async fn stop(&self, client: &Client, ax: &AgentExecution) -> Result<Option<Summary>, Error> {
        match self {
            Executor::Job { .. } => {
                let api: Api<Job> =
                    Api::namespaced(client.clone(), &ax.namespace().unwrap_or_else(|| "default".into()));
                delete_ignoring_missing(&api, &desired::job_name(ax)).await?;
                Ok(None)
            }
            Executor::Local(l) => Ok(l.stop(ax).await),
        }
    }
}

/// Opens the gateway account and git route of a running execution this process did not start
/// (after a restart), with the tokens in its runner Secret, unless they were retired.
pub async fn reopen(client: &Client, ax: &AgentExecution, r: &Resolved, reports: &Reports) -> Result<bool, Error> {
    let ns = ax.namespace().unwrap_or_else(|| "default".into());
    let tokens = runner_tokens(client, ax, &ns).await?;
    if tokens.model.as_deref().is_some_and(|t| reports.model_retired(t)) {
        return Ok(false);
    }
    // Only what is not open: an open account is never replaced (that would drop the holds of
    // its requests in flight, its in-flight bound and the figures of answers being metered).
    let (ns, name) = super::context::key(ax);
    let (model, git, egress) = reports.open_routes(&ns, &name);
    let tokens = RunnerTokens {
        model: tokens.model.filter(|_| !model),
        git: tokens.git.filter(|_| !git),
        egress: tokens.egress.filter(|_| !egress),
        ..tokens
    };
    tokens.open(reports, ax, r).await?;
    Ok(true)
}

/// The tokens of one execution's runner pod.
struct RunnerTokens {
    report: String,
    model: Option<String>,
    /// The git relay's tokens (clone: fetch; publish: push the work branch).
    git: Option<(String, String)>,
    /// The egress proxy's token (an execution with `egressHosts`).
    egress: Option<String>,
    /// The agent's configuration in the Secret's manifest, as the runner runs it (None: the
    /// manifest just written, the same as the resolved spec).
    frozen: Option<crate::api::AgentConfig>,
}

impl RunnerTokens {
    /// Opens what the controller serves this execution's pod: the model gateway, the git relay.
    async fn open(&self, reports: &Reports, ax: &AgentExecution, r: &Resolved) -> Result<(), Error> {
        let (ns, name) = super::context::key(ax);
        reports.remember(&ledger::uid(ax), &self.report);
        if let Some(model) = &self.model {
            // What the status already records was spent (a restart, or a new leader, never
            // resets a budget); a fresh execution's status records nothing.
            let st = ax.status.clone().unwrap_or_default();
            // Its remote MCP servers are those its runner was given, not the template's today.
            let frozen = self.frozen.as_ref().map(|c| Resolved { agent_config: c.clone(), ..r.clone() });
            reports
                .open_model(&ns, &name, frozen.as_ref().unwrap_or(r), model, (st.usage, st.cost_usd, st.num_turns))
                .await?;
        }
        if let Some((clone, publish)) = &self.git {
            reports.open_git(&ns, &name, r, clone, publish).await?;
        }
        if let Some(egress) = &self.egress {
            // What the status already records was counted (a restart keeps the figures).
            let counted = ax.status.as_ref().and_then(|s| s.egress.as_ref());
            reports.open_egress(&ns, &name, r, egress, counted);
        }
        Ok(())
    }
}

/// The runner tokens a runner Secret holds (None: it holds none, only the manifest).
fn tokens_in(secret: Secret) -> Option<RunnerTokens> {
    use super::reports::{
        EGRESS_TOKEN_KEY, GIT_CLONE_TOKEN_KEY, GIT_PUBLISH_TOKEN_KEY, MODEL_TOKEN_KEY, REPORT_TOKEN_KEY,
    };
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let frozen = get(desired::MANIFEST_KEY)
        .and_then(|m| crate::api::parse_manifest(&m).ok())
        .and_then(|m| crate::api::resolve(&m.execution, &m.templates).ok())
        .map(|r| r.agent_config);
    get(REPORT_TOKEN_KEY).map(|report| RunnerTokens {
        report,
        model: get(MODEL_TOKEN_KEY),
        git: get(GIT_CLONE_TOKEN_KEY).zip(get(GIT_PUBLISH_TOKEN_KEY)),
        egress: get(EGRESS_TOKEN_KEY),
        frozen,
    })
}

/// The tokens in the execution's runner Secret (after a restart).
async fn runner_tokens(client: &Client, ax: &AgentExecution, ns: &str) -> Result<RunnerTokens, Error> {
    let name = desired::runner_secret_name(ax);
    let secret = Api::<Secret>::namespaced(client.clone(), ns).get_opt(&name).await?;
    let secret = secret.ok_or_else(|| Error::Executor(format!("Secret {name} is gone")))?;
    tokens_in(ours(secret, ax)?).ok_or_else(|| Error::Executor(format!("Secret {name} has no token")))
}

/// Creates the execution's runner Secret: the manifest and, when `tokens`, fresh tokens (which
/// it returns). One that exists (a restart, a concurrent start) is used when it is this
/// execution's: the spec is immutable, so it holds the same manifest.
async fn create_runner_secret(
    client: &Client,
    ax: &AgentExecution,
    ns: &str,
    manifest: &str,
    tokens: bool,
    egress: bool,
) -> Result<Option<RunnerTokens>, Error> {
    use super::reports::{
        EGRESS_TOKEN_KEY, GIT_CLONE_TOKEN_KEY, GIT_PUBLISH_TOKEN_KEY, MODEL_TOKEN_KEY, REPORT_TOKEN_KEY,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = desired::runner_secret_name(ax);
    let fresh = tokens.then(|| RunnerTokens {
        report: new_token(),
        model: Some(crate::gateway::new_token()),
        git: Some((new_token(), new_token())),
        egress: egress.then(crate::gateway::new_token),
        frozen: None,
    });
    let mut data = serde_json::json!({desired::MANIFEST_KEY: manifest});
    if let Some(t) = &fresh {
        data[REPORT_TOKEN_KEY] = t.report.clone().into();
        data[MODEL_TOKEN_KEY] = t.model.clone().into();
        if let Some((clone, publish)) = &t.git {
            data[GIT_CLONE_TOKEN_KEY] = clone.clone().into();
            data[GIT_PUBLISH_TOKEN_KEY] = publish.clone().into();
        }
        if let Some(egress) = &t.egress {
            data[EGRESS_TOKEN_KEY] = egress.clone().into();
        }
    }
    let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "ownerReferences": ax.controller_owner_ref(&()).map(|o| vec![o]),
                     "labels": {"app.kubernetes.io/managed-by": "agentops"}},
        "type": "Opaque", "stringData": data});
    // Create (not apply): the controller's Role grants `create` on Secrets, not `patch`. When it
    // exists, the answer is 409: read that one. Creating first spares a read on every start.
    let secret: Secret = serde_json::from_value(secret).map_err(|e| Error::Executor(format!("runner Secret: {e}")))?;
    match secrets.create(&kube::api::PostParams::default(), &secret).await {
        Ok(_) => Ok(fresh),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = ours(secrets.get(&name).await?, ax)?;
            if !tokens {
                return Ok(None);
            }
            tokens_in(existing).map(Some).ok_or_else(|| Error::Executor(format!("Secret {name} has no token")))
        }
        Err(e) => Err(e.into()),
    }
}

/// The object, when the execution owns it. A deleted execution's children go by garbage
/// collection, which takes a moment: an execution re-created under the same name meanwhile
/// must not run with the old one's manifest or tokens. The reconcile is retried (the error
/// says why) and finds the name free once they are collected.
fn ours<K: kube::Resource>(obj: K, ax: &AgentExecution) -> Result<K, Error> {
    if ax.metadata.uid.as_deref().is_some_and(|uid| owned_by(&obj, uid)) {
        return Ok(obj);
    }
    Err(Error::Executor(format!(
        "{} belongs to a deleted AgentExecution of the same name; it starts once that one's objects are garbage-collected",
        obj.meta().name.as_deref().unwrap_or_default()
    )))
}

/// How long a Job this process created is taken as there while its watch has not shown it.
const JUST_STARTED: Duration = Duration::from_secs(60);

/// How long a reconcile waits for the Job watch's first full list before asking the API server.
const SYNC_WAIT: Duration = Duration::from_secs(30);

/// Whether a watch cache has listed everything once.
fn synced(cache: &kube::runtime::reflector::Store<JobState>) -> bool {
    use futures::FutureExt;
    matches!(cache.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// Whether the execution's status says a runner was started (by this process or another).
fn ever_started(ax: &AgentExecution) -> bool {
    ax.status.as_ref().is_some_and(|s| s.job_name.is_some() || s.phase == crate::api::Phase::Running)
}

fn with_type<T: serde::Serialize>(obj: &T, api_version: &str, kind: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    v
}

/// What a finished runner pod's steps said beside the finish step's report.
#[derive(Default)]
struct PodWords {
    /// The finish container's exit status.
    finish_exit: Option<i32>,
    /// The publish step's report, its own termination message.
    publish: Option<Summary>,
}

/// The runner Job's state, and what its steps said once it ended.
async fn observe_job(
    client: &Client,
    ax: &AgentExecution,
    caches: &[kube::runtime::reflector::Store<JobState>],
    ledger: &Ledger,
) -> Result<(Observation, PodWords), Error> {
    let ns = ax.namespace().unwrap_or_else(|| "default".into());
    let name = desired::job_name(ax);
    let jobs = Api::<JobState>::namespaced(client.clone(), &ns);
    // The watch cache first. When it has no such Job: one this process created moments ago is
    // there (the watch lags); one the execution never had is not, once the cache has listed
    // every Job. A runner started before a restart is looked for in the cache once it has
    // listed every Job (after a restart, thousands of reconciles would otherwise each ask the
    // API server while that list is on its way); when even the listed cache lacks it, the API
    // server decides: a Job that exists must never look lost.
    let key = ObjectRef::new(&name).within(&ns);
    let cached = || caches.iter().find_map(|c| c.get(&key));
    let cached = match cached() {
        None if ever_started(ax) && !caches.iter().all(synced) => {
            for c in caches {
                let _ = tokio::time::timeout(SYNC_WAIT, c.wait_until_ready()).await;
            }
            cached()
        }
        found => found,
    };
    let job = match cached {
        Some(job) => (*job).clone(),
        None if ledger.started_within(&ledger::uid(ax), JUST_STARTED) => {
            return Ok((Observation::Running { progress: None }, PodWords::default()));
        }
        None if !ever_started(ax) && caches.iter().all(synced) => {
            return Ok((Observation::NotStarted, PodWords::default()));
        }
        None => match jobs.get_opt(&name).await? {
            Some(job) => job,
            None => return Ok((Observation::NotStarted, PodWords::default())),
        },
    };
    // Runs are matched by the execution's uid: a Job left by a deleted execution of the same
    // name is not this execution's runner (it goes, and this one starts its own).
    let owner = job.metadata.owner_references.as_ref().and_then(|o| o.iter().find(|o| o.controller == Some(true)));
    if owner.map(|o| o.uid.as_str()) != ax.metadata.uid.as_deref() {
        // The watch may still show the namesake's Job after this process replaced it with this
        // execution's own: never delete that one (the ledger knows it was just created, and the
        // delete names the old Job's uid, which the API server checks).
        if ledger.started_within(&ledger::uid(ax), JUST_STARTED) {
            return Ok((Observation::Running { progress: None }, PodWords::default()));
        }
        let dp = kube::api::DeleteParams {
            propagation_policy: Some(kube::api::PropagationPolicy::Background),
            preconditions: job
                .metadata
                .uid
                .clone()
                .map(|uid| kube::api::Preconditions { uid: Some(uid), resource_version: None }),
            ..Default::default()
        };
        match jobs.delete(&name, &dp).await {
            Ok(_) => {}
            // Gone already, or no longer that Job (a newer one of this name): nothing to delete.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok((Observation::NotStarted, PodWords::default()));
    }
    let conds = job.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    let is = |t: &str| conds.iter().find(|c| c.type_ == t && c.status == "True");
    let (failed, deadline) = match (is("Complete"), is("Failed")) {
        (Some(_), _) => (false, false),
        (None, Some(f)) => (true, f.reason.as_deref() == Some("DeadlineExceeded")),
        (None, None) if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) => {
            return Ok((Observation::Suspended, PodWords::default()));
        }
        (None, None) => return Ok((Observation::Running { progress: None }, PodWords::default())),
    };
    // The runner's report is the termination message of its last step (`finish`); when there
    // is none, the cause is the first step that failed: its own message (written by
    // `agentops step`), or the kubelet's reason.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await?;
    let statuses: Vec<_> = pods
        .items
        .iter()
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| s.init_container_statuses.iter().flatten().chain(s.container_statuses.iter().flatten()))
        .collect();
    let finish = statuses
        .iter()
        .filter(|c| c.name == crate::api::contract::Step::Finish.name())
        .find_map(|c| c.state.as_ref()?.terminated.as_ref());
    let summary = finish.and_then(|t| t.message.as_deref()).and_then(|m| serde_json::from_str::<Summary>(m).ok());
    let publish = statuses
        .iter()
        .filter(|c| c.name == crate::api::contract::Step::Publish.name())
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.as_deref())
        .and_then(|m| serde_json::from_str::<Summary>(m).ok());
    let words = PodWords { finish_exit: finish.map(|t| t.exit_code), publish };
    let cause = match &summary {
        Some(_) => None,
        None => statuses.iter().find_map(|c| {
            let state = c.state.as_ref()?;
            let said = match (&state.terminated, &state.waiting) {
                (Some(t), _) if t.exit_code != 0 || t.message.is_some() => t
                    .message
                    .clone()
                    .or_else(|| t.reason.clone())
                    .or_else(|| Some(format!("exit status {}", t.exit_code))),
                (None, Some(w)) => w.message.clone().or_else(|| w.reason.clone()),
                _ => None,
            }?;
            Some(crate::api::report::truncate(&format!("step {}: {}", c.name, said.trim()), CAUSE_LIMIT))
        }),
    };
    Ok((Observation::Finished { summary, failed, deadline_exceeded: deadline, cause }, words))
}

/// Runs `agentops runner` as child processes of the controller. Runs are keyed by the
/// execution's uid, so a new execution with an old name is a new run.
pub struct LocalExecutor {
    bin: PathBuf,
    env: Vec<(String, String)>,
    /// Where its runs are kept (the controller's ledger).
    ledger: Arc<Ledger>,
    wake: mpsc::UnboundedSender<ObjectRef<AgentExecution>>,
    /// The controller's HTTP base URL, for progress reports.
    report_base: Option<String>,
    token_dir: tempfile::TempDir,
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

fn private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Writes the keys an execution references, read from the API, as `<dir>/<secret>/<key>`
/// (0600 in 0700 directories): the runner reads the same layout as on one machine, and only
/// the referenced keys leave the API.
async fn materialize_secrets(client: &Client, ns: &str, r: &Resolved, dir: &std::path::Path) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let wanted = r
        .credentials
        .iter()
        .map(|s| (s, s.key.clone().unwrap_or_else(|| "token".into()), true))
        .chain(r.credentials.iter().map(|s| (s, "username".to_string(), false)))
        .chain(r.api_key.iter().map(|s| (s, s.key.clone().unwrap_or_else(|| "api-key".into()), true)))
        // Remote MCP servers' headers: the runner's loopback gateway adds them.
        .chain(
            r.agent_config
                .mcp_servers
                .iter()
                .flat_map(|m| &m.headers_from)
                .map(|h| (&h.secret_key_ref, h.secret_key_ref.key.clone().unwrap_or_else(|| "value".into()), true)),
        );
    for (secret, key, required) in wanted {
        let value = api.get_opt(&secret.name).await?.and_then(|s| {
            let from_data = s.data.as_ref().and_then(|d| d.get(&key)).map(|b| b.0.clone());
            from_data.or_else(|| s.string_data.as_ref().and_then(|d| d.get(&key)).map(|v| v.clone().into_bytes()))
        });
        let Some(value) = value else {
            if required {
                return Err(Error::Executor(format!("Secret {:?} has no key {key:?} in namespace {ns}", secret.name)));
            }
            continue;
        };
        let at = dir.join(&secret.name);
        private_dir(&at).map_err(|e| Error::Executor(format!("cannot write the runner's secrets: {e}")))?;
        write_private(&at.join(&key), &String::from_utf8_lossy(&value))
            .map_err(|e| Error::Executor(format!("cannot write the runner's secrets: {e}")))?;
    }
    Ok(())
}

impl LocalExecutor {
    /// `bin` is the agentops binary; `env` is added to each runner's environment (workspace
    /// root, Claude Code binary, ...). `wake` reconciles an execution whose runner ended.
    pub fn new(
        bin: PathBuf,
        env: Vec<(String, String)>,
        wake: mpsc::UnboundedSender<ObjectRef<AgentExecution>>,
        report_base: Option<String>,
        ledger: Arc<Ledger>,
    ) -> std::io::Result<Self> {
        let token_dir = tempfile::Builder::new().prefix("agentops-runs").tempdir()?;
        Ok(Self { bin, env, ledger, wake, report_base, token_dir })
    }

    fn observe(&self, ax: &AgentExecution) -> Observation {
        let seen = self.ledger.with(&ledger::uid(ax), |e| match e.local.as_deref() {
            None => Observation::NotStarted,
            Some(LocalRun { done: None, .. }) => Observation::Running { progress: None },
            Some(LocalRun { done: Some((summary, code, cause)), .. }) => Observation::Finished {
                summary: summary.clone(),
                failed: *code != 0,
                deadline_exceeded: false,
                cause: cause.clone(),
            },
        });
        seen.unwrap_or(Observation::NotStarted)
    }

    async fn start(
        &self,
        client: &Client,
        ax: &AgentExecution,
        r: &Resolved,
        manifest: &str,
        reports: &Reports,
    ) -> Result<(), Error> {
        let uid = ledger::uid(ax);
        if self.ledger.with(&uid, |e| e.local.is_some()) == Some(true) {
            return Ok(());
        }
        let ns = ax.namespace().unwrap_or_else(|| "default".into());
        let dir = self.token_dir.path().join(uid.replace('/', "_"));
        let failed = |what: &str, e: std::io::Error| Error::Executor(format!("cannot write the runner's {what}: {e}"));
        private_dir(&dir).map_err(|e| failed("files", e))?;
        // The Secrets the controller validated in the API, not files of this machine.
        let secrets_dir = dir.join("secrets");
        private_dir(&secrets_dir).map_err(|e| failed("secrets", e))?;
        materialize_secrets(client, &ns, r, &secrets_dir).await?;
        // A private file: an environment variable holds at most 128 KiB.
        let manifest_file = dir.join("manifest.yaml");
        write_private(&manifest_file, manifest).map_err(|e| failed("manifest", e))?;
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("runner").envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(base) = &self.report_base {
            // The token goes in a private file, never in the environment or argv.
            let token = new_token();
            let file = dir.join("report-token");
            write_private(&file, &token).map_err(|e| failed("report token", e))?;
            reports.remember(&uid, &token);
            cmd.env(contract::REPORT_URL, super::desired::report_url(base, ax)).env(contract::REPORT_TOKEN_FILE, &file);
        }
        let mut child = cmd
            .env(contract::MANIFEST_FILE, &manifest_file)
            .env(contract::SECRETS_DIR, &secrets_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Executor(format!("cannot start {}: {e}", self.bin.display())))?;
        self.ledger.update(&uid, |e| e.local = Some(Box::new(LocalRun { pid: child.id(), done: None, dir })));
        // The runner's stderr goes on to ours; its last lines are kept as the cause of a failure.
        let tail = child.stderr.take().map(|err| {
            tokio::spawn(async move {
                let mut kept = std::collections::VecDeque::new();
                let mut lines = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("{line}");
                    if !line.trim().is_empty() {
                        kept.push_back(crate::api::report::truncate(&line, CAUSE_LIMIT));
                        if kept.len() > 3 {
                            kept.pop_front();
                        }
                    }
                }
                kept.into_iter().collect::<Vec<_>>().join(" / ")
            })
        });
        let (runs, wake, obj) = (self.ledger.clone(), self.wake.clone(), ObjectRef::from_obj(ax));
        tokio::spawn(async move {
            let mut last = None;
            if let Some(out) = child.stdout.take() {
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(s) = serde_json::from_str::<Summary>(&line) {
                        last = Some(s);
                    }
                }
            }
            let code = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
            let cause = match tail {
                Some(t) => t.await.ok().filter(|c| !c.is_empty()),
                None => None,
            };
            // A run forgotten meanwhile (its execution deleted) stays forgotten.
            runs.with(&uid, |e| {
                if let Some(run) = e.local.as_mut() {
                    run.done = Some((last, code, cause.map(|c| crate::api::report::truncate(&c, CAUSE_LIMIT))));
                }
            });
            let _ = wake.send(obj);
        });
        Ok(())
    }

    /// SIGTERM (the runner cancels: stops the agent, keeps usage, reports), then wait for it.
    async fn stop(&self, ax: &AgentExecution) -> Option<Summary> {
        let uid = ledger::uid(ax);
        // Its report once it ended (Some(None): it ended without one).
        let ended = |e: &mut ledger::Entry| match e.local.as_deref() {
            Some(LocalRun { done: Some((s, _, _)), .. }) => Some(s.clone()),
            _ => None,
        };
        let running = |e: &mut ledger::Entry| match e.local.as_deref() {
            Some(LocalRun { pid: Some(pid), done: None, .. }) => Some(*pid),
            _ => None,
        };
        let Some(pid) = self.ledger.with(&uid, running).flatten() else {
            return self.ledger.with(&uid, ended).flatten().flatten();
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if let Some(Some(last)) = self.ledger.with(&uid, ended) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}
