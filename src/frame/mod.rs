//! The wire format: mg_rpc ("clubby v2") request and response frames (docs/protocol.md#frames).
//!
//! Nothing outside this module looks at raw frame bytes. [`parse`] turns a payload into a
//! typed [`Request`], or into a [`Reject`] that says whether the frame can be answered (we
//! know where to send the error) or must be dropped.

use std::borrow::Cow;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

mod encode;
mod error;

pub use encode::{encode_error, encode_result, Response};
pub use error::{ErrorCode, RpcError};

/// Largest request id: ids are JSON integers that a JavaScript caller can represent exactly.
pub const MAX_ID: u64 = (1 << 53) - 1;
/// Longest `src`, and longest name argument (docs/protocol.md#src-rules).
pub const MAX_NAME_BYTES: usize = 256;

/// A parsed request. Borrowed from the payload where possible.
#[derive(Debug)]
pub struct Request<'a> {
    pub to: Address<'a>,
    pub dst: Option<Cow<'a, str>>,
    pub key: Option<Cow<'a, str>>,
    pub method: Option<Cow<'a, str>>,
    /// Method arguments as raw JSON (always an object); `None` when absent or `null`.
    pub args: Option<&'a RawValue>,
    pub deadline: Option<f64>,
    pub timeout: Option<f64>,
}

/// Where and how a response goes: enough of a request to answer it.
#[derive(Debug, Clone)]
pub struct Address<'a> {
    /// The caller's address, already checked to be safe in a topic name.
    pub src: Cow<'a, str>,
    pub id: u64,
    /// Copied verbatim into the response.
    pub tag: Option<&'a RawValue>,
    /// "No response": execute, send nothing.
    pub nr: bool,
}

/// Why a frame was not turned into a [`Request`].
#[derive(Debug)]
pub enum Reject<'a> {
    /// Nobody can be answered: the frame is dropped and counted.
    Drop(DropReason),
    /// Answer with this error.
    Error(Address<'a>, RpcError),
}

/// Why a frame was dropped. The label is the metrics/log value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a JSON object (or nested deeper than the parser allows).
    NotJson,
    /// `src` missing, not a string, or unsafe as a topic name.
    BadSrc,
    /// `id` missing, not an integer, or outside 1..=2^53-1.
    BadId,
    /// `src` or `id` given twice: we cannot tell whom to answer.
    AmbiguousAddress,
    /// Has a `result` or `error` field: a response, not a request. Answering one could make
    /// two services answer each other's answers forever.
    ResponseFrame,
    /// Its reply topic would be one of our own request topics (a `src` equal to the service
    /// id, or one whose reply topic falls under the request topic): answering it would
    /// feed our own reply back to us as a request, forever. Decided by the dispatcher, which
    /// knows the topics.
    ReplyLoop,
}

impl DropReason {
    /// In discriminant order (the metrics index counters by it).
    pub const ALL: [DropReason; 6] = [
        DropReason::NotJson,
        DropReason::BadSrc,
        DropReason::BadId,
        DropReason::AmbiguousAddress,
        DropReason::ResponseFrame,
        DropReason::ReplyLoop,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::NotJson => "not_json",
            DropReason::BadSrc => "bad_src",
            DropReason::BadId => "bad_id",
            DropReason::AmbiguousAddress => "ambiguous_address",
            DropReason::ResponseFrame => "response_frame",
            DropReason::ReplyLoop => "reply_loop",
        }
    }
}

/// Checks a string used to build a topic name: 1..=256 bytes, no MQTT wildcard, no control
/// character, no Unicode non-character, no leading `$` (docs/protocol.md#src-rules).
///
/// Non-characters (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF) are valid UTF-8 but MQTT 3.1.1 §1.5.3
/// says a topic should not hold them, and mosquitto disconnects a client that publishes to
/// such a topic. Since an unacknowledged reply is sent again after every reconnect, one
/// such `src` would otherwise cut the worker off the broker for good.
pub fn valid_src(src: &str) -> bool {
    !src.is_empty()
        && src.len() <= MAX_NAME_BYTES
        && !src.starts_with('$')
        && !src
            .chars()
            .any(|c| c == '+' || c == '#' || c.is_control() || is_noncharacter(c))
}

/// Unicode non-characters: U+FDD0..=U+FDEF and the last two code points of every plane.
fn is_noncharacter(c: char) -> bool {
    let c = c as u32;
    (0xFDD0..=0xFDEF).contains(&c) || c & 0xFFFE == 0xFFFE
}

/// Checks a name argument: 1..=256 bytes, no control characters (docs/protocol.md#methods).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_BYTES && !s.chars().any(char::is_control)
}

/// Parses one request payload. `max_bytes` is the configured frame limit: a larger frame is
/// still read for its address (the transport already bounds it) and answered with 413.
pub fn parse(payload: &[u8], max_bytes: usize) -> Result<Request<'_>, Reject<'_>> {
    let raw: RawFrame<'_> =
        serde_json::from_slice(payload).map_err(|_| Reject::Drop(DropReason::NotJson))?;
    if raw.response {
        return Err(Reject::Drop(DropReason::ResponseFrame));
    }
    if matches!(raw.duplicate, Some(Field::Src | Field::Id)) {
        return Err(Reject::Drop(DropReason::AmbiguousAddress));
    }
    let src = raw
        .src
        .and_then(json_str)
        .filter(|s| valid_src(s))
        .ok_or(Reject::Drop(DropReason::BadSrc))?;
    let id = raw
        .id
        .and_then(|v| serde_json::from_str::<u64>(v.get()).ok())
        .filter(|id| (1..=MAX_ID).contains(id))
        .ok_or(Reject::Drop(DropReason::BadId))?;
    let mut to = Address {
        src,
        id,
        tag: raw.tag,
        nr: false,
    };
    // `nr` first, so that later errors are suppressed when the caller asked for no response.
    match raw.nr.map(|v| serde_json::from_str::<bool>(v.get())) {
        None => {}
        Some(Ok(nr)) => to.nr = nr,
        Some(Err(_)) => {
            return Err(Reject::Error(
                to,
                RpcError::bad_request("nr", "must be a boolean"),
            ))
        }
    }
    macro_rules! bad {
        ($field:expr, $problem:expr) => {
            return Err(Reject::Error(to, RpcError::bad_request($field, $problem)))
        };
    }
    if payload.len() > max_bytes {
        return Err(Reject::Error(
            to,
            RpcError::too_large(payload.len(), max_bytes),
        ));
    }
    if let Some(field) = raw.duplicate {
        bad!(field.name(), "given more than once");
    }
    if let Some(v) = raw.v {
        if serde_json::from_str::<u64>(v.get()).ok() != Some(2) {
            bad!("v", "must be 2");
        }
    }
    let strings = [("dst", raw.dst), ("key", raw.key), ("method", raw.method)];
    let mut decoded: [Option<Cow<'_, str>>; 3] = [None, None, None];
    for (slot, (field, value)) in decoded.iter_mut().zip(strings) {
        if let Some(v) = value {
            match json_str(v) {
                Some(s) => *slot = Some(s),
                None => bad!(field, "must be a string"),
            }
        }
    }
    let [dst, key, method] = decoded;
    let args = match raw.args {
        Some(v) if v.get().starts_with('{') => Some(v),
        Some(v) if v.get() == "null" => None,
        None => None,
        Some(_) => bad!("args", "must be an object"),
    };
    let mut times = [None, None];
    for (slot, (field, value)) in times
        .iter_mut()
        .zip([("deadline", raw.deadline), ("timeout", raw.timeout)])
    {
        if let Some(v) = value {
            match serde_json::from_str::<f64>(v.get()) {
                Ok(t) if t.is_finite() => *slot = Some(t),
                _ => bad!(field, "must be a number"),
            }
        }
    }
    let [deadline, timeout] = times;
    Ok(Request {
        to,
        dst,
        key,
        method,
        args,
        deadline,
        timeout,
    })
}

/// Decodes a JSON string, borrowing when it has no escapes.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if let Ok(s) = serde_json::from_str::<&str>(text) {
        return Some(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

/// The envelope fields we know, each kept as raw JSON until checked.
#[derive(Default)]
struct RawFrame<'a> {
    v: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    src: Option<&'a RawValue>,
    dst: Option<&'a RawValue>,
    key: Option<&'a RawValue>,
    method: Option<&'a RawValue>,
    args: Option<&'a RawValue>,
    tag: Option<&'a RawValue>,
    deadline: Option<&'a RawValue>,
    timeout: Option<&'a RawValue>,
    nr: Option<&'a RawValue>,
    /// `result` or `error` was present: the frame is a response.
    response: bool,
    /// The first known field that appeared twice (the first value is kept).
    duplicate: Option<Field>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    V,
    Id,
    Src,
    Dst,
    Key,
    Method,
    Args,
    Tag,
    Deadline,
    Timeout,
    Nr,
    /// Response fields: their presence makes the frame a response.
    Result,
    Error,
    #[serde(other)]
    Unknown,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::V => "v",
            Field::Id => "id",
            Field::Src => "src",
            Field::Dst => "dst",
            Field::Key => "key",
            Field::Method => "method",
            Field::Args => "args",
            Field::Tag => "tag",
            Field::Deadline => "deadline",
            Field::Timeout => "timeout",
            Field::Nr => "nr",
            Field::Result => "result",
            Field::Error => "error",
            Field::Unknown => "unknown",
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawFrame<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FrameVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for FrameVisitor<'a> {
            type Value = RawFrame<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut frame = RawFrame::default();
                while let Some(field) = map.next_key::<Field>()? {
                    let slot = match field {
                        Field::V => &mut frame.v,
                        Field::Id => &mut frame.id,
                        Field::Src => &mut frame.src,
                        Field::Dst => &mut frame.dst,
                        Field::Key => &mut frame.key,
                        Field::Method => &mut frame.method,
                        Field::Args => &mut frame.args,
                        Field::Tag => &mut frame.tag,
                        Field::Deadline => &mut frame.deadline,
                        Field::Timeout => &mut frame.timeout,
                        Field::Nr => &mut frame.nr,
                        Field::Result | Field::Error => {
                            frame.response = true;
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        Field::Unknown => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    let value: &'a RawValue = map.next_value()?;
                    if slot.is_some() {
                        // src/id ambiguity outranks any other duplicate.
                        if !matches!(frame.duplicate, Some(Field::Src | Field::Id)) {
                            frame.duplicate = Some(field);
                        }
                    } else {
                        *slot = Some(value);
                    }
                }
                Ok(frame)
            }
        }
        deserializer.deserialize_map(FrameVisitor(std::marker::PhantomData))
    }
}

/// Turns serde's error for method arguments into a 400 that names the field.
pub fn args_error(err: serde_path_to_error::Error<serde_json::Error>) -> RpcError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let mut msg = inner.to_string();
    // serde_json appends " at line L column C"; it means nothing to a caller.
    if let Some(pos) = msg.rfind(" at line ") {
        msg.truncate(pos);
    }
    if path == "." || path.is_empty() {
        RpcError::bad_request("args", msg)
    } else {
        RpcError::bad_request(&format!("args.{path}"), msg)
    }
}

/// Parses method arguments into `T`; absent arguments are `{}`.
pub fn parse_args<'a, T: Deserialize<'a>>(args: Option<&'a RawValue>) -> Result<T, RpcError> {
    let text = args.map_or("{}", RawValue::get);
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(args_error)
}

#[cfg(test)]
mod tests;
