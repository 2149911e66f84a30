//! PostgreSQL stopped and started again under load (issue 13): the worker says it is not
//! ready, holds what it cannot answer (no wrong answer, no error reply), reconnects, and
//! answers everything. The database server is a private one this test starts (initdb on
//! a free port), so that it can be stopped without touching anyone else's.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// A PostgreSQL server of our own, in a temporary directory. Stopped on drop.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect(
                "PostgreSQL server binaries in /usr/lib/postgresql (apt-get install postgresql)",
            )
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().unwrap();
        // initdb refuses to run as root: the server runs as `postgres` then.
        if is_root() {
            assert!(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success());
        }
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
            bin,
        };
        pg.run(
            "initdb",
            &["-A", "trust", "-U", "postgres", "--no-sync", "-D"],
            true,
        );
        pg.ctl("start");
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str], with_data: bool) {
        let exe = self.bin.join(tool);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        command.args(args);
        if with_data {
            command.arg(self.data());
        }
        let out = command
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        let data = self.data();
        let args: Vec<&str> = match action {
            "start" => vec![
                "start",
                "-w",
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-D",
                data.to_str().unwrap(),
            ],
            // Immediate: like a crash of the server, no checkpoint, connections cut.
            _ => vec![
                "stop",
                "-w",
                "-m",
                "immediate",
                "-D",
                data.to_str().unwrap(),
            ],
        };
        self.run("pg_ctl", &args, false);
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = Command::new(if is_root() { "runuser" } else { "true" })
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&data)
            .output();
        if !is_root() {
            let _ = Command::new(self.bin.join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&data)
                .output();
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn create_database(pg: &PrivatePostgres, name: &str) {
    let out = Command::new(pg.bin.join("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-c",
        ])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_for_status(addr: SocketAddr, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (code, _) = tokio::task::spawn_blocking(move || http_get(addr, "/ready"))
            .await
            .unwrap();
        if code == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/ready never said {want} (last {code})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_nothing() {
    let pg = PrivatePostgres::start();
    create_database(&pg, "authd");
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = embedded_worker_config(&broker, data.path());
    config.store = Some(pg.url("authd").into());
    config.store_timeout_ms = 1000;
    config.metrics = Some(metrics.to_string());
    let worker = authd::Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready()).await.unwrap();
    let admin = client(&broker, Some(ADMIN_KEY), None).await;
    for d in 0..50 {
        ok(
            &admin,
            "/v1/Entity.Put",
            json!({"id": format!("dev{d}"), "psk": format!("dev{d} psk")}),
        )
        .await;
    }
    let backend = std::sync::Arc::new(client(&broker, Some(SERVICE_KEY), Some("alice")).await);

    // A steady stream of sign-ins and new tokens, through the outage.
    let mut calls = Vec::new();
    let started = Instant::now();
    let mut stopped_at = None;
    let mut restarted = false;
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let c = backend.clone();
        calls.push(tokio::spawn(async move {
            let r = if n % 2 == 0 {
                c.call(
                    "/v1/Auth.GenerateToken",
                    json!({"host": format!("h{n}")}),
                    Duration::from_secs(60),
                )
                .await
            } else {
                c.call(
                    "/v1/Auth.Authenticate",
                    json!({"id": format!("dev{}", n % 50), "credentials": {"psk": format!("dev{} psk", n % 50)}}),
                    Duration::from_secs(60),
                )
                .await
            };
            (n, r)
        }));
        n += 1;
        if stopped_at.is_none() && started.elapsed() > Duration::from_secs(1) {
            pg.ctl("stop");
            stopped_at = Some(Instant::now());
            wait_for_status(metrics, 503, Duration::from_secs(10)).await;
        }
        if !restarted && stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            assert_eq!(
                http_get(metrics, "/ready").0,
                503,
                "not ready while the database is down"
            );
            pg.ctl("start");
            restarted = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_status(metrics, 200, Duration::from_secs(20)).await;

    let mut tokens = Vec::new();
    for call in calls {
        let (n, r) = call.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("request {n} unanswered: {e}"));
        assert!(r.error.is_none(), "request {n}: {:?}", r.error);
        if n % 2 == 0 {
            tokens.push((n, r.result.unwrap()["token"].as_str().unwrap().to_owned()));
        } else {
            assert_eq!(r.result, Some(json!(true)), "request {n}");
        }
    }
    // Every token answered is the live one of its host.
    let listed = ok(&backend, "/v1/Auth.ListToken", json!({})).await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), tokens.len(), "{listed}");
    for (n, token) in tokens.iter().step_by(7) {
        let live = ok(
            &backend,
            "/v1/Auth.GetToken",
            json!({"host": format!("h{n}")}),
        )
        .await
        .unwrap();
        assert_eq!(live["token"].as_str(), Some(token.as_str()), "h{n}");
    }
    let (_, scrape) = http_get(metrics, "/metrics");
    let held: f64 = scrape
        .lines()
        .find(|l| l.starts_with("authd_requests_held_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(
        held > 0.0,
        "requests were held during the outage:\n{scrape}"
    );
    worker.stop().await.unwrap();
}
