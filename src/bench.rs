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
use crate::dispatch::{Outcome, Responder};
use crate::frame::{Address, Response};
use crate::Worker;

/// The ceiling's handler: parses `src` and `id`, answers `true`.
pub struct NullHandler {
    config: Arc<Config>,
}

impl Responder for NullHandler {
    async fn respond(&self, _suffix: Option<&str>, payload: &[u8], _arrived_ms: u64) -> Outcome {
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
    let worker = Worker::start_with_responder(config, handler)?;
    shutdown.await;
    worker.stop().await
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Use this broker instead of starting one.
    pub broker: Option<String>,
    /// Requests per measured run.
    pub requests: usize,
    /// Measured runs per target and scenario (alternating ceiling and authd).
    pub rounds: usize,
    /// In-flight levels to measure.
    pub in_flight: Vec<usize>,
    /// Scenarios by name (see [`SCENARIOS`]).
    pub scenarios: Vec<String>,
    /// The `authd` binary to start (default: this one).
    pub authd: PathBuf,
    /// Load this many entities and rules (`authd import`) before starting authd.
    pub scale: Option<(usize, usize)>,
}

/// The scenarios `authd bench` knows.
pub const SCENARIOS: &[&str] = &["authenticate", "authorize", "get-token", "generate-token"];

/// Devices provisioned for the `authenticate` scenario.
const DEVICES: usize = 1000;

/// One measured run: how long it took, and each request's round trip.
struct Run {
    requests: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

/// Several runs of one target, summarised: the median of the runs' rates (a shared
/// machine's noise hits whole runs), and latency quantiles over every request of them.
#[derive(Debug, Clone)]
pub struct Stats {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Stats {
    fn of(runs: Vec<Run>) -> Stats {
        let mut rates: Vec<f64> = runs.iter().map(|r| r.requests as f64 / r.seconds).collect();
        rates.sort_by(f64::total_cmp);
        let mut all: Vec<Duration> = runs.into_iter().flat_map(|r| r.latencies).collect();
        all.sort();
        let us = |q: f64| {
            all.get(((all.len() as f64 - 1.0) * q) as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Stats {
            rate: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
            p50_us: us(0.5),
            p99_us: us(0.99),
            max_us: us(1.0),
        }
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

    let data = work.join("authd-data");
    if let Some((entities, rules)) = options.scale {
        let file = work.join("scale.jsonl");
        write_scale_file(&file, entities, rules)?;
        let started = Instant::now();
        let out = Command::new(&options.authd)
            .arg("import")
            .arg("--data")
            .arg(&data)
            .arg(&file)
            .output()
            .context("running authd import")?;
        if !out.status.success() {
            bail!(
                "authd import failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!(
            "scale: imported {entities} entities and {rules} rules in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let _ = std::fs::remove_file(&file);
    }
    let spawned = Instant::now();
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
        .arg(&data)
        .env("AUTHD_CALLER_KEYS", format!("bench:admin:{key}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting authd serve")?;
    let authd_pid = child.id();
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
    let cold_start = spawned.elapsed();
    let null = Target::connect("ceiling", connect(&null_id)).await?;

    println!(
        "authd bench: {} rounds of {} requests per target (rates: median round; latency: all requests), broker {broker_url}, {} cores",
        options.rounds,
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
            // Warm-up, then rounds that alternate the ceiling and authd, so that a noisy
            // spell on the shared machine falls on both.
            let warm = (options.requests / 10).max(w);
            load(&null, &scenario, warm, w, true).await?;
            load(&authd, &scenario, warm, w, false).await?;
            let (mut ceiling_runs, mut authd_runs) = (Vec::new(), Vec::new());
            for _ in 0..options.rounds {
                ceiling_runs.push(load(&null, &scenario, options.requests, w, true).await?);
                authd_runs.push(load(&authd, &scenario, options.requests, w, false).await?);
            }
            let (c, a) = (Stats::of(ceiling_runs), Stats::of(authd_runs));
            println!(
                "{:<16} {:>4} | {:>10.0} {:>10.0} {:>6.2} | {:>7.0}us {:>7.0}us {:>6.2} | {:>7.0}us {:>7.0}us | {:>7.0}us {:>7.0}us",
                scenario.name,
                w,
                c.rate,
                a.rate,
                a.rate / c.rate,
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
    let (rss, peak) = resident_mib(authd_pid);
    println!(
        "authd: cold start (spawn to first answer) {:.0} ms; resident memory {rss:.0} MiB, peak {peak:.0} MiB",
        cold_start.as_secs_f64() * 1000.0
    );
    for target in [authd, null] {
        target.close().await;
    }
    drop(processes);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// VmRSS and VmHWM of a process, MiB (0 where /proc does not say).
fn resident_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Import lines for `entities` entities (the bench devices first) and `rules` rules, none
/// of which match the scenarios' callers, so answers stay as without them.
fn write_scale_file(path: &std::path::Path, entities: usize, rules: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for d in 0..entities {
        let args = if d < DEVICES {
            device(d)
        } else {
            json!({"id": format!("scale-dev-{d}"), "psk": format!("scale-psk-{d}"), "owner": format!("scale-user-{}", d % 10_000)})
        };
        writeln!(out, "{}", json!({"method": "Entity.Put", "args": args}))?;
    }
    for r in 0..rules {
        // Mostly literal rules, a fifth with wildcards, as an operator's rule set might be.
        let (src, dst, cmd) = match r % 5 {
            0 => (
                format!("scale-team-{r}-*"),
                "scale-dev-*".to_string(),
                "Sys.*".to_string(),
            ),
            _ => (
                format!("scale-user-{r}"),
                format!("scale-dev-{r}"),
                format!("Cmd.{}", r % 50),
            ),
        };
        let effect = if r % 13 == 0 { "deny" } else { "allow" };
        let args = json!({"src": src, "dst": dst, "cmd": cmd, "effect": effect});
        writeln!(out, "{}", json!({"method": "ACL.Add", "args": args}))?;
    }
    out.flush()?;
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
            // Short tries: a request sent before the worker subscribed is lost, and the
            // try's timeout bounds how precisely the cold start is measured.
            let r = clients[0]
                .call("Auth.ListToken", json!({}), Duration::from_millis(20))
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
    /// `check(i, result)`: is this the expected answer to request i?
    check: fn(usize, &Value) -> bool,
}

impl Scenario {
    async fn prepare(name: &str, authd: &Target, _requests: usize) -> anyhow::Result<Scenario> {
        match name {
            "authenticate" => {
                provision_devices(authd).await?;
                Ok(Scenario {
                    name: "authenticate",
                    method: "Auth.Authenticate",
                    args: |i| {
                        let d = i % DEVICES;
                        json!({"id": format!("bench-dev-{d}"), "credentials": {"psk": format!("bench-psk-{d}")}})
                    },
                    check: |_, r| *r == json!(true),
                })
            }
            "authorize" => {
                provision_devices(authd).await?;
                let admin = &authd.clients[0];
                for (src, dst, cmd, effect) in [
                    ("bench-ops-*", "bench-dev-*", "Sys.*", "allow"),
                    ("*", "bench-dev-13", "Sys.Reboot", "deny"),
                ] {
                    let rule = json!({"src": src, "dst": dst, "cmd": cmd, "effect": effect});
                    ensure_ok(admin.call("ACL.Add", rule, Duration::from_secs(5)).await?)?;
                }
                Ok(Scenario {
                    name: "authorize",
                    method: "Auth.AuthorizeCommand",
                    // A third each: the owner, an operator allowed by a wildcard rule, a
                    // stranger; bench-dev-13 is denied to everyone.
                    args: |i| {
                        let d = i % DEVICES;
                        let src = match i % 3 {
                            0 => format!("bench-user-{}", d % 100),
                            1 => "bench-ops-1".into(),
                            _ => "stranger".into(),
                        };
                        json!({"src": src, "dst": format!("bench-dev-{d}"), "cmd": "Sys.Reboot"})
                    },
                    check: |i, r| *r == json!(i % 3 != 2 && i % DEVICES != 13),
                })
            }
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
                    check: |_, r| {
                        r["exist"] == json!(true)
                            && r["token"].as_str().is_some_and(|t| t.starts_with("authd_"))
                    },
                })
            }
            "generate-token" => Ok(Scenario {
                name: "generate-token",
                method: "Auth.GenerateToken",
                args: |i| json!({"host": format!("app-{}", i % 1000)}),
                check: |_, r| r["token"].as_str().is_some_and(|t| t.starts_with("authd_")),
            }),
            other => bail!(
                "unknown scenario `{other}` (known: {})",
                SCENARIOS.join(", ")
            ),
        }
    }
}

/// Creates `bench-dev-<i>` with PSK `bench-psk-<i>`, a few calls in flight per client.
async fn provision_devices(authd: &Target) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for k in 0..authd.clients.len() * 8 {
        let client = authd.clients[k % authd.clients.len()].clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let d = next.fetch_add(1, Ordering::Relaxed);
                if d >= DEVICES {
                    return Ok::<_, anyhow::Error>(());
                }
                let args = device(d);
                ensure_ok(
                    client
                        .call("Entity.Put", args, Duration::from_secs(10))
                        .await?,
                )?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The Entity.Put arguments of bench device `d`.
fn device(d: usize) -> Value {
    json!({"id": format!("bench-dev-{d}"), "psk": format!("bench-psk-{d}"), "owner": format!("bench-user-{}", d % 100)})
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
) -> anyhow::Result<Run> {
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
                    (Some(v), None) => check(i, v),
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
    Ok(Run {
        requests: n,
        seconds: start.elapsed().as_secs_f64(),
        latencies: all,
    })
}
