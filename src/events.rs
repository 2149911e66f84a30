//! The change events' publisher (docs/protocol.md#change-events): the other half of the
//! transactional outbox. Each change writes its events in its own transaction
//! (`crate::store::events`); this task publishes them after the commit, in `seq` order,
//! and marks them sent once the broker acknowledged each (a PUBACK, through
//! [`crate::mqtt::Outbox`]).
//!
//! One worker publishes a store's events at a time: the one holding the store's
//! [`EventLease`] (the embedded store: this worker; PostgreSQL: whichever worker holds the
//! publishers' lock). It hands at most [`WINDOW`] events to the connection before their
//! receipts come back, and moves the store's `sent` mark over every event acknowledged
//! together with all before it. A worker killed between a commit and the PUBACK leaves the
//! event unsent: the next publisher (this worker restarted, or another) sends it. So an
//! event is published at least once; a consumer recognises a repeat by its `seq`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::metrics::Metrics;
use crate::mqtt::{Outbox, Receipt};
use crate::store::{EventLease, Store, StoreError};

/// Events handed to the connection and not yet acknowledged, at most.
pub const WINDOW: usize = 64;

/// How often the publisher looks for events other workers of a shared store committed
/// (its own commits wake it at once).
const POLL: Duration = Duration::from_millis(50);

/// How long the store's `sent` mark may lag behind the acknowledged events (or [`WINDOW`]
/// events, whichever comes first): one write for many events. A crash loses at most that
/// much of the mark, and those events are published again.
const MARK_EVERY: Duration = Duration::from_millis(200);

/// Publishes the store's events while this worker holds the lease, until the task is
/// dropped.
pub async fn publish(
    store: Store,
    outbox: Outbox,
    mut receipts: UnboundedReceiver<Receipt>,
    metrics: Arc<Metrics>,
) {
    loop {
        match store.lead_events().await {
            Ok(mut lease) => {
                if let Err(e) = serve(&mut lease, &outbox, &mut receipts, &metrics).await {
                    tracing::warn!(error = %e, "publishing change events stopped; taking it up again");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot take up publishing change events"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Publishes from the lease's `sent` mark on, until the lease fails.
async fn serve(
    lease: &mut EventLease,
    outbox: &Outbox,
    receipts: &mut UnboundedReceiver<Receipt>,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    // Receipts of an earlier lease say nothing about this one.
    while receipts.try_recv().is_ok() {}
    let mut sent = lease.sent().await?;
    let mut marked = sent;
    let mut mark_at: Option<tokio::time::Instant> = None;
    // Handed over, in order, and which of those the broker acknowledged.
    let mut unacked: VecDeque<u64> = VecDeque::new();
    let mut acked: HashSet<u64> = HashSet::new();
    // Events may be waiting in the store: at first, after a wake-up that says so, and
    // while each look fills the window. A receipt alone does not send the publisher to
    // the store.
    let mut look = true;
    loop {
        let room = WINDOW - unacked.len();
        if look && room > 0 {
            let last = unacked.back().copied().unwrap_or(sent);
            let events = lease.after(last, room).await?;
            look = events.len() == room;
            for event in events {
                #[cfg(feature = "fault-injection")]
                fault_kill_before_publish();
                if outbox.send(event.seq, event.json).is_err() {
                    // The connection is gone for good (the worker is stopping).
                    return Ok(());
                }
                unacked.push_back(event.seq);
            }
        }
        if sent > marked {
            let due = *mark_at.get_or_insert_with(|| tokio::time::Instant::now() + MARK_EVERY);
            if sent - marked >= WINDOW as u64 || tokio::time::Instant::now() >= due {
                lease.mark_sent(sent).await?;
                (marked, mark_at) = (sent, None);
            }
        }
        // Receipts are taken as they come only when the window is full: otherwise at the
        // next wake-up for new events, or within MARK_EVERY, so that a busy store does not
        // wake the publisher once per PUBACK.
        let full = unacked.len() == WINDOW;
        let deadline = mark_at
            .or_else(|| (!unacked.is_empty()).then(|| tokio::time::Instant::now() + MARK_EVERY));
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {}
            receipt = receipts.recv(), if full => match receipt {
                Some(receipt) => take(receipt, &mut unacked, &mut acked, &mut look),
                // The connection task is gone: the worker is stopping.
                None => return Ok(()),
            },
            _ = lease.moved(POLL), if !full => look = true,
        }
        loop {
            match receipts.try_recv() {
                Ok(receipt) => take(receipt, &mut unacked, &mut acked, &mut look),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
        while let Some(&seq) = unacked.front() {
            if !acked.remove(&seq) {
                break;
            }
            unacked.pop_front();
            sent = seq;
            metrics.events_published.fetch_add(1, Relaxed);
        }
    }
}

/// Notes one receipt: an acknowledged event, or the loss of every one handed over (they
/// are handed over again, from the store).
fn take(receipt: Receipt, unacked: &mut VecDeque<u64>, acked: &mut HashSet<u64>, look: &mut bool) {
    match receipt {
        Receipt::Acked(seq) => {
            acked.insert(seq);
        }
        Receipt::Lost => {
            unacked.clear();
            acked.clear();
            *look = true;
        }
    }
}

/// With `AUTHD_FAULT_KILL_BEFORE_PUBLISH` set (`fault-injection` builds only: tests of
/// the outbox), the process kills itself with SIGKILL when it has a committed event in
/// hand and before publishing it.
#[cfg(feature = "fault-injection")]
fn fault_kill_before_publish() {
    if std::env::var_os("AUTHD_FAULT_KILL_BEFORE_PUBLISH").is_some() {
        tracing::warn!(
            "fault injection: killed between the commit of an event and its publication"
        );
        // SAFETY: kill(2) on our own process id has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
