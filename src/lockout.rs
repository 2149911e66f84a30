//! The brute-force guard of `Authenticate` (docs/protocol.md#auth-authenticate): consecutive failures lock an id.
//!
//! After `failures` consecutive failed attempts for an id, each further failure locks it for
//! `base · 2^(streak − failures)`, capped at `max`. While locked, every attempt is refused
//! without being checked and does not extend the lock. A success clears the streak; a
//! streak left alone for `forget` is forgotten.
//!
//! Memory is bounded: at most `max_entries` ids are remembered. When the table is full, ids
//! that are not locked go first, least recently failed first (a spray of one-off failures
//! evicts itself, not the locks it is hiding among).
//!
//! A `std::sync::Mutex` and not a Tokio one: nothing awaits while holding it, and each
//! holding is a hash lookup.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The guard's settings (from [`crate::config::Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Consecutive failures that lock an id; 0 turns the guard off.
    pub failures: u32,
    /// The first lock's length; each further one doubles it.
    pub base: Duration,
    /// The longest lock.
    pub max: Duration,
    /// A streak with no failure for this long is forgotten.
    pub forget: Duration,
    /// At most this many ids are remembered.
    pub max_entries: usize,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(15 * 60),
            forget: Duration::from_secs(60 * 60),
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Streak {
    failures: u32,
    last_failure: Instant,
    locked_until: Option<Instant>,
}

impl Streak {
    fn locked_at(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|t| now < t)
    }
}

/// What [`Lockout::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Refuse without checking.
    Locked,
    /// Check; the id has a failure streak (a success must clear it).
    Streak,
    /// Check; nothing remembered about the id.
    Clear,
}

/// Failure streaks by id.
#[derive(Debug)]
pub struct Lockout {
    policy: LockoutPolicy,
    streaks: Mutex<HashMap<String, Streak>>,
}

impl Lockout {
    pub fn new(policy: LockoutPolicy) -> Lockout {
        Lockout {
            policy,
            streaks: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> &LockoutPolicy {
        &self.policy
    }

    fn enabled(&self) -> bool {
        self.policy.failures > 0 && self.policy.max_entries > 0
    }

    fn streaks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Streak>> {
        // The map stays consistent whatever a panicking holder did: keep serving.
        self.streaks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `id` may be checked now.
    pub fn check(&self, id: &str, now: Instant) -> Gate {
        if !self.enabled() {
            return Gate::Clear;
        }
        match self.streaks().get(id) {
            None => Gate::Clear,
            Some(s) if s.locked_at(now) => Gate::Locked,
            Some(_) => Gate::Streak,
        }
    }

    /// A checked attempt for `id` failed. Returns the lock it started, if any.
    pub fn failure(&self, id: &str, now: Instant) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        let p = &self.policy;
        let mut streaks = self.streaks();
        if !streaks.contains_key(id) && streaks.len() >= p.max_entries {
            evict(&mut streaks, p, now);
        }
        let s = streaks.entry(id.to_owned()).or_insert(Streak {
            failures: 0,
            last_failure: now,
            locked_until: None,
        });
        if s.locked_at(now) {
            // Refused attempts are not checked and do not count; a racing check may land here.
            return None;
        }
        if now.saturating_duration_since(s.last_failure) >= p.forget {
            s.failures = 0;
        }
        s.failures = s.failures.saturating_add(1);
        s.last_failure = now;
        if s.failures < p.failures {
            return None;
        }
        let doublings = (s.failures - p.failures).min(31);
        let lock = p.base.saturating_mul(1 << doublings).min(p.max);
        s.locked_until = Some(now + lock);
        Some(lock)
    }

    /// A checked attempt for `id` succeeded: its streak is cleared.
    pub fn success(&self, id: &str) {
        if self.enabled() {
            self.streaks().remove(id);
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.streaks().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frees at least a tenth of a full table: forgotten streaks, then unlocked ids by oldest
/// failure, then (only if the table is all locks) the locks that end soonest.
fn evict(streaks: &mut HashMap<String, Streak>, p: &LockoutPolicy, now: Instant) {
    streaks.retain(|_, s| {
        s.locked_at(now) || now.saturating_duration_since(s.last_failure) < p.forget
    });
    let target = p.max_entries - p.max_entries.div_ceil(10).min(p.max_entries);
    if streaks.len() <= target {
        return;
    }
    let excess = streaks.len() - target;
    // Sort key: unlocked before locked; then the oldest failure / the soonest unlock.
    let mut order: Vec<(bool, Instant, &String)> = streaks
        .iter()
        .map(|(id, s)| match s.locked_until.filter(|&t| now < t) {
            Some(until) => (true, until, id),
            None => (false, s.last_failure, id),
        })
        .collect();
    order.select_nth_unstable_by_key(excess - 1, |&(locked, at, _)| (locked, at));
    let victims: Vec<String> = order[..excess]
        .iter()
        .map(|(_, _, id)| (*id).clone())
        .collect();
    for id in victims {
        streaks.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> LockoutPolicy {
        LockoutPolicy {
            failures: 3,
            base: S,
            max: 8 * S,
            forget: 100 * S,
            max_entries: 10,
        }
    }

    #[test]
    fn locks_after_n_failures_with_doubling_capped_backoff() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        assert_eq!(l.failure("d", t0), None);
        assert_eq!(l.failure("d", t0), None);
        assert_eq!(l.check("d", t0), Gate::Streak);
        assert_eq!(l.failure("d", t0), Some(S));
        assert_eq!(l.check("d", t0), Gate::Locked);
        assert_eq!(l.check("other", t0), Gate::Clear);
        // Each further failure after a lock ends locks again, twice as long, up to the cap.
        let mut t = t0 + S;
        for expected in [2, 4, 8, 8, 8] {
            assert_eq!(l.check("d", t), Gate::Streak);
            assert_eq!(l.failure("d", t), Some(expected * S));
            t += expected * S;
        }
    }

    #[test]
    fn refused_attempts_do_not_extend_the_lock() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        for _ in 0..3 {
            l.failure("d", t0);
        }
        // An attempt that raced past `check` while locked is not counted.
        assert_eq!(l.failure("d", t0 + S / 2), None);
        assert_eq!(l.check("d", t0 + S / 2), Gate::Locked);
        assert_eq!(l.check("d", t0 + S), Gate::Streak);
        // ...so the next lock is the second one: 2 s.
        assert_eq!(l.failure("d", t0 + S), Some(2 * S));
    }

    #[test]
    fn success_resets_and_idle_streaks_are_forgotten() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        l.failure("d", t0);
        l.failure("d", t0);
        l.success("d");
        assert_eq!(l.check("d", t0), Gate::Clear);
        assert_eq!(l.failure("d", t0), None);
        assert_eq!(l.failure("d", t0), None);
        // Long after, the old streak no longer counts.
        let later = t0 + 100 * S;
        assert_eq!(l.failure("d", later), None);
        assert_eq!(l.failure("d", later), None);
        assert_eq!(l.failure("d", later), Some(S));
    }

    #[test]
    fn disabled_guard_never_locks_or_remembers() {
        let l = Lockout::new(LockoutPolicy {
            failures: 0,
            ..policy()
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(l.failure("d", t0), None);
        }
        assert_eq!(l.check("d", t0), Gate::Clear);
        assert!(l.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_locks_outlive_one_off_failures() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        for _ in 0..3 {
            l.failure("victim", t0);
        }
        for n in 0..1000 {
            l.failure(&format!("spray{n}"), t0 + Duration::from_millis(n));
            assert!(l.len() <= 10);
        }
        assert_eq!(l.check("victim", t0), Gate::Locked);
        // The newest spray entry is remembered, the oldest are gone.
        assert_eq!(l.check("spray999", t0), Gate::Streak);
        assert_eq!(l.check("spray0", t0), Gate::Clear);
    }

    #[test]
    fn a_table_full_of_locks_still_takes_new_ids() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        for n in 0..20 {
            for _ in 0..3 {
                l.failure(&format!("d{n}"), t0 + Duration::from_millis(n));
            }
            assert!(l.len() <= 10);
        }
        assert_eq!(l.check("d19", t0 + S / 2), Gate::Locked);
    }
}
