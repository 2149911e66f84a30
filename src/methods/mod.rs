//! The method table: each method family in a file of its own, turning typed arguments into a
//! typed result against the store. [`find`] maps a method name to its entry.
//!
//! Read methods return their result. Write methods return a [`Replay`]: the recipe of their
//! result, which the store keeps with the change so that a redelivered request is answered
//! by the same recipe ([`render`]) without running the method again.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::caller::Scope;
use crate::crypto::ServerKeys;
use crate::frame::{valid_name, RpcError};
use crate::lockout::Lockout;
use crate::store::{Replay, RequestKey, Store, StoreError};

pub mod acl;
pub mod authenticate;
pub mod authorize;
pub mod entity;
pub mod token;

/// What a method runs against.
pub struct Ctx<'a> {
    pub store: &'a Store,
    pub keys: &'a ServerKeys,
    /// The request: its `src` is the subject of the token methods.
    pub request: RequestKey<'a>,
    /// `Authenticate`'s brute-force guard.
    pub lockout: &'a Lockout,
}

impl Ctx<'_> {
    pub fn now_secs(&self) -> u64 {
        self.request.at_ms / 1000
    }
}

pub type ReadFn = fn(&Ctx<'_>, Option<&RawValue>) -> Result<Option<Value>, RpcError>;
pub type WriteFn = fn(&Ctx<'_>, Option<&RawValue>) -> Result<Replay, RpcError>;

/// A method's handler: read-only, or state-changing (and so recorded for redelivery).
#[derive(Clone, Copy)]
pub enum Handler {
    Read(ReadFn),
    Write(WriteFn),
}

/// One entry of the method table.
pub struct Method {
    /// Canonical name without the `/v1/` prefix, e.g. `Auth.GetToken`.
    pub name: &'static str,
    /// The least scope a caller key needs.
    pub scope: Scope,
    pub handler: Handler,
}

static METHODS: &[Method] = &[
    Method {
        name: "Auth.Authenticate",
        scope: Scope::Service,
        handler: Handler::Read(authenticate::authenticate),
    },
    Method {
        name: "Auth.GenerateToken",
        scope: Scope::Service,
        handler: Handler::Write(token::generate),
    },
    Method {
        name: "Auth.GetToken",
        scope: Scope::Service,
        handler: Handler::Read(token::get),
    },
    Method {
        name: "Auth.ListToken",
        scope: Scope::Service,
        handler: Handler::Read(token::list),
    },
    Method {
        name: "Auth.RevokeToken",
        scope: Scope::Service,
        handler: Handler::Write(token::revoke),
    },
    Method {
        name: "Entity.Put",
        scope: Scope::Admin,
        handler: Handler::Write(entity::put),
    },
    Method {
        name: "Entity.Get",
        scope: Scope::Admin,
        handler: Handler::Read(entity::get),
    },
    Method {
        name: "Entity.Delete",
        scope: Scope::Admin,
        handler: Handler::Write(entity::delete),
    },
    Method {
        name: "Entity.List",
        scope: Scope::Admin,
        handler: Handler::Read(entity::list),
    },
    Method {
        name: "Auth.AuthorizeCommand",
        scope: Scope::Service,
        handler: Handler::Read(authorize::authorize),
    },
    Method {
        name: "ACL.Add",
        scope: Scope::Admin,
        handler: Handler::Write(acl::add),
    },
    Method {
        name: "ACL.Delete",
        scope: Scope::Admin,
        handler: Handler::Write(acl::delete),
    },
    Method {
        name: "ACL.List",
        scope: Scope::Admin,
        handler: Handler::Read(acl::list),
    },
];

/// Strips the optional `/v1/` (or `v1/`) prefix: `/v1/Auth.X`, `v1/Auth.X` and `Auth.X`
/// name the same method.
pub fn canonical(name: &str) -> &str {
    let name = name.strip_prefix('/').unwrap_or(name);
    name.strip_prefix("v1/").unwrap_or(name)
}

/// Looks a method up by any of its accepted names.
pub fn find(name: &str) -> Option<&'static Method> {
    let name = canonical(name);
    METHODS.iter().find(|m| m.name == name)
}

/// How many methods the table has (metrics keep one fixed row per method).
pub fn count() -> usize {
    METHODS.len()
}

/// A method's position in the table.
pub fn position(method: &Method) -> Option<usize> {
    METHODS.iter().position(|m| std::ptr::eq(m, method))
}

/// The canonical name of the method at `position`.
pub fn name_at(position: usize) -> Option<&'static str> {
    METHODS.get(position).map(|m| m.name)
}

/// All canonical method names, for documentation and tests.
pub fn names() -> impl Iterator<Item = &'static str> {
    METHODS.iter().map(|m| m.name)
}

/// Turns a write's recorded reply into the response's `result`.
pub fn render(reply: &Replay, keys: &ServerKeys) -> Result<Option<Value>, RpcError> {
    match reply {
        Replay::Empty => Ok(None),
        Replay::Value(v) => Ok(Some(v.clone())),
        Replay::Token {
            user,
            host,
            token_id,
            key_id,
        } => {
            let token = token::token_string(keys, *key_id, token_id, user, host)?;
            Ok(Some(serde_json::json!({ "token": token })))
        }
        Replay::Psk { .. } => {
            let psk = entity::generated_psk(keys, reply)?;
            Ok(Some(serde_json::json!({ "psk": psk })))
        }
    }
}

/// A name argument (`host`, `id`, `src`, `dst`, `cmd`): 1 to 256 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(pub String);

impl TryFrom<String> for Name {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if valid_name(&s) {
            Ok(Name(s))
        } else {
            Err("must be a string of 1 to 256 bytes with no control characters")
        }
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// A storage failure as the caller sees it: 500, details in our log only.
pub fn storage_failed(e: StoreError) -> RpcError {
    tracing::error!(error = %e, "storage failure");
    RpcError::internal()
}
