//! From a request payload to a response: envelope checks, caller key, method lookup,
//! deadline, redelivery record, and the method itself. Free of MQTT: the server hands it
//! bytes and gets back bytes (and whether the reply must wait for durability).

use std::future::Future;
use std::sync::Arc;

use crate::caller::CallerKeys;
use crate::config::Config;
use crate::crypto::{sha256, ServerKeys};
use crate::frame::{self, Address, DropReason, ErrorCode, Reject, Request, RpcError};
use crate::lockout::Lockout;
use crate::methods::{self, Answer, Ctx, Kind, Method};
use crate::metrics::{Metrics, RequestLabel};
use crate::mqtt;
use crate::ratelimit::RateLimiter;
use crate::store::{Binding, Recorded, RequestKey, Store};

/// What to do after handling one frame.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `(topic, payload)` of the response; `None` when dropped or `nr`.
    pub reply: Option<(String, Vec<u8>)>,
    /// The reply depends on a change that may not be on disk yet (a redelivery answered from
    /// a record whose change is still being flushed, or a store that does not flush each
    /// commit): the reply must wait until the store is durable.
    pub needs_durability: bool,
    /// How to count the request once answered; `None` for a dropped frame.
    pub label: Option<RequestLabel>,
    /// No answer yet: the store is unavailable. The request is neither answered nor
    /// acknowledged, and is tried again (or redelivered after a restart).
    pub hold: bool,
}

/// Turns one request frame into an [`Outcome`]. Implemented by [`Dispatcher`] (authd) and
/// by the benchmark's null worker, so both run on exactly the same serving path.
pub trait Responder: Send + Sync + 'static {
    /// `suffix` is the part of the topic after `<request topic>/`, if any; `arrived_ms`
    /// when the frame came off the wire (UNIX ms).
    fn respond(
        &self,
        suffix: Option<&str>,
        payload: &[u8],
        arrived_ms: u64,
    ) -> impl Future<Output = Outcome> + Send;

    /// Waits until every change the outcomes so far depend on is durable (see
    /// [`Outcome::needs_durability`]).
    fn durable(&self) -> impl Future<Output = Result<(), crate::store::StoreError>> + Send {
        async { Ok(()) }
    }

    /// The outcome for a frame whose [`Responder::respond`] panicked: a 500 to its address,
    /// if it has one. Default: no reply (the message is still acknowledged).
    fn panicked(&self, _suffix: Option<&str>, _payload: &[u8]) -> Outcome {
        Outcome::default()
    }
}

impl Responder for Dispatcher {
    async fn respond(&self, suffix: Option<&str>, payload: &[u8], arrived_ms: u64) -> Outcome {
        self.handle(suffix, payload, arrived_ms).await
    }

    async fn durable(&self) -> Result<(), crate::store::StoreError> {
        self.store.durable().await
    }

    fn panicked(&self, suffix: Option<&str>, payload: &[u8]) -> Outcome {
        let (to, method) = match frame::parse(payload, self.config.max_frame_bytes) {
            Ok(req) => {
                let method = method_of(&req, suffix);
                (req.to, method)
            }
            Err(Reject::Error(to, _)) => (to, None),
            Err(Reject::Drop(_)) => return Outcome::default(),
        };
        if self.reply_loops_back(&to.src) {
            return Outcome::default();
        }
        self.error(&to, RpcError::handler_failed(), method)
    }
}

/// A request for this method panics its handler (`fault-injection` builds only: tests of
/// what a panic does to the serving path).
#[cfg(feature = "fault-injection")]
pub const FAULT_PANIC_METHOD: &str = "Fault.Panic";

/// Everything needed to answer requests. Cheap to share (`Arc`).
pub struct Dispatcher {
    config: Arc<Config>,
    callers: CallerKeys,
    store: Store,
    keys: ServerKeys,
    metrics: Arc<Metrics>,
    lockout: Lockout,
    rate: RateLimiter,
    record_replies: bool,
    /// Our request topic (resolved): a reply must never land on it or under it.
    request_topic: String,
}

impl Dispatcher {
    pub fn new(
        config: Arc<Config>,
        callers: CallerKeys,
        store: Store,
        keys: ServerKeys,
        metrics: Arc<Metrics>,
    ) -> Self {
        Dispatcher {
            lockout: Lockout::new(config.lockout()),
            rate: RateLimiter::new(config.rate_limit(), callers.names().map(|(n, _)| n)),
            request_topic: config.request_topic(),
            config,
            callers,
            store,
            keys,
            metrics,
            record_replies: true,
        }
    }

    /// Stops recording replies of changes for redelivery (`authd import`: nobody redelivers).
    pub fn without_replay_records(mut self) -> Self {
        self.record_replies = false;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Handles one frame received on the request topic. `suffix` is the part of the topic
    /// after `<request topic>/`, if any; `arrived_ms` when it came off the wire (UNIX ms).
    pub async fn handle(&self, suffix: Option<&str>, payload: &[u8], arrived_ms: u64) -> Outcome {
        let req = match frame::parse(payload, self.config.max_frame_bytes) {
            Ok(req) => req,
            Err(Reject::Drop(reason)) => return self.drop_frame(reason, payload.len()),
            Err(Reject::Error(to, _)) if self.reply_loops_back(&to.src) => {
                return self.drop_frame(DropReason::ReplyLoop, payload.len())
            }
            Err(Reject::Error(to, e)) => return self.error(&to, e, None),
        };
        // Before anything is executed, `nr` or not: such a frame claims to come from us.
        if self.reply_loops_back(&req.to.src) {
            return self.drop_frame(DropReason::ReplyLoop, payload.len());
        }
        let to = req.to.clone();
        let method = method_of(&req, suffix);
        match self.execute(suffix, &req, arrived_ms).await {
            Ok((result, needs_durability)) => Outcome {
                reply: self.reply(&to, Body::Result(result.as_ref())),
                needs_durability,
                label: Some(RequestLabel::ok(method.and_then(methods::position))),
                hold: false,
            },
            Err(e) => self.error(&to, e, method),
        }
    }

    /// Counts and logs a dropped frame; nothing is sent.
    fn drop_frame(&self, reason: DropReason, bytes: usize) -> Outcome {
        let n = self.metrics.drop_frame(reason);
        // A flood of garbage must not become a flood of logs.
        if n <= 10 || n.is_multiple_of(1000) {
            tracing::warn!(reason = reason.label(), count = n, bytes, "frame dropped");
        }
        Outcome::default()
    }

    /// Whether answering `src` would publish onto one of our own request subscriptions
    /// (`{request_topic}` or `{request_topic}/#`), where we would read our reply back as
    /// a request: `src` is the service id itself, or its reply topic is the request topic
    /// or under it.
    fn reply_loops_back(&self, src: &str) -> bool {
        src == self.config.id || under_topic(&self.config.reply_topic(src), &self.request_topic)
    }

    async fn execute(
        &self,
        suffix: Option<&str>,
        req: &Request<'_>,
        arrived_ms: u64,
    ) -> Result<(Option<serde_json::Value>, bool), RpcError> {
        if let Some(dst) = &req.dst {
            if *dst != self.config.id {
                return Err(RpcError::bad_request(
                    "dst",
                    format!("must be `{}` (this service) when present", self.config.id),
                ));
            }
        }
        let suffix = suffix.filter(|s| !s.is_empty());
        let name = match (req.method.as_deref(), suffix) {
            (Some(m), Some(s)) if methods::canonical(m) != methods::canonical(s) => {
                return Err(RpcError::bad_request(
                    "method",
                    format!("`{m}` differs from the topic's `{s}`"),
                ))
            }
            (Some(m), _) => m,
            (None, Some(s)) => s,
            (None, None) => return Err(RpcError::bad_request("method", "missing")),
        };
        #[cfg(feature = "fault-injection")]
        if methods::canonical(name) == FAULT_PANIC_METHOD {
            panic!("fault injection: {FAULT_PANIC_METHOD}");
        }
        // The key is checked before the method name, so that a caller without a key
        // learns nothing, not even which methods exist.
        let caller = self
            .callers
            .check(req.key.as_deref())
            .ok_or_else(RpcError::unauthorized)?;
        let method = methods::find(name).ok_or_else(|| RpcError::no_handler(name))?;
        if !caller.scope.allows(method.scope) {
            return Err(RpcError::forbidden(name));
        }
        // Known to be down: held at once, without starting a sign-in attempt or taking a
        // rate-limit token that the retry would take again.
        if !self.store.available() {
            return Err(RpcError::unavailable());
        }
        let now_ms = crate::unix_ms();
        // A write is bound to its caller, method and arguments, so that a redelivery is told
        // apart from another request that reuses its src and id.
        let binding = (method.kind == Kind::Write && self.record_replies).then(|| Binding {
            caller: caller.name,
            method: method.name,
            args_digest: sha256(req.args.map_or("{}", |a| a.get()).as_bytes()),
        });
        let ctx = Ctx {
            store: &self.store,
            keys: &self.keys,
            request: RequestKey {
                src: &req.to.src,
                id: req.to.id,
                at_ms: now_ms,
                binding,
            },
            method: method.name,
            lockout: &self.lockout,
            metrics: &self.metrics,
            max_tokens_per_user: self.config.max_tokens_per_user,
            token_ttl_secs: self.config.token_ttl_secs,
        };
        // Before the rate limit and the deadline: a redelivery of a change already made gets
        // its recorded answer, since a 429 or 504 would say "not executed" of a request that
        // was. The record may still be on its way to disk (its batch is being flushed), so
        // that reply waits for durability.
        match self
            .store
            .recorded(&ctx.request)
            .await
            .map_err(methods::storage_failed)?
        {
            Recorded::Nothing => {}
            Recorded::Same(reply) => {
                self.metrics
                    .replayed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The change itself was audited by its method the first time.
                crate::audit!(
                    ctx,
                    caller = caller.name,
                    "redelivered change answered from its record"
                );
                return methods::render(&reply, &self.keys).map(|r| (r, true));
            }
            Recorded::Other => return Err(RpcError::id_reused()),
        }
        if !self.rate.admit(caller.name, std::time::Instant::now()) {
            return Err(self.rate_limited(caller.name));
        }
        if expired(req, arrived_ms, now_ms) {
            return Err(RpcError::deadline_passed());
        }
        match method.run(&ctx, req.args).await? {
            Answer::Read(result) => Ok((result, false)),
            // A fresh change is durable when the store returns (but in a bulk import).
            Answer::Write(reply) => {
                methods::render(&reply, &self.keys).map(|r| (r, !self.store.durable_on_commit()))
            }
        }
    }

    fn rate_limited(&self, caller: &str) -> RpcError {
        let n = self
            .metrics
            .rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        // A caller hammering us must not become a flood of logs.
        if n <= 10 || n.is_multiple_of(1000) {
            tracing::warn!(caller, count = n, "caller over its rate limit: 429");
        }
        let p = self.rate.policy();
        RpcError::new(
            ErrorCode::RateLimited,
            format!(
                "caller key `{caller}` is over its rate limit of {} requests/s (burst {}); retry later",
                p.per_sec, p.burst
            ),
        )
    }

    fn error(&self, to: &Address<'_>, e: RpcError, method: Option<&Method>) -> Outcome {
        if e.is_unavailable() {
            return Outcome {
                hold: true,
                ..Outcome::default()
            };
        }
        // Not the message: it can quote what the caller sent (a serde error quotes the value
        // of a mistyped argument, a 404 the method name), and that may be a secret.
        tracing::debug!(rpc_id = to.id, src = %to.src, code = e.code, field = field_of(&e.message), "error reply");
        Outcome {
            reply: self.reply(to, Body::Error(&e)),
            needs_durability: false,
            label: Some(RequestLabel::error(
                method.and_then(methods::position),
                e.code,
            )),
            hold: false,
        }
    }

    /// The reply's topic and payload, unless `nr`. A reply must fit in one MQTT packet: one
    /// that does not would break the connection when written, and be written again after
    /// every reconnect. A caller can make a reply that large (a big `tag` is echoed, error
    /// messages quote argument names), so then it gets a short error without the tag.
    fn reply(&self, to: &Address<'_>, body: Body<'_>) -> Option<(String, Vec<u8>)> {
        if to.nr {
            return None;
        }
        let topic = self.config.reply_topic(&to.src);
        let service = self.config.id.as_str();
        let max = self.config.max_packet_bytes;
        let payload = match body {
            Body::Result(r) => frame::encode_result(service, to, r),
            Body::Error(e) => frame::encode_error(service, to, e),
        };
        if mqtt::publish_fits(&topic, payload.len(), max) {
            return Some((topic, payload));
        }
        let short = match body {
            Body::Result(_) => RpcError::new(
                ErrorCode::Internal,
                format!(
                    "the response of {} bytes is larger than the limit of {max} bytes",
                    payload.len()
                ),
            ),
            Body::Error(e) => RpcError {
                code: e.code,
                message: truncate(&e.message, 200),
            },
        };
        tracing::warn!(
            rpc_id = to.id,
            bytes = payload.len(),
            limit = max,
            "response too large; sending a short error without the tag"
        );
        let untagged = Address {
            tag: None,
            ..to.clone()
        };
        let payload = frame::encode_error(service, &untagged, &short);
        mqtt::publish_fits(&topic, payload.len(), max).then_some((topic, payload))
    }
}

/// The request's method in the table, if any, for the metrics' method label only: a name
/// that is not in the table is `other`.
fn method_of(req: &Request<'_>, suffix: Option<&str>) -> Option<&'static Method> {
    req.method
        .as_deref()
        .or(suffix.filter(|s| !s.is_empty()))
        .and_then(methods::find)
}

/// Whether `topic` is `base` or under it (what a subscription to `base` and `base/#`
/// receives). Topic names here hold no wildcards: `src` cannot contain `+` or `#`.
pub fn under_topic(topic: &str, base: &str) -> bool {
    topic
        .strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// What a reply carries.
#[derive(Clone, Copy)]
enum Body<'a> {
    Result(Option<&'a serde_json::Value>),
    Error(&'a RpcError),
}

/// At most `max` bytes of `s`, cut at a character boundary, with `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The field an error message is about (`args.credentials.psk: …` → `args.credentials.psk`),
/// if it starts with one: a short run of identifier characters and dots. Safe to log.
fn field_of(message: &str) -> &str {
    match message.split_once(": ") {
        Some((field, _))
            if field.len() <= 64
                && field
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.[]".contains(&b)) =>
        {
            field
        }
        _ => "",
    }
}

/// Whether the request's `deadline` (absolute) or `timeout` (from arrival) had passed.
fn expired(req: &Request<'_>, arrived_ms: u64, now_ms: u64) -> bool {
    let now = now_ms as f64 / 1000.0;
    let by_deadline = req.deadline.is_some_and(|d| now > d);
    // A timeout of zero or less has passed by definition, however fast we are.
    let by_timeout = req
        .timeout
        .is_some_and(|t| t <= 0.0 || now > arrived_ms as f64 / 1000.0 + t);
    by_deadline || by_timeout
}
