//! Token methods (docs/protocol.md#auth-generatetoken): per-user tokens given to third-party apps. The subject is the
//! request's `src`; each (user, host) pair has at most one live token.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{storage_failed, Ctx, Name};
use crate::config::MAX_TOKEN_TTL_SECS;
use crate::crypto::{random_bytes, KeyId, ServerKeys, TokenId};
use crate::frame::{parse_args, ErrorCode, RpcError};
use crate::store::{Applied, Change, Changed, Reply, TokenRecord};

/// ListToken reads the store in pages of this many tokens.
const LIST_PAGE: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostArgs {
    host: Name,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateArgs {
    host: Name,
    /// Lifetime, seconds; 0: none. Absent: `token_ttl_secs`.
    ttl: Option<u64>,
}

/// `GenerateToken {host, ttl?}` → `{"token": …}`; the user's earlier token for `host` stops
/// working. The token stops signing in `ttl` seconds from now (default `token_ttl_secs`;
/// 0: never). 409 for a new host when the user already holds `max_tokens_per_user` tokens.
pub async fn generate(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Reply, RpcError> {
    let GenerateArgs { host, ttl } = parse_args(args)?;
    let ttl = ttl.unwrap_or(ctx.token_ttl_secs);
    if ttl > MAX_TOKEN_TTL_SECS {
        return Err(RpcError::new(
            ErrorCode::BadRequest,
            format!("args.ttl: must be at most {MAX_TOKEN_TTL_SECS} seconds (ten years); 0 means no end"),
        ));
    }
    let created = ctx.now_secs();
    let record = TokenRecord {
        token_id: random_bytes(),
        key_id: ctx.keys.newest(),
        created,
        expires: (ttl > 0).then(|| created + ttl),
    };
    let change = Change::ReplaceToken {
        user: ctx.request.src.to_owned(),
        host: host.0.clone(),
        record,
        max_per_user: ctx.max_tokens_per_user,
    };
    match super::apply(ctx, change).await? {
        Applied::Now(Changed::TooManyTokens { limit }, _) => {
            crate::audit!(
                ctx,
                subject = &*host,
                result = false,
                reason = "too_many_tokens",
                "token refused"
            );
            Err(RpcError::new(
                ErrorCode::Conflict,
                format!(
                    "args.host: the user already has {limit} tokens, the most allowed; revoke one first (replacing the token of one of those hosts is allowed)"
                ),
            ))
        }
        applied => token_changed(ctx, applied, &host, "issued"),
    }
}

/// `GetToken {host}` → `{"exist": true, "token": …, "expires"?: …}` or `{"exist": false}`
/// (also for an expired token the pruner has not removed yet).
pub async fn get(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let HostArgs { host } = parse_args(args)?;
    let user = ctx.request.src;
    let record = ctx.store.token(user, &host).await.map_err(storage_failed)?;
    Ok(Some(match record {
        Some(r) if !r.expired(ctx.now_secs()) => {
            let token = token_string(ctx.keys, r.key_id, &r.token_id, user, &host)?;
            with_expires(json!({ "exist": true, "token": token }), &r)
        }
        _ => json!({ "exist": false }),
    }))
}

/// `ListToken {}` → `[{"host": …, "created": …, "expires"?: …}, …]`, sorted by host;
/// expired tokens are left out. Reads the store a
/// page at a time and lists at most `max_tokens_per_user` hosts: a user can hold more only
/// with tokens issued before the cap was lowered, and those beyond it are left out (and
/// logged) rather than making every answer too large to send.
pub async fn list(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let NoArgs {} = parse_args(args)?;
    let user = ctx.request.src;
    let cap = usize::try_from(ctx.max_tokens_per_user).unwrap_or(usize::MAX);
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let room = cap - listed.len();
        let page = ctx
            .store
            .tokens_of(user, after.as_deref(), room.min(LIST_PAGE))
            .await
            .map_err(storage_failed)?;
        after = page.tokens.last().map(|(host, _)| host.clone());
        let now = ctx.now_secs();
        listed.extend(
            page.tokens
                .into_iter()
                .filter(|(_, r)| !r.expired(now))
                .map(|(host, r)| with_expires(json!({ "host": host, "created": r.created }), &r)),
        );
        if !page.more {
            break;
        }
        if listed.len() >= cap {
            tracing::warn!(
                rpc_id = ctx.request.id,
                src = user,
                limit = cap,
                "ListToken: the user holds more tokens than max_tokens_per_user; the list is cut there"
            );
            break;
        }
    }
    Ok(Some(Value::Array(listed)))
}

/// `RevokeToken {host}` → no result. Revoking a host with no token succeeds.
pub async fn revoke(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Reply, RpcError> {
    let HostArgs { host } = parse_args(args)?;
    let change = Change::RevokeToken {
        user: ctx.request.src.to_owned(),
        host: host.0.clone(),
    };
    let applied = super::apply(ctx, change).await?;
    token_changed(ctx, applied, &host, "revoked")
}

/// The reply to an applied token change, and its audit line: the user is the request's
/// `src`, the subject the host.
fn token_changed(
    ctx: &Ctx<'_>,
    applied: Applied,
    host: &str,
    reason: &str,
) -> Result<Reply, RpcError> {
    match applied {
        Applied::Now(_, reply) => {
            crate::audit!(ctx, subject = host, result = true, reason, "token {reason}");
            Ok(reply)
        }
        other => super::reply_of(other),
    }
}

/// `view` with the token's `expires` (UNIX seconds) when it has a lifetime.
fn with_expires(mut view: Value, record: &TokenRecord) -> Value {
    if let Some(at) = record.expires {
        view["expires"] = json!(at);
    }
    view
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockout::LockoutPolicy;
    use crate::methods::testing::Fixture;

    /// ListToken reads the store a page at a time and lists every token up to the cap; a
    /// user over the cap (tokens from before it was lowered) gets the first `cap` hosts.
    #[tokio::test]
    async fn list_reads_pages_and_stops_at_the_cap() {
        let f = Fixture::new(LockoutPolicy::default());
        let mut ctx = f.ctx("Auth.GenerateToken", 1);
        ctx.request.binding = None;
        ctx.request.src = "alice";
        for n in 0..(2 * LIST_PAGE + 3) {
            let args =
                RawValue::from_string(json!({ "host": format!("h{n:04}") }).to_string()).unwrap();
            generate(&ctx, Some(&args)).await.unwrap();
        }
        let hosts = |v: Option<Value>| -> Vec<String> {
            v.unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["host"].as_str().unwrap().to_owned())
                .collect()
        };
        let all = hosts(list(&ctx, None).await.unwrap());
        let want: Vec<String> = (0..(2 * LIST_PAGE + 3))
            .map(|n| format!("h{n:04}"))
            .collect();
        assert_eq!(all, want);
        ctx.max_tokens_per_user = 300;
        assert_eq!(hosts(list(&ctx, None).await.unwrap()), want[..300]);
        let refused = generate(
            &ctx,
            Some(&RawValue::from_string(r#"{"host":"new"}"#.into()).unwrap()),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code, 409);
    }
}
