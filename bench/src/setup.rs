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

/// The processes of a run, stopped last-started first when dropped.
#[derive(Default)]
pub struct Processes(Vec<Process>);

impl Processes {
    pub fn push(&mut self, p: Process) {
        self.0.push(p);
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        while let Some(p) = self.0.pop() {
            drop(p);
        }
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

/// `authd serve` with service id `id` and client id `client_id`, on `data`, accepting
/// admin key `key`, on the PostgreSQL `store` if given, in share `group` if given, with
/// change events off if `events` is false; with its metrics endpoint on a free port
/// (returned).
#[allow(clippy::too_many_arguments)]
pub fn start_authd(
    authd: &Path,
    broker_url: &str,
    id: &str,
    client_id: &str,
    data: &Path,
    key: &str,
    store: Option<&str>,
    group: Option<&str>,
    events: bool,
) -> anyhow::Result<(Process, String)> {
    let metrics = format!(
        "127.0.0.1:{}",
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    );
    let mut command = Command::new(authd);
    command
        .args([
            "serve",
            "--broker",
            broker_url,
            "--id",
            id,
            "--client-id",
            client_id,
            "--metrics",
            &metrics,
        ])
        .arg("--data")
        .arg(data)
        .env("AUTHD_CALLER_KEYS", format!("bench:admin:{key}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(store) = store {
        command.env("AUTHD_STORE", store);
    }
    if let Some(group) = group {
        command.env("AUTHD_SHARE_GROUP", group);
    }
    if !events {
        command.env("AUTHD_EVENTS", "false");
    }
    let child = command.spawn().context("starting authd serve")?;
    Ok((Process(child), metrics))
}

/// Gives data directory `to` (created owner-only) the server key of `from` (made there
/// first if there is none yet): every worker of one store needs the same key.
pub fn share_key(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for dir in [from, to] {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let key = authd::crypto::ServerKeys::file_in(from);
    authd::crypto::ServerKeys::load_or_create(&key).map_err(|e| anyhow::anyhow!("{e}"))?;
    let copy = authd::crypto::ServerKeys::file_in(to);
    std::fs::copy(&key, &copy)?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Moves the records of the embedded store in `data` into the PostgreSQL database `url`
/// with `authd export` and `authd import --store`, as an operator moving in would.
pub fn move_in(authd: &Path, work: &Path, data: &Path, url: &str) -> anyhow::Result<()> {
    let dump = work.join("dump.jsonl");
    let started = Instant::now();
    let run = |args: &[&std::ffi::OsStr], store: Option<&str>| -> anyhow::Result<()> {
        let mut command = Command::new(authd);
        command.args(args).stdin(Stdio::null());
        if let Some(store) = store {
            command.env("AUTHD_STORE", store);
        }
        let out = command.output().context("running authd")?;
        if !out.status.success() {
            bail!(
                "authd {:?} failed ({}): {}",
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    run(
        &[
            "export".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
            "--out".as_ref(),
            dump.as_os_str(),
        ],
        None,
    )?;
    run(
        &[
            "import".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
            dump.as_os_str(),
        ],
        Some(url),
    )?;
    println!(
        "scale: moved into PostgreSQL (authd export, authd import --store) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(&dump);
    Ok(())
}

/// The run's own database on a PostgreSQL server, dropped at the end.
pub struct Database {
    server: String,
    name: String,
    pub url: String,
}

impl Database {
    /// Creates database `name` on `server` (`postgres://USER@HOST:PORT`).
    pub async fn create(server: &str, name: &str) -> anyhow::Result<Database> {
        let server = server.trim_end_matches('/').to_owned();
        admin(&server, &format!("CREATE DATABASE {name}")).await?;
        Ok(Database {
            url: format!("{server}/{name}"),
            server,
            name: name.to_owned(),
        })
    }

    pub async fn drop_database(self) -> anyhow::Result<()> {
        admin(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )
        .await
    }
}

async fn admin(server: &str, sql: &str) -> anyhow::Result<()> {
    let url = format!("{server}/postgres");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {server}/postgres (--store takes the server: postgres://USER@HOST:PORT)"))?;
    tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .with_context(|| sql.to_owned())?;
    Ok(())
}

/// `name`'s value on the metrics endpoint at `addr`, if it is there.
pub async fn scrape(addr: &str, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// User and system CPU seconds of processes `pids` so far (/proc; 0 where it does not say).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces): utime is the 12th,
            // stime the 13th; in clock ticks (100 a second on Linux).
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (ticks(11) + ticks(12)) / 100.0
        })
        .sum()
}

/// `authd-bench null-worker` with service id `id`: of this binary, or of `binary` (another
/// build's).
pub fn start_null_worker(
    binary: Option<&Path>,
    broker_url: &str,
    id: &str,
) -> anyhow::Result<Process> {
    let exe = match binary {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?,
    };
    let child = Command::new(&exe)
        .args(["null-worker", "--broker", broker_url, "--id", id])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} null-worker", exe.display()))?;
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
