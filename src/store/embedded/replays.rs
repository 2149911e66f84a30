//! Replay records: the reply of each state-changing request, kept with its change so that a
//! redelivery is answered identically. `replays` holds `lp(src) ‖ id` → [`ReplayRecord`];
//! `replay_times` holds `at ‖ lp(src) ‖ id` so that old records are pruned by a range scan.

use serde::{Deserialize, Serialize};

use super::encoding::{decode, encode, replay_key};
use super::writer::{abort, Requester, Trees, Tx, TxResult};
use crate::store::records::{Reply, StoreError};

/// What is kept of one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayRecord {
    /// UNIX milliseconds when the change was made.
    pub at: u64,
    pub reply: Reply,
}

/// The recorded reply of the request with this `src` and `id`.
pub fn lookup(trees: &Trees, src: &str, id: u64) -> Result<Option<Reply>, StoreError> {
    match trees.replays.get(replay_key(src, id))? {
        None => Ok(None),
        Some(v) => Ok(Some(decode::<ReplayRecord>("replays", &v)?.reply)),
    }
}

/// The same, inside a transaction.
pub fn recorded(tx: &Tx<'_>, request: &Requester) -> TxResult<Option<Reply>> {
    match tx.replays.get(replay_key(&request.src, request.id))? {
        None => Ok(None),
        Some(v) => Ok(Some(
            decode::<ReplayRecord>("replays", &v).map_err(abort)?.reply,
        )),
    }
}

/// Records `reply` for `request`.
pub fn record(tx: &Tx<'_>, request: &Requester, reply: &Reply) -> TxResult<()> {
    let key = replay_key(&request.src, request.id);
    let mut time_key = request.at_ms.to_be_bytes().to_vec();
    time_key.extend_from_slice(&key);
    let record = ReplayRecord {
        at: request.at_ms,
        reply: reply.clone(),
    };
    tx.replays.insert(key, encode(&record))?;
    tx.replay_times.insert(time_key, &[][..])?;
    Ok(())
}

/// Deletes replay records made before `before_ms` (UNIX ms). Returns how many.
pub fn prune(trees: &Trees, before_ms: u64) -> Result<usize, StoreError> {
    let mut n = 0;
    for item in trees.replay_times.range(..before_ms.to_be_bytes()) {
        let (k, _) = item?;
        let (at, key) = k.split_at(8);
        // Remove the record only if it is the one this time entry points at.
        if let Some(v) = trees.replays.get(key)? {
            if decode::<ReplayRecord>("replays", &v)?.at.to_be_bytes() == at {
                trees.replays.remove(key)?;
            }
        }
        trees.replay_times.remove(&k)?;
        n += 1;
    }
    Ok(n)
}
