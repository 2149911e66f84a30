//! Change events (docs/protocol.md#change-events): what a committed change that can end a
//! session or a permission tells the rest of the cloud. A backend writes each change's
//! events in the change's own transaction (a transactional outbox), numbered in commit
//! order; `crate::events` publishes them after the commit and marks them sent after the
//! broker's PUBACK.
//!
//! An event names ids, never a secret: no token, PSK or hash (a rule's patterns are not
//! secrets).

use serde::Serialize;

use super::records::{Change, Changed, Ended};
use crate::rules::{Effect, Rule};

/// What one event says, without its number and time. In JSON, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum EventBody {
    /// The live token of (user, host) was revoked.
    #[serde(rename = "token.revoked")]
    TokenRevoked { user: String, host: String },
    /// The live token of (user, host) was replaced by a new one: the old one no longer
    /// signs in.
    #[serde(rename = "token.replaced")]
    TokenReplaced { user: String, host: String },
    /// The token of (user, host) reached the end of its lifetime and was removed.
    #[serde(rename = "token.expired")]
    TokenExpired { user: String, host: String },
    /// Entity `id` was disabled.
    #[serde(rename = "entity.disabled")]
    EntityDisabled { id: String },
    /// Entity `id` (and user `id`'s app tokens) was deleted.
    #[serde(rename = "entity.deleted")]
    EntityDeleted { id: String },
    /// Entity `id`'s PSK, certificate or kind changed, or user `id`'s app tokens were
    /// removed: sessions signed in with the old credentials are void.
    #[serde(rename = "entity.credentials_changed")]
    EntityCredentialsChanged { id: String },
    /// Entity `id`'s owner changed: the old owner may no longer command it.
    #[serde(rename = "entity.owner_changed")]
    EntityOwnerChanged { id: String },
    #[serde(rename = "rule.added")]
    RuleAdded {
        rule_id: u64,
        src: String,
        dst: String,
        cmd: String,
        effect: Effect,
    },
    #[serde(rename = "rule.deleted")]
    RuleDeleted {
        rule_id: u64,
        src: String,
        dst: String,
        cmd: String,
        effect: Effect,
    },
}

impl EventBody {
    /// The events of `change`, which did `changed`: one for a change that ended something
    /// (one per token for [`Change::ExpireTokens`]), none for one that ended nothing (a new
    /// token, a new entity, a revocation of nothing, a refused change).
    pub fn of(change: &Change, changed: &Changed) -> Vec<EventBody> {
        let rule = |rule_id: u64, rule: &Rule, added: bool| {
            let (src, dst, cmd, effect) = (
                rule.src.clone(),
                rule.dst.clone(),
                rule.cmd.clone(),
                rule.effect,
            );
            if added {
                EventBody::RuleAdded {
                    rule_id,
                    src,
                    dst,
                    cmd,
                    effect,
                }
            } else {
                EventBody::RuleDeleted {
                    rule_id,
                    src,
                    dst,
                    cmd,
                    effect,
                }
            }
        };
        let one = match (change, changed) {
            (Change::ReplaceToken { user, host, .. }, Changed::TokenReplaced { earlier: true }) => {
                EventBody::TokenReplaced {
                    user: user.clone(),
                    host: host.clone(),
                }
            }
            (Change::RevokeToken { user, host }, Changed::TokenRevoked { existed: true }) => {
                EventBody::TokenRevoked {
                    user: user.clone(),
                    host: host.clone(),
                }
            }
            (
                Change::PutEntity { id, .. },
                Changed::EntityPut {
                    ended: Some(ended), ..
                },
            ) => {
                let id = id.clone();
                match ended {
                    Ended::Disabled => EventBody::EntityDisabled { id },
                    Ended::CredentialsChanged => EventBody::EntityCredentialsChanged { id },
                    Ended::OwnerChanged => EventBody::EntityOwnerChanged { id },
                }
            }
            (Change::DeleteEntity { id }, Changed::EntityDeleted { existed, tokens })
                if *existed || *tokens > 0 =>
            {
                EventBody::EntityDeleted { id: id.clone() }
            }
            (Change::AddRule { rule: r }, Changed::RuleAdded { rule_id }) => {
                rule(*rule_id, r, true)
            }
            (Change::DeleteRule { rule_id }, Changed::RuleDeleted(Some(r))) => {
                rule(*rule_id, r, false)
            }
            (_, Changed::TokensExpired(pairs)) => {
                return pairs
                    .iter()
                    .map(|(user, host)| EventBody::TokenExpired {
                        user: user.clone(),
                        host: host.clone(),
                    })
                    .collect()
            }
            _ => return Vec::new(),
        };
        vec![one]
    }

    /// The event as published: `{"v":1,"seq":…,"at":…,"type":…,…}`.
    pub fn render(&self, seq: u64, at_ms: u64) -> Vec<u8> {
        #[derive(Serialize)]
        struct Wire<'a> {
            v: u8,
            seq: u64,
            at: u64,
            #[serde(flatten)]
            body: &'a EventBody,
        }
        serde_json::to_vec(&Wire {
            v: 1,
            seq,
            at: at_ms,
            body: self,
        })
        .unwrap_or_default()
    }
}

/// One stored event: its number and its JSON as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub json: Vec<u8>,
}

/// What `Store::events_since` found.
#[derive(Debug, Default)]
pub struct EventPage {
    /// In `seq` order.
    pub events: Vec<StoredEvent>,
    /// The last event committed (0: none yet).
    pub head: u64,
    /// Every event up to this one has been pruned (0: none).
    pub pruned_through: u64,
}

/// How long events are kept for `Events.Since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPolicy {
    /// Write events at all (`events`).
    pub enabled: bool,
    /// Events older than this (and already sent) are pruned.
    pub retention_ms: u64,
}

impl Default for EventPolicy {
    fn default() -> Self {
        EventPolicy {
            enabled: true,
            retention_ms: 24 * 3600 * 1000,
        }
    }
}
