//! The PostgreSQL store: one database that several workers share.
//!
//! Every read is one statement, so one round trip. AuthorizeCommand's statement reads the
//! two entities and the rules version together; a worker whose in-memory rule index is
//! behind that version reads the rule changes since (`rule_log`) before it decides, so a
//! rule changed through any worker decides the very next request on every worker, with no
//! cache window and no reliance on LISTEN/NOTIFY.
//!
//! Every change goes through [`writer`]: concurrent changes are applied by one call of the
//! database function `authd_apply` (migrations/), one transaction and one round trip for
//! the batch, with their replay records; the call returns after COMMIT, which PostgreSQL
//! makes durable (synchronous_commit is left on).
//!
//! Dropped connections, serialization failures and deadlocks are retried with backoff
//! until the store's deadline (`store_timeout_ms`); past it the call fails with
//! [`StoreError::Unavailable`], the worker holds the request unanswered and unacknowledged
//! and tries again, and `/ready` says 503 until a statement succeeds again.
//!
//! | file | what |
//! |---|---|
//! | [`migrate`] | the versioned schema in `migrations/`, applied at open under a lock |
//! | [`writer`] | batches of changes, `authd_apply` |
//! | [`rows`] | rows to records and changes to the function's JSON |
//! | [`lockouts`] | the shared brute-force guard's counters |
//! | [`transfer`] | export and restore of whole records (moving a deployment) |

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::time::Instant;
use tokio_postgres::NoTls;

use crate::crypto::{KeyId, ServerKeys, TokenId};
use crate::rules::{Decision, Parties, Rule, RuleIndex};
use crate::store::events::{EventPage, StoredEvent};
use crate::store::records::{
    Applied, Change, EntityPage, EntityRecord, ExpiredToken, KeyUsage, LiveToken, PskHash,
    Recorded, ReplayPolicy, RequestKey, StoreError, TokenPage, TokenRecord,
};

mod batch;
pub mod lockouts;
mod migrate;
mod rows;
mod transfer;
mod writer;

pub use migrate::SCHEMA_VERSION;

/// Checks a store URL without echoing it (it may hold a password).
pub fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("store: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DB".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|_| "store: not a valid postgres:// URL".into())
}

/// `url` as it may be shown: unchanged when it holds no password, else rebuilt from its
/// parsed parts (user, hosts, ports, database) with `redacted` for the password. The
/// other parameters are left out: the parser takes a password from the user part (up to
/// the first `@`, whatever comes before it) or from a `password=` parameter, and a copy
/// of the text could not be trusted to have hidden it.
pub fn redact_url(url: &str, redacted: &str) -> String {
    use tokio_postgres::config::Host;
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "<not a valid postgres:// URL>".into();
    };
    if config.get_password().is_none() {
        return url.to_owned();
    }
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let mut shown = match host {
                // An unencoded `@` in the password leaves its tail in the host.
                Host::Tcp(h) => match h.rsplit_once('@').map_or(h.as_str(), |(_, h)| h) {
                    h if h.contains(':') => format!("[{h}]"),
                    h => h.to_owned(),
                },
                Host::Unix(dir) => dir.display().to_string().replace('/', "%2F"),
            };
            // One port for every host, or one per host.
            if let Some(port) = ports.get(i).or(ports.last()) {
                shown.push_str(&format!(":{port}"));
            }
            shown
        })
        .collect();
    format!(
        "postgres://{}:{redacted}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// How to reach the database and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Options {
    pub pool: usize,
    /// Statement timeout, and the deadline of one call with its retries.
    pub timeout: Duration,
    pub replays: ReplayPolicy,
    /// The brute-force guard's rule, applied to the shared counters.
    pub lockout: crate::lockout::LockoutPolicy,
    /// Changes write their events.
    pub events: bool,
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    db: Arc<Db>,
    sign_ins: Arc<batch::Batched<lockouts::SignIns>>,
    decisions: Arc<batch::Batched<Rows<String, String>>>,
    tokens: Arc<batch::Batched<Rows<String, String>>>,
    replay_records: Arc<batch::Batched<Rows<String, i64>>>,
    lockout: crate::lockout::LockoutPolicy,
    rules: Arc<Rules>,
    writer: writer::Writer,
    /// Woken when this worker commits a batch of changes (the event publisher looks).
    committed: Arc<tokio::sync::Notify>,
}

/// The pool and what every call shares.
pub(crate) struct Db {
    pool: Pool,
    timeout: Duration,
    replays: ReplayPolicy,
    /// Whether the last call reached the database (for `/ready`).
    up: AtomicBool,
    /// Statements sent (round trips), for `authd_store_round_trips_total`.
    trips: AtomicU64,
}

/// The in-memory rule index and the rules version it reflects.
struct Rules {
    index: RwLock<(u64, RuleIndex)>,
    /// Held while the index catches up, so concurrent decisions fetch the changes once.
    catch_up: tokio::sync::Mutex<()>,
}

/// A failed attempt: worth retrying (the connection, a serialization failure, a deadlock,
/// a server restarting) or not.
pub(crate) enum Failure {
    Transient(String),
    Fatal(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        use tokio_postgres::error::SqlState;
        let transient = match e.code() {
            // No SQLSTATE: the connection (I/O, closed, a timeout), or a mistake of ours
            // (a parameter that does not serialize), which no retry mends.
            None => {
                let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
                let text = e.to_string();
                io || text.contains("connect") || text.contains("timeout")
            }
            Some(code) => {
                let c = code.code();
                *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::QUERY_CANCELED
                    || *code == SqlState::TOO_MANY_CONNECTIONS
                    || c.starts_with("08")
                    || c.starts_with("57P")
            }
        };
        if transient || e.is_closed() {
            return Failure::Transient(e.to_string());
        }
        // The server's own message and code say what went wrong; the client error's
        // Display is only "db error".
        Failure::Fatal(StoreError::Database(match e.as_db_error() {
            Some(db) => Box::new(db.clone()),
            None => Box::new(e),
        }))
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Failure {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => Failure::Transient(e.to_string()),
        }
    }
}

impl Failure {
    /// As a store error (outside a retried call).
    pub(crate) fn into_error(self) -> StoreError {
        match self {
            Failure::Fatal(e) => e,
            Failure::Transient(why) => StoreError::Database(why.into()),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Fatal(e)
    }
}

impl Db {
    /// Runs `attempt` with a pooled connection, again after a transient failure (with
    /// backoff), until it succeeds, fails for good, or the deadline passes
    /// ([`StoreError::Unavailable`]). `trips`: the round trips one attempt takes.
    pub(crate) async fn run<T, F, Fut>(&self, trips: u64, attempt: F) -> Result<T, StoreError>
    where
        F: Fn(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            let once = async {
                let client = self.pool.get().await?;
                self.trips.fetch_add(trips, Relaxed);
                attempt(client).await
            };
            let why = match tokio::time::timeout_at(deadline, once).await {
                Ok(Ok(value)) => {
                    if !self.up.swap(true, Relaxed) {
                        tracing::info!("database reachable again");
                    }
                    return Ok(value);
                }
                Ok(Err(Failure::Fatal(e))) => return Err(e),
                Ok(Err(Failure::Transient(why))) => why,
                Err(_) => "no answer before the deadline".to_owned(),
            };
            if Instant::now() + pause >= deadline {
                if self.up.swap(false, Relaxed) {
                    tracing::error!(error = %why, "database unavailable: holding requests until it is back");
                }
                return Err(StoreError::Unavailable);
            }
            tracing::debug!(error = %why, "database call failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// Asks the database for nothing every 2 s while the store is open, so that `/ready` and
/// `authd_store_up` tell an outage even when no request comes.
async fn watch(db: std::sync::Weak<Db>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Some(db) = db.upgrade() else { return };
        let _ = db
            .run(1, async |c| {
                c.simple_query("").await?;
                Ok(())
            })
            .await;
    }
}

const ENTITY: &str = "SELECT kind, owner, psk_key_id, psk_hash, cert_sha256, disabled, created \
     FROM entities WHERE id = $1";
/// For the n-th (src, dst) of $1, $2: the rules version, whether src and dst are
/// disabled, dst's owner.
const AUTHORIZE: &str =
    "SELECT k.n, (SELECT version FROM rules_version), s.disabled, d.disabled, d.owner \
     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(src, dst, n) \
     LEFT JOIN entities s ON s.id = k.src COLLATE \"C\" \
     LEFT JOIN entities d ON d.id = k.dst COLLATE \"C\"";

const RULE_LOG: &str =
    "SELECT version, rule_id, rule, deleted FROM rule_log WHERE version > $1 ORDER BY version";
const LIVE_TOKEN: &str =
    "SELECT user_id, host, token_id, key_id, created, expires FROM tokens WHERE token_id = $1";
/// The token of the n-th (user, host) of $1, $2, if any.
const TOKENS: &str = "SELECT k.n, t.token_id, t.key_id, t.created, t.expires \
     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(user_id, host, n) \
     JOIN tokens t ON t.user_id = k.user_id COLLATE \"C\" AND t.host = k.host COLLATE \"C\"";
const TOKENS_OF: &str = "SELECT host, token_id, key_id, created, expires FROM tokens \
     WHERE user_id = $1 AND ($2::text IS NULL OR host > $2) ORDER BY host LIMIT $3";
const ENTITIES: &str = "SELECT id, kind, owner, psk_key_id, psk_hash, cert_sha256, disabled, created \
     FROM entities \
     WHERE ($1::text IS NULL OR owner = $1) AND id >= $2 AND starts_with(id, $2) AND ($3::text IS NULL OR id > $3) \
     ORDER BY id LIMIT $4";
const RULES: &str = "SELECT id, rule FROM rules WHERE id > $1 ORDER BY id LIMIT $2";
const EXPIRED: &str = "SELECT user_id, host, token_id FROM tokens \
     WHERE expires <= $1 ORDER BY expires LIMIT $2";
/// The head, the pruned mark and up to $2 events after $1 (a row with no event when none).
const EVENTS_SINCE: &str = "SELECT s.seq, m.pruned, e.seq, e.body \
     FROM event_seq s CROSS JOIN event_marks m \
     LEFT JOIN LATERAL (SELECT seq, body FROM events WHERE seq > $1 ORDER BY seq LIMIT $2) e ON true";
const PRUNE_EVENTS: &str = "WITH gone AS (DELETE FROM events \
       WHERE seq <= (SELECT sent FROM event_marks) AND at_ms < $1 RETURNING seq), \
     marked AS (UPDATE event_marks SET pruned = GREATEST(pruned, (SELECT max(seq) FROM gone)) \
       WHERE EXISTS (SELECT 1 FROM gone)) \
     SELECT count(*) FROM gone";
/// Held, as a session lock, by the worker that publishes the events ("authevnt").
const PUBLISHER_LOCK: i64 = 0x6175_7468_6576_6e74;
/// The replay record of the n-th (src, id) of $1, $2, if any.
const REPLAYS: &str = "SELECT k.n, r.at_ms, r.caller, r.method, r.args_digest, r.reply \
     FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY AS k(src, id, n) \
     JOIN replays r ON r.src = k.src COLLATE \"C\" AND r.id = k.id";

/// Reads of at most one row per key of two columns, batched ([`batch`]): the row of
/// each key (its first column the key's position), or none.
struct Rows<A, B> {
    db: Arc<Db>,
    sql: &'static str,
    keys: std::marker::PhantomData<fn(A, B)>,
}

impl<A, B> Rows<A, B> {
    fn new(db: &Arc<Db>, sql: &'static str) -> Rows<A, B> {
        Rows {
            db: db.clone(),
            sql,
            keys: std::marker::PhantomData,
        }
    }
}

impl<A, B> batch::Fetch for Rows<A, B>
where
    A: tokio_postgres::types::ToSql + Send + Sync + 'static,
    B: tokio_postgres::types::ToSql + Send + Sync + 'static,
{
    type Key = (A, B);
    type Value = Option<tokio_postgres::Row>;

    async fn fetch(&self, keys: &[(A, B)]) -> Result<Vec<Self::Value>, StoreError> {
        let a: Vec<&A> = keys.iter().map(|k| &k.0).collect();
        let b: Vec<&B> = keys.iter().map(|k| &k.1).collect();
        let rows = self
            .db
            .run(1, async |c| {
                let stmt = c.prepare_cached(self.sql).await?;
                Ok(c.query(&stmt, &[&a, &b]).await?)
            })
            .await?;
        let mut out: Vec<Self::Value> = keys.iter().map(|_| None).collect();
        for row in rows {
            let n: i64 = row
                .try_get(0)
                .map_err(|e| StoreError::corrupt("batched read", e))?;
            if let Some(slot) = (n as usize).checked_sub(1).and_then(|i| out.get_mut(i)) {
                *slot = Some(row);
            }
        }
        Ok(out)
    }
}
const REPLACE_PSK: &str = "UPDATE entities SET psk_key_id = $2, psk_hash = $3 \
     WHERE id = $1 AND kind = $4 AND owner IS NOT DISTINCT FROM $5 \
     AND psk_key_id IS NOT DISTINCT FROM $6 AND psk_hash IS NOT DISTINCT FROM $7 \
     AND cert_sha256 IS NOT DISTINCT FROM $8 AND disabled = $9";

/// The role of publishing the store's events: a connection of its own holding the
/// publishers' lock. Every call goes through it, so a failed call means the lock may be
/// gone with the connection: the publisher drops the lease (closing the connection) and
/// asks for the role again.
pub struct EventLease {
    client: deadpool_postgres::ClientWrapper,
    committed: Arc<tokio::sync::Notify>,
    /// Longest a call may take (`store_timeout_ms`): a connection that went silent (no
    /// reset) fails the lease rather than holding the role.
    timeout: Duration,
}

impl EventLease {
    /// `call` on the lease's connection, failed past the deadline.
    async fn run<T>(
        &self,
        call: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|e| Failure::from(e).into_error()),
            Err(_) => Err(StoreError::Unavailable),
        }
    }

    pub async fn sent(&mut self) -> Result<u64, StoreError> {
        let client = &self.client;
        self.run(async {
            let row = client
                .query_one("SELECT sent FROM event_marks", &[])
                .await?;
            Ok(row.try_get::<_, i64>(0)? as u64)
        })
        .await
    }

    pub async fn after(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let (after, limit) = (after.min(i64::MAX as u64) as i64, limit as i64);
        let client = &self.client;
        self.run(async {
            let stmt = client
                .prepare_cached("SELECT seq, body FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
                .await?;
            client
                .query(&stmt, &[&after, &limit])
                .await?
                .iter()
                .map(|r| {
                    Ok(StoredEvent {
                        seq: r.try_get::<_, i64>(0)? as u64,
                        json: r.try_get::<_, String>(1)?.into_bytes(),
                    })
                })
                .collect()
        })
        .await
    }

    pub async fn mark_sent(&mut self, seq: u64) -> Result<(), StoreError> {
        let seq = seq.min(i64::MAX as u64) as i64;
        let client = &self.client;
        self.run(async {
            client
                .execute("UPDATE event_marks SET sent = GREATEST(sent, $1)", &[&seq])
                .await
                .map(|_| ())
        })
        .await
    }

    /// Resolves when this worker commits a batch, or after `poll` (other workers commit
    /// too).
    pub async fn moved(&self, poll: Duration) {
        tokio::select! {
            _ = self.committed.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

impl PostgresStore {
    /// Connects, brings the schema up to date (or refuses a newer one), checks that `keys`
    /// is the server key file the other workers use, and loads the rules.
    pub async fn open(
        url: &str,
        options: Options,
        keys: &ServerKeys,
    ) -> Result<PostgresStore, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|_| StoreError::corrupt("store", "not a valid postgres:// URL"))?;
        let ms = options.timeout.as_millis().max(1);
        config.application_name("authd");
        // A generic plan from the first execution: the statements are few and fixed, and
        // custom planning costs more than it saves on them. Every statement of authd finds
        // rows by key: no sequential scans, or a plan made while a table was nearly empty
        // (a new database) would keep scanning it as it grows, until the next ANALYZE.
        // No JIT: it compiles a statement for far longer than a key lookup takes (and the
        // cost of a refused sequential scan would always call for it).
        config.options(format!(
            "-c statement_timeout={ms} -c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c jit=off"
        ));
        config.connect_timeout(options.timeout);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool)
            .build()
            .map_err(|e| StoreError::corrupt("store", e))?;
        let db = Arc::new(Db {
            pool,
            timeout: options.timeout,
            replays: options.replays,
            up: AtomicBool::new(true),
            trips: AtomicU64::new(0),
        });
        {
            // The server's own message (no such database, login refused…), not "db error".
            let mut client = db
                .pool
                .get()
                .await
                .map_err(|e| Failure::from(e).into_error())?;
            migrate::run(&mut client).await?;
            migrate::check_keys(&client, keys).await?;
        }
        let (version, index) = rows::load_rules(&db).await?;
        tokio::spawn(watch(Arc::downgrade(&db)));
        let committed = Arc::new(tokio::sync::Notify::new());
        Ok(PostgresStore {
            sign_ins: batch::Batched::new(lockouts::SignIns {
                db: db.clone(),
                forget: options.lockout.forget,
            }),
            decisions: batch::Batched::new(Rows::new(&db, AUTHORIZE)),
            tokens: batch::Batched::new(Rows::new(&db, TOKENS)),
            replay_records: batch::Batched::new(Rows::new(&db, REPLAYS)),
            lockout: options.lockout,
            writer: writer::Writer::start(db.clone(), options.events, committed.clone()),
            committed,
            rules: Arc::new(Rules {
                index: RwLock::new((version, index)),
                catch_up: tokio::sync::Mutex::new(()),
            }),
            db,
        })
    }

    /// Whether the database answered the last call.
    pub fn available(&self) -> bool {
        self.db.up.load(Relaxed)
    }

    /// Statements sent so far.
    pub fn round_trips(&self) -> u64 {
        self.db.trips.load(Relaxed)
    }

    pub async fn entity(&self, id: &str) -> Result<Option<EntityRecord>, StoreError> {
        self.db
            .run(1, async |c| {
                let stmt = c.prepare_cached(ENTITY).await?;
                match c.query_opt(&stmt, &[&id]).await? {
                    None => Ok(None),
                    Some(row) => Ok(Some(rows::entity(&row, 0)?)),
                }
            })
            .await
    }

    pub async fn list_entities(
        &self,
        owner: Option<&str>,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EntityPage, StoreError> {
        let fetch = limit.saturating_add(1).min(i64::MAX as usize) as i64;
        let found = self
            .db
            .run(1, async |c| {
                let stmt = c.prepare_cached(ENTITIES).await?;
                let rows = c.query(&stmt, &[&owner, &prefix, &after, &fetch]).await?;
                rows.iter()
                    .map(|r| Ok((r.try_get::<_, String>(0)?, rows::entity(r, 1)?)))
                    .collect::<Result<Vec<_>, Failure>>()
            })
            .await?;
        let more = found.len() > limit;
        let mut entities = found;
        entities.truncate(limit);
        Ok(EntityPage { entities, more })
    }

    pub async fn replace_psk_hash(
        &self,
        id: &str,
        seen: &EntityRecord,
        psk: PskHash,
    ) -> Result<bool, StoreError> {
        let (old_key, old_hash) = match &seen.psk {
            Some(p) => (Some(i64::from(p.key_id)), Some(p.hash.to_vec())),
            None => (None, None),
        };
        let cert = seen.cert_sha256.map(|c| c.to_vec());
        let kind = rows::kind_code(seen.kind);
        let new_key = i64::from(psk.key_id);
        let new_hash = psk.hash.to_vec();
        self.db
            .run(1, async |c| {
                let stmt = c.prepare_cached(REPLACE_PSK).await?;
                let n = c
                    .execute(
                        &stmt,
                        &[
                            &id,
                            &new_key,
                            &new_hash,
                            &kind,
                            &seen.owner,
                            &old_key,
                            &old_hash,
                            &cert,
                            &seen.disabled,
                        ],
                    )
                    .await?;
                Ok(n == 1)
            })
            .await
    }

    pub async fn key_usage(&self) -> Result<BTreeMap<KeyId, KeyUsage>, StoreError> {
        self.db
            .run(2, async |c| {
                let mut usage = BTreeMap::<KeyId, KeyUsage>::new();
                for row in c
                    .query(
                        "SELECT psk_key_id, count(*) FROM entities WHERE psk_hash IS NOT NULL GROUP BY 1",
                        &[],
                    )
                    .await?
                {
                    usage.entry(rows::key_id(row.try_get(0)?)?).or_default().psk_hashes =
                        row.try_get::<_, i64>(1)? as u64;
                }
                for row in c
                    .query("SELECT key_id, count(*) FROM tokens GROUP BY 1", &[])
                    .await?
                {
                    usage.entry(rows::key_id(row.try_get(0)?)?).or_default().tokens =
                        row.try_get::<_, i64>(1)? as u64;
                }
                Ok(usage)
            })
            .await
    }

    pub async fn token(&self, user: &str, host: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self.tokens.get((user.to_owned(), host.to_owned())).await? {
            None => Ok(None),
            Some(row) => rows::token(&row, 1).map(Some).map_err(Failure::into_error),
        }
    }

    pub async fn tokens_of(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TokenPage, StoreError> {
        let fetch = limit.saturating_add(1).min(i64::MAX as usize) as i64;
        let found = self
            .db
            .run(1, async |c| {
                let stmt = c.prepare_cached(TOKENS_OF).await?;
                let rows = c.query(&stmt, &[&user, &after, &fetch]).await?;
                rows.iter()
                    .map(|r| Ok((r.try_get::<_, String>(0)?, rows::token(r, 1)?)))
                    .collect::<Result<Vec<_>, Failure>>()
            })
            .await?;
        let more = found.len() > limit;
        let mut tokens = found;
        tokens.truncate(limit);
        Ok(TokenPage { tokens, more })
    }

    pub async fn live_token(&self, token_id: &TokenId) -> Result<Option<LiveToken>, StoreError> {
        let id = &token_id[..];
        self.db
            .run(1, async |c| {
                let stmt = c.prepare_cached(LIVE_TOKEN).await?;
                match c.query_opt(&stmt, &[&id]).await? {
                    None => Ok(None),
                    Some(row) => Ok(Some(LiveToken {
                        user: row.try_get(0)?,
                        host: row.try_get(1)?,
                        record: rows::token(&row, 2)?,
                    })),
                }
            })
            .await
    }

    pub async fn rules(&self, after: u64, limit: usize) -> Result<Vec<(u64, Rule)>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = limit.min(i64::MAX as usize) as i64;
        self.db
            .run(1, async |c| {
                let stmt = c.prepare_cached(RULES).await?;
                c.query(&stmt, &[&after, &limit])
                    .await?
                    .iter()
                    .map(|r| Ok((r.try_get::<_, i64>(0)? as u64, rows::rule(r, 1)?)))
                    .collect()
            })
            .await
    }

    /// AuthorizeCommand's decision: one statement reads both entities and the rules
    /// version (shared with the decisions that come at the same time); if the index is
    /// behind, the rule changes since are read first.
    pub async fn authorize(&self, src: &str, dst: &str, cmd: &str) -> Result<Decision, StoreError> {
        // LEFT JOINs: a row for every key, whether or not its entities exist.
        let row = self
            .decisions
            .get((src.to_owned(), dst.to_owned()))
            .await?
            .ok_or_else(|| StoreError::corrupt("entities", "row missing"))?;
        let bad = |e| StoreError::corrupt("entities", e);
        let version = row.try_get::<_, i64>(1).map_err(bad)? as u64;
        let parties = Parties {
            src_disabled: row
                .try_get::<_, Option<bool>>(2)
                .map_err(bad)?
                .unwrap_or(false),
            dst_disabled: row
                .try_get::<_, Option<bool>>(3)
                .map_err(bad)?
                .unwrap_or(false),
            dst_owner: row.try_get(4).map_err(bad)?,
        };
        if self.index_version() < version {
            self.catch_up(version).await?;
        }
        let index = self.rules.index.read().unwrap_or_else(|e| e.into_inner());
        Ok(index.1.decide(src, dst, cmd, &parties))
    }

    fn index_version(&self) -> u64 {
        self.rules.index.read().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Brings the rule index to `version` at least, from `rule_log`.
    async fn catch_up(&self, version: u64) -> Result<(), StoreError> {
        let _one = self.rules.catch_up.lock().await;
        let from = self.index_version();
        if from >= version {
            return Ok(());
        }
        let from_i = from as i64;
        let changes = self
            .db
            .run(1, async |c| {
                let stmt = c.prepare_cached(RULE_LOG).await?;
                c.query(&stmt, &[&from_i])
                    .await?
                    .iter()
                    .map(|r| {
                        Ok((
                            r.try_get::<_, i64>(0)? as u64,
                            r.try_get::<_, i64>(1)? as u64,
                            rows::rule(r, 2)?,
                            r.try_get::<_, bool>(3)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, Failure>>()
            })
            .await?;
        let mut index = self.rules.index.write().unwrap_or_else(|e| e.into_inner());
        for (v, rule_id, rule, deleted) in changes {
            if deleted {
                index.1.remove(rule_id, &rule);
            } else {
                index.1.insert(rule_id, &rule);
            }
            index.0 = v;
        }
        Ok(())
    }

    pub async fn recorded(&self, request: &RequestKey<'_>) -> Result<Recorded, StoreError> {
        let Some(binding) = &request.binding else {
            return Ok(Recorded::Nothing);
        };
        let found = self
            .replay_records
            .get((request.src.to_owned(), request.id as i64))
            .await?;
        let Some(row) = found else {
            return Ok(Recorded::Nothing);
        };
        let bad = |e: tokio_postgres::Error| StoreError::corrupt("replays", e);
        let at: i64 = row.try_get(1).map_err(bad)?;
        if (at as u64).saturating_add(self.db.replays.window_ms) < request.at_ms {
            return Ok(Recorded::Nothing);
        }
        let caller: String = row.try_get(2).map_err(bad)?;
        let method: String = row.try_get(3).map_err(bad)?;
        let digest: Vec<u8> = row.try_get(4).map_err(bad)?;
        if caller != binding.caller || method != binding.method || digest != binding.args_digest {
            return Ok(Recorded::Other);
        }
        let reply: serde_json::Value = row.try_get(5).map_err(bad)?;
        serde_json::from_value(reply)
            .map(Recorded::Same)
            .map_err(|e| StoreError::corrupt("replays", e))
    }

    pub async fn apply(
        &self,
        request: &RequestKey<'_>,
        change: Change,
    ) -> Result<Applied, StoreError> {
        self.writer.apply(request, change).await
    }

    /// Up to `limit` tokens whose lifetime ended by `now` (UNIX seconds), soonest first.
    pub async fn expired_tokens(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<ExpiredToken>, StoreError> {
        let (now, limit) = (now.min(i64::MAX as u64) as i64, limit as i64);
        self.db
            .run(1, async |c| {
                let stmt = c.prepare_cached(EXPIRED).await?;
                c.query(&stmt, &[&now, &limit])
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(ExpiredToken {
                            user: r.try_get(0)?,
                            host: r.try_get(1)?,
                            token_id: r
                                .try_get::<_, Vec<u8>>(2)?
                                .try_into()
                                .map_err(|_| StoreError::corrupt("tokens", "bad token id"))?,
                        })
                    })
                    .collect()
            })
            .await
    }

    /// `Events.Since`: one statement reads the head, the pruned mark and the events.
    pub async fn events_since(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let from = after.map_or(0, |a| a.min(i64::MAX as u64) as i64);
        let limit = if after.is_some() { limit as i64 } else { 0 };
        self.db
            .run(1, async |c| {
                let stmt = c.prepare_cached(EVENTS_SINCE).await?;
                let rows = c.query(&stmt, &[&from, &limit]).await?;
                let mut page = EventPage::default();
                for r in &rows {
                    page.head = r.try_get::<_, i64>(0)? as u64;
                    page.pruned_through = r.try_get::<_, i64>(1)? as u64;
                    if let Some(seq) = r.try_get::<_, Option<i64>>(2)? {
                        page.events.push(StoredEvent {
                            seq: seq as u64,
                            json: r.try_get::<_, String>(3)?.into_bytes(),
                        });
                    }
                }
                Ok(page)
            })
            .await
    }

    /// Deletes sent events made before `before_ms`; how many.
    pub async fn prune_events(&self, before_ms: u64) -> Result<u64, StoreError> {
        let before = before_ms.min(i64::MAX as u64) as i64;
        self.db
            .run(1, async |c| {
                let n: i64 = c.query_one(PRUNE_EVENTS, &[&before]).await?.try_get(0)?;
                Ok(n as u64)
            })
            .await
    }

    /// Waits until this worker holds the publishers' lock (a session lock on a connection
    /// of its own), and returns the lease. Another worker holds it while it lives: its
    /// lock goes with its connection, and a worker asking every second takes over.
    pub async fn lead_events(&self) -> Result<EventLease, StoreError> {
        loop {
            let got = self
                .db
                .run(1, async |c| {
                    let locked: bool = c
                        .query_one("SELECT pg_try_advisory_lock($1)", &[&PUBLISHER_LOCK])
                        .await?
                        .try_get(0)?;
                    if !locked {
                        return Ok(None);
                    }
                    // The `sent` mark need not wait for the disk: losing its last moves to a
                    // crash publishes those events again, which consumers recognise.
                    c.batch_execute("SET synchronous_commit = off").await?;
                    // Not given back to the pool while it holds the lock: closed with the
                    // lease instead, which releases it.
                    Ok(Some(deadpool_postgres::Object::take(c)))
                })
                .await;
            match got {
                Ok(Some(client)) => {
                    tracing::info!("publishing this store's change events");
                    return Ok(EventLease {
                        client,
                        committed: self.committed.clone(),
                        timeout: self.db.timeout,
                    });
                }
                Ok(None) | Err(StoreError::Unavailable) => {
                    tokio::time::sleep(Duration::from_secs(1)).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes replay records older than the window, then the oldest beyond the policy's
    /// count, and the shared guard's forgotten streaks (every worker prunes; what one
    /// deleted the others find gone).
    pub async fn prune_replays(&self, now_ms: u64) -> Result<u64, StoreError> {
        let before = now_ms.saturating_sub(self.db.replays.window_ms) as i64;
        let keep = self.db.replays.max_records.min(i64::MAX as u64) as i64;
        let now = now_ms as i64;
        let forget = lockouts::ms(self.lockout.forget);
        let forgotten = now.saturating_sub(forget);
        self.db
            .run(3, async |c| {
                let old = c
                    .execute("DELETE FROM replays WHERE at_ms < $1", &[&before])
                    .await?;
                let early = c
                    .execute(
                        "DELETE FROM replays WHERE (src, id) IN (SELECT src, id FROM replays ORDER BY at_ms \
                         LIMIT GREATEST((SELECT count(*) FROM replays) - $1, 0))",
                        &[&keep],
                    )
                    .await?;
                // Streaks the guard has forgotten (not locked, no failure for `forget`).
                c.execute(
                    "DELETE FROM lockouts WHERE locked_until_ms < $1 AND last_failure_ms < $2",
                    &[&now, &forgotten],
                )
                .await?;
                Ok(old + early)
            })
            .await
    }
}
