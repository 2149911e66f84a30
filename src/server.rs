//! Wiring: open the store and keys, start the broker session, answer each request (on the
//! connection's task until it has to wait, then in a task of its own), and shut down in
//! order (stop intake, drain, flush, disconnect).

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::caller::{self, CallerKeys};
use crate::config::{BrokerAddress, Config};
use crate::crypto::{KeyFileError, ServerKeys};
use crate::dispatch::{Dispatcher, Responder};
use crate::metrics::Metrics;
use crate::mqtt::{BrokerState, Message, Publisher, Session, SessionOptions, Tls};
use crate::secret::Secret;
use crate::store::{self, Store};

/// How often expired app tokens are looked for and removed (each removal publishes
/// `token.expired`; an expired token stops signing in at once, removed or not), and events
/// past their retention pruned.
const TOKEN_EXPIRY_EVERY: Duration = Duration::from_secs(5);

/// Runs the worker until `shutdown` completes, then stops it cleanly.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Worker::start(config).await?.serve_until(shutdown).await
}

/// A running worker.
pub struct Worker {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    store: Option<Store>,
    publisher: Publisher,
    broker: watch::Receiver<BrokerState>,
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
    ///
    /// The secrets are taken out of `config` first ([`Config::take_secrets`]): the caller
    /// keys are kept as digests and wiped, the broker password moves into the broker
    /// session's CONNECT packet. The configuration shared for the worker's life
    /// ([`Worker::config`]) holds none.
    pub async fn start(mut config: Config) -> anyhow::Result<Worker> {
        config.validate()?;
        let secrets = config.take_secrets();
        // Before the store: a bad TLS file or a taken port must not leave it open.
        let endpoints = Endpoints::prepare(&config)?;
        let (store, keys) = open_data(&config, secrets.store.as_ref(), true).await?;
        let callers = if secrets.callers.is_empty() {
            let (key, created) = caller::load_or_create_admin_key(&config.data)?;
            let path = caller::admin_key_path(&config.data);
            if created {
                tracing::warn!(path = %path.display(), "no caller keys configured: generated an admin key (quick start only; configure [[caller]] keys for production)");
            } else {
                tracing::info!(path = %path.display(), "no caller keys configured: using the generated admin key");
            }
            CallerKeys::new(&[key])
        } else {
            CallerKeys::new(&secrets.callers)
        };
        tracing::info!(keys = ?callers, "caller keys loaded");

        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new(crate::methods::names().collect()));
        let dispatcher = Arc::new(Dispatcher::new(
            config.clone(),
            callers,
            store.clone(),
            keys,
            metrics.clone(),
        ));
        let background = vec![tokio::spawn(store::maintain(
            store.clone(),
            Duration::from_secs(60),
            TOKEN_EXPIRY_EVERY,
            config.event_policy(),
        ))];
        Self::run(
            config,
            secrets.broker_password,
            endpoints,
            dispatcher,
            metrics,
            Some(store),
            background,
        )
    }

    /// Serves `responder` on the bus with everything but the store: the same session,
    /// requests answered inline until they wait, ordered acks and shutdown as authd. The
    /// benchmark's null worker (the ceiling) is this with a responder that answers `true`.
    pub fn start_with_responder<R: Responder>(
        mut config: Config,
        responder: Arc<R>,
    ) -> anyhow::Result<Worker> {
        config.validate()?;
        let secrets = config.take_secrets();
        let endpoints = Endpoints::prepare(&config)?;
        Self::run(
            Arc::new(config),
            secrets.broker_password,
            endpoints,
            responder,
            Arc::new(Metrics::default()),
            None,
            Vec::new(),
        )
    }

    fn run<R: Responder>(
        config: Arc<Config>,
        broker_password: Option<Secret>,
        Endpoints { broker, tls, http }: Endpoints,
        responder: Arc<R>,
        metrics: Arc<Metrics>,
        store: Option<Store>,
        background: Vec<JoinHandle<()>>,
    ) -> anyhow::Result<Worker> {
        #[cfg(feature = "fault-injection")]
        tracing::warn!(
            method = crate::dispatch::FAULT_PANIC_METHOD,
            "built with the `fault-injection` feature (tests only): a request for this method panics its handler. Never run this build in production"
        );
        let request_topic: Arc<str> = config.request_topic().into();
        let (mut session, publisher, broker_state) = Session::new(SessionOptions {
            broker,
            client_id: config.client_id.clone(),
            // The password moves (uncopied) into the session's CONNECT packet, which keeps it
            // for every reconnect; without a username it is dropped, and so wiped.
            credentials: config.broker_username.clone().map(|u| {
                (
                    u,
                    broker_password.map(Secret::into_inner).unwrap_or_default(),
                )
            }),
            persistent: true,
            manual_acks: true,
            subscriptions: config.subscriptions(),
            keep_alive: Duration::from_secs(config.keep_alive_secs),
            max_packet_bytes: config.max_packet_bytes,
            tls,
            outbox: (store.is_some() && config.events).then(|| config.events_topic()),
        });

        let mut background = background;
        if let (Some(store), Some((outbox, receipts))) = (&store, session.outbox()) {
            background.push(tokio::spawn(crate::events::publish(
                store.clone(),
                outbox,
                receipts,
                metrics.clone(),
            )));
        }
        let tracker = TaskTracker::new();
        let intake = CancellationToken::new();
        let close = CancellationToken::new();
        let failed = CancellationToken::new();
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        let serving = Arc::new(Serving {
            responder,
            publisher: publisher.clone(),
            metrics: metrics.clone(),
            request_topic,
            failed: failed.clone(),
            stopping: intake.clone(),
        });
        let on_message = {
            let (tracker, metrics) = (tracker.clone(), metrics.clone());
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
                run_or_spawn(tracker.track_future(serving.clone().answer(msg, permit)));
            }
        };
        let on_reconnect = {
            let metrics = metrics.clone();
            move |signs| metrics.reconnected(signs)
        };
        let session =
            tokio::spawn(session.run(on_message, intake.clone(), close.clone(), on_reconnect));
        let mut metrics_addr = None;
        if let Some(listener) = http {
            metrics_addr = listener.local_addr().ok();
            tracing::info!(addr = ?metrics_addr, "serving /metrics and /ready");
            let endpoint = crate::http::Endpoint {
                metrics: metrics.clone(),
                broker: broker_state.clone(),
                stopping: intake.clone(),
                store: store.clone(),
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
            broker: broker_state,
            tracker,
            intake,
            close,
            failed,
            session,
            background,
            metrics_addr,
        })
    }

    /// Serves until `shutdown` completes (or the worker cannot go on), then stops cleanly.
    pub async fn serve_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let failed = self.failed.clone();
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down"),
            _ = failed.cancelled() => {}
        }
        self.stop().await
    }

    /// The configuration the worker runs with and shares among its tasks, without its
    /// secrets (they were taken out at start).
    pub fn config(&self) -> &Config {
        &self.config
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
        let mut broker = self.broker.clone();
        let _ = broker.wait_for(|b| *b == BrokerState::Ready).await;
    }

    /// The state of the broker connection now.
    pub fn broker_state(&self) -> BrokerState {
        *self.broker.borrow()
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
        let flushed = match &self.store {
            Some(store) => store.flush().await,
            None => Ok(()),
        };
        // A connected session ends on the Disconnect; an unreachable broker on `close`.
        self.publisher.disconnect();
        self.close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session).await;
        if self.failed.is_cancelled() {
            anyhow::bail!("stopped because the database could not be made durable");
        }
        Ok(flushed?)
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

/// What every request's task needs: the responder and the way back to the broker.
struct Serving<R> {
    responder: Arc<R>,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    /// Requests come on this topic, or under it with the method as the last level.
    request_topic: Arc<str>,
    /// Fired when the worker cannot go on safely (the store cannot be made durable).
    failed: CancellationToken,
    /// Fired when the worker stops taking requests: held requests give up (unacknowledged).
    stopping: CancellationToken,
}

impl<R: Responder> Serving<R> {
    /// Answers one message: respond, wait for durability if the reply depends on it, publish
    /// the reply, then ack. The ack comes last, so a crash anywhere before it means
    /// redelivery. `_permit` holds the message's in-flight slot until the end.
    ///
    /// A panic while responding is caught here: the request is answered 500 (when it has an
    /// address) and acknowledged like any other. Left to unwind the task, it would take the
    /// message's [`crate::mqtt::Ack`] with it, and every later ack waits behind that one
    /// (they leave in arrival order): the broker would stop delivering once its in-flight
    /// window filled, and redeliver everything after the next reconnect.
    async fn answer(self: Arc<Self>, msg: Message, _permit: Option<OwnedSemaphorePermit>) {
        let suffix = msg
            .topic
            .strip_prefix(&*self.request_topic)
            .and_then(|rest| rest.strip_prefix('/'));
        let handled = catch_panic(async {
            let mut outcome = self
                .responder
                .respond(suffix, &msg.payload, msg.arrived_ms)
                .await;
            // The store is unavailable: hold the request (no reply, no ack) and try again
            // until it answers. Stopping first leaves it unacknowledged: the broker
            // redelivers it to the next worker.
            let mut pause = Duration::from_millis(100);
            while outcome.hold {
                self.metrics.held.fetch_add(1, Relaxed);
                tokio::select! {
                    _ = self.stopping.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(2));
                outcome = self
                    .responder
                    .respond(suffix, &msg.payload, msg.arrived_ms)
                    .await;
            }
            if outcome.needs_durability {
                self.responder.durable().await?;
            }
            Ok::<_, crate::store::StoreError>(Some(outcome))
        })
        .await;
        let outcome = match handled {
            Ok(Ok(Some(outcome))) => outcome,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                // Neither reply nor ack: the broker redelivers after restart, and the request
                // is answered from what is really on disk.
                tracing::error!(error = %e, "cannot make changes durable; stopping");
                self.failed.cancel();
                return;
            }
            Err(()) => {
                let n = self.metrics.panics.fetch_add(1, Relaxed) + 1;
                tracing::error!(
                    count = n,
                    bytes = msg.payload.len(),
                    "a request handler panicked (a bug; the panic message is above): answering 500 and acknowledging"
                );
                // Finding the address parses the frame again, which may be what panicked.
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    self.responder.panicked(suffix, &msg.payload)
                }))
                .unwrap_or_default()
            }
        };
        if let Some((topic, payload)) = outcome.reply {
            if self.publisher.publish(topic, payload).is_err() {
                return;
            }
        }
        if let Some(label) = outcome.label {
            self.metrics.answered(label, msg.arrived.elapsed());
        }
        if let Some(ack) = msg.ack {
            self.publisher.complete(ack);
        }
    }
}

/// Runs `task` on the calling task until it first has to wait, and makes it a task of its
/// own only then. A request answered from memory (the reads, on the embedded store) is
/// answered, its reply and ack queued, without a task, a wake-up or a thread hop; one
/// that waits (a write, the network store) goes on in its own task. Polling it first with
/// a waker that does nothing is safe because the spawned task polls it again at once,
/// registering its real waker with whatever it waits on.
fn run_or_spawn(task: impl Future<Output = ()> + Send + 'static) {
    let mut task = Box::pin(task);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if task.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(task);
    }
}

/// Runs `future`; a panic inside it ends it with `Err` instead of unwinding further.
async fn catch_panic<F: Future>(future: F) -> Result<F::Output, ()> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    })
    .await
}

/// Opens the PostgreSQL store at `url` with `config`'s pool, deadline, replay window and
/// brute-force guard, checking `keys` against the keys the database knows.
pub async fn open_postgres(
    config: &Config,
    url: &Secret,
    keys: &ServerKeys,
) -> anyhow::Result<Store> {
    let options = crate::store::postgres::Options {
        pool: config.store_pool,
        timeout: Duration::from_millis(config.store_timeout_ms),
        replays: config.replay_policy(),
        lockout: config.lockout(),
        events: config.events,
    };
    let shown = crate::config::redact_url_password(url.expose());
    let store = crate::store::postgres::PostgresStore::open(url.expose(), options, keys)
        .await
        .map_err(|e| anyhow::anyhow!("opening the store {shown}: {e}"))?;
    tracing::info!(store = %shown, "PostgreSQL store open");
    Ok(Store::Postgres(store))
}

/// Opens the store and the server key. The key file is in `config.data`; the store is the
/// sled database there (`store_url` unset) or the PostgreSQL database at `store_url`.
///
/// Embedded: the database and the server key are created on first use, and only together:
/// a database without its key file is refused (its PSK hashes and tokens need that key),
/// never given a new key. The directory and the key files must be owner-only, and so is
/// everything sled creates ([`crate::data_dir`]). Only one process at a time can hold the
/// database. With `flush_on_commit` false (bulk import) changes are durable only after
/// [`Store::flush`].
///
/// PostgreSQL: the schema is migrated, and the key file must be the one the other workers
/// of the database use (checked against the database's record of key ids); a database that
/// records keys refuses a worker with no key file rather than making it a new one.
pub async fn open_data(
    config: &Config,
    store_url: Option<&Secret>,
    flush_on_commit: bool,
) -> anyhow::Result<(Store, ServerKeys)> {
    config.validate()?;
    crate::data_dir::prepare(&config.data)?;
    let key_file = ServerKeys::file_in(&config.data);
    if let Some(url) = store_url {
        let keys = ServerKeys::load_or_create(&key_file).map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok((open_postgres(config, url, &keys).await?, keys));
    }
    let db = config.data.join("db");
    let keys = if db.try_exists()? {
        ServerKeys::load(&key_file).map_err(|e| match e {
            KeyFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                anyhow::anyhow!(
                    "server key file {} is missing, but the database {} exists: its PSK hashes and tokens need the key they were made with, so no new one is made. Restore server.key from your backup; to start over with an empty store instead, move {} away",
                    key_file.display(),
                    db.display(),
                    db.display()
                )
            }
            // The message already names the cause: not a chain that repeats it.
            e => anyhow::anyhow!("{e}"),
        })?
    } else {
        ServerKeys::load_or_create(&key_file).map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let store = Store::open_embedded(
        &db,
        config.cache_mib * 1024 * 1024,
        flush_on_commit,
        config.replay_policy(),
        config.events,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "opening the database in {}: {e} (is another authd using it?)",
            config.data.display()
        )
    })?;
    // Files an older authd made readable by group or others (its umask's 0644).
    let tightened = crate::data_dir::tighten(&db)
        .map_err(|e| anyhow::anyhow!("making {} owner-only: {e}", db.display()))?;
    if tightened > 0 {
        tracing::warn!(path = %db.display(), entries = tightened, "the database had files group or others could read; made them owner-only");
    }
    Ok((store, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_that_never_waits_is_done_at_once_and_one_that_waits_finishes_in_a_task() {
        let answered = Arc::new(AtomicBool::new(false));
        run_or_spawn({
            let answered = answered.clone();
            async move { answered.store(true, Relaxed) }
        });
        assert!(
            answered.load(Relaxed),
            "done before returning, with no task"
        );

        // Polled first with a waker that does nothing, then spawned: the task's own poll
        // must register the real waker, or it would never be woken.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        run_or_spawn({
            let finished = finished.clone();
            async move {
                let _ = rx.await;
                finished.store(true, Relaxed);
            }
        });
        tokio::task::yield_now().await;
        assert!(!finished.load(Relaxed), "waits for its store");
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !finished.load(Relaxed) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the spawned request is woken and finishes");
    }
}
