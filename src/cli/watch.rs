//! `authd watch`: follow the change events (docs/protocol.md#following-events), printing
//! each one once, as one JSON line on stdout, strictly in `seq` order. It is what a relay
//! author runs first, and the example a consumer copies. The algorithm:
//!
//! 1. **Subscribe first** to the events topic (`{id}/events`, QoS 1), and wait until the
//!    broker granted it. From then on every event committed is either delivered live or
//!    already in the store, so nothing falls between the two.
//! 2. **Learn where to start**: `--after N`, or else the head, from `Events.Since {}` (no
//!    `after`: `{"events": [], "head": H}`).
//! 3. **Catch up**: call `Events.Since {after: last, limit}` and handle its events in
//!    order, until `last >= head`. Live events that arrive meanwhile wait (here in the
//!    client's channel).
//! 4. **Live events** ([`Follower::live`]): `seq <= last` is a duplicate (an event may be
//!    published more than once, and a late copy may come after newer ones): drop it.
//!    `seq == last + 1`: handle it. `seq > last + 1`: some were missed (published while we
//!    were not subscribed): keep it, and catch up (3) first; events the catch-up brings
//!    are then handled once, the kept ones that it covered are dropped as duplicates.
//! 5. **After every reconnect** to the broker (it restarted, the network failed), once the
//!    subscription is granted again, catch up (3) from `last` before handling live events:
//!    events published while we were away are not queued for us, and if no later one
//!    comes, no gap would show.
//! 6. **On 410** from `Events.Since`, the events after `last` are no longer retained (or the
//!    worker's store is not the one we followed): no catch-up can fill the gap. Resynchronise
//!    in full (whatever the consumer derived from events, rebuild it from a full read), then
//!    follow from the head. `authd watch` says so on stderr and exits with status 3.
//!
//! A consumer that acts on events (a relay dropping sessions) keeps `last` where it keeps
//! its own state, updated only after acting, and passes it as `--after` when it starts again.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Connection, Failure};
use crate::client::{CallError, Client};
use crate::frame::ErrorCode;
use crate::mqtt::{Backoff, BrokerState};

/// How often a catch-up is tried again when a live event is ahead of the store's head (a
/// worker that has not yet seen the commit, with several workers), before concluding that
/// the topic carries another store's events.
const AHEAD_OF_HEAD_TRIES: u32 = 5;

#[derive(Args)]
pub struct WatchArgs {
    /// Follow on after this seq (the last one handled). Default: from the current head,
    /// printing only events committed from now on.
    #[arg(long, value_name = "SEQ")]
    after: Option<u64>,
    /// The events topic [default: `{id}/events`].
    #[arg(long)]
    topic: Option<String>,
    /// Events per Events.Since call while catching up (1 to 1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Exit (status 0) after printing this many events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    #[command(flatten)]
    connection: Connection,
}

/// Follows until `--count` events were printed, stdout is closed, or a failure.
pub(super) async fn run(args: WatchArgs) -> Result<(), Failure> {
    let topic = args
        .topic
        .unwrap_or_else(|| format!("{}/events", args.connection.service_id));
    let (mut options, timeout) = args.connection.client_options()?;
    options.subscriptions = vec![topic.clone()];
    let client = Client::connect(options, timeout)
        .await
        .map_err(Failure::unable)?;
    let mut watcher = Watcher {
        client,
        topic,
        timeout,
        limit: args.limit,
        left: args.count,
    };
    let result = watcher.follow(args.after).await;
    watcher.client.close().await;
    match result {
        Ok(()) | Err(Stop::Done) => Ok(()),
        Err(Stop::Failed(failure)) => Err(failure),
    }
}

/// One change event: its `seq`, and the whole object as received (printed compact, with
/// its keys sorted, whether it came live or from a catch-up).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub object: Value,
}

impl Event {
    /// An event object; the error says what is wrong with it.
    pub fn new(object: Value) -> Result<Event, String> {
        match object.get("seq").and_then(Value::as_u64) {
            Some(seq) if seq > 0 => Ok(Event { seq, object }),
            _ => {
                let text = object.to_string();
                // Enough to recognise it; a stray message may be large.
                let end = text.char_indices().nth(100).map_or(text.len(), |(i, _)| i);
                Err(format!(
                    "an event needs `seq`, a positive integer: {}",
                    &text[..end]
                ))
            }
        }
    }
}

/// The ordering and duplicate logic of a consumer, with no I/O: feed it live events and
/// catch-up pages, print what it hands back, in that order.
#[derive(Debug, Default)]
pub struct Follower {
    /// The last seq handed out (or the one to follow on from).
    last: u64,
    /// Live events beyond a gap, by seq, waiting for a catch-up.
    buffered: BTreeMap<u64, Event>,
}

impl Follower {
    /// Follows on after `last`.
    pub fn new(last: u64) -> Follower {
        Follower {
            last,
            buffered: BTreeMap::new(),
        }
    }

    /// The last seq handed out: where a catch-up (or the next run) follows on from.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether a live event waits beyond a gap: catch up before anything else.
    pub fn behind(&self) -> bool {
        !self.buffered.is_empty()
    }

    /// The first live event waiting beyond a gap, if any.
    pub fn first_buffered(&self) -> Option<u64> {
        self.buffered.keys().next().copied()
    }

    /// A live event: the events to handle now, in order (none for a duplicate or one
    /// beyond a gap, which is kept until a catch-up fills the gap).
    pub fn live(&mut self, event: Event) -> Vec<Event> {
        if event.seq > self.last {
            self.buffered.entry(event.seq).or_insert(event);
        }
        self.drain()
    }

    /// A page of `Events.Since {after: last()}`: the events to handle now, in order. The
    /// page is the store's word on what exists after `last`, so it is taken as it comes
    /// (but for what is not after `last`); kept live events it covers are dropped.
    pub fn caught_up(&mut self, page: Vec<Event>) -> Vec<Event> {
        let mut ready = Vec::with_capacity(page.len());
        for event in page {
            if event.seq > self.last {
                self.last = event.seq;
                ready.push(event);
            }
        }
        self.buffered = self.buffered.split_off(&(self.last + 1));
        ready.extend(self.drain());
        ready
    }

    /// The kept events that now follow `last` without a gap.
    fn drain(&mut self) -> Vec<Event> {
        let mut ready = Vec::new();
        while let Some(event) = self.buffered.remove(&(self.last + 1)) {
            self.last = event.seq;
            ready.push(event);
        }
        // Anything at or below `last` is a duplicate of what was handed out.
        self.buffered = self.buffered.split_off(&(self.last + 1));
        ready
    }
}

/// Why following stopped.
enum Stop {
    /// `--count` events printed, or nobody reads stdout any more: exit 0.
    Done,
    Failed(Failure),
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Stop {
        Stop::Failed(failure)
    }
}

/// One `Events.Since` answer.
#[derive(Deserialize)]
struct Page {
    events: Vec<Value>,
    head: u64,
}

struct Watcher {
    client: Client,
    topic: String,
    timeout: Duration,
    limit: u32,
    /// Events still to print before exiting (`--count`).
    left: Option<u64>,
}

impl Watcher {
    /// Steps 2 to 6 of the module docs: the client is connected and subscribed (step 1).
    async fn follow(&mut self, after: Option<u64>) -> Result<(), Stop> {
        // Taken before the first call, so that a reconnect during it is not missed.
        let mut broker = self.client.broker_state();
        let mut follower = match after {
            Some(after) => {
                let mut follower = Follower::new(after);
                self.catch_up(&mut follower).await?;
                follower
            }
            None => Follower::new(self.since(None).await?.1),
        };
        // `RUST_LOG=info` shows it: from here on nothing committed is missed.
        tracing::info!(
            topic = self.topic,
            after = follower.last(),
            "following the change events"
        );
        loop {
            tokio::select! {
                // A reconnect is dealt with before any live event that came after it.
                biased;
                changed = broker.changed() => {
                    if changed.is_err() {
                        return Err(closed());
                    }
                    // Down, or Ready again: once the subscription is granted again (every
                    // state change since Ready went through Down), catch up.
                    if *broker.borrow_and_update() == BrokerState::Ready {
                        self.catch_up(&mut follower).await?;
                    }
                }
                message = self.client.next_message() => {
                    let Some((_topic, payload)) = message else {
                        return Err(closed());
                    };
                    let event = serde_json::from_slice(&payload)
                        .map_err(|e| e.to_string())
                        .and_then(Event::new);
                    match event {
                        Ok(event) => {
                            let ready = follower.live(event);
                            self.print(ready)?;
                            if follower.behind() {
                                self.catch_up(&mut follower).await?;
                            }
                        }
                        // Not from authd (someone else may publish on the topic): skip it.
                        Err(e) => tracing::warn!("skipping a message on the events topic: {e}"),
                    }
                }
            }
        }
    }

    /// Step 3: pages of `Events.Since` from `follower.last()` until the head.
    async fn catch_up(&mut self, follower: &mut Follower) -> Result<(), Stop> {
        let mut ahead = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ahead_tries = 0;
        loop {
            let after = follower.last();
            let (events, head) = self.since(Some(after)).await?;
            let ready = follower.caught_up(events);
            self.print(ready)?;
            if follower.last() < head {
                if follower.last() == after {
                    // Would ask the same again for ever.
                    return Err(Failure::Unable(format!(
                        "Events.Since {{after: {after}}} answered no event after it, but head {head}"
                    ))
                    .into());
                }
                continue;
            }
            let Some(first) = follower.first_buffered() else {
                return Ok(());
            };
            // A live event beyond the head: the worker that answered may not see its commit
            // yet; past a few tries, the events are not this store's.
            ahead_tries += 1;
            if ahead_tries >= AHEAD_OF_HEAD_TRIES {
                return Err(Failure::Resync(format!(
                    "a live event has seq {first}, beyond the store's head {head}: the events topic carries another store's events, or the store changed; resynchronise in full, then watch from the head"
                ))
                .into());
            }
            tokio::time::sleep(ahead.next_delay()).await;
        }
    }

    /// `Events.Since`, asked again (after a pause) while no answer comes: the worker or the
    /// broker may be restarting. Returns the page's events and head.
    async fn since(&self, after: Option<u64>) -> Result<(Vec<Event>, u64), Stop> {
        let args = match after {
            Some(after) => json!({"after": after, "limit": self.limit}),
            None => json!({}),
        };
        let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let response = loop {
            match self
                .client
                .call("/v1/Events.Since", args.clone(), self.timeout)
                .await
            {
                Ok(response) => break response,
                Err(CallError::Timeout(_)) => {
                    let delay = pause.next_delay();
                    tracing::warn!(
                        "Events.Since: no response within {:?} (is the worker running, the broker up?); asking again in {delay:?}",
                        self.timeout
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(Failure::unable(e).into()),
            }
        };
        if let Some(e) = response.error {
            return Err(if e.code == ErrorCode::Gone.number() {
                Failure::Resync(format!(
                    "events after {} are no longer retained (or the store changed): resynchronise in full, then watch from the head",
                    after.unwrap_or(0)
                ))
            } else {
                Failure::Refused(format!("Events.Since: {} {}", e.code, e.message))
            }
            .into());
        }
        let page: Page = serde_json::from_value(response.result.unwrap_or_default())
            .map_err(|e| Failure::Unable(format!("Events.Since: not a page of events ({e})")))?;
        let events = page
            .events
            .into_iter()
            .map(Event::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Failure::Unable(format!("Events.Since: {e}")))?;
        Ok((events, page.head))
    }

    /// Prints each event as one line and flushes it at once (a pipe reader sees it now).
    fn print(&mut self, events: Vec<Event>) -> Result<(), Stop> {
        let mut out = std::io::stdout().lock();
        for event in events {
            let written = serde_json::to_writer(&mut out, &event.object)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush());
            match written {
                Ok(()) => {}
                // `authd watch | head -3`: nobody reads any more, so nothing more to do.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(Stop::Done),
                Err(e) => return Err(Failure::Unable(format!("standard output: {e}")).into()),
            }
            if let Some(left) = &mut self.left {
                *left -= 1;
                if *left == 0 {
                    return Err(Stop::Done);
                }
            }
        }
        Ok(())
    }
}

fn closed() -> Stop {
    Failure::Unable("the broker connection closed".into()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> Event {
        Event::new(json!({"v": 1, "seq": seq, "type": "rule.deleted"})).unwrap()
    }

    fn seqs(events: Vec<Event>) -> Vec<u64> {
        events.into_iter().map(|e| e.seq).collect()
    }

    #[test]
    fn live_events_in_order_are_handed_out_and_duplicates_dropped() {
        let mut f = Follower::new(4);
        assert_eq!(seqs(f.live(ev(5))), [5]);
        assert_eq!(seqs(f.live(ev(6))), [6]);
        // A redelivery, and a late copy after newer ones.
        assert_eq!(seqs(f.live(ev(6))), Vec::<u64>::new());
        assert_eq!(seqs(f.live(ev(3))), Vec::<u64>::new());
        assert_eq!(f.last(), 6);
        assert!(!f.behind());
    }

    #[test]
    fn a_gap_is_kept_until_a_catch_up_fills_it() {
        let mut f = Follower::new(4);
        assert_eq!(seqs(f.live(ev(7))), Vec::<u64>::new());
        assert!(f.behind(), "7 after 4: catch up");
        assert_eq!(f.first_buffered(), Some(7));
        // More live events while catching up wait too.
        assert_eq!(seqs(f.live(ev(8))), Vec::<u64>::new());
        // The catch-up brings 5 and 6: 7 and 8, kept, follow without a gap.
        assert_eq!(seqs(f.caught_up(vec![ev(5), ev(6)])), [5, 6, 7, 8]);
        assert_eq!(f.last(), 8);
        assert!(!f.behind());
    }

    #[test]
    fn a_catch_up_that_covers_kept_events_hands_each_out_once() {
        let mut f = Follower::new(4);
        f.live(ev(6));
        f.live(ev(8));
        // The page has them all (the usual case: the head is past the kept ones).
        assert_eq!(
            seqs(f.caught_up((5..=9).map(ev).collect())),
            [5, 6, 7, 8, 9]
        );
        assert!(!f.behind());
        // Later copies of any of them are duplicates.
        for seq in 5..=9 {
            assert!(f.live(ev(seq)).is_empty());
        }
        assert_eq!(seqs(f.live(ev(10))), [10]);
    }

    #[test]
    fn a_live_event_filling_a_gap_releases_the_kept_ones() {
        let mut f = Follower::new(0);
        assert!(f.live(ev(2)).is_empty());
        assert!(f.live(ev(3)).is_empty());
        assert_eq!(seqs(f.live(ev(1))), [1, 2, 3]);
        assert!(!f.behind());
    }

    #[test]
    fn a_catch_up_page_skips_what_is_not_after_last() {
        let mut f = Follower::new(5);
        assert_eq!(seqs(f.caught_up(vec![ev(4), ev(5), ev(6)])), [6]);
        assert_eq!(seqs(f.caught_up(vec![])), Vec::<u64>::new());
        assert_eq!(f.last(), 6);
    }

    #[test]
    fn a_live_event_beyond_the_head_stays_kept() {
        // The page ends at the head (6) but 9 came live: still behind, the caller decides.
        let mut f = Follower::new(4);
        f.live(ev(9));
        assert_eq!(seqs(f.caught_up(vec![ev(5), ev(6)])), [5, 6]);
        assert!(f.behind());
        assert_eq!(f.first_buffered(), Some(9));
    }

    #[test]
    fn an_event_needs_a_positive_seq() {
        assert!(Event::new(json!({"seq": 0})).is_err());
        assert!(Event::new(json!({"seq": "1"})).is_err());
        assert!(Event::new(json!([1])).is_err());
        let e = Event::new(json!({"seq": 3, "type": "token.revoked"})).unwrap();
        assert_eq!(e.seq, 3);
        assert_eq!(e.object["type"], "token.revoked");
    }
}
