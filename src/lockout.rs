//! The brute-force guard of `Authenticate` (docs/protocol.md#auth-authenticate): consecutive failures lock an id.
//!
//! The guard is used in two calls: [`Lockout::begin`] before an id's credentials are
//! checked (an [`Attempt`], or [`Refused`] unchecked), and [`Attempt::finish`] with the
//! outcome. Both decide under one lock, so what concurrent attempts get is what the same
//! attempts one after the other would get.
//!
//! - After `failures` consecutive failures an id is locked; the n-th failure (n ≥
//!   `failures`) locks it for `base · 2^(n − failures)`, capped at `max`. While locked,
//!   every attempt is refused unchecked and neither counts nor extends the lock.
//! - An attempt in progress counts against the threshold until it finishes: with k
//!   failures, at most `failures − k` attempts (at least one, once a lock has ended) may be
//!   in progress at once; more are refused unchecked. Concurrent guesses therefore never
//!   get more checks than sequential ones.
//! - A success clears the streak, unless a lock is active: then the lock and the streak
//!   stand. A streak with no failure for `forget` is forgotten.
//!
//! Memory is bounded: at most `max_entries` ids are remembered exactly (more only while
//! every one of them has an attempt in progress). When the table is full, a tenth of it is
//! evicted, cheapest first: forgotten streaks, then unlocked ids by fewest failures, oldest
//! failure first, then (only if nothing else is left) the locks that end soonest. Ids with
//! an attempt in progress are never evicted. An evicted streak is not dropped: it is folded
//! into one of `max_entries` shared counters, picked by a hash of the id keyed per process
//! (an attacker cannot aim at one), keeping the larger failure count, the later failure and
//! the later lock end. An id that is not in the table starts from its shared counter.
//!
//! So eviction never lowers any id's count (spraying fresh ids cannot buy a victim a clean
//! streak), and the shared counters are the brake under pressure: while failures keep the
//! table full, evicted streaks pile up in the counters, so an id that is not in the table
//! starts ever closer to its threshold — down to one check before a lock, and then
//! refused while its counter is locked. Ids already in the table are not affected; the
//! price of a flood is paid by new ids (a right credential still signs in while its counter
//! is not locked), never by the ids being attacked.
//!
//! A `std::sync::Mutex` and not a Tokio one: nothing awaits while holding it, and each
//! holding is a hash lookup (an eviction is a pass over the table, once per tenth of it).
//!
//! The API is in product words so that a guard kept in a shared database (several workers)
//! can offer the same two calls.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
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
    /// At most this many ids are remembered exactly (and as many shared counters kept).
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

/// The guard's memory of one id (or, in a shared counter, of the ids folded into it).
#[derive(Debug, Clone, Copy)]
struct Streak {
    /// Consecutive failures finished.
    failures: u32,
    /// Attempts begun and not finished (always 0 in a shared counter).
    pending: u32,
    /// The last failure; for an entry without failures, when it was made.
    last_failure: Instant,
    locked_until: Option<Instant>,
}

impl Streak {
    fn fresh(now: Instant) -> Streak {
        Streak {
            failures: 0,
            pending: 0,
            last_failure: now,
            locked_until: None,
        }
    }

    fn locked_at(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|t| now < t)
    }

    /// No failure for `forget` and no lock: nothing worth remembering.
    fn forgotten_at(&self, now: Instant, forget: Duration) -> bool {
        !self.locked_at(now)
            && (self.failures == 0 || now.saturating_duration_since(self.last_failure) >= forget)
    }

    /// Attempts that may be in progress at once: what is left of the threshold, and at
    /// least one (after a lock ends, one attempt decides whether the next lock starts).
    fn budget(&self, threshold: u32) -> u32 {
        threshold.saturating_sub(self.failures).max(1)
    }

    /// Keeps the worse of both: more failures, the later failure, the later lock end.
    fn fold(&mut self, other: &Streak) {
        self.failures = self.failures.max(other.failures);
        self.last_failure = self.last_failure.max(other.last_failure);
        self.locked_until = self.locked_until.max(other.locked_until);
    }
}

/// [`Lockout::begin`] refused the attempt: answer `false` without checking anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// An attempt let through to be checked. Finish it with the outcome; dropped unfinished
/// (the check itself failed, e.g. a storage error), it counts neither way.
#[must_use = "finish the attempt with its outcome"]
#[derive(Debug)]
pub struct Attempt<'a> {
    guard: &'a Lockout,
    /// `None` when the guard is off or the attempt is finished.
    id: Option<&'a str>,
}

impl Attempt<'_> {
    /// The credentials were checked: `ok` whether they held. Returns the lock a failure
    /// started, if it started one.
    pub fn finish(mut self, ok: bool, now: Instant) -> Option<Duration> {
        let id = self.id.take()?;
        self.guard.finish(id, ok, now)
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.guard.abandon(id);
        }
    }
}

/// Failure streaks by id.
#[derive(Debug)]
pub struct Lockout {
    policy: LockoutPolicy,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    streaks: HashMap<String, Streak>,
    /// Evicted streaks, folded by keyed hash of the id; allocated at the first eviction.
    shared: Vec<Option<Streak>>,
    hasher: RandomState,
    /// When the table was last reported full (a warning at most once a minute).
    warned: Option<Instant>,
}

impl Lockout {
    pub fn new(policy: LockoutPolicy) -> Lockout {
        Lockout {
            policy,
            table: Mutex::new(Table {
                streaks: HashMap::new(),
                shared: Vec::new(),
                hasher: RandomState::new(),
                warned: None,
            }),
        }
    }

    pub fn policy(&self) -> &LockoutPolicy {
        &self.policy
    }

    fn enabled(&self) -> bool {
        self.policy.failures > 0 && self.policy.max_entries > 0
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table stays consistent whatever a panicking holder did: keep serving.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An attempt to sign in as `id` is about to be checked: let it through (it counts
    /// against the threshold until finished), or refuse it unchecked (locked, or as many
    /// attempts in progress as the id has left before a lock).
    pub fn begin<'a>(&'a self, id: &'a str, now: Instant) -> Result<Attempt<'a>, Refused> {
        if !self.enabled() {
            return Ok(Attempt {
                guard: self,
                id: None,
            });
        }
        let p = &self.policy;
        let mut t = self.table();
        if let Some(s) = t.streaks.get_mut(id) {
            if s.locked_at(now) {
                return Err(Refused);
            }
            if s.pending == 0 && s.forgotten_at(now, p.forget) {
                *s = Streak::fresh(now);
            }
            if s.pending >= s.budget(p.failures) {
                return Err(Refused);
            }
            s.pending += 1;
        } else {
            let mut s = t.shared_of(id, now, p.forget).unwrap_or(Streak::fresh(now));
            if s.locked_at(now) {
                return Err(Refused);
            }
            s.pending = 1;
            if t.streaks.len() >= p.max_entries {
                t.evict(p, now);
            }
            t.streaks.insert(id.to_owned(), s);
        }
        Ok(Attempt {
            guard: self,
            id: Some(id),
        })
    }

    fn finish(&self, id: &str, ok: bool, now: Instant) -> Option<Duration> {
        let p = &self.policy;
        let mut t = self.table();
        let Some(s) = t.streaks.get_mut(id) else {
            // Unreachable (an id with an attempt in progress is never evicted); if it were,
            // a failure would still count, a success would clear nothing.
            if ok {
                return None;
            }
            let mut s = t.shared_of(id, now, p.forget).unwrap_or(Streak::fresh(now));
            let lock = count_failure(&mut s, p, now);
            if t.streaks.len() >= p.max_entries {
                t.evict(p, now);
            }
            t.streaks.insert(id.to_owned(), s);
            return lock;
        };
        s.pending = s.pending.saturating_sub(1);
        if ok {
            // A success never lifts a lock that is in force (it may have been started by an
            // attempt that finished first).
            if !s.locked_at(now) {
                s.failures = 0;
                s.locked_until = None;
            }
            if s.pending == 0 && s.failures == 0 && s.locked_until.is_none() {
                t.streaks.remove(id);
            }
            return None;
        }
        count_failure(s, p, now)
    }

    /// The attempt was not decided either way: it no longer counts against the threshold.
    fn abandon(&self, id: &str) {
        let mut t = self.table();
        if let Some(s) = t.streaks.get_mut(id) {
            s.pending = s.pending.saturating_sub(1);
            if s.pending == 0 && s.failures == 0 && s.locked_until.is_none() {
                t.streaks.remove(id);
            }
        }
    }

    /// Whether an attempt for `id` would now be refused because of a lock.
    #[cfg(test)]
    pub(crate) fn is_locked(&self, id: &str, now: Instant) -> bool {
        let mut t = self.table();
        match t.streaks.get(id) {
            Some(s) => s.locked_at(now),
            None => t
                .shared_of(id, now, self.policy.forget)
                .is_some_and(|s| s.locked_at(now)),
        }
    }

    /// Ids remembered exactly now.
    pub fn len(&self) -> usize {
        self.table().streaks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts a checked failure on `s`; returns the lock it starts, if any. A failure that
/// finishes while a lock is in force (it was let through before the lock) counts but does
/// not extend the lock.
fn count_failure(s: &mut Streak, p: &LockoutPolicy, now: Instant) -> Option<Duration> {
    if s.failures > 0 && !s.locked_at(now) && s.forgotten_at(now, p.forget) {
        s.failures = 0;
        s.locked_until = None;
    }
    s.failures = s.failures.saturating_add(1);
    s.last_failure = now;
    if s.locked_at(now) || s.failures < p.failures {
        return None;
    }
    let doublings = (s.failures - p.failures).min(31);
    let lock = p.base.saturating_mul(1 << doublings).min(p.max);
    s.locked_until = Some(now + lock);
    Some(lock)
}

impl Table {
    fn shared_slot(&self, id: &str) -> Option<usize> {
        if self.shared.is_empty() {
            return None;
        }
        Some((self.hasher.hash_one(id) % self.shared.len() as u64) as usize)
    }

    /// The shared counter of `id`, unless it holds nothing worth remembering.
    fn shared_of(&mut self, id: &str, now: Instant, forget: Duration) -> Option<Streak> {
        let slot = self.shared_slot(id)?;
        let s = self.shared[slot]?;
        if s.forgotten_at(now, forget) {
            self.shared[slot] = None;
            return None;
        }
        Some(Streak { pending: 0, ..s })
    }

    /// Frees at least a tenth of a full table: forgotten streaks go; then the cheapest
    /// (unlocked before locked; fewest failures, oldest failure first; locks ending
    /// soonest) are folded into their shared counters. Ids with an attempt in progress stay.
    fn evict(&mut self, p: &LockoutPolicy, now: Instant) {
        self.streaks
            .retain(|_, s| s.pending > 0 || !s.forgotten_at(now, p.forget));
        let target = p.max_entries - p.max_entries.div_ceil(10).min(p.max_entries);
        if self.streaks.len() <= target {
            return;
        }
        let mut order: Vec<((bool, u32, Instant), &String)> = self
            .streaks
            .iter()
            .filter(|(_, s)| s.pending == 0)
            .map(|(id, s)| match s.locked_until.filter(|&t| now < t) {
                Some(until) => ((true, 0, until), id),
                None => ((false, s.failures, s.last_failure), id),
            })
            .collect();
        let excess = (self.streaks.len() - target).min(order.len());
        if excess == 0 {
            return;
        }
        order.select_nth_unstable_by_key(excess - 1, |&(key, _)| key);
        let victims: Vec<String> = order[..excess]
            .iter()
            .map(|(_, id)| (*id).clone())
            .collect();
        if self.shared.is_empty() {
            self.shared = vec![None; p.max_entries];
        }
        for id in victims {
            let Some(s) = self.streaks.remove(&id) else {
                continue;
            };
            let Some(slot) = self.shared_slot(&id) else {
                continue;
            };
            match &mut self.shared[slot] {
                Some(folded) if !folded.forgotten_at(now, p.forget) => folded.fold(&s),
                empty => *empty = Some(Streak { pending: 0, ..s }),
            }
        }
        if self
            .warned
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(60))
        {
            self.warned = Some(now);
            tracing::warn!(
                max_entries = p.max_entries,
                evicted = excess,
                "brute-force guard table full: the streaks with the fewest failures were folded into shared counters (lockout_max_entries)"
            );
        }
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

    /// One attempt, begun and finished at `now`: `Err` if refused, else the lock started.
    fn attempt(l: &Lockout, id: &str, ok: bool, now: Instant) -> Result<Option<Duration>, Refused> {
        Ok(l.begin(id, now)?.finish(ok, now))
    }

    fn fail(l: &Lockout, id: &str, now: Instant) -> Result<Option<Duration>, Refused> {
        attempt(l, id, false, now)
    }

    fn failures(l: &Lockout, id: &str) -> Option<u32> {
        l.table().streaks.get(id).map(|s| s.failures)
    }

    #[test]
    fn locks_after_n_failures_with_doubling_capped_backoff() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        assert_eq!(fail(&l, "d", t0), Ok(None));
        assert_eq!(fail(&l, "d", t0), Ok(None));
        assert!(!l.is_locked("d", t0));
        assert_eq!(fail(&l, "d", t0), Ok(Some(S)));
        assert!(l.is_locked("d", t0));
        assert!(!l.is_locked("other", t0));
        // Each further failure after a lock ends locks again, twice as long, up to the cap.
        let mut t = t0 + S;
        for expected in [2, 4, 8, 8, 8] {
            assert!(!l.is_locked("d", t));
            assert_eq!(fail(&l, "d", t), Ok(Some(expected * S)));
            t += expected * S;
        }
    }

    #[test]
    fn refused_attempts_do_not_count_or_extend_the_lock() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&l, "d", t0).unwrap();
        }
        for _ in 0..5 {
            assert_eq!(fail(&l, "d", t0 + S / 2), Err(Refused));
            assert_eq!(attempt(&l, "d", true, t0 + S / 2), Err(Refused));
        }
        assert_eq!(failures(&l, "d"), Some(3));
        assert!(!l.is_locked("d", t0 + S));
        // ...so the next lock is the second one: 2 s.
        assert_eq!(fail(&l, "d", t0 + S), Ok(Some(2 * S)));
    }

    #[test]
    fn success_resets_and_idle_streaks_are_forgotten() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        fail(&l, "d", t0).unwrap();
        fail(&l, "d", t0).unwrap();
        assert_eq!(attempt(&l, "d", true, t0), Ok(None));
        assert_eq!(failures(&l, "d"), None, "a cleared id is not remembered");
        assert_eq!(fail(&l, "d", t0), Ok(None));
        assert_eq!(fail(&l, "d", t0), Ok(None));
        // Long after, the old streak no longer counts.
        let later = t0 + 100 * S;
        assert_eq!(fail(&l, "d", later), Ok(None));
        assert_eq!(fail(&l, "d", later), Ok(None));
        assert_eq!(fail(&l, "d", later), Ok(Some(S)));
    }

    #[test]
    fn disabled_guard_never_locks_or_remembers() {
        let l = Lockout::new(LockoutPolicy {
            failures: 0,
            ..policy()
        });
        let t0 = Instant::now();
        let held: Vec<_> = (0..100).map(|_| l.begin("d", t0).unwrap()).collect();
        for a in held {
            assert_eq!(a.finish(false, t0), None);
        }
        assert!(!l.is_locked("d", t0));
        assert!(l.is_empty());
    }

    /// The race of the security review: attempts that begin before any of them finishes
    /// used to all pass the check. Now an attempt in progress counts: of 64 concurrent
    /// guesses only `failures` are checked, and the right credential arriving with them is
    /// refused.
    #[test]
    fn concurrent_attempts_get_no_more_checks_than_sequential_ones() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        let begun: Vec<_> = (0..64).map(|_| l.begin("d", t0)).collect();
        let right = l.begin("d", t0);
        assert_eq!(right.as_ref().err(), Some(&Refused), "the 65th is refused");
        drop(right);
        let (let_through, refused): (Vec<_>, Vec<_>) = begun.into_iter().partition(Result::is_ok);
        assert_eq!((let_through.len(), refused.len()), (3, 61));
        let locks: Vec<_> = let_through
            .into_iter()
            .map(|a| a.unwrap().finish(false, t0))
            .collect();
        assert_eq!(locks, [None, None, Some(S)]);
        assert_eq!(attempt(&l, "d", true, t0), Err(Refused), "locked");

        // With one failure left before the lock, one attempt at a time.
        let l = Lockout::new(policy());
        fail(&l, "e", t0).unwrap();
        fail(&l, "e", t0).unwrap();
        let a = l.begin("e", t0).unwrap();
        assert_eq!(l.begin("e", t0).err(), Some(Refused));
        assert_eq!(a.finish(true, t0), None);
        assert!(l.begin("e", t0).is_ok(), "free again once it finished");
    }

    /// The same from many threads at once: never more checks than the threshold.
    #[test]
    fn threads_racing_on_one_id_get_at_most_the_threshold() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        let barrier = std::sync::Barrier::new(64);
        let checked = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..64 {
                scope.spawn(|| {
                    barrier.wait();
                    if let Ok(a) = l.begin("d", t0) {
                        checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        std::thread::yield_now();
                        let _ = a.finish(false, t0);
                    }
                });
            }
        });
        assert!(checked.into_inner() <= 3);
        assert!(l.is_locked("d", t0));
    }

    #[test]
    fn a_success_never_clears_a_lock_in_force() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        let right = l.begin("d", t0).unwrap();
        // Another worker sharing the guard (or any other path) locks the id meanwhile.
        {
            let mut t = l.table();
            let s = t.streaks.get_mut("d").unwrap();
            s.failures = 3;
            s.locked_until = Some(t0 + S);
        }
        assert_eq!(right.finish(true, t0 + S / 2), None);
        assert!(l.is_locked("d", t0 + S / 2), "the lock stands");
        assert_eq!(failures(&l, "d"), Some(3), "and so does the streak");
        // Once it has ended, a success clears the streak.
        assert_eq!(attempt(&l, "d", true, t0 + S), Ok(None));
        assert_eq!(failures(&l, "d"), None);
    }

    #[test]
    fn an_abandoned_attempt_counts_neither_way() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        fail(&l, "d", t0).unwrap();
        fail(&l, "d", t0).unwrap();
        drop(l.begin("d", t0).unwrap());
        assert_eq!(failures(&l, "d"), Some(2));
        assert!(l.begin("d", t0).is_ok(), "not left in progress");
        drop(l.begin("fresh", t0 + S));
        assert_eq!(failures(&l, "fresh"), None, "nothing remembered");
    }

    /// The spray of the security review: a victim's streak among a flood of fresh ids.
    #[test]
    fn spraying_fresh_ids_never_resets_a_victims_streak() {
        let l = Lockout::new(LockoutPolicy {
            failures: 5,
            max_entries: 20,
            ..policy()
        });
        let mut t = Instant::now();
        let mut checked = 0;
        for guess in 0..12 {
            t += Duration::from_millis(1);
            if fail(&l, "victim", t).is_ok() {
                checked += 1;
            }
            for n in 0..25 {
                t += Duration::from_millis(1);
                let _ = fail(&l, &format!("spray-{guess}-{n}"), t);
                assert!(l.len() <= 20);
            }
        }
        // At most five guesses were checked (fewer if its shared counter held sprayed
        // failures), and the right credential is refused.
        assert!((1..=5).contains(&checked), "{checked} guesses checked");
        assert!(l.is_locked("victim", t));
        assert_eq!(attempt(&l, "victim", true, t), Err(Refused));
    }

    #[test]
    fn eviction_prefers_fewest_failures_and_keeps_locks_and_attempts_in_progress() {
        let l = Lockout::new(LockoutPolicy {
            failures: 5,
            max_entries: 100,
            ..policy()
        });
        let t0 = Instant::now();
        // An old streak of two, a lock, an attempt in progress, then a flood of one-offs.
        fail(&l, "two", t0).unwrap();
        fail(&l, "two", t0).unwrap();
        for _ in 0..5 {
            fail(&l, "locked", t0).unwrap();
        }
        let in_progress = l.begin("pending", t0).unwrap();
        // Six evictions of ten: one-failure entries remain throughout (sprays that start from
        // a shared counter may have two).
        for n in 0..150 {
            fail(&l, &format!("spray{n}"), t0 + Duration::from_millis(n)).unwrap();
            assert!(l.len() <= 100);
        }
        assert_eq!(failures(&l, "two"), Some(2));
        assert!(l.is_locked("locked", t0));
        assert_eq!(failures(&l, "pending"), Some(0));
        assert_eq!(in_progress.finish(false, t0), None);
        assert_eq!(failures(&l, "pending"), Some(1));
        // The newest spray entry is remembered exactly, the oldest folded away.
        assert!(failures(&l, "spray149").is_some());
        assert_eq!(failures(&l, "spray0"), None);
    }

    #[test]
    fn an_evicted_streak_lives_on_in_its_shared_counter() {
        let l = Lockout::new(LockoutPolicy {
            failures: 5,
            ..policy()
        });
        let t0 = Instant::now();
        for _ in 0..4 {
            fail(&l, "victim", t0).unwrap();
        }
        // Fill the table with streaks of four, newer than the victim's: it is evicted.
        let mut t = t0;
        for n in 0..20 {
            t += Duration::from_millis(1);
            for _ in 0..4 {
                let _ = fail(&l, &format!("other{n}"), t);
            }
        }
        assert_eq!(failures(&l, "victim"), None, "evicted");
        // It starts again from its counter: one more failure locks it (or the counter is
        // locked already by another id folded into it).
        let next = fail(&l, "victim", t);
        assert!(matches!(next, Ok(Some(_)) | Err(Refused)), "{next:?}");
        assert_eq!(attempt(&l, "victim", true, t), Err(Refused));
    }

    #[test]
    fn a_table_full_of_locks_still_takes_new_ids_and_keeps_the_locks() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        for n in 0..20 {
            for _ in 0..3 {
                let _ = fail(&l, &format!("d{n}"), t0 + Duration::from_millis(n));
            }
            assert!(l.len() <= 10);
        }
        for n in 0..20 {
            assert!(l.is_locked(&format!("d{n}"), t0 + S / 2), "d{n}");
        }
        // Locks folded into shared counters end like the others.
        for n in 0..20 {
            assert!(!l.is_locked(&format!("d{n}"), t0 + 2 * S), "d{n}");
        }
    }

    #[test]
    fn shared_counters_forget_too() {
        let l = Lockout::new(policy());
        let t0 = Instant::now();
        for n in 0..20 {
            let _ = fail(&l, &format!("d{n}"), t0);
            let _ = fail(&l, &format!("d{n}"), t0);
        }
        let later = t0 + 100 * S;
        for n in 0..20 {
            let id = format!("d{n}");
            assert!(l.table().shared_of(&id, later, S * 100).is_none(), "{id}");
        }
        for n in [0, 19] {
            let id = format!("d{n}");
            assert_eq!(fail(&l, &id, later), Ok(None), "{id}");
            assert_eq!(failures(&l, &id), Some(1), "{id} starts over");
        }
    }
}
