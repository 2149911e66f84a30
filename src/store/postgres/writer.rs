//! Changes, batched: every change waiting when a connection is free goes into one call of
//! `authd_apply` (one transaction, one commit, one round trip), in arrival order, each
//! seeing the ones before it. Up to [`IN_FLIGHT`] batches run at once, on their own
//! connections; the advisory locks `authd_apply` takes first keep batches that touch the
//! same request, user, entity or rule apart.
//!
//! A batch that fails for good (not a dropped connection or a serialization failure, which
//! are retried whole) is run again one change at a time, so one bad change fails only its
//! own request. Retrying a batch whose COMMIT may have happened is safe: each change with a
//! request finds its replay record and answers with it.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{rows, Db};
use crate::crypto::sha256;
use crate::store::records::{Applied, Change, Reply, RequestKey, StoreError};

/// Batches in flight at once (each on its own connection).
const IN_FLIGHT: usize = 4;
/// Most changes in one batch.
const MAX_BATCH: usize = 256;

const APPLY: &str = "SELECT authd_apply($1, $2, $3)";

struct Job {
    change: Change,
    json: Value,
    locks: Vec<i64>,
    done: oneshot::Sender<Result<Applied, StoreError>>,
}

/// Hands changes to the batching task. Cheap to clone; the task ends with the last clone.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
    /// Changes write their events.
    events: bool,
}

impl Writer {
    /// Starts the batching task; `committed` is woken after each batch commits (the
    /// event publisher looks at once).
    pub fn start(db: Arc<Db>, events: bool, committed: Arc<tokio::sync::Notify>) -> Writer {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(db, queue, committed));
        Writer { jobs, events }
    }

    pub async fn apply(
        &self,
        request: &RequestKey<'_>,
        change: Change,
    ) -> Result<Applied, StoreError> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            json: rows::change_json(request, &change, self.events),
            locks: locks(request, &change),
            change,
            done,
        };
        self.jobs.send(job).map_err(|_| StoreError::Writer)?;
        answer.await.map_err(|_| StoreError::Writer)?
    }
}

/// A stable 64-bit advisory lock key for `parts` (the same on every worker).
fn lock_key(parts: &[&[u8]]) -> i64 {
    let mut text = Vec::new();
    for p in parts {
        text.extend_from_slice(&(p.len() as u32).to_be_bytes());
        text.extend_from_slice(p);
    }
    let digest = sha256(&text);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The advisory locks a change takes: its request's (so one transaction at a time handles
/// a request) and its subject's (a user's tokens and the entity of the same id).
fn locks(request: &RequestKey<'_>, change: &Change) -> Vec<i64> {
    let mut locks = Vec::with_capacity(2);
    if request.binding.is_some() {
        locks.push(lock_key(&[
            b"request",
            request.src.as_bytes(),
            &request.id.to_be_bytes(),
        ]));
    }
    let subjects: Vec<&String> = match change {
        Change::ReplaceToken { user, .. } | Change::RevokeToken { user, .. } => vec![user],
        Change::PutEntity { id, .. } | Change::DeleteEntity { id } => vec![id],
        Change::AddRule { .. } | Change::DeleteRule { .. } => Vec::new(),
        Change::ExpireTokens { tokens } => tokens.iter().map(|t| &t.user).collect(),
    };
    for subject in subjects {
        locks.push(lock_key(&[b"subject", subject.as_bytes()]));
    }
    locks
}

async fn run(
    db: Arc<Db>,
    mut queue: mpsc::UnboundedReceiver<Job>,
    committed: Arc<tokio::sync::Notify>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let db = db.clone();
        let committed = committed.clone();
        tokio::spawn(async move {
            commit(&db, batch).await;
            // Whether or not it wrote events: a look costs the publisher one statement.
            committed.notify_one();
            drop(slot);
        });
    }
}

async fn commit(db: &Db, batch: Vec<Job>) {
    match apply(db, &batch).await {
        Ok(results) => answer(batch, results),
        Err(StoreError::Unavailable) => {
            for job in batch {
                let _ = job.done.send(Err(StoreError::Unavailable));
            }
        }
        Err(_) if batch.len() > 1 => {
            for job in batch {
                let result = apply(db, std::slice::from_ref(&job)).await;
                match result {
                    Ok(r) => answer(vec![job], r),
                    Err(e) => {
                        let _ = job.done.send(Err(e));
                    }
                }
            }
        }
        Err(e) => {
            for job in batch {
                let _ = job.done.send(Err(StoreError::corrupt("transaction", &e)));
            }
        }
    }
}

/// One call of `authd_apply` for `jobs`: what it said of each.
async fn apply(db: &Db, jobs: &[Job]) -> Result<Vec<Value>, StoreError> {
    let batch = Value::Array(jobs.iter().map(|j| j.json.clone()).collect());
    let locks: Vec<i64> = jobs.iter().flat_map(|j| j.locks.iter().copied()).collect();
    let window = db.replays.window_ms.min(i64::MAX as u64) as i64;
    let out: Value = db
        .run(1, async |c| {
            let stmt = c.prepare_cached(APPLY).await?;
            Ok(c.query_one(&stmt, &[&batch, &locks, &window])
                .await?
                .try_get(0)?)
        })
        .await?;
    match out {
        Value::Array(results) if results.len() == jobs.len() => Ok(results),
        other => Err(StoreError::corrupt("authd_apply", other)),
    }
}

fn answer(jobs: Vec<Job>, results: Vec<Value>) {
    for (job, result) in jobs.into_iter().zip(results) {
        let applied = applied(&job.change, &result);
        let _ = job.done.send(applied);
    }
}

fn applied(change: &Change, result: &Value) -> Result<Applied, StoreError> {
    if let Some(reply) = result.get("before") {
        return serde_json::from_value::<Reply>(reply.clone())
            .map(Applied::Before)
            .map_err(|e| StoreError::corrupt("replays", e));
    }
    if result.get("id_reused").is_some() {
        return Ok(Applied::IdReused);
    }
    let changed = rows::changed(result.get("changed").unwrap_or(&Value::Null))?;
    let reply = Reply::of(change, &changed).unwrap_or(Reply::Empty);
    Ok(Applied::Now(changed, reply))
}
