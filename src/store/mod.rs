//! The state of authd, behind operations in the product's words.
//!
//! [`Store`] is what the methods see: reads ("the entity `id`", "the live token with this
//! id", "AuthorizeCommand's decision"), and [`Store::apply`], which makes one [`Change`] in
//! one transaction together with the record of the reply to the request that asked for it,
//! so that a redelivered request is answered identically and changes nothing. No type of a
//! storage engine crosses this boundary.
//!
//! Backends: [`embedded`] (sled in the data directory, the default, one worker) and
//! [`postgres`] (one PostgreSQL database that several workers share). A backend
//! promises, for every change: the change and its replay record commit together; a request
//! already recorded changes nothing and gets its recorded reply ([`Applied::Before`]); the
//! call returns once the change is durable; rule ids are never reused.
//!
//! Moving a deployment between stores goes through [`Record`]s: [`Store::export`] hands
//! over every record of one store, [`Store::restore`] writes them into another.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::crypto::{KeyId, TokenId};
use crate::rules::{Decision, Rule};

pub mod embedded;
pub mod events;
pub mod postgres;
mod records;

pub use events::{EventBody, EventPage, EventPolicy, StoredEvent};
pub use records::{
    Applied, Binding, Change, Changed, Ended, EntityKind, EntityPage, EntityRecord, ExpiredToken,
    ExportError, KeyUsage, LiveToken, PskHash, PutOutcome, Record, Recorded, ReplayPolicy, Reply,
    RequestKey, SignInState, StoreError, TokenPage, TokenRecord,
};

/// The authd database. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Embedded(embedded::EmbeddedStore),
    Postgres(postgres::PostgresStore),
}

impl Store {
    /// Opens (or creates) the embedded database in `dir`; see [`embedded::EmbeddedStore::open`].
    pub fn open_embedded(
        dir: &Path,
        cache_bytes: u64,
        flush_on_commit: bool,
        replays: ReplayPolicy,
        events: bool,
    ) -> Result<Store, StoreError> {
        embedded::EmbeddedStore::open(dir, cache_bytes, flush_on_commit, replays, events)
            .map(Store::Embedded)
    }

    /// A throw-away embedded database (fuzzing, unit tests).
    pub fn temporary() -> Result<Store, StoreError> {
        embedded::EmbeddedStore::temporary().map(Store::Embedded)
    }

    /// The entity `id`. An unknown id costs what a known one does.
    pub async fn entity(&self, id: &str) -> Result<Option<EntityRecord>, StoreError> {
        match self {
            Store::Embedded(s) => s.entity(id),
            Store::Postgres(s) => Box::pin(s.entity(id)).await,
        }
    }

    /// The entity `id` for a sign-in, with what a guard shared by several workers knows of
    /// it: one read.
    pub async fn sign_in(
        &self,
        id: &str,
        now_ms: u64,
    ) -> Result<(Option<EntityRecord>, SignInState), StoreError> {
        match self {
            Store::Embedded(s) => Ok((s.entity(id)?, SignInState::default())),
            Store::Postgres(s) => Box::pin(s.sign_in(id, now_ms)).await,
        }
    }

    /// Counts a sign-in's outcome in the guard shared by several workers, if the store has
    /// one: the lock a failure starts, if any. (The embedded store has none: the worker's
    /// own guard is the whole guard.)
    pub async fn count_sign_in(
        &self,
        id: &str,
        ok: bool,
        seen: SignInState,
        now_ms: u64,
    ) -> Result<Option<Duration>, StoreError> {
        match self {
            Store::Embedded(_) => Ok(None),
            Store::Postgres(s) => Box::pin(s.count_sign_in(id, ok, seen, now_ms)).await,
        }
    }

    /// Whether the store answered its last call (a shared database may be down; the
    /// embedded store always is there).
    pub fn available(&self) -> bool {
        match self {
            Store::Embedded(_) => true,
            Store::Postgres(s) => s.available(),
        }
    }

    /// Database round trips so far (a shared database; 0 for the embedded store).
    pub fn round_trips(&self) -> u64 {
        match self {
            Store::Embedded(_) => 0,
            Store::Postgres(s) => s.round_trips(),
        }
    }

    /// Up to `limit` entities in id order whose id starts with `prefix` and sorts after
    /// `after`, optionally only those of `owner`.
    pub async fn list_entities(
        &self,
        owner: Option<&str>,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EntityPage, StoreError> {
        match self {
            Store::Embedded(s) => s.list_entities(owner, prefix, after, limit),
            Store::Postgres(s) => Box::pin(s.list_entities(owner, prefix, after, limit)).await,
        }
    }

    /// Replaces the PSK hash of entity `id` with `psk` if its record is still exactly `seen`;
    /// whether it did. Records no reply: `Authenticate` moves a PSK to the newest server key
    /// with it, and losing that write loses nothing (the old hash still verifies).
    pub async fn replace_psk_hash(
        &self,
        id: &str,
        seen: &EntityRecord,
        psk: PskHash,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.replace_psk_hash(id, seen, psk),
            Store::Postgres(s) => Box::pin(s.replace_psk_hash(id, seen, psk)).await,
        }
    }

    /// How many PSK hashes and live app tokens were made with each server key: what still
    /// needs a key before it can be removed from the key file. A full scan (operators only).
    pub async fn key_usage(&self) -> Result<BTreeMap<KeyId, KeyUsage>, StoreError> {
        match self {
            Store::Embedded(s) => s.key_usage(),
            Store::Postgres(s) => Box::pin(s.key_usage()).await,
        }
    }

    /// The live token record of (user, host).
    pub async fn token(&self, user: &str, host: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self {
            Store::Embedded(s) => s.token(user, host),
            Store::Postgres(s) => Box::pin(s.token(user, host)).await,
        }
    }

    /// Up to `limit` live tokens of a user whose host sorts after `after`, in host order.
    pub async fn tokens_of(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TokenPage, StoreError> {
        match self {
            Store::Embedded(s) => s.tokens_of(user, after, limit),
            Store::Postgres(s) => Box::pin(s.tokens_of(user, after, limit)).await,
        }
    }

    /// The live token with this id: whose it is and for which host.
    pub async fn live_token(&self, token_id: &TokenId) -> Result<Option<LiveToken>, StoreError> {
        match self {
            Store::Embedded(s) => s.live_token(token_id),
            Store::Postgres(s) => Box::pin(s.live_token(token_id)).await,
        }
    }

    /// Rules with an id above `after`, in id order, at most `limit`.
    pub async fn rules(&self, after: u64, limit: usize) -> Result<Vec<(u64, Rule)>, StoreError> {
        match self {
            Store::Embedded(s) => s.rules(after, limit),
            Store::Postgres(s) => Box::pin(s.rules(after, limit)).await,
        }
    }

    /// AuthorizeCommand's decision for (src, dst, cmd), with what it needs of the entities
    /// `src` and `dst` read in the same call: see [`crate::rules::RuleIndex::decide`].
    pub async fn authorize(&self, src: &str, dst: &str, cmd: &str) -> Result<Decision, StoreError> {
        match self {
            Store::Embedded(s) => s.authorize(src, dst, cmd),
            Store::Postgres(s) => Box::pin(s.authorize(src, dst, cmd)).await,
        }
    }

    /// Makes `change` for `request`, in one transaction with the record of its reply. If a
    /// reply is already recorded for `request` (within the replay window), changes nothing
    /// and returns that reply; if another request used its `src` and `id`, changes nothing
    /// ([`Applied::IdReused`]).
    pub async fn apply(
        &self,
        request: &RequestKey<'_>,
        change: Change,
    ) -> Result<Applied, StoreError> {
        match self {
            Store::Embedded(s) => s.apply(request, change).await,
            Store::Postgres(s) => Box::pin(s.apply(request, change)).await,
        }
    }

    /// What is recorded for `request`'s `src` and `id` within the replay window, judged
    /// against its binding. Nothing for a request that records nothing (import).
    pub async fn recorded(&self, request: &RequestKey<'_>) -> Result<Recorded, StoreError> {
        match self {
            Store::Embedded(s) => s.recorded(request),
            Store::Postgres(s) => Box::pin(s.recorded(request)).await,
        }
    }

    /// Deletes replay records older than the window, then the oldest beyond the policy's
    /// count. Returns how many went.
    pub async fn prune_replays(&self, now_ms: u64) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.prune_replays(now_ms))
                    .await
                    .map_err(|_| StoreError::Writer)?
            }
            Store::Postgres(s) => Box::pin(s.prune_replays(now_ms)).await,
        }
    }

    /// Up to `limit` tokens whose lifetime ended by `now` (UNIX seconds), for the pruner
    /// ([`Change::ExpireTokens`]).
    pub async fn expired_tokens(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<ExpiredToken>, StoreError> {
        match self {
            Store::Embedded(s) => s.expired_tokens(now, limit),
            Store::Postgres(s) => Box::pin(s.expired_tokens(now, limit)).await,
        }
    }

    /// `Events.Since`: up to `limit` committed (and durable) events after `after` (none
    /// without it), the last event committed and how far events were pruned.
    pub async fn events_since(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        match self {
            Store::Embedded(s) => s.events_since(after, limit),
            Store::Postgres(s) => Box::pin(s.events_since(after, limit)).await,
        }
    }

    /// Waits until this worker is the one that publishes the store's events (the embedded
    /// store: at once; PostgreSQL: while it holds the publishers' lock), and returns the
    /// lease that publishes. Dropping the lease gives the role up.
    pub async fn lead_events(&self) -> Result<EventLease, StoreError> {
        match self {
            Store::Embedded(s) => Ok(EventLease::Embedded(s.clone())),
            Store::Postgres(s) => Box::pin(s.lead_events()).await.map(EventLease::Postgres),
        }
    }

    /// Deletes events made before `before_ms` that were sent. Returns how many went.
    pub async fn prune_events(&self, before_ms: u64) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.prune_events(before_ms))
                    .await
                    .map_err(|_| StoreError::Writer)?
            }
            Store::Postgres(s) => Box::pin(s.prune_events(before_ms)).await,
        }
    }

    /// Resolves when there are more replay records than the policy keeps (the pruner should
    /// run now rather than at its next tick).
    async fn too_many_replays(&self) {
        match self {
            Store::Embedded(s) => s.too_many_replays().await,
            // Pruned on the clock only: the count is the database's, and every worker prunes.
            Store::Postgres(_) => std::future::pending().await,
        }
    }

    /// Returns once every change visible now is durable: a reply that depends on a record
    /// seen by a read (a redelivery) waits on it.
    pub async fn durable(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.durable().await,
            // A committed change is durable (synchronous_commit), and nothing is visible
            // before its commit.
            Store::Postgres(_) => Ok(()),
        }
    }

    /// Whether each change is durable when [`Store::apply`] returns (false only for a store
    /// opened for bulk import).
    pub fn durable_on_commit(&self) -> bool {
        match self {
            Store::Embedded(s) => s.flushes_on_commit(),
            Store::Postgres(_) => true,
        }
    }

    /// Hands every record of the store to `sink`, one at a time, in a stable order: entities
    /// by id, then live tokens, then rules by id, then [`Record::NextRuleId`]. Memory stays
    /// constant however large the store. Returns how many records it handed over. Replay
    /// records are not records (see [`Record`]). Meant for a store no worker writes to (a
    /// stopped one): a change made meanwhile may or may not be in it.
    pub async fn export(
        &self,
        sink: &mut (dyn FnMut(Record) -> std::io::Result<()> + Send),
    ) -> Result<u64, ExportError> {
        match self {
            Store::Embedded(s) => s.export(sink),
            Store::Postgres(s) => Box::pin(s.export(sink)).await,
        }
    }

    /// Writes `records` (one batch, in one transaction) as they are: an entity replaces
    /// the one with its id (its `created` included, and without removing the user's tokens,
    /// as a re-provisioning put would), a token becomes the live token of its (user, host),
    /// a rule is stored under its id, and the next rule id becomes the largest of the
    /// store's, a [`Record::NextRuleId`]'s and one above every rule id restored. Idempotent:
    /// restoring the same records again changes nothing. Every index stays true (an owner's
    /// entities, token ids, per-user token counts, the rule index). Records no reply.
    pub async fn restore(&self, records: Vec<Record>) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.restore(records).await,
            Store::Postgres(s) => Box::pin(s.restore(records)).await,
        }
    }

    /// Writes everything to stable storage (at the end of an import, at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.flush())
                    .await
                    .map_err(|_| StoreError::Flush)?
            }
            Store::Postgres(_) => Ok(()),
        }
    }
}

/// The role of publishing a store's events ([`Store::lead_events`]): what the publisher
/// reads and marks. On PostgreSQL every call goes through the connection that holds the
/// role; an error means the role may be lost, and the publisher asks for it again.
pub enum EventLease {
    Embedded(embedded::EmbeddedStore),
    Postgres(postgres::EventLease),
}

impl EventLease {
    /// The last event the broker acknowledged with every one before it.
    pub async fn sent(&mut self) -> Result<u64, StoreError> {
        match self {
            EventLease::Embedded(s) => s.events_sent(),
            EventLease::Postgres(l) => l.sent().await,
        }
    }

    /// Up to `limit` committed (and durable) events after `after`, in order.
    pub async fn after(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        match self {
            EventLease::Embedded(s) => s.events_after(after, limit),
            EventLease::Postgres(l) => l.after(after, limit).await,
        }
    }

    /// Records that the broker acknowledged every event up to `seq`.
    pub async fn mark_sent(&mut self, seq: u64) -> Result<(), StoreError> {
        match self {
            EventLease::Embedded(s) => s.mark_events_sent(seq),
            EventLease::Postgres(l) => l.mark_sent(seq).await,
        }
    }

    /// Resolves when events may have been committed since the last look: at once when
    /// this worker commits one; on PostgreSQL also every `poll` (other workers commit
    /// too).
    pub async fn moved(&self, poll: Duration) {
        match self {
            EventLease::Embedded(s) => s.events_moved().await,
            EventLease::Postgres(l) => l.moved(poll).await,
        }
    }
}

/// Most expired tokens removed in one change.
const EXPIRE_BATCH: usize = 256;

/// The store's upkeep, until the task is dropped: replay records pruned every `every` and
/// as soon as there are more than the policy keeps; every `often`, expired tokens removed,
/// each removal a change of its own ([`Change::ExpireTokens`]: it publishes
/// `token.expired`), and events older than `events`' retention (and sent) pruned.
pub async fn maintain(store: Store, every: Duration, often: Duration, events: EventPolicy) {
    let mut tick = tokio::time::interval(every);
    let mut often_tick = tokio::time::interval(often);
    loop {
        tokio::select! {
            _ = often_tick.tick() => {
                if !store.available() {
                    // A database known to be down: the watch says when it is back.
                    continue;
                }
                if let Err(e) = expire_tokens(&store).await {
                    tracing::warn!(error = %e, "removing expired tokens failed");
                }
                let before = crate::unix_ms().saturating_sub(events.retention_ms);
                match store.prune_events(before).await {
                    Ok(n) if n > 0 => tracing::debug!(pruned = n, "events pruned"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning events failed"),
                }
                continue;
            }
            _ = tick.tick() => {}
            _ = store.too_many_replays() => {}
        }
        match store.prune_replays(crate::unix_ms()).await {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "replay records pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning replay records failed"),
        }
    }
}

/// Removes every token expired now, a batch per change.
pub async fn expire_tokens(store: &Store) -> Result<usize, StoreError> {
    let mut removed = 0;
    loop {
        let now_ms = crate::unix_ms();
        let tokens = store.expired_tokens(now_ms / 1000, EXPIRE_BATCH).await?;
        if tokens.is_empty() {
            return Ok(removed);
        }
        let full = tokens.len() == EXPIRE_BATCH;
        let request = RequestKey {
            src: "",
            id: 0,
            at_ms: now_ms,
            binding: None,
        };
        if let Applied::Now(Changed::TokensExpired(pairs), _) = store
            .apply(&request, Change::ExpireTokens { tokens })
            .await?
        {
            removed += pairs.len();
            if !pairs.is_empty() {
                tracing::info!(removed = pairs.len(), "expired app tokens removed");
            }
        }
        if !full {
            return Ok(removed);
        }
    }
}

#[cfg(test)]
mod tests;
