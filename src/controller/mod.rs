//! The Kubernetes operator: reconciles `AgentExecution`s into workspaces and Jobs.

pub mod desired;
pub mod executor;
pub mod metrics;
pub mod queue;
pub mod reconcile;
pub mod status;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::mpsc;

pub use executor::{Executor, LocalExecutor};
pub use reconcile::{Context, ControllerConfig, error_policy, reconcile};

use crate::api::AgentExecution;
use crate::store::Store;

/// How the runner is run.
pub enum ExecutorKind {
    Job,
    /// Child processes: the agentops binary and extra environment for each runner.
    Local {
        bin: std::path::PathBuf,
        env: Vec<(String, String)>,
    },
}

/// Runs the controller until `shutdown` resolves. Reconciles every namespace. With `http`,
/// serves `/healthz`, `/readyz`, `/metrics` and the store's JSON API on that listener.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    store: Option<Store>,
    executor: ExecutorKind,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let executions: Api<AgentExecution> = Api::all(client.clone());
    let jobs: Api<Job> = Api::all(client.clone());
    let jobs_config = watcher::Config::default().labels("app.kubernetes.io/managed-by=agentops");
    let controller =
        Controller::new(executions, watcher::Config::default()).owns(jobs, jobs_config);
    let (wake_tx, wake_rx) = mpsc::unbounded_channel();
    let executor = match executor {
        ExecutorKind::Job => Executor::Job,
        ExecutorKind::Local { bin, env } => {
            Executor::Local(LocalExecutor::new(bin, env, wake_tx.clone()))
        }
    };
    let reporter = Reporter {
        controller: "agentops-controller".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cache = controller.store();
    let mut background = Vec::new();
    {
        let (cache, ready) = (cache.clone(), ready.clone());
        background.push(tokio::spawn(async move {
            // The store's readiness wakes only one waiter at a time (the controller's own), so
            // poll it briefly instead of waiting alongside; it is cheap and only until ready.
            loop {
                match tokio::time::timeout(
                    std::time::Duration::from_millis(100),
                    cache.wait_until_ready(),
                )
                .await
                {
                    Ok(Ok(())) => break ready.store(true, std::sync::atomic::Ordering::Relaxed),
                    Ok(Err(_)) => break,
                    Err(_) => continue,
                }
            }
        }));
    }
    if let Some(listener) = http {
        let state = Arc::new(crate::server::ServerState {
            cache: cache.clone(),
            metrics: metrics.clone(),
            store: store.clone(),
            ready,
        });
        let app = crate::server::router(state);
        background.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }));
    }
    let ctx = Arc::new(Context {
        metrics,
        recorder: Recorder::new(client.clone(), reporter),
        client,
        config,
        store,
        cache,
        executor,
        starting: Default::default(),
        admit: Default::default(),
        wake: wake_tx,
    });
    let wake =
        futures::stream::unfold(
            wake_rx,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        );
    controller
        .reconcile_all_on(wake)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
    for t in background {
        t.abort();
    }
}
