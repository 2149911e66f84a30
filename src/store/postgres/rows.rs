//! Rows to records, and changes to the JSON that `authd_apply` takes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use tokio_postgres::Row;

use super::{Db, Failure};
use crate::crypto::KeyId;
use crate::rules::{Rule, RuleIndex};
use crate::store::records::{
    Change, Changed, Ended, EntityKind, EntityRecord, PskHash, PutOutcome, Reply, RequestKey,
    StoreError, TokenRecord,
};

pub fn kind_code(kind: EntityKind) -> i16 {
    match kind {
        EntityKind::Device => 0,
        EntityKind::User => 1,
    }
}

pub fn key_id(v: i64) -> Result<KeyId, Failure> {
    KeyId::try_from(v).map_err(|_| StoreError::corrupt("key id", v).into())
}

fn bytes32(what: &'static str, v: Vec<u8>) -> Result<[u8; 32], Failure> {
    <[u8; 32]>::try_from(v).map_err(|_| StoreError::corrupt(what, "not 32 bytes").into())
}

/// The entity in columns `at..at + 7` (kind, owner, psk_key_id, psk_hash, cert_sha256,
/// disabled, created).
pub fn entity(row: &Row, at: usize) -> Result<EntityRecord, Failure> {
    let kind = match row.try_get::<_, i16>(at)? {
        0 => EntityKind::Device,
        1 => EntityKind::User,
        other => return Err(StoreError::corrupt("entities", format!("kind {other}")).into()),
    };
    let psk = match (
        row.try_get::<_, Option<i64>>(at + 2)?,
        row.try_get::<_, Option<Vec<u8>>>(at + 3)?,
    ) {
        (Some(k), Some(h)) => Some(PskHash {
            key_id: key_id(k)?,
            hash: bytes32("entities.psk_hash", h)?,
        }),
        _ => None,
    };
    Ok(EntityRecord {
        kind,
        owner: row.try_get(at + 1)?,
        psk,
        cert_sha256: row
            .try_get::<_, Option<Vec<u8>>>(at + 4)?
            .map(|c| bytes32("entities.cert_sha256", c))
            .transpose()?,
        disabled: row.try_get(at + 5)?,
        created: row.try_get::<_, i64>(at + 6)? as u64,
    })
}

/// The token in columns `at..at + 4` (token_id, key_id, created, expires).
pub fn token(row: &Row, at: usize) -> Result<TokenRecord, Failure> {
    let id: Vec<u8> = row.try_get(at)?;
    Ok(TokenRecord {
        token_id: id
            .try_into()
            .map_err(|_| StoreError::corrupt("tokens", "bad token id"))?,
        key_id: key_id(row.try_get(at + 1)?)?,
        created: row.try_get::<_, i64>(at + 2)? as u64,
        expires: row.try_get::<_, Option<i64>>(at + 3)?.map(|e| e as u64),
    })
}

pub fn rule(row: &Row, at: usize) -> Result<Rule, Failure> {
    let v: Value = row.try_get(at)?;
    serde_json::from_value(v).map_err(|e| StoreError::corrupt("rules", e).into())
}

/// Every rule, indexed, and the rules version they are at (one snapshot).
pub async fn load_rules(db: &Db) -> Result<(u64, RuleIndex), StoreError> {
    db.run(3, async |mut c| {
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let version: i64 = tx
            .query_one("SELECT version FROM rules_version", &[])
            .await?
            .try_get(0)?;
        let mut index = RuleIndex::new();
        for row in tx.query("SELECT id, rule FROM rules", &[]).await? {
            index.insert(row.try_get::<_, i64>(0)? as u64, &rule(&row, 1)?);
        }
        tx.commit().await?;
        Ok((version as u64, index))
    })
    .await
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The JSON of one change for `authd_apply_one`, with its request (if it records a reply),
/// the reply to record when the change is made (the function fills in a new rule's id
/// itself), when it was asked for (its events' `at`) and whether it writes events.
pub fn change_json(request: &RequestKey<'_>, change: &Change, events: bool) -> Value {
    let mut c = match change {
        Change::ReplaceToken {
            user,
            host,
            record,
            max_per_user,
        } => json!({
            "kind": "replace_token", "user": user, "host": host,
            "token_id": b64(&record.token_id), "key_id": record.key_id,
            "created": record.created as i64, "max": (*max_per_user).min(i64::MAX as u64) as i64,
            "expires": record.expires.map(|e| e.min(i64::MAX as u64) as i64),
        }),
        Change::RevokeToken { user, host } => {
            json!({"kind": "revoke_token", "user": user, "host": host})
        }
        Change::PutEntity {
            id,
            record,
            create_only,
            ..
        } => json!({
            "kind": "put_entity", "id": id, "kind_code": kind_code(record.kind),
            "owner": record.owner,
            "psk_key_id": record.psk.as_ref().map(|p| p.key_id),
            "psk_hash": record.psk.as_ref().map(|p| b64(&p.hash)),
            "cert_sha256": record.cert_sha256.as_ref().map(|c| b64(c)),
            "disabled": record.disabled, "created": record.created as i64,
            "create_only": create_only,
        }),
        Change::DeleteEntity { id } => json!({"kind": "delete_entity", "id": id}),
        Change::AddRule { rule } => json!({"kind": "add_rule", "rule": rule}),
        Change::DeleteRule { rule_id } => {
            json!({"kind": "delete_rule", "rule_id": (*rule_id).min(i64::MAX as u64) as i64})
        }
        Change::ExpireTokens { tokens } => json!({
            "kind": "expire_tokens", "now": (request.at_ms / 1000) as i64,
            "tokens": tokens.iter().map(|t| json!({
                "user": t.user, "host": t.host, "token_id": b64(&t.token_id),
            })).collect::<Vec<_>>(),
        }),
    };
    c["at"] = json!(request.at_ms as i64);
    c["events"] = json!(events);
    if let Some(b) = &request.binding {
        c["req"] = json!({
            "src": request.src, "id": request.id as i64, "at": request.at_ms as i64,
            "caller": b.caller, "method": b.method, "digest": b64(&b.args_digest),
        });
        // What Reply::of answers once the change is made; a new rule's id is not known yet.
        let made = match change {
            Change::ReplaceToken { .. } => Some(Changed::TokenReplaced { earlier: false }),
            Change::RevokeToken { .. } => Some(Changed::TokenRevoked { existed: true }),
            Change::PutEntity { .. } => Some(Changed::EntityPut {
                outcome: PutOutcome::Created,
                tokens: 0,
                ended: None,
            }),
            Change::DeleteEntity { .. } => Some(Changed::EntityDeleted {
                existed: true,
                tokens: 0,
            }),
            Change::DeleteRule { .. } => Some(Changed::RuleDeleted(None)),
            Change::AddRule { .. } => None,
            Change::ExpireTokens { .. } => Some(Changed::TokensExpired(Vec::new())),
        };
        if let Some(reply) = made.and_then(|m| Reply::of(change, &m)) {
            c["reply"] = serde_json::to_value(reply).unwrap_or(Value::Null);
        }
    }
    c
}

/// What `authd_apply_one` said it did.
pub fn changed(v: &Value) -> Result<Changed, StoreError> {
    let bad = || StoreError::corrupt("authd_apply", v.to_string());
    let obj = v.as_object().ok_or_else(bad)?;
    let n = |k: &str| obj.get(k).and_then(Value::as_u64).ok_or_else(bad);
    let b = |k: &str| obj.get(k).and_then(Value::as_bool).ok_or_else(bad);
    Ok(if obj.contains_key("token_replaced") {
        Changed::TokenReplaced {
            earlier: b("token_replaced")?,
        }
    } else if obj.contains_key("too_many_tokens") {
        Changed::TooManyTokens {
            limit: n("too_many_tokens")?,
        }
    } else if obj.contains_key("token_revoked") {
        Changed::TokenRevoked {
            existed: b("token_revoked")?,
        }
    } else if obj.contains_key("exists") {
        Changed::EntityPut {
            outcome: PutOutcome::Exists,
            tokens: 0,
            ended: None,
        }
    } else if let Some(put) = obj.get("entity_put") {
        Changed::EntityPut {
            outcome: match put.as_str() {
                Some("created") => PutOutcome::Created,
                Some("replaced") => PutOutcome::Replaced,
                _ => return Err(bad()),
            },
            tokens: n("tokens")? as usize,
            ended: match obj.get("ended").and_then(Value::as_str) {
                None => None,
                Some("disabled") => Some(Ended::Disabled),
                Some("credentials_changed") => Some(Ended::CredentialsChanged),
                Some("owner_changed") => Some(Ended::OwnerChanged),
                Some(_) => return Err(bad()),
            },
        }
    } else if obj.contains_key("entity_deleted") {
        Changed::EntityDeleted {
            existed: b("entity_deleted")?,
            tokens: n("tokens")? as usize,
        }
    } else if obj.contains_key("rule_added") {
        Changed::RuleAdded {
            rule_id: n("rule_added")?,
        }
    } else if let Some(rule) = obj.get("rule_deleted") {
        Changed::RuleDeleted(match rule {
            Value::Null => None,
            r => Some(serde_json::from_value(r.clone()).map_err(|_| bad())?),
        })
    } else if let Some(pairs) = obj.get("tokens_expired") {
        Changed::TokensExpired(
            serde_json::from_value::<Vec<(String, String)>>(pairs.clone()).map_err(|_| bad())?,
        )
    } else {
        return Err(bad());
    })
}
