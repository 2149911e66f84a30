//! Counters for what the worker did: requests by method and outcome, frames dropped by
//! reason. Lock-free, cheap on the hot path; read by logs and tests.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::frame::DropReason;

#[derive(Debug, Default)]
pub struct Metrics {
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// QoS 0 frames refused because `max_in_flight` requests were already being worked on.
    pub overloaded: AtomicU64,
    pub answered_ok: AtomicU64,
    pub answered_error: AtomicU64,
    /// Redelivered state-changing requests answered from their replay record.
    pub replayed: AtomicU64,
    pub reconnects: AtomicU64,
    /// Requests refused with 429: the caller was over its rate limit.
    pub rate_limited: AtomicU64,
}

impl Metrics {
    /// Counts a dropped frame; returns the new count for that reason.
    pub fn drop_frame(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].fetch_add(1, Relaxed) + 1
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Relaxed)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|c| c.load(Relaxed)).sum()
    }
}
