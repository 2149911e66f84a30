//! Wiring: open the store and keys, start the broker session, hand each request to a task
//! of its own, and shut down in order (stop intake, drain, flush, disconnect).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::caller::{self, CallerKeys};
use crate::config::{BrokerAddress, Config};
use crate::crypto::ServerKeys;
use crate::dispatch::{Dispatcher, FrameHandler};
use crate::metrics::Metrics;
use crate::mqtt::{Link, Message, Publisher, Session, SessionOptions, Tls};
use crate::store::{self, GroupCommit, Store};

/// Runs the worker until `shutdown` completes, then stops it cleanly.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let worker = Worker::start(config).await?;
    let failed = worker.failed.clone();
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        _ = failed.cancelled() => {}
    }
    worker.stop().await
}

/// A running worker.
pub struct Worker {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    store: Option<Store>,
    publisher: Publisher,
    link: watch::Receiver<Link>,
    tracker: TaskTracker,
    intake: CancellationToken,
    close: CancellationToken,
    /// Fired when the worker cannot go on safely (the store cannot be made durable).
    failed: CancellationToken,
    session: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    /// Where `/metrics` and `/ready` are served, if anywhere.
    metrics_addr: Option<SocketAddr>,
}

impl Worker {
    /// Opens the store and keys in `config.data` and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Worker> {
        // Before the store: a bad TLS file or a taken port must not leave it open.
        let endpoints = Endpoints::prepare(&config)?;
        let (store, keys) = open_data(&config, true)?;
        let callers = if config.callers.is_empty() {
            let (key, created) = caller::load_or_create_admin_key(&config.data)?;
            let path = caller::admin_key_path(&config.data);
            if created {
                tracing::warn!(path = %path.display(), "no caller keys configured: generated an admin key (quick start only; configure [[caller]] keys for production)");
            } else {
                tracing::info!(path = %path.display(), "no caller keys configured: using the generated admin key");
            }
            CallerKeys::new(&[key])
        } else {
            CallerKeys::new(&config.callers)
        };
        tracing::info!(keys = ?callers, "caller keys loaded");

        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let dispatcher = Arc::new(Dispatcher::new(
            config.clone(),
            callers,
            store.clone(),
            keys,
            metrics.clone(),
        ));
        let background = vec![tokio::spawn(store::prune_replays_every(
            store.clone(),
            config.replay_window(),
            Duration::from_secs(60),
        ))];
        Self::run(
            config,
            endpoints,
            dispatcher,
            metrics,
            Some(store),
            background,
        )
    }

    /// Serves `handler` on the bus with everything but the store: the same session, task
    /// per request, ordered acks and shutdown as authd. `authd null-worker` (the
    /// benchmark's ceiling) is this with a handler that answers `true`.
    pub fn start_with_handler(
        config: Config,
        handler: Arc<dyn FrameHandler>,
    ) -> anyhow::Result<Worker> {
        config.validate()?;
        let endpoints = Endpoints::prepare(&config)?;
        Self::run(
            Arc::new(config),
            endpoints,
            handler,
            Arc::new(Metrics::default()),
            None,
            Vec::new(),
        )
    }

    fn run(
        config: Arc<Config>,
        Endpoints { broker, tls, http }: Endpoints,
        handler: Arc<dyn FrameHandler>,
        metrics: Arc<Metrics>,
        store: Option<Store>,
        background: Vec<JoinHandle<()>>,
    ) -> anyhow::Result<Worker> {
        let commit = store.clone().map(|s| GroupCommit::start(s, 4096));
        let request_topic: Arc<str> = config.request_topic().into();
        let (session, publisher, link) = Session::new(SessionOptions {
            broker,
            client_id: config.client_id.clone(),
            credentials: config
                .broker_username
                .clone()
                .map(|u| (u, config.broker_password.clone().unwrap_or_default())),
            persistent: true,
            manual_acks: true,
            subscriptions: vec![request_topic.to_string(), format!("{request_topic}/#")],
            keep_alive: Duration::from_secs(config.keep_alive_secs),
            max_packet_bytes: config.max_packet_bytes,
            tls,
        });

        let tracker = TaskTracker::new();
        let intake = CancellationToken::new();
        let close = CancellationToken::new();
        let failed = CancellationToken::new();
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        let on_message = {
            let (tracker, publisher, metrics, failed) = (
                tracker.clone(),
                publisher.clone(),
                metrics.clone(),
                failed.clone(),
            );
            move |msg: Message| {
                let permit = match in_flight.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    // QoS 1 requests are bounded by the broker's in-flight window and are
                    // never dropped; QoS 0 ones beyond our limit are.
                    Err(_) if msg.ack.is_some() => None,
                    Err(_) => {
                        metrics.overloaded.fetch_add(1, Relaxed);
                        return;
                    }
                };
                tracker.spawn(handle(
                    handler.clone(),
                    publisher.clone(),
                    metrics.clone(),
                    commit.clone(),
                    request_topic.clone(),
                    msg,
                    permit,
                    failed.clone(),
                ));
            }
        };
        let on_reconnect = {
            let metrics = metrics.clone();
            move || {
                metrics.reconnects.fetch_add(1, Relaxed);
            }
        };
        let session =
            tokio::spawn(session.run(on_message, intake.clone(), close.clone(), on_reconnect));
        let mut background = background;
        let mut metrics_addr = None;
        if let Some(listener) = http {
            metrics_addr = listener.local_addr().ok();
            tracing::info!(addr = ?metrics_addr, "serving /metrics and /ready");
            let endpoint = crate::http::Endpoint {
                metrics: metrics.clone(),
                link: link.clone(),
                stopping: intake.clone(),
            };
            // Ends with the worker: `stop` aborts the background tasks.
            background.push(tokio::spawn(crate::http::serve(
                listener,
                endpoint,
                CancellationToken::new(),
            )));
        }
        Ok(Worker {
            config,
            metrics,
            store,
            publisher,
            link,
            tracker,
            intake,
            close,
            failed,
            session,
            background,
            metrics_addr,
        })
    }

    /// The address `/metrics` and `/ready` are served on (`metrics` in the config), with
    /// the port actually bound.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Waits until the worker is connected and subscribed.
    pub async fn ready(&self) {
        let mut link = self.link.clone();
        let _ = link.wait_for(|l| *l == Link::Ready).await;
    }

    /// Current connection state.
    pub fn link(&self) -> Link {
        *self.link.borrow()
    }

    /// Stops taking requests, lets those in flight finish (bounded by `drain_secs`),
    /// flushes the store and disconnects.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.intake.cancel();
        self.tracker.close();
        let drain = Duration::from_secs(self.config.drain_secs);
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "requests still in flight at the drain limit; the broker will redeliver them"
            );
        }
        for task in &self.background {
            task.abort();
        }
        let store = self.store.clone();
        let flushed =
            tokio::task::spawn_blocking(move || store.map_or(Ok(()), |s| s.flush())).await;
        // A connected session ends on the Disconnect; an unreachable broker on `close`.
        self.publisher.disconnect().await;
        self.close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session).await;
        if self.failed.is_cancelled() {
            anyhow::bail!("stopped because the database could not be made durable");
        }
        match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        }
    }
}

/// What the worker connects to and listens on, checked before anything starts.
struct Endpoints {
    broker: BrokerAddress,
    tls: Option<Tls>,
    /// The metrics/readiness listener, bound.
    http: Option<tokio::net::TcpListener>,
}

impl Endpoints {
    fn prepare(config: &Config) -> anyhow::Result<Endpoints> {
        let broker = BrokerAddress::parse(&config.broker)?;
        let tls = Tls::for_broker(
            &broker,
            config.broker_ca.as_deref(),
            config.broker_cert.as_deref(),
            config.broker_key.as_deref(),
        )?;
        let http = config
            .metrics
            .as_deref()
            .map(crate::http::bind)
            .transpose()?;
        Ok(Endpoints { broker, tls, http })
    }
}

/// Handles one message: dispatch, wait for durability if the store changed, publish the
/// reply, then ack. The ack comes last, so a crash anywhere before it means redelivery.
#[allow(clippy::too_many_arguments)]
async fn handle(
    handler: Arc<dyn FrameHandler>,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    commit: Option<GroupCommit>,
    request_topic: Arc<str>,
    msg: Message,
    _permit: Option<OwnedSemaphorePermit>,
    failed: CancellationToken,
) {
    let suffix = msg
        .topic
        .strip_prefix(&*request_topic)
        .and_then(|rest| rest.strip_prefix('/'));
    let outcome = handler.handle(suffix, &msg.payload, msg.arrived_ms);
    if let (true, Some(commit)) = (outcome.needs_durability, &commit) {
        if let Err(e) = commit.durable().await {
            // Neither reply nor ack: the broker redelivers after restart, and the request is
            // answered from what is really on disk.
            tracing::error!(error = %e, "cannot make changes durable; stopping");
            failed.cancel();
            return;
        }
    }
    if let Some((topic, payload)) = outcome.reply {
        if publisher.publish(topic, payload).await.is_err() {
            return;
        }
    }
    if let Some(label) = outcome.label {
        metrics.answered(label, msg.arrived.elapsed());
    }
    if let Some(ack) = msg.ack {
        publisher.complete(ack).await;
    }
}

/// Opens the data directory of `config`: the database and the server key (both created
/// on first use). Only one process at a time can hold the database.
/// With `flush_on_commit` false (bulk import) changes are flushed only by [`Store::flush`].
pub fn open_data(config: &Config, flush_on_commit: bool) -> anyhow::Result<(Store, ServerKeys)> {
    config.validate()?;
    create_private_dir(&config.data)?;
    let keys = ServerKeys::load_or_create(&crate::keys::key_file(&config.data))?;
    let store = Store::open_with(
        &config.data.join("db"),
        config.cache_mib * 1024 * 1024,
        flush_on_commit,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "opening the database in {}: {e} (is another authd using it?)",
            config.data.display()
        )
    })?;
    Ok((store, keys))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}
