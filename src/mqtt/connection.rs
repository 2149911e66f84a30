//! The wire: one TCP (or TLS) connection to the broker at a time, driven by hand over
//! rumqttc's MQTT 3.1.1 codec.
//!
//! rumqttc's own event loop writes and flushes each outgoing packet on its own, so every
//! request cost two system calls (its reply and its ack) and two wake-ups of the loop. Here
//! the loop takes everything the process has queued ([`Out`]) since it last looked, encodes
//! it into one buffer and writes that once; incoming packets are read as many as the socket
//! holds per call, and handled (a request answered inline, when it can be) before the next
//! write. The state kept across connections is [`Wire`]: what waits to be written, and the
//! QoS 1 publishes written and not yet acknowledged, resent in order on a resumed session.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, Packet, PingReq, PubAck, Publish, QoS,
    Subscribe, SubscribeFilter,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};
use zeroize::Zeroize;

use super::{Receipt, SessionOptions};

/// Publishes written and not yet acknowledged, at most. Beyond it, what is queued waits.
pub(super) const MAX_INFLIGHT: usize = 256;

/// Bytes of room to read into, at least.
const READ_CHUNK: usize = 16 * 1024;

/// How long connecting (TCP, TLS, CONNECT to CONNACK) and each write may take.
pub(super) const NETWORK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the process asks of the connection ([`super::Publisher`], [`super::Outbox`]), in
/// the order it asked.
#[derive(Debug)]
pub(super) enum Out {
    /// A QoS 1 publish; `receipt`: report its PUBACK (or its loss) under this number.
    Publish {
        publish: Publish,
        receipt: Option<u64>,
    },
    /// Acknowledge the message with this packet id, if it came on connection `epoch`.
    Ack { epoch: u64, pkid: u16 },
    /// Disconnect cleanly.
    Disconnect,
}

/// A byte stream to the broker: TCP or TLS over TCP.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a connection (or an attempt to make one) ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum Ended {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the broker closed the connection")]
    Closed,
    #[error("no answer from the broker within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("the broker sent a packet of {0} bytes, above max_packet_bytes")]
    TooLarge(usize),
    #[error("MQTT protocol error: {0}")]
    Protocol(String),
    /// On request ([`Out::Disconnect`]), or every sender is gone.
    #[error("disconnected")]
    Disconnected,
}

impl Ended {
    /// Whether the broker ended the connection (closed or reset it), rather than our side
    /// giving up on it (a keep-alive or network timeout, a packet we refused).
    pub(super) fn closed_by_broker(&self) -> bool {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        match self {
            Ended::Closed => true,
            Ended::Io(e) => matches!(
                e.kind(),
                ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe
            ),
            _ => false,
        }
    }
}

/// Opens a connection and sends CONNECT (which holds the credentials); returns once the
/// broker accepted it. Bounded by [`NETWORK_TIMEOUT`].
pub(super) async fn connect(
    options: &SessionOptions,
    packet: &Connect,
    rbuf: &mut BytesMut,
    max_in: usize,
) -> Result<(Box<dyn Io>, ConnAck), Ended> {
    let attempt = async {
        let host = options.broker.host.as_str();
        let tcp = TcpStream::connect((host, options.broker.port)).await?;
        // Without it a lone request waits ~40-90 ms for Nagle's algorithm.
        tcp.set_nodelay(true)?;
        let mut io: Box<dyn Io> = match &options.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                Box::new(connector.connect(name, tcp).await?)
            }
        };
        let mut buf = BytesMut::new();
        packet
            .write(&mut buf)
            .map_err(|e| Ended::Protocol(e.to_string()))?;
        let written = io.write_all(&buf).await;
        // It holds the password.
        buf[..].zeroize();
        written?;
        io.flush().await?;
        rbuf.clear();
        let connack = loop {
            match next_packet(rbuf, max_in)? {
                Some(Packet::ConnAck(ack)) => break ack,
                Some(other) => {
                    return Err(Ended::Protocol(format!(
                        "expected CONNACK, got {}",
                        kind(&other)
                    )))
                }
                None => {
                    if io.read_buf(rbuf).await? == 0 {
                        return Err(Ended::Closed);
                    }
                }
            }
        };
        if connack.code != ConnectReturnCode::Success {
            return Err(Ended::Refused(connack.code));
        }
        Ok((io, connack))
    };
    timeout(NETWORK_TIMEOUT, attempt)
        .await
        .unwrap_or(Err(Ended::Timeout(NETWORK_TIMEOUT)))
}

/// The next whole packet in `rbuf`, if it holds one.
fn next_packet(rbuf: &mut BytesMut, max_in: usize) -> Result<Option<Packet>, Ended> {
    match Packet::read(rbuf, max_in) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::Error::InsufficientBytes(more)) => {
            rbuf.reserve(more);
            Ok(None)
        }
        Err(rumqttc::Error::PayloadSizeLimitExceeded(size)) => Err(Ended::TooLarge(size)),
        Err(e) => Err(Ended::Protocol(e.to_string())),
    }
}

/// A packet's name, for errors (never its content).
fn kind(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// A publish written and waiting for its PUBACK.
#[derive(Debug)]
struct InFlight {
    publish: Publish,
    receipt: Option<u64>,
}

/// What the connection keeps across reconnects.
pub(super) struct Wire {
    rx: mpsc::UnboundedReceiver<Out>,
    /// Taken from `rx` and not yet written: a publish waiting for room in `inflight`, and
    /// everything asked after it (acks too leave in the order asked).
    queue: VecDeque<Out>,
    /// Written, not yet acknowledged, in the order written.
    inflight: VecDeque<InFlight>,
    next_pkid: u16,
    /// The connection acks are for; an [`Out::Ack`] of another is dropped.
    pub(super) epoch: u64,
    /// Acknowledge incoming QoS 1 publishes on receipt (no [`Out::Ack`]).
    auto_ack: bool,
    receipts: Option<mpsc::UnboundedSender<Receipt>>,
    max_out: usize,
    wbuf: BytesMut,
    pub(super) rbuf: BytesMut,
}

impl Wire {
    pub(super) fn new(
        rx: mpsc::UnboundedReceiver<Out>,
        auto_ack: bool,
        receipts: Option<mpsc::UnboundedSender<Receipt>>,
        max_out: usize,
    ) -> Wire {
        Wire {
            rx,
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            next_pkid: 0,
            epoch: 0,
            auto_ack,
            receipts,
            max_out,
            wbuf: BytesMut::with_capacity(64 * 1024),
            rbuf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// A packet id no publish in flight has.
    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let id = self.next_pkid;
            if !self.inflight.iter().any(|f| f.publish.pkid == id) {
                return id;
            }
        }
    }

    /// A new connection was accepted: resend what the old one left unacknowledged (on a
    /// resumed session, in the order first sent, marked duplicate; on a new one the broker
    /// has no record of them, and MQTT says to drop them), then subscribe.
    pub(super) fn resume(&mut self, session_present: bool, subscriptions: &[String]) {
        self.wbuf.clear();
        if !session_present {
            self.inflight.clear();
        }
        for f in &mut self.inflight {
            f.publish.dup = true;
            // Written before, so it fits and encodes.
            let _ = f.publish.write(&mut self.wbuf);
        }
        if !subscriptions.is_empty() {
            let mut subscribe = Subscribe::new_many(
                subscriptions
                    .iter()
                    .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)),
            );
            subscribe.pkid = self.pkid();
            let _ = subscribe.write(&mut self.wbuf);
        }
    }

    /// The connection was lost. Every event not yet acknowledged is lost with it (its
    /// publisher sends it again): dropped here, so it is not sent twice by us.
    pub(super) fn lost(&mut self) {
        let before = self.inflight.len() + self.queue.len();
        self.inflight.retain(|f| f.receipt.is_none());
        self.queue.retain(|o| {
            !matches!(
                o,
                Out::Publish {
                    receipt: Some(_),
                    ..
                }
            )
        });
        if self.inflight.len() + self.queue.len() < before {
            if let Some(receipts) = &self.receipts {
                let _ = receipts.send(Receipt::Lost);
            }
        }
    }

    /// A PUBACK came.
    fn acked(&mut self, pkid: u16) {
        // The broker acknowledges in order: almost always the first.
        if let Some(i) = self.inflight.iter().position(|f| f.publish.pkid == pkid) {
            if let Some(InFlight {
                receipt: Some(seq), ..
            }) = self.inflight.remove(i)
            {
                if let Some(receipts) = &self.receipts {
                    let _ = receipts.send(Receipt::Acked(seq));
                }
            }
        }
    }

    /// Takes everything asked so far and encodes what can be written now. `Err` once a
    /// disconnect is asked for (what came before it is encoded).
    fn take(&mut self) -> Result<(), Ended> {
        // Every sender gone shows in `serve`'s wait on the channel.
        while let Ok(out) = self.rx.try_recv() {
            self.queue.push_back(out);
        }
        while let Some(out) = self.queue.pop_front() {
            match out {
                Out::Ack { epoch, pkid } => {
                    if epoch == self.epoch {
                        let _ = PubAck::new(pkid).write(&mut self.wbuf);
                    }
                }
                Out::Publish {
                    mut publish,
                    receipt,
                } => {
                    if self.inflight.len() >= MAX_INFLIGHT {
                        self.queue.push_front(Out::Publish { publish, receipt });
                        break;
                    }
                    if publish.size() > self.max_out {
                        // Callers check first (`publish_fits`); written, it would end the
                        // connection at the broker, and be written again after every
                        // reconnect.
                        tracing::error!(
                            bytes = publish.size(),
                            limit = self.max_out,
                            "a publish above max_packet_bytes: dropped"
                        );
                        continue;
                    }
                    publish.pkid = self.pkid();
                    match publish.write(&mut self.wbuf) {
                        Ok(_) => self.inflight.push_back(InFlight { publish, receipt }),
                        Err(e) => {
                            tracing::error!(error = %e, "a publish that cannot be encoded: dropped")
                        }
                    }
                }
                Out::Disconnect => {
                    let _ = Disconnect.write(&mut self.wbuf);
                    return Err(Ended::Disconnected);
                }
            }
        }
        Ok(())
    }

    /// Writes what is encoded, in one write (TLS may split it into records).
    async fn flush(&mut self, io: &mut dyn Io) -> Result<(), Ended> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            io.write_all(&self.wbuf).await?;
            io.flush().await
        };
        match timeout(NETWORK_TIMEOUT, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Ended::Timeout(NETWORK_TIMEOUT)),
        }
    }

    /// Serves a connection until it ends: writes what is asked, reads what comes (PUBACKs
    /// and PINGRESPs are handled here, every other packet by `incoming`), and pings every
    /// `keep_alive` (0: never). A ping still unanswered when the next is due ends the
    /// connection.
    pub(super) async fn serve(
        &mut self,
        io: &mut dyn Io,
        keep_alive: Duration,
        max_in: usize,
        mut incoming: impl FnMut(Packet) -> Result<(), Ended>,
    ) -> Ended {
        let mut ping = std::pin::pin!(sleep(keep_alive));
        let mut awaiting_pong = false;
        let mut senders_gone = false;
        loop {
            let taken = self.take();
            if let Err(e) = self.flush(io).await {
                return e;
            }
            if let Err(ended) = taken {
                let _ = io.shutdown().await;
                return ended;
            }
            // Room to read into: reclaimed in place once the payloads handed out are
            // dropped, else a new buffer (never a read of a few bytes at a time).
            self.rbuf.reserve(READ_CHUNK);
            tokio::select! {
                // The ping first: a connection that always has something to read still pings.
                biased;
                // A keep-alive of 0 turns pings off (as it does the broker's check).
                _ = &mut ping, if !keep_alive.is_zero() => {
                    if awaiting_pong {
                        return Ended::Timeout(keep_alive);
                    }
                    let _ = PingReq.write(&mut self.wbuf);
                    awaiting_pong = true;
                    ping.as_mut().reset(Instant::now() + keep_alive);
                }
                read = io.read_buf(&mut self.rbuf) => {
                    match read {
                        Ok(0) => return Ended::Closed,
                        Ok(_) => {}
                        Err(e) => return e.into(),
                    }
                    loop {
                        let packet = match next_packet(&mut self.rbuf, max_in) {
                            Ok(Some(p)) => p,
                            Ok(None) => break,
                            Err(e) => return e,
                        };
                        let handled = match packet {
                            Packet::PubAck(ack) => {
                                self.acked(ack.pkid);
                                Ok(())
                            }
                            Packet::PingResp => {
                                awaiting_pong = false;
                                Ok(())
                            }
                            Packet::Publish(p) if p.qos == QoS::ExactlyOnce => Err(Ended::Protocol(
                                "a QoS 2 publish on a QoS 1 subscription".into(),
                            )),
                            Packet::Publish(p) => {
                                if self.auto_ack && p.qos == QoS::AtLeastOnce {
                                    let _ = PubAck::new(p.pkid).write(&mut self.wbuf);
                                }
                                incoming(Packet::Publish(p))
                            }
                            p @ Packet::SubAck(_) => incoming(p),
                            other => Err(Ended::Protocol(format!(
                                "unexpected {} from the broker",
                                kind(&other)
                            ))),
                        };
                        if let Err(e) = handled {
                            return e;
                        }
                    }
                }
                out = self.rx.recv(), if !senders_gone => match out {
                    Some(out) => self.queue.push_back(out),
                    // Every sender is gone: disconnect once what they asked is written.
                    None => {
                        senders_gone = true;
                        self.queue.push_back(Out::Disconnect);
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str) -> Publish {
        Publish::new(topic, QoS::AtLeastOnce, b"{}".to_vec())
    }

    /// Decodes what the wire would write next.
    fn written(wire: &mut Wire) -> Vec<Packet> {
        let mut buf = std::mem::take(&mut wire.wbuf);
        let mut packets = Vec::new();
        while let Ok(Some(p)) = next_packet(&mut buf, 1 << 20) {
            packets.push(p);
        }
        packets
    }

    #[test]
    fn receipts_follow_pubacks_and_a_lost_connection_loses_only_events() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (rtx, mut receipts) = mpsc::unbounded_channel();
        let mut wire = Wire::new(rx, false, Some(rtx), 1 << 20);
        let send = |p: Publish, receipt| {
            tx.send(Out::Publish {
                publish: p,
                receipt,
            })
            .unwrap()
        };
        send(publish("r/rpc"), None);
        send(publish("ev"), Some(1));
        tx.send(Out::Ack { epoch: 0, pkid: 9 }).unwrap();
        tx.send(Out::Ack { epoch: 7, pkid: 8 }).unwrap(); // of another connection
        send(publish("ev"), Some(2));
        wire.take().unwrap();
        let ids: Vec<_> = written(&mut wire)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.topic, p.pkid),
                Packet::PubAck(a) => ("ack".into(), a.pkid),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("r/rpc".to_string(), 1),
                ("ev".into(), 2),
                ("ack".into(), 9),
                ("ev".into(), 3)
            ],
            "in the order asked, one buffer; the other connection's ack dropped"
        );
        wire.acked(3);
        wire.acked(1);
        assert_eq!(receipts.try_recv(), Ok(Receipt::Acked(2)));
        assert!(receipts.try_recv().is_err(), "the reply has no receipt");

        // Lost with event 1 (id 2) unacknowledged: its receipt is lost and it is not resent;
        // a reply still unacknowledged is (on a resumed session).
        send(publish("r/rpc"), None);
        wire.take().unwrap();
        let _ = written(&mut wire);
        wire.lost();
        assert_eq!(receipts.try_recv(), Ok(Receipt::Lost));
        wire.resume(true, &["req".to_string()]);
        let resent = written(&mut wire);
        assert!(
            matches!(&resent[..], [Packet::Publish(p), Packet::Subscribe(_)] if p.dup && p.topic == "r/rpc"),
            "{resent:?}"
        );
        wire.acked(2);
        assert!(
            receipts.try_recv().is_err(),
            "a receipt of the old connection"
        );
        // On a new session nothing is resent.
        wire.lost();
        wire.resume(false, &[]);
        assert!(written(&mut wire).is_empty());
    }

    #[tokio::test]
    async fn a_broker_that_stops_answering_pings_ends_the_connection() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut wire = Wire::new(rx, false, None, 1 << 20);
        let (mut ours, mut broker) = tokio::io::duplex(1 << 16);
        let keep_alive = Duration::from_millis(100);
        let ended = wire.serve(&mut ours, keep_alive, 1 << 20, |_| Ok(())).await;
        assert!(matches!(ended, Ended::Timeout(_)), "{ended:?}");
        let mut got = BytesMut::new();
        broker.read_buf(&mut got).await.unwrap();
        assert_eq!(
            next_packet(&mut got, 1 << 20).unwrap(),
            Some(Packet::PingReq)
        );
        assert_eq!(
            next_packet(&mut got, 1 << 20).unwrap(),
            None,
            "one ping, then gave up"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_keep_alive_of_zero_never_pings() {
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut wire = Wire::new(rx, false, None, 1 << 20);
        let (mut ours, mut broker) = tokio::io::duplex(1 << 16);
        let serving = tokio::time::timeout(
            Duration::from_millis(300),
            wire.serve(&mut ours, Duration::ZERO, 1 << 20, |_| Ok(())),
        )
        .await;
        assert!(serving.is_err(), "still serving: {serving:?}");
        let mut got = BytesMut::new();
        let read = tokio::time::timeout(Duration::from_millis(50), broker.read_buf(&mut got)).await;
        assert!(read.is_err() && got.is_empty(), "nothing written: {got:?}");
    }

    #[test]
    fn publishes_beyond_the_window_wait_and_what_follows_waits_behind_them() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut wire = Wire::new(rx, false, None, 1 << 20);
        for _ in 0..MAX_INFLIGHT + 1 {
            tx.send(Out::Publish {
                publish: publish("r"),
                receipt: None,
            })
            .unwrap();
        }
        tx.send(Out::Ack { epoch: 0, pkid: 5 }).unwrap();
        wire.take().unwrap();
        assert_eq!(written(&mut wire).len(), MAX_INFLIGHT);
        wire.acked(1);
        wire.take().unwrap();
        let next = written(&mut wire);
        assert!(
            matches!(&next[..], [Packet::Publish(p), Packet::PubAck(a)] if p.pkid == MAX_INFLIGHT as u16 + 1 && a.pkid == 5),
            "{next:?}"
        );
    }
}
