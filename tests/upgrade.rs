//! A data directory written by authd at schema 1 (before entity kinds; commit b271629, see
//! `tests/fixtures/schema-1/make.sh`) opened by this build: it is upgraded at open, and
//! entities, tokens, rules and replay records survive, every entity a device.

mod support;

use std::path::Path;

use serde_json::{json, Value};
use support::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schema-1");

/// One line of `made.jsonl`: a request frame exactly as sent (a redelivery must match
/// its arguments byte for byte) and the response.
#[derive(serde::Deserialize)]
struct Made {
    request: Box<serde_json::value::RawValue>,
    response: Value,
}

/// The requests the fixture was made with (parsed, and as sent) and their responses.
fn made() -> Vec<(Value, String, Value)> {
    std::fs::read_to_string(Path::new(FIXTURE).join("made.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let m: Made = serde_json::from_str(l).unwrap();
            let text = m.request.get().to_owned();
            (serde_json::from_str(&text).unwrap(), text, m.response)
        })
        .collect()
}

/// The response the fixture recorded to its request `id`.
fn response_to(id: u64) -> Value {
    made()
        .into_iter()
        .find(|(request, _, _)| request["id"] == id)
        .map(|(_, _, response)| response)
        .unwrap_or_else(|| panic!("no request {id} in the fixture"))
}

/// Copies the fixture's data directory, private as the worker wants it.
fn copy_data(to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    copy(&Path::new(FIXTURE).join("data"), to);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(to, 0o700).unwrap();
        mode(&to.join("server.key"), 0o600).unwrap();
    }
}

async fn start(broker: &Broker, data: &Path) -> authd::Worker {
    let mut config = embedded_worker_config(broker, data);
    // The fixture's replay records are as old as the fixture: keep them in the window.
    config.replay_window_secs = 100 * 365 * 24 * 3600;
    config.max_tokens_per_user = 2;
    let worker = authd::Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("worker ready");
    worker
}

/// Sends the fixture's request `id` again, byte for byte, from its own `src`.
async fn resend(broker: &Broker, id: u64) -> Value {
    let (frame, text, _) = made()
        .into_iter()
        .find(|(request, _, _)| request["id"] == id)
        .unwrap();
    let src = frame["src"].as_str().unwrap();
    let c = client(broker, None, Some(src)).await;
    // The fixture was made when the harness's admin key was shorter than today's minimum of
    // 16 bytes: the same caller (`ops`, the name a record binds) now presents the new key.
    let text = text.replace("\"test-admin-key\"", &format!("\"{ADMIN_KEY}\""));
    let response = raw(&c, &text, id).await;
    c.close().await;
    serde_json::to_value(response).unwrap()
}

#[tokio::test]
async fn a_schema_1_data_directory_is_upgraded_and_everything_survives() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_data(&data);
    let worker = start(&broker, &data).await;
    let admin = client(&broker, Some(ADMIN_KEY), None).await;
    let backend = client(&broker, Some(SERVICE_KEY), None).await;

    // Entities: all devices, as they were.
    let list = ok(&admin, "/v1/Entity.List", json!({})).await.unwrap();
    let entities = list["entities"].as_array().unwrap();
    let summary: Vec<(&str, &str, bool)> = entities
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap(),
                e["kind"].as_str().unwrap(),
                e["disabled"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("cam1", "device", false),
            ("dev1", "device", false),
            ("gen1", "device", false),
            ("off1", "device", true)
        ]
    );
    let dev1 = ok(&admin, "/v1/Entity.Get", json!({"id": "dev1"}))
        .await
        .unwrap();
    assert_eq!(dev1["owner"], "alice");
    assert_eq!(dev1["has_psk"], true);
    let cert = std::fs::read_to_string(Path::new(FIXTURE).join("cam1.pem")).unwrap();
    let cam1 = ok(&admin, "/v1/Entity.Get", json!({"id": "cam1"}))
        .await
        .unwrap();
    assert_eq!(cam1["cert_sha256"], certs::sha256_hex(&cert).as_str());

    // Their credentials.
    let generated = response_to(4)["result"]["psk"].as_str().unwrap().to_owned();
    assert!(authenticate(&backend, "dev1", json!({"psk": "dev1-psk"})).await);
    assert!(authenticate(&backend, "gen1", json!({"psk": generated})).await);
    assert!(authenticate(&backend, "cam1", json!({"cert": cert})).await);
    assert!(!authenticate(&backend, "off1", json!({"psk": "off1-psk"})).await);

    // Tokens: a user's still sign in; those issued to device ids no longer do.
    let token = |id: u64| {
        response_to(id)["result"]["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(authenticate(&backend, "alice", json!({"psk": token(10)})).await);
    assert!(authenticate(&backend, "alice", json!({"psk": token(11)})).await);
    assert!(!authenticate(&backend, "dev1", json!({"psk": token(12)})).await);
    assert!(!authenticate(&backend, "cam1", json!({"psk": token(13)})).await);
    let alice = client(&broker, Some(SERVICE_KEY), Some("alice")).await;
    let listed = ok(&alice, "/v1/Auth.ListToken", json!({})).await.unwrap();
    let hosts: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["app1", "app2"]);

    // Rules, their decisions and their id counter.
    let rules = ok(&admin, "/v1/ACL.List", json!({})).await.unwrap();
    assert_eq!(rules["rules"].as_array().unwrap().len(), 2);
    let may = |src: &'static str, dst: &'static str, cmd: &'static str| {
        let backend = &backend;
        async move {
            ok(
                backend,
                "/v1/Auth.AuthorizeCommand",
                json!({"src": src, "dst": dst, "cmd": cmd}),
            )
            .await
                == Some(json!(true))
        }
    };
    assert!(may("alice", "dev1", "On").await, "owner");
    assert!(!may("alice", "dev1", "Sys.Reboot").await, "deny rule 2");
    assert!(may("alice", "dev9", "On").await, "allow rule 1");
    assert!(!may("alice", "off1", "On").await, "disabled");

    // Replay records: the same requests get the recorded answers and change nothing.
    for id in [4, 10, 20] {
        let again = resend(&broker, id).await;
        assert_eq!(
            again["result"],
            response_to(id)["result"],
            "request {id}: {again}"
        );
    }
    let added = ok(
        &admin,
        "/v1/ACL.Add",
        json!({"src": "x", "dst": "y", "cmd": "z", "effect": "allow"}),
    )
    .await
    .unwrap();
    assert_eq!(added["rule_id"], 3, "rule ids go on from the fixture's");

    // Token counts were counted at the upgrade: alice holds 2 of the 2 allowed here.
    let msg = err(
        &alice,
        "/v1/Auth.GenerateToken",
        json!({"host": "app3"}),
        409,
    )
    .await;
    assert!(msg.contains("2 tokens"), "{msg}");
    let dev1_user = client(&broker, Some(SERVICE_KEY), Some("dev1")).await;
    ok(
        &dev1_user,
        "/v1/Auth.GenerateToken",
        json!({"host": "app2"}),
    )
    .await;

    // Opened again (now schema 2): the same.
    for c in [admin, backend, alice, dev1_user] {
        c.close().await;
    }
    worker.stop().await.expect("clean stop");
    let worker = start(&broker, &data).await;
    let backend = client(&broker, Some(SERVICE_KEY), None).await;
    assert!(authenticate(&backend, "alice", json!({"psk": token(10)})).await);
    assert!(authenticate(&backend, "dev1", json!({"psk": "dev1-psk"})).await);
    let alice = client(&broker, Some(SERVICE_KEY), Some("alice")).await;
    err(
        &alice,
        "/v1/Auth.GenerateToken",
        json!({"host": "app3"}),
        409,
    )
    .await;
    worker.stop().await.expect("clean stop");
}
