//! The one thread that writes, and group commit.
//!
//! Every sled transaction, however small, seals sled's write buffer and waits for it to reach
//! the disk, and transactions run one at a time, so one change per transaction caps the write
//! rate near one disk write per change. The writer takes every job waiting for it and commits
//! their changes in one transaction, in arrival order (each sees the ones before it), so
//! concurrent changes share that disk write and then one flush: group commit. If the batch
//! fails, each change is run again alone, so one bad change fails only its own request.
//!
//! A change returns only once it is on stable storage ([`Disk::sync`]: sled's flush, then an
//! `fdatasync` of its log), unless the store was opened for bulk import, which syncs once at
//! the end. A [`Job::Barrier`] returns once everything committed before it is on stable
//! storage: a reader that saw a record whose batch may still be syncing waits on one.
//!
//! The sync is a wait for the disk, not work: a second thread, the syncer, does it while
//! the writer commits the next batch. The writer hands each committed batch's answers to
//! the syncer, which takes every batch handed over so far, syncs once and answers them all;
//! batches handed over meanwhile wait for its next sync. A batch is handed over only after
//! it is committed, so the sync that answers it started after its commit.

use std::sync::{Arc, Mutex, RwLock};

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use tokio::sync::oneshot;

use super::disk::Disk;
use super::events::{self, Durable};
use super::replays::{self, Requester};
use super::{entities, rules, tokens};
use crate::rules::RuleIndex;
use crate::store::events::EventBody;
use crate::store::records::{
    Applied, Change, Changed, Record, Recorded, ReplayPolicy, Reply, StoreError,
};

/// The trees of the database.
#[derive(Clone)]
pub struct Trees {
    /// `schema_version`; `next_rule_id` (u64 BE), so rule ids are never reused.
    pub meta: sled::Tree,
    /// `rule id` (u64 BE) → `Rule` (JSON).
    pub rules: sled::Tree,
    /// `lp(user) ‖ host` → `TokenRecord` (JSON): the live token of each (user, host).
    pub tokens: sled::Tree,
    /// `token id` → `lp(user) ‖ host`: finds a presented token's owner.
    pub token_ids: sled::Tree,
    /// `id` → entity record (binary, see `encoding`).
    pub entities: sled::Tree,
    /// `lp(owner) ‖ id` → ``: an owner's entities in id order.
    pub entity_owners: sled::Tree,
    /// `lp(src) ‖ id` → `ReplayRecord` (JSON).
    pub replays: sled::Tree,
    /// `at ‖ lp(src) ‖ id` → ``: replay records by age, for pruning.
    pub replay_times: sled::Tree,
    /// `user` → live tokens of the user (u64 BE); absent for none. Schema 2.
    pub token_counts: sled::Tree,
    /// `expires` (u64 BE) ‖ `lp(user) ‖ host` → token id: tokens with a lifetime, by the
    /// end of it, for the pruner. Schema 3.
    pub token_expiry: sled::Tree,
    /// `seq` (u64 BE) → `at` (u64 BE) ‖ event JSON: the change events (the outbox). Schema 3.
    pub events: sled::Tree,
    /// `sent`, `pruned` (u64 BE): how far the events were published and pruned. Written
    /// outside transactions.
    pub event_marks: sled::Tree,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, StoreError> {
        Ok(Trees {
            meta: db.open_tree("meta")?,
            rules: db.open_tree("rules")?,
            tokens: db.open_tree("tokens")?,
            token_ids: db.open_tree("token_ids")?,
            entities: db.open_tree("entities")?,
            entity_owners: db.open_tree("entity_owners")?,
            replays: db.open_tree("replays")?,
            replay_times: db.open_tree("replay_times")?,
            token_counts: db.open_tree("token_counts")?,
            token_expiry: db.open_tree("token_expiry")?,
            events: db.open_tree("events")?,
            event_marks: db.open_tree("event_marks")?,
        })
    }

    /// Runs `f` as one transaction over every tree. sled re-runs it on conflict, so `f` has
    /// no side effects outside the trees.
    fn transaction<T>(
        &self,
        f: impl Fn(&Tx<'_>) -> Result<T, ConflictableTransactionError<StoreError>>,
    ) -> Result<T, StoreError> {
        // sled takes the trees as a slice; `Tx` names them again, in this order.
        let all = [
            self.meta.clone(),
            self.rules.clone(),
            self.tokens.clone(),
            self.token_ids.clone(),
            self.entities.clone(),
            self.entity_owners.clone(),
            self.replays.clone(),
            self.replay_times.clone(),
            self.token_counts.clone(),
            self.token_expiry.clone(),
            self.events.clone(),
        ];
        all.as_slice()
            .transaction(|t| {
                f(&Tx {
                    meta: &t[0],
                    rules: &t[1],
                    tokens: &t[2],
                    token_ids: &t[3],
                    entities: &t[4],
                    entity_owners: &t[5],
                    replays: &t[6],
                    replay_times: &t[7],
                    token_counts: &t[8],
                    token_expiry: &t[9],
                    events: &t[10],
                })
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => e.into(),
            })
    }
}

/// The trees, inside a transaction.
pub struct Tx<'a> {
    pub meta: &'a TransactionalTree,
    pub rules: &'a TransactionalTree,
    pub tokens: &'a TransactionalTree,
    pub token_ids: &'a TransactionalTree,
    pub entities: &'a TransactionalTree,
    pub entity_owners: &'a TransactionalTree,
    pub replays: &'a TransactionalTree,
    pub replay_times: &'a TransactionalTree,
    pub token_counts: &'a TransactionalTree,
    pub token_expiry: &'a TransactionalTree,
    pub events: &'a TransactionalTree,
}

/// The result type of work inside a transaction.
pub type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// Aborts a transaction with `e`.
pub fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

/// Work for the writer thread. (Its size does not matter: a job moves once, through a
/// channel.)
#[allow(clippy::large_enum_variant)]
pub enum Job {
    /// Apply `change` and record its reply for `request` (`None`: record nothing, bulk
    /// import), unless a reply is already recorded for it.
    Apply {
        request: Option<Requester>,
        /// When the change was asked for, UNIX ms (its events' `at`).
        at_ms: u64,
        change: Change,
        done: oneshot::Sender<Result<Applied, StoreError>>,
    },
    /// Write `records` as they are, in one transaction (`Store::restore`), and answer once
    /// they are on disk (at once for a store opened for bulk import).
    Restore {
        records: Vec<Record>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Answer once everything committed before it is on disk.
    Barrier { done: oneshot::Sender<bool> },
}

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 256;

/// The writer thread's handle. Dropping it stops the thread and waits for it.
pub struct Writer {
    /// Each batch is flushed before its changes return.
    pub flushes: bool,
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the writer thread shares with the rest of the store.
pub struct Shared {
    /// Kept in step with the committed rules.
    pub index: Arc<RwLock<RuleIndex>>,
    pub replays: ReplayPolicy,
    /// Replay records in the database.
    pub replay_count: Arc<replays::Count>,
    /// Woken when there are more replay records than the policy keeps.
    pub prune_now: Arc<tokio::sync::Notify>,
    /// Write change events.
    pub events: bool,
    /// The last event on stable storage.
    pub durable: Arc<Durable>,
}

impl Writer {
    /// Starts the thread.
    pub fn start(
        disk: Arc<Disk>,
        trees: Trees,
        shared: Shared,
        flushes: bool,
    ) -> Result<Writer, StoreError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (to_syncer, syncer) = Syncer::start(disk, flushes, shared.durable.clone())
            .map_err(|e| StoreError::corrupt("syncer thread", e))?;
        let thread = std::thread::Builder::new()
            .name("authd-writer".into())
            .spawn(move || {
                let batches = Batches {
                    trees,
                    shared,
                    flushes,
                    syncer: to_syncer,
                };
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    batches.run(batch);
                }
                // The syncer answers what it was handed, then stops.
                drop(batches);
                let _ = syncer.join();
            })
            .map_err(|e| StoreError::corrupt("writer thread", e))?;
        Ok(Writer {
            flushes,
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands `job` to the writer thread.
    pub fn send(&self, job: Job) -> Result<(), StoreError> {
        let jobs = lock(&self.jobs).clone().ok_or(StoreError::Writer)?;
        jobs.send(job).map_err(|_| StoreError::Writer)
    }
}

impl Drop for Writer {
    /// Stops the thread and waits for it, so that the database is closed (and can be opened
    /// again, e.g. by a restarted worker in the same process) once the store is dropped.
    fn drop(&mut self) {
        lock(&self.jobs).take();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

/// What the writer thread owns.
struct Batches {
    trees: Trees,
    shared: Shared,
    flushes: bool,
    /// Answers that wait for a sync.
    syncer: std::sync::mpsc::Sender<Synced>,
}

/// An answer that leaves only after a sync.
enum Synced {
    Applied(oneshot::Sender<Result<Applied, StoreError>>, Applied),
    Restored(oneshot::Sender<Result<(), StoreError>>),
    Barrier(oneshot::Sender<bool>),
    /// Events up to this one were committed: durable after the sync.
    Events(u64),
}

/// The syncer thread: syncs the database once for every answer handed to it so far, then
/// sends them.
struct Syncer {
    disk: Arc<Disk>,
    flushes: bool,
    durable: Arc<Durable>,
    answers: std::sync::mpsc::Receiver<Synced>,
}

impl Syncer {
    fn start(
        disk: Arc<Disk>,
        flushes: bool,
        durable: Arc<Durable>,
    ) -> std::io::Result<(std::sync::mpsc::Sender<Synced>, std::thread::JoinHandle<()>)> {
        let (to_syncer, answers) = std::sync::mpsc::channel();
        let syncer = Syncer {
            disk,
            flushes,
            durable,
            answers,
        };
        let thread = std::thread::Builder::new()
            .name("authd-syncer".into())
            .spawn(move || syncer.run())?;
        Ok((to_syncer, thread))
    }

    fn run(self) {
        while let Ok(first) = self.answers.recv() {
            let mut waiting = vec![first];
            waiting.extend(self.answers.try_iter());
            let ok = self.sync();
            for answer in waiting {
                match answer {
                    Synced::Applied(done, applied) => {
                        let _ = done.send(Ok(applied));
                    }
                    Synced::Restored(done) => {
                        let _ = done.send(if ok { Ok(()) } else { Err(StoreError::Flush) });
                    }
                    Synced::Barrier(done) => {
                        let _ = done.send(ok);
                    }
                    Synced::Events(seq) if ok => self.durable.advance(seq),
                    Synced::Events(_) => {}
                }
            }
        }
    }

    /// Syncs the database. If this store syncs on commit and the sync fails, stops the
    /// process: after a failed fsync the state on disk is unknown; answering from memory
    /// that may disagree with it would break the promise that an answered change is
    /// durable. Like PostgreSQL, authd stops at once instead: the broker redelivers every
    /// unacknowledged request to the restarted worker, which answers from what is really
    /// on disk. (A store opened for bulk import answers the barrier `false`.)
    fn sync(&self) -> bool {
        match self.disk.sync() {
            Ok(()) => true,
            Err(e) if self.flushes => {
                tracing::error!(error = %e, "database sync failed; stopping at once");
                std::process::exit(74);
            }
            Err(e) => {
                tracing::error!(error = %e, "database sync failed");
                false
            }
        }
    }
}

impl Batches {
    /// Commits the batch's changes together, then each restore in a transaction of its
    /// own, then hands the barriers to the syncer.
    fn run(&self, batch: Vec<Job>) {
        let mut changes = Vec::with_capacity(batch.len());
        let mut restores = Vec::new();
        let mut barriers = Vec::new();
        for job in batch {
            match job {
                Job::Apply {
                    request,
                    at_ms,
                    change,
                    done,
                } => changes.push(((request, at_ms), change, done)),
                Job::Restore { records, done } => restores.push((records, done)),
                Job::Barrier { done } => barriers.push(done),
            }
        }
        if !changes.is_empty() {
            let work: Vec<_> = changes.iter().map(|(r, c, _)| (r, c)).collect();
            match self.commit(&work) {
                Ok(results) => {
                    for ((_, _, done), result) in changes.into_iter().zip(results) {
                        self.answer(done, result);
                    }
                }
                Err(_) if changes.len() > 1 => {
                    for (request, change, done) in changes {
                        let result = self
                            .commit(&[(&request, &change)])
                            .and_then(|mut r| r.pop().ok_or(StoreError::Writer));
                        match result {
                            Ok(applied) => self.answer(done, applied),
                            Err(e) => {
                                let _ = done.send(Err(e));
                            }
                        }
                    }
                }
                Err(e) => {
                    for (_, _, done) in changes {
                        let _ = done.send(Err(StoreError::corrupt("transaction", &e)));
                    }
                }
            }
        }
        for (records, done) in restores {
            match self.restore(&records) {
                Ok(()) if self.flushes => self.hand_over(Synced::Restored(done)),
                result => {
                    let _ = done.send(result);
                }
            }
        }
        // Answered by the syncer after a sync that starts after everything committed so far.
        for done in barriers {
            self.hand_over(Synced::Barrier(done));
        }
    }

    /// Answers a committed change: after the next sync if this store syncs on commit,
    /// otherwise at once.
    fn answer(&self, done: oneshot::Sender<Result<Applied, StoreError>>, applied: Applied) {
        if self.flushes {
            self.hand_over(Synced::Applied(done, applied));
        } else {
            let _ = done.send(Ok(applied));
        }
    }

    fn hand_over(&self, answer: Synced) {
        // The syncer stops only after this thread: a failed send drops the answer, and its
        // caller sees the writer gone.
        let _ = self.syncer.send(answer);
    }

    /// Applies `work` in one transaction, then brings the rule index up to date and hands
    /// the new events to the syncer (they are published once durable).
    fn commit(
        &self,
        work: &[(&(Option<Requester>, u64), &Change)],
    ) -> Result<Vec<Applied>, StoreError> {
        // sled transactions cannot scan: the tokens a change may remove (a delete's, a
        // re-provisioning put's) are listed first. Only this thread writes tokens, so the
        // list is exact, given the tokens issued earlier in the same batch.
        let mut token_keys = Vec::with_capacity(work.len());
        for (i, (_, change)) in work.iter().enumerate() {
            token_keys.push(match change {
                Change::DeleteEntity { id } | Change::PutEntity { id, .. } => {
                    tokens::keys_of(&self.trees, id, work[..i].iter().map(|(_, c)| *c))?
                }
                _ => Vec::new(),
            });
        }
        let policy = &self.shared.replays;
        let events = self.shared.events;
        let results = self.trees.transaction(|tx| {
            work.iter()
                .zip(&token_keys)
                .map(|(((request, at_ms), change), keys)| {
                    apply(tx, request.as_ref(), *at_ms, change, keys, policy, events)
                })
                .collect::<TxResult<Vec<_>>>()
        })?;
        if events {
            // Only this thread gives numbers: the last one is this batch's.
            let last = events::last_seq(&self.trees)?;
            if last > self.shared.durable.get() {
                if self.flushes {
                    self.hand_over(Synced::Events(last));
                } else {
                    self.shared.durable.advance(last);
                }
            }
        }
        let recorded = work
            .iter()
            .zip(&results)
            .filter(|(((request, _), change), applied)| match applied {
                Applied::Now(changed, _) => {
                    request.is_some() && Reply::of(change, changed).is_some()
                }
                _ => false,
            })
            .count();
        self.shared.replay_count.add(recorded as u64);
        if self.shared.replay_count.get() > policy.max_records {
            self.shared.prune_now.notify_one();
        }
        let mut index = self.shared.index.write().unwrap_or_else(|e| e.into_inner());
        for ((_, change), applied) in work.iter().zip(&results) {
            match (change, applied) {
                (Change::AddRule { rule }, Applied::Now(Changed::RuleAdded { rule_id }, _)) => {
                    index.insert(*rule_id, rule)
                }
                (
                    Change::DeleteRule { rule_id },
                    Applied::Now(Changed::RuleDeleted(Some(rule)), _),
                ) => {
                    index.remove(*rule_id, rule);
                }
                _ => {}
            }
        }
        Ok(results)
    }
}

impl Batches {
    /// Writes `records` in one transaction, then brings the rule index up to date.
    fn restore(&self, records: &[Record]) -> Result<(), StoreError> {
        let restored_rules = self.trees.transaction(|tx| {
            let mut restored_rules = Vec::new();
            for record in records {
                match record {
                    Record::Entity { id, entity } => entities::restore(tx, id, entity)?,
                    Record::Token { user, host, token } => tokens::restore(tx, user, host, token)?,
                    Record::Rule { rule_id, rule } => {
                        let old = rules::restore(tx, *rule_id, rule)?;
                        restored_rules.push((*rule_id, old, rule));
                    }
                    Record::NextRuleId(next) => rules::raise_next_id(tx, *next)?,
                }
            }
            Ok(restored_rules)
        })?;
        let mut index = self.shared.index.write().unwrap_or_else(|e| e.into_inner());
        for (rule_id, old, rule) in restored_rules {
            if old.as_ref() == Some(rule) {
                continue;
            }
            if let Some(old) = old {
                index.remove(rule_id, &old);
            }
            index.insert(rule_id, rule);
        }
        Ok(())
    }
}

/// Applies one change inside a transaction: answers a request already recorded with its
/// record (or says its id was used by another), otherwise makes the change and records its
/// reply. `token_keys`: the tokens the change removes (see [`tokens::keys_of`]).
fn apply(
    tx: &Tx<'_>,
    request: Option<&Requester>,
    at_ms: u64,
    change: &Change,
    token_keys: &[Vec<u8>],
    policy: &ReplayPolicy,
    write_events: bool,
) -> TxResult<Applied> {
    if let Some(request) = request {
        match replays::recorded(tx, request, policy)? {
            Recorded::Nothing => {}
            Recorded::Same(earlier) => return Ok(Applied::Before(earlier)),
            Recorded::Other => return Ok(Applied::IdReused),
        }
    }
    let changed = match change {
        Change::ReplaceToken {
            user,
            host,
            record,
            max_per_user,
        } => tokens::replace(tx, user, host, record, *max_per_user)?,
        Change::RevokeToken { user, host } => tokens::revoke(tx, user, host)?,
        Change::PutEntity {
            id,
            record,
            create_only,
            ..
        } => entities::put(tx, id, record, *create_only, token_keys)?,
        Change::DeleteEntity { id } => entities::delete(tx, id, token_keys)?,
        Change::AddRule { rule } => rules::add(tx, rule)?,
        Change::DeleteRule { rule_id } => rules::delete(tx, *rule_id)?,
        Change::ExpireTokens { tokens } => tokens::expire(tx, tokens, at_ms / 1000)?,
    };
    if write_events {
        events::append(tx, &EventBody::of(change, &changed), at_ms)?;
    }
    let reply = Reply::of(change, &changed);
    if let (Some(request), Some(reply)) = (request, &reply) {
        replays::record(tx, request, reply)?;
    }
    Ok(Applied::Now(changed, reply.unwrap_or(Reply::Empty)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::TokenRecord;

    fn batches() -> Batches {
        let db = sled::Config::new().temporary(true).open().unwrap();
        Batches {
            trees: Trees::open(&db).unwrap(),
            syncer: Syncer::start(Arc::new(Disk::temporary(db)), false, Arc::default())
                .unwrap()
                .0,
            shared: Shared {
                index: Arc::default(),
                replays: ReplayPolicy::default(),
                replay_count: Arc::default(),
                prune_now: Arc::default(),
                events: true,
                durable: Arc::default(),
            },
            flushes: false,
        }
    }

    fn job(change: Change) -> (Job, oneshot::Receiver<Result<Applied, StoreError>>) {
        let (done, rx) = oneshot::channel();
        let request = None;
        (
            Job::Apply {
                request,
                at_ms: 1,
                change,
                done,
            },
            rx,
        )
    }

    #[test]
    fn a_delete_removes_tokens_issued_earlier_in_its_own_batch() {
        let b = batches();
        let issue = |host: &str, n: u8| Change::ReplaceToken {
            user: "u".into(),
            host: host.into(),
            record: TokenRecord {
                token_id: [n; 16],
                key_id: 1,
                created: 1,
                expires: None,
            },
            max_per_user: 10,
        };
        let (before, _) = job(issue("h0", 0));
        b.run(vec![before]);
        let (same_batch, _) = job(issue("h1", 1));
        let (delete, deleted) = job(Change::DeleteEntity { id: "u".into() });
        let (after, _) = job(issue("h2", 2));
        b.run(vec![same_batch, delete, after]);
        let deleted = deleted.blocking_recv().unwrap().unwrap();
        assert_eq!(
            deleted,
            Applied::Now(
                Changed::EntityDeleted {
                    existed: false,
                    tokens: 2
                },
                Reply::Empty
            )
        );
        let left = tokens::tokens_of(&b.trees, "u", None, 10).unwrap().tokens;
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, "h2", "only the token issued after the delete");
        assert_eq!(tokens::count_of(&b.trees, "u").unwrap(), 1);
        assert!(tokens::live_token(&b.trees, &[1; 16]).unwrap().is_none());
    }

    #[test]
    fn a_reprovisioning_put_removes_tokens_issued_earlier_in_its_own_batch() {
        let b = batches();
        let issue = |host: &str, n: u8| Change::ReplaceToken {
            user: "u".into(),
            host: host.into(),
            record: TokenRecord {
                token_id: [n; 16],
                key_id: 1,
                created: 1,
                expires: None,
            },
            max_per_user: 10,
        };
        let put = Change::PutEntity {
            id: "u".into(),
            record: crate::store::EntityRecord {
                kind: crate::store::EntityKind::User,
                owner: None,
                psk: None,
                cert_sha256: Some([1; 32]),
                disabled: false,
                created: 1,
            },
            create_only: false,
            generated: None,
        };
        let (before, _) = job(issue("h0", 0));
        b.run(vec![before]);
        let (same_batch, _) = job(issue("h1", 1));
        let (put, done) = job(put);
        let (after, _) = job(issue("h2", 2));
        b.run(vec![same_batch, put, after]);
        let done = done.blocking_recv().unwrap().unwrap();
        assert!(
            matches!(done, Applied::Now(Changed::EntityPut { tokens: 2, .. }, _)),
            "{done:?}"
        );
        let left = tokens::tokens_of(&b.trees, "u", None, 10).unwrap().tokens;
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, "h2", "only the token issued after the put");
        assert_eq!(tokens::count_of(&b.trees, "u").unwrap(), 1);
    }
}
