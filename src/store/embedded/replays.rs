//! Replay records: the reply of each state-changing request, kept with its change so that a
//! redelivery is answered identically. `replays` holds `lp(src) ‖ id` → the record;
//! `replay_times` holds `at ‖ lp(src) ‖ id` so that old records are pruned by a range scan.
//!
//! A record binds the request it answers: caller key name, method, and a digest of the
//! arguments. Only a request that matches all of them gets the recorded reply; any other
//! request with the same `src` and `id` is told the id was used. Layout (integers
//! big-endian):
//!
//! ```text
//! 2 (u8) | at ms (u64) | args sha256 (32) | lp(caller) | lp(method) | reply (JSON)
//! ```
//!
//! Records written before the binding existed are JSON objects `{"at", "reply"}` (first byte
//! `{`); they are read as matching any request with their `src` and `id`, as they were
//! written to, until they age out of the window.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Deserialize;

use super::encoding::{decode, lp, replay_key};
use super::writer::{abort, Trees, Tx, TxResult};
use crate::store::records::{Binding, Recorded, ReplayPolicy, Reply, StoreError};

const VERSION: u8 = 2;

/// A request as the writer keeps it (owned: it crosses to the writer thread).
#[derive(Debug, Clone)]
pub struct Requester {
    pub src: String,
    pub id: u64,
    pub at_ms: u64,
    pub caller: String,
    pub method: String,
    pub args_digest: [u8; 32],
}

impl Requester {
    fn binding(&self) -> Binding<'_> {
        Binding {
            caller: &self.caller,
            method: &self.method,
            args_digest: self.args_digest,
        }
    }
}

/// A stored record, decoded.
struct Record {
    at: u64,
    /// `None` for a record written before bindings (it matches any request).
    binding: Option<(String, String, [u8; 32])>,
    reply: Reply,
}

fn encode_record(r: &Requester, reply: &Reply) -> Vec<u8> {
    let reply = serde_json::to_vec(reply).unwrap_or_default();
    let mut out =
        Vec::with_capacity(1 + 8 + 32 + 4 + r.caller.len() + r.method.len() + reply.len());
    out.push(VERSION);
    out.extend_from_slice(&r.at_ms.to_be_bytes());
    out.extend_from_slice(&r.args_digest);
    out.extend_from_slice(&lp(&r.caller));
    out.extend_from_slice(&lp(&r.method));
    out.extend_from_slice(&reply);
    out
}

fn decode_record(bytes: &[u8]) -> Result<Record, StoreError> {
    if bytes.first() == Some(&b'{') {
        #[derive(Deserialize)]
        struct Legacy {
            at: u64,
            reply: Reply,
        }
        let legacy: Legacy = decode("replays", bytes)?;
        return Ok(Record {
            at: legacy.at,
            binding: None,
            reply: legacy.reply,
        });
    }
    let bad = || StoreError::corrupt("replays", "truncated or unknown record");
    let rest = match bytes.split_first() {
        Some((&VERSION, rest)) => rest,
        _ => return Err(bad()),
    };
    let (at, rest) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
    let (digest, rest) = rest.split_first_chunk::<32>().ok_or_else(bad)?;
    let (caller, rest) = take_lp(rest).ok_or_else(bad)?;
    let (method, rest) = take_lp(rest).ok_or_else(bad)?;
    Ok(Record {
        at: u64::from_be_bytes(*at),
        binding: Some((caller, method, *digest)),
        reply: decode("replays", rest)?,
    })
}

fn take_lp(bytes: &[u8]) -> Option<(String, &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<2>()?;
    let len = u16::from_be_bytes(*len) as usize;
    let text = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((text.to_owned(), &rest[len..]))
}

/// What `stored` (the record under a request's `src` and `id`, if any) says of a request
/// with `binding` handled at `now_ms`.
fn judge(
    stored: Option<&[u8]>,
    binding: &Binding<'_>,
    now_ms: u64,
    policy: &ReplayPolicy,
) -> Result<Recorded, StoreError> {
    let Some(bytes) = stored else {
        return Ok(Recorded::Nothing);
    };
    let record = decode_record(bytes)?;
    if record.at.saturating_add(policy.window_ms) < now_ms {
        return Ok(Recorded::Nothing);
    }
    let same = match &record.binding {
        None => true,
        Some((caller, method, digest)) => {
            caller == binding.caller && method == binding.method && *digest == binding.args_digest
        }
    };
    Ok(if same {
        Recorded::Same(record.reply)
    } else {
        Recorded::Other
    })
}

/// What is recorded for the request with this `src`, `id` and binding.
pub fn lookup(
    trees: &Trees,
    src: &str,
    id: u64,
    binding: &Binding<'_>,
    now_ms: u64,
    policy: &ReplayPolicy,
) -> Result<Recorded, StoreError> {
    let stored = trees.replays.get(replay_key(src, id))?;
    judge(stored.as_deref(), binding, now_ms, policy)
}

/// The same, inside a transaction.
pub fn recorded(tx: &Tx<'_>, request: &Requester, policy: &ReplayPolicy) -> TxResult<Recorded> {
    let stored = tx.replays.get(replay_key(&request.src, request.id))?;
    judge(stored.as_deref(), &request.binding(), request.at_ms, policy).map_err(abort)
}

/// Records `reply` for `request`.
pub fn record(tx: &Tx<'_>, request: &Requester, reply: &Reply) -> TxResult<()> {
    let key = replay_key(&request.src, request.id);
    let mut time_key = request.at_ms.to_be_bytes().to_vec();
    time_key.extend_from_slice(&key);
    tx.replays.insert(key, encode_record(request, reply))?;
    tx.replay_times.insert(time_key, &[][..])?;
    Ok(())
}

/// How many replay records there are (time-index entries, counted at open and kept up to
/// date by the writer and the pruner).
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn at_open(trees: &Trees) -> Count {
        Count(AtomicU64::new(trees.replay_times.len() as u64))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    fn sub(&self, n: u64) {
        let _ = self
            .0
            .fetch_update(Relaxed, Relaxed, |c| Some(c.saturating_sub(n)));
    }
}

/// Deletes the records older than the window, then the oldest beyond `max_records`.
/// Returns how many went.
pub fn prune(
    trees: &Trees,
    count: &Count,
    now_ms: u64,
    policy: &ReplayPolicy,
) -> Result<u64, StoreError> {
    let before = now_ms.saturating_sub(policy.window_ms);
    let (mut n, mut early) = (0, 0);
    for item in trees.replay_times.iter() {
        let (k, _) = item?;
        let Some((at, key)) = k.split_first_chunk::<8>() else {
            trees.replay_times.remove(&k)?;
            continue;
        };
        let expired = u64::from_be_bytes(*at) < before;
        if !expired && count.get().saturating_sub(n) <= policy.max_records {
            break;
        }
        // Remove the record only if it is the one this time entry points at (a request id
        // used again after the window has a newer record).
        if let Some(v) = trees.replays.get(key)? {
            if decode_record(&v).map_or(true, |r| r.at.to_be_bytes() == *at) {
                trees.replays.remove(key)?;
            }
        }
        trees.replay_times.remove(&k)?;
        n += 1;
        if !expired {
            early += 1;
        }
    }
    count.sub(n);
    if early > 0 {
        tracing::warn!(
            pruned = early,
            max = policy.max_records,
            "more replay records than replay_max_records: the oldest were pruned inside the replay window (a redelivery of those requests would run again)"
        );
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requester(caller: &str, method: &str, digest: u8) -> Requester {
        Requester {
            src: "s".into(),
            id: 1,
            at_ms: 1_000,
            caller: caller.into(),
            method: method.into(),
            args_digest: [digest; 32],
        }
    }

    #[test]
    fn a_record_answers_only_the_request_it_binds() {
        let policy = ReplayPolicy::default();
        let r = requester("ops", "Entity.Put", 1);
        let reply = Reply::Value(serde_json::json!({"rule_id": 3}));
        let bytes = encode_record(&r, &reply);
        let judge = |caller, method, digest, now| {
            let b = Binding {
                caller,
                method,
                args_digest: [digest; 32],
            };
            judge(Some(&bytes), &b, now, &policy).unwrap()
        };
        assert_eq!(judge("ops", "Entity.Put", 1, 1_000), Recorded::Same(reply));
        assert_eq!(judge("backend", "Entity.Put", 1, 1_000), Recorded::Other);
        assert_eq!(judge("ops", "Entity.Delete", 1, 1_000), Recorded::Other);
        assert_eq!(judge("ops", "Entity.Put", 2, 1_000), Recorded::Other);
        let late = 1_000 + policy.window_ms + 1;
        assert_eq!(judge("ops", "Entity.Put", 1, late), Recorded::Nothing);
        for cut in 0..bytes.len() - 2 {
            assert!(decode_record(&bytes[..cut]).is_err(), "{cut}");
        }
    }

    #[test]
    fn a_record_from_before_bindings_matches_its_src_and_id() {
        let legacy = br#"{"at":5,"reply":"Empty"}"#;
        let b = Binding {
            caller: "x",
            method: "ACL.Add",
            args_digest: [0; 32],
        };
        let policy = ReplayPolicy::default();
        assert_eq!(
            judge(Some(legacy), &b, 6, &policy).unwrap(),
            Recorded::Same(Reply::Empty)
        );
    }
}
