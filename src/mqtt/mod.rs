//! The broker session. The only module that sees rumqttc.
//!
//! One task owns the connection ([`Session::run`]): it drives rumqttc's event loop, hands
//! each incoming message to a callback that must not block, subscribes after every CONNACK,
//! and reconnects with capped exponential backoff and jitter. Everything else talks to the
//! connection through a [`Publisher`]: publish a reply, then complete the message's [`Ack`].
//!
//! Subscribing again on every connection, even when the broker kept our session, is what
//! keeps a session that someone else took over (another client connecting with our client
//! id can unsubscribe it) from leaving us connected but deaf. The session is
//! [`BrokerState::Ready`] only once a SUBACK grants every topic at QoS 1 or more. Signs of a
//! takeover are reported to the `on_reconnect` callback ([`Reconnected`]).
//!
//! Acks are manual (docs/protocol.md#delivery-and-durability). A message is acknowledged only when its handler says so, and
//! acks leave in the order the messages arrived, as MQTT 3.1.1 requires. After a reconnect,
//! acks for messages of the old connection are dropped: the broker redelivers those, and an
//! old packet id may by then name a different message.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    QoS, StateError, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerAddress;

mod outbox;
mod publisher;
mod tls;

use outbox::{Order, Tracker};
pub use outbox::{Outbox, Receipt};
use publisher::{lock, AckQueue};
pub use publisher::{Ack, Closed, Publisher};
pub use tls::{Tls, TlsError};

/// How to connect.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub broker: BrokerAddress,
    pub client_id: String,
    /// Account name and password; moved into the MQTT client's options by [`Session::new`].
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
    /// Publish with receipts on this topic ([`Session::outbox`]); `None`: no outbox.
    pub outbox: Option<String>,
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

/// Connection state, for readiness and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    /// Not connected, or connected but not (yet) subscribed as asked.
    Down,
    /// Connected, and the SUBACK of this connection granted every subscription at QoS 1
    /// or more.
    Ready,
}

/// A connection the broker closed sooner than this after accepting it counts as taken
/// over ([`Reconnected::closed_early`]).
pub const TAKEOVER_WINDOW: Duration = Duration::from_secs(10);

/// What a lost connection coming back looked like: the signs that another client is
/// connecting with our client id. mosquitto, when a client connects with an id already in
/// use, closes the older connection (MQTT 3.1.1 gives no reason) and hands the newcomer
/// the session; with clean session on, it discards the session instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconnected {
    /// The broker no longer had our persistent session (`session_present` 0 on a
    /// reconnect): the requests queued in it are gone. Another client took our id with
    /// clean session on, or the broker lost its state (no persistence, a crash between
    /// autosaves). Only for persistent sessions.
    pub session_lost: bool,
    /// The broker closed the previous connection less than [`TAKEOVER_WINDOW`] after
    /// accepting it, and accepted the very next attempt: it was up all along and dropped
    /// us, as it does when another client connects with our id.
    pub closed_early: bool,
}

impl Reconnected {
    /// Either sign of a takeover.
    pub fn looks_taken_over(&self) -> bool {
        self.session_lost || self.closed_early
    }
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
    /// Publishes with receipts ([`SessionOptions::outbox`]).
    outbox: Option<Tracker>,
    /// Its handle, until [`Session::outbox`] takes it.
    outbox_handle: Option<(Outbox, tokio::sync::mpsc::UnboundedReceiver<Receipt>)>,
}

/// Publishes rumqttc lets wait for their PUBACK.
const MAX_INFLIGHT: u16 = 256;

impl Session {
    /// Prepares a session; nothing connects until [`Session::run`].
    pub fn new(mut options: SessionOptions) -> (Session, Publisher, watch::Receiver<BrokerState>) {
        let mut mqtt = MqttOptions::new(
            options.client_id.clone(),
            options.broker.host.clone(),
            options.broker.port,
        );
        mqtt.set_clean_session(!options.persistent)
            .set_manual_acks(options.manual_acks)
            .set_keep_alive(options.keep_alive)
            .set_max_packet_size(options.max_packet_bytes, options.max_packet_bytes)
            .set_inflight(MAX_INFLIGHT);
        // Moved, not copied: the MQTT client's options keep the one copy of the password
        // (it is sent at every reconnect); the session keeps none.
        if let Some((user, pass)) = options.credentials.take() {
            mqtt.set_credentials(user, pass);
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
        let order = options.outbox.as_ref().map(|_| Arc::new(Order::default()));
        let publisher = Publisher {
            client: client.clone(),
            acks: acks.clone(),
            order: order.clone(),
        };
        let (outbox, outbox_handle) = match (&options.outbox, order) {
            (Some(topic), Some(order)) => {
                let (tracker, outbox, receipts) =
                    Tracker::new(topic.clone(), client.clone(), order);
                (Some(tracker), Some((outbox, receipts)))
            }
            _ => (None, None),
        };
        (
            Session {
                options,
                eventloop,
                client,
                acks,
                state,
                outbox,
                outbox_handle,
            },
            publisher,
            state_rx,
        )
    }

    /// With [`SessionOptions::outbox`]: the handle that publishes on its topic with a
    /// receipt for each message (the broker's PUBACK, or the loss of the connection), and
    /// the receipts. Once; before [`Session::run`].
    pub fn outbox(&mut self) -> Option<(Outbox, tokio::sync::mpsc::UnboundedReceiver<Receipt>)> {
        self.outbox_handle.take()
    }

    /// Drives the connection until a clean disconnect ([`Publisher::disconnect`]) or until
    /// `close` fires while the broker is unreachable. `on_message` runs on this task: it
    /// must hand work elsewhere and return at once. Once `intake` fires, new messages are
    /// no longer delivered (nor acked: the broker keeps them for our next start).
    /// `on_reconnect` is called each time a lost connection is re-established, with the
    /// signs of a takeover (logged here at error level).
    pub async fn run(
        mut self,
        mut on_message: impl FnMut(Message),
        intake: CancellationToken,
        close: CancellationToken,
        mut on_reconnect: impl FnMut(Reconnected),
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut connected = false;
        let mut ever_connected = false;
        // When the broker accepted the current connection.
        let mut connected_at: Option<Instant> = None;
        // The last connection was closed by the broker within TAKEOVER_WINDOW, and how
        // long it had lived.
        let mut lost_early: Option<Duration> = None;
        // Connection attempts that failed since the last connection was lost.
        let mut failed_attempts = 0u32;
        loop {
            let pending_before = self.eventloop.pending.len();
            let event = tokio::select! {
                event = self.eventloop.poll() => event,
                // Connecting is safe to abandon; a live connection is closed by a Disconnect.
                _ = close.cancelled(), if !connected => return,
            };
            if let Some(outbox) = &mut self.outbox {
                match &event {
                    Ok(Event::Outgoing(o)) => {
                        outbox.saw_outgoing(o, pending_before, self.eventloop.pending.len())
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => outbox.acked(ack.pkid),
                    _ => {}
                }
            }
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected = true;
                    connected_at = Some(Instant::now());
                    backoff.reset();
                    // A limit raised to read one refused packet lasts this connection only.
                    self.eventloop.mqtt_options.set_max_packet_size(
                        self.options.max_packet_bytes,
                        self.options.max_packet_bytes,
                    );
                    tracing::info!(session_present = ack.session_present, broker = %self.options.broker.host, port = self.options.broker.port, tls = self.options.tls.is_some(), "connected to broker");
                    if ever_connected {
                        let signs = Reconnected {
                            session_lost: self.options.persistent && !ack.session_present,
                            closed_early: lost_early.is_some() && failed_attempts == 0,
                        };
                        self.report_takeover(&signs, lost_early);
                        on_reconnect(signs);
                    }
                    lost_early = None;
                    failed_attempts = 0;
                    // Every time, session present or not: a session we got back may not be
                    // the one we left (someone connecting with our id can unsubscribe it),
                    // and the topics may have changed since it was made. Ready comes with
                    // the SUBACK.
                    self.subscribe();
                    ever_connected = true;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if self.grants_all(&ack.return_codes) {
                        let _ = self.state.send(BrokerState::Ready);
                    } else {
                        tracing::error!(
                            topics = ?self.options.subscriptions,
                            granted = ?ack.return_codes,
                            "the broker refused a subscription or granted less than QoS 1 (check its ACL and max_qos): not ready, requests would be lost"
                        );
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
                    match connected_at.take() {
                        Some(at) => {
                            let lived = at.elapsed();
                            lost_early =
                                (closed_by_broker(&e) && lived < TAKEOVER_WINDOW).then_some(lived);
                        }
                        None => failed_attempts += 1,
                    }
                    connected = false;
                    {
                        // Under the ack lock, so no ack of the old connection can slip in
                        // between: bump the epoch, then drop any such ack rumqttc still holds.
                        let mut q = lock(&self.acks);
                        q.reset();
                        match &mut self.outbox {
                            // The same, and the outbox's notes with the channel.
                            Some(outbox) => outbox.lost(&mut self.eventloop),
                            None => self.eventloop.clean(),
                        }
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

    /// Whether a SUBACK grants every topic we asked for at QoS 1 or more. A refusal or a
    /// grant at QoS 0 (mosquitto's `max_qos`) would lose requests: not ready.
    fn grants_all(&self, codes: &[SubscribeReasonCode]) -> bool {
        codes.len() == self.options.subscriptions.len()
            && codes.iter().all(|c| {
                matches!(
                    c,
                    SubscribeReasonCode::Success(QoS::AtLeastOnce | QoS::ExactlyOnce)
                )
            })
    }

    fn report_takeover(&self, signs: &Reconnected, lived: Option<Duration>) {
        let client_id = self.options.client_id.as_str();
        if signs.session_lost {
            tracing::error!(
                client_id,
                "the broker no longer had our session: requests queued for us while we were away are lost. Another client connected with our client id and clean session, or the broker lost its state (persistence off?); subscribing again"
            );
        }
        if signs.closed_early {
            tracing::error!(
                client_id,
                lived_ms = lived.map_or(0, |d| d.as_millis() as u64),
                "the broker closed our connection moments after accepting it and took us back at once: another client is probably connecting with our client id. Bind client ids to accounts (mosquitto: use_username_as_clientid true); subscribing again"
            );
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

/// Whether the broker ended the connection (closed or reset it), rather than our side
/// giving up on it (a keep-alive or network timeout, a packet we refused).
fn closed_by_broker(e: &ConnectionError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let io_closed = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe
        )
    };
    match e {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(StateError::Io(e)) | ConnectionError::Io(e) => io_closed(e),
        _ => false,
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
}
