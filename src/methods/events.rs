//! `Events.Since` (docs/protocol.md#eventssince, service scope): the change events a
//! consumer missed, from the store's outbox.

use serde::Deserialize;
use serde_json::json;
use serde_json::value::{RawValue, Value};

use super::{page_limit, storage_failed, Ctx};
use crate::frame::{parse_args, ErrorCode, RpcError};

/// Most events one call returns.
pub const MAX_EVENTS: u32 = 1000;
/// Events one call returns without `limit`.
const DEFAULT_EVENTS: u32 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinceArgs {
    /// The last event the consumer handled. Absent: none, only where the head is.
    after: Option<u64>,
    /// 1 to [`MAX_EVENTS`].
    limit: Option<u32>,
}

/// `Events.Since {after?, limit?}` → `{"events": [event, …], "head": N}`: the events after
/// `after`, in order, at most `limit`; `head` is the last event committed. 410 when events
/// after `after` were pruned, or when `after` is beyond the head (not this store's events):
/// the consumer must resynchronise in full.
pub async fn since(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let SinceArgs { after, limit } = parse_args(args)?;
    let limit = page_limit(limit, DEFAULT_EVENTS, MAX_EVENTS)?;
    let page = ctx
        .store
        .events_since(after, limit)
        .await
        .map_err(storage_failed)?;
    if let Some(after) = after {
        if after < page.pruned_through {
            return Err(RpcError::new(
                ErrorCode::Gone,
                format!(
                    "args.after: events up to {} are no longer kept (events_retention_secs): resynchronise in full, then follow from the head ({})",
                    page.pruned_through, page.head
                ),
            ));
        }
        if after > page.head {
            return Err(RpcError::new(
                ErrorCode::Gone,
                format!(
                    "args.after: {after} is beyond the last event of this store ({}): it is not the store these events came from; resynchronise in full",
                    page.head
                ),
            ));
        }
    }
    let mut events = Vec::with_capacity(page.events.len());
    for e in page.events {
        let event: Value = serde_json::from_slice(&e.json).map_err(|err| {
            tracing::error!(seq = e.seq, error = %err, "a stored event is not JSON");
            RpcError::internal()
        })?;
        events.push(event);
    }
    Ok(Some(json!({ "events": events, "head": page.head })))
}
