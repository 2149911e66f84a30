//! Publishing with a receipt: the change events' way onto the connection.
//!
//! rumqttc tells us a PUBACK's packet id, not which publish it acknowledges, and replies
//! publish on the same connection. But the event loop takes the publishes from its request
//! channel in order, and reports each one's packet id as it writes it (`Outgoing::Publish`,
//! or `Outgoing::AwaitAck` when the id is still taken and it waits). So, on a connection
//! with an outbox, every publish goes into the channel under one lock ([`Order`]) that
//! notes, in the same order, whether it is an event and which: the connection task reads
//! that note for each publish the loop writes from the channel, and the PUBACK of an
//! event's packet id is the broker's receipt for the event ([`Receipt::Acked`]).
//!
//! The loop also writes publishes that are not from the channel: after a reconnect, what
//! the old connection left unacknowledged and what was still in the channel (its pending
//! queue, told by the queue getting shorter during the poll), and a publish it held back
//! on a taken packet id (told by that id). Neither takes a note.
//!
//! A lost connection loses every receipt still owed ([`Receipt::Lost`]): the publisher
//! sends those events again. rumqttc may also write them again itself on a resumed
//! session: consumers see an event twice and recognise it by its `seq`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, ClientError, EventLoop, Outgoing, QoS, Request};
use tokio::sync::mpsc;

use super::Closed;

/// What became of events handed to [`Outbox::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// The broker acknowledged the event with this number.
    Acked(u64),
    /// The connection was lost: every event sent and not acknowledged is lost with it.
    Lost,
}

/// The publishes in the request channel, oldest first: `Some(seq)` for an event, `None`
/// for anything else. Changed only under its lock, together with the channel.
#[derive(Default)]
pub(super) struct Order(Mutex<VecDeque<Option<u64>>>);

impl Order {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Option<u64>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a QoS 1 publish on `client`'s channel with its note. Waits (without holding
    /// the lock) while the channel is full.
    pub(super) async fn publish(
        &self,
        client: &AsyncClient,
        topic: String,
        payload: Vec<u8>,
        note: Option<u64>,
    ) -> Result<(), Closed> {
        if topic.contains(['+', '#']) {
            // rumqttc refuses it (as it would a full channel): never a topic of ours.
            return Err(Closed);
        }
        let (mut topic, mut payload) = (topic, payload);
        loop {
            {
                let mut notes = self.lock();
                match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                    Ok(()) => {
                        notes.push_back(note);
                        return Ok(());
                    }
                    Err(ClientError::TryRequest(Request::Publish(p))) => {
                        (topic, payload) = (p.topic, p.payload.to_vec());
                    }
                    Err(_) => return Err(Closed),
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The note of the next publish the loop took from the channel.
    fn next(&self) -> Option<u64> {
        self.lock().pop_front().flatten()
    }
}

/// The publisher's handle. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    topic: String,
    client: AsyncClient,
    order: Arc<Order>,
}

impl Outbox {
    /// Queues the event numbered `seq` on the connection. Its receipt comes on the channel
    /// [`crate::mqtt::Session::outbox`] returned.
    pub async fn send(&self, seq: u64, payload: Vec<u8>) -> Result<(), Closed> {
        self.order
            .publish(&self.client, self.topic.clone(), payload, Some(seq))
            .await
    }
}

/// The connection task's side.
pub(super) struct Tracker {
    order: Arc<Order>,
    /// Events written and not yet acknowledged, by packet id.
    written: HashMap<u16, u64>,
    /// A publish the loop holds back because its packet id is taken (a collision), and its
    /// note: it is written, under that id, when the id's PUBACK comes.
    held: Option<(u16, Option<u64>)>,
    receipts: mpsc::UnboundedSender<Receipt>,
}

impl Tracker {
    pub(super) fn new(
        topic: String,
        client: AsyncClient,
        order: Arc<Order>,
    ) -> (Tracker, Outbox, mpsc::UnboundedReceiver<Receipt>) {
        let (receipts, rx) = mpsc::unbounded_channel();
        let tracker = Tracker {
            order: order.clone(),
            written: HashMap::new(),
            held: None,
            receipts,
        };
        (
            tracker,
            Outbox {
                topic,
                client,
                order,
            },
            rx,
        )
    }

    /// After a poll that returned `outgoing` (an outgoing packet's event), during which the
    /// loop's pending queue went from `pending_before` requests to `pending_now`.
    pub(super) fn saw_outgoing(
        &mut self,
        outgoing: &Outgoing,
        pending_before: usize,
        pending_now: usize,
    ) {
        if pending_now < pending_before {
            // Written from the pending queue: nothing of the channel's.
            return;
        }
        match *outgoing {
            // The held publish, written once its id's earlier publish was acknowledged
            // (while one is held the loop takes nothing from the channel).
            Outgoing::Publish(pkid) if self.held.is_some_and(|(id, _)| id == pkid) => {
                if let Some((id, Some(seq))) = self.held.take() {
                    self.written.insert(id, seq);
                }
            }
            Outgoing::Publish(pkid) => {
                if let Some(seq) = self.order.next() {
                    self.written.insert(pkid, seq);
                }
            }
            Outgoing::AwaitAck(pkid) => self.held = Some((pkid, self.order.next())),
            _ => {}
        }
    }

    /// A PUBACK arrived.
    pub(super) fn acked(&mut self, pkid: u16) {
        if let Some(seq) = self.written.remove(&pkid) {
            let _ = self.receipts.send(Receipt::Acked(seq));
        }
    }

    /// The connection was lost. Moves what is still in the request channel to the loop's
    /// pending queue (resent after a reconnect, unnoted) and forgets every note, together
    /// under the lock; every receipt owed is lost.
    pub(super) fn lost(&mut self, eventloop: &mut EventLoop) {
        let mut notes = self.order.lock();
        eventloop.clean();
        let owed = notes.iter().any(Option::is_some)
            || !self.written.is_empty()
            || self.held.is_some_and(|(_, note)| note.is_some());
        notes.clear();
        self.written.clear();
        self.held = None;
        if owed {
            let _ = self.receipts.send(Receipt::Lost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::MqttOptions;

    /// A tracker and its outbox on a client whose event loop never runs: publishes only
    /// queue in its channel, and the test plays the loop's reports.
    fn setup() -> (
        Tracker,
        Outbox,
        mpsc::UnboundedReceiver<Receipt>,
        AsyncClient,
        EventLoop,
    ) {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 16);
        let (tracker, outbox, receipts) =
            Tracker::new("ev".into(), client.clone(), Arc::new(Order::default()));
        (tracker, outbox, receipts, client, eventloop)
    }

    #[tokio::test]
    async fn each_written_packet_id_is_paired_with_its_publish_in_channel_order() {
        let (mut t, outbox, mut receipts, client, mut eventloop) = setup();
        let reply = |c: &AsyncClient, order: Arc<Order>| {
            let c = c.clone();
            async move {
                order
                    .publish(&c, "r/rpc".into(), b"{}".to_vec(), None)
                    .await
            }
        };
        let order = outbox.order.clone();
        reply(&client, order.clone()).await.unwrap();
        outbox.send(1, b"e1".to_vec()).await.unwrap();
        reply(&client, order.clone()).await.unwrap();
        outbox.send(2, b"e2".to_vec()).await.unwrap();

        t.saw_outgoing(&Outgoing::Publish(1), 0, 0); // the reply
        t.saw_outgoing(&Outgoing::Publish(2), 0, 0); // event 1
        t.saw_outgoing(&Outgoing::AwaitAck(3), 0, 0); // the second reply, held on id 3
        t.acked(1);
        t.acked(3); // the earlier publish under id 3 (not ours)
        t.saw_outgoing(&Outgoing::Publish(3), 0, 0); // the held reply written: no note
        t.saw_outgoing(&Outgoing::Publish(4), 0, 0); // event 2
                                                     // A publish from the pending queue (a retransmission) takes no note.
        t.saw_outgoing(&Outgoing::Publish(5), 1, 0);
        assert!(receipts.try_recv().is_err(), "no event acknowledged yet");
        t.acked(4);
        t.acked(2);
        t.acked(5);
        assert_eq!(receipts.try_recv(), Ok(Receipt::Acked(2)));
        assert_eq!(receipts.try_recv(), Ok(Receipt::Acked(1)));
        assert!(receipts.try_recv().is_err());

        // An event written and not acknowledged when the connection goes: lost, and the
        // notes of what was still in the channel go with it.
        outbox.send(3, b"e3".to_vec()).await.unwrap();
        t.saw_outgoing(&Outgoing::Publish(6), 0, 0);
        outbox.send(4, b"e4".to_vec()).await.unwrap();
        t.lost(&mut eventloop);
        assert_eq!(receipts.try_recv(), Ok(Receipt::Lost));
        t.acked(6);
        assert!(
            receipts.try_recv().is_err(),
            "a receipt of the old connection"
        );
        assert!(order.lock().is_empty());
        // What the channel held is now the loop's pending queue (here all six publishes: the
        // loop never ran), resent after a reconnect without a note.
        assert_eq!(eventloop.pending.len(), 6);
        reply(&client, order).await.unwrap();
        t.saw_outgoing(&Outgoing::Publish(7), 0, 0);
        t.acked(7);
        assert!(receipts.try_recv().is_err());
    }
}
