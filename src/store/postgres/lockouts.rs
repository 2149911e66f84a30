//! Authenticate's brute-force guard, shared by every worker of the database: each worker
//! keeps its own guard in memory (it bounds concurrent guesses within the worker), and the
//! `lockouts` table counts consecutive failures across all of them, with the same rule:
//! the n-th failure (n ≥ `failures`) locks the id for `base · 2^(n − failures)`, capped at
//! `max`; a failure while locked does not count; a streak idle for `forget` starts over; a
//! success clears an unlocked streak.
//!
//! The read costs nothing extra: Authenticate's one statement reads the entity and its
//! row together ([`SIGN_IN`]). Only a failure (and the first success after failures)
//! writes.

use std::time::Duration;

use super::{rows, Failure, PostgresStore};
use crate::lockout::LockoutPolicy;
use crate::store::records::{EntityRecord, SignInState, StoreError};

const SIGN_IN: &str =
    "SELECT e.kind, e.owner, e.psk_key_id, e.psk_hash, e.cert_sha256, e.disabled, e.created, \
     l.failures, l.last_failure_ms, l.locked_until_ms \
     FROM (VALUES (1)) AS one \
     LEFT JOIN entities e ON e.id = $1 \
     LEFT JOIN lockouts l ON l.id = $1";

/// $1 id, $2 now ms, $3 failures that lock, $4 base ms, $5 max ms, $6 forget ms.
const FAILED: &str = "INSERT INTO lockouts AS l (id, failures, last_failure_ms, locked_until_ms) \
     VALUES ($1::text, 1, $2::bigint, CASE WHEN $3::int <= 1 THEN $2::bigint + LEAST($4::bigint, $5::bigint) ELSE 0 END) \
     ON CONFLICT (id) DO UPDATE SET \
       failures = CASE WHEN l.last_failure_ms + $6::bigint < $2::bigint THEN 1 ELSE l.failures + 1 END, \
       last_failure_ms = $2, \
       locked_until_ms = CASE \
         WHEN (CASE WHEN l.last_failure_ms + $6::bigint < $2::bigint THEN 1 ELSE l.failures + 1 END) >= $3 \
         THEN $2 + LEAST($4::float8 * power(2::float8, LEAST((CASE WHEN l.last_failure_ms + $6::bigint < $2::bigint THEN 1 ELSE l.failures + 1 END) - $3, 60)::float8), $5::float8)::bigint \
         ELSE 0 END \
     WHERE l.locked_until_ms <= $2 \
     RETURNING locked_until_ms";

const SUCCEEDED: &str = "DELETE FROM lockouts WHERE id = $1 AND locked_until_ms <= $2";

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl PostgresStore {
    /// The entity `id` and its shared guard state, in one statement.
    pub async fn sign_in(
        &self,
        id: &str,
        now_ms: u64,
    ) -> Result<(Option<EntityRecord>, SignInState), StoreError> {
        let forget = ms(self.lockout.forget);
        let now = now_ms as i64;
        self.db
            .run(1, async |c| {
                let stmt = c.prepare_cached(SIGN_IN).await?;
                let row = c.query_one(&stmt, &[&id]).await?;
                let entity = match row.try_get::<_, Option<i16>>(0)? {
                    None => None,
                    Some(_) => Some(rows::entity(&row, 0)?),
                };
                let state = match (
                    row.try_get::<_, Option<i32>>(7)?,
                    row.try_get::<_, Option<i64>>(8)?,
                    row.try_get::<_, Option<i64>>(9)?,
                ) {
                    (Some(failures), Some(last), Some(until)) => SignInState {
                        locked: until > now,
                        failures: if last.saturating_add(forget) < now {
                            0
                        } else {
                            failures.max(0) as u32
                        },
                    },
                    _ => SignInState::default(),
                };
                Ok((entity, state))
            })
            .await
    }

    /// Counts a sign-in's outcome in the shared guard: a failure (the lock it starts, if
    /// any), or a success after failures (clears the streak).
    pub async fn count_sign_in(
        &self,
        id: &str,
        ok: bool,
        seen: SignInState,
        now_ms: u64,
    ) -> Result<Option<Duration>, StoreError> {
        let policy: LockoutPolicy = self.lockout;
        if policy.failures == 0 || (ok && seen.failures == 0) {
            return Ok(None);
        }
        let now = now_ms as i64;
        if ok {
            self.db
                .run(1, async |c| {
                    let stmt = c.prepare_cached(SUCCEEDED).await?;
                    c.execute(&stmt, &[&id, &now]).await?;
                    Ok(())
                })
                .await?;
            return Ok(None);
        }
        let threshold = i32::try_from(policy.failures).unwrap_or(i32::MAX);
        let (base, max, forget) = (ms(policy.base), ms(policy.max), ms(policy.forget));
        let until: Option<i64> = self
            .db
            .run(1, async |c| {
                let stmt = c.prepare_cached(FAILED).await?;
                let row = c
                    .query_opt(&stmt, &[&id, &now, &threshold, &base, &max, &forget])
                    .await?;
                row.map(|r| r.try_get::<_, i64>(0))
                    .transpose()
                    .map_err(Failure::from)
            })
            .await?;
        Ok(until
            .filter(|u| *u > now)
            .map(|u| Duration::from_millis((u - now) as u64)))
    }
}
