//! Team budgets (`AgentBudget`) as the controller holds them: one gateway `Pool` per budget,
//! which every running execution of its namespaces is held against together; the spend kept in
//! the store per period (a restart goes on from it) and reset at the period's start, read from
//! an injectable clock; each budget's status (spent, limit, resets-at), gauges, and a warning
//! Event at 80 %.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use super::decide::Note;
use super::events::Events;
use super::metrics::{BudgetLabel, Metrics};
use crate::api::budget::{self, Window};
use crate::api::{AgentBudget, AgentBudgetStatus, AgentExecution, Phase, Reason};
use crate::gateway::Pool;
use crate::store::Store;

/// The time, for period boundaries (tests move it; the controller reads the system clock).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>);

impl Clock {
    pub fn new(f: impl Fn() -> jiff::Timestamp + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
    pub fn now(&self) -> jiff::Timestamp {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new(jiff::Timestamp::now)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

/// How often budgets are looked at: period starts, the store, statuses, gauges.
const TICK: Duration = Duration::from_millis(250);
/// The share of a budget spent that raises the warning Event.
const WARN_AT: f64 = 0.8;

/// The budgets and their pools.
#[derive(Clone)]
pub struct Budgets {
    budgets: Cache<AgentBudget>,
    namespaces: Cache<Namespace>,
    pools: Arc<Mutex<HashMap<String, Arc<Pool>>>>,
    clock: Clock,
    synced: Arc<AtomicBool>,
}

impl Budgets {
    /// No budgets (tests that build a Context by hand).
    pub fn none() -> Self {
        Self {
            budgets: reflector::store().0,
            namespaces: reflector::store().0,
            pools: Default::default(),
            clock: Clock::default(),
            synced: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether the budgets were read (an execution never starts unchecked).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Whether namespace `ns` can be judged: its labels are known, or no budget selects by label.
    pub fn knows(&self, ns: &str) -> bool {
        self.namespaces.get(&ObjectRef::new(ns)).is_some()
            || self.budgets.state().iter().all(|b| b.spec.namespace_selector.is_none())
    }

    /// Waits (at most `limit`) until the budgets were read. False: they were not.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.synced() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn labels(&self, ns: &str) -> BTreeMap<String, String> {
        super::policies::labels_of(&self.namespaces, ns)
    }

    /// The valid budgets covering namespace `ns`, with their current period.
    fn covering(&self, ns: &str) -> Vec<(Arc<AgentBudget>, Window)> {
        let labels = self.labels(ns);
        let now = self.clock.now();
        self.budgets
            .state()
            .into_iter()
            .filter(|b| budget::validate(b).is_ok() && budget::covers(b, ns, &labels))
            .filter_map(|b| {
                let tz = budget::time_zone(&b.spec).ok()?;
                let w = budget::window(b.spec.period, &tz, now).ok()?;
                Some((b, w))
            })
            .collect()
    }

    /// The pool of a budget, once the budget task has read its spend from the store (a budget
    /// it has not read yet holds nothing for up to one tick: never with a figure of zero it
    /// would have to take back).
    fn pool(&self, b: &AgentBudget) -> Option<Arc<Pool>> {
        self.pools.lock().ok()?.get(&b.name_any()).cloned()
    }

    /// The budget task's: the pool of a budget, created at `spent` when new.
    fn ensure_pool(&self, b: &AgentBudget, w: &Window, spent: f64, exhausted: bool) -> Arc<Pool> {
        let name = b.name_any();
        let Ok(mut pools) = self.pools.lock() else {
            // Poisoned: a pool of its own, at the limit already (fails closed).
            return Arc::new(Pool::new(&name, b.spec.limit_usd, &w.key(), b.spec.limit_usd));
        };
        pools
            .entry(name.clone())
            .or_insert_with(|| {
                let pool = Pool::new(&name, b.spec.limit_usd, &w.key(), spent);
                pool.set(b.spec.limit_usd, &w.key(), spent, exhausted);
                Arc::new(pool)
            })
            .clone()
    }

    /// The pools an execution of namespace `ns` is held against.
    pub fn pools_for(&self, ns: &str) -> Vec<Arc<Pool>> {
        self.covering(ns).iter().filter_map(|(b, _)| self.pool(b)).collect()
    }

    /// Why a new execution of `ns` must wait: the first spent budget covering it, and when it
    /// resets.
    pub fn exhausted(&self, ns: &str) -> Option<String> {
        self.covering(ns).into_iter().find_map(|(b, w)| {
            let pool = self.pool(&b)?;
            pool.exhausted().then(|| {
                let books = pool.books();
                format!(
                    "the team budget {:?} (AgentBudget) is spent for this {}: ${:.2} of ${:.2}; it resets at {}",
                    b.name_any(),
                    period_word(b.spec.period),
                    books.spent_usd,
                    books.limit_usd,
                    w.end.strftime("%Y-%m-%dT%H:%M:%S%:z (%Q)")
                )
            })
        })
    }
}

fn period_word(p: budget::Period) -> &'static str {
    match p {
        budget::Period::Day => "day",
        budget::Period::Week => "week",
        budget::Period::Month => "month",
    }
}

/// What `start` needs besides the client.
pub struct Deps {
    pub namespaces: Cache<Namespace>,
    pub executions: Cache<AgentExecution>,
    pub store: Option<Store>,
    pub clock: Clock,
    pub leading: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    /// Wakes an execution (a reset lets the queued ones start at once).
    pub wake: tokio::sync::mpsc::UnboundedSender<ObjectRef<AgentExecution>>,
    /// The model gateway, whose open accounts follow budgets created, deleted or re-aimed while
    /// their executions run.
    pub gateways: Option<Arc<crate::gateway::Gateways>>,
}

/// Starts the budgets' watch and the task that keeps pools, store, statuses and gauges true.
pub fn start(client: Client, deps: Deps) -> (Budgets, Vec<tokio::task::JoinHandle<()>>) {
    let (cache, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<AgentBudget>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|b: &mut AgentBudget| b.managed_fields_mut().clear()),
    );
    let mut tasks = vec![tokio::spawn(stream.for_each(|e| async move {
        if let Err(e) = e {
            tracing::warn!(error = %e, "watching AgentBudgets");
        }
    }))];
    let synced = Arc::new(AtomicBool::new(false));
    let me = Budgets {
        budgets: cache,
        namespaces: deps.namespaces.clone(),
        pools: Default::default(),
        clock: deps.clock.clone(),
        synced: synced.clone(),
    };
    {
        let (me, client) = (me.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            if me.budgets.wait_until_ready().await.is_err() {
                return;
            }
            // The store's figures first: no execution starts against a budget read as empty.
            let mut books = Books::default();
            books.tick(&client, &me, &deps).await;
            synced.store(true, Ordering::Relaxed);
            loop {
                tokio::time::sleep(TICK).await;
                books.tick(&client, &me, &deps).await;
            }
        }));
    }
    (me, tasks)
}

/// What the task remembers between ticks, by budget name.
#[derive(Default)]
struct Books {
    /// The period whose spend was read from the store.
    loaded: HashMap<String, String>,
    /// The spend (and exhaustion) last written to the store.
    saved: HashMap<String, (f64, bool)>,
    /// The status last written.
    written: HashMap<String, AgentBudgetStatus>,
    /// Whether this instance leads (only the leader writes statuses, the store and Events).
    leading: bool,
}

impl Books {
    async fn tick(&mut self, client: &Client, me: &Budgets, deps: &Deps) {
        let api: Api<AgentBudget> = Api::all(client.clone());
        self.leading = deps.leading.load(Ordering::Relaxed);
        let now = me.clock.now();
        let budgets = me.budgets.state();
        let live: std::collections::HashSet<String> = budgets.iter().map(|b| b.name_any()).collect();
        if let Ok(mut pools) = me.pools.lock() {
            pools.retain(|name, _| live.contains(name));
        }
        // A budget deleted (and perhaps created again under its name) is read from the store
        // again: its spend this period carries over, never restarts at zero.
        self.loaded.retain(|name, _| live.contains(name));
        self.saved.retain(|name, _| live.contains(name));
        self.written.retain(|name, _| live.contains(name));
        // Every open account held against the budgets of its namespace now: a budget created
        // while executions run holds their next request; a deleted one lets them go.
        if let Some(g) = &deps.gateways {
            let mut by_ns: HashMap<String, Vec<Arc<Pool>>> = HashMap::new();
            for ((ns, _), account) in g.accounts() {
                let pools = by_ns.entry(ns.clone()).or_insert_with(|| me.pools_for(&ns));
                let mut want: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
                want.sort();
                if account.pool_names() != want {
                    account.set_pools(pools.clone());
                }
            }
        }
        // Executions that a budget counts (running, or waiting for one), by namespace, and each
        // namespace's labels: once per tick, not once per budget and execution.
        let mut by_ns: HashMap<String, (u64, Vec<ObjectRef<AgentExecution>>)> = HashMap::new();
        for ax in deps.executions.state() {
            let st = ax.status.as_ref();
            let (running, waiting) = match st.map(|s| s.phase) {
                Some(Phase::Running) => (true, false),
                Some(Phase::Queued) => (false, st.and_then(|s| s.reason.as_ref()) == Some(&Reason::BudgetExhausted)),
                _ => (false, false),
            };
            if !(running || waiting) {
                continue;
            }
            let e = by_ns.entry(ax.namespace().unwrap_or_default()).or_default();
            if running {
                e.0 += 1;
            } else {
                e.1.push(ObjectRef::from_obj(&*ax));
            }
        }
        let ns_labels: HashMap<String, BTreeMap<String, String>> =
            by_ns.keys().map(|ns| (ns.clone(), me.labels(ns))).collect();
        for b in budgets {
            let name = b.name_any();
            let valid = budget::validate(&b).map_err(|e| e.to_string()).and_then(|()| {
                let tz = budget::time_zone(&b.spec).map_err(|e| e.to_string())?;
                budget::window(b.spec.period, &tz, now)
            });
            let w = match valid {
                Ok(w) => w,
                Err(why) => {
                    let mut st = b.status.clone().unwrap_or_default();
                    st.message = Some(format!("{why}; this budget holds no execution until fixed"));
                    st.observed_generation = b.metadata.generation;
                    self.write(&api, &name, &b, st).await;
                    continue;
                }
            };
            let key = w.key();
            // A new period, or a budget first seen: the store's figure for it (never below what
            // this process counted already).
            let mut stored = None;
            if self.loaded.get(&name) != Some(&key) {
                if let Some(store) = &deps.store {
                    match store.budget_spent(&name, &key).await {
                        Ok(v) => stored = v,
                        Err(e) => {
                            tracing::warn!(budget = %name, error = %e, "cannot read the budget's spend");
                            continue;
                        }
                    }
                }
                self.loaded.insert(name.clone(), key.clone());
                self.saved.remove(&name);
            }
            let (spent, exhausted) = stored.unwrap_or((0.0, false));
            // The figure its status gave for this period counts too (a store lost or replaced).
            let st_old = b.status.clone().unwrap_or_default();
            let spent = if st_old.period_start.as_deref() == Some(w.start.timestamp().to_string().as_str()) {
                spent.max(st_old.spent_usd)
            } else {
                spent
            };
            let pool = me.ensure_pool(&b, &w, spent, exhausted);
            let was_exhausted = pool.exhausted();
            pool.set(b.spec.limit_usd, &key, spent, exhausted);
            let books = pool.books();
            if let Some(store) = &deps.store
                && self.leading
                && self.saved.get(&name) != Some(&(books.spent_usd, books.exhausted))
            {
                match store.set_budget_spent(&name, &key, books.spent_usd, books.exhausted).await {
                    Ok(()) => {
                        self.saved.insert(name.clone(), (books.spent_usd, books.exhausted));
                    }
                    Err(e) => tracing::warn!(budget = %name, error = %e, "cannot record the budget's spend"),
                }
            }
            let label = BudgetLabel { budget: name.clone() };
            deps.metrics.budget_spent_usd.get_or_create(&label).set(books.spent_usd);
            deps.metrics.budget_limit_usd.get_or_create(&label).set(books.limit_usd);
            deps.metrics.budget_resets_at.get_or_create(&label).set(w.end.timestamp().as_second());
            // Executions of its namespaces, running and waiting for it.
            let (mut running, mut queued) = (0u64, Vec::new());
            for (ns, (r, waiting)) in &by_ns {
                if budget::covers(&b, ns, &ns_labels[ns]) {
                    running += r;
                    queued.extend(waiting.iter().cloned());
                }
            }
            let waiting = queued.len() as u64;
            // A reset (or a higher limit) lets the waiting executions start now, not at their
            // next recheck.
            if was_exhausted && !pool.exhausted() {
                for r in queued {
                    let _ = deps.wake.send(r);
                }
            }
            let old = b.status.clone().unwrap_or_default();
            let period_start = w.start.timestamp().to_string();
            let st = AgentBudgetStatus {
                spent_usd: (books.spent_usd * 1e6).round() / 1e6,
                limit_usd: books.limit_usd,
                period_start: Some(period_start.clone()),
                resets_at: Some(w.end.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()),
                running,
                waiting,
                refused_requests: books.refused,
                observed_generation: b.metadata.generation,
                message: None,
                warned: old.warned.clone().filter(|p| *p == period_start),
            };
            // 80 %: one warning per period (the status remembers it across restarts).
            let mut st = st;
            if books.spent_usd >= WARN_AT * books.limit_usd && st.warned.is_none() && self.leading {
                let note = Note {
                    reason: "BudgetAlmostSpent".into(),
                    message: format!(
                        "team budget {name:?} has spent ${:.2} of ${:.2} ({:.0} %) this {}; it resets at {}",
                        books.spent_usd,
                        books.limit_usd,
                        100.0 * books.spent_usd / books.limit_usd,
                        period_word(b.spec.period),
                        st.resets_at.clone().unwrap_or_default()
                    ),
                    warning: true,
                };
                if let Err(e) = deps.events.publish(&note, "HoldBudget", &b.object_ref(&())).await {
                    tracing::warn!(budget = %name, error = %e, "cannot publish the budget's event");
                }
                st.warned = Some(period_start);
            }
            self.write(&api, &name, &b, st).await;
        }
    }

    /// Writes a budget's status when it changed (only while leading).
    async fn write(&mut self, api: &Api<AgentBudget>, name: &str, b: &AgentBudget, st: AgentBudgetStatus) {
        if !self.leading || b.status.as_ref() == Some(&st) || self.written.get(name) == Some(&st) {
            return;
        }
        let mut value = serde_json::to_value(&st).unwrap_or_default();
        value["message"] = serde_json::json!(st.message);
        let patch = serde_json::json!({"status": value});
        match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                self.written.insert(name.to_string(), st);
            }
            Err(e) => tracing::warn!(budget = %name, error = %e, "cannot write the AgentBudget's status"),
        }
    }
}
