//! The send side of a session: publish, and acknowledge messages in the order they arrived
//! (MQTT 3.1.1 requires it), never with an ack of an older connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, ClientError, Publish, QoS};

/// A message's place in the ack order.
#[derive(Debug)]
#[must_use = "an Ack not completed holds back every later ack"]
pub struct Ack {
    epoch: u64,
    seq: u64,
}

/// The send side of a session. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    pub(super) client: AsyncClient,
    pub(super) acks: Arc<Mutex<AckQueue>>,
    /// On a connection with an outbox, every publish is noted in order (`outbox.rs`).
    pub(super) order: Option<Arc<super::outbox::Order>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the broker connection is closed")]
pub struct Closed;

impl Publisher {
    /// Queues a QoS 1 publish on the connection. Returns once the connection task has it:
    /// from then on rumqttc resends it until the broker acknowledges it.
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), Closed> {
        match &self.order {
            Some(order) => order.publish(&self.client, topic, payload, None).await,
            None => self
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|_| Closed),
        }
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

    pub(super) fn reset(&mut self) {
        self.epoch += 1;
        self.base += self.slots.len() as u64;
        self.slots.clear();
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
