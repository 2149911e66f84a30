//! Publishing with a receipt: the change events' way onto the connection.
//!
//! The connection assigns each publish its packet id as it writes it ([`super::connection`]),
//! so it knows which PUBACK acknowledges which event: that PUBACK is the broker's receipt
//! ([`Receipt::Acked`]). A lost connection loses every receipt still owed
//! ([`Receipt::Lost`]): those events are dropped from the connection's queues, and the
//! publisher sends them again.

use bytes::Bytes;
use rumqttc::{Publish, QoS};
use tokio::sync::mpsc;

use super::connection::Out;
use super::Closed;

/// What became of events handed to [`Outbox::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// The broker acknowledged the event with this number.
    Acked(u64),
    /// The connection was lost: every event sent and not acknowledged is lost with it.
    Lost,
}

/// The publisher's handle. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    pub(super) topic: String,
    pub(super) tx: mpsc::UnboundedSender<Out>,
}

impl Outbox {
    /// Queues the event numbered `seq` on the connection. Its receipt comes on the channel
    /// [`crate::mqtt::Session::outbox`] returned.
    pub fn send(&self, seq: u64, payload: Vec<u8>) -> Result<(), Closed> {
        let publish =
            Publish::from_bytes(self.topic.clone(), QoS::AtLeastOnce, Bytes::from(payload));
        self.tx
            .send(Out::Publish {
                publish,
                receipt: Some(seq),
            })
            .map_err(|_| Closed)
    }
}
