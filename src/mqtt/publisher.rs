//! The send side of a session: publish, and acknowledge messages in the order they arrived
//! (MQTT 3.1.1 requires it), never with an ack of an older connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use rumqttc::{Publish, QoS};
use tokio::sync::mpsc;

use super::connection::Out;

/// A message's place in the ack order.
#[derive(Debug)]
#[must_use = "an Ack not completed holds back every later ack"]
pub struct Ack {
    epoch: u64,
    seq: u64,
}

/// The send side of a session. Cheap to clone. Nothing here waits: what is asked is
/// queued for the connection task, which writes it with whatever else is due.
#[derive(Clone)]
pub struct Publisher {
    pub(super) tx: mpsc::UnboundedSender<Out>,
    pub(super) acks: Arc<Mutex<AckQueue>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the broker connection is closed")]
pub struct Closed;

impl Publisher {
    /// Queues a QoS 1 publish on the connection: from then on it is written, and resent
    /// after a reconnect on a resumed session, until the broker acknowledges it. `Err` once
    /// the session has ended.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), Closed> {
        let publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        self.tx
            .send(Out::Publish {
                publish,
                receipt: None,
            })
            .map_err(|_| Closed)
    }

    /// Marks a message handled; queues every ack that is now due, in arrival order.
    pub fn complete(&self, ack: Ack) {
        let mut q = lock(&self.acks);
        q.mark_done(&ack);
        q.release(&self.tx);
    }

    /// Asks the connection task to disconnect cleanly once what was asked before is
    /// written; [`super::Session::run`] then returns.
    pub fn disconnect(&self) {
        let _ = self.tx.send(Out::Disconnect);
    }
}

/// Messages awaiting an ack, in arrival order.
#[derive(Default)]
pub(super) struct AckQueue {
    /// Bumped at every disconnect: acks of an older epoch are never sent.
    epoch: u64,
    /// Sequence number of `slots[0]`.
    base: u64,
    /// `(packet id, handled)`.
    slots: VecDeque<(u16, bool)>,
}

impl AckQueue {
    pub(super) fn register(&mut self, pkid: u16) -> Ack {
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

    /// Queues the acks of the handled messages at the front.
    fn release(&mut self, tx: &mpsc::UnboundedSender<Out>) {
        while let Some(&(pkid, true)) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
            let _ = tx.send(Out::Ack {
                epoch: self.epoch,
                pkid,
            });
        }
    }

    /// The connection was lost: acks of its messages are never sent (the broker
    /// redelivers those, and their packet ids may by then name other messages). Returns
    /// the new connection's epoch.
    pub(super) fn reset(&mut self) -> u64 {
        self.epoch += 1;
        self.base += self.slots.len() as u64;
        self.slots.clear();
        self.epoch
    }
}

pub(super) fn lock(m: &Mutex<AckQueue>) -> MutexGuard<'_, AckQueue> {
    // The queue stays consistent even if a holder panicked: every method leaves it valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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
