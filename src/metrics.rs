//! What the worker did: requests by method and outcome with their latency, frames dropped
//! by reason, QoS 0 overload drops, replays, reconnects, session takeovers, handler panics,
//! sign-in results and lockouts.
//!
//! The hot path only touches atomics in arrays fixed at start (one row per method of the
//! table, plus `other`; one column per outcome): no lock, no allocation, no label lookup.
//! [`Metrics::render`] turns them into the Prometheus text format at scrape time, with the
//! `prometheus` crate's data model and encoder. Served by [`crate::http`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

use crate::frame::{DropReason, ErrorCode};

/// Columns of the `outcome` label: `ok`, each [`ErrorCode`], and `error` for any other code.
const OUTCOMES: usize = ErrorCode::ALL.len() + 2;

/// The `outcome` label of column `i`.
fn outcome_label(i: usize) -> &'static str {
    match i {
        0 => "ok",
        i => ErrorCode::ALL.get(i - 1).map_or("error", |c| c.label()),
    }
}

/// Upper bounds of the latency histogram's buckets, seconds: from a loopback round trip
/// (~0.1 ms) to a request stuck behind a slow disk.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// How an `Auth.Authenticate` ended: the `result` label of `authd_sign_ins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignIn {
    /// Answered `true`.
    Ok,
    /// Answered `false` after checking the credentials (wrong, unknown, disabled, expired…).
    Refused,
    /// Answered `false` unchecked: the brute-force guard holds the id locked.
    Locked,
}

impl SignIn {
    pub const ALL: [SignIn; 3] = [SignIn::Ok, SignIn::Refused, SignIn::Locked];

    pub fn label(self) -> &'static str {
        match self {
            SignIn::Ok => "ok",
            SignIn::Refused => "refused",
            SignIn::Locked => "locked",
        }
    }
}

/// The `method` label of a request that named no method of the table.
pub const OTHER_METHOD: &str = "other";

/// Which counter one answered request goes to. Made by the dispatcher, counted by the
/// server once the reply is handed to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLabel {
    /// Row: the method's position in the names given to [`Metrics::new`]; `None` is `other`.
    method: Option<usize>,
    /// Column: see [`outcome_label`].
    outcome: usize,
}

impl RequestLabel {
    /// A request of method `row` (`None`: no known method) answered with a result.
    pub fn ok(method: Option<usize>) -> Self {
        RequestLabel { method, outcome: 0 }
    }

    /// A request of method `row` answered with error `code`.
    pub fn error(method: Option<usize>, code: u16) -> Self {
        let outcome = ErrorCode::from_number(code)
            .and_then(|c| ErrorCode::ALL.iter().position(|a| *a == c))
            .map_or(OUTCOMES - 1, |i| i + 1);
        RequestLabel { method, outcome }
    }

    pub fn is_ok(&self) -> bool {
        self.outcome == 0
    }
}

/// One method's latency histogram: a count per bucket (not cumulative) plus `+Inf`.
#[derive(Debug, Default)]
struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }
}

/// What the store reports at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct StoreGauges {
    pub up: bool,
    /// Statements sent to a database server (0 for the embedded store).
    pub round_trips: u64,
}

#[derive(Debug)]
pub struct Metrics {
    /// The `method` label of each row; the last row is `other`.
    methods: Vec<&'static str>,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// QoS 0 frames refused because `max_in_flight` requests were already being worked on.
    pub overloaded: AtomicU64,
    /// Redelivered state-changing requests answered from their replay record.
    pub replayed: AtomicU64,
    /// Times a lost broker connection was re-established.
    pub reconnects: AtomicU64,
    /// Reconnects on which the broker no longer had our persistent session
    /// ([`crate::mqtt::Reconnected::session_lost`]).
    pub sessions_lost: AtomicU64,
    /// Reconnects after the broker closed the previous connection moments after accepting
    /// it ([`crate::mqtt::Reconnected::closed_early`]).
    pub connections_taken: AtomicU64,
    /// Requests whose handler panicked (answered 500 and acknowledged).
    pub panics: AtomicU64,
    /// Locks started by Authenticate's brute-force guard.
    pub lockouts: AtomicU64,
    /// Authenticate answers by [`SignIn`] result.
    sign_ins: [AtomicU64; SignIn::ALL.len()],
    /// Requests refused with 429: the caller was over its rate limit.
    pub rate_limited: AtomicU64,
    /// Times a request was held unanswered because the store was unavailable.
    pub held: AtomicU64,
    /// Change events the broker acknowledged (`crate::events`).
    pub events_published: AtomicU64,
    /// `[method][outcome]`, the last row `other`.
    requests: Box<[[AtomicU64; OUTCOMES]]>,
    /// Per method, the last row `other`.
    latency: Box<[Latency]>,
}

impl Default for Metrics {
    /// Metrics with no method rows: every request is `other` (the benchmark's null worker).
    fn default() -> Self {
        Metrics::new(Vec::new())
    }
}

impl Metrics {
    /// Metrics with one row per method name (in the order [`RequestLabel`] rows count them),
    /// plus `other`.
    pub fn new(methods: Vec<&'static str>) -> Self {
        let rows = methods.len() + 1;
        Metrics {
            methods,
            dropped: Default::default(),
            overloaded: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            sessions_lost: AtomicU64::new(0),
            connections_taken: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            lockouts: AtomicU64::new(0),
            sign_ins: Default::default(),
            rate_limited: AtomicU64::new(0),
            held: AtomicU64::new(0),
            events_published: AtomicU64::new(0),
            requests: (0..rows).map(|_| Default::default()).collect(),
            latency: (0..rows).map(|_| Latency::default()).collect(),
        }
    }

    fn row(&self, label: &RequestLabel) -> usize {
        label
            .method
            .filter(|m| *m < self.methods.len())
            .unwrap_or(self.methods.len())
    }

    /// Counts a reconnect and its signs of a session takeover.
    pub fn reconnected(&self, signs: crate::mqtt::Reconnected) {
        self.reconnects.fetch_add(1, Relaxed);
        if signs.session_lost {
            self.sessions_lost.fetch_add(1, Relaxed);
        }
        if signs.closed_early {
            self.connections_taken.fetch_add(1, Relaxed);
        }
    }

    /// `authd_session_takeovers_total` over both signs.
    pub fn session_takeovers(&self) -> u64 {
        self.sessions_lost.load(Relaxed) + self.connections_taken.load(Relaxed)
    }

    /// Counts one `Auth.Authenticate` answer.
    pub fn signed_in(&self, result: SignIn) {
        self.sign_ins[result as usize].fetch_add(1, Relaxed);
    }

    pub fn sign_ins(&self, result: SignIn) -> u64 {
        self.sign_ins[result as usize].load(Relaxed)
    }

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

    /// Counts an answered request (reply handed to the broker, or `nr`) and its latency
    /// from arrival.
    pub fn answered(&self, label: RequestLabel, elapsed: Duration) {
        let row = self.row(&label);
        self.requests[row][label.outcome].fetch_add(1, Relaxed);
        self.latency[row].observe(elapsed);
    }

    /// Requests answered with a result.
    pub fn answered_ok(&self) -> u64 {
        self.requests.iter().map(|row| row[0].load(Relaxed)).sum()
    }

    /// Requests answered with an error frame.
    pub fn answered_error(&self) -> u64 {
        self.requests
            .iter()
            .flat_map(|row| row[1..].iter())
            .map(|c| c.load(Relaxed))
            .sum()
    }

    /// Requests of `method` (canonical name, or `other`) with `outcome` (`ok` or a code).
    pub fn requests(&self, method: &str, outcome: &str) -> u64 {
        let row = self
            .methods
            .iter()
            .position(|m| *m == method)
            .or_else(|| (method == OTHER_METHOD).then_some(self.methods.len()));
        let col = (0..OUTCOMES).find(|i| outcome_label(*i) == outcome);
        match (row, col) {
            (Some(r), Some(c)) => self.requests[r][c].load(Relaxed),
            _ => 0,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric. `broker_ready`: the
    /// worker is connected and subscribed.
    pub fn render(
        &self,
        broker_ready: bool,
        store: Option<StoreGauges>,
    ) -> Result<String, prometheus::Error> {
        let method_name = |i: usize| self.methods.get(i).copied().unwrap_or(OTHER_METHOD);
        let mut requests = Vec::new();
        for (i, row) in self.requests.iter().enumerate() {
            for (outcome, count) in row.iter().enumerate() {
                let n = count.load(Relaxed);
                if n > 0 {
                    requests.push(counter(
                        &[
                            ("method", method_name(i)),
                            ("outcome", outcome_label(outcome)),
                        ],
                        n,
                    ));
                }
            }
        }
        let mut latency = Vec::new();
        for (i, h) in self.latency.iter().enumerate() {
            if let Some(m) = histogram(h, method_name(i)) {
                latency.push(m);
            }
        }
        let dropped = DropReason::ALL
            .iter()
            .map(|r| counter(&[("reason", r.label())], self.dropped(*r)))
            .collect();
        let single = |v: &AtomicU64| vec![counter(&[], v.load(Relaxed))];
        let families = [
            family(
                "authd_requests_total",
                "Requests answered, by method (`other`: no method of the table) and outcome (`ok` or the error code).",
                MetricType::COUNTER,
                requests,
            ),
            family(
                "authd_request_duration_seconds",
                "Time from a request's arrival to its reply being handed to the broker (after any fsync).",
                MetricType::HISTOGRAM,
                latency,
            ),
            family(
                "authd_frames_dropped_total",
                "Frames dropped unanswered, by reason: no usable src or id, not JSON, a response frame, or a src whose reply would land on our own request topics.",
                MetricType::COUNTER,
                dropped,
            ),
            family(
                "authd_overload_dropped_total",
                "QoS 0 requests dropped because max_in_flight requests were being worked on.",
                MetricType::COUNTER,
                single(&self.overloaded),
            ),
            family(
                "authd_replays_total",
                "Redelivered state-changing requests answered from their stored response.",
                MetricType::COUNTER,
                single(&self.replayed),
            ),
            family(
                "authd_lockouts_total",
                "Locks started by Authenticate's brute-force guard.",
                MetricType::COUNTER,
                single(&self.lockouts),
            ),
            family(
                "authd_sign_ins_total",
                "Auth.Authenticate answers by result: ok (true), refused (false after checking the credentials), locked (false unchecked: the brute-force guard holds the id).",
                MetricType::COUNTER,
                SignIn::ALL
                    .iter()
                    .map(|r| counter(&[("result", r.label())], self.sign_ins(*r)))
                    .collect(),
            ),
            family(
                "authd_rate_limited_total",
                "Requests refused with 429 because their caller key was over its rate limit.",
                MetricType::COUNTER,
                single(&self.rate_limited),
            ),
            family(
                "authd_broker_reconnects_total",
                "Times a lost broker connection was re-established.",
                MetricType::COUNTER,
                single(&self.reconnects),
            ),
            family(
                "authd_session_takeovers_total",
                "Reconnects that look like another client took our MQTT session: sign=session_lost, the broker no longer had our persistent session; sign=closed_early, the broker closed the previous connection within 10 s of accepting it and accepted the next attempt at once.",
                MetricType::COUNTER,
                vec![
                    counter(
                        &[("sign", "session_lost")],
                        self.sessions_lost.load(Relaxed),
                    ),
                    counter(
                        &[("sign", "closed_early")],
                        self.connections_taken.load(Relaxed),
                    ),
                ],
            ),
            family(
                "authd_handler_panics_total",
                "Requests whose handler panicked (a bug): answered 500 when they had an address, and acknowledged.",
                MetricType::COUNTER,
                single(&self.panics),
            ),
            family(
                "authd_requests_held_total",
                "Times a request was held unanswered and unacknowledged because the database was unavailable (it is tried again; nothing is answered wrongly).",
                MetricType::COUNTER,
                single(&self.held),
            ),
            family(
                "authd_events_published_total",
                "Change events this worker published and the broker acknowledged (the worker holding the store's publishing role).",
                MetricType::COUNTER,
                single(&self.events_published),
            ),
            family(
                "authd_store_up",
                "1 when the store answered its last call (always 1 for the embedded store), else 0.",
                MetricType::GAUGE,
                store
                    .map(|s| vec![gauge(if s.up { 1.0 } else { 0.0 })])
                    .unwrap_or_default(),
            ),
            family(
                "authd_store_round_trips_total",
                "Statements sent to the PostgreSQL store (round trips); 0 for the embedded store.",
                MetricType::COUNTER,
                store
                    .map(|s| vec![counter(&[], s.round_trips)])
                    .unwrap_or_default(),
            ),
            family(
                "authd_broker_connected",
                "1 when connected to the broker and subscribed to the request topics, else 0.",
                MetricType::GAUGE,
                vec![gauge(if broker_ready { 1.0 } else { 0.0 })],
            ),
        ];
        let families: Vec<MetricFamily> = families
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut l = proto::LabelPair::default();
            l.set_name((*name).into());
            l.set_value((*value).into());
            l
        })
        .collect()
}

fn counter(label_pairs: &[(&str, &str)], value: u64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    let mut m = proto::Metric::default();
    m.set_label(labels(label_pairs));
    m.set_counter(c);
    m
}

fn gauge(value: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = proto::Metric::default();
    m.set_gauge(g);
    m
}

/// A method's histogram, or `None` if it has seen nothing (no empty series per method).
fn histogram(h: &Latency, method: &str) -> Option<proto::Metric> {
    let counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Relaxed)).collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let mut cumulative = 0;
    let buckets = LATENCY_BUCKETS
        .iter()
        .zip(&counts)
        .map(|(le, n)| {
            cumulative += n;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*le);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut p = proto::Histogram::default();
    p.set_sample_count(total);
    p.set_sample_sum(h.sum_ns.load(Relaxed) as f64 / 1e9);
    p.set_bucket(buckets);
    let mut m = proto::Metric::default();
    m.set_label(labels(&[("method", method)]));
    m.set_histogram(p);
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_outcome_labels_agree() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(outcome_label(i + 1), code.number().to_string());
        }
        assert_eq!(outcome_label(OUTCOMES - 1), "error");
    }

    #[test]
    fn renders_counts_by_method_and_outcome_with_latency() {
        let m = Metrics::new(vec!["Auth.Authenticate", "Auth.GetToken"]);
        let auth = Some(0);
        m.answered(RequestLabel::ok(auth), Duration::from_micros(300));
        m.answered(RequestLabel::ok(auth), Duration::from_millis(3));
        m.answered(RequestLabel::error(None, 401), Duration::from_micros(50));
        m.answered(RequestLabel::error(auth, 599), Duration::from_secs(10));
        m.drop_frame(DropReason::BadSrc);
        m.signed_in(SignIn::Refused);
        m.signed_in(SignIn::Refused);
        m.signed_in(SignIn::Locked);
        assert_eq!((m.answered_ok(), m.answered_error()), (2, 2));
        assert_eq!(m.requests("Auth.Authenticate", "ok"), 2);
        assert_eq!(m.requests("other", "401"), 1);
        let text = m.render(true, None).unwrap();
        for line in [
            "authd_requests_total{method=\"Auth.Authenticate\",outcome=\"ok\"} 2",
            "authd_requests_total{method=\"Auth.Authenticate\",outcome=\"error\"} 1",
            "authd_requests_total{method=\"other\",outcome=\"401\"} 1",
            "authd_request_duration_seconds_bucket{method=\"Auth.Authenticate\",le=\"0.0005\"} 1",
            "authd_request_duration_seconds_bucket{method=\"Auth.Authenticate\",le=\"0.005\"} 2",
            "authd_request_duration_seconds_bucket{method=\"Auth.Authenticate\",le=\"+Inf\"} 3",
            "authd_request_duration_seconds_count{method=\"Auth.Authenticate\"} 3",
            "authd_frames_dropped_total{reason=\"bad_src\"} 1",
            "authd_frames_dropped_total{reason=\"not_json\"} 0",
            "authd_broker_connected 1",
            "authd_lockouts_total 0",
            "authd_sign_ins_total{result=\"ok\"} 0",
            "authd_sign_ins_total{result=\"refused\"} 2",
            "authd_sign_ins_total{result=\"locked\"} 1",
            "authd_session_takeovers_total{sign=\"session_lost\"} 0",
            "authd_session_takeovers_total{sign=\"closed_early\"} 0",
            "authd_handler_panics_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        assert!(!text.contains("Auth.GetToken"), "no empty series: {text}");
        assert!(m
            .render(false, None)
            .unwrap()
            .contains("authd_broker_connected 0"));
    }
}
