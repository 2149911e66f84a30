//! Responses: encoding the envelope authd sends, and the type a client reads
//! (docs/protocol.md#responses).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Address, RpcError};

/// Encodes a success response. `result` is omitted when `None` (methods with no result).
pub fn encode_result<R: Serialize + ?Sized>(
    service: &str,
    to: &Address<'_>,
    result: Option<&R>,
) -> Vec<u8> {
    encode(service, to, result, None)
}

/// Encodes an error response.
pub fn encode_error(service: &str, to: &Address<'_>, error: &RpcError) -> Vec<u8> {
    encode::<()>(service, to, None, Some(error))
}

fn encode<R: Serialize + ?Sized>(
    service: &str,
    to: &Address<'_>,
    result: Option<&R>,
    error: Option<&RpcError>,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Envelope<'a, R: Serialize + ?Sized> {
        v: u8,
        src: &'a str,
        dst: &'a str,
        id: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        tag: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a R>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a RpcError>,
    }
    let envelope = Envelope {
        v: 2,
        src: service,
        dst: &to.src,
        id: to.id,
        tag: to.tag,
        result,
        error,
    };
    let mut out = Vec::with_capacity(128);
    // Serializing plain structs, strings and already-valid raw JSON into a Vec cannot fail.
    if serde_json::to_writer(&mut out, &envelope).is_err() {
        out.clear();
    }
    out
}

/// A response frame as a client sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u64>,
    pub src: String,
    pub dst: String,
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}
