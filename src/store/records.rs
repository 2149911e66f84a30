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
            Some(old) => {
                self.psk.is_some()
                    || old.psk.is_some()
                    || self.cert_sha256 != old.cert_sha256
                    || self.kind != old.kind
                    || self.disabled
            }
        }
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
}

/// What applying a [`Change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    TokenReplaced,
    /// `ReplaceToken` for a new host of a user who holds `limit` tokens: nothing was
    /// written, no reply recorded.
    TooManyTokens {
        limit: u64,
    },
    TokenRevoked {
        existed: bool,
    },
    /// `tokens`: app tokens of user `id` removed with it.
    EntityPut {
        outcome: PutOutcome,
        tokens: usize,
    },
    EntityDeleted {
        existed: bool,
        tokens: usize,
    },
    RuleAdded {
        rule_id: u64,
    },
    RuleDeleted(Option<Rule>),
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
