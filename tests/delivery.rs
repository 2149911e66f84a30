//! Nothing lost, nothing doubled (docs/protocol.md#delivery-and-durability): the worker killed with SIGKILL mid-stream, the
//! broker restarted under load, SIGTERM under load. Real processes, real mosquitto with
//! persistence, clients with persistent sessions so replies wait for them at the broker.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use authd::client::{Client, ClientOptions};
use authd::frame::Response;
use serde_json::{json, Value};
use support::*;

const LONG: Duration = Duration::from_secs(40);

/// `authd serve` as a child process.
struct WorkerProcess(Child);

impl WorkerProcess {
    fn spawn(broker: &Broker, data: &Path, client_id: &str) -> WorkerProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .expect("worker log");
        let child = Command::new(authd_bin())
            .args(["serve", "--broker", &broker.url(), "--client-id", client_id])
            .arg("--data")
            .arg(data)
            .env(
                "AUTHD_CALLER_KEYS",
                format!("ops:admin:{ADMIN_KEY},backend:service:{SERVICE_KEY}"),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start authd serve");
        WorkerProcess(child)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.0.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        wait_exit(&mut self.0, limit)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn persistent_client(broker: &Broker, src: &str) -> Arc<Client> {
    let mut options = ClientOptions::new(broker.address());
    options.key = Some(SERVICE_KEY.into());
    options.src = src.into();
    options.persistent = true;
    Arc::new(
        Client::connect(options, TIMEOUT)
            .await
            .expect("client connects"),
    )
}

/// Waits until a worker answers.
async fn wait_answering(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .call("Auth.ListToken", json!({}), Duration::from_millis(500))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "worker did not answer");
    }
}

/// `n` GenerateToken requests (host `h<i>`) with `w` in flight and `pace` between a task's
/// requests. Returns each request's id and response, in request order; `done` counts answers.
async fn generate_stream(
    client: Arc<Client>,
    n: usize,
    w: usize,
    pace: Duration,
    done: Arc<AtomicUsize>,
) -> Vec<(u64, Response)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..w {
        let (client, next, done) = (client.clone(), next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                let frame = client.frame("Auth.GenerateToken", json!({"host": format!("h{i}")}));
                let id = frame["id"].as_u64().expect("id");
                let r = client
                    .call_frame(&frame, LONG)
                    .await
                    .unwrap_or_else(|e| panic!("request {i} (id {id}) was never answered: {e}"));
                done.fetch_add(1, Ordering::Relaxed);
                out.push((i, id, r));
                tokio::time::sleep(pace).await;
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("stream task"));
    }
    all.sort_by_key(|(i, _, _)| *i);
    all.into_iter().map(|(_, id, r)| (id, r)).collect()
}

async fn wait_count(done: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + LONG;
    while done.load(Ordering::Relaxed) < at_least {
        assert!(
            Instant::now() < deadline,
            "stream stalled at {}",
            done.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every request answered with a token; any second answer to the same id is identical to
/// the first; each answered token is the live one for its host.
async fn check_stream(client: &Client, answers: &[(u64, Response)]) {
    let by_id: HashMap<u64, &Response> = answers.iter().map(|(id, r)| (*id, r)).collect();
    for (i, (_, r)) in answers.iter().enumerate() {
        assert!(r.error.is_none(), "request {i}: {:?}", r.error);
        assert!(
            r.result
                .as_ref()
                .and_then(|v| v["token"].as_str())
                .is_some(),
            "request {i}: {:?}",
            r.result
        );
    }
    let mut duplicates = 0;
    while let Some(extra) = client.next_unmatched(Duration::from_millis(300)).await {
        let extra: Response = serde_json::from_slice(&extra).expect("a response frame");
        if let Some(first) = by_id.get(&extra.id) {
            duplicates += 1;
            assert_eq!(
                (&extra.result, &extra.error),
                (&first.result, &first.error),
                "id {} answered twice with different results",
                extra.id
            );
        }
    }
    eprintln!("{duplicates} redelivered requests answered again, identically");
    for (i, (_, r)) in answers.iter().enumerate() {
        let live = ok(client, "Auth.GetToken", json!({"host": format!("h{i}")}))
            .await
            .expect("result");
        let answered: &Value = &r.result.as_ref().expect("result")["token"];
        assert_eq!(
            &live["token"], answered,
            "host h{i}: the answered token is not the live one"
        );
    }
}

/// A broker with persistence, `authd serve` as a child process on a fresh data dir, and a
/// persistent client that calls as `user`.
struct Fixture {
    broker: Broker,
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    client_id: String,
    worker: WorkerProcess,
    client: Arc<Client>,
}

impl Fixture {
    async fn start(name: &str) -> Fixture {
        let broker = Broker::start();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("worker");
        let client_id = format!("authd-{name}-test");
        let worker = WorkerProcess::spawn(&broker, &data, &client_id);
        let client = persistent_client(&broker, &format!("{name}-user")).await;
        wait_answering(&client).await;
        Fixture {
            broker,
            _dir: dir,
            data,
            client_id,
            worker,
            client,
        }
    }

    fn respawn(&mut self) {
        self.worker = WorkerProcess::spawn(&self.broker, &self.data, &self.client_id);
    }

    /// Starts a stream of `n` GenerateToken requests; `done` counts answers.
    fn stream(
        &self,
        n: usize,
        w: usize,
        pace: Duration,
    ) -> (
        tokio::task::JoinHandle<Vec<(u64, Response)>>,
        Arc<AtomicUsize>,
    ) {
        let done = Arc::new(AtomicUsize::new(0));
        let stream = tokio::spawn(generate_stream(
            self.client.clone(),
            n,
            w,
            pace,
            done.clone(),
        ));
        (stream, done)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_and_answers_consistently() {
    let mut f = Fixture::start("kill").await;
    let n = 600;
    let (stream, done) = f.stream(n, 16, Duration::ZERO);
    for round in 1..=2 {
        wait_count(&done, round * n / 4).await;
        f.worker.signal("KILL");
        f.worker.wait(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(100)).await;
        f.respawn();
    }
    let answers = stream.await.unwrap();
    assert_eq!(answers.len(), n);
    check_stream(&f.client, &answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_loses_nothing() {
    let mut f = Fixture::start("term").await;
    let n = 400;
    let (stream, done) = f.stream(n, 16, Duration::ZERO);
    wait_count(&done, n / 3).await;
    f.worker.signal("TERM");
    let status = f.worker.wait(Duration::from_secs(15));
    assert!(status.success(), "SIGTERM exit status: {status}");
    // Requests published meanwhile wait at the broker for the worker's session.
    f.respawn();
    let answers = stream.await.unwrap();
    assert_eq!(answers.len(), n);
    check_stream(&f.client, &answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_under_load_lose_nothing() {
    let mut f = Fixture::start("broker-restart").await;
    let n = 600;
    // Paced, so the stream spans the restarts.
    let (stream, done) = f.stream(n, 8, Duration::from_millis(10));
    for round in 1..=3 {
        wait_count(&done, round * n / 5).await;
        tokio::task::block_in_place(|| f.broker.restart());
    }
    let answers = stream.await.unwrap();
    assert_eq!(answers.len(), n);
    check_stream(&f.client, &answers).await;
}
