//! The store's vocabulary: the records it keeps and the changes it applies, in the product's
//! words. Every backend reads and writes these types; nothing here knows how they are kept.

use serde::{Deserialize, Serialize};

use crate::crypto::{KeyId, PskNonce, TokenId};
use crate::rules::Rule;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(Box<dyn std::error::Error + Send + Sync>),
    #[error("database record under {what} is unreadable: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("database schema version {found} is not the version {known} this authd understands")]
    Schema { found: String, known: u64 },
    #[error("database flush failed")]
    Flush,
    #[error("the database writer thread is gone")]
    Writer,
    /// The database did not answer within the store's deadline (it is down, restarting
    /// or unreachable): nothing is known to have changed, and the request can be tried
    /// again later.
    #[error("the database is unavailable")]
    Unavailable,
    #[error("server key {key_id} in the key file is not the key the other workers of this database use: copy server.key from a worker that serves it")]
    KeyMismatch { key_id: u32 },
    /// Another process holds the database (the embedded store's lock: a worker runs on it).
    #[error("the database is in use by another process")]
    InUse,
}

impl StoreError {
    pub(crate) fn corrupt(what: &'static str, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }
}

/// What the brute-force guard shared by several workers knows of an id when it signs in
/// (always the default for a store that shares no guard: the worker's own guard decides).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignInState {
    /// Locked now: refuse unchecked.
    pub locked: bool,
    /// Consecutive failures so far.
    pub failures: u32,
}

/// The live token of one (user, host) pair. Holds no usable secret: the token string is
/// derived from `token_id` with the server key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token_id: TokenId,
    pub key_id: KeyId,
    /// UNIX seconds.
    pub created: u64,
    /// UNIX seconds from which the token no longer signs in; `None`: never. (Absent in
    /// records of tokens made before lifetimes existed.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

impl TokenRecord {
    /// Whether the token has expired at `now` (UNIX seconds).
    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|at| now >= at)
    }
}

/// A live token found by its id: whose it is, for which host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveToken {
    pub user: String,
    pub host: String,
    pub record: TokenRecord,
}

/// An entity as stored: a device or user that signs in. Holds no usable secret: the PSK is a
/// keyed hash, the certificate a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRecord {
    /// Device (the default) or user: only a user signs in with an app token.
    pub kind: EntityKind,
    /// Who owns it (a user id): owners may command their devices.
    pub owner: Option<String>,
    pub psk: Option<PskHash>,
    /// SHA-256 of the pinned certificate's DER encoding.
    pub cert_sha256: Option<[u8; 32]>,
    pub disabled: bool,
    /// UNIX seconds when the id was first created; kept when the entity is replaced.
    pub created: u64,
}

impl EntityRecord {
    /// Whether putting `self` over `old` (`None`: no entity yet) re-provisions the id, so
    /// that the app tokens of user `id` must go with it: a new entity; any PSK given, or
    /// one dropped (a PSK is never compared with the old one: giving one is provisioning
    /// it); a pinned certificate added, dropped or changed; a change of kind; or the
    /// entity disabled. Only a put that keeps a certificate-only entity's pin, kind and
    /// enabled state (e.g. to change its owner) keeps the tokens.
    pub fn reprovisions(&self, old: Option<&EntityRecord>) -> bool {
        match old {
            None => true,
            Some(old) => self.changes_credentials(old) || self.disabled,
        }
    }

    /// Whether putting `self` over `old` changes what signs in as the id: a PSK given (a
    /// PSK is never compared with the old one: giving one is provisioning it) or dropped,
    /// a pinned certificate added, dropped or changed, or a change of kind.
    pub fn changes_credentials(&self, old: &EntityRecord) -> bool {
        self.psk.is_some()
            || old.psk.is_some()
            || self.cert_sha256 != old.cert_sha256
            || self.kind != old.kind
    }
}

/// What an entity is: a device (the default) or a user. App tokens sign in only as users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntityKind {
    #[default]
    Device,
    User,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Device => "device",
            EntityKind::User => "user",
        }
    }
}

/// One page of `Store::tokens_of`.
#[derive(Debug, Default)]
pub struct TokenPage {
    /// `(host, record)` in host order.
    pub tokens: Vec<(String, TokenRecord)>,
    /// More tokens follow the last one.
    pub more: bool,
}

/// `ServerKeys::psk_hash` of an entity's PSK and the key it was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskHash {
    pub key_id: KeyId,
    pub hash: [u8; 32],
}

/// What one server key is still used for (`Store::key_usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    /// Entities whose PSK is hashed under this key.
    pub psk_hashes: u64,
    /// Live app tokens made with this key.
    pub tokens: u64,
}

/// One page of `Store::list_entities`.
#[derive(Debug, Default)]
pub struct EntityPage {
    /// In id order.
    pub entities: Vec<(String, EntityRecord)>,
    /// More entities match after the last one.
    pub more: bool,
}

/// A state change, as a method asks for it. The store applies it in one transaction with the
/// record of the request's reply.
#[derive(Debug, Clone)]
pub enum Change {
    /// Make `record` the live token of (user, host); an earlier token of the pair stops
    /// working. Refused ([`Changed::TooManyTokens`]) when the pair has no token yet and the
    /// user already holds `max_per_user`.
    ReplaceToken {
        user: String,
        host: String,
        record: TokenRecord,
        max_per_user: u64,
    },
    /// Remove the live token of (user, host), if any.
    RevokeToken { user: String, host: String },
    /// Create or replace entity `id`; a replaced entity keeps its `created`. With
    /// `create_only`, an existing id is left alone. A put that re-provisions the id
    /// ([`EntityRecord::reprovisions`]) removes every app token of user `id` with it.
    /// `generated`: the nonce of a PSK the worker made, so that the reply can be derived
    /// again on redelivery.
    PutEntity {
        id: String,
        record: EntityRecord,
        create_only: bool,
        generated: Option<PskNonce>,
    },
    /// Remove entity `id` and every app token of user `id`.
    DeleteEntity { id: String },
    /// Add a rule under a new id, never one used before.
    AddRule { rule: Rule },
    /// Remove rule `rule_id`, if it exists.
    DeleteRule { rule_id: u64 },
    /// Remove each listed token that has expired, if it is still the live token of its
    /// (user, host) (one replaced meanwhile stays). Made by the pruner, never by a request.
    ExpireTokens { tokens: Vec<ExpiredToken> },
}

/// A token the pruner found expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredToken {
    pub user: String,
    pub host: String,
    pub token_id: TokenId,
}

/// What applying a [`Change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// `earlier`: the pair had a token, which stopped working.
    TokenReplaced {
        earlier: bool,
    },
    /// `ReplaceToken` for a new host of a user who holds `limit` tokens: nothing was
    /// written, no reply recorded.
    TooManyTokens {
        limit: u64,
    },
    TokenRevoked {
        existed: bool,
    },
    /// `tokens`: app tokens of user `id` removed with it. `ended`: what the put ended of
    /// the sessions and permissions the id had ([`Ended::of_put`]).
    EntityPut {
        outcome: PutOutcome,
        tokens: usize,
        ended: Option<Ended>,
    },
    EntityDeleted {
        existed: bool,
        tokens: usize,
    },
    RuleAdded {
        rule_id: u64,
    },
    RuleDeleted(Option<Rule>),
    /// The (user, host) pairs whose expired token was removed.
    TokensExpired(Vec<(String, String)>),
}

/// What an `Entity.Put` over an id ended, in the order it is looked for: the one change
/// event it publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It was enabled and is now disabled.
    Disabled,
    /// Its PSK, certificate or kind changed, or user `id`'s app tokens were removed: every
    /// session signed in with the old credentials is void.
    CredentialsChanged,
    /// Its owner changed: the old owner may no longer command it.
    OwnerChanged,
}

impl Ended {
    /// What putting `new` over `old` (`None`: no entity yet) ends, given that `tokens` app
    /// tokens of the id went with it. Nothing for a new entity that ended no token, nor for
    /// a put that changes nothing a session or a permission depends on.
    pub fn of_put(old: Option<&EntityRecord>, new: &EntityRecord, tokens: usize) -> Option<Ended> {
        let removed_tokens = (tokens > 0).then_some(Ended::CredentialsChanged);
        let Some(old) = old else {
            return removed_tokens.map(|e| if new.disabled { Ended::Disabled } else { e });
        };
        if new.disabled && !old.disabled {
            Some(Ended::Disabled)
        } else if new.changes_credentials(old) {
            Some(Ended::CredentialsChanged)
        } else if new.owner != old.owner {
            Some(Ended::OwnerChanged)
        } else {
            removed_tokens
        }
    }
}

/// What `Change::PutEntity` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
    /// `create_only` and the id exists: nothing was written, no reply recorded.
    Exists,
}

/// The result of `Store::apply`.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The change was made now, and its reply recorded with it.
    Now(Changed, Reply),
    /// The request had been applied before (a redelivery): nothing changed; this is the reply
    /// recorded then.
    Before(Reply),
    /// Another request with the same `src` and `id` was recorded: nothing changed.
    IdReused,
}

/// What is recorded for a request's `src` and `id` ([`crate::store::Store::recorded`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// Nothing within the replay window.
    Nothing,
    /// This very request (same caller, method and arguments): its reply.
    Same(Reply),
    /// A different request used this `src` and `id`.
    Other,
}

/// What a state-changing request answered, recorded with its change so that a redelivery is
/// answered identically. Holds no secret: token and generated-PSK replies are derived again
/// from ids and nonces with the server key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// No result (e.g. RevokeToken).
    Empty,
    /// A result with no secret in it.
    Value(serde_json::Value),
    /// `{"token": …}`, derived from the token id.
    Token {
        user: String,
        host: String,
        token_id: TokenId,
        key_id: KeyId,
    },
    /// `{"psk": …}` of `Entity.Put {generate_psk: true}`, derived from the nonce.
    Psk {
        id: String,
        key_id: KeyId,
        nonce: PskNonce,
    },
}

impl Reply {
    /// The reply a change answers with, from what it asked and what it did. `None` when no
    /// reply is recorded (a refused `create_only`).
    pub fn of(change: &Change, changed: &Changed) -> Option<Reply> {
        Some(match (change, changed) {
            (
                _,
                Changed::EntityPut {
                    outcome: PutOutcome::Exists,
                    ..
                }
                | Changed::TooManyTokens { .. },
            ) => return None,
            (
                Change::ReplaceToken {
                    user, host, record, ..
                },
                _,
            ) => Reply::Token {
                user: user.clone(),
                host: host.clone(),
                token_id: record.token_id,
                key_id: record.key_id,
            },
            (
                Change::PutEntity {
                    id,
                    record,
                    generated: Some(nonce),
                    ..
                },
                _,
            ) => Reply::Psk {
                id: id.clone(),
                key_id: record.psk.as_ref().map_or(0, |p| p.key_id),
                nonce: *nonce,
            },
            (_, Changed::RuleAdded { rule_id }) => {
                Reply::Value(serde_json::json!({ "rule_id": rule_id }))
            }
            _ => Reply::Empty,
        })
    }
}

/// Identifies the request that makes a change, for its replay record.
#[derive(Debug, Clone)]
pub struct RequestKey<'a> {
    pub src: &'a str,
    pub id: u64,
    /// UNIX milliseconds when it was handled.
    pub at_ms: u64,
    /// What a redelivery of it must match; `None`: record nothing and look nothing up
    /// (`authd import`, which nobody redelivers).
    pub binding: Option<Binding<'a>>,
}

/// What makes two deliveries with the same `src` and `id` the same request: the caller key
/// that sent it, the method, and the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding<'a> {
    /// The caller key's name.
    pub caller: &'a str,
    /// The canonical method name.
    pub method: &'a str,
    /// SHA-256 of the raw `args` JSON (of `{}` when absent).
    pub args_digest: [u8; 32],
}

/// How long, and how many, replies are kept for redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayPolicy {
    /// A record older than this is not looked at and is pruned.
    pub window_ms: u64,
    /// Beyond this many records the oldest are pruned early.
    pub max_records: u64,
}

impl Default for ReplayPolicy {
    fn default() -> Self {
        ReplayPolicy {
            window_ms: 600_000,
            max_records: 1_000_000,
        }
    }
}

/// One record of a store's state: what [`crate::store::Store::export`] yields and
/// [`crate::store::Store::restore`] writes, the unit of moving a deployment from one store
/// to another (`authd export`, `authd import`; one JSON line each). Like the store, it holds
/// no usable secret: a PSK hash is keyed with a server key, and a token string is derived
/// from its id with one, and the server key is never a record.
///
/// Replay records are not exported: they answer redeliveries of requests from the last
/// minutes, and a deployment is moved from a worker stopped cleanly, which acknowledged
/// every request it answered, so the broker redelivers none of them to the new store.
///
/// In JSON (serde), one object tagged by `record`; binary values are lower-case hex:
///
/// ```text
/// {"record":"entity","id":"dev1","kind":"device","owner":"alice","disabled":false,"created":1700000000,
///  "psk":{"key_id":1,"hash":"<64 hex>"},"cert_sha256":"<64 hex>"}
/// {"record":"token","user":"alice","host":"app1","token_id":"<32 hex>","key_id":1,"created":1700000000,"expires":1700003600}
/// {"record":"rule","rule_id":3,"src":"alice","dst":"*","cmd":"On","effect":"allow"}
/// {"record":"next_rule_id","next_rule_id":7}
/// ```
///
/// `owner`, `psk`, `cert_sha256` and a token's `expires` are left out when absent. Reading one checks every
/// field (names as the methods take them, hex lengths, rule ids from 1); an unknown field
/// is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "RecordLine", try_from = "RecordLine")]
pub enum Record {
    /// Entity `id` as stored, its `created` included.
    Entity { id: String, entity: EntityRecord },
    /// The live token of (user, host): it keeps signing in wherever the server key that
    /// made it is loaded.
    Token {
        user: String,
        host: String,
        token: TokenRecord,
    },
    /// Rule `rule_id`, under that id.
    Rule { rule_id: u64, rule: Rule },
    /// The id the store gives the next rule: no id below it is given again, even one no
    /// rule holds now (a deleted rule's).
    NextRuleId(u64),
}

impl Record {
    /// The server key the record's PSK hash or token was made with, if it has one.
    pub fn key_id(&self) -> Option<KeyId> {
        match self {
            Record::Entity { entity, .. } => entity.psk.as_ref().map(|p| p.key_id),
            Record::Token { token, .. } => Some(token.key_id),
            Record::Rule { .. } | Record::NextRuleId(_) => None,
        }
    }
}

/// The JSON form of a [`Record`].
#[derive(Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case", deny_unknown_fields)]
enum RecordLine {
    Entity {
        id: String,
        kind: EntityKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        disabled: bool,
        created: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        psk: Option<PskLine>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert_sha256: Option<String>,
    },
    Token {
        user: String,
        host: String,
        token_id: String,
        key_id: KeyId,
        created: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires: Option<u64>,
    },
    Rule {
        rule_id: u64,
        src: String,
        dst: String,
        cmd: String,
        effect: crate::rules::Effect,
    },
    NextRuleId {
        next_rule_id: u64,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PskLine {
    key_id: KeyId,
    hash: String,
}

impl From<Record> for RecordLine {
    fn from(record: Record) -> RecordLine {
        use crate::cert::hex;
        match record {
            Record::Entity { id, entity } => RecordLine::Entity {
                id,
                kind: entity.kind,
                owner: entity.owner,
                disabled: entity.disabled,
                created: entity.created,
                psk: entity.psk.map(|p| PskLine {
                    key_id: p.key_id,
                    hash: hex(&p.hash),
                }),
                cert_sha256: entity.cert_sha256.map(|c| hex(&c)),
            },
            Record::Token { user, host, token } => RecordLine::Token {
                user,
                host,
                token_id: hex(&token.token_id),
                key_id: token.key_id,
                created: token.created,
                expires: token.expires,
            },
            Record::Rule { rule_id, rule } => RecordLine::Rule {
                rule_id,
                src: rule.src,
                dst: rule.dst,
                cmd: rule.cmd,
                effect: rule.effect,
            },
            Record::NextRuleId(next_rule_id) => RecordLine::NextRuleId { next_rule_id },
        }
    }
}

impl TryFrom<RecordLine> for Record {
    type Error = String;

    fn try_from(line: RecordLine) -> Result<Record, String> {
        let name = |field: &str, value: String| {
            if crate::frame::valid_name(&value) {
                Ok(value)
            } else {
                Err(format!(
                    "{field}: must be a string of 1 to 256 bytes with no control characters"
                ))
            }
        };
        Ok(match line {
            RecordLine::Entity {
                id,
                kind,
                owner,
                disabled,
                created,
                psk,
                cert_sha256,
            } => Record::Entity {
                id: name("id", id)?,
                entity: EntityRecord {
                    kind,
                    owner: owner.map(|o| name("owner", o)).transpose()?,
                    psk: psk
                        .map(|p| {
                            Ok::<_, String>(PskHash {
                                key_id: p.key_id,
                                hash: unhex(&p.hash).ok_or("psk.hash: must be 64 hex digits")?,
                            })
                        })
                        .transpose()?,
                    cert_sha256: cert_sha256
                        .map(|c| unhex(&c).ok_or("cert_sha256: must be 64 hex digits"))
                        .transpose()?,
                    disabled,
                    created,
                },
            },
            RecordLine::Token {
                user,
                host,
                token_id,
                key_id,
                created,
                expires,
            } => Record::Token {
                user: name("user", user)?,
                host: name("host", host)?,
                token: TokenRecord {
                    token_id: unhex(&token_id).ok_or("token_id: must be 32 hex digits")?,
                    key_id,
                    created,
                    expires,
                },
            },
            RecordLine::Rule {
                rule_id,
                src,
                dst,
                cmd,
                effect,
            } => {
                if rule_id == 0 {
                    return Err("rule_id: must be at least 1".into());
                }
                Record::Rule {
                    rule_id,
                    rule: Rule {
                        src: name("src", src)?,
                        dst: name("dst", dst)?,
                        cmd: name("cmd", cmd)?,
                        effect,
                    },
                }
            }
            RecordLine::NextRuleId { next_rule_id } => {
                if next_rule_id == 0 {
                    return Err("next_rule_id: must be at least 1".into());
                }
                Record::NextRuleId(next_rule_id)
            }
        })
    }
}

/// `N` bytes from exactly `2 × N` hex digits (either case).
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        *byte = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Why [`crate::store::Store::export`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sink could not take a record (e.g. the output file's disk is full).
    #[error("writing the export: {0}")]
    Write(#[source] std::io::Error),
}
