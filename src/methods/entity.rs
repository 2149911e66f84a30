//! Entity admin methods (docs/protocol.md#entity-put): provisioning the devices and users that `Authenticate`
//! signs in. Admin scope only. No method ever returns a secret, except the PSK that
//! `Entity.Put {generate_psk: true}` makes, once (and to a redelivery of that same request).
//!
//! `Entity.Put` replaces the whole entity: credentials not given are dropped (only
//! `created` is kept). An entity is a `device` (the default) or a `user`; only a user signs
//! in with app tokens. A put that re-provisions an id (new credentials, a change of kind, or
//! disabling it: [`EntityRecord::reprovisions`]) and `Entity.Delete` remove user `id`'s app
//! tokens in the same transaction. A certificate is pinned by the SHA-256 of its DER encoding; `cert`
//! takes the PEM, `cert_sha256` the fingerprint itself (hex, colons allowed), for operators
//! who have the fingerprint but not the file.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::{page_limit, storage_failed, Ctx, Name};
use crate::cert::{hex, parse_fingerprint, Certificate};
use crate::crypto::{random_bytes, ServerKeys};
use crate::frame::ErrorCode;
use crate::frame::{parse_args, valid_name, RpcError};
use crate::store::{
    Applied, Change, Changed, EntityKind, EntityRecord, PskHash, PutOutcome, Reply,
};

/// Longest PSK accepted, bytes.
pub const MAX_PSK_BYTES: usize = 1024;
/// `Entity.List` page size when `limit` is not given, and the largest allowed.
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutArgs {
    id: Name,
    #[serde(default)]
    psk: Option<String>,
    #[serde(default)]
    cert: Option<String>,
    #[serde(default)]
    cert_sha256: Option<String>,
    #[serde(default)]
    kind: Option<EntityKind>,
    #[serde(default)]
    owner: Option<Name>,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    generate_psk: bool,
    #[serde(default)]
    create_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdArgs {
    id: Name,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    #[serde(default)]
    owner: Option<Name>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    after: Option<Name>,
    #[serde(default)]
    limit: Option<u32>,
}

/// `Entity.Put {id, kind?, psk?, cert?, cert_sha256?, owner?, disabled?, generate_psk?,
/// create_only?}` → no result, or `{"psk": …}` with `generate_psk`.
pub async fn put(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Reply, RpcError> {
    let args: PutArgs = parse_args(args)?;
    if args.generate_psk && args.psk.is_some() {
        return Err(RpcError::bad_request(
            "args.psk",
            "give psk or generate_psk, not both",
        ));
    }
    if args.cert.is_some() && args.cert_sha256.is_some() {
        return Err(RpcError::bad_request(
            "args.cert_sha256",
            "give cert or cert_sha256, not both",
        ));
    }
    if args.psk.is_none() && !args.generate_psk && args.cert.is_none() && args.cert_sha256.is_none()
    {
        return Err(RpcError::bad_request(
            "args",
            "give at least one of psk, cert, cert_sha256, generate_psk",
        ));
    }
    let id = args.id.0;
    let key_id = ctx.keys.newest();
    let (psk, generated) = if args.generate_psk {
        let nonce = random_bytes();
        let psk = ctx
            .keys
            .generated_psk(key_id, &id, &nonce)
            .ok_or_else(|| missing_key(key_id))?;
        (Some(psk_hash(ctx.keys, key_id, &id, &psk)?), Some(nonce))
    } else {
        let psk = match args.psk {
            Some(p) if p.is_empty() || p.len() > MAX_PSK_BYTES => {
                return Err(RpcError::bad_request(
                    "args.psk",
                    format!("must be 1 to {MAX_PSK_BYTES} bytes"),
                ))
            }
            Some(p) => Some(psk_hash(ctx.keys, key_id, &id, &p)?),
            None => None,
        };
        (psk, None)
    };
    let cert_sha256 = match (&args.cert, &args.cert_sha256) {
        (Some(pem), _) => Some(
            Certificate::from_pem(pem)
                .map_err(|e| RpcError::bad_request("args.cert", e))?
                .sha256,
        ),
        (None, Some(fp)) => Some(parse_fingerprint(fp).ok_or_else(|| {
            RpcError::bad_request(
                "args.cert_sha256",
                "must be 64 hex digits (colons between pairs allowed)",
            )
        })?),
        (None, None) => None,
    };
    let record = EntityRecord {
        kind: args.kind.unwrap_or_default(),
        owner: args.owner.map(|o| o.0),
        psk,
        cert_sha256,
        disabled: args.disabled,
        created: ctx.now_secs(),
    };
    let change = Change::PutEntity {
        id: id.clone(),
        record,
        create_only: args.create_only,
        generated,
    };
    let (outcome, tokens, reply) = match super::apply(ctx, change).await? {
        Applied::Now(
            Changed::EntityPut {
                outcome, tokens, ..
            },
            reply,
        ) => (outcome, tokens, reply),
        other => return super::reply_of(other),
    };
    let reason = match outcome {
        PutOutcome::Created => "created",
        PutOutcome::Replaced => "replaced",
        PutOutcome::Exists => "exists",
    };
    crate::audit!(
        ctx,
        subject = id.as_str(),
        result = outcome != PutOutcome::Exists,
        reason,
        tokens_removed = tokens,
        "entity"
    );
    if outcome == PutOutcome::Exists {
        return Err(RpcError::new(
            ErrorCode::Conflict,
            format!("args.id: entity `{id}` exists and create_only is set"),
        ));
    }
    Ok(reply)
}

/// `Entity.Get {id}` → `{id, kind, owner?, has_psk, cert_sha256?, disabled, created}`;
/// 404 if none.
pub async fn get(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let IdArgs { id } = parse_args(args)?;
    match ctx.store.entity(&id).await.map_err(storage_failed)? {
        Some(record) => Ok(Some(view(&id, &record))),
        None => Err(RpcError::new(
            ErrorCode::NotFound,
            format!("args.id: no entity `{}`", &*id),
        )),
    }
}

/// `Entity.Delete {id}` → no result. Removes the entity and every app token of user `id`.
/// Deleting an id that does not exist succeeds.
pub async fn delete(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Reply, RpcError> {
    let IdArgs { id } = parse_args(args)?;
    let change = Change::DeleteEntity { id: id.0.clone() };
    match super::apply(ctx, change).await? {
        Applied::Now(Changed::EntityDeleted { existed, tokens }, reply) => {
            crate::audit!(
                ctx,
                subject = &*id,
                result = true,
                reason = if existed { "deleted" } else { "absent" },
                tokens_removed = tokens,
                "entity"
            );
            Ok(reply)
        }
        other => super::reply_of(other),
    }
}

/// `Entity.List {owner?, prefix?, after?, limit?}` → `{"entities": […], "next"?: id}` in id
/// order; `next` is the `after` of the next page and is absent on the last one.
pub async fn list(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let args: ListArgs = parse_args(args)?;
    let prefix = args.prefix.unwrap_or_default();
    if !prefix.is_empty() && !valid_name(&prefix) {
        return Err(RpcError::bad_request(
            "args.prefix",
            "must be a string of at most 256 bytes with no control characters",
        ));
    }
    let limit = page_limit(args.limit, DEFAULT_PAGE, MAX_PAGE)?;
    let page = ctx
        .store
        .list_entities(args.owner.as_deref(), &prefix, args.after.as_deref(), limit)
        .await
        .map_err(storage_failed)?;
    let mut out = Map::new();
    let next = page
        .more
        .then(|| page.entities.last().map(|(id, _)| json!(id)))
        .flatten();
    out.insert(
        "entities".into(),
        page.entities.iter().map(|(id, r)| view(id, r)).collect(),
    );
    if let Some(next) = next {
        out.insert("next".into(), next);
    }
    Ok(Some(Value::Object(out)))
}

/// An entity as `Get` and `List` show it: never a secret.
fn view(id: &str, r: &EntityRecord) -> Value {
    let mut v = Map::new();
    v.insert("id".into(), json!(id));
    v.insert("kind".into(), json!(r.kind.as_str()));
    if let Some(owner) = &r.owner {
        v.insert("owner".into(), json!(owner));
    }
    v.insert("has_psk".into(), json!(r.psk.is_some()));
    // Exactly the fields of docs/protocol.md#entity-get. Which server key each PSK hash uses is `authd key list`'s.
    if let Some(fp) = &r.cert_sha256 {
        v.insert("cert_sha256".into(), json!(hex(fp)));
    }
    v.insert("disabled".into(), json!(r.disabled));
    v.insert("created".into(), json!(r.created));
    Value::Object(v)
}

/// The PSK a [`Reply::Psk`] stands for.
pub fn generated_psk(keys: &ServerKeys, reply: &Reply) -> Result<String, RpcError> {
    let Reply::Psk { id, key_id, nonce } = reply else {
        return Err(RpcError::internal());
    };
    keys.generated_psk(*key_id, id, nonce)
        .ok_or_else(|| missing_key(*key_id))
}

fn psk_hash(
    keys: &ServerKeys,
    key_id: crate::crypto::KeyId,
    id: &str,
    psk: &str,
) -> Result<PskHash, RpcError> {
    let hash = keys
        .psk_hash(key_id, id, psk)
        .ok_or_else(|| missing_key(key_id))?;
    Ok(PskHash { key_id, hash })
}

fn missing_key(key_id: crate::crypto::KeyId) -> RpcError {
    tracing::error!(key_id, "a record names a server key that is not loaded");
    RpcError::internal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockout::LockoutPolicy;
    use crate::methods::testing::{Capture, Fixture};

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    /// The audit line of a put and of a delete says how many of user `id`'s tokens went.
    #[tokio::test(flavor = "current_thread")]
    async fn the_audit_line_counts_the_tokens_removed() {
        let f = Fixture::new(LockoutPolicy::default());
        let capture = Capture::default();
        let _logging = capture.start();
        let mut user = f.ctx("Auth.GenerateToken", 1);
        user.request.binding = None;
        user.request.src = "u1";
        let mut admin = f.ctx("Entity.Put", 2);
        admin.request.binding = None;

        let put_user = raw(json!({"id": "u1", "kind": "user", "psk": "p"}));
        put(&admin, Some(&put_user)).await.unwrap();
        for host in ["a", "b"] {
            super::super::token::generate(&user, Some(&raw(json!({ "host": host }))))
                .await
                .unwrap();
        }
        put(&admin, Some(&put_user)).await.unwrap();
        super::super::token::generate(&user, Some(&raw(json!({"host": "c"}))))
            .await
            .unwrap();
        delete(&admin, Some(&raw(json!({"id": "u1"}))))
            .await
            .unwrap();

        let entity_lines: Vec<(String, u64)> = capture
            .audit_fields()
            .iter()
            .filter(|f| f["message"] == "entity")
            .map(|f| {
                (
                    f["reason"].as_str().unwrap().to_owned(),
                    f["tokens_removed"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            entity_lines,
            [
                ("created".into(), 0),
                ("replaced".into(), 2),
                ("deleted".into(), 1)
            ]
        );
    }
}
