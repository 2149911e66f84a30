//! The data directory at rest (SECURITY.md, "What is stored where"): everything a worker
//! makes in it is owner-only, whatever the umask it was started with; a data directory or a
//! key file that group or others can read is refused at start with the `chmod` that fixes
//! it; a database whose `server.key` is missing is refused instead of given a new key. All
//! through the built binary, as an operator runs it.

#![cfg(unix)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// `authd` with none of the test runner's `AUTHD_*` or `RUST_LOG`, started with umask 022 (a
/// usual login umask: without authd's own care its files would be 0644).
fn authd() -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(authd_bin());
    for (name, _) in std::env::vars() {
        if name.starts_with("AUTHD_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every entry under `dir` (not `dir` itself), with its mode.
fn entries(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let path = entry.unwrap().path();
            out.push((path.clone(), mode(&path)));
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    out
}

fn assert_owner_only(when: &str, data: &Path) {
    assert_eq!(mode(data), 0o700, "{when}: the data directory");
    let entries = entries(data);
    let open: Vec<_> = entries.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(
        open.is_empty(),
        "{when}: group or others may access {open:?}"
    );
    for name in ["server.key", "db"] {
        assert!(
            entries.iter().any(|(p, _)| p == &data.join(name)),
            "{when}: {name} is there: {entries:?}"
        );
    }
    assert!(
        entries
            .iter()
            .filter(|(p, _)| p.starts_with(data.join("db")))
            .count()
            > 2,
        "{when}: sled's files are there: {entries:?}"
    );
}

/// A running `authd serve`; SIGTERM and wait on `stop`, killed on drop.
struct Serve {
    child: Option<Child>,
    log: PathBuf,
}

impl Serve {
    fn start(broker: &Broker, data: &Path, log: &Path) -> Serve {
        let out = std::fs::File::create(log).unwrap();
        let child = authd()
            .args(["serve", "--broker", &broker.url()])
            .arg("--data")
            .arg(data)
            .args([
                "--client-id",
                &format!("authd-data-dir-{}", uuid::Uuid::new_v4().simple()),
            ])
            .env("AUTHD_CALLER_KEYS", format!("ops:admin:{ADMIN_KEY}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start authd serve");
        Serve {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(status.success(), "clean stop: {}", self.log());
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("authd serve did not stop: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Provisions a few entities and a rule through the running worker (every one a durable
/// write, so sled has made its files).
async fn write_something(broker: &Broker, round: u32) {
    let admin = client(broker, Some(ADMIN_KEY), Some("ops")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin
            .call("/v1/Entity.List", json!({}), Duration::from_millis(300))
            .await;
        if matches!(&r, Ok(r) if r.error.is_none()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not answer: {r:?}"
        );
    }
    for n in 0..20 {
        let r = admin
            .call(
                "/v1/Entity.Put",
                json!({"id": format!("dev-{round}-{n}"), "psk": format!("psk-{round}-{n}")}),
                TIMEOUT,
            )
            .await
            .expect("an answer");
        assert!(r.error.is_none(), "{r:?}");
    }
    let r = admin
        .call(
            "/v1/ACL.Add",
            json!({"src": "alice", "dst": "dev-*", "cmd": "*", "effect": "allow"}),
            TIMEOUT,
        )
        .await
        .expect("an answer");
    assert!(r.error.is_none(), "{r:?}");
}

#[tokio::test]
async fn everything_in_the_data_directory_is_owner_only_after_a_worker_wrote() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("authd.log");

    let mut worker = Serve::start(&broker, &data, &log);
    write_something(&broker, 1).await;
    assert_owner_only("while serving", &data);
    worker.stop();
    assert_owner_only("after a stop", &data);

    // A database an older authd left readable (its umask's 0644 files, 0755 directories)
    // is made owner-only at the next start.
    for (path, _) in entries(&data.join("db")) {
        chmod(&path, if path.is_dir() { 0o755 } else { 0o644 });
    }
    chmod(&data.join("db"), 0o755);
    let mut worker = Serve::start(&broker, &data, &log);
    write_something(&broker, 2).await;
    assert_owner_only("after a start on an old database", &data);
    worker.stop();
    assert!(
        worker.log().contains("made them owner-only"),
        "the worker says what it changed: {}",
        worker.log()
    );
}

/// `authd import` of nothing: makes a data directory with its server key and database, no
/// broker needed.
fn init(data: &Path) {
    let out = authd()
        .args(["import", "-", "--data"])
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(data.join("server.key").exists() && data.join("db").exists());
}

/// `authd serve` against no broker: it fails at start or would run forever (killed after 3 s).
fn serve_refused(data: &Path, caller_keys: bool) -> Output {
    let mut command = authd();
    command
        .args(["serve", "--broker", "mqtt://127.0.0.1:1"])
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if caller_keys {
        command.env("AUTHD_CALLER_KEYS", format!("ops:admin:{ADMIN_KEY}"));
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_exit_2(what: &str, out: &Output, says: &[&str], secret: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{what}: {text}");
    for s in says {
        assert!(text.contains(s), "{what}: expected `{s}` in: {text}");
    }
    if !secret.is_empty() {
        assert!(!text.contains(secret), "{what}: the secret is in: {text}");
    }
    text
}

#[test]
fn a_data_directory_others_can_read_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // Something of the operator's in it: not a directory made for authd alone.
    std::fs::write(data.join("notes.txt"), "x").unwrap();
    chmod(&data, 0o755);
    let fix = format!("chmod 700 {}", data.display());
    assert_exit_2(
        "serve",
        &serve_refused(&data, true),
        &["has mode 0755", &fix],
        "",
    );
    let out = authd()
        .args(["import", "-", "--data"])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_exit_2("import", &out, &["has mode 0755", &fix], "");
    assert_eq!(mode(&data), 0o755, "authd does not change it");
    assert_eq!(entries(&data).len(), 1, "nothing made in it");
    // Fixed as the message says, it starts.
    chmod(&data, 0o700);
    init(&data);
}

#[test]
fn an_empty_data_directory_made_for_authd_is_made_owner_only() {
    // `mkdir` with a usual umask, a fresh volume: empty, ours, 0755.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o755);
    init(&data);
    assert_eq!(mode(&data), 0o700);
    assert!(entries(&data).iter().all(|(_, m)| m & 0o077 == 0));
}

#[test]
fn a_server_key_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    init(&data);
    let key_file = data.join("server.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    let key = key.split_whitespace().nth(1).unwrap().to_owned();
    let fix = format!("chmod 600 {}", key_file.display());
    for bad in [0o644, 0o640, 0o604] {
        chmod(&key_file, bad);
        let out = serve_refused(&data, true);
        assert_exit_2(
            &format!("serve, server.key {bad:o}"),
            &out,
            &["server key file", &format!("mode 0{bad:o}"), &fix],
            &key,
        );
        let out = authd()
            .args(["key", "list", "--data"])
            .arg(&data)
            .output()
            .unwrap();
        assert_exit_2("key list", &out, &[&fix], &key);
    }
    chmod(&key_file, 0o600);
    let out = authd()
        .args(["key", "list", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn an_admin_key_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    init(&data);
    let admin_key = data.join("admin.key");
    let key = "authd_admin_SECRET-written-by-hand-0123456789";
    std::fs::write(&admin_key, format!("{key}\n")).unwrap();
    chmod(&admin_key, 0o644);
    // No caller keys configured: the quick-start key is the one used.
    let out = serve_refused(&data, false);
    assert_exit_2(
        "serve",
        &out,
        &[
            "admin key file",
            "mode 0644",
            &format!("chmod 600 {}", admin_key.display()),
        ],
        key,
    );
}

#[test]
fn a_missing_server_key_next_to_a_database_is_refused_not_remade() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    init(&data);
    std::fs::remove_file(data.join("server.key")).unwrap();
    let says = [
        "server key file",
        "is missing, but the database",
        "Restore server.key from your backup",
    ];
    assert_exit_2("serve", &serve_refused(&data, true), &says, "");
    let out = authd()
        .args(["import", "-", "--data"])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_exit_2("import", &out, &says, "");
    assert!(!data.join("server.key").exists(), "no key is made up");
}
