//! Moving a deployment: `authd export` of a stopped worker's store, `authd import` of the
//! dump into a fresh store (with the old `server.key` copied), and a worker on it answers as
//! the old one did: entities sign in, tokens keep working, rules keep their ids.
//!
//! The target store comes from [`target_store`] alone, so the same test moves a deployment
//! into any backend the harness can make.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use authd::config::Config;
use serde_json::{json, Value};
use support::*;

/// The most tokens a user may hold, on both workers.
const CAP: u64 = 3;

/// Where an import writes and the new worker reads.
struct Target {
    /// The new worker's data directory: its server key (copied from the old one) and,
    /// without `store`, its database.
    data: PathBuf,
    /// `--store` of the import and the worker; `None`: the embedded database in `data`.
    store: Option<String>,
}

/// The store a deployment moves into, made fresh under `root`: here the embedded database
/// of a new data directory.
fn target_store(root: &Path) -> Target {
    let data = root.join("new");
    Target {
        store: store_for(&data),
        data,
    }
}

impl Target {
    fn worker_config(&self, broker: &Broker) -> Config {
        let mut config = embedded_worker_config(broker, &self.data);
        config.store = self.store.clone().map(Into::into);
        config.max_tokens_per_user = CAP;
        config
    }

    /// `authd import` of `dump` into this store.
    async fn import(&self, dump: &Path) -> Output {
        let mut args = vec![
            "import".into(),
            "--data".into(),
            self.data.clone().into_os_string(),
        ];
        if let Some(store) = &self.store {
            args.extend(["--store".into(), store.into()]);
        }
        args.push(dump.into());
        authd(args).await
    }
}

/// Runs the `authd` binary (off the runtime the workers run on).
async fn authd<S: Into<std::ffi::OsString>>(args: impl IntoIterator<Item = S>) -> Output {
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(authd_bin())
            .args(&args)
            .output()
            .expect("run authd")
    })
    .await
    .expect("join")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        shorten(&String::from_utf8_lossy(&out.stdout)),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A copy of `from`'s server key file in the directory `to` (made owner-only).
fn copy_server_key(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(from.join("server.key"), to.join("server.key")).unwrap();
    std::fs::set_permissions(
        to.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

async fn start(config: Config) -> authd::Worker {
    let worker = authd::Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("worker ready");
    worker
}

/// The token a user's `GenerateToken` answered.
async fn generate(user: &authd::client::Client, host: &str) -> String {
    ok(user, "/v1/Auth.GenerateToken", json!({ "host": host }))
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Commands whose decisions are compared before and after the move.
const COMMANDS: [(&str, &str, &str); 7] = [
    ("alice", "dev-psk", "On"),
    ("alice", "dev-psk", "Sys.Reboot"),
    ("alice", "cam", "Get"),
    ("bob", "cam", "Get"),
    ("bob", "dev-psk", "On"),
    ("x", "y", "z"),
    ("alice", "off", "On"),
];

/// What the store answers through the admin and read methods: compared whole.
async fn snapshot(broker: &Broker) -> Value {
    let admin = client(broker, Some(ADMIN_KEY), None).await;
    let backend = client(broker, Some(SERVICE_KEY), None).await;
    let mut decisions = Vec::new();
    for (src, dst, cmd) in COMMANDS {
        let args = json!({"src": src, "dst": dst, "cmd": cmd});
        decisions.push(ok(&backend, "/v1/Auth.AuthorizeCommand", args).await);
    }
    let mut tokens = serde_json::Map::new();
    for user in ["alice", "bob"] {
        let c = client(broker, Some(SERVICE_KEY), Some(user)).await;
        let listed = ok(&c, "/v1/Auth.ListToken", json!({})).await.unwrap();
        let mut got = Vec::new();
        for t in listed.as_array().unwrap() {
            got.push(ok(&c, "/v1/Auth.GetToken", json!({"host": t["host"]})).await);
        }
        tokens.insert(user.into(), json!({"listed": listed, "got": got}));
        c.close().await;
    }
    let snapshot = json!({
        "entities": ok(&admin, "/v1/Entity.List", json!({})).await,
        "rules": ok(&admin, "/v1/ACL.List", json!({})).await,
        "decisions": decisions,
        "tokens": tokens,
    });
    admin.close().await;
    backend.close().await;
    snapshot
}

#[tokio::test]
async fn a_deployment_moved_by_export_and_import_answers_as_before() {
    let broker = Broker::start();
    let root = tempfile::tempdir().unwrap();
    let old = root.path().join("old");
    let mut config = embedded_worker_config(&broker, &old);
    config.max_tokens_per_user = CAP;
    let worker = start(config).await;
    let admin = client(&broker, Some(ADMIN_KEY), None).await;
    let backend = client(&broker, Some(SERVICE_KEY), None).await;

    // Entities of every shape.
    let cert = certs::valid("cam");
    for args in [
        json!({"id": "dev-psk", "psk": "dev-psk-secret", "owner": "alice"}),
        json!({"id": "cam", "cert": cert, "owner": "alice"}),
        json!({"id": "alice", "kind": "user", "psk": "alice-secret"}),
        json!({"id": "bob", "kind": "user", "psk": "bob-secret"}),
        json!({"id": "off", "psk": "off-secret", "disabled": true, "owner": "alice"}),
    ] {
        ok(&admin, "/v1/Entity.Put", args).await;
    }
    let generated = ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "gen", "generate_psk": true}),
    )
    .await
    .unwrap()["psk"]
        .as_str()
        .unwrap()
        .to_owned();

    // Tokens: alice holds as many as the cap allows, one of them replaced; bob one.
    let alice = client(&broker, Some(SERVICE_KEY), Some("alice")).await;
    let bob = client(&broker, Some(SERVICE_KEY), Some("bob")).await;
    let replaced = generate(&alice, "app1").await;
    let alice_tokens = [
        generate(&alice, "app1").await,
        generate(&alice, "app2").await,
        generate(&alice, "app3").await,
    ];
    let bob_token = generate(&bob, "app1").await;
    err(
        &alice,
        "/v1/Auth.GenerateToken",
        json!({"host": "app4"}),
        409,
    )
    .await;

    // Rules 1 to 5, with 3 and 5 deleted: the ids left have gaps, and 5 was the last given.
    for (src, dst, cmd, effect) in [
        ("alice", "*", "On", "allow"),
        ("alice", "dev-psk", "Sys.Reboot", "deny"),
        ("bob", "cam", "Get", "allow"),
        ("bob", "*", "On", "allow"),
        ("x", "y", "z", "allow"),
    ] {
        let args = json!({"src": src, "dst": dst, "cmd": cmd, "effect": effect});
        ok(&admin, "/v1/ACL.Add", args).await;
    }
    for rule_id in [3, 5] {
        ok(&admin, "/v1/ACL.Delete", json!({ "rule_id": rule_id })).await;
    }
    let before = snapshot(&broker).await;
    assert_eq!(
        before["decisions"],
        json!([true, false, true, false, true, false, false]),
        "{before}"
    );

    // The export refuses a database a worker holds.
    let out = authd(["export".as_ref(), "--data".as_ref(), old.as_os_str()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use") && stderr.contains("stop the worker first"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing written: {}", text(&out));

    for c in [admin, backend, alice, bob] {
        c.close().await;
    }
    worker.stop().await.expect("clean stop");

    let dump = root.path().join("dump.jsonl");
    let out = authd([
        "export".as_ref(),
        "--data".as_ref(),
        old.as_os_str(),
        "--out".as_ref(),
        dump.as_os_str(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("14 records"),
        "6 entities, 4 tokens, 3 rules, the next rule id: {}",
        text(&out)
    );
    let dumped = std::fs::read_to_string(&dump).unwrap();
    let server_key = std::fs::read_to_string(old.join("server.key")).unwrap();
    let key_b64 = server_key.split_whitespace().nth(1).unwrap();
    for secret in [
        "dev-psk-secret",
        "alice-secret",
        generated.as_str(),
        replaced.as_str(),
        bob_token.as_str(),
        key_b64,
    ]
    .iter()
    .chain(&alice_tokens.each_ref().map(String::as_str))
    {
        assert!(!dumped.contains(secret), "a secret in the dump: {secret}");
    }

    // Into a fresh store, with the old server key.
    let target = target_store(root.path());
    copy_server_key(&old, &target.data);
    let out = target.import(&dump).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("14 applied, 0 refused"),
        "{}",
        text(&out)
    );

    let worker = start(target.worker_config(&broker)).await;
    assert_eq!(snapshot(&broker).await, before, "the same answers");
    let backend = client(&broker, Some(SERVICE_KEY), None).await;
    let admin = client(&broker, Some(ADMIN_KEY), None).await;

    // Sign-ins: every credential as before.
    for (id, credentials, expected) in [
        ("dev-psk", json!({"psk": "dev-psk-secret"}), true),
        ("dev-psk", json!({"psk": "alice-secret"}), false),
        ("cam", json!({"cert": cert}), true),
        ("alice", json!({"psk": "alice-secret"}), true),
        ("gen", json!({"psk": generated}), true),
        ("off", json!({"psk": "off-secret"}), false),
        ("alice", json!({"psk": alice_tokens[0]}), true),
        ("alice", json!({"psk": alice_tokens[2]}), true),
        ("alice", json!({"psk": replaced}), false),
        ("bob", json!({"psk": bob_token}), true),
        ("bob", json!({"psk": alice_tokens[1]}), false),
    ] {
        assert_eq!(
            authenticate(&backend, id, credentials.clone()).await,
            expected,
            "{id} {credentials}"
        );
    }
    let alice = client(&broker, Some(SERVICE_KEY), Some("alice")).await;
    let got = ok(&alice, "/v1/Auth.GetToken", json!({"host": "app2"})).await;
    assert_eq!(
        got,
        Some(json!({"exist": true, "token": alice_tokens[1]})),
        "the same token string"
    );

    // Rules: a new one gets an id above every old one (5 was given and deleted); rule 2
    // is the one that decides alice's reboot of dev-psk.
    let added = ok(
        &admin,
        "/v1/ACL.Add",
        json!({"src": "x", "dst": "y", "cmd": "w", "effect": "allow"}),
    )
    .await
    .unwrap();
    assert_eq!(added["rule_id"], 6);
    ok(&admin, "/v1/ACL.Delete", json!({"rule_id": 2})).await;
    let reboot = json!({"src": "alice", "dst": "dev-psk", "cmd": "Sys.Reboot"});
    assert_eq!(
        ok(&backend, "/v1/Auth.AuthorizeCommand", reboot).await,
        Some(json!(true)),
        "with rule 2 gone, alice's ownership decides"
    );

    // The cap counts alice's three tokens: a fourth host waits for a revocation.
    err(
        &alice,
        "/v1/Auth.GenerateToken",
        json!({"host": "app4"}),
        409,
    )
    .await;
    generate(&alice, "app1").await;
    ok(&alice, "/v1/Auth.RevokeToken", json!({"host": "app2"})).await;
    generate(&alice, "app4").await;
    err(
        &alice,
        "/v1/Auth.GenerateToken",
        json!({"host": "app5"}),
        409,
    )
    .await;
    let bob = client(&broker, Some(SERVICE_KEY), Some("bob")).await;
    generate(&bob, "app2").await;
    generate(&bob, "app3").await;
    err(&bob, "/v1/Auth.GenerateToken", json!({"host": "app4"}), 409).await;

    for c in [admin, backend, alice, bob] {
        c.close().await;
    }
    worker.stop().await.expect("clean stop");
}

/// A small deployment made by `authd import` of admin calls, exported: `(dump, old data)`.
async fn small_dump(root: &Path) -> (PathBuf, PathBuf) {
    let old = root.join("old");
    let calls = root.join("calls.jsonl");
    std::fs::write(
        &calls,
        json!({"method": "Entity.Put", "args": {"id": "dev", "psk": "dev-secret"}}).to_string(),
    )
    .unwrap();
    let out = authd([
        "import".as_ref(),
        "--data".as_ref(),
        old.as_os_str(),
        calls.as_os_str(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let dump = root.join("dump.jsonl");
    let out = authd([
        "export".as_ref(),
        "--data".as_ref(),
        old.as_os_str(),
        "--out".as_ref(),
        dump.as_os_str(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    (dump, old)
}

#[tokio::test]
async fn an_import_refuses_a_target_without_the_dumps_server_keys() {
    let root = tempfile::tempdir().unwrap();
    let (dump, old) = small_dump(root.path()).await;

    // No key file at all.
    let target = target_store(root.path());
    let out = target.import(&dump).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing")
            && stderr.contains("copy server.key from the old data directory"),
        "{stderr}"
    );

    // A key file with other keys (a fresh one, id 7): refused before anything is written.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&target.data).unwrap();
        std::fs::set_permissions(&target.data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let key = target.data.join("server.key");
        std::fs::write(&key, "7 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = target.import(&dump).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lacks server key 1")
            && stderr.contains("copy server.key from the old data directory"),
        "{stderr}"
    );
    assert!(!target.data.join("db").exists(), "nothing written");

    // With the old key: imported; a dump cut short is imported as far as it goes, and says so.
    copy_server_key(&old, &target.data);
    let whole = std::fs::read_to_string(&dump).unwrap();
    let cut = root.path().join("cut.jsonl");
    let lines: Vec<&str> = whole.lines().collect();
    std::fs::write(&cut, lines[..lines.len() - 1].join("\n")).unwrap();
    let out = target.import(&cut).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cut short"),
        "{}",
        text(&out)
    );
    let out = target.import(&dump).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 applied, 0 refused"),
        "{}",
        text(&out)
    );
}
