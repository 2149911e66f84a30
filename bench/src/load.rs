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
    /// Also measure authd on this PostgreSQL server (a database for each target is made
    /// there for the run and dropped after): one worker, and `pg_workers` in a share group.
    pub store: Option<String>,
    /// Workers on the PostgreSQL store for the share-group target (0 or 1: none).
    pub pg_workers: usize,
    /// Targets to measure besides the ceiling: `sled`, `pg`, `pgN` (default: all there are).
    pub only: Vec<String>,
    /// Another build's `authd-bench`, whose null worker is measured too (row `baseline`).
    pub baseline: Option<PathBuf>,
}

/// One measured run: how long it took, and each request's round trip.
struct Run {
    requests: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

/// One target's measured runs in a table row, and the CPU time they cost: the target's
/// processes, the broker's and this load generator's (seconds).
#[derive(Default)]
struct Tally {
    runs: Vec<Run>,
    cpu: f64,
    broker: f64,
    generator: f64,
    /// Database round trips.
    trips: f64,
}

impl Tally {
    /// Runs `run`, adding it and the CPU time of `(target, broker, generator)` processes
    /// during it.
    async fn measure(
        &mut self,
        (target, broker, generator): (&[u32], &[u32], &[u32]),
        run: impl std::future::Future<Output = anyhow::Result<Run>>,
    ) -> anyhow::Result<()> {
        let before = [target, broker, generator].map(setup::cpu_seconds);
        self.runs.push(run.await?);
        let after = [target, broker, generator].map(setup::cpu_seconds);
        self.cpu += after[0] - before[0];
        self.broker += after[1] - before[1];
        self.generator += after[2] - before[2];
        Ok(())
    }
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
        Stats {
            rate: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
            ..Stats::of_latencies(runs.into_iter().flat_map(|r| r.latencies).collect())
        }
    }

    /// Latency quantiles alone (`rate` 0).
    fn of_latencies(mut all: Vec<Duration>) -> Stats {
        all.sort();
        let us = |q: f64| {
            all.get(((all.len() as f64 - 1.0) * q) as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Stats {
            rate: 0.0,
            p50_us: us(0.5),
            p99_us: us(0.99),
            max_us: us(1.0),
        }
    }
}

/// One authd deployment under measure: its processes' ids and metrics addresses.
struct AuthdTarget {
    label: String,
    /// Its service id: requests on `{id}/rpc`, events on `{id}/events`.
    id: String,
    /// Change events on.
    events: bool,
    target: Target,
    pids: Vec<u32>,
    metrics: Vec<String>,
    cold_start: Duration,
}

impl AuthdTarget {
    /// Database round trips the target's workers have made so far.
    async fn round_trips(&self) -> f64 {
        let mut total = 0.0;
        for addr in &self.metrics {
            total += setup::scrape(addr, "authd_store_round_trips_total")
                .await
                .unwrap_or(0.0);
        }
        total
    }
}

/// Runs the benchmark and prints the table.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    let work = setup::work_dir()?;
    // Stopped in reverse order however the run ends: the broker last, so the workers
    // stop while it can still take their goodbyes.
    let mut processes = setup::Processes::default();
    // The broker's process, when the run started it: its CPU per request is measured too.
    let mut broker_pid: Vec<u32> = Vec::new();
    let broker_url = match &options.broker {
        Some(url) => url.clone(),
        None => {
            let (mosquitto, url) = setup::start_mosquitto(&work).await?;
            broker_pid.push(mosquitto.id());
            processes.push(mosquitto);
            url
        }
    };
    let broker = BrokerAddress::parse(&broker_url)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let key = format!("bench-{}", &run_id[..16]);
    let null_id = format!("bench-null-{}", &run_id[..8]);
    let connect = |id: &str| {
        let mut o = ClientOptions::new(broker.clone());
        o.service_id = id.to_owned();
        o.request_topic = format!("{id}/rpc");
        o.key = Some(key.clone());
        o
    };
    let wanted = |label: &str| options.only.is_empty() || options.only.iter().any(|o| o == label);

    // The embedded store's data directory, loaded first when a scale is asked for; each
    // PostgreSQL target's database gets the same records through `authd export` and
    // `authd import` (moving in, as an operator would).
    let data = work.join("authd-data");
    if let Some(scale) = options.scale {
        setup::import_scale(&options.authd, &work, &data, scale)?;
    }
    // One database per PostgreSQL target: workers of one database are one deployment (one
    // event publisher among them, one seq), whatever their service ids.
    let mut databases: Vec<setup::Database> = Vec::new();

    // (label, on PostgreSQL, workers, change events on). The `-noev` targets (events off)
    // are measured only when --only names them: they are the baseline of what events cost.
    let mut plans: Vec<(String, bool, usize, bool)> = vec![
        ("sled".into(), false, 1, true),
        ("sled-noev".into(), false, 1, false),
    ];
    if options.store.is_some() {
        plans.push(("pg".into(), true, 1, true));
        if options.pg_workers > 1 {
            plans.push((
                format!("pg{}", options.pg_workers),
                true,
                options.pg_workers,
                true,
            ));
        }
        plans.push(("pg-noev".into(), true, 1, false));
    }
    let mut targets: Vec<AuthdTarget> = Vec::new();
    for (label, on_pg, n, events) in plans {
        let chosen = if events {
            wanted(&label)
        } else {
            options.only.contains(&label)
        };
        if !chosen {
            continue;
        }
        let id = format!("bench-{label}-{}", &run_id[..8]);
        let group = (n > 1).then(|| format!("g{}", &run_id[..8]));
        let store = match (&options.store, on_pg) {
            (Some(server), true) => {
                let name = format!("authd_bench_{}_{}", &run_id[..12], label.replace('-', "_"));
                let db = setup::Database::create(server, &name).await?;
                if options.scale.is_some() {
                    setup::move_in(&options.authd, &work, &data, &db.url)?;
                }
                databases.push(db);
                databases.last().map(|db| db.url.as_str())
            }
            _ => None,
        };
        let spawned = Instant::now();
        let (mut pids, mut metrics) = (Vec::new(), Vec::new());
        for w in 0..n {
            // The embedded store's worker runs on `data` (loaded with --scale); each
            // PostgreSQL worker has a data directory of its own with the same server key.
            let dir = match (on_pg, label.as_str()) {
                (false, "sled") => data.clone(),
                (false, _) => work.join(&label),
                (true, _) => {
                    let dir = work.join(format!("{label}-{w}"));
                    setup::share_key(&data, &dir)?;
                    dir
                }
            };
            let (p, m) = setup::start_authd(
                &options.authd,
                &broker_url,
                &id,
                &format!("{id}-{w}"),
                &dir,
                &key,
                store,
                group.as_deref(),
                events,
            )?;
            pids.push(p.id());
            metrics.push(m);
            processes.push(p);
        }
        let name = if on_pg {
            "authd (PostgreSQL)"
        } else {
            "authd (sled)"
        };
        let target = Target::connect(name, connect(&id)).await?;
        targets.push(AuthdTarget {
            label,
            id,
            events,
            target,
            pids,
            metrics,
            cold_start: spawned.elapsed(),
        });
    }
    let null_worker = setup::start_null_worker(None, &broker_url, &null_id)?;
    let null_pid = [null_worker.id()];
    processes.push(null_worker);
    let null = Target::connect("ceiling", connect(&null_id)).await?;
    let baseline = match &options.baseline {
        Some(binary) => {
            let id = format!("bench-baseline-{}", &run_id[..8]);
            let worker = setup::start_null_worker(Some(binary), &broker_url, &id)?;
            let pid = [worker.id()];
            processes.push(worker);
            Some((Target::connect("baseline", connect(&id)).await?, pid))
        }
        None => None,
    };
    let own_pid = [std::process::id()];

    println!(
        "authd bench: {} rounds of {} requests per target (rates: median round; latency: all requests), broker {broker_url}, {} cores",
        options.rounds,
        options.requests,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("targets: ceiling = the null worker; baseline = another build's null worker (--baseline); sled = authd on the embedded store; pg = one authd on PostgreSQL; pgN = N workers on PostgreSQL in one share group; -noev = change events off. trips = database round trips per request. cpu = the target's CPU time (user + system) per request: authd's (all its workers), or the null worker's on the ceiling row. broker = the broker's CPU time per request during that target's runs (when the run started the broker). gen = this load generator's.");
    println!(
        "{:<15} {:>3} {:<9} | {:>8} {:>6} | {:>8} {:>6} | {:>8} {:>8} | {:>5} {:>7} {:>7} {:>7}",
        "scenario",
        "W",
        "target",
        "req/s",
        "ratio",
        "p50",
        "ratio",
        "p99",
        "max",
        "trips",
        "cpu",
        "broker",
        "gen"
    );
    for scenario in &options.scenarios {
        // Each target provisions its own store; the scenario is the same for all.
        let mut prepared = None;
        for t in &targets {
            prepared = Some(Scenario::prepare(scenario, &t.target.clients).await?);
        }
        let Some(scenario) = prepared else {
            bail!("no authd target to measure (see --only)");
        };
        for &w in &options.in_flight {
            // Warm-up, then rounds that alternate the ceiling and each target, so that a
            // noisy spell on the shared machine falls on all.
            let warm = (options.requests / 10).max(w);
            load(&null, &scenario, warm, w, true).await?;
            if let Some((b, _)) = &baseline {
                load(b, &scenario, warm, w, true).await?;
            }
            for t in &targets {
                load(&t.target, &scenario, warm, w, false).await?;
            }
            let mut ceiling = Tally::default();
            let mut base = Tally::default();
            let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
            for _ in 0..options.rounds {
                let pids = (&null_pid[..], &broker_pid[..], &own_pid[..]);
                ceiling
                    .measure(pids, load(&null, &scenario, options.requests, w, true))
                    .await?;
                if let Some((b, pid)) = &baseline {
                    let pids = (&pid[..], &broker_pid[..], &own_pid[..]);
                    base.measure(pids, load(b, &scenario, options.requests, w, true))
                        .await?;
                }
                for (i, t) in targets.iter().enumerate() {
                    let trips0 = t.round_trips().await;
                    let pids = (&t.pids[..], &broker_pid[..], &own_pid[..]);
                    let run = load(&t.target, &scenario, options.requests, w, false);
                    tallies[i].measure(pids, run).await?;
                    tallies[i].trips += t.round_trips().await - trips0;
                }
            }
            let measured = (options.rounds * options.requests) as f64;
            let per_request = |seconds: f64| format!("{:.1}us", seconds / measured * 1e6);
            let broker = |seconds: f64| match broker_pid.is_empty() {
                true => String::from("-"),
                false => per_request(seconds),
            };
            let c = Stats::of(std::mem::take(&mut ceiling.runs));
            println!(
                "{:<15} {:>3} {:<9} | {:>8.0} {:>6} | {:>6.0}us {:>6} | {:>6.0}us {:>6.0}us | {:>5} {:>7} {:>7} {:>7}",
                scenario.name, w, "ceiling", c.rate, "1.00", c.p50_us, "1.00", c.p99_us, c.max_us, "",
                per_request(ceiling.cpu), broker(ceiling.broker), per_request(ceiling.generator)
            );
            let mut rows: Vec<(&str, Tally, String)> = Vec::new();
            if baseline.is_some() {
                rows.push(("baseline", base, String::new()));
            }
            for (t, tally) in targets.iter().zip(tallies) {
                let trips = match t.label.starts_with("sled") {
                    true => String::from("-"),
                    false => format!("{:.2}", tally.trips / measured),
                };
                rows.push((&t.label, tally, trips));
            }
            for (label, tally, trips) in rows {
                let a = Stats::of(tally.runs);
                println!(
                    "{:<15} {:>3} {:<9} | {:>8.0} {:>6.2} | {:>6.0}us {:>6.2} | {:>6.0}us {:>6.0}us | {:>5} {:>7} {:>7} {:>7}",
                    "", w, label, a.rate, a.rate / c.rate, a.p50_us, a.p50_us / c.p50_us, a.p99_us, a.max_us, trips,
                    per_request(tally.cpu), broker(tally.broker), per_request(tally.generator)
                );
            }
        }
    }
    if !targets.is_empty() && options.scenarios.iter().any(|s| s == "generate-token") {
        println!(
            "revocation -> event: RevokeToken's reply to the token.revoked event's arrival on {{id}}/events (a subscriber on the same broker), {} revocations per row",
            REVOCATIONS
        );
        println!(
            "{:<7} {:>3} | {:>8} {:>8} {:>8} | {:>12} {:>12} | {:>14}",
            "target", "W", "p50", "p99", "max", "p50 from req", "p99 from req", "event first"
        );
    }
    for t in targets.iter().filter(|t| t.events) {
        if !options.scenarios.iter().any(|s| s == "generate-token") {
            break;
        }
        for w in [1usize, 16] {
            let l = revocation_latency(&connect(&t.id), &t.id, REVOCATIONS, w).await?;
            println!(
                "{:<7} {:>3} | {:>6.0}us {:>6.0}us {:>6.0}us | {:>10.0}us {:>10.0}us | {:>6} of {:>5}",
                t.label, w, l.from_reply.p50_us, l.from_reply.p99_us, l.from_reply.max_us,
                l.from_request.p50_us, l.from_request.p99_us, l.early, REVOCATIONS
            );
        }
    }
    for t in &targets {
        let (mut rss, mut peak) = (0.0, 0.0);
        for pid in &t.pids {
            let (r, p) = setup::resident_mib(*pid);
            rss += r;
            peak += p;
        }
        println!(
            "authd {}: cold start (spawn to first answer) {:.0} ms; resident memory {rss:.0} MiB, peak {peak:.0} MiB (all its workers)",
            t.label,
            t.cold_start.as_secs_f64() * 1000.0
        );
    }
    for t in targets {
        t.target.close().await;
    }
    null.close().await;
    drop(processes);
    for db in databases {
        db.drop_database().await?;
    }
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

/// Revocations timed per row of the revocation-to-event table.
const REVOCATIONS: usize = 2000;

/// How long after a revocation its event arrived.
struct EventLatency {
    /// From RevokeToken's reply (0 when the event came first).
    from_reply: Stats,
    /// From sending the RevokeToken.
    from_request: Stats,
    /// Events that arrived before the reply.
    early: usize,
}

/// Issues and revokes `n` tokens, `w` at a time, on a connection that also follows the
/// target's events, and times each `token.revoked` from the revocation's reply and request.
async fn revocation_latency(
    options: &ClientOptions,
    id: &str,
    n: usize,
    w: usize,
) -> anyhow::Result<EventLatency> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    let mut o = options.clone();
    o.src = format!("bench-revoker-{}", uuid::Uuid::new_v4().simple());
    o.subscriptions = vec![format!("{id}/events")];
    let client = Arc::new(Client::connect(o, Duration::from_secs(10)).await?);
    type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>>;
    let waiting: Waiting = Arc::default();
    let reader = {
        let (client, waiting) = (client.clone(), waiting.clone());
        let user = client.src().to_owned();
        tokio::spawn(async move {
            while let Some((_, payload)) = client.next_message().await {
                let at = Instant::now();
                let Ok(event) = serde_json::from_slice::<serde_json::Value>(&payload) else {
                    continue;
                };
                if event["type"] == "token.revoked" && event["user"] == user.as_str() {
                    let host = event["host"].as_str().unwrap_or_default();
                    let found = waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(host);
                    if let Some(tx) = found {
                        let _ = tx.send(at);
                    }
                }
            }
        })
    };
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..w {
        let (client, waiting, next) = (client.clone(), waiting.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(out);
                }
                let host = format!("revoke-{i}");
                let args = json!({ "host": host });
                let timeout = Duration::from_secs(10);
                let r = client
                    .call("Auth.GenerateToken", args.clone(), timeout)
                    .await?;
                if r.error.is_some() {
                    bail!("GenerateToken {i}: {:?}", r.error);
                }
                let (tx, rx) = oneshot::channel();
                waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(host, tx);
                let sent = Instant::now();
                let r = client.call("Auth.RevokeToken", args, timeout).await?;
                let replied = Instant::now();
                if r.error.is_some() {
                    bail!("RevokeToken {i}: {:?}", r.error);
                }
                let arrived = tokio::time::timeout(timeout, rx)
                    .await
                    .with_context(|| format!("no token.revoked event for revocation {i}"))??;
                out.push((sent, replied, arrived));
            }
        }));
    }
    let mut times = Vec::with_capacity(n);
    for t in tasks {
        times.extend(t.await.context("revocation task")??);
    }
    reader.abort();
    let early = times.iter().filter(|(_, r, a)| a < r).count();
    let from_reply = times
        .iter()
        .map(|(_, r, a)| a.saturating_duration_since(*r))
        .collect();
    let from_request = times.iter().map(|(s, _, a)| *a - *s).collect();
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
    }
    Ok(EventLatency {
        from_reply: Stats::of_latencies(from_reply),
        from_request: Stats::of_latencies(from_request),
        early,
    })
}
