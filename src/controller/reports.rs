//! The channel from runners to the controller for live progress and the final result.
//!
//! Why an endpoint on the controller (and not status patches from the runner): the runner pod
//! then needs no Kubernetes API access at all, and the controller stays the only writer of the
//! status (one field manager). Each execution gets its own random token (a Secret mounted into
//! its pod, or a private file for the local executor), so a runner can report only for itself.
//! A lost report loses nothing final: the runner also leaves its summary as the pod's
//! termination message, which the controller reads when the Job ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;

use crate::api::Summary;
use crate::api::{AgentExecution, Resolved};
use crate::gateway::egress::{CidrRule, EgressPolicy, EgressProxy, EgressTally, Opening, proxy_user};
use crate::gateway::git::{GitRelays, Route};
use crate::gateway::{Account, Gateways, Metered};

use super::ledger::Ledger;

type Key = (String, String);

/// The report channel of running executions (their tokens and latest reports live in the
/// ledger), and what the controller serves their pods: model gateway accounts, git routes.
pub struct Reports {
    client: kube::Client,
    ledger: Arc<Ledger>,
    wake: mpsc::UnboundedSender<ObjectRef<AgentExecution>>,
    /// The model gateway runner pods use (None: runners bring their own key; local runners).
    gateways: Option<Arc<Gateways>>,
    /// The git relay runner pods use (None: they talk to the git host themselves).
    git: Option<Arc<GitRelays>>,
    /// The egress proxy runner pods' agents use for `egressHosts` (None: not served).
    egress: Option<Arc<EgressProxy>>,
    /// Secrets read for the gateway and the relay, for a few seconds: many executions share one
    /// Secret, and each start would read it again. (The accounts hold the values anyway.)
    secret_data: Mutex<HashMap<Key, (std::time::Instant, Arc<SecretData>)>>,
    /// The team budgets each account is held against.
    budgets: Option<super::budgets::Budgets>,
}

type SecretData = std::collections::BTreeMap<String, String>;

/// How long a Secret read for a start is reused.
const SECRET_DATA_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Key of the runner Secret holding the model gateway token (mounted in the agent's container only).
pub const MODEL_TOKEN_KEY: &str = "model";
/// Key of the runner Secret holding the egress proxy token (mounted in the agent's container only).
pub const EGRESS_TOKEN_KEY: &str = "egress";
/// Key of the runner Secret holding the report token (mounted in the publish container only).
pub const REPORT_TOKEN_KEY: &str = "token";
/// Keys of the git relay tokens: fetch only (clone), push of the work branch (publish).
pub const GIT_CLONE_TOKEN_KEY: &str = "git-clone";
pub const GIT_PUBLISH_TOKEN_KEY: &str = "git-publish";

/// Live figures reach the status at most this often (each wake is one reconcile).
const WAKE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A fresh random token (two v4 UUIDs: 244 random bits).
pub fn new_token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

fn same(a: &str, b: &str) -> bool {
    // Length and every byte, without stopping at the first difference.
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Reports {
    pub fn new(
        client: kube::Client,
        wake: mpsc::UnboundedSender<ObjectRef<AgentExecution>>,
        ledger: Arc<Ledger>,
    ) -> Self {
        Self {
            client,
            ledger,
            wake,
            gateways: None,
            git: None,
            egress: None,
            secret_data: Default::default(),
            budgets: None,
        }
    }

    /// A Secret's data (trimmed text), read at most once per `SECRET_DATA_FOR`.
    async fn secret(&self, ns: &str, name: &str) -> Result<Arc<SecretData>, super::context::Error> {
        let key = (ns.to_string(), name.to_string());
        if let Some((at, data)) = self.secret_data.lock().ok().and_then(|m| m.get(&key).cloned())
            && at.elapsed() < SECRET_DATA_FOR
        {
            return Ok(data);
        }
        let secret = Api::<Secret>::namespaced(self.client.clone(), ns).get(name).await?;
        let data: SecretData = secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).trim().to_string()))
            .collect();
        let data = Arc::new(data);
        if let Ok(mut m) = self.secret_data.lock() {
            if m.len() > 1_000 {
                m.retain(|_, (at, _)| at.elapsed() < SECRET_DATA_FOR);
            }
            m.insert(key, (std::time::Instant::now(), data.clone()));
        }
        Ok(data)
    }

    /// The non-empty value a reference (`field`) names, `default_key` when it names no key.
    async fn secret_value(
        &self,
        ns: &str,
        r: &crate::api::SecretKeyRef,
        default_key: &str,
        field: &str,
    ) -> Result<String, super::context::Error> {
        let key = r.key.as_deref().unwrap_or(default_key);
        let value = self.secret(ns, &r.name).await?.get(key).cloned().filter(|v| !v.is_empty());
        value
            .ok_or_else(|| super::context::Error::Executor(format!("Secret {:?} has no key {key:?} ({field})", r.name)))
    }

    /// The repository's token (for the provider's API: pull requests), read from the Secret
    /// the execution names.
    pub async fn git_token(&self, ns: &str, r: &Resolved) -> Result<Option<String>, super::context::Error> {
        match &r.credentials {
            None => Ok(None),
            Some(c) => Ok(Some(self.secret_value(ns, c, "token", "spec.repository.credentialsSecretRef").await?)),
        }
    }

    /// Runner pods reach git through `relays`.
    pub fn with_git_relays(mut self, relays: Arc<GitRelays>) -> Self {
        self.git = Some(relays);
        self
    }

    /// Whether this model token belonged to an execution that ended.
    /// What of an execution's routes is open here: (model account, git route, egress account).
    pub fn open_routes(&self, ns: &str, name: &str) -> (bool, bool, bool) {
        (
            self.gateways.as_ref().is_some_and(|g| g.is_open(ns, name)),
            self.git.as_ref().is_some_and(|g| g.is_open(ns, name)),
            self.egress.as_ref().is_some_and(|p| p.is_open(&crate::gateway::egress::proxy_user(ns, name))),
        )
    }

    pub fn model_retired(&self, token: &str) -> bool {
        self.gateways.as_ref().is_some_and(|g| g.retired(token))
    }

    /// Opens the execution's git route: its repository, with the credential read from its
    /// Secret here, for the steps' two tokens.
    pub async fn open_git(
        &self,
        ns: &str,
        name: &str,
        r: &Resolved,
        clone_token: &str,
        publish_token: &str,
    ) -> Result<(), super::context::Error> {
        let Some(relays) = &self.git else { return Ok(()) };
        let credentials = match &r.credentials {
            None => None,
            Some(c) => {
                let token = self.secret_value(ns, c, "token", "spec.repository.credentialsSecretRef").await?;
                let username = self.secret(ns, &c.name).await?.get("username").cloned().filter(|u| !u.is_empty());
                let username = username.unwrap_or_else(|| "x-access-token".into());
                Some(crate::git::GitCredentials { username, token })
            }
        };
        relays.open(
            ns,
            name,
            Route {
                upstream: r.repo_url.clone(),
                credentials,
                clone_token: clone_token.into(),
                publish_token: publish_token.into(),
                branch: r.branch.clone(),
            },
        );
        Ok(())
    }

    /// Runner pods reach the model through `gateways`.
    /// Holds every account against the team budgets of its namespace.
    pub fn with_budgets(mut self, budgets: super::budgets::Budgets) -> Self {
        self.budgets = Some(budgets);
        self
    }

    pub fn with_gateways(mut self, gateways: Arc<Gateways>) -> Self {
        self.gateways = Some(gateways);
        self
    }

    /// Opens the execution's model account: `token` is what its agent presents; the key is read
    /// from the execution's Secret here, and never leaves this process. `spent` (usage and cost
    /// already recorded) counts against the budget.
    pub async fn open_model(
        &self,
        ns: &str,
        name: &str,
        r: &Resolved,
        token: &str,
        spent: (crate::api::Usage, f64, u64),
    ) -> Result<(), super::context::Error> {
        let Some(gateways) = &self.gateways else { return Ok(()) };
        let Some(key_ref) = &r.api_key else {
            return Err(super::context::Error::Executor("no Anthropic API key: set spec.agent.apiKeySecretRef".into()));
        };
        let key = self.secret_value(ns, key_ref, "api-key", "spec.agent.apiKeySecretRef").await?;
        // Remote MCP servers' headers: read here, added by the gateway, never in a pod.
        let mut values = std::collections::BTreeMap::new();
        for (i, server) in r.agent_config.mcp_servers.iter().enumerate() {
            for (j, h) in server.headers_from.iter().enumerate() {
                let field = format!("spec.agent.mcpServers[{i}].headersFrom[{j}].secretKeyRef");
                let value = self.secret_value(ns, &h.secret_key_ref, "value", &field).await?;
                values.insert((server.name.clone(), h.name.clone()), value);
            }
        }
        let routes = crate::gateway::mcp::routes(
            &r.agent_config.mcp_servers,
            &crate::gateway::mcp::McpRules::of(&r.agent_config, &r.allowed_tools, &r.disallowed_tools),
            |s, h| {
                values.get(&(s.name.clone(), h.name.clone())).cloned().ok_or_else(|| format!("no value for {}", h.name))
            },
        )
        .map_err(super::context::Error::Executor)?;
        // Right after a restart the budgets may not be read yet: an account opened without its
        // team budgets would spend past them.
        let pools = match &self.budgets {
            None => Vec::new(),
            Some(b) if b.wait_synced(std::time::Duration::from_secs(20)).await => b.pools_for(ns),
            Some(_) => {
                return Err(super::context::Error::Executor(
                    "the team budgets (AgentBudgets) are not read yet; the gateway opens no account without them"
                        .into(),
                ));
            }
        };
        let account = Account::new(&key, token, r.max_budget_usd)
            .with_models(r.policy.as_ref().and_then(|p| p.models.clone()))
            .with_max_turns(r.max_turns)
            .with_pools(pools)
            .with_spent(spent.0, spent.1)
            .with_turns(spent.2)
            .with_mcp(routes)
            .on_change(self.throttled_wake(ns, name));
        gateways.open(ns, name, account);
        Ok(())
    }

    /// Wakes the execution's reconcile at most once per WAKE_EVERY, and never leaves a change
    /// without one: a change inside the window schedules one wake at its end (the last figures
    /// of a burst reach the status).
    fn throttled_wake(&self, ns: &str, name: &str) -> impl Fn() + Send + Sync + 'static {
        let (wake, at) = (self.wake.clone(), ObjectRef::new(name).within(ns));
        let throttle = Arc::new(Mutex::new((None::<std::time::Instant>, false)));
        move || {
            let Ok(mut t) = throttle.lock() else { return };
            let (last, pending) = &mut *t;
            match last.map(|l| l.elapsed()) {
                Some(since) if since < WAKE_EVERY => {
                    if !*pending && let Ok(rt) = tokio::runtime::Handle::try_current() {
                        *pending = true;
                        let (wake, at, throttle) = (wake.clone(), at.clone(), throttle.clone());
                        rt.spawn(async move {
                            tokio::time::sleep(WAKE_EVERY - since).await;
                            if let Ok(mut t) = throttle.lock() {
                                *t = (Some(std::time::Instant::now()), false);
                            }
                            let _ = wake.send(at);
                        });
                    }
                }
                _ => {
                    *last = Some(std::time::Instant::now());
                    let _ = wake.send(at.clone());
                }
            }
        }
    }

    /// Runner pods' agents reach `egressHosts` through `proxy`.
    pub fn with_egress(mut self, proxy: Arc<EgressProxy>) -> Self {
        self.egress = Some(proxy);
        self
    }

    /// Whether this controller serves an egress proxy.
    pub fn serves_egress(&self) -> bool {
        self.egress.is_some()
    }

    /// Opens the execution's egress account: `token` is what its agent presents as the proxy
    /// password, its `egressHosts` where it may connect, its `spec.egress` CIDR rules the
    /// addresses that may be private; `counted` what its status already records.
    pub fn open_egress(
        &self,
        ns: &str,
        name: &str,
        r: &Resolved,
        token: &str,
        counted: Option<&crate::api::EgressSummary>,
    ) {
        let Some(proxy) = &self.egress else { return };
        if r.egress_hosts.is_empty() {
            return;
        }
        let cidrs = r.egress.iter().filter_map(|e| CidrRule::parse(&e.cidr, e.ports.clone()).ok()).collect();
        proxy.open_account(Opening {
            user: Some(proxy_user(ns, name)),
            token: token.to_string(),
            policy: EgressPolicy { hosts: r.egress_hosts.clone(), cidrs },
            counted: counted.map(EgressTally::continuing).unwrap_or_default(),
            on_change: Some(Box::new(self.throttled_wake(ns, name))),
        });
    }

    /// What the egress proxy counted for an execution, while its account is open.
    pub fn egress(&self, ns: &str, name: &str) -> Option<crate::api::EgressSummary> {
        Some(self.egress.as_ref()?.tally_of(&proxy_user(ns, name))?.summary())
    }

    /// Requests the gateway refused for an execution (outside its allowlist), and the last one.
    pub fn refusals(&self, ns: &str, name: &str) -> Option<(u64, Option<String>)> {
        self.gateways.as_ref()?.refusals(ns, name)
    }

    /// What the git relay saw pushed for an execution (see `GitRelays::pushed`).
    pub fn relay_pushed(&self, ns: &str, name: &str) -> Option<Option<String>> {
        self.git.as_ref()?.pushed(ns, name)
    }

    /// What the gateway counted for an execution, while its account is open.
    pub fn metered(&self, ns: &str, name: &str) -> Option<Metered> {
        self.gateways.as_ref()?.metered(ns, name).filter(|m| m.responses > 0)
    }

    /// Remembers the token given to an execution's runner.
    pub fn remember(&self, uid: &str, token: &str) {
        self.ledger.update(uid, |e| e.report_token = Some(token.into()));
    }

    /// Whether `token` is the one given to that execution (after a restart, read from its
    /// runner Secret, which must belong to this very execution: `uid`).
    pub async fn verify(&self, uid: &str, ns: &str, name: &str, token: &str) -> bool {
        let known = self.ledger.with(uid, |e| e.report_token.clone()).flatten();
        let expected = match known {
            Some(t) => t,
            None => {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
                let Ok(Some(secret)) = api.get_opt(&super::desired::runner_secret_name_of(name)).await else {
                    return false;
                };
                if !owned_by(&secret, uid) {
                    return false;
                }
                let Some(bytes) = secret.data.and_then(|d| d.get(REPORT_TOKEN_KEY).cloned()) else {
                    return false;
                };
                let t = String::from_utf8_lossy(&bytes.0).into_owned();
                self.remember(uid, &t);
                t
            }
        };
        same(&expected, token)
    }

    /// Keeps a report of a run this process knows (its token was verified) and wakes the
    /// execution's reconcile.
    pub fn accept(&self, uid: &str, ns: &str, name: &str, report: Summary) {
        self.ledger.with(uid, |e| e.latest = Some(Box::new(report)));
        let _ = self.wake.send(ObjectRef::new(name).within(ns));
    }

    /// The latest report of an execution.
    pub fn latest(&self, uid: &str) -> Option<Summary> {
        self.ledger.with(uid, |e| e.latest.as_deref().cloned()).flatten()
    }

    /// Ends what is kept for an execution's run: its model token and git tokens stop working,
    /// its ledger entry keeps only the final status.
    pub fn forget(&self, uid: &str, ns: &str, name: &str) {
        if let Some(g) = &self.gateways {
            g.close(ns, name);
        }
        if let Some(g) = &self.git {
            g.close(ns, name);
        }
        if let Some(p) = &self.egress {
            p.close_user(&proxy_user(ns, name));
        }
        self.ledger.end_run(uid);
    }
}

/// Whether an object's controller owner is the execution `uid`: a Secret left by a deleted
/// execution of the same name (garbage collection is not instant) is not this one's.
pub fn owned_by(obj: &impl kube::Resource, uid: &str) -> bool {
    obj.meta().owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Distinct tool names kept from a report (each becomes a metric label).
pub const MAX_TOOL_NAMES: usize = 64;
/// Longest tool name kept as is.
pub const MAX_TOOL_NAME: usize = 64;

/// A report cut to what the status and the metrics can carry: the result to 4 KiB (as the
/// README promises), short texts, and tool names that are plain identifiers, at most
/// `MAX_TOOL_NAMES` of them (the rest count under `other`). A runner — or an agent that
/// got hold of its token — cannot grow the status or the metrics without bound.
pub fn bounded(mut s: Summary) -> Summary {
    use crate::api::report::truncate;
    s.result = s.result.map(|r| truncate(&r, 4096));
    s.message = s.message.map(|m| truncate(&m, 1024));
    s.reason = s
        .reason
        .map(|r| crate::api::Reason::from(r.chars().filter(char::is_ascii_alphanumeric).take(64).collect::<String>()));
    s.session_id = s.session_id.map(|id| id.chars().take(128).collect());
    s.workspace = s.workspace.map(|w| w.chars().take(256).collect());
    s.git.branch = s.git.branch.map(|b| b.chars().take(256).collect());
    s.git.commit = s.git.commit.map(|c| c.chars().filter(char::is_ascii_hexdigit).take(64).collect());
    // The controller opens pull requests; a runner's word about one is never taken.
    s.git.pull_request = None;
    s.git.pull_request_url = None;
    s.output = s.output.filter(|o| o.is_object() && o.to_string().len() <= crate::api::limits::MAX_OUTPUT_BYTES);
    s.model = s.model.map(|m| m.chars().filter(|c| c.is_ascii_graphic()).take(128).collect());
    let plain = |t: &str| {
        !t.is_empty()
            && t.len() <= MAX_TOOL_NAME
            && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    };
    let mut by_tool = std::collections::BTreeMap::new();
    for (name, n) in std::mem::take(&mut s.tool_calls.by_tool) {
        let key = if plain(&name) && (by_tool.len() < MAX_TOOL_NAMES || by_tool.contains_key(&name)) {
            name
        } else {
            "other".to_string()
        };
        let slot: &mut u64 = by_tool.entry(key).or_default();
        *slot = slot.saturating_add(n);
    }
    s.tool_calls.by_tool = by_tool;
    s.id.clear();
    s.name.clear();
    s.namespace.clear();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_report_is_cut_to_size() {
        let mut s = Summary { result: Some("r".repeat(100_000)), ..Default::default() };
        for i in 0..10_000 {
            s.tool_calls.by_tool.insert(format!("Tool{i}"), 1);
        }
        s.tool_calls.by_tool.insert("bad name {with} \"quotes\"".into(), 5);
        let b = bounded(s);
        assert!(b.result.unwrap().len() <= 4096 + 20);
        assert!(b.tool_calls.by_tool.len() <= MAX_TOOL_NAMES + 1);
        assert_eq!(b.tool_calls.by_tool.values().sum::<u64>(), 10_005, "calls are counted, names bounded");
        assert!(b.tool_calls.by_tool.keys().all(|k| !k.contains(' ')));
    }
}
