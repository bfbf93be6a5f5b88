//! The cluster's `AgentPolicy`s as the controller sees them: watched with the Namespaces'
//! labels (kept in caches, so a reconcile asks the API server nothing), and each policy's
//! status (the namespaces it selects, the executions it refused) written by the leader.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

use crate::api::policy::{self, NAME_LABEL};
use crate::api::{AgentPolicy, AgentPolicyStatus};

/// How often each policy's status is looked at when nothing was refused.
const STATUS_EVERY: Duration = Duration::from_secs(15);
/// Namespaces listed by name in a policy's status (the count covers all).
const LISTED: usize = 256;

/// The policies and namespace labels, and where refusals are counted.
#[derive(Clone)]
pub struct Policies {
    policies: Store<AgentPolicy>,
    namespaces: Store<Namespace>,
    synced: Arc<AtomicBool>,
    refused: mpsc::UnboundedSender<String>,
}

/// The caches are not filled yet: a reconcile retries shortly rather than run unchecked.
#[derive(Debug)]
pub struct NotSynced;

impl Policies {
    /// No policies (tests that build a Context by hand).
    pub fn none() -> Self {
        let (policies, _) = reflector::store();
        let (namespaces, _) = reflector::store();
        Self { policies, namespaces, synced: Arc::new(AtomicBool::new(true)), refused: mpsc::unbounded_channel().0 }
    }

    /// The policies selecting namespace `ns`, by name.
    pub fn selecting(&self, ns: &str) -> Result<Vec<AgentPolicy>, NotSynced> {
        if !self.synced.load(Ordering::Relaxed) {
            return Err(NotSynced);
        }
        let all: Vec<AgentPolicy> = self.policies.state().iter().map(|p| (**p).clone()).collect();
        if all.is_empty() {
            return Ok(Vec::new());
        }
        // A namespace the watch has not seen yet (created with the execution, by GitOps) has no
        // labels here: a label selector would skip it. Wait for it rather than run unchecked.
        if all.iter().any(|p| p.spec.namespace_selector.is_some()) && self.namespaces.get(&ObjectRef::new(ns)).is_none()
        {
            return Err(NotSynced);
        }
        let labels = labels_of(&self.namespaces, ns);
        Ok(policy::selecting(&all, &labels).into_iter().cloned().collect())
    }

    /// The Namespaces' labels, as cached (shared with the team budgets).
    pub fn namespaces(&self) -> Store<Namespace> {
        self.namespaces.clone()
    }

    /// An execution was refused by `policy` (counted once per refusal: the caller tells only
    /// when the execution's status did not say so already).
    pub fn refused(&self, policy: &str) {
        let _ = self.refused.send(policy.to_string());
    }
}

/// A namespace's labels, with the name label Kubernetes always sets (also when the cache does
/// not have the namespace).
pub(crate) fn labels_of(namespaces: &Store<Namespace>, ns: &str) -> BTreeMap<String, String> {
    let mut labels = namespaces.get(&ObjectRef::new(ns)).map(|n| n.labels().clone()).unwrap_or_default();
    labels.insert(NAME_LABEL.into(), ns.into());
    labels
}

/// Starts the watches and the status writer (which writes only while `leading`). The tasks
/// end when their handles are aborted.
pub fn start(client: Client, leading: Arc<AtomicBool>) -> (Policies, Vec<tokio::task::JoinHandle<()>>) {
    let (policies, p_writer) = reflector::store();
    let (namespaces, n_writer) = reflector::store();
    let p_stream = reflector::reflector(
        p_writer,
        watcher(Api::<AgentPolicy>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|p: &mut AgentPolicy| p.managed_fields_mut().clear()),
    );
    // Only the labels of a Namespace are read: the rest is dropped before it is cached.
    let n_stream = reflector::reflector(
        n_writer,
        watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()).default_backoff().modify(
            |n: &mut Namespace| {
                n.managed_fields_mut().clear();
                n.annotations_mut().clear();
                n.spec = None;
                n.status = None;
            },
        ),
    );
    let mut tasks = vec![
        tokio::spawn(p_stream.for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "watching AgentPolicies");
            }
        })),
        tokio::spawn(n_stream.for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "watching Namespaces");
            }
        })),
    ];
    let synced = Arc::new(AtomicBool::new(false));
    {
        let (policies, namespaces, synced) = (policies.clone(), namespaces.clone(), synced.clone());
        tasks.push(tokio::spawn(async move {
            if policies.wait_until_ready().await.is_ok() && namespaces.wait_until_ready().await.is_ok() {
                synced.store(true, Ordering::Relaxed);
            }
        }));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let me =
        Policies { policies: policies.clone(), namespaces: namespaces.clone(), synced: synced.clone(), refused: tx };
    tasks.push(tokio::spawn(write_statuses(client, me.clone(), rx, leading)));
    (me, tasks)
}

/// Keeps each policy's status true: selected namespaces, refusals (counted from the value the
/// policy's status had when first seen, so a restart goes on from there).
async fn write_statuses(
    client: Client,
    p: Policies,
    mut refused: mpsc::UnboundedReceiver<String>,
    leading: Arc<AtomicBool>,
) {
    let api: Api<AgentPolicy> = Api::all(client);
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut pending: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::select! {
            got = refused.recv() => match got {
                Some(name) => *pending.entry(name).or_default() += 1,
                None => return,
            },
            _ = tokio::time::sleep(STATUS_EVERY) => {}
        }
        // Let a burst of refusals land in one write.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok(name) = refused.try_recv() {
            *pending.entry(name).or_default() += 1;
        }
        if !p.synced.load(Ordering::Relaxed) || !leading.load(Ordering::Relaxed) {
            continue;
        }
        let mut all_ns: Vec<String> = p.namespaces.state().iter().map(|n| n.name_any()).collect();
        all_ns.sort();
        for pol in p.policies.state() {
            let name = pol.name_any();
            let old = pol.status.clone().unwrap_or_default();
            let count = counts.entry(name.clone()).or_insert(old.refused);
            *count = (*count).max(old.refused) + pending.remove(&name).unwrap_or(0);
            let (selected, message) = match policy::validate(&pol) {
                Err(e) => {
                    (Vec::new(), Some(format!("{e}; this policy refuses every execution it selects until fixed")))
                }
                Ok(()) => {
                    let sel: Vec<String> = all_ns
                        .iter()
                        .filter(|ns| policy::selects(&pol, &labels_of(&p.namespaces, ns)).unwrap_or(false))
                        .cloned()
                        .collect();
                    (sel, None)
                }
            };
            let status = AgentPolicyStatus {
                namespace_count: selected.len() as u64,
                namespaces: selected.into_iter().take(LISTED).collect(),
                refused: *count,
                observed_generation: pol.metadata.generation,
                message,
            };
            if status == old {
                continue;
            }
            // Every field written, also an empty list or no message (a merge patch keeps what
            // it does not name).
            let mut value = serde_json::to_value(&status).unwrap_or_default();
            value["namespaces"] = serde_json::json!(status.namespaces);
            value["message"] = serde_json::json!(status.message);
            let patch = serde_json::json!({"status": value});
            if let Err(e) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                tracing::warn!(policy = %name, error = %e, "cannot write the AgentPolicy's status");
            }
        }
        pending.clear();
    }
}
