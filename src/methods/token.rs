//! Token methods (SPEC §4): per-user tokens given to third-party apps. The subject is the
//! request's `src`; each (user, host) pair has at most one live token.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{storage_failed, Ctx, Name};
use crate::crypto::{random_bytes, KeyId, ServerKeys, TokenId};
use crate::frame::{parse_args, RpcError};
use crate::store::{Replay, TokenRecord};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostArgs {
    host: Name,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// `GenerateToken {host}` → `{"token": …}`; the user's earlier token for `host` stops working.
pub fn generate(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Replay, RpcError> {
    let HostArgs { host } = parse_args(args)?;
    let user = ctx.request.src;
    let record = TokenRecord {
        token_id: random_bytes(),
        key_id: ctx.keys.newest(),
        created: ctx.now_secs(),
    };
    let reply = Replay::Token {
        user: user.to_owned(),
        host: host.0.clone(),
        token_id: record.token_id,
        key_id: record.key_id,
    };
    ctx.store
        .replace_token(user, &host, &record, &ctx.request, &reply)
        .map_err(storage_failed)?;
    audit(ctx, "Auth.GenerateToken", &host, "issued");
    Ok(reply)
}

/// `GetToken {host}` → `{"exist": true, "token": …}` or `{"exist": false}`.
pub fn get(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let HostArgs { host } = parse_args(args)?;
    let user = ctx.request.src;
    let record = ctx.store.token(user, &host).map_err(storage_failed)?;
    Ok(Some(match record {
        None => json!({ "exist": false }),
        Some(r) => {
            let token = token_string(ctx.keys, r.key_id, &r.token_id, user, &host)?;
            json!({ "exist": true, "token": token })
        }
    }))
}

/// `ListToken {}` → `[{"host": …, "created": …}, …]`, sorted by host.
pub fn list(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let NoArgs {} = parse_args(args)?;
    let tokens = ctx
        .store
        .tokens_of(ctx.request.src)
        .map_err(storage_failed)?;
    Ok(Some(Value::Array(
        tokens
            .into_iter()
            .map(|(host, r)| json!({ "host": host, "created": r.created }))
            .collect(),
    )))
}

/// `RevokeToken {host}` → no result. Revoking a host with no token succeeds.
pub fn revoke(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Replay, RpcError> {
    let HostArgs { host } = parse_args(args)?;
    ctx.store
        .revoke_token(ctx.request.src, &host, &ctx.request, &Replay::Empty)
        .map_err(storage_failed)?;
    audit(ctx, "Auth.RevokeToken", &host, "revoked");
    Ok(Replay::Empty)
}

/// One audit line per token change: the user is the request's `src`, the subject the host.
fn audit(ctx: &Ctx<'_>, method: &str, host: &str, reason: &str) {
    tracing::info!(
        target: "authd::audit",
        rpc_id = ctx.request.id,
        src = ctx.request.src,
        method,
        subject = host,
        result = true,
        reason,
        "token {reason}"
    );
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
