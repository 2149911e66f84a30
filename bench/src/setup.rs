//! The processes a benchmark run starts, each stopped when dropped: a private mosquitto,
//! `authd serve` on a fresh data directory (optionally loaded with `authd import` first),
//! and the null worker (this binary's `null-worker`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::scenario::{device, DEVICES};

/// A child process, stopped on drop.
pub struct Process(Child);

impl Process {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

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

/// A fresh directory for the run's files (removed by the caller at the end).
pub fn work_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("authd-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts `/usr/sbin/mosquitto` with TCP_NODELAY on a free port; returns it and its URL.
pub async fn start_mosquitto(work: &Path) -> anyhow::Result<(Process, String)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
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
    let process = Process(child);
    wait_port(port).await?;
    Ok((process, format!("mqtt://127.0.0.1:{port}")))
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

/// Loads `entities` entities (the bench devices first) and `rules` rules into `data` with
/// `authd import`, as an operator would before starting the worker.
pub fn import_scale(
    authd: &Path,
    work: &Path,
    data: &Path,
    (entities, rules): (usize, usize),
) -> anyhow::Result<()> {
    let file = work.join("scale.jsonl");
    write_scale_file(&file, entities, rules)?;
    let started = Instant::now();
    // stderr is ours: on a terminal, authd import draws its progress there (and lists any
    // refused line); its summary line (stdout) gives way to ours below.
    let out = Command::new(authd)
        .arg("import")
        .arg("--data")
        .arg(data)
        .arg(&file)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running authd import")?;
    if !out.status.success() {
        bail!(
            "authd import failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    println!(
        "scale: imported {entities} entities and {rules} rules in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Import lines for `entities` entities (the bench devices first) and `rules` rules, none
/// of which match the scenarios' callers, so answers stay as without them.
fn write_scale_file(path: &Path, entities: usize, rules: usize) -> anyhow::Result<()> {
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

/// `authd serve` with service id and client id `id`, on `data`, accepting admin key `key`.
pub fn start_authd(
    authd: &Path,
    broker_url: &str,
    id: &str,
    data: &Path,
    key: &str,
) -> anyhow::Result<Process> {
    let child = Command::new(authd)
        .args([
            "serve",
            "--broker",
            broker_url,
            "--id",
            id,
            "--client-id",
            id,
        ])
        .arg("--data")
        .arg(data)
        .env("AUTHD_CALLER_KEYS", format!("bench:admin:{key}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting authd serve")?;
    Ok(Process(child))
}

/// `authd-bench null-worker` (this binary) with service id `id`.
pub fn start_null_worker(broker_url: &str, id: &str) -> anyhow::Result<Process> {
    let child = Command::new(std::env::current_exe()?)
        .args(["null-worker", "--broker", broker_url, "--id", id])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting authd-bench null-worker")?;
    Ok(Process(child))
}

/// VmRSS and VmHWM of a process, MiB (0 where /proc does not say).
pub fn resident_mib(pid: u32) -> (f64, f64) {
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
