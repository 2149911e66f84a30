//! Durable means durable (docs/protocol.md#durable-before-answered): what authd acknowledged
//! survives a power cut, not only a process crash. authd's data directory is on a FUSE file
//! system that keeps every write not fsynced in memory only and forgets it at the cut
//! (`support/powerfs.rs`); the cut comes right after the last reply, then authd is killed
//! with SIGKILL, the file system is mounted again with only what was synced, and a new authd
//! starts on it. A `kill -9` alone cannot show this: the page cache survives a process crash.
//!
//! Needs `/dev/fuse` and root (or `fusermount3`); fails, never skips, without them.

#[path = "support/powerfs.rs"]
mod powerfs;
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use authd::client::{Client, ClientOptions};
use powerfs::PowerLossDisk;
use serde_json::{json, Value};
use support::*;

/// `authd serve` on `data`, as a child process.
struct Authd {
    child: Child,
}

impl Authd {
    /// Starts it; `callers`: the `AUTHD_CALLER_KEYS` value, or none (it makes an admin key).
    fn spawn(broker: &Broker, data: &Path, log: &Path, callers: Option<&str>) -> Authd {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("worker log");
        let mut command = Command::new(authd_bin());
        command
            .args([
                "serve",
                "--broker",
                &broker.url(),
                "--client-id",
                "authd-power",
            ])
            .arg("--data")
            .arg(data)
            // Failed sign-ins with revoked tokens must not lock the user out of the checks.
            .env("AUTHD_LOCKOUT_FAILURES", "0")
            .env("RUST_LOG", "warn")
            .env_remove("AUTHD_CALLER_KEYS")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(callers) = callers {
            command.env("AUTHD_CALLER_KEYS", callers);
        }
        Authd {
            child: command.spawn().expect("start authd serve"),
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Authd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The caller keys of the worker under test (the harness's own).
fn callers() -> String {
    format!("ops:admin:{ADMIN_KEY},backend:service:{SERVICE_KEY}")
}

async fn connect(broker: &Broker, key: &str, src: Option<&str>) -> Client {
    let mut options = ClientOptions::new(broker.address());
    options.key = Some(key.to_owned());
    if let Some(src) = src {
        options.src = src.to_owned();
    }
    Client::connect(options, TIMEOUT)
        .await
        .expect("client connects")
}

/// Waits until a worker answers `client` (any answer, even an error).
async fn wait_answering(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .call("ACL.List", json!({"limit": 1}), Duration::from_millis(500))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "authd did not answer");
    }
}

/// Calls and expects success (the acknowledged reply).
async fn call(client: &Client, method: &str, args: Value) -> Option<Value> {
    ok(client, method, args).await
}

async fn signs_in(client: &Client, user: &str, token: &str) -> bool {
    authenticate(client, user, json!({"psk": token})).await
}

fn report(lost: &[(&str, usize, usize)]) -> String {
    lost.iter()
        .map(|(what, gone, of)| format!("{what}: {gone} of {of} gone"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// An established data directory (everything on it synced, as a running system's disk is
/// after a while), then a burst of acknowledged changes of every kind, interleaved, and the
/// power cut right after the last reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_change_survives_a_power_cut() {
    let mut disk = PowerLossDisk::mount();
    let data = disk.path().join("authd");
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("authd.log");
    let broker = Broker::start();
    let admin = connect(&broker, ADMIN_KEY, None).await;
    let alice = connect(&broker, SERVICE_KEY, Some("alice")).await;

    let authd = Authd::spawn(&broker, &data, &log, Some(&callers()));
    wait_answering(&admin).await;

    // Before: tokens to revoke, entities and rules to delete. Then everything is made
    // durable by the file system itself, as time and the kernel would.
    const N: usize = 20;
    let mut old_tokens = Vec::new();
    for i in 0..N {
        let r = call(
            &alice,
            "Auth.GenerateToken",
            json!({"host": format!("old{i}")}),
        )
        .await
        .unwrap();
        old_tokens.push(r["token"].as_str().unwrap().to_owned());
    }
    let mut old_rules = Vec::new();
    for i in 0..N / 2 {
        call(
            &admin,
            "Entity.Put",
            json!({"id": format!("old{i}"), "psk": "p"}),
        )
        .await;
        let r = call(
            &admin,
            "ACL.Add",
            json!({"src": format!("old{i}"), "dst": "*", "cmd": "*", "effect": "allow"}),
        )
        .await
        .unwrap();
        old_rules.push(r["rule_id"].as_u64().unwrap());
    }
    disk.sync_everything();
    let before = disk.counts();

    // The burst: each call waits for its reply (acknowledged) before the next.
    let mut new_tokens = Vec::new();
    let mut new_rules = Vec::new();
    for i in 0..N {
        let r = call(
            &alice,
            "Auth.GenerateToken",
            json!({"host": format!("new{i}")}),
        )
        .await
        .unwrap();
        new_tokens.push(r["token"].as_str().unwrap().to_owned());
        call(
            &alice,
            "Auth.RevokeToken",
            json!({"host": format!("old{i}")}),
        )
        .await;
        call(
            &admin,
            "Entity.Put",
            json!({"id": format!("new{i}"), "psk": "p"}),
        )
        .await;
        let r = call(
            &admin,
            "ACL.Add",
            json!({"src": format!("new{i}"), "dst": "*", "cmd": "*", "effect": "allow"}),
        )
        .await
        .unwrap();
        new_rules.push(r["rule_id"].as_u64().unwrap());
        if i % 2 == 1 {
            let old = i / 2;
            call(&admin, "Entity.Delete", json!({"id": format!("old{old}")})).await;
            call(&admin, "ACL.Delete", json!({"rule_id": old_rules[old]})).await;
        }
    }
    // The power cut, right after the last reply: nothing more reaches the disk.
    disk.cut_power();
    let during = disk.counts();
    authd.kill();
    disk.power_on();

    let authd = Authd::spawn(&broker, &data, &log, Some(&callers()));
    wait_answering(&admin).await;

    let mut issued_gone = 0;
    for token in &new_tokens {
        if !signs_in(&alice, "alice", token).await {
            issued_gone += 1;
        }
    }
    let mut revocations_gone = 0;
    for token in &old_tokens {
        if signs_in(&alice, "alice", token).await {
            revocations_gone += 1;
        }
    }
    let listed: BTreeSet<String> = call(&alice, "Auth.ListToken", json!({}))
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["host"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = (0..N).map(|i| format!("new{i}")).collect();
    let mut puts_gone = 0;
    let mut deletes_gone = 0;
    for i in 0..N {
        let r = admin
            .call("Entity.Get", json!({"id": format!("new{i}")}), TIMEOUT)
            .await
            .unwrap();
        if r.error.is_some() {
            puts_gone += 1;
        }
    }
    for i in 0..N / 2 {
        let r = admin
            .call("Entity.Get", json!({"id": format!("old{i}")}), TIMEOUT)
            .await
            .unwrap();
        if r.error.is_none() {
            deletes_gone += 1;
        }
    }
    let rules: BTreeSet<u64> = call(&admin, "ACL.List", json!({})).await.unwrap()["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_u64().unwrap())
        .collect();
    let adds_gone = new_rules.iter().filter(|id| !rules.contains(id)).count();
    let rule_deletes_gone = old_rules.iter().filter(|id| rules.contains(id)).count();
    let lost = [
        ("issued tokens", issued_gone, N),
        ("revocations", revocations_gone, N),
        ("Entity.Put", puts_gone, N),
        ("Entity.Delete", deletes_gone, N / 2),
        ("ACL.Add", adds_gone, N),
        ("ACL.Delete", rule_deletes_gone, N / 2),
    ];
    let syncs = (
        during.file_syncs - before.file_syncs,
        during.dir_syncs - before.dir_syncs,
    );
    assert!(
        lost.iter().all(|(_, gone, _)| *gone == 0),
        "acknowledged changes lost in the power cut: {} (file syncs during the burst: {}, directory syncs: {})",
        report(&lost),
        syncs.0,
        syncs.1
    );
    assert_eq!(listed, expected, "Auth.ListToken after the power cut");
    eprintln!(
        "power cut after {} acknowledged changes: nothing lost (file syncs: {}, directory syncs: {})",
        4 * N + N,
        syncs.0,
        syncs.1
    );
    authd.kill();
}

/// A fresh data directory: the first start creates `server.key`, `admin.key` and the
/// database; the power goes right after the first acknowledged changes. The keys must come
/// back unchanged (the admin key still calls, the token still signs in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_data_directory_and_its_keys_survive_a_power_cut() {
    let mut disk = PowerLossDisk::mount();
    let data = disk.path().join("authd");
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("authd.log");
    let broker = Broker::start();

    // No caller keys configured: authd generates `<data>/admin.key`.
    let authd = Authd::spawn(&broker, &data, &log, None);
    let key_file = data.join("admin.key");
    let key = wait_for_file(&key_file).await;
    let admin = connect(&broker, &key, Some("carol")).await;
    wait_answering(&admin).await;
    call(&admin, "Entity.Put", json!({"id": "dev1", "psk": "p"})).await;
    let token = call(&admin, "Auth.GenerateToken", json!({"host": "h"}))
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    disk.cut_power();
    authd.kill();
    disk.power_on();

    let after = std::fs::read_to_string(&key_file).ok();
    // (No key in the message: compared, not shown.)
    assert!(
        after.as_deref().map(str::trim) == Some(key.as_str()),
        "admin.key after the power cut: {}",
        if after.is_some() { "changed" } else { "gone" }
    );
    let authd = Authd::spawn(&broker, &data, &log, None);
    wait_answering(&admin).await;
    assert!(
        signs_in(&admin, "carol", &token).await,
        "the token issued before the cut signs in (server.key and the token survived)"
    );
    let r = admin
        .call("Entity.Get", json!({"id": "dev1"}), TIMEOUT)
        .await
        .unwrap();
    assert!(r.error.is_none(), "dev1 after the power cut: {:?}", r.error);
    authd.kill();
}

/// `authd key rotate` and `authd import` return only once what they wrote is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_and_import_survive_a_power_cut() {
    let mut disk = PowerLossDisk::mount();
    let data = disk.path().join("authd");
    let input = tempfile::NamedTempFile::new().unwrap();
    let lines: String = (0..50)
        .map(|i| {
            format!("{{\"method\":\"Entity.Put\",\"args\":{{\"id\":\"imp{i}\",\"psk\":\"p\"}}}}\n")
        })
        .collect();
    std::fs::write(input.path(), lines).unwrap();
    run_authd(&["import", "--data"], &data, Some(input.path()));
    run_authd(&["key", "rotate", "--data"], &data, None);
    disk.cut_power();
    disk.power_on();

    let listed: Value = serde_json::from_str(&run_authd(&["key", "list", "--data"], &data, None))
        .expect("key list prints JSON");
    let keys = listed["keys"].as_array().expect("keys");
    let ids: Vec<u64> = keys.iter().filter_map(|k| k["id"].as_u64()).collect();
    assert_eq!(ids, [1, 2], "both server keys after the cut: {listed}");
    let psk_hashes: u64 = keys.iter().filter_map(|k| k["psk_hashes"].as_u64()).sum();
    assert_eq!(
        psk_hashes, 50,
        "every imported entity after the cut: {listed}"
    );
}

/// Runs `authd <args> <data> [file]` to completion; returns its stdout.
fn run_authd(args: &[&str], data: &Path, file: Option<&Path>) -> String {
    let mut command = Command::new(authd_bin());
    command.args(args).arg(data);
    if let Some(file) = file {
        command.arg(file);
    }
    let out = command.output().expect("run authd");
    assert!(
        out.status.success(),
        "authd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_for_file(path: &PathBuf) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return text.trim().to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
