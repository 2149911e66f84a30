//! Server key rotation (docs/protocol.md#server-keys-and-rotation): `authd key rotate` on a stopped worker's data directory,
//! then a restart. Old tokens and PSKs keep working, a PSK moves to the newest key at its
//! next successful sign-in, new tokens use the new key, and removing the old key afterwards
//! breaks only what still used it (`authd key list` says what that is).

mod support;

use authd::client::Client;
use serde_json::{json, Value};
use support::*;

const PSK: &str = "correct horse battery staple";

async fn signs_in(client: &Client, id: &str, psk: &str) -> bool {
    authenticate(client, id, json!({ "psk": psk })).await
}

async fn token_of(s: &Setup, user: &str, host: &str, method: &str) -> Value {
    let c = s.service(user).await;
    ok(&c, method, json!({ "host": host })).await.unwrap()
}

fn authd_key(args: &[&str], data: &std::path::Path) -> (bool, String, String) {
    let out = authd_command(data)
        .arg("key")
        .args(args)
        .arg("--data")
        .arg(data)
        .env_remove("AUTHD_DATA")
        .output()
        .expect("run authd key");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `authd key list` as `{id: (in_key_file, newest, psk_hashes, tokens)}`.
fn key_list(data: &std::path::Path) -> Vec<(u64, bool, bool, u64, u64)> {
    let (ok, out, err) = authd_key(&["list"], data);
    assert!(ok, "authd key list: {err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_u64().unwrap(),
                k["in_key_file"].as_bool().unwrap(),
                k["newest"].as_bool().unwrap(),
                k["psk_hashes"].as_u64().unwrap(),
                k["tokens"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn rotation_breaks_nothing_and_removing_the_old_key_breaks_only_its_users() {
    let mut s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    ok(&admin, "/v1/Entity.Put", json!({"id": "dev1", "psk": PSK})).await;
    ok(&admin, "/v1/Entity.Put", json!({"id": "dev3", "psk": PSK})).await;
    let generated = ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "dev2", "generate_psk": true}),
    )
    .await
    .unwrap()["psk"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_token = token_of(&s, "alice", "app.example", "/v1/Auth.GenerateToken").await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(old_token.starts_with("authd_1."), "{old_token}");
    drop((admin, backend));

    // Rotate on the stopped worker, then start it again.
    s.stop().await;
    let key_file = s.data.path().join("server.key");
    let before = std::fs::read_to_string(&key_file).unwrap();
    let (rotated, out, stderr) = authd_key(&["rotate"], s.data.path());
    assert!(rotated, "authd key rotate: {stderr}");
    assert_eq!(out.trim(), "2", "prints the new key id");
    let after = std::fs::read_to_string(&key_file).unwrap();
    assert!(after.starts_with(&before), "old keys are kept as they were");
    let new_line = after[before.len()..].trim();
    let new_key = new_line.strip_prefix("2 ").expect("a line `2 <key>`");
    assert!(
        !out.contains(new_key) && !stderr.contains(new_key),
        "the key itself is never printed"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(
        key_list(s.data.path()),
        [(1, true, false, 3, 1), (2, true, true, 0, 0)]
    );
    s.restart_worker().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;

    // Old tokens still verify, and GetToken returns the same string.
    assert!(signs_in(&backend, "alice", &old_token).await);
    assert_eq!(
        token_of(&s, "alice", "app.example", "/v1/Auth.GetToken").await,
        json!({"exist": true, "token": old_token})
    );
    // PSKs (given and generated) sign in, and then are hashed under the newest key.
    assert!(signs_in(&backend, "dev1", PSK).await);
    assert!(signs_in(&backend, "dev2", &generated).await);
    assert!(signs_in(&backend, "dev1", PSK).await, "and still sign in");
    assert!(!signs_in(&backend, "dev1", "wrong").await);
    // A failed sign-in moves nothing.
    assert!(!signs_in(&backend, "dev3", "wrong").await);
    // New writes use the new key.
    let new_token = token_of(&s, "bob", "app.example", "/v1/Auth.GenerateToken").await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(new_token.starts_with("authd_2."), "{new_token}");
    ok(&admin, "/v1/Entity.Put", json!({"id": "dev4", "psk": PSK})).await;
    drop((admin, backend));

    // What still uses key 1: dev3's PSK (its sign-in failed) and alice's token; dev1 and
    // dev2 moved to key 2 at their sign-ins, and dev4 was made with it.
    s.stop().await;
    assert_eq!(
        key_list(s.data.path()),
        [(1, true, false, 1, 1), (2, true, true, 3, 1)]
    );
    // Remove key 1 anyway: exactly those break.
    let only_new = format!("{new_line}\n");
    std::fs::write(&key_file, only_new).unwrap();
    assert_eq!(
        key_list(s.data.path()),
        [(1, false, false, 1, 1), (2, true, true, 3, 1)]
    );
    s.restart_worker().await;
    let backend = s.service("backend").await;
    assert!(signs_in(&backend, "dev1", PSK).await);
    assert!(signs_in(&backend, "dev2", &generated).await);
    assert!(signs_in(&backend, "dev4", PSK).await);
    assert!(signs_in(&backend, "bob", &new_token).await);
    assert!(
        !signs_in(&backend, "dev3", PSK).await,
        "hashed under the removed key"
    );
    assert!(
        !signs_in(&backend, "alice", &old_token).await,
        "made with the removed key"
    );
    let alice = s.service("alice").await;
    let msg = err(
        &alice,
        "/v1/Auth.GetToken",
        json!({"host": "app.example"}),
        500,
    )
    .await;
    assert!(!msg.contains(new_key));
    // The way out for a user: a new token.
    let fresh = token_of(&s, "alice", "app.example", "/v1/Auth.GenerateToken").await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(fresh.starts_with("authd_2."));
    assert!(signs_in(&backend, "alice", &fresh).await);
}

#[test]
fn rotate_refuses_a_directory_without_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let (rotated, out, err) = authd_key(&["rotate"], dir.path());
    assert!(!rotated);
    assert!(out.is_empty());
    assert!(err.contains("server.key"), "{err}");
    assert!(!dir.path().join("server.key").exists(), "no key is made up");
}
