//! `authd bench`: a load generator that speaks the wire protocol, and the null worker that
//! sets the ceiling beside it (SPEC §9).
//!
//! One run starts (unless `--broker` is given) its own mosquitto with TCP_NODELAY on a free
//! port, an `authd serve` process on a fresh data directory, and an `authd null-worker`
//! process: the same MQTT stack (persistent session, manual ordered acks, a task per
//! request) that parses `src`/`id` and answers `true`. Each scenario sends the same frames
//! to both and prints throughput and latency side by side, as ratios. Every answer is
//! checked against the expected one; a wrong answer fails the run.

use std::borrow::Cow;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client::{Client, ClientOptions};
use crate::config::{BrokerAddress, Config};
use crate::dispatch::{FrameHandler, Outcome};
use crate::frame::{Address, Response};
use crate::Worker;

/// The ceiling's handler: parses `src` and `id`, answers `true`.
pub struct NullHandler {
    config: Arc<Config>,
}

impl FrameHandler for NullHandler {
    fn handle(&self, _suffix: Option<&str>, payload: &[u8], _arrived_ms: u64) -> Outcome {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            src: Cow<'a, str>,
            id: u64,
        }
        let Ok(head) = serde_json::from_slice::<Head<'_>>(payload) else {
            return Outcome::default();
        };
        let to = Address {
            src: head.src,
            id: head.id,
            tag: None,
            nr: false,
        };
        Outcome {
            reply: Some((
                self.config.reply_topic(&to.src),
                crate::frame::encode_result(&self.config.id, &to, Some(&true)),
            )),
            needs_durability: false,
            // Counted like authd's requests, so the ceiling pays the same metrics cost.
            label: Some(crate::metrics::RequestLabel::ok(None)),
        }
    }
}

/// Runs the null worker until `shutdown`: the same serving path as authd (session, task
/// per request, ordered manual acks), with [`NullHandler`] in place of the dispatcher.
pub async fn null_worker(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let handler = Arc::new(NullHandler {
        config: Arc::new(config.clone()),
    });
    let worker = Worker::start_with_handler(config, handler)?;
    shutdown.await;
    worker.stop().await
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Use this broker instead of starting one.
    pub broker: Option<String>,
    /// Requests per scenario.
    pub requests: usize,
    /// In-flight levels to measure.
    pub in_flight: Vec<usize>,
    /// Scenarios by name (see [`SCENARIOS`]).
    pub scenarios: Vec<String>,
    /// The `authd` binary to start (default: this one).
    pub authd: PathBuf,
}

/// The scenarios `authd bench` knows.
pub const SCENARIOS: &[&str] = &["get-token", "generate-token"];

/// One measured run.
#[derive(Debug, Clone)]
pub struct Stats {
    pub requests: usize,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Stats {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        // SIGTERM first so authd flushes; then make sure.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs the benchmark and prints the table.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    let work = tempfile_dir()?;
    let mut processes = Vec::new();
    let broker_url = match &options.broker {
        Some(url) => url.clone(),
        None => {
            let port = free_port()?;
            let conf = work.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_inflight_messages 256\nmax_queued_messages 100000\npersistence false\n"),
            )?;
            let child = Command::new("/usr/sbin/mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting /usr/sbin/mosquitto (or pass --broker)")?;
            processes.push(Process(child));
            wait_port(port).await?;
            format!("mqtt://127.0.0.1:{port}")
        }
    };
    let broker = BrokerAddress::parse(&broker_url)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let key = format!("bench-{}", &run_id[..16]);
    let authd_id = format!("bench-authd-{}", &run_id[..8]);
    let null_id = format!("bench-null-{}", &run_id[..8]);

    let child = Command::new(&options.authd)
        .args([
            "serve",
            "--broker",
            &broker_url,
            "--id",
            &authd_id,
            "--client-id",
            &authd_id,
        ])
        .arg("--data")
        .arg(work.join("authd-data"))
        .env("AUTHD_CALLER_KEYS", format!("bench:admin:{key}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting authd serve")?;
    processes.push(Process(child));
    let child = Command::new(&options.authd)
        .args(["null-worker", "--broker", &broker_url, "--id", &null_id])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting authd null-worker")?;
    processes.push(Process(child));

    let connect = |id: &str| {
        let mut o = ClientOptions::new(broker.clone());
        o.service_id = id.to_owned();
        o.request_topic = format!("{id}/rpc");
        o.key = Some(key.clone());
        o
    };
    let authd = Target::connect("authd", connect(&authd_id)).await?;
    let null = Target::connect("ceiling", connect(&null_id)).await?;

    println!(
        "authd bench: {} requests per run, broker {broker_url}, {} cores",
        options.requests,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<16} {:>4} | {:>10} {:>10} {:>6} | {:>9} {:>9} {:>6} | {:>9} {:>9} | {:>9} {:>9}",
        "scenario",
        "W",
        "ceil/s",
        "authd/s",
        "ratio",
        "ceil p50",
        "authd p50",
        "ratio",
        "ceil p99",
        "authd p99",
        "ceil max",
        "authd max"
    );
    for scenario in &options.scenarios {
        let scenario = Scenario::prepare(scenario, &authd, options.requests).await?;
        for &w in &options.in_flight {
            // Warm-up, then the ceiling and authd back to back.
            let warm = (options.requests / 10).max(w);
            load(&null, &scenario, warm, w, true).await?;
            load(&authd, &scenario, warm, w, false).await?;
            let c = load(&null, &scenario, options.requests, w, true).await?;
            let a = load(&authd, &scenario, options.requests, w, false).await?;
            println!(
                "{:<16} {:>4} | {:>10.0} {:>10.0} {:>6.2} | {:>7.0}us {:>7.0}us {:>6.2} | {:>7.0}us {:>7.0}us | {:>7.0}us {:>7.0}us",
                scenario.name,
                w,
                c.rate(),
                a.rate(),
                a.rate() / c.rate(),
                c.p50_us,
                a.p50_us,
                a.p50_us / c.p50_us,
                c.p99_us,
                a.p99_us,
                c.max_us,
                a.max_us
            );
        }
    }
    for target in [authd, null] {
        target.close().await;
    }
    drop(processes);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("authd-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("mosquitto did not start listening on port {port}")
}

/// A worker under load: several client connections, so the client is not the bottleneck.
struct Target {
    clients: Vec<Arc<Client>>,
}

impl Target {
    async fn connect(name: &'static str, options: ClientOptions) -> anyhow::Result<Target> {
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut o = options.clone();
            o.src = format!("bench-client-{}", uuid::Uuid::new_v4().simple());
            clients.push(Arc::new(Client::connect(o, Duration::from_secs(10)).await?));
        }
        // Wait until the worker answers (it may still be starting).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = clients[0]
                .call("Auth.ListToken", json!({}), Duration::from_millis(500))
                .await;
            if r.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} worker did not answer within 20 s");
            }
        }
        Ok(Target { clients })
    }

    async fn close(self) {
        for c in self.clients {
            if let Ok(c) = Arc::try_unwrap(c) {
                c.close().await;
            }
        }
    }
}

/// A request mix and how to check its answers.
struct Scenario {
    name: &'static str,
    method: &'static str,
    /// `args(i)` for request i.
    args: fn(usize) -> Value,
    check: fn(&Value) -> bool,
}

impl Scenario {
    async fn prepare(name: &str, authd: &Target, _requests: usize) -> anyhow::Result<Scenario> {
        match name {
            "get-token" => {
                // Each bench client (the token's user) gets a token for host "app".
                for c in &authd.clients {
                    ensure_ok(
                        c.call(
                            "Auth.GenerateToken",
                            json!({"host": "app"}),
                            Duration::from_secs(5),
                        )
                        .await?,
                    )?;
                }
                Ok(Scenario {
                    name: "get-token",
                    method: "Auth.GetToken",
                    args: |_| json!({"host": "app"}),
                    check: |r| {
                        r["exist"] == json!(true)
                            && r["token"].as_str().is_some_and(|t| t.starts_with("authd_"))
                    },
                })
            }
            "generate-token" => Ok(Scenario {
                name: "generate-token",
                method: "Auth.GenerateToken",
                args: |i| json!({"host": format!("app-{}", i % 1000)}),
                check: |r| r["token"].as_str().is_some_and(|t| t.starts_with("authd_")),
            }),
            other => bail!(
                "unknown scenario `{other}` (known: {})",
                SCENARIOS.join(", ")
            ),
        }
    }
}

fn ensure_ok(r: Response) -> anyhow::Result<Value> {
    match (r.result, r.error) {
        (_, Some(e)) => bail!("setup call failed: {e}"),
        (r, None) => Ok(r.unwrap_or(Value::Null)),
    }
}

/// Sends `n` requests with `w` in flight; checks every answer.
async fn load(
    target: &Target,
    scenario: &Scenario,
    n: usize,
    w: usize,
    ceiling: bool,
) -> anyhow::Result<Stats> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..w {
        let next = next.clone();
        let client = target.clients[k % target.clients.len()].clone();
        let (method, args, check) = (scenario.method, scenario.args, scenario.check);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let frame = client.frame(method, args(i));
                let t = Instant::now();
                let r = client.call_frame(&frame, Duration::from_secs(10)).await?;
                lat.push(t.elapsed());
                let ok = match (&r.result, &r.error) {
                    (_, Some(e)) => bail!("request {i} got error {e}"),
                    (Some(v), None) if ceiling => *v == json!(true),
                    (Some(v), None) => check(v),
                    (None, None) => false,
                };
                if !ok {
                    bail!("request {i}: unexpected answer {:?}", r.result);
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.context("load task")??);
    }
    let seconds = start.elapsed().as_secs_f64();
    all.sort();
    let us = |q: f64| all[((all.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    Ok(Stats {
        requests: n,
        seconds,
        p50_us: us(0.5),
        p99_us: us(0.99),
        max_us: us(1.0),
    })
}
