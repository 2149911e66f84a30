//! Token methods (docs/protocol.md#auth-generatetoken): per-user tokens given to third-party apps. The subject is the
//! request's `src`; each (user, host) pair has at most one live token.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{storage_failed, Ctx, Name};
use crate::crypto::{random_bytes, KeyId, ServerKeys, TokenId};
use crate::frame::{parse_args, RpcError};
use crate::store::{Applied, Change, Reply, TokenRecord};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostArgs {
    host: Name,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// `GenerateToken {host}` → `{"token": …}`; the user's earlier token for `host` stops working.
pub async fn generate(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Reply, RpcError> {
    let HostArgs { host } = parse_args(args)?;
    let record = TokenRecord {
        token_id: random_bytes(),
        key_id: ctx.keys.newest(),
        created: ctx.now_secs(),
    };
    let change = Change::ReplaceToken {
        user: ctx.request.src.to_owned(),
        host: host.0.clone(),
        record,
    };
    change_token(ctx, change, &host, "issued").await
}

/// `GetToken {host}` → `{"exist": true, "token": …}` or `{"exist": false}`.
pub async fn get(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let HostArgs { host } = parse_args(args)?;
    let user = ctx.request.src;
    let record = ctx.store.token(user, &host).await.map_err(storage_failed)?;
    Ok(Some(match record {
        None => json!({ "exist": false }),
        Some(r) => {
            let token = token_string(ctx.keys, r.key_id, &r.token_id, user, &host)?;
            json!({ "exist": true, "token": token })
        }
    }))
}

/// `ListToken {}` → `[{"host": …, "created": …}, …]`, sorted by host.
pub async fn list(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let NoArgs {} = parse_args(args)?;
    let tokens = ctx
        .store
        .tokens_of(ctx.request.src)
        .await
        .map_err(storage_failed)?;
    Ok(Some(Value::Array(
        tokens
            .into_iter()
            .map(|(host, r)| json!({ "host": host, "created": r.created }))
            .collect(),
    )))
}

/// `RevokeToken {host}` → no result. Revoking a host with no token succeeds.
pub async fn revoke(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Reply, RpcError> {
    let HostArgs { host } = parse_args(args)?;
    let change = Change::RevokeToken {
        user: ctx.request.src.to_owned(),
        host: host.0.clone(),
    };
    change_token(ctx, change, &host, "revoked").await
}

/// Applies a token change and writes its audit line: the user is the request's `src`, the
/// subject the host.
async fn change_token(
    ctx: &Ctx<'_>,
    change: Change,
    host: &str,
    reason: &str,
) -> Result<Reply, RpcError> {
    match super::apply(ctx, change).await? {
        Applied::Now(_, reply) => {
            crate::audit!(ctx, subject = host, result = true, reason, "token {reason}");
            Ok(reply)
        }
        other => super::reply_of(other),
    }
}

/// The token string of a recorded token id.
pub fn token_string(
    keys: &ServerKeys,
    key_id: KeyId,
    token_id: &TokenId,
    user: &str,
    host: &str,
) -> Result<String, RpcError> {
    keys.token(key_id, token_id, user, host).ok_or_else(|| {
        tracing::error!(
            key_id,
            "a token record names a server key that is not loaded"
        );
        RpcError::internal()
    })
}
