//! Several worker processes on one PostgreSQL database (issue 13): a shared subscription
//! group that loses nothing when a worker is killed, read-your-writes across workers, and
//! the brute-force guard counting failures across workers. Real mosquitto, real
//! PostgreSQL, real `authd serve` processes. These run whatever AUTHD_TEST_STORE says:
//! several workers need the shared store.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use authd::client::{Client, ClientOptions};
use serde_json::{json, Value};
use support::*;

const GROUP: &str = "authd";

/// One `authd serve` process.
struct WorkerProcess {
    child: Option<Child>,
    data: PathBuf,
    metrics: SocketAddr,
    command: Vec<(String, String)>,
}

impl WorkerProcess {
    /// Starts a worker on `store` with data directory `data` (holding the shared server
    /// key), client id `client_id`, service id `id`, in `group` if any; waits until ready.
    fn start(
        broker: &Broker,
        store: &str,
        data: &Path,
        client_id: &str,
        id: &str,
        group: Option<&str>,
    ) -> WorkerProcess {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut env = vec![
            ("AUTHD_BROKER".to_owned(), broker.url()),
            ("AUTHD_STORE".to_owned(), store.to_owned()),
            ("AUTHD_DATA".to_owned(), data.display().to_string()),
            ("AUTHD_CLIENT_ID".to_owned(), client_id.to_owned()),
            ("AUTHD_ID".to_owned(), id.to_owned()),
            ("AUTHD_METRICS".to_owned(), metrics.to_string()),
            (
                "AUTHD_CALLER_KEYS".to_owned(),
                format!("ops:admin:{ADMIN_KEY},backend:service:{SERVICE_KEY}"),
            ),
            ("AUTHD_LOG_FILTER".to_owned(), "warn".to_owned()),
        ];
        if let Some(group) = group {
            env.push(("AUTHD_SHARE_GROUP".to_owned(), group.to_owned()));
        }
        let mut w = WorkerProcess {
            child: None,
            data: data.to_path_buf(),
            metrics,
            command: env,
        };
        w.launch();
        w
    }

    fn launch(&mut self) {
        let child = Command::new(authd_bin())
            .arg("serve")
            .envs(self.command.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start authd serve");
        let child = self.child.insert(child);
        wait_ready(self.metrics, child, &self.data.display().to_string());
    }

    /// SIGKILL: no drain, no goodbye.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// `authd_requests_total` summed over methods and outcomes.
    fn answered(&self) -> f64 {
        let (_, body) = http_get(self.metrics, "/metrics");
        body.lines()
            .filter(|l| l.starts_with("authd_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Data directories for `n` workers, all holding the same server key (made by the first
/// worker's start: `authd key` style, here by starting and stopping it once).
struct Fleet {
    dirs: Vec<tempfile::TempDir>,
    store: String,
}

impl Fleet {
    fn new(broker: &Broker, n: usize) -> Fleet {
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let store = test_database(&format!("authd_fleet_{}", uuid::Uuid::new_v4().simple()));
        // The first worker makes the key (and the schema); every other worker gets a copy.
        drop(WorkerProcess::start(
            broker,
            &store,
            dirs[0].path(),
            "authd-keymaker",
            SERVICE_ID,
            None,
        ));
        let key = authd::crypto::ServerKeys::file_in(dirs[0].path());
        for d in &dirs[1..] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
            let to = authd::crypto::ServerKeys::file_in(d.path());
            std::fs::copy(&key, &to).expect("copy server.key");
        }
        Fleet { dirs, store }
    }

    fn dir(&self, i: usize) -> &Path {
        self.dirs[i].path()
    }
}

async fn client_as(broker: &Broker, key: &str, service: &str, src: &str) -> Client {
    let mut options = ClientOptions::new(broker.address());
    options.key = Some(key.to_owned());
    options.service_id = service.to_owned();
    options.request_topic = format!("{service}/rpc");
    options.src = src.to_owned();
    options.client_id = Some(format!("{src}-{}", uuid::Uuid::new_v4().simple()));
    Client::connect(options, TIMEOUT)
        .await
        .expect("client connects")
}

/// Three workers share a group; one is killed with SIGKILL in the middle of a stream of
/// GenerateToken and restarted. Every request is answered; a request answered more than
/// once (a redelivery) is answered identically; each answered token is the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_nothing() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, 3);
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|i| {
            WorkerProcess::start(
                &broker,
                &fleet.store,
                fleet.dir(i),
                &format!("authd-{i}"),
                SERVICE_ID,
                Some(GROUP),
            )
        })
        .collect();
    let src = "stream-backend";
    let mut spy = Spy::start(&broker, &[&format!("{src}/rpc")]).await;
    let backend = std::sync::Arc::new(client_as(&broker, SERVICE_KEY, SERVICE_ID, src).await);

    const N: usize = 300;
    let mut calls = Vec::new();
    for n in 0..N {
        let backend = backend.clone();
        calls.push(tokio::spawn(async move {
            let frame = backend.frame(
                "/v1/Auth.GenerateToken",
                json!({"host": format!("host{n}")}),
            );
            let r = backend
                .call_frame(&frame, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("request {n}: {e}"));
            (n, r)
        }));
        if n == N / 3 {
            // Mid-stream: worker 1 dies with whatever it had in flight, and comes back.
            tokio::time::sleep(Duration::from_millis(50)).await;
            workers[1].kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            workers[1].restart();
        }
        if n % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut tokens = HashMap::new();
    for call in calls {
        let (n, r) = call.await.unwrap();
        assert!(r.error.is_none(), "request {n}: {:?}", r.error);
        let token = r
            .result
            .as_ref()
            .and_then(|v| v["token"].as_str())
            .map(str::to_owned);
        tokens.insert(n, token.unwrap_or_else(|| panic!("request {n}: no token")));
    }
    assert_eq!(tokens.len(), N, "every request answered");

    // Every reply the broker carried, duplicates included: one answer per id.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut by_id: HashMap<u64, Vec<Value>> = HashMap::new();
    for (_, payload) in spy.drain() {
        let v: Value = serde_json::from_slice(&payload).unwrap();
        by_id
            .entry(v["id"].as_u64().unwrap())
            .or_default()
            .push(v["result"].clone());
    }
    for (id, answers) in &by_id {
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "request {id} answered differently: {answers:?}"
        );
    }

    // Each token answered is the live token of its host, and signs in as the user.
    let check = client_as(&broker, SERVICE_KEY, SERVICE_ID, src).await;
    for n in [0, N / 3, N / 3 + 1, N / 2, N - 1] {
        let live = ok(
            &check,
            "/v1/Auth.GetToken",
            json!({"host": format!("host{n}")}),
        )
        .await
        .unwrap();
        assert_eq!(live["token"].as_str(), Some(tokens[&n].as_str()), "host{n}");
        assert!(
            authenticate(&check, src, json!({"psk": tokens[&n]})).await,
            "token of host{n} signs in"
        );
    }
    let all = ok(&check, "/v1/Auth.ListToken", json!({})).await.unwrap();
    assert_eq!(all.as_array().map(Vec::len), Some(N), "{all}");

    // All three shared the work, the restarted one too (its share queued at the broker
    // while it was away, and what came after).
    for (i, w) in workers.iter().enumerate() {
        assert!(w.answered() > 0.0, "worker {i} answered nothing");
    }
}

/// A change answered by one worker is seen by the next request on another: rules, tokens,
/// entities. The workers serve different service ids on one database, so each request
/// goes to the worker the test picks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_sees_an_answered_change_at_once() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, 2);
    let _a = WorkerProcess::start(
        &broker,
        &fleet.store,
        fleet.dir(0),
        "authd-a",
        "svc-a",
        None,
    );
    let _b = WorkerProcess::start(
        &broker,
        &fleet.store,
        fleet.dir(1),
        "authd-b",
        "svc-b",
        None,
    );
    let admin_a = client_as(&broker, ADMIN_KEY, "svc-a", "ops-a").await;
    let admin_b = client_as(&broker, ADMIN_KEY, "svc-b", "ops-b").await;
    let may = async |c: &Client, src: &str, dst: &str| -> bool {
        ok(
            c,
            "/v1/Auth.AuthorizeCommand",
            json!({"src": src, "dst": dst, "cmd": "Sys.Reboot"}),
        )
        .await
        .and_then(|v| v.as_bool())
        .unwrap()
    };

    // Rules: B decides with A's rule the moment A answered, and without it once deleted.
    for round in 0..5 {
        assert!(
            !may(&admin_b, "bob", "lamp").await,
            "round {round}: no rule yet"
        );
        let added = ok(
            &admin_a,
            "/v1/ACL.Add",
            json!({"src": "bob", "dst": "lamp", "cmd": "*", "effect": "allow"}),
        )
        .await
        .unwrap();
        assert!(
            may(&admin_b, "bob", "lamp").await,
            "round {round}: rule from A"
        );
        ok(
            &admin_b,
            "/v1/ACL.Delete",
            json!({"rule_id": added["rule_id"]}),
        )
        .await;
        assert!(
            !may(&admin_a, "bob", "lamp").await,
            "round {round}: deleted on B"
        );
    }

    // Entities: a PSK set on A signs in on B; replaced on B, the old one fails on A;
    // disabled on A, refused on B.
    let put = async |c: &Client, args: Value| {
        ok(c, "/v1/Entity.Put", args).await;
    };
    put(&admin_a, json!({"id": "dev1", "psk": "first psk"})).await;
    assert!(authenticate(&admin_b, "dev1", json!({"psk": "first psk"})).await);
    put(&admin_b, json!({"id": "dev1", "psk": "second psk"})).await;
    assert!(!authenticate(&admin_a, "dev1", json!({"psk": "first psk"})).await);
    assert!(authenticate(&admin_a, "dev1", json!({"psk": "second psk"})).await);
    put(
        &admin_a,
        json!({"id": "dev1", "psk": "second psk", "disabled": true}),
    )
    .await;
    assert!(!authenticate(&admin_b, "dev1", json!({"psk": "second psk"})).await);

    // Tokens: issued on A, signs in on B; replaced on B, the old one fails on A at once;
    // revoked on A, fails on B.
    let alice_a = client_as(&broker, SERVICE_KEY, "svc-a", "alice").await;
    let alice_b = client_as(&broker, SERVICE_KEY, "svc-b", "alice").await;
    let token = |v: Option<Value>| v.unwrap()["token"].as_str().unwrap().to_owned();
    let first = token(ok(&alice_a, "/v1/Auth.GenerateToken", json!({"host": "app"})).await);
    assert!(authenticate(&alice_b, "alice", json!({"psk": first})).await);
    let second = token(ok(&alice_b, "/v1/Auth.GenerateToken", json!({"host": "app"})).await);
    assert!(!authenticate(&alice_a, "alice", json!({"psk": first})).await);
    assert!(authenticate(&alice_a, "alice", json!({"psk": second})).await);
    ok(&alice_a, "/v1/Auth.RevokeToken", json!({"host": "app"})).await;
    assert!(!authenticate(&alice_b, "alice", json!({"psk": second})).await);
}

/// Five failed sign-ins spread over three workers lock the id on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_on_three_workers_lock_the_id_everywhere() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, 3);
    let ids = ["svc-a", "svc-b", "svc-c"];
    let _workers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            WorkerProcess::start(
                &broker,
                &fleet.store,
                fleet.dir(i),
                &format!("authd-{id}"),
                id,
                None,
            )
        })
        .collect();
    let mut clients = Vec::new();
    for id in ids {
        clients.push(client_as(&broker, ADMIN_KEY, id, &format!("ops-{id}")).await);
    }
    ok(
        &clients[0],
        "/v1/Entity.Put",
        json!({"id": "dev9", "psk": "right psk"}),
    )
    .await;
    // 2 + 2 + 1 failures: no worker saw five of them.
    for (worker, failures) in [(0, 2), (1, 2), (2, 1)] {
        for _ in 0..failures {
            assert!(!authenticate(&clients[worker], "dev9", json!({"psk": "guess"})).await);
        }
    }
    for (worker, c) in clients.iter().enumerate() {
        assert!(
            !authenticate(c, "dev9", json!({"psk": "right psk"})).await,
            "worker {worker}: the right PSK must be refused while the id is locked"
        );
    }
    // The first lock is one second (the default base): then the right PSK signs in again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(authenticate(&clients[1], "dev9", json!({"psk": "right psk"})).await);
}

/// Two workers in a share group take changes at once (the broker splits the requests
/// between them). The change events are numbered 1..N with none missing, each published,
/// and in commit order: for every user, whose changes were made one after another (each
/// sent once the previous was answered), the events come in the order the changes were
/// made. One worker publishes at a time, so live events first arrive in `seq` order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_number_events_in_commit_order_with_none_missing() {
    let broker = Broker::start();
    let fleet = Fleet::new(&broker, 2);
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|i| {
            WorkerProcess::start(
                &broker,
                &fleet.store,
                fleet.dir(i),
                &format!("authd-ev-{i}"),
                SERVICE_ID,
                Some(GROUP),
            )
        })
        .collect();
    let mut spy = Spy::start(&broker, &[&format!("{SERVICE_ID}/events")]).await;

    const USERS: usize = 12;
    const ROUNDS: usize = 5;
    let mut chains = Vec::new();
    for u in 0..USERS {
        let broker_url = broker.address();
        chains.push(tokio::spawn(async move {
            let mut options = ClientOptions::new(broker_url);
            options.key = Some(SERVICE_KEY.to_owned());
            options.src = format!("user{u}");
            let user = Client::connect(options, TIMEOUT).await.expect("connects");
            for _ in 0..ROUNDS {
                // New (no event), replaced (token.replaced), revoked (token.revoked).
                for method in [
                    "Auth.GenerateToken",
                    "Auth.GenerateToken",
                    "Auth.RevokeToken",
                ] {
                    let r = user
                        .call(method, json!({"host": "app"}), Duration::from_secs(30))
                        .await
                        .expect("answered");
                    assert!(r.error.is_none(), "{method}: {:?}", r.error);
                }
            }
        }));
    }
    for chain in chains {
        chain.await.unwrap();
    }
    let total = USERS * ROUNDS * 2;
    assert!(
        workers.iter().all(|w| w.answered() > 0.0),
        "both workers made changes"
    );

    // Every event arrives live (a repeat carries the same event), first in seq order.
    let mut first_seen: Vec<u64> = Vec::new();
    let mut by_seq: std::collections::BTreeMap<u64, Value> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while by_seq.len() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, payload) = spy
            .next(left)
            .await
            .unwrap_or_else(|| panic!("{} of {total} events arrived", by_seq.len()));
        let event: Value = serde_json::from_slice(&payload).unwrap();
        let seq = event["seq"].as_u64().unwrap();
        match by_seq.get(&seq) {
            Some(earlier) => assert_eq!(earlier, &event, "a repeat is the same event"),
            None => {
                first_seen.push(seq);
                by_seq.insert(seq, event);
            }
        }
    }
    let want: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        want,
        "1..N, none missing"
    );
    assert!(
        first_seen.windows(2).all(|w| w[0] < w[1]),
        "published in seq order: {first_seen:?}"
    );
    for u in 0..USERS {
        let user = format!("user{u}");
        let mine: Vec<&str> = by_seq
            .values()
            .filter(|e| e["user"] == user.as_str())
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = (0..ROUNDS)
            .flat_map(|_| ["token.replaced", "token.revoked"])
            .collect();
        assert_eq!(
            mine, expected,
            "{user}'s events in the order its changes committed"
        );
    }

    // Events.Since, asked of either worker, agrees.
    let reader = client_as(&broker, SERVICE_KEY, SERVICE_ID, "reader").await;
    let mut after = 0;
    let mut read = Vec::new();
    loop {
        let r = reader
            .call(
                "Events.Since",
                json!({"after": after, "limit": 50}),
                TIMEOUT,
            )
            .await
            .unwrap();
        let page = r.result.unwrap();
        assert_eq!(page["head"], total);
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            break;
        }
        after = events.last().unwrap()["seq"].as_u64().unwrap();
        read.extend(events);
    }
    assert_eq!(read, by_seq.into_values().collect::<Vec<_>>());
}
