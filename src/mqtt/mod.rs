//! The broker session. The only module that sees rumqttc (whose MQTT 3.1.1 codec it uses).
//!
//! One task owns the connection ([`Session::run`]): it drives the connection
//! ([`connection`]: many packets per read, everything due in one write), hands each
//! incoming message to a callback that must not block, subscribes after every CONNACK, and
//! reconnects with capped exponential backoff and jitter. Everything else talks to the
//! connection through a [`Publisher`]: publish a reply, then complete the message's [`Ack`];
//! neither waits.
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
use rumqttc::{Connect, Packet, QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::BrokerAddress;

mod connection;
mod outbox;
mod publisher;
mod tls;

use connection::{Ended, Wire};
pub use outbox::{Outbox, Receipt};
use publisher::{lock, AckQueue};
pub use publisher::{Ack, Closed, Publisher};
pub use tls::{Tls, TlsError};

/// How to connect.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub broker: BrokerAddress,
    pub client_id: String,
    /// Account name and password; moved into the session's CONNECT packet by [`Session::new`].
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
    /// CONNECT, with the credentials: sent at every (re)connect.
    connect: Connect,
    wire: Wire,
    acks: Arc<Mutex<AckQueue>>,
    state: watch::Sender<BrokerState>,
    /// The handle publishing with receipts ([`SessionOptions::outbox`]), until
    /// [`Session::outbox`] takes it.
    outbox_handle: Option<(Outbox, mpsc::UnboundedReceiver<Receipt>)>,
}

impl Session {
    /// Prepares a session; nothing connects until [`Session::run`].
    pub fn new(mut options: SessionOptions) -> (Session, Publisher, watch::Receiver<BrokerState>) {
        let mut connect = Connect::new(options.client_id.clone());
        connect.clean_session = !options.persistent;
        connect.keep_alive = options.keep_alive.as_secs().min(u16::MAX.into()) as u16;
        // Moved, not copied: CONNECT keeps the one copy of the password (it is sent at every
        // reconnect); the options keep none.
        if let Some((user, pass)) = options.credentials.take() {
            connect.set_login(user, pass);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (receipts, outbox_handle) = match &options.outbox {
            Some(topic) => {
                let (receipts, receipts_rx) = mpsc::unbounded_channel();
                let outbox = Outbox {
                    topic: topic.clone(),
                    tx: tx.clone(),
                };
                (Some(receipts), Some((outbox, receipts_rx)))
            }
            None => (None, None),
        };
        let wire = Wire::new(rx, !options.manual_acks, receipts, options.max_packet_bytes);
        let acks = Arc::new(Mutex::new(AckQueue::default()));
        let (state, state_rx) = watch::channel(BrokerState::Down);
        let publisher = Publisher {
            tx,
            acks: acks.clone(),
        };
        (
            Session {
                options,
                connect,
                wire,
                acks,
                state,
                outbox_handle,
            },
            publisher,
            state_rx,
        )
    }

    /// With [`SessionOptions::outbox`]: the handle that publishes on its topic with a
    /// receipt for each message (the broker's PUBACK, or the loss of the connection), and
    /// the receipts. Once; before [`Session::run`].
    pub fn outbox(&mut self) -> Option<(Outbox, mpsc::UnboundedReceiver<Receipt>)> {
        self.outbox_handle.take()
    }

    /// Drives the connection until a clean disconnect ([`Publisher::disconnect`]) or until
    /// `close` fires while the broker is unreachable. `on_message` runs on this task: it
    /// must not block, and what it queues on a [`Publisher`] is written with the rest of
    /// what is due after the packets read with its message. Once `intake` fires, new
    /// messages are no longer delivered (nor acked: the broker keeps them for our next
    /// start). `on_reconnect` is called each time a lost connection is re-established,
    /// with the signs of a takeover (logged here at error level).
    pub async fn run(
        mut self,
        mut on_message: impl FnMut(Message),
        intake: CancellationToken,
        close: CancellationToken,
        mut on_reconnect: impl FnMut(Reconnected),
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut ever_connected = false;
        // The last connection was closed by the broker within TAKEOVER_WINDOW, and how
        // long it had lived.
        let mut lost_early: Option<Duration> = None;
        // Connection attempts that failed since the last connection was lost.
        let mut failed_attempts = 0u32;
        // Raised for one connection to read a packet refused as too large.
        let mut max_in = self.options.max_packet_bytes;
        loop {
            let attempt = tokio::select! {
                c = connection::connect(&self.options, &self.connect, &mut self.wire.rbuf, max_in) => c,
                // Connecting is safe to abandon; a live connection is closed by a Disconnect.
                _ = close.cancelled() => return,
            };
            let ended = match attempt {
                Ok((mut io, ack)) => {
                    let connected_at = Instant::now();
                    backoff.reset();
                    tracing::info!(session_present = ack.session_present, broker = %self.options.broker.host, port = self.options.broker.port, tls = self.options.tls.is_some(), "connected to broker");
                    if ever_connected {
                        let signs = Reconnected {
                            session_lost: self.options.persistent && !ack.session_present,
                            closed_early: lost_early.is_some() && failed_attempts == 0,
                        };
                        self.report_takeover(&signs, lost_early);
                        on_reconnect(signs);
                    }
                    ever_connected = true;
                    failed_attempts = 0;
                    // Subscribe every time, session present or not: a session we got back
                    // may not be the one we left (someone connecting with our id can
                    // unsubscribe it), and the topics may have changed since it was made.
                    // Ready comes with the SUBACK.
                    self.wire
                        .resume(ack.session_present, &self.options.subscriptions);
                    let Session {
                        options,
                        wire,
                        acks,
                        state,
                        ..
                    } = &mut self;
                    let keep_alive = options.keep_alive;
                    let incoming = |packet| match packet {
                        Packet::SubAck(ack) => {
                            if grants_all(&options.subscriptions, &ack.return_codes) {
                                let _ = state.send(BrokerState::Ready);
                            } else {
                                tracing::error!(
                                    topics = ?options.subscriptions,
                                    granted = ?ack.return_codes,
                                    "the broker refused a subscription or granted less than QoS 1 (check its ACL and max_qos): not ready, requests would be lost"
                                );
                            }
                            Ok(())
                        }
                        Packet::Publish(p) => {
                            if !intake.is_cancelled() {
                                let ack = (options.manual_acks && p.qos != QoS::AtMostOnce)
                                    .then(|| lock(acks).register(p.pkid));
                                on_message(Message {
                                    topic: p.topic,
                                    payload: p.payload,
                                    arrived_ms: crate::unix_ms(),
                                    arrived: Instant::now(),
                                    ack,
                                });
                            }
                            Ok(())
                        }
                        _ => Ok(()),
                    };
                    let ended = wire.serve(&mut *io, keep_alive, max_in, incoming).await;
                    // A limit raised to read one refused packet lasts one connection.
                    max_in = self.options.max_packet_bytes;
                    let _ = self.state.send(BrokerState::Down);
                    if matches!(ended, Ended::Disconnected) {
                        return;
                    }
                    // No ack of the old connection may be sent on the next: a new epoch.
                    self.wire.epoch = lock(&self.acks).reset();
                    self.wire.lost();
                    let lived = connected_at.elapsed();
                    lost_early =
                        (ended.closed_by_broker() && lived < TAKEOVER_WINDOW).then_some(lived);
                    ended
                }
                Err(e) => {
                    failed_attempts += 1;
                    e
                }
            };
            if close.is_cancelled() {
                return;
            }
            if let Ended::TooLarge(size) = ended {
                // The MQTT client refuses a packet above the limit before reading it, so it
                // is never acknowledged, and on our persistent session the broker delivers
                // it again first thing after every reconnect: one oversized request would
                // keep the worker off the broker for good. Read packets up to its size on
                // the next connection instead; it is then answered (413) and acknowledged
                // like any oversized frame.
                tracing::error!(
                    bytes = size,
                    limit = self.options.max_packet_bytes,
                    "the broker delivered a packet larger than max_packet_bytes; reading it on the next connection. Cap message size at the broker (mosquitto: max_packet_size)"
                );
                max_in = size.max(self.options.max_packet_bytes);
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %ended, retry_in_ms = delay.as_millis() as u64, "broker connection lost or refused");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = close.cancelled() => return,
            }
        }
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
}

/// Whether a SUBACK grants every topic we asked for at QoS 1 or more. A refusal or a grant
/// at QoS 0 (mosquitto's `max_qos`) would lose requests: not ready.
fn grants_all(asked: &[String], codes: &[SubscribeReasonCode]) -> bool {
    codes.len() == asked.len()
        && codes.iter().all(|c| {
            matches!(
                c,
                SubscribeReasonCode::Success(QoS::AtLeastOnce | QoS::ExactlyOnce)
            )
        })
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
