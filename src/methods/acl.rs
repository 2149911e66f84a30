//! Access rule administration (docs/protocol.md#acl-add, admin scope): `ACL.Add`, `ACL.Delete`, `ACL.List`.
//! A change takes effect on the next AuthorizeCommand: the store updates its rule index with
//! the change.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::entity::MAX_PAGE;
use super::{page_limit, storage_failed, Ctx, Name};
use crate::frame::{parse_args, RpcError};
use crate::rules::{Effect, Rule};
use crate::store::{Applied, Change, Changed, Reply};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddArgs {
    src: Name,
    dst: Name,
    cmd: Name,
    effect: Effect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteArgs {
    rule_id: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    /// Only rules with a higher id (the previous page's `next`).
    #[serde(default)]
    after: u64,
    /// At most this many rules: 1 to [`MAX_PAGE`], default [`MAX_PAGE`].
    #[serde(default)]
    limit: Option<u32>,
}

/// `ACL.Add {src, dst, cmd, effect}` → `{"rule_id": N}`; ids increase and are never reused.
pub async fn add(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Reply, RpcError> {
    let AddArgs {
        src,
        dst,
        cmd,
        effect,
    } = parse_args(args)?;
    let rule = Rule {
        src: src.0,
        dst: dst.0,
        cmd: cmd.0,
        effect,
    };
    let shown = rule.to_string();
    let change = Change::AddRule { rule };
    match super::apply(ctx, change).await? {
        Applied::Now(Changed::RuleAdded { rule_id }, reply) => {
            crate::audit!(
                ctx,
                subject = rule_id,
                rule = shown,
                result = true,
                reason = "added",
                "rule added"
            );
            Ok(reply)
        }
        other => super::reply_of(other),
    }
}

/// `ACL.Delete {rule_id}` → no result. Deleting an id that does not exist succeeds.
pub async fn delete(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Reply, RpcError> {
    let DeleteArgs { rule_id } = parse_args(args)?;
    let change = Change::DeleteRule { rule_id };
    match super::apply(ctx, change).await? {
        Applied::Now(Changed::RuleDeleted(removed), reply) => {
            crate::audit!(
                ctx,
                subject = rule_id,
                rule = removed.as_ref().map(tracing::field::display),
                result = true,
                reason = if removed.is_some() {
                    "deleted"
                } else {
                    "absent"
                },
                "rule deleted"
            );
            Ok(reply)
        }
        other => super::reply_of(other),
    }
}

/// `ACL.List {after?, limit?}` → `{"rules": [{rule_id, src, dst, cmd, effect}, …]}` sorted by
/// rule id, at most `limit` (default and most: [`MAX_PAGE`]), plus `"next": <rule_id>` when
/// more rules follow.
pub async fn list(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let ListArgs { after, limit } = parse_args(args)?;
    let limit = page_limit(limit, MAX_PAGE, MAX_PAGE)?;
    // One more than asked for tells whether there is a next page.
    let mut rules = ctx
        .store
        .rules(after, limit + 1)
        .await
        .map_err(storage_failed)?;
    let more = rules.len() > limit;
    rules.truncate(limit);
    let listed: Vec<Value> = rules
        .into_iter()
        .map(|(id, r)| {
            json!({
                "rule_id": id,
                "src": r.src,
                "dst": r.dst,
                "cmd": r.cmd,
                "effect": r.effect,
            })
        })
        .collect();
    let mut result = json!({});
    if more {
        if let Some(last) = listed.last() {
            result["next"] = last["rule_id"].clone();
        }
    }
    result["rules"] = Value::Array(listed);
    Ok(Some(result))
}
