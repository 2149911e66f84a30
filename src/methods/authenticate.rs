//! `Auth.Authenticate {id, credentials}` → `true` | `false` (docs/protocol.md#auth-authenticate).
//!
//! Every presented credential must hold:
//! - `psk`: the entity's PSK (compared as keyed hashes, in constant time), or a live app
//!   token issued to user `id` (an app signs in as the user) when `id` is a `user` entity
//!   or no entity at all: a token never signs in as a device;
//! - `cert`: a PEM certificate whose DER SHA-256 equals the entity's pinned fingerprint and
//!   whose validity period contains now.
//!
//! A disabled entity is always refused. An unknown id does the same work as a known one (the
//! store decodes a dummy record, then a keyed hash of the presented PSK and a fingerprint
//! compare against a dummy pin), so the answer time does not tell whether an id exists. The brute-force guard ([`crate::lockout`]) runs
//! first: a locked id (or one with as many attempts in progress as it has left before a
//! lock) is refused unchecked, and an attempt let through counts until its outcome is in. Each decision is one audit line, never a secret.
//!
//! The hot path is one store read (the entity record) and one HMAC.
//!
//! Key rotation: a PSK hash records the server key it was made with. When a sign-in succeeds
//! with a PSK hashed under an older key, the PSK (just checked, so known) is hashed under the
//! newest key and stored in its place: one HMAC and one compare-and-swap, once per entity
//! after a rotation. The sign-in never fails because of it, and the write records no reply
//! (a lost one is redone at the next sign-in).

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{storage_failed, Ctx, Name};
use crate::cert::Certificate;
use crate::crypto::{ct_eq, parse_token, ParsedToken};
use crate::frame::{parse_args, RpcError};
use crate::lockout::Refused;
use crate::metrics::SignIn;
use crate::store::{EntityKind, EntityRecord, PskHash, SignInState, StoreError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthenticateArgs<'a> {
    id: Name,
    #[serde(borrow)]
    credentials: Credentials<'a>,
}

/// Unknown credential kinds are a 400, not silently skipped: a caller that presents one
/// expects it to be checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials<'a> {
    #[serde(borrow, default)]
    psk: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    cert: Option<Cow<'a, str>>,
}

/// Why a decision went the way it did: the audit line's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Ok,
    /// The psk is neither the entity's PSK nor shaped like an app token.
    BadPsk,
    /// The psk is shaped like an app token but is not a live token of user `id`.
    BadToken,
    /// The live app token of user `id`, past the end of its lifetime.
    ExpiredToken,
    /// A live app token of user `id`, but `id` is a device entity: tokens sign in only as
    /// users.
    TokenForDevice,
    /// The certificate is not the pinned one (or nothing is pinned).
    CertMismatch,
    /// The pinned certificate, outside its validity period.
    ExpiredCert,
    /// Not a PEM X.509 certificate.
    BadCert,
    Disabled,
    /// No such entity (and no live app token of that user was presented).
    Unknown,
    /// Refused unchecked by the brute-force guard.
    Locked,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::BadPsk => "bad_psk",
            Reason::BadToken => "bad_token",
            Reason::ExpiredToken => "expired_token",
            Reason::TokenForDevice => "token_for_device",
            Reason::CertMismatch => "cert_mismatch",
            Reason::ExpiredCert => "expired_cert",
            Reason::BadCert => "bad_cert",
            Reason::Disabled => "disabled",
            Reason::Unknown => "unknown",
            Reason::Locked => "locked",
        }
    }
}

/// Compared against when there is nothing to compare with, so the work is the same.
const DUMMY: [u8; 32] = [0; 32];

/// `Authenticate {id, credentials}` → `true` | `false`.
pub async fn authenticate(
    ctx: &Ctx<'_>,
    args: Option<&RawValue>,
) -> Result<Option<Value>, RpcError> {
    let AuthenticateArgs { id, credentials } = parse_args(args)?;
    if credentials.psk.is_none() && credentials.cert.is_none() {
        return Err(RpcError::bad_request(
            "args.credentials",
            "give psk, cert or both",
        ));
    }
    let psk = credentials.psk.as_deref();
    let cert = credentials.cert.as_deref();
    let reason = match ctx.lockout.begin(&id, Instant::now()) {
        Err(Refused) => Reason::Locked,
        Ok(attempt) => {
            // A storage error drops the attempt unfinished: it counts neither way.
            let Verdict {
                reason,
                stale_psk,
                shared,
            } = decide(ctx, &id, psk, cert).await.map_err(storage_failed)?;
            // Locked by the failures of other workers: refused unchecked, and the attempt
            // is dropped (counts neither way).
            if reason != Reason::Locked {
                let ok = reason == Reason::Ok;
                let here = attempt.finish(ok, Instant::now());
                // With several workers, the failures of all of them count (one write, on
                // a failure only).
                let everywhere = ctx
                    .store
                    .count_sign_in(&id, ok, shared, ctx.now_ms())
                    .await
                    .map_err(storage_failed)?;
                if let Some(lock) = here.max(everywhere) {
                    ctx.metrics.lockouts.fetch_add(1, Relaxed);
                    tracing::warn!(
                        target: "authd::audit",
                        subject = &*id,
                        lock_ms = lock.as_millis() as u64,
                        "too many failed sign-ins: id locked"
                    );
                }
                if let (Reason::Ok, Some(seen), Some(psk)) = (reason, stale_psk, psk) {
                    rehash_psk(ctx, &id, &seen, psk).await;
                }
            }
            reason
        }
    };
    let ok = reason == Reason::Ok;
    ctx.metrics.signed_in(match reason {
        Reason::Ok => SignIn::Ok,
        Reason::Locked => SignIn::Locked,
        _ => SignIn::Refused,
    });
    crate::audit!(
        ctx,
        subject = &*id,
        credentials = kinds(psk, cert),
        result = ok,
        reason = reason.as_str(),
        "authenticate"
    );
    Ok(Some(Value::Bool(ok)))
}

/// The outcome of checking credentials.
struct Verdict {
    reason: Reason,
    /// What the guard shared by several workers knew of the id before the check.
    shared: SignInState,
    /// The entity's record, when the presented PSK matched a hash made with a key older than
    /// the newest: to be re-hashed if the sign-in succeeds.
    stale_psk: Option<EntityRecord>,
}

/// Checks the presented credentials of `id`.
async fn decide(
    ctx: &Ctx<'_>,
    id: &str,
    psk: Option<&str>,
    cert: Option<&str>,
) -> Result<Verdict, StoreError> {
    let (entity, shared) = ctx.store.sign_in(id, ctx.now_ms()).await?;
    if shared.locked {
        return Ok(Verdict {
            reason: Reason::Locked,
            stale_psk: None,
            shared,
        });
    }
    let (psk_reason, entity_psk) = match psk {
        None => (Reason::Ok, false),
        Some(psk) => check_psk(ctx, id, entity.as_ref(), psk).await?,
    };
    let cert_reason = match cert {
        None => Reason::Ok,
        Some(pem) => check_cert(ctx, entity.as_ref(), pem),
    };
    let newest = ctx.keys.newest();
    let stale_psk = entity
        .as_ref()
        .filter(|e| entity_psk && e.psk.as_ref().is_some_and(|p| p.key_id != newest))
        .cloned();
    let reason = match entity {
        Some(e) if e.disabled => Reason::Disabled,
        Some(_) if psk_reason != Reason::Ok => psk_reason,
        Some(_) => cert_reason,
        // Not an entity: only a user signing in with a live app token, and nothing else.
        None if matches!(psk_reason, Reason::BadToken | Reason::ExpiredToken) => psk_reason,
        None if psk.is_some() && psk_reason == Reason::Ok && cert.is_none() => Reason::Ok,
        None => Reason::Unknown,
    };
    Ok(Verdict {
        reason,
        stale_psk,
        shared,
    })
}

/// Stores the hash of `psk` (just verified) under the newest server key, if `seen` is still
/// the entity's record. Failures are logged, never the sign-in's concern.
async fn rehash_psk(ctx: &Ctx<'_>, id: &str, seen: &EntityRecord, psk: &str) {
    let key_id = ctx.keys.newest();
    let Some(hash) = ctx.keys.psk_hash(key_id, id, psk) else {
        return;
    };
    let from = seen.psk.as_ref().map(|p| p.key_id);
    match ctx
        .store
        .replace_psk_hash(id, seen, PskHash { key_id, hash })
        .await
    {
        Ok(true) => tracing::info!(
            target: "authd::audit",
            rpc_id = ctx.request.id,
            subject = id,
            from_key = from,
            to_key = key_id,
            "psk re-hashed under the newest server key"
        ),
        // Changed meanwhile (e.g. Entity.Put): the new record is what counts.
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(subject = id, error = %e, "re-hashing a psk failed; the old hash still verifies")
        }
    }
}

/// Checks a presented psk: the reason, and whether it is the entity's own PSK. An app token
/// counts only for a user: a `user` entity, or an id that is no entity (users need not be
/// provisioned: tokens are issued to whatever user the backend names). A device's token is
/// still looked up, so that the work does not depend on the kind.
async fn check_psk(
    ctx: &Ctx<'_>,
    id: &str,
    entity: Option<&EntityRecord>,
    psk: &str,
) -> Result<(Reason, bool), StoreError> {
    let is_entity_psk = match entity.and_then(|e| e.psk.as_ref()) {
        Some(stored) => ctx
            .keys
            .psk_hash(stored.key_id, id, psk)
            .is_some_and(|h| ct_eq(&h, &stored.hash)),
        None => {
            // Same work as for an entity with a PSK.
            let h = ctx.keys.psk_hash(ctx.keys.newest(), id, psk);
            black_box(h.is_some_and(|h| ct_eq(&h, &DUMMY)));
            false
        }
    };
    if is_entity_psk {
        return Ok((Reason::Ok, true));
    }
    let is_user = !matches!(entity, Some(e) if e.kind == EntityKind::Device);
    let reason = match parse_token(psk) {
        None => Reason::BadPsk,
        Some(token) => match (token_signs_in(ctx, id, &token).await?, is_user) {
            (Some(true), true) => Reason::Ok,
            (Some(false), true) => Reason::ExpiredToken,
            (Some(_), false) => Reason::TokenForDevice,
            (None, _) => Reason::BadToken,
        },
    };
    Ok((reason, false))
}

/// Whether `token` is the live app token of some host of user `id`: `None` if not,
/// `Some(true)` if it is and has not expired, `Some(false)` if it has. The token id is the
/// lookup key (not secret on its own); the MAC is the secret, compared in constant time,
/// before the lifetime is looked at (so only the token's holder learns it expired).
async fn token_signs_in(
    ctx: &Ctx<'_>,
    id: &str,
    token: &ParsedToken,
) -> Result<Option<bool>, StoreError> {
    let Some(live) = ctx.store.live_token(&token.token_id).await? else {
        return Ok(None);
    };
    let genuine = live.user == id
        && ct_eq(&live.record.token_id, &token.token_id)
        && live.record.key_id == token.key_id
        && ctx.keys.verify_token(token, &live.user, &live.host);
    Ok(genuine.then(|| !live.record.expired(ctx.now_secs())))
}

fn check_cert(ctx: &Ctx<'_>, entity: Option<&EntityRecord>, pem: &str) -> Reason {
    // Parsed whether or not the id exists: the same work either way.
    let cert = match Certificate::from_pem(pem) {
        Ok(c) => c,
        Err(_) => return Reason::BadCert,
    };
    let pin = entity.and_then(|e| e.cert_sha256.as_ref());
    let matches = ct_eq(&cert.sha256, pin.unwrap_or(&DUMMY)) & pin.is_some();
    if !matches {
        Reason::CertMismatch
    } else if !cert.valid_at(ctx.now_secs() as i64) {
        Reason::ExpiredCert
    } else {
        Reason::Ok
    }
}

/// The credential kinds presented, for the audit line. A psk shaped like an app token is
/// reported as `token` (the shape is no secret).
fn kinds(psk: Option<&str>, cert: Option<&str>) -> &'static str {
    let token = psk.is_some_and(|p| p.starts_with(crate::crypto::TOKEN_PREFIX));
    match (psk.is_some(), token, cert.is_some()) {
        (true, true, true) => "token+cert",
        (true, false, true) => "psk+cert",
        (true, true, false) => "token",
        (true, false, false) => "psk",
        (false, _, _) => "cert",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crypto::{random_bytes, KeyId, ServerKeys};
    use crate::lockout::{Lockout, LockoutPolicy};
    use crate::methods::testing::Fixture as Base;
    use crate::store::{Change, PskHash, TokenRecord};

    const PSK: &str = "correct horse battery staple";

    struct Fixture(Base);

    impl Fixture {
        fn new() -> Fixture {
            Fixture(Base::new(LockoutPolicy {
                failures: 0,
                ..LockoutPolicy::default()
            }))
        }

        fn ctx(&self) -> Ctx<'_> {
            self.0.ctx("Auth.Authenticate", 1)
        }

        async fn put(&self, id: &str, psk: Option<&str>, cert: Option<&str>, disabled: bool) {
            self.put_kind(id, EntityKind::Device, psk, cert, disabled)
                .await
        }

        async fn put_kind(
            &self,
            id: &str,
            kind: EntityKind,
            psk: Option<&str>,
            cert: Option<&str>,
            disabled: bool,
        ) {
            let record = EntityRecord {
                kind,
                owner: None,
                psk: psk.map(|p| PskHash {
                    key_id: 1,
                    hash: self.0.keys.psk_hash(1, id, p).unwrap(),
                }),
                cert_sha256: cert.map(|c| Certificate::from_pem(c).unwrap().sha256),
                disabled,
                created: 1,
            };
            let change = Change::PutEntity {
                id: id.into(),
                record,
                create_only: false,
                generated: None,
            };
            let mut request = self.ctx().request;
            request.binding = None;
            self.0.store.apply(&request, change).await.unwrap();
        }

        async fn token(&self, user: &str, host: &str) -> String {
            let record = TokenRecord {
                token_id: random_bytes(),
                key_id: 1,
                created: 1,
                expires: None,
            };
            let token_id = record.token_id;
            let change = Change::ReplaceToken {
                user: user.into(),
                host: host.into(),
                record,
                max_per_user: 1000,
            };
            let mut request = self.ctx().request;
            request.binding = None;
            self.0.store.apply(&request, change).await.unwrap();
            self.0.keys.token(1, &token_id, user, host).unwrap()
        }

        async fn reason(&self, id: &str, psk: Option<&str>, cert: Option<&str>) -> Reason {
            decide(&self.ctx(), id, psk, cert).await.unwrap().reason
        }

        async fn call(&self, id: &str, psk: &str) -> Option<Value> {
            let args = serde_json::value::to_raw_value(&serde_json::json!({
                "id": id, "credentials": {"psk": psk}
            }))
            .unwrap();
            authenticate(&self.ctx(), Some(&args)).await.unwrap()
        }

        async fn key_of(&self, id: &str) -> KeyId {
            let e = self.0.store.entity(id).await.unwrap().unwrap();
            e.psk.unwrap().key_id
        }
    }

    fn cert(name: &str) -> String {
        rcgen::generate_simple_self_signed(vec![name.to_owned()])
            .unwrap()
            .cert
            .pem()
    }

    #[tokio::test]
    async fn reasons_name_what_failed() {
        let f = Fixture::new();
        let pem = cert("dev");
        f.put("dev", Some(PSK), Some(&pem), false).await;
        f.put("off", Some(PSK), None, true).await;
        f.put("cam", None, Some(&pem), false).await;
        f.put_kind("carol", EntityKind::User, Some(PSK), None, false)
            .await;
        let token = f.token("dev", "app").await;
        let cam_token = f.token("cam", "app").await;
        let carols_token = f.token("carol", "app").await;
        let users_token = f.token("alice", "app").await;

        let other_pem = cert("dev");
        let cases = [
            ("dev", Some(PSK), Some(pem.as_str()), Reason::Ok),
            // A token never signs in as a device, PSK or certificate-only.
            ("dev", Some(token.as_str()), None, Reason::TokenForDevice),
            (
                "cam",
                Some(cam_token.as_str()),
                None,
                Reason::TokenForDevice,
            ),
            ("cam", None, Some(pem.as_str()), Reason::Ok),
            // A user entity signs in with its PSK or its tokens.
            ("carol", Some(PSK), None, Reason::Ok),
            ("carol", Some(carols_token.as_str()), None, Reason::Ok),
            ("carol", Some(users_token.as_str()), None, Reason::BadToken),
            ("dev", Some("nope"), Some(pem.as_str()), Reason::BadPsk),
            ("dev", Some(users_token.as_str()), None, Reason::BadToken),
            ("dev", None, Some(other_pem.as_str()), Reason::CertMismatch),
            ("dev", None, Some("junk"), Reason::BadCert),
            ("off", Some(PSK), None, Reason::Disabled),
            ("off", Some("nope"), None, Reason::Disabled),
            ("ghost", Some(PSK), None, Reason::Unknown),
            ("ghost", None, Some(pem.as_str()), Reason::Unknown),
            ("ghost", Some(token.as_str()), None, Reason::BadToken),
            ("alice", Some(users_token.as_str()), None, Reason::Ok),
            (
                "alice",
                Some(users_token.as_str()),
                Some(pem.as_str()),
                Reason::Unknown,
            ),
        ];
        for (id, psk, cert, want) in cases {
            assert_eq!(f.reason(id, psk, cert).await, want, "{id} {psk:?}");
        }
    }

    #[tokio::test]
    async fn a_locked_id_is_refused_unchecked_and_success_clears_a_streak() {
        let mut f = Fixture::new();
        f.0.lockout = Lockout::new(LockoutPolicy {
            failures: 2,
            base: Duration::from_secs(60),
            ..LockoutPolicy::default()
        });
        f.put("dev", Some(PSK), None, false).await;
        assert_eq!(f.call("dev", "nope").await, Some(Value::Bool(false)));
        assert_eq!(f.call("dev", PSK).await, Some(Value::Bool(true)));
        f.call("dev", "nope").await;
        assert!(
            !f.0.lockout.is_locked("dev", Instant::now()),
            "the success cleared the first failure"
        );
        f.call("dev", "nope").await;
        assert!(f.0.lockout.is_locked("dev", Instant::now()));
        assert_eq!(f.0.metrics.lockouts.load(Relaxed), 1);
        assert_eq!(f.call("dev", PSK).await, Some(Value::Bool(false)));
        // Every answer is counted by result: the last one was refused unchecked.
        let m = &f.0.metrics;
        assert_eq!(
            [SignIn::Ok, SignIn::Refused, SignIn::Locked].map(|r| m.sign_ins(r)),
            [1, 3, 1]
        );
    }

    /// Attempts still being checked count against the threshold: with as many in progress
    /// as the id has left before a lock, the right PSK is refused unchecked.
    #[tokio::test]
    async fn attempts_in_progress_count_against_the_threshold() {
        let mut f = Fixture::new();
        f.0.lockout = Lockout::new(LockoutPolicy {
            failures: 3,
            base: Duration::from_secs(60),
            ..LockoutPolicy::default()
        });
        f.put("dev", Some(PSK), None, false).await;
        assert_eq!(f.call("dev", "nope").await, Some(Value::Bool(false)));
        let now = Instant::now();
        let in_progress: Vec<_> = (0..2)
            .map(|_| f.0.lockout.begin("dev", now).unwrap())
            .collect();
        assert_eq!(
            f.call("dev", PSK).await,
            Some(Value::Bool(false)),
            "refused unchecked"
        );
        // Both fail: the third failure locks, and the right PSK stays refused.
        let locks: Vec<_> = in_progress
            .into_iter()
            .map(|a| a.finish(false, now))
            .collect();
        assert_eq!(locks, [None, Some(Duration::from_secs(60))]);
        assert_eq!(f.call("dev", PSK).await, Some(Value::Bool(false)));
        assert_eq!(
            f.0.metrics.lockouts.load(Relaxed),
            0,
            "counted by Authenticate, not here"
        );
    }

    #[tokio::test]
    async fn a_psk_hashed_under_an_older_key_moves_to_the_newest_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let mut f = Fixture::new();
        f.0.keys = ServerKeys::load_or_create(&path).unwrap();
        f.put("dev", Some(PSK), None, false).await;
        f.put("off", Some(PSK), None, true).await;
        crate::crypto::rotate_key_file(&path).unwrap();
        f.0.keys = ServerKeys::load(&path).unwrap();
        assert_eq!(f.call("dev", "wrong").await, Some(Value::Bool(false)));
        assert_eq!(f.key_of("dev").await, 1, "a failed sign-in changes nothing");
        assert_eq!(f.call("off", PSK).await, Some(Value::Bool(false)));
        assert_eq!(
            f.key_of("off").await,
            1,
            "a disabled entity is not signed in"
        );
        assert_eq!(f.call("dev", PSK).await, Some(Value::Bool(true)));
        assert_eq!(f.key_of("dev").await, 2);
        assert_eq!(f.call("dev", PSK).await, Some(Value::Bool(true)));
        assert_eq!(f.call("dev", "wrong").await, Some(Value::Bool(false)));
        // The record changed between read and write: the swap does nothing.
        let stale = f.0.store.entity("off").await.unwrap().unwrap();
        f.put("off", Some("new psk"), None, false).await;
        let hash = f.0.keys.psk_hash(2, "off", PSK).unwrap();
        let swapped =
            f.0.store
                .replace_psk_hash("off", &stale, PskHash { key_id: 2, hash })
                .await
                .unwrap();
        assert!(!swapped);
    }

    /// Known-vs-unknown timing. Run with
    /// `cargo test --release --lib -- --ignored --nocapture timing`.
    #[tokio::test]
    #[ignore]
    async fn timing_of_known_and_unknown_ids() {
        let f = Fixture::new();
        let pem = cert("dev");
        for n in 0..10_000 {
            f.put(&format!("dev{n:05}"), Some(PSK), Some(&pem), false)
                .await;
        }
        let raw = |id: &str, creds: serde_json::Value| {
            serde_json::value::to_raw_value(&serde_json::json!({"id": id, "credentials": creds}))
                .unwrap()
        };
        let cases = [
            (
                "psk known, wrong",
                raw("dev04242", serde_json::json!({"psk": "a wrong psk value"})),
            ),
            (
                "psk unknown",
                raw("dev94242", serde_json::json!({"psk": "a wrong psk value"})),
            ),
            (
                "psk known, right",
                raw("dev04242", serde_json::json!({"psk": PSK})),
            ),
            (
                "cert known, wrong",
                raw("dev04242", serde_json::json!({"cert": cert("x")})),
            ),
            (
                "cert unknown",
                raw("dev94242", serde_json::json!({"cert": cert("x")})),
            ),
        ];
        const ROUNDS: usize = 20_000;
        let mut samples = vec![Vec::with_capacity(ROUNDS); cases.len()];
        let ctx = f.ctx();
        for _ in 0..ROUNDS {
            // Interleaved, so drift (frequency, caches, other load) hits every case alike.
            for (i, (_, args)) in cases.iter().enumerate() {
                let t = Instant::now();
                let r = authenticate(&ctx, Some(args)).await.unwrap();
                samples[i].push(t.elapsed().as_nanos() as u64);
                black_box(r);
            }
        }
        for ((name, _), s) in cases.iter().zip(&mut samples) {
            s.sort_unstable();
            let mean = s.iter().sum::<u64>() / s.len() as u64;
            println!(
                "{name:>18}: median {:>6} ns  p10 {:>6} ns  p90 {:>6} ns  mean {:>6} ns",
                s[s.len() / 2],
                s[s.len() / 10],
                s[s.len() * 9 / 10],
                mean
            );
        }
    }
}
