//! `authd watch` (docs/protocol.md#following-events), the built binary: every change event
//! once, in seq order, on stdout; across a broker restart without a gap or a duplicate; exit
//! 3 when the events to follow on from are gone. Against a real worker, and against a
//! scripted events source that publishes duplicates, late copies and gaps on purpose.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use tokio::sync::mpsc;

/// How long a watcher may take to print what it should and exit: a request of its lost in
/// a broker restart is asked again after its `--timeout`.
const EXIT_WITHIN: Duration = Duration::from_secs(15);

fn events_topic() -> String {
    format!("{SERVICE_ID}/events")
}

/// `authd watch` running as a child process, its stdout read line by line.
struct Watch {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    following: mpsc::UnboundedReceiver<()>,
    stderr: Arc<Mutex<String>>,
}

impl Watch {
    /// Starts `authd watch ARGS` on `broker` with the admin key, logging at info (its
    /// "following" line says it is subscribed and knows where it starts).
    fn start(broker: &Broker, args: &[&str]) -> Watch {
        let mut child = Command::new(authd_bin())
            .arg("watch")
            .args(args)
            .args(["--broker", &broker.url(), "--key", ADMIN_KEY])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("authd watch starts");
        let (line_tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = line_tx.send(line);
            }
        });
        let (following_tx, following) = mpsc::unbounded_channel();
        let stderr = Arc::new(Mutex::new(String::new()));
        let text = stderr.clone();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("following the change events") {
                    let _ = following_tx.send(());
                }
                let mut text = text.lock().unwrap_or_else(|e| e.into_inner());
                text.push_str(&line);
                text.push('\n');
            }
        });
        Watch {
            child,
            lines,
            following,
            stderr,
        }
    }

    /// Waits until it follows live (subscribed, head learned or caught up).
    async fn following(&mut self) {
        let said = tokio::time::timeout(TIMEOUT, self.following.recv()).await;
        assert!(
            matches!(said, Ok(Some(()))),
            "authd watch did not start following; stderr:\n{}",
            self.stderr()
        );
    }

    /// The next event it printed, as JSON; panics if none comes within [`TIMEOUT`].
    async fn next_event(&mut self) -> Value {
        let line = tokio::time::timeout(TIMEOUT, self.lines.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no event printed; stderr:\n{}", self.stderr()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The next `n` events' seqs.
    async fn next_seqs(&mut self, n: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        for _ in 0..n {
            let event = self.next_event().await;
            seqs.push(event["seq"].as_u64().expect("seq"));
        }
        seqs
    }

    /// Waits for it to exit; returns its status and every line it printed that was not
    /// read yet.
    async fn finish(mut self) -> (ExitStatus, Vec<String>) {
        let deadline = tokio::time::Instant::now() + EXIT_WITHIN;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "authd watch did not exit; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The reader thread ends at EOF, and its sender with it.
        let mut rest = Vec::new();
        while let Ok(Some(line)) = tokio::time::timeout(TIMEOUT, self.lines.recv()).await {
            rest.push(line);
        }
        (status, rest)
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// SIGSTOP / SIGCONT: a watcher that cannot take part while the broker restarts.
    fn signal(&self, signal: libc::c_int) {
        // SAFETY: a signal to our own child, by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds a rule (one `rule.added` event); returns its id.
async fn add_rule(admin: &authd::client::Client, n: u32) -> u64 {
    let result = ok(
        admin,
        "/v1/ACL.Add",
        json!({"src": format!("user{n}"), "dst": "dev*", "cmd": "Sys.*", "effect": "allow"}),
    )
    .await
    .expect("ACL.Add answers");
    result["rule_id"].as_u64().expect("rule_id")
}

/// `Events.Since {after}` through `client`: (events, head).
async fn since(client: &authd::client::Client, after: Option<u64>) -> (Vec<Value>, u64) {
    let args = match after {
        Some(after) => json!({ "after": after, "limit": 1000 }),
        None => json!({}),
    };
    let page = ok(client, "/v1/Events.Since", args)
        .await
        .expect("Events.Since answers");
    let events = page["events"].as_array().expect("events").clone();
    (events, page["head"].as_u64().expect("head"))
}

/// The `seq` of each printed line.
fn seqs(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn consecutive(seqs: &[u64]) -> bool {
    seqs.windows(2).all(|w| w[1] == w[0] + 1)
}

#[tokio::test]
async fn events_of_admin_calls_are_printed_in_seq_order() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let (_, head) = since(&admin, None).await;
    let mut watch = Watch::start(&s.broker, &["--count", "3"]);
    watch.following().await;

    let first = add_rule(&admin, 1).await;
    add_rule(&admin, 2).await;
    ok(&admin, "/v1/ACL.Delete", json!({ "rule_id": first })).await;

    let (status, lines) = watch.finish().await;
    assert!(status.success(), "{status}");
    let printed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    // Exactly what the store has, as the store has it.
    let (stored, _) = since(&admin, Some(head)).await;
    assert_eq!(printed, stored);
    let types: Vec<&str> = printed.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["rule.added", "rule.added", "rule.deleted"]);
    let seqs: Vec<u64> = printed.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs[0], head + 1);
    assert!(consecutive(&seqs), "{seqs:?}");
}

#[tokio::test]
async fn a_watcher_after_0_prints_events_committed_before_it_started() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    for n in 0..5 {
        add_rule(&admin, n).await;
    }
    let (stored, head) = since(&admin, Some(0)).await;
    assert_eq!(head, 5);

    // Pages of 2: the catch-up takes three calls.
    let watch = Watch::start(&s.broker, &["--after", "0", "--limit", "2", "--count", "5"]);
    let (status, lines) = watch.finish().await;
    assert!(status.success(), "{status}");
    let printed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed, stored);
    let seqs: Vec<u64> = printed.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_broker_restart_costs_no_event_and_repeats_none() {
    let mut s = Setup::start().await;
    let admin = s.admin().await;
    let (_, head) = since(&admin, None).await;
    let mut watch = Watch::start(&s.broker, &["--count", "6"]);
    watch.following().await;

    add_rule(&admin, 1).await;
    add_rule(&admin, 2).await;
    assert_eq!(watch.next_seqs(2).await, [head + 1, head + 2]);

    // The watcher cannot reconnect before the worker is back and has published the next
    // events: they reach no subscription of it, and no later event shows the gap. Only
    // the catch-up after its reconnect brings them.
    watch.signal(libc::SIGSTOP);
    drop(admin);
    s.broker.restart();
    let reconnects = s.worker().metrics().reconnects.load(Relaxed);
    wait_until("the worker reconnected", || {
        s.worker().metrics().reconnects.load(Relaxed) > reconnects
    })
    .await;
    tokio::time::timeout(TIMEOUT, s.worker().ready())
        .await
        .expect("the worker is ready again");
    let admin = s.admin().await;
    add_rule(&admin, 3).await;
    add_rule(&admin, 4).await;
    watch.signal(libc::SIGCONT);
    assert_eq!(watch.next_seqs(2).await, [head + 3, head + 4]);

    // And live events go on after it.
    add_rule(&admin, 5).await;
    add_rule(&admin, 6).await;
    let (status, lines) = watch.finish().await;
    assert!(status.success(), "{status}");
    assert_eq!(seqs(&lines), [head + 5, head + 6]);
}

#[tokio::test]
async fn events_no_longer_there_exit_3_with_what_to_do() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    add_rule(&admin, 1).await;
    let (_, head) = since(&admin, None).await;

    // After more than the head: not the store this consumer followed.
    let after = (head + 100).to_string();
    let watch = Watch::start(&s.broker, &["--after", &after]);
    let stderr = watch.stderr.clone();
    let (status, lines) = watch.finish().await;
    assert_eq!(status.code(), Some(3), "{status}");
    assert!(lines.is_empty(), "{lines:?}");
    let stderr = stderr.lock().unwrap().clone();
    assert!(
        stderr.contains(&format!(
            "events after {after} are no longer retained (or the store changed): resynchronise in full, then watch from the head"
        )),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// A scripted events source: it answers Events.Since from a list, and the test publishes
// live events as it likes (duplicates, late copies, gaps), which a worker does only by
// accident of crashes and reconnects.

/// The events "committed" so far (seq = position + 1).
type Committed = Arc<Mutex<Vec<Value>>>;

fn event(seq: u64) -> Value {
    json!({"v": 1, "seq": seq, "at": 1_700_000_000_000u64 + seq, "type": "rule.deleted", "rule_id": seq, "src": "*", "dst": "*", "cmd": "*", "effect": "allow"})
}

fn commit(committed: &Committed, upto: u64) {
    let mut events = committed.lock().unwrap();
    while (events.len() as u64) < upto {
        let seq = events.len() as u64 + 1;
        events.push(event(seq));
    }
}

/// Answers Events.Since on the request topic from `committed`, until dropped.
async fn fake_worker(broker: &Broker, committed: Committed) -> tokio::task::JoinHandle<()> {
    let mut requests = Spy::start(broker, &[&request_topic()]).await;
    tokio::spawn(async move {
        loop {
            let Some((_, payload)) = requests.next(Duration::from_secs(3600)).await else {
                return;
            };
            let Ok(frame) = serde_json::from_slice::<Value>(&payload) else {
                continue;
            };
            assert_eq!(frame["method"], "/v1/Events.Since", "{frame}");
            let events = committed.lock().unwrap().clone();
            let head = events.len() as u64;
            let answer = match frame["args"]["after"].as_u64() {
                None => ("result", json!({"events": [], "head": head})),
                Some(after) if after > head => (
                    "error",
                    json!({"code": 410, "message": "after is beyond the head"}),
                ),
                Some(after) => {
                    let limit = frame["args"]["limit"].as_u64().unwrap_or(100) as usize;
                    let page: Vec<Value> = events
                        .into_iter()
                        .skip(after as usize)
                        .take(limit)
                        .collect();
                    ("result", json!({"events": page, "head": head}))
                }
            };
            let src = frame["src"].as_str().expect("src");
            let mut reply = json!({"v": 2, "src": SERVICE_ID, "dst": src, "id": frame["id"]});
            reply[answer.0] = answer.1;
            requests
                .publish(&format!("{src}/rpc"), reply.to_string())
                .await;
        }
    })
}

/// Waits until the fake worker answers again (after a broker restart).
async fn answering(broker: &Broker) {
    let probe = client(broker, None, None).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while probe
        .call("/v1/Events.Since", json!({}), Duration::from_millis(200))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fake worker did not come back"
        );
    }
}

#[tokio::test]
async fn duplicates_late_copies_and_gaps_are_each_printed_once_in_order() {
    let broker = Broker::start();
    let committed = Committed::default();
    commit(&committed, 3);
    let worker = fake_worker(&broker, committed.clone()).await;
    let live = Spy::start(&broker, &["unused/topic"]).await;
    let publish = |seq: u64| {
        let live = &live;
        async move { live.publish(&events_topic(), event(seq).to_string()).await }
    };

    let mut watch = Watch::start(&broker, &["--after", "1", "--count", "7", "--timeout", "1"]);
    watch.following().await;
    // Caught up from 1: 2 and 3.
    assert_eq!(watch.next_seqs(2).await, [2, 3]);

    commit(&committed, 4);
    publish(4).await;
    publish(4).await; // published twice
    publish(2).await; // a late copy of an old one
    assert_eq!(watch.next_seqs(1).await, [4]);

    // 5 never comes live: 6 shows the gap, the catch-up brings 5 and 6; then 5 comes late.
    commit(&committed, 6);
    publish(6).await;
    assert_eq!(watch.next_seqs(2).await, [5, 6]);
    publish(5).await;

    // Out of order: 8 before 7.
    commit(&committed, 8);
    publish(8).await;
    publish(7).await;
    let (status, lines) = watch.finish().await;
    assert!(status.success(), "{status}");
    assert_eq!(seqs(&lines), [7, 8]);
    worker.abort();
}

#[tokio::test]
async fn after_a_reconnect_it_catches_up_with_no_live_event_to_show_the_gap() {
    let mut broker = Broker::start();
    let committed = Committed::default();
    commit(&committed, 2);
    let worker = fake_worker(&broker, committed.clone()).await;

    let mut watch = Watch::start(&broker, &["--count", "2", "--timeout", "1"]);
    watch.following().await;
    watch.signal(libc::SIGSTOP);
    broker.restart();
    answering(&broker).await;
    // Committed and published while the watcher was away: nobody received them.
    commit(&committed, 4);
    watch.signal(libc::SIGCONT);
    let (status, lines) = watch.finish().await;
    assert!(status.success(), "{status}");
    let printed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        printed,
        [event(3), event(4)],
        "exactly the events, as committed"
    );
    worker.abort();
}

#[tokio::test]
async fn a_410_exits_3_and_says_to_resynchronise() {
    let broker = Broker::start();
    let committed = Committed::default();
    commit(&committed, 2);
    let worker = fake_worker(&broker, committed.clone()).await;
    let watch = Watch::start(&broker, &["--after", "5"]);
    let stderr = watch.stderr.clone();
    let (status, lines) = watch.finish().await;
    assert_eq!(status.code(), Some(3), "{status}");
    assert!(lines.is_empty(), "{lines:?}");
    let stderr = stderr.lock().unwrap().clone();
    assert!(
        stderr.contains("authd watch: events after 5 are no longer retained (or the store changed): resynchronise in full, then watch from the head"),
        "{stderr}"
    );
    worker.abort();
}
