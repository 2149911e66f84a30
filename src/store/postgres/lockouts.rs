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

use std::sync::Arc;
use std::time::Duration;

use super::batch::Fetch;
use super::{rows, Db, Failure, PostgresStore};
use crate::lockout::LockoutPolicy;
use crate::store::records::{EntityRecord, SignInState, StoreError};

/// The entity and guard row of each id of $1 (row `n` for the n-th id).
const SIGN_INS: &str =
    "SELECT k.n, e.kind, e.owner, e.psk_key_id, e.psk_hash, e.cert_sha256, e.disabled, e.created, \
     l.failures, l.last_failure_ms, l.locked_until_ms \
     FROM unnest($1::text[]) WITH ORDINALITY AS k(id, n) \
     LEFT JOIN entities e ON e.id = k.id COLLATE \"C\" \
     LEFT JOIN lockouts l ON l.id = k.id COLLATE \"C\"";

/// Sign-in reads, batched ([`super::batch`]): key (id, now ms).
pub(crate) struct SignIns {
    pub(crate) db: Arc<Db>,
    pub(crate) forget: Duration,
}

impl Fetch for SignIns {
    type Key = (String, u64);
    type Value = (Option<EntityRecord>, SignInState);

    async fn fetch(&self, keys: &[(String, u64)]) -> Result<Vec<Self::Value>, StoreError> {
        let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
        let forget = ms(self.forget);
        let rows = self
            .db
            .run(1, async |c| {
                let stmt = c.prepare_cached(SIGN_INS).await?;
                Ok(c.query(&stmt, &[&ids]).await?)
            })
            .await?;
        let mut out: Vec<Option<Self::Value>> = keys.iter().map(|_| None).collect();
        for row in rows {
            let bad = |e| StoreError::corrupt("entities", e);
            let n = row.try_get::<_, i64>(0).map_err(bad)? as usize;
            let Some(now) = n
                .checked_sub(1)
                .and_then(|i| keys.get(i))
                .map(|k| k.1 as i64)
            else {
                return Err(StoreError::corrupt("entities", "row out of range"));
            };
            let entity = match row.try_get::<_, Option<i16>>(1).map_err(bad)? {
                None => None,
                Some(_) => Some(rows::entity(&row, 1).map_err(Failure::into_error)?),
            };
            let state = match (
                row.try_get::<_, Option<i32>>(8).map_err(bad)?,
                row.try_get::<_, Option<i64>>(9).map_err(bad)?,
                row.try_get::<_, Option<i64>>(10).map_err(bad)?,
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
            out[n - 1] = Some((entity, state));
        }
        out.into_iter()
            .map(|v| v.ok_or_else(|| StoreError::corrupt("entities", "row missing")))
            .collect()
    }
}

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

/// `d` in milliseconds, as the bigint columns hold them.
pub(super) fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl PostgresStore {
    /// The entity `id` and its shared guard state, in one statement (shared with the
    /// sign-ins that come at the same time).
    pub async fn sign_in(
        &self,
        id: &str,
        now_ms: u64,
    ) -> Result<(Option<EntityRecord>, SignInState), StoreError> {
        self.sign_ins.get((id.to_owned(), now_ms)).await
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
