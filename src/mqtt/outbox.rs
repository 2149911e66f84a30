//! Publishing with a receipt: the change events' way onto the connection.
//!
//! rumqttc tells us a PUBACK's packet id, not which publish it acknowledges, and replies
//! publish on the same connection. So events do not go through rumqttc's request channel
//! like replies: the connection task puts them, one at a time, in the event loop's own
//! queue of pending requests, which it serves before the channel. The next QoS 1 publish
//! the loop writes from that queue (told by the queue getting shorter while it polled) is
//! the event, and the packet id it reports (`Outgoing::Publish`, or `Outgoing::AwaitAck`
//! when the id is still taken and the loop waits) is the event's. Its PUBACK is then the
//! broker's receipt for the event ([`Receipt::Acked`]).
//!
//! The connection task only looks between polls, so [`Outbox::send`] wakes an idle
//! connection by asking it to unsubscribe the events topic (a harmless packet: authd never
//! subscribes to it), which makes the loop return.
//!
//! A lost connection loses every receipt still owed ([`Receipt::Lost`]): the publisher
//! sends those events again. rumqttc may also write them again itself on a resumed
//! session: consumers see an event twice and recognise it by its `seq`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::{AsyncClient, EventLoop, Outgoing, Publish, QoS, Request};
use tokio::sync::mpsc;

/// What became of events handed to [`Outbox::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// The broker acknowledged the event with this number.
    Acked(u64),
    /// The connection was lost: every event sent and not acknowledged is lost with it, as
    /// is every event waiting to be written.
    Lost,
}

/// The publisher's handle. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    topic: String,
    client: AsyncClient,
    /// Events waiting for the connection task, with their numbers.
    waiting: Mutex<VecDeque<(u64, Bytes)>>,
    receipts: mpsc::UnboundedSender<Receipt>,
}

impl Outbox {
    /// Hands the event numbered `seq` to the connection. Its receipt comes on the channel
    /// [`Tracker::new`] returned.
    pub fn send(&self, seq: u64, payload: Vec<u8>) {
        let was_empty = {
            let mut waiting = lock(&self.shared.waiting);
            waiting.push_back((seq, payload.into()));
            waiting.len() == 1
        };
        if was_empty {
            // A full request channel means the connection task is busy and looks soon.
            let _ = self
                .shared
                .client
                .try_unsubscribe(self.shared.topic.clone());
        }
    }

    pub fn topic(&self) -> &str {
        &self.shared.topic
    }
}

/// The connection task's side.
pub struct Tracker {
    shared: Arc<Shared>,
    /// Numbers of the events put in the loop's pending queue, not yet written.
    queued: VecDeque<u64>,
    /// Events written and not yet acknowledged, by packet id.
    written: HashMap<u16, u64>,
    /// An event the loop holds back because its packet id is taken (a collision): it is
    /// written, under that id, when the id's PUBACK comes.
    held: Option<(u16, u64)>,
    /// Most publishes the loop keeps unacknowledged.
    max_inflight: u16,
}

impl Tracker {
    /// An outbox publishing on `topic` through `client`'s connection, whose loop lets
    /// `max_inflight` publishes wait for acknowledgement; and the channel of its receipts.
    pub fn new(
        topic: String,
        client: AsyncClient,
        max_inflight: u16,
    ) -> (Tracker, Outbox, mpsc::UnboundedReceiver<Receipt>) {
        let (receipts, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            topic,
            client,
            waiting: Mutex::default(),
            receipts,
        });
        let tracker = Tracker {
            shared: shared.clone(),
            queued: VecDeque::new(),
            written: HashMap::new(),
            held: None,
            max_inflight,
        };
        (tracker, Outbox { shared }, rx)
    }

    /// After a poll that returned `outgoing` (an outgoing packet's event, if it was one),
    /// during which the loop's pending queue went from `pending_before` requests to what
    /// it holds now.
    pub fn saw_outgoing(&mut self, outgoing: &Outgoing, pending_before: usize, now: usize) {
        let from_queue = now < pending_before;
        match *outgoing {
            Outgoing::Publish(pkid) if from_queue => {
                if let Some(seq) = self.queued.pop_front() {
                    self.written.insert(pkid, seq);
                }
            }
            Outgoing::AwaitAck(pkid) if from_queue => {
                if let Some(seq) = self.queued.pop_front() {
                    self.held = Some((pkid, seq));
                }
            }
            // The held event, written once its id's earlier publish was acknowledged.
            Outgoing::Publish(pkid) => {
                if let Some((id, seq)) = self.held.filter(|(id, _)| *id == pkid) {
                    self.held = None;
                    self.written.insert(id, seq);
                }
            }
            _ => {}
        }
    }

    /// A PUBACK arrived.
    pub fn acked(&mut self, pkid: u16) {
        if let Some(seq) = self.written.remove(&pkid) {
            let _ = self.shared.receipts.send(Receipt::Acked(seq));
        }
    }

    /// The connection was lost: every receipt owed is lost, and the events waiting too
    /// (the publisher sends them all again).
    pub fn lost(&mut self) {
        let owed = !self.queued.is_empty()
            || !self.written.is_empty()
            || self.held.is_some()
            || !lock(&self.shared.waiting).is_empty();
        self.queued.clear();
        self.written.clear();
        self.held = None;
        lock(&self.shared.waiting).clear();
        if owed {
            let _ = self.shared.receipts.send(Receipt::Lost);
        }
    }

    /// Puts the next waiting event in the loop's pending queue, if the loop can take it
    /// now: connected, nothing else pending (after a reconnect the loop first resends what
    /// the old connection left), no publish held back, and room under its in-flight limit
    /// (the pending queue bypasses that limit). One at a time, so that each written event
    /// is told apart.
    pub fn feed(&mut self, eventloop: &mut EventLoop) {
        if eventloop.network.is_none()
            || !eventloop.pending.is_empty()
            || !self.queued.is_empty()
            || self.held.is_some()
            || eventloop.state.collision.is_some()
            || eventloop.state.inflight() + 1 >= self.max_inflight
        {
            return;
        }
        let Some((seq, payload)) = lock(&self.shared.waiting).pop_front() else {
            return;
        };
        let publish = Publish::from_bytes(self.shared.topic.clone(), QoS::AtLeastOnce, payload);
        eventloop.pending.push_back(Request::Publish(publish));
        self.queued.push_back(seq);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
