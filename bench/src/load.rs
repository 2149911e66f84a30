//! One benchmark run (README, Performance): starts (unless `--broker` is given) a private mosquitto
//! with TCP_NODELAY, `authd serve` on a fresh data directory and the null worker; sends each
//! scenario's frames to both from several connections; prints throughput and latency side
//! by side, as ratios. Every answer is checked; a wrong answer fails the run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use authd::client::{Client, ClientOptions};
use authd::config::BrokerAddress;

use crate::scenario::Scenario;
use crate::setup;

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
    /// Scenarios by name (see [`crate::scenario::NAMES`]).
    pub scenarios: Vec<String>,
    /// The `authd` binary to start.
    pub authd: PathBuf,
    /// Load this many entities and rules (`authd import`) before starting authd.
    pub scale: Option<(usize, usize)>,
}

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

/// Runs the benchmark and prints the table.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    let work = setup::work_dir()?;
    let mut processes = Vec::new();
    let broker_url = match &options.broker {
        Some(url) => url.clone(),
        None => {
            let (mosquitto, url) = setup::start_mosquitto(&work).await?;
            processes.push(mosquitto);
            url
        }
    };
    let broker = BrokerAddress::parse(&broker_url)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let key = format!("bench-{}", &run_id[..16]);
    let authd_id = format!("bench-authd-{}", &run_id[..8]);
    let null_id = format!("bench-null-{}", &run_id[..8]);

    let data = work.join("authd-data");
    if let Some(scale) = options.scale {
        setup::import_scale(&options.authd, &work, &data, scale)?;
    }
    let spawned = Instant::now();
    let authd_process = setup::start_authd(&options.authd, &broker_url, &authd_id, &data, &key)?;
    let authd_pid = authd_process.id();
    processes.push(authd_process);
    processes.push(setup::start_null_worker(&broker_url, &null_id)?);

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
        let scenario = Scenario::prepare(scenario, &authd.clients).await?;
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
    let (rss, peak) = setup::resident_mib(authd_pid);
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
