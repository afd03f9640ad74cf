//! Wiring: the hub client, metrics endpoint, leader election, fleet, scheduler and the two
//! controllers. `main` parses flags and calls [`run`].

use crate::context::{Books, Context};
use crate::fleet::Fleet;
use crate::http;
use crate::job_controller;
use crate::leader::Election;
use crate::metrics::Metrics;
use crate::pool_controller;
use crate::scheduler::Scheduler;
use anyhow::{Context as _, Result};
use edgeloom_crds::EdgePool;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Settings of one operator process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Kubeconfig of the hub; default: in-cluster or $KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
    /// The operator's namespace (kubeconfig Secrets, leader Lease).
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Address of /metrics, /healthz, /readyz.
    pub metrics_addr: SocketAddr,
    /// Elect a leader among replicas.
    pub leader_elect: bool,
    /// Lease duration of the election.
    pub lease_duration: Duration,
    /// Longest time between scheduling cycles.
    pub scheduler_interval: Duration,
    /// The Secret (in `namespace`) naming the ledgers' object store.
    pub ledger_store_secret: String,
    /// Where the ledgers live when that Secret does not exist.
    pub ledger_dir: PathBuf,
    /// How often tasks whose job is gone are looked for (docs/ARCHITECTURE.md, "Failure
    /// model").
    pub orphan_sweep: Duration,
    /// Slots a job's status holds itself; a bigger job's are paged into ConfigMaps of
    /// `namespace` (docs/ARCHITECTURE.md, "Bounded status").
    pub inline_slots: usize,
}

/// The ledgers' object store: the one the Secret names, else the local directory.
async fn ledger_backend(
    client: &kube::Client,
    settings: &Settings,
) -> Result<crate::rewards::backend::Backend> {
    use crate::rewards::backend::{StoreConfig, from_hub};
    let config = match from_hub(client, &settings.namespace, &settings.ledger_store_secret)
        .await
        .map_err(anyhow::Error::msg)?
    {
        Some(c) => c,
        None => {
            tracing::warn!(
                secret = %settings.ledger_store_secret, dir = %settings.ledger_dir.display(),
                "no object store Secret: the reward ledgers live in a local directory (give the operator an S3 bucket for production)"
            );
            StoreConfig::local(&settings.ledger_dir)
        }
    };
    let backend = config.open().map_err(anyhow::Error::msg)?;
    tracing::info!(url = %backend.url, "reward ledgers in the object store");
    Ok(backend)
}

async fn hub_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            kube::Client::try_from(config)?
        }
        None => kube::Client::try_default()
            .await
            .context("no kubeconfig and not in a cluster")?,
    })
}

/// Runs the operator until Ctrl-C/SIGTERM (Ok) or lost leadership (Err).
pub async fn run(settings: Settings) -> Result<()> {
    let client = hub_client(settings.kubeconfig.as_ref()).await?;
    let metrics = Metrics::new().context("registering metrics")?;
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("binding {}", settings.metrics_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    tokio::spawn(http::serve(
        listener,
        http::Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));
    client
        .apiserver_version()
        .await
        .context("the hub API server does not answer")?;
    let backend = ledger_backend(&client, &settings).await?;
    ready.store(true, Ordering::Relaxed);

    let election = Election::new(
        &settings.namespace,
        "edgeloom-operator",
        &settings.identity,
        settings.lease_duration,
    );
    if settings.leader_elect {
        election.acquire(&client).await;
    }
    metrics.leader.set(1);

    let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded();
    let fleet = Arc::new(Fleet::new(trigger_tx));
    let scheduler = Arc::new(Scheduler::default());
    let pools = Controller::new(
        Api::<EdgePool>::all(client.clone()),
        kube::runtime::watcher::Config::default(),
    );
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "edgeloom-operator".into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        namespace: settings.namespace.clone(),
        fleet: fleet.clone(),
        scheduler: scheduler.clone(),
        metrics: metrics.clone(),
        recorder,
        pools: pools.store(),
        identity: settings.identity.clone(),
        books: Books::new(client.clone(), &settings.namespace, backend),
        inline_slots: settings.inline_slots,
        pages: Default::default(),
    });
    tokio::spawn(scheduler.run(
        fleet,
        client.clone(),
        metrics.clone(),
        settings.identity.clone(),
        settings.scheduler_interval,
    ));
    tokio::spawn(crate::sweeper::run(ctx.clone(), settings.orphan_sweep));
    let gauges = ctx.clone();
    tokio::spawn(async move {
        loop {
            for (phase, n) in job_controller::count_tasks(&gauges) {
                gauges.metrics.tasks.with_label_values(&[phase]).set(n);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    let controllers = futures::future::join(
        pool_controller::run(ctx.clone(), pools),
        job_controller::run(ctx.clone(), trigger_rx),
    );
    if settings.leader_elect {
        // The lease is renewed on a thread and runtime of its own, with its own client:
        // a busy operator (a thousand jobs reconciling on two cores) must not starve its
        // renewals, or it would give up leading for want of CPU, not of the hub.
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
        let kubeconfig = settings.kubeconfig.clone();
        std::thread::Builder::new()
            .name("leader-lease".into())
            .spawn(move || {
                let held = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| {
                        rt.block_on(async {
                            match hub_client(kubeconfig.as_ref()).await {
                                Ok(client) => election.hold(&client).await,
                                Err(e) => tracing::error!(error = %e, "no hub client to renew the lease with"),
                            }
                        })
                    });
                if let Err(e) = held {
                    tracing::error!(error = %e, "no runtime to renew the lease on");
                }
                let _ = lost_tx.send(());
            })
            .context("starting the lease thread")?;
        tokio::select! {
            _ = controllers => Ok(()),
            _ = lost_rx => {
                metrics.leader.set(0);
                anyhow::bail!("lost leadership; exiting so that a fresh process rejoins as a follower")
            }
        }
    } else {
        controllers.await;
        Ok(())
    }
}
