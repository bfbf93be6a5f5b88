//! The Kubernetes operator: reconciles `AgentExecution`s into workspaces and Jobs.

pub mod budgets;
pub mod context;
pub mod decide;
pub mod desired;
pub mod events;
pub mod executor;
pub mod jobstate;
pub mod ledger;
pub mod metrics;
pub mod policies;
pub mod queue;
pub mod read;
pub mod reconcile;
pub mod reports;
pub mod status;
pub mod verdict;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::runtime::controller::Controller;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;

pub use executor::{Executor, LocalExecutor};
pub use reconcile::{Context, ControllerConfig, error_policy, reconcile};

use crate::api::AgentExecution;
use crate::store::Store;
use context::key;

/// How the runner is run.
pub enum ExecutorKind {
    Job,
    /// Child processes: the agentops binary and extra environment for each runner.
    Local {
        bin: std::path::PathBuf,
        env: Vec<(String, String)>,
    },
}

/// An execution went: one seen deleted, or check the store against a fresh full list.
enum Gone {
    One(Box<AgentExecution>),
    Sweep,
}

/// Why `run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` resolved.
    Shutdown,
    /// Another instance holds the lease now: the process should exit.
    LostLeadership,
}

/// What the controller exposes for whoever serves HTTP (`crate::server`, composed by `main`):
/// the controller builds no part of the server.
pub struct Exposed {
    pub client: Client,
    /// Every execution the controller serves, as its watch sees it.
    pub cache: kube::runtime::reflector::Store<AgentExecution>,
    pub metrics: Arc<metrics::Metrics>,
    pub store: Option<Store>,
    /// True once the watch caches are synced and this instance leads.
    pub ready: Arc<AtomicBool>,
    /// True while this instance leads (always, without leader election).
    pub leading: Arc<AtomicBool>,
    /// Where runner reports go.
    pub reports: Arc<reports::Reports>,
    /// The model gateway's and the git relay's routes for runner pods (empty without them).
    pub relayed: axum::Router,
}

/// Who serves what the controller exposes: where its API listens (local runners report
/// there), and `start`, whose tasks end with the controller.
pub struct Serve {
    pub api_addr: Option<std::net::SocketAddr>,
    pub start: Box<dyn FnOnce(Exposed) -> Vec<tokio::task::JoinHandle<()>> + Send>,
    /// The egress proxy's listener (runner pods' `HTTPS_PROXY` for `egressHosts`): the
    /// controller serves it itself, with its accounts (a proxy is not an HTTP route).
    pub egress: Option<crate::gateway::egress::EgressListener>,
}

impl Default for Serve {
    /// Nothing served (tests that need no endpoint).
    fn default() -> Self {
        Self { api_addr: None, start: Box::new(|_| Vec::new()), egress: None }
    }
}

/// How long an egress connection may be idle before the proxy closes it.
const EGRESS_IDLE: Duration = Duration::from_secs(300);

/// Where runner pods reach the egress proxy: the host of the URL they report to, at the
/// proxy's port.
fn egress_url(report_url: &str, port: u16) -> Option<String> {
    let u = url::Url::parse(report_url).ok()?;
    let host = u.host()?;
    Some(format!("http://{host}:{port}"))
}

/// Runs the controller until `shutdown` resolves. Reconciles every namespace. Hands what it
/// exposes to `serve` (see `crate::server::serve`). With `leader` (the lease manager's
/// channel), reconciles only while this instance holds the lease; `/readyz` says so.
pub async fn run(
    client: Client,
    mut config: ControllerConfig,
    store: Option<Store>,
    executor: ExecutorKind,
    serve: Serve,
    leader: Option<tokio::sync::watch::Receiver<bool>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Stopped {
    let stop = tokio_util::sync::CancellationToken::new();
    let stop_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        })
    };
    let executions: Api<AgentExecution> = Api::all(client.clone());
    let jobs_config = watcher::Config::default().labels("app.kubernetes.io/managed-by=agentops");
    // Executions are watched cluster-wide (the CRD is ours), and those outside the served
    // namespaces never reach the cache: with `--namespaces`, the controller may create Jobs
    // and read Secrets only there (a Role per namespace), so it must not try elsewhere.
    let served = config.namespaces.clone();
    let serves = move |ax: &AgentExecution| served.as_ref().is_none_or(|set| set.contains(&key(ax).0));
    // Our own watch of the executions, so that the cache keeps less of each object: no
    // managedFields and no last-applied annotation (often the size of the object itself).
    let (reader, writer) = reflector::store();
    let events = watcher(executions, watcher::Config::default()).default_backoff().modify(|ax: &mut AgentExecution| {
        ax.managed_fields_mut().clear();
        ax.annotations_mut().remove("kubectl.kubernetes.io/last-applied-configuration");
    });
    let events = events.try_filter(move |ev| {
        let keep = match ev {
            watcher::Event::Apply(ax) | watcher::Event::InitApply(ax) | watcher::Event::Delete(ax) => serves(ax),
            _ => true,
        };
        futures::future::ready(keep)
    });
    // Deletions are not reconciles (there is no finalizer): the watch's delete events, and a
    // sweep of the store after every full list (for those deleted while nobody watched).
    let (gone_tx, mut gone_rx) = mpsc::unbounded_channel::<Gone>();
    let stream = reflector::reflector(writer, events)
        .inspect_ok(move |ev| {
            let _ = match ev {
                watcher::Event::Delete(ax) => gone_tx.send(Gone::One(Box::new(ax.clone()))),
                watcher::Event::InitDone => gone_tx.send(Gone::Sweep),
                _ => Ok(()),
            };
        })
        .applied_objects();
    let controller = Controller::for_stream(stream, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(config.concurrency));
    // Jobs: one watch over the cluster, or one per served namespace, each kept in a cache that
    // the Job executor reads instead of asking the API server on every reconcile.
    let job_apis: Vec<Api<jobstate::JobState>> = match &config.namespaces {
        None => vec![Api::all(client.clone())],
        Some(set) => set.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect(),
    };
    let mut job_caches = Vec::new();
    let watches = job_apis.into_iter().map(|api| {
        let (reader, writer) = reflector::store();
        job_caches.push(reader);
        // Only what observing a runner reads is decoded and kept: owner, suspend, conditions.
        let jobs = watcher(api, jobs_config.clone()).default_backoff();
        reflector::reflector(writer, jobs).touched_objects().boxed()
    });
    let watches: Vec<_> = watches.collect();
    let controller = controller.owns_stream(futures::stream::select_all(watches));
    let (wake_tx, wake_rx) = mpsc::unbounded_channel();
    let local_base = serve.api_addr.map(|a| format!("http://{a}"));
    let ledger = Arc::new(ledger::Ledger::default());
    let executor = match executor {
        ExecutorKind::Job => Executor::Job { jobs: job_caches, ledger: ledger.clone() },
        ExecutorKind::Local { bin, mut env } => {
            // Local runners report to this process; Jobs use the configured Service URL.
            config.job.report_url = None;
            if let Some(model) = &config.job.default_model {
                env.push(("ANTHROPIC_MODEL".into(), model.clone()));
            }
            match LocalExecutor::new(bin, env, wake_tx.clone(), local_base, ledger.clone()) {
                Ok(l) => Executor::Local(l),
                Err(e) => {
                    tracing::error!(error = %e, "cannot prepare the local executor");
                    return Stopped::Shutdown;
                }
            }
        }
    };
    // Runner pods reach the model through this controller: the key stays here.
    let gateways = match (&executor, &config.job.report_url) {
        (Executor::Job { .. }, Some(_)) => match crate::gateway::Gateways::new(&config.model_upstream)
            .and_then(|g| if config.mcp_allow_local { g.allowing_local_mcp() } else { Ok(g) })
        {
            Ok(g) => Some(Arc::new(g)),
            Err(e) => {
                tracing::error!(error = %e, "cannot prepare the model gateway");
                return Stopped::Shutdown;
            }
        },
        _ => None,
    };
    let relays = match (&executor, &config.job.report_url) {
        (Executor::Job { .. }, Some(_)) if config.job.git_relay => match crate::gateway::git::GitRelays::new() {
            Ok(g) => Some(Arc::new(g)),
            Err(e) => {
                tracing::error!(error = %e, "cannot prepare the git relay");
                return Stopped::Shutdown;
            }
        },
        _ => None,
    };
    // Egress by host name: the proxy runner pods' agents use, served here on its own listener.
    let mut serve = serve;
    let egress = match (&executor, &config.job.report_url, serve.egress.take()) {
        (Executor::Job { .. }, Some(report_url), Some(l)) => {
            let port = l.listener.local_addr().map(|a| a.port()).unwrap_or_default();
            match crate::gateway::egress::EgressProxy::serve_controllers(l, EGRESS_IDLE) {
                Ok(p) => {
                    if config.job.egress_proxy.is_none() {
                        config.job.egress_proxy = egress_url(report_url, port);
                    }
                    Some(Arc::new(p))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot serve the egress proxy");
                    return Stopped::Shutdown;
                }
            }
        }
        _ => None,
    };
    if egress.is_none() {
        config.job.egress_proxy = None;
    }
    let mut reports = reports::Reports::new(client.clone(), wake_tx.clone(), ledger.clone());
    if let Some(g) = &gateways {
        reports = reports.with_gateways(g.clone());
    }
    if let Some(p) = &egress {
        reports = reports.with_egress(p.clone());
    }
    if let Some(g) = &relays {
        reports = reports.with_git_relays(g.clone());
    }
    let reporter =
        events::Reporter { controller: "agentops-controller".into(), instance: std::env::var("POD_NAME").ok() };
    let metrics = Arc::new(metrics::Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let synced = Arc::new(AtomicBool::new(false));
    let is_leader = Arc::new(AtomicBool::new(leader.is_none()));
    let cache = controller.store();
    // The cluster layer: policies (and the namespaces' labels), team budgets with their pools.
    let (policies, mut background) = policies::start(client.clone(), is_leader.clone());
    let (budgets, budget_tasks) = budgets::start(
        client.clone(),
        budgets::Deps {
            namespaces: policies.namespaces(),
            executions: cache.clone(),
            store: store.clone(),
            clock: config.clock.clone(),
            leading: is_leader.clone(),
            metrics: metrics.clone(),
            events: events::Events::new(client.clone(), reporter.clone()),
            wake: wake_tx.clone(),
            gateways: gateways.clone(),
        },
    );
    background.extend(budget_tasks);
    let reports = Arc::new(reports.with_budgets(budgets.clone()));
    // After a restart, a running pod's first request to the gateway or the relay opens its
    // execution's account (reading its Secrets then, not for every running execution at once).
    let opener: crate::gateway::Opener = {
        let (cache, client, reports, synced, store) =
            (cache.clone(), client.clone(), Arc::downgrade(&reports), synced.clone(), store.clone());
        Arc::new(move |ns: String, name: String| {
            let (cache, client, reports, synced, store) =
                (cache.clone(), client.clone(), reports.clone(), synced.clone(), store.clone());
            async move {
                let Some(reports) = reports.upgrade() else { return false };
                // Right after a restart the watch has not listed yet: ask the API server, so a
                // running pod's push is accepted at once (once synced, the cache is the truth and
                // an unknown name costs no request).
                let ax = match cache.get(&reflector::ObjectRef::new(&name).within(&ns)) {
                    Some(ax) => ax,
                    None if !synced.load(std::sync::atomic::Ordering::Relaxed) => {
                        match Api::<crate::api::AgentExecution>::namespaced(client.clone(), &ns).get_opt(&name).await {
                            Ok(Some(ax)) => Arc::new(ax),
                            _ => return false,
                        }
                    }
                    None => return false,
                };
                if ax.status.as_ref().map(|s| s.phase) != Some(crate::api::Phase::Running) {
                    return false;
                }
                let mut template = match &ax.spec.template_ref {
                    None => None,
                    Some(t) => match Api::<crate::api::AgentTemplate>::namespaced(client.clone(), &ns).get_opt(&t.name).await {
                        Ok(Some(t)) => Some(t),
                        _ => return false,
                    },
                };
                let mut ax = (*ax).clone();
                if !matches!(read::inline_config_maps(&client, &ns, &mut ax, template.as_mut()).await, Ok(Ok(()))) {
                    return false;
                }
                // The limits the cluster's policies set when it started (its budget and model list
                // among them), from the store where only the controller writes; an execution
                // started before the store kept them has its status's.
                let recorded = match &store {
                    Some(s) => match s.execution_policy(&ledger::uid(&ax)).await {
                        Ok(r) => r,
                        Err(_) => return false,
                    },
                    None => None,
                };
                let frozen = match recorded {
                    Some(record) => record,
                    None => ax.status.as_ref().and_then(|s| s.policy.clone()),
                };
                crate::api::policy::freeze(&mut ax, frozen.as_ref());
                let Ok(mut r) = crate::api::resolve(&ax, template.as_slice()) else { return false };
                r.policy = frozen;
                match executor::reopen(&client, &ax, &r, &reports).await {
                    Ok(opened) => opened,
                    Err(e) => {
                        tracing::warn!(namespace = %ns, name = %name, error = %e, "cannot reopen a running execution's gateway");
                        false
                    }
                }
            }
            .boxed()
        })
    };
    if let Some(g) = &gateways {
        g.set_opener(opener.clone());
    }
    if let Some(g) = &relays {
        g.set_opener(opener.clone());
    }
    if let Some(p) = &egress {
        // The proxy's user names the execution (`namespace.name`).
        p.set_opener(Arc::new(move |user: String| {
            let opener = opener.clone();
            async move {
                let Some((ns, name)) = crate::gateway::egress::parse_proxy_user(&user) else { return false };
                opener(ns, name).await
            }
            .boxed()
        }));
    }
    {
        let (cache, ready, synced, is_leader) = (cache.clone(), ready.clone(), synced.clone(), is_leader.clone());
        background.push(tokio::spawn(async move {
            // The store's readiness wakes only one waiter at a time (the controller's own), so
            // poll it briefly instead of waiting alongside; it is cheap and only until ready.
            loop {
                match tokio::time::timeout(Duration::from_millis(100), cache.wait_until_ready()).await {
                    Ok(Ok(())) => {
                        synced.store(true, Ordering::Relaxed);
                        break ready.store(is_leader.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                    Ok(Err(_)) => break,
                    Err(_) => continue,
                }
            }
        }));
    }
    {
        let mut relayed = axum::Router::new();
        if let Some(g) = &gateways {
            relayed = relayed.merge(g.clone().router());
        }
        if let Some(g) = &relays {
            relayed = relayed.merge(g.clone().router());
        }
        background.extend((serve.start)(Exposed {
            client: client.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            store: store.clone(),
            ready: ready.clone(),
            leading: is_leader.clone(),
            reports: reports.clone(),
            relayed,
        }));
    }
    let ctx = Arc::new(Context {
        policies,
        budgets,
        events: events::Events::new(client.clone(), reporter),
        client,
        config,
        store,
        cache,
        executor,
        ledger,
        secrets_seen: Default::default(),
        admit: Default::default(),
        wake: wake_tx,
        metrics,
        reports,
    });
    {
        let ctx = ctx.clone();
        background.push(tokio::spawn(async move {
            while let Some(gone) = gone_rx.recv().await {
                let done = match &gone {
                    Gone::One(ax) => reconcile::deleted(ax, &ctx).await,
                    Gone::Sweep => reconcile::sweep(&ctx).await.map(|n| {
                        if n > 0 {
                            tracing::info!(executions = n, "recorded executions deleted while not watched");
                        }
                    }),
                };
                if let Err(e) = done {
                    tracing::warn!(error = %e, "cannot record a deleted execution");
                }
            }
        }));
    }
    // Standby until this instance holds the lease; stop when it loses it.
    let lost = Arc::new(AtomicBool::new(false));
    if let Some(mut rx) = leader {
        loop {
            if *rx.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return end(background, stop_task, Stopped::LostLeadership) },
                _ = stop.cancelled() => return end(background, stop_task, Stopped::Shutdown),
            }
        }
        tracing::info!("holding the lease: reconciling");
        is_leader.store(true, Ordering::Relaxed);
        if synced.load(Ordering::Relaxed) {
            ready.store(true, Ordering::Relaxed);
        }
        let (stop, lost) = (stop.clone(), lost.clone());
        background.push(tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if !*rx.borrow() {
                    break;
                }
            }
            tracing::error!("lost the lease: stopping");
            lost.store(true, Ordering::Relaxed);
            stop.cancel();
        }));
    }
    let wake = futures::stream::unfold(wake_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let graceful = stop.clone().cancelled_owned();
    controller
        .reconcile_on(wake)
        .graceful_shutdown_on(graceful)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
    end(background, stop_task, if lost.load(Ordering::Relaxed) { Stopped::LostLeadership } else { Stopped::Shutdown })
}

fn end(background: Vec<tokio::task::JoinHandle<()>>, stop_task: tokio::task::JoinHandle<()>, why: Stopped) -> Stopped {
    for t in background {
        t.abort();
    }
    stop_task.abort();
    why
}
