//! Change events (the outbox): `events` maps `seq` (u64 BE) to `at` (u64 BE, UNIX ms) ‖ the
//! event's JSON, written by the writer thread in the transaction of the change that made
//! it; `meta`'s `event_seq` is the last number given. `event_marks` (outside every
//! transaction) holds `sent`, the last event the broker acknowledged with all before it,
//! and `pruned`, the last event pruned.
//!
//! An event is handed to the publisher and to `Events.Since` only once it is on stable
//! storage ([`Durable`]): published before its sync, a power cut could take the change
//! back while a consumer holds its event, and the number would be given again.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use super::encoding::u64_of;
use super::writer::{abort, Trees, Tx, TxResult};
use crate::store::events::{EventBody, EventPage, StoredEvent};
use crate::store::records::StoreError;

const EVENT_SEQ: &str = "event_seq";
const SENT: &str = "sent";
const PRUNED: &str = "pruned";

/// The last event on stable storage, and a wake-up for the publisher when it moves.
#[derive(Default)]
pub struct Durable {
    seq: AtomicU64,
    pub moved: tokio::sync::Notify,
}

impl Durable {
    /// At open: every event in the database is durable.
    pub fn at_open(trees: &Trees) -> Result<Durable, StoreError> {
        let durable = Durable::default();
        durable.seq.store(last_seq(trees)?, SeqCst);
        Ok(durable)
    }

    pub fn get(&self) -> u64 {
        self.seq.load(SeqCst)
    }

    /// Everything up to `seq` is on stable storage now.
    pub fn advance(&self, seq: u64) {
        if self.seq.fetch_max(seq, SeqCst) < seq {
            self.moved.notify_one();
        }
    }
}

/// The last number given to an event (committed, maybe not yet synced).
pub fn last_seq(trees: &Trees) -> Result<u64, StoreError> {
    mark(&trees.meta, EVENT_SEQ)
}

fn mark(tree: &sled::Tree, key: &str) -> Result<u64, StoreError> {
    match tree.get(key)? {
        Some(v) => u64_of(&v, "event marks"),
        None => Ok(0),
    }
}

/// Writes `bodies` as the next events, at `at_ms`, inside a transaction.
pub fn append(tx: &Tx<'_>, bodies: &[EventBody], at_ms: u64) -> TxResult<()> {
    if bodies.is_empty() {
        return Ok(());
    }
    let mut seq = match tx.meta.get(EVENT_SEQ)? {
        Some(v) => u64_of(&v, "meta").map_err(abort)?,
        None => 0,
    };
    for body in bodies {
        seq += 1;
        let mut value = at_ms.to_be_bytes().to_vec();
        value.extend_from_slice(&body.render(seq, at_ms));
        tx.events.insert(&seq.to_be_bytes(), value)?;
    }
    tx.meta.insert(EVENT_SEQ, &seq.to_be_bytes())?;
    Ok(())
}

/// Up to `limit` durable events after `after`, in order.
pub fn after(
    trees: &Trees,
    after: u64,
    durable: u64,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut out = Vec::new();
    if after >= durable {
        return Ok(out);
    }
    for item in trees
        .events
        .range((after + 1).to_be_bytes()..=durable.to_be_bytes())
        .take(limit)
    {
        let (k, v) = item?;
        let json = v
            .get(8..)
            .ok_or_else(|| StoreError::corrupt("events", "short record"))?;
        out.push(StoredEvent {
            seq: u64_of(&k, "events")?,
            json: json.to_vec(),
        });
    }
    Ok(out)
}

/// `Events.Since`: durable events after `after`, with the head and what was pruned.
pub fn since(
    trees: &Trees,
    after_seq: Option<u64>,
    durable: u64,
    limit: usize,
) -> Result<EventPage, StoreError> {
    Ok(EventPage {
        events: match after_seq {
            Some(a) => after(trees, a, durable, limit)?,
            None => Vec::new(),
        },
        head: durable,
        pruned_through: mark(&trees.event_marks, PRUNED)?,
    })
}

/// The last event the broker acknowledged, with every one before it.
pub fn sent(trees: &Trees) -> Result<u64, StoreError> {
    mark(&trees.event_marks, SENT)
}

/// Records that every event up to `seq` was acknowledged. Not synced: losing it to a crash
/// publishes those events again, which consumers recognise by `seq`.
pub fn mark_sent(trees: &Trees, seq: u64) -> Result<(), StoreError> {
    if seq > sent(trees)? {
        trees.event_marks.insert(SENT, &seq.to_be_bytes())?;
    }
    Ok(())
}

/// Deletes the events made before `before_ms` that were sent; how many.
pub fn prune(trees: &Trees, before_ms: u64) -> Result<u64, StoreError> {
    let sent = sent(trees)?;
    let mut n = 0;
    let mut last = None;
    for item in trees.events.range(..=sent.to_be_bytes()) {
        let (k, v) = item?;
        let at = v
            .first_chunk::<8>()
            .map(|at| u64::from_be_bytes(*at))
            .ok_or_else(|| StoreError::corrupt("events", "short record"))?;
        if at >= before_ms {
            break;
        }
        trees.events.remove(&k)?;
        last = Some(u64_of(&k, "events")?);
        n += 1;
    }
    if let Some(last) = last {
        trees.event_marks.insert(PRUNED, &last.to_be_bytes())?;
    }
    Ok(n)
}
