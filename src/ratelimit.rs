//! Per-caller rate limit (error 429, docs/protocol.md#caller-keys-and-scopes): a token bucket for each caller key name.
//!
//! Off unless `rate_limit_per_sec` is set. Buckets are made once, one per configured key
//! name, so memory is bounded by the configuration, not by traffic; keys that share a name
//! (an old and a new key during a rotation) share a bucket. A std mutex per bucket: it is
//! held for a few arithmetic operations, never across an await.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// `rate_limit_per_sec` and `rate_limit_burst` of the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePolicy {
    /// Sustained requests per second per caller key name; 0 turns the limit off.
    pub per_sec: f64,
    /// Requests a caller may send at once after being idle.
    pub burst: f64,
}

impl RatePolicy {
    pub fn is_off(&self) -> bool {
        self.per_sec <= 0.0
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The buckets of every caller key name.
pub struct RateLimiter {
    policy: RatePolicy,
    buckets: HashMap<String, Mutex<Bucket>>,
}

impl RateLimiter {
    /// One full bucket per name in `names`.
    pub fn new<'a>(policy: RatePolicy, names: impl IntoIterator<Item = &'a str>) -> RateLimiter {
        let now = Instant::now();
        let buckets = if policy.is_off() {
            HashMap::new()
        } else {
            names
                .into_iter()
                .map(|n| {
                    let bucket = Bucket {
                        tokens: policy.burst,
                        last: now,
                    };
                    (n.to_owned(), Mutex::new(bucket))
                })
                .collect()
        };
        RateLimiter { policy, buckets }
    }

    pub fn policy(&self) -> RatePolicy {
        self.policy
    }

    /// Takes one request's worth from `caller`'s bucket; `false` when it is empty (the
    /// caller is over its limit). Always `true` when the limit is off.
    pub fn admit(&self, caller: &str, now: Instant) -> bool {
        if self.policy.is_off() {
            return true;
        }
        // Every caller that got past the key check has a bucket; a name without one would be
        // a bug, and refusing service over it would be worse than not limiting.
        let Some(bucket) = self.buckets.get(caller) else {
            return true;
        };
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.policy.per_sec).min(self.policy.burst);
        b.last = now.max(b.last);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_per_name() {
        let limiter = RateLimiter::new(
            RatePolicy {
                per_sec: 10.0,
                burst: 3.0,
            },
            ["a", "b"],
        );
        let t = Instant::now();
        assert!((0..3).all(|_| limiter.admit("a", t)));
        assert!(!limiter.admit("a", t), "burst used up");
        assert!(limiter.admit("b", t), "another name has its own bucket");
        assert!(!limiter.admit("a", t + Duration::from_millis(50)));
        assert!(
            limiter.admit("a", t + Duration::from_millis(110)),
            "one per 100 ms"
        );
        assert!(!limiter.admit("a", t + Duration::from_millis(120)));
        // Idle for long: back to the burst, not more.
        let later = t + Duration::from_secs(60);
        assert!((0..3).all(|_| limiter.admit("a", later)));
        assert!(!limiter.admit("a", later));
        // A clock read out of order does not mint tokens.
        assert!(!limiter.admit("a", t));
    }

    #[test]
    fn off_admits_everything() {
        let limiter = RateLimiter::new(
            RatePolicy {
                per_sec: 0.0,
                burst: 0.0,
            },
            ["a"],
        );
        let t = Instant::now();
        assert!((0..10_000).all(|_| limiter.admit("a", t)));
    }
}
