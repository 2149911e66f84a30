//! The method table: each method family in a file of its own, turning typed arguments into a
//! typed result against the store (docs/protocol.md#methods). [`find`] maps a method name to
//! its entry.
//!
//! Read methods return their result. Write methods make a [`Change`](crate::store::Change)
//! and return its [`Reply`]: the recipe of their result, which the store records with the
//! change so that a redelivered request is answered by the same recipe ([`render`]) without
//! running the method again.
//!
//! To add a method: write `async fn name(ctx: &Ctx<'_>, args: Option<&RawValue>)` in its
//! family's file (returning `Result<Option<Value>, RpcError>` for a read, `Result<Reply,
//! RpcError>` for a write) and add one line to [`method_table!`]'s invocation below.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::caller::Scope;
use crate::crypto::ServerKeys;
use crate::frame::{valid_name, RpcError};
use crate::lockout::Lockout;
use crate::metrics::Metrics;
use crate::store::{Applied, Change, Reply, RequestKey, Store, StoreError};

pub mod acl;
pub mod authenticate;
pub mod authorize;
pub mod entity;
pub mod events;
pub mod token;

/// What a method runs against.
pub struct Ctx<'a> {
    pub store: &'a Store,
    pub keys: &'a ServerKeys,
    /// The request: its `src` is the subject of the token methods.
    pub request: RequestKey<'a>,
    /// The canonical name of the method running (for its audit lines).
    pub method: &'static str,
    /// `Authenticate`'s brute-force guard.
    pub lockout: &'a Lockout,
    pub metrics: &'a Arc<Metrics>,
    /// Most live app tokens per user (`max_tokens_per_user`).
    pub max_tokens_per_user: u64,
    /// Lifetime of a token made without `ttl`, seconds; 0: none (`token_ttl_secs`).
    pub token_ttl_secs: u64,
}

impl Ctx<'_> {
    pub fn now_secs(&self) -> u64 {
        self.request.at_ms / 1000
    }

    /// When the request was handled, UNIX milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.request.at_ms
    }
}

/// One audit line (target `authd::audit`) for the method running in `ctx`: the request's
/// `rpc_id`, `src` and `method`, then the fields given (`subject`, `result`, `reason`, …) and
/// the message. Never give it a secret.
#[macro_export]
macro_rules! audit {
    ($ctx:expr, $($fields:tt)+) => {
        tracing::info!(
            target: "authd::audit",
            rpc_id = $ctx.request.id,
            src = $ctx.request.src,
            method = $ctx.method,
            $($fields)+
        )
    };
}

/// Whether a method only reads, or changes state (and so is recorded for redelivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
}

/// What a method answered: a read's result, or a write's recorded reply.
#[derive(Debug)]
pub enum Answer {
    Read(Option<Value>),
    Write(Reply),
}

/// One entry of the method table.
#[derive(Debug)]
pub struct Method {
    /// Canonical name without the `/v1/` prefix, e.g. `Auth.GetToken`.
    pub name: &'static str,
    /// The least scope a caller key needs.
    pub scope: Scope,
    pub kind: Kind,
    op: Op,
}

/// Builds the table, the enum naming its entries, and [`Method::run`]. A read function that
/// is listed as a write (or the reverse) does not compile.
macro_rules! method_table {
    // A write waits for the store anyway, in a task of its own: its future is boxed, so
    // that it does not size every request's future (reads run inline, `server.rs`).
    (@call Read, $call:expr) => { $call.await };
    (@call Write, $call:expr) => { Box::pin($call).await };
    ($($op:ident: $name:literal, $scope:ident, $kind:ident => $function:path;)+) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Op {
            $($op),+
        }

        static METHODS: &[Method] = &[
            $(Method { name: $name, scope: Scope::$scope, kind: Kind::$kind, op: Op::$op }),+
        ];

        impl Method {
            /// Runs the method with `args` (raw JSON, parsed by the method).
            pub async fn run(
                &self,
                ctx: &Ctx<'_>,
                args: Option<&RawValue>,
            ) -> Result<Answer, RpcError> {
                Ok(match self.op {
                    $(Op::$op => Answer::$kind(method_table!(@call $kind, $function(ctx, args))?)),+
                })
            }
        }
    };
}

method_table! {
    Authenticate: "Auth.Authenticate", Service, Read => authenticate::authenticate;
    GenerateToken: "Auth.GenerateToken", Service, Write => token::generate;
    GetToken: "Auth.GetToken", Service, Read => token::get;
    ListToken: "Auth.ListToken", Service, Read => token::list;
    RevokeToken: "Auth.RevokeToken", Service, Write => token::revoke;
    EntityPut: "Entity.Put", Admin, Write => entity::put;
    EntityGet: "Entity.Get", Admin, Read => entity::get;
    EntityDelete: "Entity.Delete", Admin, Write => entity::delete;
    EntityList: "Entity.List", Admin, Read => entity::list;
    AuthorizeCommand: "Auth.AuthorizeCommand", Service, Read => authorize::authorize;
    AclAdd: "ACL.Add", Admin, Write => acl::add;
    AclDelete: "ACL.Delete", Admin, Write => acl::delete;
    AclList: "ACL.List", Admin, Read => acl::list;
    EventsSince: "Events.Since", Service, Read => events::since;
}

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

/// A method's position in the table (its metrics row).
pub fn position(method: &Method) -> Option<usize> {
    METHODS.iter().position(|m| std::ptr::eq(m, method))
}

/// All canonical method names, in table order.
pub fn names() -> impl Iterator<Item = &'static str> {
    METHODS.iter().map(|m| m.name)
}

/// Turns a write's recorded reply into the response's `result`.
pub fn render(reply: &Reply, keys: &ServerKeys) -> Result<Option<Value>, RpcError> {
    match reply {
        Reply::Empty => Ok(None),
        Reply::Value(v) => Ok(Some(v.clone())),
        Reply::Token {
            user,
            host,
            token_id,
            key_id,
        } => {
            let token = token::token_string(keys, *key_id, token_id, user, host)?;
            Ok(Some(serde_json::json!({ "token": token })))
        }
        Reply::Psk { .. } => {
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

/// Makes a write's change in the store (see [`Store::apply`]).
pub async fn apply(ctx: &Ctx<'_>, change: Change) -> Result<Applied, RpcError> {
    ctx.store
        .apply(&ctx.request, change)
        .await
        .map_err(storage_failed)
}

/// The reply of an applied change that needs no more than its reply: made now or before, or
/// 409 when the request's id belongs to another request.
pub fn reply_of(applied: Applied) -> Result<Reply, RpcError> {
    match applied {
        Applied::Now(_, reply) | Applied::Before(reply) => Ok(reply),
        Applied::IdReused => Err(RpcError::id_reused()),
    }
}

/// A page's `limit` argument: `default` when absent, else 1 to `max` (400 otherwise).
pub fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<usize, RpcError> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(RpcError::bad_request(
            "args.limit",
            format!("must be 1 to {max}"),
        ));
    }
    Ok(limit as usize)
}

/// A storage failure as the caller sees it: 500, details in our log only. A database that
/// is unavailable is no answer at all: the request is held and tried again
/// ([`RpcError::unavailable`]).
pub fn storage_failed(e: StoreError) -> RpcError {
    if matches!(e, StoreError::Unavailable) {
        return RpcError::unavailable();
    }
    tracing::error!(error = %e, "storage failure");
    RpcError::internal()
}

#[cfg(test)]
pub(crate) mod testing {
    //! A context for calling methods directly in unit tests.

    use super::*;
    use crate::lockout::LockoutPolicy;

    /// A log sink for one test.
    #[derive(Clone, Default)]
    pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    thread_local! {
        static CAPTURING: std::cell::RefCell<Option<Capture>> = const { std::cell::RefCell::new(None) };
    }

    /// Writes to the capture of the thread that logs, if it has one.
    struct ThreadSink;

    impl std::io::Write for ThreadSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            CAPTURING.with(|c| {
                if let Some(capture) = c.borrow_mut().as_mut() {
                    capture.write_all(buf)?;
                }
                Ok(buf.len())
            })
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Clears the thread's capture when dropped.
    pub struct Capturing;

    impl Drop for Capturing {
        fn drop(&mut self) {
            CAPTURING.with(|c| c.borrow_mut().take());
        }
    }

    impl Capture {
        /// Captures this thread's log lines (JSON) until the guard drops (a
        /// `current_thread` test runs on one thread). Through one process-wide subscriber
        /// installed once: a subscriber set per thread races tracing's cache of which
        /// callsites anyone wants with the other tests' threads, and can miss lines.
        pub fn start(&self) -> Capturing {
            static INSTALL: std::sync::Once = std::sync::Once::new();
            INSTALL.call_once(|| {
                let subscriber = tracing_subscriber::fmt()
                    .json()
                    .with_writer(|| ThreadSink)
                    .finish();
                let _ = tracing::subscriber::set_global_default(subscriber);
            });
            CAPTURING.with(|c| *c.borrow_mut() = Some(self.clone()));
            Capturing
        }

        /// The `fields` of every `authd::audit` line written so far (JSON logs).
        pub fn audit_fields(&self) -> Vec<Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|l| l["target"] == "authd::audit")
                .map(|l| l["fields"].clone())
                .collect()
        }
    }

    pub struct Fixture {
        pub store: Store,
        pub keys: ServerKeys,
        pub lockout: Lockout,
        pub metrics: Arc<Metrics>,
    }

    impl Fixture {
        pub fn new(lockout: LockoutPolicy) -> Fixture {
            Fixture {
                store: Store::temporary().expect("temporary store"),
                keys: ServerKeys::for_tests(),
                lockout: Lockout::new(lockout),
                metrics: Arc::default(),
            }
        }

        /// A context for request `rpc_id` from `backend`, running `method`.
        pub fn ctx(&self, method: &'static str, rpc_id: u64) -> Ctx<'_> {
            Ctx {
                store: &self.store,
                keys: &self.keys,
                request: RequestKey {
                    src: "backend",
                    id: rpc_id,
                    at_ms: crate::unix_ms(),
                    binding: Some(crate::store::Binding {
                        caller: "tests",
                        method,
                        args_digest: [0; 32],
                    }),
                },
                method,
                lockout: &self.lockout,
                metrics: &self.metrics,
                max_tokens_per_user: 1000,
                token_ttl_secs: 0,
            }
        }
    }
}
