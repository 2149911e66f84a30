//! The broker session. The only module that sees rumqttc.
//!
//! One task owns the connection ([`Session::run`]): it drives rumqttc's event loop, hands
//! each incoming message to a callback that must not block, subscribes when the broker has
//! no session for us, and reconnects with capped exponential backoff and jitter. Everything
//! else talks to the connection through a [`Publisher`]: publish a reply, then complete the
//! message's [`Ack`].
//!
//! Acks are manual (docs/protocol.md#delivery-and-durability). A message is acknowledged only when its handler says so, and
//! acks leave in the order the messages arrived, as MQTT 3.1.1 requires. After a reconnect,
//! acks for messages of the old connection are dropped: the broker redelivers those, and an
//! old packet id may by then name a different message.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::tokio_rustls::rustls;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions,
    Outgoing, Packet, Publish, QoS, StateError, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerAddress;

/// How to connect.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub broker: BrokerAddress,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    /// Keep the session (and queued messages) across disconnects.
    pub persistent: bool,
    /// Acks only through [`Publisher::complete`]; otherwise rumqttc acks on receipt.
    pub manual_acks: bool,
    /// Topics to subscribe to, QoS 1.
    pub subscriptions: Vec<String>,
    pub keep_alive: Duration,
    pub max_packet_bytes: usize,
    /// TLS (`mqtts://`); `None` is plain TCP.
    pub tls: Option<Tls>,
}

/// TLS to the broker: the roots that may sign its certificate and, optionally, our client
/// certificate. Loaded and checked when made, so a bad file fails at start, not at connect.
/// rustls with the ring provider; the broker's name (or IP) must match its certificate.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

/// A TLS file that could not be used; names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("no broker_ca given and no trusted roots found on this system")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Setup(String),
}

impl Tls {
    /// The TLS settings for `broker`: `None` for `mqtt://`, else [`Tls::from_files`].
    /// `cert` and `key` are used only together.
    pub fn for_broker(
        broker: &BrokerAddress,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Tls>, TlsError> {
        if !broker.tls {
            return match ca.or(cert).or(key) {
                Some(path) => Err(TlsError::File {
                    path: path.to_path_buf(),
                    message: "TLS files need an mqtts:// broker".into(),
                }),
                None => Ok(None),
            };
        }
        Tls::from_files(ca, cert.zip(key)).map(Some)
    }

    /// Trusts the certificates in the PEM file `ca` (or the system's roots when `None`) and
    /// presents `client` (PEM certificate chain, PEM private key) when given.
    pub fn from_files(ca: Option<&Path>, client: Option<(&Path, &Path)>) -> Result<Tls, TlsError> {
        let file_error = |path: &Path, message: String| TlsError::File {
            path: path.to_path_buf(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots.add(cert).map_err(|e| {
                        file_error(path, format!("not a usable CA certificate: {e}"))
                    })?;
                }
            }
            None => {
                let (added, _) =
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if added == 0 {
                    return Err(TlsError::NoRoots);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| file_error(key, format!("no usable PEM private key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| file_error(cert, format!("client certificate and key: {e}")))?
            }
        };
        Ok(Tls {
            config: Arc::new(config),
        })
    }
}

/// Every certificate in a PEM file; none is an error.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |message: String| TlsError::File {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(format!("cannot read PEM: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error("no CERTIFICATE in this PEM file".into()));
    }
    Ok(certs)
}

/// Bytes a QoS 1 PUBLISH adds to its topic and payload: packet type, up to 4 bytes of
/// remaining length, topic length, packet id.
pub const PUBLISH_OVERHEAD: usize = 1 + 4 + 2 + 2;

/// Whether a QoS 1 publish of `payload_len` bytes to `topic` fits in `max_packet_bytes`.
/// One that does not is refused by the MQTT client when it is written, which drops the
/// connection; the unacknowledged publish would then be written again after every
/// reconnect. Check before publishing.
pub fn publish_fits(topic: &str, payload_len: usize, max_packet_bytes: usize) -> bool {
    topic.len() + payload_len + PUBLISH_OVERHEAD <= max_packet_bytes
}

/// One message received.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// UNIX ms when it came off the connection.
    pub arrived_ms: u64,
    /// The same moment on the monotonic clock (for latency).
    pub arrived: Instant,
    /// Complete it (with [`Publisher::complete`]) once handled; `None` for QoS 0.
    pub ack: Option<Ack>,
}

/// A message's place in the ack order.
#[derive(Debug)]
#[must_use = "an Ack not completed holds back every later ack"]
pub struct Ack {
    epoch: u64,
    seq: u64,
}

/// Connection state, for readiness and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    Down,
    /// Connected and every subscription granted.
    Ready,
}

/// The send side of a session. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    acks: Arc<Mutex<AckQueue>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the broker connection is closed")]
pub struct Closed;

impl Publisher {
    /// Queues a QoS 1 publish on the connection. Returns once the connection task has it:
    /// from then on rumqttc resends it until the broker acknowledges it.
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), Closed> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|_| Closed)
    }

    /// Marks a message handled; sends every ack that is now due, in arrival order.
    pub async fn complete(&self, ack: Ack) {
        let mut retry = {
            let mut q = lock(&self.acks);
            q.mark_done(&ack);
            q.release(&self.client)
        };
        // The request channel was full: wait for the connection task to drain it. We never
        // block while holding the lock, which the connection task also takes.
        while retry {
            tokio::time::sleep(Duration::from_millis(1)).await;
            retry = lock(&self.acks).release(&self.client);
        }
    }

    /// Asks the connection task to disconnect cleanly; [`Session::run`] then returns.
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

/// Messages awaiting an ack, in arrival order.
#[derive(Default)]
struct AckQueue {
    /// Bumped at every disconnect: acks of an older epoch are never sent.
    epoch: u64,
    /// Sequence number of `slots[0]`.
    base: u64,
    /// `(packet id, handled)`.
    slots: VecDeque<(u16, bool)>,
}

impl AckQueue {
    fn register(&mut self, pkid: u16) -> Ack {
        let seq = self.base + self.slots.len() as u64;
        self.slots.push_back((pkid, false));
        Ack {
            epoch: self.epoch,
            seq,
        }
    }

    fn mark_done(&mut self, ack: &Ack) {
        if ack.epoch != self.epoch {
            return;
        }
        if let Some(slot) = ack
            .seq
            .checked_sub(self.base)
            .and_then(|i| self.slots.get_mut(i as usize))
        {
            slot.1 = true;
        }
    }

    /// Sends the acks of the handled messages at the front. Returns true if the request
    /// channel was full and some remain.
    fn release(&mut self, client: &AsyncClient) -> bool {
        while let Some(&(pkid, true)) = self.slots.front() {
            let mut publish = Publish::new("", QoS::AtLeastOnce, Vec::new());
            publish.pkid = pkid;
            match client.try_ack(&publish) {
                Ok(()) => {
                    self.slots.pop_front();
                    self.base += 1;
                }
                Err(ClientError::TryRequest(_)) => return true,
                // The event loop is gone; nothing more can be sent.
                Err(_) => return false,
            }
        }
        false
    }

    fn reset(&mut self) {
        self.epoch += 1;
        self.base += self.slots.len() as u64;
        self.slots.clear();
    }
}

fn lock(m: &Mutex<AckQueue>) -> MutexGuard<'_, AckQueue> {
    // The queue stays consistent even if a holder panicked: every method leaves it valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exponential backoff with full jitter between `min` and `max`.
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }
    pub fn reset(&mut self) {
        self.next = self.min;
    }
    /// The next delay: uniform in [min, current], and the current bound doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let bound = self.next;
        self.next = (self.next * 2).min(self.max);
        let span = bound.saturating_sub(self.min).as_millis() as u64;
        let r = u64::from_le_bytes(crate::crypto::random_bytes());
        self.min + Duration::from_millis(if span == 0 { 0 } else { r % (span + 1) })
    }
}

/// The connection task's half.
pub struct Session {
    options: SessionOptions,
    eventloop: EventLoop,
    client: AsyncClient,
    acks: Arc<Mutex<AckQueue>>,
    state: watch::Sender<BrokerState>,
}

impl Session {
    /// Prepares a session; nothing connects until [`Session::run`].
    pub fn new(options: SessionOptions) -> (Session, Publisher, watch::Receiver<BrokerState>) {
        let mut mqtt = MqttOptions::new(
            options.client_id.clone(),
            options.broker.host.clone(),
            options.broker.port,
        );
        mqtt.set_clean_session(!options.persistent)
            .set_manual_acks(options.manual_acks)
            .set_keep_alive(options.keep_alive)
            .set_max_packet_size(options.max_packet_bytes, options.max_packet_bytes)
            .set_inflight(256);
        if let Some((user, pass)) = &options.credentials {
            mqtt.set_credentials(user.clone(), pass.clone());
        }
        if let Some(tls) = &options.tls {
            mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.config.clone(),
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(mqtt, 1024);
        let mut net = NetworkOptions::new();
        // Without it a lone request waits ~40-90 ms for Nagle's algorithm.
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        eventloop.set_network_options(net);
        let acks = Arc::new(Mutex::new(AckQueue::default()));
        let (state, state_rx) = watch::channel(BrokerState::Down);
        let publisher = Publisher {
            client: client.clone(),
            acks: acks.clone(),
        };
        (
            Session {
                options,
                eventloop,
                client,
                acks,
                state,
            },
            publisher,
            state_rx,
        )
    }

    /// Drives the connection until a clean disconnect ([`Publisher::disconnect`]) or until
    /// `close` fires while the broker is unreachable. `on_message` runs on this task: it
    /// must hand work elsewhere and return at once. Once `intake` fires, new messages are
    /// no longer delivered (nor acked: the broker keeps them for our next start).
    /// `on_reconnect` is called each time a lost connection is re-established.
    pub async fn run(
        mut self,
        mut on_message: impl FnMut(Message),
        intake: CancellationToken,
        close: CancellationToken,
        mut on_reconnect: impl FnMut(),
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut connected = false;
        let mut ever_connected = false;
        loop {
            let event = tokio::select! {
                event = self.eventloop.poll() => event,
                // Connecting is safe to abandon; a live connection is closed by a Disconnect.
                _ = close.cancelled(), if !connected => return,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected = true;
                    backoff.reset();
                    // A limit raised to read one refused packet lasts this connection only.
                    self.eventloop.mqtt_options.set_max_packet_size(
                        self.options.max_packet_bytes,
                        self.options.max_packet_bytes,
                    );
                    if ever_connected {
                        on_reconnect();
                    }
                    tracing::info!(session_present = ack.session_present, broker = %self.options.broker.host, port = self.options.broker.port, tls = self.options.tls.is_some(), "connected to broker");
                    // Subscribe when the broker lost our session, and once per start in case
                    // the topics changed since the session was made.
                    if !ack.session_present || !ever_connected {
                        self.subscribe();
                    } else {
                        let _ = self.state.send(BrokerState::Ready);
                    }
                    ever_connected = true;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        tracing::error!(topics = ?self.options.subscriptions, "the broker refused a subscription (check its ACL)");
                    } else {
                        let _ = self.state.send(BrokerState::Ready);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if intake.is_cancelled() {
                        continue;
                    }
                    let ack = (self.options.manual_acks && p.qos != QoS::AtMostOnce)
                        .then(|| lock(&self.acks).register(p.pkid));
                    on_message(Message {
                        topic: p.topic,
                        payload: p.payload,
                        arrived_ms: crate::unix_ms(),
                        arrived: Instant::now(),
                        ack,
                    });
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    let _ = self.state.send(BrokerState::Down);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = self.state.send(BrokerState::Down);
                    if close.is_cancelled() {
                        return;
                    }
                    connected = false;
                    {
                        // Under the ack lock, so no ack of the old connection can slip in
                        // between: bump the epoch, then drop any such ack rumqttc still holds.
                        let mut q = lock(&self.acks);
                        q.reset();
                        self.eventloop.clean();
                    }
                    if let Some(size) = refused_packet_size(&e) {
                        // The MQTT client refuses a packet above the limit before reading it,
                        // so it is never acknowledged, and on our persistent session the
                        // broker delivers it again first thing after every reconnect: one
                        // oversized request would keep the worker off the broker for good.
                        // Read packets up to its size on the next connection instead; it is
                        // then answered (413) and acknowledged like any oversized frame.
                        tracing::error!(
                            bytes = size,
                            limit = self.options.max_packet_bytes,
                            "the broker delivered a packet larger than max_packet_bytes; reading it on the next connection. Cap message size at the broker (mosquitto: max_packet_size)"
                        );
                        self.eventloop.mqtt_options.set_max_packet_size(
                            size.max(self.options.max_packet_bytes),
                            self.options.max_packet_bytes,
                        );
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection lost or refused");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = close.cancelled() => return,
                    }
                }
            }
        }
    }

    fn subscribe(&self) {
        let topics = self
            .options
            .subscriptions
            .iter()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        // try_: this is the connection task; awaiting the request channel here deadlocks.
        if let Err(e) = self.client.try_subscribe_many(topics) {
            tracing::error!(error = %e, "could not queue the subscription");
        }
    }
}

/// The size of an incoming packet the MQTT client refused as too large, if that is what
/// ended the connection.
fn refused_packet_size(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_secs(30));
        }
        assert_eq!(b.next, Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn acks_leave_in_arrival_order_and_old_epochs_are_ignored() {
        let mut q = AckQueue::default();
        let a = q.register(1);
        let b = q.register(2);
        q.mark_done(&b);
        assert_eq!(
            q.slots.front(),
            Some(&(1, false)),
            "b is done but waits behind a"
        );
        q.mark_done(&a);
        assert_eq!(q.slots.iter().filter(|s| s.1).count(), 2);
        q.reset();
        let c = q.register(1);
        assert_eq!(c.seq, 2);
        q.mark_done(&a); // of the old connection
        assert_eq!(q.slots.front(), Some(&(1, false)));
    }
}
