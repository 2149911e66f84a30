//! Error codes and the `error` object of a response (docs/protocol.md#error-codes).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The error codes authd answers with (docs/protocol.md#error-codes): mg_rpc's HTTP-like
/// convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed frame or arguments; the message names the field.
    BadRequest = 400,
    /// Caller key missing or not valid.
    Unauthorized = 401,
    /// Caller key valid but not allowed to call the method.
    Forbidden = 403,
    /// No such method, or no such entity (`Entity.Get`).
    NotFound = 404,
    /// Conflict, e.g. `Entity.Put {create_only}` for an existing id.
    Conflict = 409,
    /// What was asked for is gone for good: `Events.Since` after an event no longer kept.
    Gone = 410,
    /// Frame larger than the configured limit.
    TooLarge = 413,
    /// Caller over its rate limit.
    RateLimited = 429,
    /// Internal error (e.g. storage failure); state is unchanged.
    Internal = 500,
    /// The request's deadline had passed on arrival; not executed.
    DeadlinePassed = 504,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::Gone,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
        ErrorCode::DeadlinePassed,
    ];

    /// The number on the wire.
    pub fn number(self) -> u16 {
        self as u16
    }

    /// The code of a number on the wire, if it is one of ours.
    pub fn from_number(n: u16) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.number() == n)
    }

    /// The number as text (a metrics label).
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "400",
            ErrorCode::Unauthorized => "401",
            ErrorCode::Forbidden => "403",
            ErrorCode::NotFound => "404",
            ErrorCode::Conflict => "409",
            ErrorCode::Gone => "410",
            ErrorCode::TooLarge => "413",
            ErrorCode::RateLimited => "429",
            ErrorCode::Internal => "500",
            ErrorCode::DeadlinePassed => "504",
        }
    }
}

/// An error frame's `error` object. authd sends only [`ErrorCode`]s; `code` is a plain number
/// because a client reads whatever a server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: u16,
    pub message: String,
}

/// [`RpcError::unavailable`]'s code: outside [`ErrorCode`], never on the wire.
const UNAVAILABLE: u16 = 503;

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RpcError {
            code: code.number(),
            message: message.into(),
        }
    }
    /// 400, with a message that starts with the field it is about.
    pub fn bad_request(field: &str, problem: impl fmt::Display) -> Self {
        Self::new(ErrorCode::BadRequest, format!("{field}: {problem}"))
    }
    pub fn unauthorized() -> Self {
        Self::new(ErrorCode::Unauthorized, "caller key missing or not valid")
    }
    pub fn forbidden(method: &str) -> Self {
        Self::new(
            ErrorCode::Forbidden,
            format!("caller key may not call {method}"),
        )
    }
    pub fn no_handler(method: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("No handler for {method}"))
    }
    pub fn too_large(len: usize, limit: usize) -> Self {
        Self::new(
            ErrorCode::TooLarge,
            format!("frame of {len} bytes is larger than the limit of {limit} bytes"),
        )
    }
    /// 409: a request reused the `src` and `id` of an earlier, different request that is
    /// still recorded for redelivery. Says nothing of that request.
    pub fn id_reused() -> Self {
        Self::new(
            ErrorCode::Conflict,
            "id: request id already used by another request from this src; use a fresh id",
        )
    }
    /// Not an answer: the store is unavailable, so the request is held (no reply, no ack)
    /// and tried again. Its code, 503, is never sent ([`RpcError::is_unavailable`]).
    pub fn unavailable() -> Self {
        RpcError {
            code: UNAVAILABLE,
            message: String::new(),
        }
    }
    pub fn is_unavailable(&self) -> bool {
        self.code == UNAVAILABLE
    }
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "internal error; nothing was changed")
    }
    /// 500 for a request whose handler failed unexpectedly (a panic): unlike
    /// [`RpcError::internal`] it cannot promise that nothing changed. A write retried with
    /// the same `src`, `id`, method and arguments gets its recorded reply if it did run.
    pub fn handler_failed() -> Self {
        Self::new(
            ErrorCode::Internal,
            "internal error while handling the request; a write may or may not have taken effect: retry it with the same id",
        )
    }
    pub fn deadline_passed() -> Self {
        Self::new(
            ErrorCode::DeadlinePassed,
            "deadline passed before the request arrived; not executed",
        )
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}
