//! The embedded store: a sled database in the data directory, for one worker process.
//!
//! Reads go straight to sled's trees from the calling task (they are in-memory lookups once
//! the page is cached). Every change goes to one writer thread ([`writer`]), which commits
//! concurrent changes in one transaction with their replay records and syncs once for all
//! of them (group commit); a change's call returns once it is on stable storage ([`disk`]:
//! sled's own flush is not enough for a power cut).
//!
//! | file | trees |
//! |---|---|
//! | [`entities`] | `entities`, `entity_owners` |
//! | [`tokens`] | `tokens`, `token_ids`, `token_counts` |
//! | [`rules`] | `rules` (and `meta`'s rule id counter), mirrored by the in-memory rule index |
//! | [`replays`] | `replays`, `replay_times` |
//! | [`writer`] | the named trees, transactions, the writer thread (changes, and restores of exported records) |
//! | [`disk`] | sled's files and the syncs that make a committed change durable |
//! | [`encoding`] | key and record layouts |

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use tokio::sync::oneshot;

use crate::crypto::{KeyId, TokenId};
use crate::rules::{Decision, Parties, Rule, RuleIndex};
use crate::store::events::{EventPage, StoredEvent};
use crate::store::records::{
    Applied, Change, EntityPage, EntityRecord, ExpiredToken, ExportError, KeyUsage, LiveToken,
    PskHash, Record, Recorded, ReplayPolicy, RequestKey, StoreError, TokenPage, TokenRecord,
};

mod disk;
mod encoding;
mod entities;
mod events;
mod replays;
mod rules;
mod tokens;
mod writer;

use disk::Disk;
use replays::Requester;
use writer::{Job, Shared, Trees, Writer};

/// Version of the on-disk layout this build reads and writes. A database of an older
/// version is upgraded at open ([`upgrade`]); a newer one is refused.
///
/// | version | what changed |
/// |---|---|
/// | 1 | first versioned layout |
/// | 2 | entity kind (flag 16 of the entity record; schema-1 records read as devices); `token_counts` |
/// | 3 | token lifetimes (`expires` in token records, `token_expiry`); change events (`events`, `event_marks`) |
pub const SCHEMA_VERSION: u64 = 3;

const SCHEMA_KEY: &str = "schema_version";

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Database(Box::new(e))
    }
}

/// The embedded sled store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    disk: Arc<Disk>,
    trees: Trees,
    /// The rules of the `rules` tree, indexed. A std lock, not a Tokio one: it is never held
    /// across an await, and readers (every AuthorizeCommand) do not block each other. Only
    /// the writer thread changes it, after each commit.
    rule_index: Arc<RwLock<RuleIndex>>,
    replays: ReplayPolicy,
    replay_count: Arc<replays::Count>,
    /// Wakes the pruner early when there are more replay records than the policy keeps.
    prune_now: Arc<tokio::sync::Notify>,
    /// The last change event on stable storage.
    durable: Arc<events::Durable>,
    writer: Arc<Writer>,
}

impl EmbeddedStore {
    /// Opens (or creates) the database in `dir`. `cache_bytes` bounds sled's page cache.
    /// With `flush_on_commit`, every change is on stable storage when the call that made it
    /// returns; without (bulk import), only after [`EmbeddedStore::flush`].
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        flush_on_commit: bool,
        replays: ReplayPolicy,
        events: bool,
    ) -> Result<EmbeddedStore, StoreError> {
        let config = sled::Config::new().path(dir).cache_capacity(cache_bytes);
        // sled releases its file lock a little after the last handle is dropped (its
        // background threads let go last): a store reopened at once, as a worker restarted in
        // the same process does, waits for it briefly. Another process holding the database
        // still fails, after the wait.
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < give_up =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    return Err(StoreError::InUse)
                }
                other => break other?,
            }
        };
        let disk = Disk::open(db.clone(), dir)?;
        Self::from_db(db, disk, flush_on_commit, replays, events)
    }

    /// A throw-away database in a temporary directory (fuzzing, unit tests).
    pub fn temporary() -> Result<EmbeddedStore, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        let disk = Disk::temporary(db.clone());
        Self::from_db(db, disk, false, ReplayPolicy::default(), true)
    }

    fn from_db(
        db: sled::Db,
        disk: Disk,
        flush_on_commit: bool,
        replays: ReplayPolicy,
        events: bool,
    ) -> Result<EmbeddedStore, StoreError> {
        let trees = Trees::open(&db)?;
        upgrade(&disk, &trees)?;
        let durable = Arc::new(events::Durable::at_open(&trees)?);
        let rule_index = Arc::new(RwLock::new(rules::load_index(&trees)?));
        let replay_count = Arc::new(replays::Count::at_open(&trees));
        let prune_now = Arc::new(tokio::sync::Notify::new());
        let shared = Shared {
            index: rule_index.clone(),
            replays,
            replay_count: replay_count.clone(),
            prune_now: prune_now.clone(),
            events,
            durable: durable.clone(),
        };
        let disk = Arc::new(disk);
        let writer = Writer::start(disk.clone(), trees.clone(), shared, flush_on_commit)?;
        Ok(EmbeddedStore {
            disk,
            trees,
            rule_index,
            replays,
            replay_count,
            prune_now,
            durable,
            writer: Arc::new(writer),
        })
    }

    pub fn entity(&self, id: &str) -> Result<Option<EntityRecord>, StoreError> {
        entities::entity(&self.trees, id)
    }

    pub fn list_entities(
        &self,
        owner: Option<&str>,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EntityPage, StoreError> {
        entities::list(&self.trees, owner, prefix, after, limit)
    }

    pub fn replace_psk_hash(
        &self,
        id: &str,
        seen: &EntityRecord,
        psk: PskHash,
    ) -> Result<bool, StoreError> {
        entities::replace_psk_hash(&self.trees, id, seen, psk)
    }

    pub fn key_usage(&self) -> Result<BTreeMap<KeyId, KeyUsage>, StoreError> {
        entities::key_usage(&self.trees)
    }

    pub fn token(&self, user: &str, host: &str) -> Result<Option<TokenRecord>, StoreError> {
        tokens::token(&self.trees, user, host)
    }

    pub fn tokens_of(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TokenPage, StoreError> {
        tokens::tokens_of(&self.trees, user, after, limit)
    }

    pub fn live_token(&self, token_id: &TokenId) -> Result<Option<LiveToken>, StoreError> {
        tokens::live_token(&self.trees, token_id)
    }

    pub fn rules(&self, after: u64, limit: usize) -> Result<Vec<(u64, Rule)>, StoreError> {
        rules::list(&self.trees, after, limit)
    }

    /// AuthorizeCommand's decision: the entities `src` and `dst` (two reads), then
    /// [`RuleIndex::decide`].
    pub fn authorize(&self, src: &str, dst: &str, cmd: &str) -> Result<Decision, StoreError> {
        let src_entity = entities::entity(&self.trees, src)?;
        let dst_entity = if dst == src {
            src_entity.clone()
        } else {
            entities::entity(&self.trees, dst)?
        };
        let parties = Parties {
            src_disabled: src_entity.is_some_and(|e| e.disabled),
            dst_disabled: dst_entity.as_ref().is_some_and(|e| e.disabled),
            dst_owner: dst_entity.and_then(|e| e.owner),
        };
        let index = self.rule_index.read().unwrap_or_else(|e| e.into_inner());
        Ok(index.decide(src, dst, cmd, &parties))
    }

    pub fn recorded(&self, request: &RequestKey<'_>) -> Result<Recorded, StoreError> {
        match &request.binding {
            None => Ok(Recorded::Nothing),
            Some(binding) => replays::lookup(
                &self.trees,
                request.src,
                request.id,
                binding,
                request.at_ms,
                &self.replays,
            ),
        }
    }

    pub fn prune_replays(&self, now_ms: u64) -> Result<u64, StoreError> {
        replays::prune(&self.trees, &self.replay_count, now_ms, &self.replays)
    }

    /// Replay records in the database now.
    pub fn replay_records(&self) -> u64 {
        self.replay_count.get()
    }

    /// Resolves when there are more replay records than the policy keeps.
    pub async fn too_many_replays(&self) {
        self.prune_now.notified().await
    }

    /// Applies `change` on the writer thread and waits (without blocking the runtime) until
    /// it is committed, and on disk unless this store was opened for bulk import.
    pub async fn apply(
        &self,
        request: &RequestKey<'_>,
        change: Change,
    ) -> Result<Applied, StoreError> {
        let (done, result) = oneshot::channel();
        let at_ms = request.at_ms;
        let request = request.binding.as_ref().map(|b| Requester {
            src: request.src.to_owned(),
            id: request.id,
            at_ms: request.at_ms,
            caller: b.caller.to_owned(),
            method: b.method.to_owned(),
            args_digest: b.args_digest,
        });
        self.writer.send(Job::Apply {
            request,
            at_ms,
            change,
            done,
        })?;
        result.await.map_err(|_| StoreError::Writer)?
    }

    /// Up to `limit` tokens whose lifetime ended by `now` (UNIX seconds).
    pub fn expired_tokens(&self, now: u64, limit: usize) -> Result<Vec<ExpiredToken>, StoreError> {
        tokens::expired(&self.trees, now, limit)
    }

    /// `Events.Since`: durable events after `after`.
    pub fn events_since(&self, after: Option<u64>, limit: usize) -> Result<EventPage, StoreError> {
        events::since(&self.trees, after, self.durable.get(), limit)
    }

    /// Up to `limit` durable events after `after`, for the publisher.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        events::after(&self.trees, after, self.durable.get(), limit)
    }

    /// The last event acknowledged by the broker with all before it.
    pub fn events_sent(&self) -> Result<u64, StoreError> {
        events::sent(&self.trees)
    }

    pub fn mark_events_sent(&self, seq: u64) -> Result<(), StoreError> {
        events::mark_sent(&self.trees, seq)
    }

    /// Resolves when new events are durable.
    pub async fn events_moved(&self) {
        self.durable.moved.notified().await
    }

    /// Deletes sent events made before `before_ms`; how many.
    pub fn prune_events(&self, before_ms: u64) -> Result<u64, StoreError> {
        events::prune(&self.trees, before_ms)
    }

    /// Hands every record to `sink` (see [`crate::store::Store::export`]): one pass over
    /// each tree in key order, reading on the calling thread.
    pub fn export(
        &self,
        sink: &mut (dyn FnMut(Record) -> std::io::Result<()> + Send),
    ) -> Result<u64, ExportError> {
        let entities = entities::export(&self.trees, &mut *sink)?;
        let tokens = tokens::export(&self.trees, &mut *sink)?;
        let rules = rules::export(&self.trees, &mut *sink)?;
        Ok(entities + tokens + rules)
    }

    /// Writes `records` on the writer thread, in one transaction (see
    /// [`crate::store::Store::restore`]), and waits until they are committed, and on disk
    /// unless this store was opened for bulk import.
    pub async fn restore(&self, records: Vec<Record>) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        self.writer.send(Job::Restore { records, done })?;
        result.await.map_err(|_| StoreError::Writer)?
    }

    /// Returns once every change committed before the call is on disk.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        self.writer.send(Job::Barrier { done })?;
        match result.await {
            Ok(true) => Ok(()),
            _ => Err(StoreError::Flush),
        }
    }

    /// Whether each change is on disk when its call returns.
    pub fn flushes_on_commit(&self) -> bool {
        self.writer.flushes
    }

    /// Puts everything on stable storage. Blocks: call it off the runtime's worker threads.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.disk.sync()
    }

    /// Changes an entity behind the writer's back (tests of the owner lookup).
    #[cfg(test)]
    pub(crate) fn put_entity_raw(&self, id: &str, record: &EntityRecord) {
        let _ = self
            .trees
            .entities
            .insert(id.as_bytes(), encoding::entity_to_bytes(record));
    }
}

/// Brings the database to [`SCHEMA_VERSION`]: a new one is stamped, an older one upgraded
/// step by step, a newer one (or an unreadable version) refused. Each step is idempotent and
/// its version is written only once its work is on disk, so a crash during an upgrade
/// leaves the old version, and the next open does the step again.
fn upgrade(disk: &Disk, trees: &Trees) -> Result<(), StoreError> {
    let stamp = |version: u64| -> Result<(), StoreError> {
        disk.sync()?;
        trees.meta.insert(SCHEMA_KEY, &version.to_be_bytes())?;
        disk.sync()?;
        Ok(())
    };
    let mut version = match trees.meta.get(SCHEMA_KEY)? {
        None => return stamp(SCHEMA_VERSION),
        Some(v) => match <[u8; 8]>::try_from(v.as_ref()) {
            Ok(b) => u64::from_be_bytes(b),
            Err(_) => {
                return Err(StoreError::Schema {
                    found: format!("{:?}", v.as_ref()),
                    known: SCHEMA_VERSION,
                })
            }
        },
    };
    if version == 0 || version > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            found: version.to_string(),
            known: SCHEMA_VERSION,
        });
    }
    while version < SCHEMA_VERSION {
        match version {
            // 2 → 3: new trees only (sled makes them empty); a token record without
            // `expires` never expires. The version is raised so that an older authd, which
            // would let expired tokens sign in, refuses the database.
            2 => {}
            // 1 → 2: entity records gained a kind flag that schema-1 records lack, which
            // reads as `device`, so no entity is rewritten; the per-user token counts are
            // counted from the tokens.
            1 => {
                let users = tokens::rebuild_counts(trees)?;
                tracing::info!(
                    users_with_tokens = users,
                    "database upgrade 1 -> 2: token counts rebuilt; every entity is a device"
                );
            }
            other => {
                return Err(StoreError::Schema {
                    found: other.to_string(),
                    known: SCHEMA_VERSION,
                })
            }
        }
        version += 1;
        stamp(version)?;
        tracing::info!(schema_version = version, "database schema upgraded");
    }
    Ok(())
}
