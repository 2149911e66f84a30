//! The state of authd, in the product's words, kept in an embedded sled database.
//!
//! Nothing outside this module sees sled. Each change runs in a sled transaction that also
//! records the response to the request that made it ("replay record", keyed by the request's
//! `src` and `id`), so a redelivered request gets the same answer and changes nothing.
//! One writer thread ([`Writer`]) runs every change: concurrent changes share one
//! transaction and one flush (group commit), and a change is on disk when its call returns.
//! [`GroupCommit`] makes a reader wait for the flush of a record it saw (a redelivery).
//!
//! Trees (all keys binary; values JSON records, but for entities):
//! - `meta`: `schema_version`; `next_rule_id` (u64 BE), so rule ids are never reused.
//! - `rules`: `rule id` (u64 BE) → [`Rule`]; mirrored in memory by a [`RuleIndex`], rebuilt
//!   at open and updated with every change, so AuthorizeCommand never reads this tree.
//! - `tokens`: `lp(user) ‖ host` → [`TokenRecord`] — the live token of each (user, host).
//! - `token_ids`: `token id` → `lp(user) ‖ host` — finds a presented token's owner.
//! - `entities`: `id` → [`EntityRecord`] — devices and users that sign in (see [`entities`]).
//! - `entity_owners`: `lp(owner) ‖ id` → `` — lists an owner's entities in id order.
//! - `replays`: `lp(src) ‖ id` → [`ReplayEntry`]; `replay_times`: `at ‖ lp(src) ‖ id` → ``
//!   so old records are pruned by a range scan.

use std::any::Any;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use tokio::sync::{mpsc, oneshot};

use crate::crypto::{KeyId, PskNonce, TokenId};
use crate::rules::{Decision, Rule, RuleIndex};

mod entities;
pub use entities::{EntityPage, EntityRecord, KeyUsage, PskHash, PutOutcome};

/// Version of the on-disk layout this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sled(#[from] sled::Error),
    #[error("database record under {tree} is unreadable: {detail}")]
    Corrupt { tree: &'static str, detail: String },
    #[error("database schema version {found} is not the version {SCHEMA_VERSION} this authd understands")]
    Schema { found: String },
    #[error("database flush failed")]
    Flush,
    #[error("the database writer thread is gone")]
    Writer,
}

/// The live token of one (user, host) pair. Holds no usable secret: the token string is
/// derived from `token_id` with the server key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token_id: TokenId,
    pub key_id: KeyId,
    /// UNIX seconds.
    pub created: u64,
}

/// What a state-changing request answered, kept to answer a redelivery identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Replay {
    /// No result (e.g. RevokeToken).
    Empty,
    /// A result with no secret in it.
    Value(serde_json::Value),
    /// `{"token": …}`, re-derived from the token id on replay: the record holds no secret.
    Token {
        user: String,
        host: String,
        token_id: TokenId,
        key_id: KeyId,
    },
    /// `{"psk": …}` of `Entity.Put {generate_psk: true}`, re-derived from the nonce on
    /// replay: the record holds no secret.
    Psk {
        id: String,
        key_id: KeyId,
        nonce: PskNonce,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReplayEntry {
    /// UNIX milliseconds when the change was made.
    at: u64,
    reply: Replay,
}

/// Identifies a request for replay: its `src` and `id`, and when it was handled.
#[derive(Debug, Clone)]
pub struct RequestKey<'a> {
    pub src: &'a str,
    pub id: u64,
    pub at_ms: u64,
    /// Keep the reply for redelivery (false only for `authd import`, which nobody redelivers).
    pub record_reply: bool,
}

/// The authd database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tokens: sled::Tree,
    token_ids: sled::Tree,
    entities: sled::Tree,
    entity_owners: sled::Tree,
    replays: sled::Tree,
    replay_times: sled::Tree,
    rules: sled::Tree,
    /// The rules of the `rules` tree, indexed. A std lock, not a Tokio one: it is never held
    /// across an await, and readers (every AuthorizeCommand) do not block each other.
    rule_index: Arc<RwLock<RuleIndex>>,
    /// Held across a rule change's transaction and its index update, so the index applies
    /// changes in the order the tree did.
    rule_writes: Arc<Mutex<()>>,
    /// Runs every write transaction, batching concurrent ones.
    writer: Arc<Writer>,
}

const NEXT_RULE_ID: &str = "next_rule_id";

impl Store {
    /// Opens (or creates) the database in `dir`. `cache_bytes` bounds sled's page cache.
    /// Every change is on disk (fsynced) when the call that made it returns.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Self::open_with(dir, cache_bytes, true)
    }

    /// Like [`Store::open`]; with `flush_on_commit` false, changes reach the disk only at
    /// [`Store::flush`] or sled's periodic flush (bulk import, which flushes once at the end).
    pub fn open_with(
        dir: &Path,
        cache_bytes: u64,
        flush_on_commit: bool,
    ) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()?;
        Self::from_db(db, flush_on_commit)
    }

    /// A throw-away database in a temporary directory (fuzzing, unit tests).
    pub fn temporary() -> Result<Store, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open()?, false)
    }

    fn from_db(db: sled::Db, flush_on_commit: bool) -> Result<Store, StoreError> {
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION.to_be_bytes() => {}
            Some(v) => {
                let found = <[u8; 8]>::try_from(v.as_ref())
                    .map(|b| u64::from_be_bytes(b).to_string())
                    .unwrap_or_else(|_| format!("{:?}", v.as_ref()));
                return Err(StoreError::Schema { found });
            }
        }
        let rules = db.open_tree("rules")?;
        let mut index = RuleIndex::new();
        for item in rules.iter() {
            let (k, v) = item?;
            index.insert(rule_id_of(&k)?, &decode("rules", &v)?);
        }
        let tokens = db.open_tree("tokens")?;
        let token_ids = db.open_tree("token_ids")?;
        let entities = db.open_tree("entities")?;
        let entity_owners = db.open_tree("entity_owners")?;
        let replays = db.open_tree("replays")?;
        let replay_times = db.open_tree("replay_times")?;
        // The order `commit` gives the trees to `Tx`.
        let writer = Writer::start(
            flush_on_commit.then(|| db.clone()),
            [
                tokens.clone(),
                token_ids.clone(),
                entities.clone(),
                entity_owners.clone(),
                replays.clone(),
                replay_times.clone(),
                meta.clone(),
                rules.clone(),
            ],
        )?;
        Ok(Store {
            tokens,
            token_ids,
            entities,
            entity_owners,
            replays,
            replay_times,
            rules,
            rule_index: Arc::new(RwLock::new(index)),
            rule_writes: Arc::new(Mutex::new(())),
            writer: Arc::new(writer),
            db,
        })
    }

    /// Adds `rule` under a new id (never one used before) and records `reply(id)` for
    /// `request`. If a reply is already recorded for `request` (a redelivery that raced
    /// past the dispatcher's check), nothing changes and that reply is returned.
    pub fn add_rule(
        &self,
        rule: &Rule,
        request: &RequestKey<'_>,
        reply: impl Fn(u64) -> Replay + Send + 'static,
    ) -> Result<Replay, StoreError> {
        let value = encode(rule);
        let _writing = lock(&self.rule_writes);
        let src = request.src.to_owned();
        let (id, at_ms, record_reply) = (request.id, request.at_ms, request.record_reply);
        let (added, reply) = self.transact(move |tx| {
            let request = RequestKey {
                src: &src,
                id,
                at_ms,
                record_reply,
            };
            if let Some(earlier) = tx.replays.get(replay_key(request.src, request.id))? {
                let earlier: ReplayEntry = decode("replays", &earlier).map_err(abort)?;
                return Ok((None, earlier.reply));
            }
            let id = match tx.meta.get(NEXT_RULE_ID)? {
                None => 1,
                Some(v) => u64_of(&v).map_err(abort)?,
            };
            tx.meta.insert(NEXT_RULE_ID, &(id + 1).to_be_bytes())?;
            tx.rules.insert(&id.to_be_bytes(), value.as_slice())?;
            let reply = reply(id);
            tx.put_replay(&replay_entry(&request, &reply))?;
            Ok((Some(id), reply))
        })?;
        if let Some(id) = added {
            write(&self.rule_index).insert(id, rule);
        }
        Ok(reply)
    }

    /// Deletes rule `id` if it exists (returning it) and records an empty reply for
    /// `request`.
    pub fn delete_rule(
        &self,
        id: u64,
        request: &RequestKey<'_>,
    ) -> Result<Option<Rule>, StoreError> {
        let replay = self.replay_entry(request, &Replay::Empty);
        let _writing = lock(&self.rule_writes);
        let removed = self.transact(move |tx| {
            let old = match tx.rules.remove(&id.to_be_bytes())? {
                None => None,
                Some(v) => Some(decode::<Rule>("rules", &v).map_err(abort)?),
            };
            tx.put_replay(&replay)?;
            Ok(old)
        })?;
        if let Some(rule) = &removed {
            write(&self.rule_index).remove(id, rule);
        }
        Ok(removed)
    }

    /// Rules with an id above `after`, in id order, at most `limit`.
    pub fn rules(&self, after: u64, limit: usize) -> Result<Vec<(u64, Rule)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .rules
            .range((after.saturating_add(1)).to_be_bytes()..)
            .take(limit)
        {
            let (k, v) = item?;
            out.push((rule_id_of(&k)?, decode("rules", &v)?));
        }
        Ok(out)
    }

    /// AuthorizeCommand's decision for (src, dst, cmd): see [`RuleIndex::decide`].
    pub fn authorize(&self, src: &str, dst: &str, cmd: &str) -> Result<Decision, StoreError> {
        read(&self.rule_index).decide(src, dst, cmd, || self.entity_owner(dst))
    }

    /// The `owner` of entity `id`, if it exists and has one.
    pub fn entity_owner(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.entity(id)?.and_then(|e| e.owner))
    }

    /// Writes an entity with the `owner` and `created` of `record` (tests: owners without
    /// Entity.Put).
    #[cfg(test)]
    pub(crate) fn put_entity_json(&self, id: &str, record: &serde_json::Value) {
        let entity = EntityRecord {
            owner: record["owner"].as_str().map(str::to_owned),
            psk: None,
            cert_sha256: None,
            disabled: false,
            created: record["created"].as_u64().unwrap_or(0),
        };
        let _ = self.entities.insert(id.as_bytes(), entity.to_bytes());
    }

    /// The live token record of (user, host).
    pub fn token(&self, user: &str, host: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens
            .get(user_host_key(user, host))?
            .map(|v| decode("tokens", &v))
            .transpose()
    }

    /// All live tokens of a user, sorted by host.
    pub fn tokens_of(&self, user: &str) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        let prefix = lp(user);
        let mut out = Vec::new();
        for item in self.tokens.scan_prefix(&prefix) {
            let (k, v) = item?;
            let host = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|e| corrupt("tokens", e))?
                .to_owned();
            out.push((host, decode("tokens", &v)?));
        }
        Ok(out)
    }

    /// Whose token has this id: `(user, host)`.
    pub fn token_owner(&self, token_id: &TokenId) -> Result<Option<(String, String)>, StoreError> {
        match self.token_ids.get(token_id)? {
            None => Ok(None),
            Some(v) => split_user_host(&v).map(Some),
        }
    }

    /// Makes `record` the live token of (user, host), replacing any earlier one, and records
    /// the reply for `request`. One transaction.
    pub fn replace_token(
        &self,
        user: &str,
        host: &str,
        record: &TokenRecord,
        request: &RequestKey<'_>,
        reply: &Replay,
    ) -> Result<(), StoreError> {
        let key = user_host_key(user, host);
        let value = encode(record);
        let replay = self.replay_entry(request, reply);
        let token_id = record.token_id;
        self.transact(move |tx| {
            if let Some(old) = tx.tokens.insert(key.as_slice(), value.as_slice())? {
                let old: TokenRecord = decode("tokens", &old).map_err(abort)?;
                tx.token_ids.remove(&old.token_id[..])?;
            }
            tx.token_ids.insert(&token_id[..], key.as_slice())?;
            tx.put_replay(&replay)
        })
    }

    /// Removes the live token of (user, host), if any, and records the reply for `request`.
    pub fn revoke_token(
        &self,
        user: &str,
        host: &str,
        request: &RequestKey<'_>,
        reply: &Replay,
    ) -> Result<(), StoreError> {
        let key = user_host_key(user, host);
        let replay = self.replay_entry(request, reply);
        self.transact(move |tx| {
            if let Some(old) = tx.tokens.remove(key.as_slice())? {
                let old: TokenRecord = decode("tokens", &old).map_err(abort)?;
                tx.token_ids.remove(&old.token_id[..])?;
            }
            tx.put_replay(&replay)
        })
    }

    /// The recorded reply of an earlier state-changing request with this `src` and `id`.
    pub fn replay(&self, src: &str, id: u64) -> Result<Option<Replay>, StoreError> {
        match self.replays.get(replay_key(src, id))? {
            None => Ok(None),
            Some(v) => Ok(Some(decode::<ReplayEntry>("replays", &v)?.reply)),
        }
    }

    /// Deletes replay records made before `before_ms` (UNIX ms). Returns how many.
    pub fn prune_replays(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.replay_times.range(..before_ms.to_be_bytes()) {
            let (k, _) = item?;
            let (at, key) = k.split_at(8);
            // Remove the record only if it is the one this time entry points at.
            if let Some(v) = self.replays.get(key)? {
                if decode::<ReplayEntry>("replays", &v)?.at.to_be_bytes() == at {
                    self.replays.remove(key)?;
                }
            }
            self.replay_times.remove(&k)?;
            n += 1;
        }
        Ok(n)
    }

    /// Whether each change is fsynced before the call that made it returns.
    pub fn flushes_on_commit(&self) -> bool {
        self.writer.flushes
    }

    /// Writes everything to disk (fsync). Prefer [`GroupCommit::durable`] on request paths.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn replay_entry(&self, request: &RequestKey<'_>, reply: &Replay) -> ReplayRecord {
        replay_entry(request, reply)
    }

    /// Runs `f` as one transaction over every tree, on the writer thread (see [`Writer`]).
    /// sled re-runs it on conflict, and the writer may run it again alone if another change
    /// in its batch failed, so `f` has no side effects outside the trees.
    fn transact<T: Send + 'static>(
        &self,
        f: impl Fn(&Tx<'_>) -> Result<T, ConflictableTransactionError<StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let result = self.writer.run(Box::new(move |tx| {
            f(tx).map(|v| Box::new(v) as Box<dyn Any + Send>)
        }))?;
        result
            .downcast::<T>()
            .map(|v| *v)
            .map_err(|_| StoreError::Writer)
    }
}

/// A change as the writer thread runs it.
type Change = Box<
    dyn Fn(&Tx<'_>) -> Result<Box<dyn Any + Send>, ConflictableTransactionError<StoreError>> + Send,
>;

struct Job {
    change: Change,
    done: std::sync::mpsc::SyncSender<Result<Box<dyn Any + Send>, StoreError>>,
}

/// The one thread that writes. Every sled transaction, however small, seals sled's write
/// buffer and waits for it to reach the disk (`sync_file_range`), and transactions run one at
/// a time, so a change per transaction caps the write rate near one disk write per change.
/// The writer takes every change waiting for it and commits them in one transaction, in
/// arrival order (each sees the ones before it), so concurrent changes share that disk
/// write, and then (unless opened for bulk import) one flush: group commit. If the batch
/// fails, each change is run again alone, so one bad change fails only its own request.
struct Writer {
    /// Each batch is flushed (fsynced) before its changes return.
    flushes: bool,
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Most changes committed in one transaction.
const MAX_BATCH: usize = 256;

impl Writer {
    fn start(flush: Option<sled::Db>, trees: [sled::Tree; 8]) -> Result<Writer, StoreError> {
        let flushes = flush.is_some();
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("authd-writer".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    match commit(&trees, &batch) {
                        Ok(results) => {
                            if let Some(db) = &flush {
                                make_durable(db);
                            }
                            for (job, result) in batch.into_iter().zip(results) {
                                let _ = job.done.send(Ok(result));
                            }
                        }
                        Err(_) if batch.len() > 1 => {
                            for job in batch {
                                let result = commit(&trees, std::slice::from_ref(&job))
                                    .and_then(|mut r| r.pop().ok_or(StoreError::Writer));
                                if let (Ok(_), Some(db)) = (&result, &flush) {
                                    make_durable(db);
                                }
                                let _ = job.done.send(result);
                            }
                        }
                        Err(e) => {
                            for job in batch {
                                let _ = job.done.send(Err(StoreError::Corrupt {
                                    tree: "transaction",
                                    detail: e.to_string(),
                                }));
                            }
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Corrupt {
                tree: "writer",
                detail: e.to_string(),
            })?;
        Ok(Writer {
            flushes,
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands `change` to the writer thread and waits for its result. On a multi-threaded
    /// Tokio runtime the wait happens in `block_in_place`, so the runtime's other tasks
    /// (the broker connection among them) move to another thread meanwhile.
    fn run(&self, change: Change) -> Result<Box<dyn Any + Send>, StoreError> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let jobs = lock(&self.jobs).clone().ok_or(StoreError::Writer)?;
        jobs.send(Job { change, done })
            .map_err(|_| StoreError::Writer)?;
        let wait = move || result.recv().map_err(|_| StoreError::Writer);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)?
            }
            _ => wait()?,
        }
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

/// Flushes (fsyncs) the database, or stops the process. After a failed fsync the state on
/// disk is unknown; answering from memory that may disagree with it would break the promise
/// that an answered change is durable. Like PostgreSQL, authd stops at once instead: the
/// broker redelivers every unacknowledged request to the restarted worker, which answers
/// from what is really on disk.
fn make_durable(db: &sled::Db) {
    if let Err(e) = db.flush() {
        tracing::error!(error = %e, "database flush failed; stopping at once");
        std::process::exit(74);
    }
}

/// Runs `batch` in one transaction over `trees`; the results in batch order.
fn commit(trees: &[sled::Tree; 8], batch: &[Job]) -> Result<Vec<Box<dyn Any + Send>>, StoreError> {
    trees
        .as_slice()
        .transaction(|t| {
            let tx = Tx {
                tokens: &t[0],
                token_ids: &t[1],
                entities: &t[2],
                entity_owners: &t[3],
                replays: &t[4],
                replay_times: &t[5],
                meta: &t[6],
                rules: &t[7],
            };
            batch.iter().map(|job| (job.change)(&tx)).collect()
        })
        .map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        })
}

/// A replay record's key, time-index key and value; `None` when not recorded.
type ReplayRecord = Option<(Vec<u8>, Vec<u8>, Vec<u8>)>;

fn replay_entry(request: &RequestKey<'_>, reply: &Replay) -> ReplayRecord {
    if !request.record_reply {
        return None;
    }
    let key = replay_key(request.src, request.id);
    let mut time_key = request.at_ms.to_be_bytes().to_vec();
    time_key.extend_from_slice(&key);
    let value = encode(&ReplayEntry {
        at: request.at_ms,
        reply: reply.clone(),
    });
    Some((key, time_key, value))
}

/// The trees, inside a transaction.
struct Tx<'a> {
    tokens: &'a TransactionalTree,
    token_ids: &'a TransactionalTree,
    entities: &'a TransactionalTree,
    entity_owners: &'a TransactionalTree,
    replays: &'a TransactionalTree,
    replay_times: &'a TransactionalTree,
    meta: &'a TransactionalTree,
    rules: &'a TransactionalTree,
}

impl Tx<'_> {
    /// Records the reply of the request that made this change.
    fn put_replay(
        &self,
        entry: &Option<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    ) -> Result<(), ConflictableTransactionError<StoreError>> {
        let Some((key, time_key, value)) = entry else {
            return Ok(());
        };
        self.replays.insert(key.as_slice(), value.as_slice())?;
        self.replay_times.insert(time_key.as_slice(), &[][..])?;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn u64_of(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            tree: "meta",
            detail: format!("{NEXT_RULE_ID} is not 8 bytes"),
        })
}

fn rule_id_of(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt("rules", "key is not an 8-byte rule id"))
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

/// Length-prefixed string: the prefix keeps `("ab","c")` and `("a","bc")` apart.
fn lp(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + s.len());
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

fn user_host_key(user: &str, host: &str) -> Vec<u8> {
    let mut k = lp(user);
    k.extend_from_slice(host.as_bytes());
    k
}

fn split_user_host(k: &[u8]) -> Result<(String, String), StoreError> {
    let bad = || StoreError::Corrupt {
        tree: "token_ids",
        detail: "bad user/host key".into(),
    };
    let len =
        u16::from_be_bytes(k.get(..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let user = k.get(2..2 + len).ok_or_else(bad)?;
    let host = &k[2 + len..];
    Ok((
        String::from_utf8(user.to_vec()).map_err(|_| bad())?,
        String::from_utf8(host.to_vec()).map_err(|_| bad())?,
    ))
}

fn replay_key(src: &str, id: u64) -> Vec<u8> {
    let mut k = lp(src);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our records are plain structs: serializing them cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(tree, e))
}

fn corrupt(tree: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        tree,
        detail: e.to_string(),
    }
}

/// Group commit for readers: a caller that saw a record which may not be flushed yet (a
/// redelivery answered from its replay record), or that changed a store opened without
/// flush-on-commit, waits on [`GroupCommit::durable`]; one
/// background task flushes once for everyone who asked while the previous flush ran.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<oneshot::Sender<bool>>,
}

impl GroupCommit {
    /// Starts the flusher task for `store`. It ends when every handle is dropped.
    pub fn start(store: Store, queue: usize) -> GroupCommit {
        let (tx, mut rx) = mpsc::channel::<oneshot::Sender<bool>>(queue);
        tokio::spawn(async move {
            let mut waiters = Vec::new();
            while rx.recv_many(&mut waiters, queue).await > 0 {
                // Everyone in `waiters` registered after their change was applied, so this
                // flush, which starts now, covers all of them.
                let s = store.clone();
                let ok = match tokio::task::spawn_blocking(move || s.flush()).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "database flush failed");
                        false
                    }
                    Err(_) => false,
                };
                for w in waiters.drain(..) {
                    let _ = w.send(ok);
                }
            }
        });
        GroupCommit { tx }
    }

    /// Returns once every change made before this call is on disk.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).await.map_err(|_| StoreError::Flush)?;
        match rx.await {
            Ok(true) => Ok(()),
            _ => Err(StoreError::Flush),
        }
    }
}

/// Deletes replay records older than `window`, every `every`, until the store is dropped.
pub async fn prune_replays_every(store: Store, window: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let cutoff = crate::unix_ms().saturating_sub(window.as_millis() as u64);
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.prune_replays(cutoff)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(pruned = n, "replay records pruned"),
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning replay records failed"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(src: &str, id: u64, at_ms: u64) -> RequestKey<'_> {
        RequestKey {
            src,
            id,
            at_ms,
            record_reply: true,
        }
    }

    #[test]
    fn replacing_a_token_retires_the_old_id() {
        let s = Store::temporary().unwrap();
        let a = TokenRecord {
            token_id: [1; 16],
            key_id: 1,
            created: 10,
        };
        let b = TokenRecord {
            token_id: [2; 16],
            key_id: 1,
            created: 11,
        };
        s.replace_token("u", "h", &a, &req("u", 1, 1), &Replay::Empty)
            .unwrap();
        assert_eq!(
            s.token_owner(&[1; 16]).unwrap(),
            Some(("u".into(), "h".into()))
        );
        s.replace_token("u", "h", &b, &req("u", 2, 1), &Replay::Empty)
            .unwrap();
        assert_eq!(s.token("u", "h").unwrap(), Some(b));
        assert_eq!(s.token_owner(&[1; 16]).unwrap(), None);
        s.revoke_token("u", "h", &req("u", 3, 1), &Replay::Empty)
            .unwrap();
        assert_eq!(s.token("u", "h").unwrap(), None);
        assert_eq!(s.token_owner(&[2; 16]).unwrap(), None);
    }

    #[test]
    fn user_and_host_boundaries_are_kept_apart() {
        let s = Store::temporary().unwrap();
        let r = TokenRecord {
            token_id: [1; 16],
            key_id: 1,
            created: 10,
        };
        s.replace_token("ab", "c", &r, &req("x", 1, 1), &Replay::Empty)
            .unwrap();
        assert_eq!(s.token("a", "bc").unwrap(), None);
        assert!(s.tokens_of("a").unwrap().is_empty());
        assert_eq!(s.tokens_of("ab").unwrap().len(), 1);
    }

    #[test]
    fn replays_are_kept_then_pruned() {
        let s = Store::temporary().unwrap();
        let r = TokenRecord {
            token_id: [1; 16],
            key_id: 1,
            created: 10,
        };
        let reply = Replay::Value(serde_json::json!({"x": 1}));
        s.replace_token("u", "h", &r, &req("caller", 9, 1_000), &reply)
            .unwrap();
        assert_eq!(s.replay("caller", 9).unwrap(), Some(reply));
        assert_eq!(s.replay("caller", 10).unwrap(), None);
        assert_eq!(s.prune_replays(1_000).unwrap(), 0);
        assert_eq!(s.prune_replays(1_001).unwrap(), 1);
        assert_eq!(s.replay("caller", 9).unwrap(), None);
    }

    fn rule(src: &str, effect: crate::rules::Effect) -> Rule {
        Rule {
            src: src.into(),
            dst: "d".into(),
            cmd: "c".into(),
            effect,
        }
    }

    fn rule_id(reply: Replay) -> u64 {
        match reply {
            Replay::Value(v) => v["rule_id"].as_u64().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn id_reply(id: u64) -> Replay {
        Replay::Value(serde_json::json!({ "rule_id": id }))
    }

    #[test]
    fn rules_and_their_counter_survive_a_reopen() {
        use crate::rules::{Decision, Effect};
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(
                rule_id(
                    s.add_rule(&rule("a", Effect::Allow), &req("op", 1, 1), id_reply)
                        .unwrap()
                ),
                1
            );
            assert_eq!(
                rule_id(
                    s.add_rule(&rule("b", Effect::Deny), &req("op", 2, 1), id_reply)
                        .unwrap()
                ),
                2
            );
            assert_eq!(
                rule_id(
                    s.add_rule(&rule("c", Effect::Allow), &req("op", 3, 1), id_reply)
                        .unwrap()
                ),
                3
            );
            assert_eq!(
                s.delete_rule(3, &req("op", 4, 1)).unwrap(),
                Some(rule("c", Effect::Allow))
            );
            assert_eq!(s.delete_rule(3, &req("op", 5, 1)).unwrap(), None);
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let ids: Vec<u64> = s
            .rules(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(s.rules(1, 10).unwrap().len(), 1);
        assert_eq!(
            s.authorize("a", "d", "c").unwrap(),
            Decision::Allow(1),
            "index rebuilt"
        );
        assert_eq!(s.authorize("b", "d", "c").unwrap(), Decision::Deny(2));
        assert_eq!(s.authorize("c", "d", "c").unwrap(), Decision::DefaultDeny);
        let next = s
            .add_rule(&rule("c", Effect::Allow), &req("op", 6, 1), id_reply)
            .unwrap();
        assert_eq!(rule_id(next), 4, "a deleted rule's id is not reused");
    }

    #[test]
    fn a_recorded_add_adds_nothing() {
        use crate::rules::Effect;
        let s = Store::temporary().unwrap();
        let first = s
            .add_rule(&rule("a", Effect::Allow), &req("op", 7, 1), id_reply)
            .unwrap();
        // The same request again, as if it raced past the dispatcher's replay check.
        let again = s
            .add_rule(&rule("a", Effect::Allow), &req("op", 7, 1), id_reply)
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(s.rules(0, usize::MAX).unwrap().len(), 1);
        assert_eq!(s.rule_index.read().unwrap().len(), 1);
    }

    #[test]
    fn entity_owner_reads_only_the_owner() {
        let s = Store::temporary().unwrap();
        s.put_entity_json(
            "lamp",
            &serde_json::json!({"owner": "alice", "psk_hash": "x", "created": 5}),
        );
        s.put_entity_json("free", &serde_json::json!({"created": 5}));
        assert_eq!(s.entity_owner("lamp").unwrap().as_deref(), Some("alice"));
        assert_eq!(s.entity_owner("free").unwrap(), None);
        assert_eq!(s.entity_owner("nothing").unwrap(), None);
        s.entities.insert("broken", &b"not json"[..]).unwrap();
        assert!(matches!(
            s.entity_owner("broken"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert("schema_version", &99u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(
            Store::open(dir.path(), 1 << 20),
            Err(StoreError::Schema { .. })
        ));
    }
}
