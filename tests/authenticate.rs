//! `Auth.Authenticate` through a real broker (docs/protocol.md#auth-authenticate): PSK, app token and certificate
//! sign-in, disabled entities and the brute-force guard.

mod support;

use std::time::Duration;

use authd::client::Client;
use serde_json::{json, Value};
use support::*;

const PSK: &str = "correct horse battery staple";

async fn put(admin: &Client, args: Value) {
    ok(admin, "/v1/Entity.Put", args).await;
}

async fn generate_token(s: &Setup, user: &str, host: &str) -> String {
    let c = s.service(user).await;
    ok(&c, "/v1/Auth.GenerateToken", json!({"host": host}))
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn psk_right_and_wrong() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    put(&admin, json!({"id": "dev1", "psk": PSK})).await;
    put(&admin, json!({"id": "dev2", "psk": "another device's psk"})).await;

    assert!(authenticate(&backend, "dev1", json!({"psk": PSK})).await);
    // The bare method name is the same method.
    assert_eq!(
        ok(
            &backend,
            "Auth.Authenticate",
            json!({"id": "dev1", "credentials": {"psk": PSK}})
        )
        .await,
        Some(json!(true))
    );
    assert!(
        !authenticate(
            &backend,
            "dev1",
            json!({"psk": "correct horse battery stapl"})
        )
        .await
    );
    assert!(!authenticate(&backend, "dev1", json!({"psk": ""})).await);
    assert!(
        !authenticate(&backend, "dev2", json!({"psk": PSK})).await,
        "dev1's PSK is not dev2's"
    );
    assert!(!authenticate(&backend, "nobody", json!({"psk": PSK})).await);
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let s = Setup::start().await;
    let backend = s.service("backend").await;
    for (args, field) in [
        (json!({"id": "dev1"}), "credentials"),
        (json!({"id": "dev1", "credentials": {}}), "args.credentials"),
        (
            json!({"id": "dev1", "credentials": {"token": "x"}}),
            "token",
        ),
        (
            json!({"id": "dev1", "credentials": {"psk": 1}}),
            "args.credentials.psk",
        ),
        (
            json!({"id": "dev1", "credentials": "psk"}),
            "args.credentials",
        ),
        (json!({"credentials": {"psk": PSK}}), "id"),
        (
            json!({"id": "a\u{1}b", "credentials": {"psk": PSK}}),
            "args.id",
        ),
        (
            json!({"id": "x".repeat(257), "credentials": {"psk": PSK}}),
            "args.id",
        ),
    ] {
        let msg = err(&backend, "/v1/Auth.Authenticate", args.clone(), 400).await;
        assert!(msg.contains(field), "{args}: {msg}");
    }
    let nokey = client(&s.broker, None, None).await;
    err(
        &nokey,
        "/v1/Auth.Authenticate",
        json!({"id": "dev1", "credentials": {"psk": PSK}}),
        401,
    )
    .await;
}

#[tokio::test]
async fn app_tokens_sign_in_as_their_user_until_rotated_or_revoked() {
    let s = Setup::start().await;
    let backend = s.service("backend").await;

    // alice is not an entity: a user holding a token is enough.
    let t1 = generate_token(&s, "alice", "app.example").await;
    assert!(authenticate(&backend, "alice", json!({"psk": t1})).await);
    assert!(
        !authenticate(&backend, "bob", json!({"psk": t1})).await,
        "alice's token is not bob's"
    );
    let bobs = generate_token(&s, "bob", "app.example").await;
    assert!(!authenticate(&backend, "alice", json!({"psk": bobs})).await);

    // Rotation: GenerateToken again; the old token stops working at once.
    let t2 = generate_token(&s, "alice", "app.example").await;
    assert!(!authenticate(&backend, "alice", json!({"psk": t1})).await);
    assert!(authenticate(&backend, "alice", json!({"psk": t2})).await);

    // A forged MAC on a live token id is refused.
    let (head, mac) = t2.rsplit_once('.').unwrap();
    let flipped = if mac.starts_with('A') { "B" } else { "A" };
    let forged = format!("{head}.{flipped}{}", &mac[1..]);
    assert!(!authenticate(&backend, "alice", json!({"psk": forged})).await);

    // Revocation.
    let alice = s.service("alice").await;
    ok(
        &alice,
        "/v1/Auth.RevokeToken",
        json!({"host": "app.example"}),
    )
    .await;
    assert!(!authenticate(&backend, "alice", json!({"psk": t2})).await);

    // A token with a certificate: a user that is no entity has no pinned certificate.
    let t3 = generate_token(&s, "alice", "other.example").await;
    assert!(
        !authenticate(
            &backend,
            "alice",
            json!({"psk": t3, "cert": certs::valid("alice")})
        )
        .await
    );
    assert!(authenticate(&backend, "alice", json!({"psk": t3})).await);
}

#[tokio::test]
async fn a_user_entity_signs_in_with_its_psk_or_its_tokens() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    put(&admin, json!({"id": "carol", "psk": PSK, "kind": "user"})).await;
    let token = generate_token(&s, "carol", "app").await;
    assert!(authenticate(&backend, "carol", json!({"psk": PSK})).await);
    assert!(authenticate(&backend, "carol", json!({"psk": token})).await);

    // Disabled: nothing works.
    put(
        &admin,
        json!({"id": "carol", "psk": PSK, "kind": "user", "disabled": true}),
    )
    .await;
    assert!(!authenticate(&backend, "carol", json!({"psk": PSK})).await);
    assert!(!authenticate(&backend, "carol", json!({"psk": token})).await);
    let got = ok(&admin, "/v1/Entity.Get", json!({"id": "carol"}))
        .await
        .unwrap();
    assert_eq!(got["disabled"], true);

    // Enabled again: the PSK works; the token went when carol was disabled.
    put(
        &admin,
        json!({"id": "carol", "psk": PSK, "kind": "user", "disabled": false}),
    )
    .await;
    assert!(authenticate(&backend, "carol", json!({"psk": PSK})).await);
    assert!(!authenticate(&backend, "carol", json!({"psk": token})).await);
}

/// An app token is issued to whatever user the request's `src` names, a device's id
/// included; it never signs in as a device, whether the device has a PSK or only a pinned
/// certificate (security review #5).
#[tokio::test]
async fn an_app_token_never_signs_in_as_a_device() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    let cert = certs::valid("cam1");
    put(&admin, json!({"id": "dev1", "psk": PSK})).await;
    put(&admin, json!({"id": "cam1", "cert": cert})).await;
    let dev_token = generate_token(&s, "dev1", "app").await;
    let cam_token = generate_token(&s, "cam1", "app").await;
    assert!(!authenticate(&backend, "dev1", json!({"psk": dev_token})).await);
    assert!(!authenticate(&backend, "cam1", json!({"psk": cam_token})).await);
    assert!(
        !authenticate(&backend, "cam1", json!({"psk": cam_token, "cert": cert})).await,
        "nor with the device's certificate"
    );
    // The devices' own credentials still work; the same tokens of a user do.
    assert!(authenticate(&backend, "dev1", json!({"psk": PSK})).await);
    assert!(authenticate(&backend, "cam1", json!({"cert": cert})).await);
    put(&admin, json!({"id": "cam1", "cert": cert, "kind": "user"})).await;
    let cam_token = generate_token(&s, "cam1", "app").await;
    assert!(authenticate(&backend, "cam1", json!({"psk": cam_token})).await);
}

#[tokio::test]
async fn certificates_match_the_pin_and_their_validity() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;

    let cert = certs::valid("cam");
    put(&admin, json!({"id": "cam", "cert": cert})).await;
    assert!(authenticate(&backend, "cam", json!({"cert": cert})).await);
    // Same name, other key: a different certificate.
    assert!(!authenticate(&backend, "cam", json!({"cert": certs::valid("cam")})).await);
    assert!(!authenticate(&backend, "cam", json!({"cert": "garbage"})).await);
    let truncated = &cert[..cert.len() / 2];
    assert!(!authenticate(&backend, "cam", json!({"cert": truncated})).await);
    // The right certificate for the wrong id.
    assert!(!authenticate(&backend, "nobody", json!({"cert": cert})).await);
    // A PSK for an entity that has none.
    assert!(!authenticate(&backend, "cam", json!({"psk": PSK})).await);

    // Pinned but outside the validity period.
    let old = certs::expired("old");
    put(&admin, json!({"id": "old", "cert": old})).await;
    assert!(!authenticate(&backend, "old", json!({"cert": old})).await);
    let future = certs::not_yet_valid("future");
    put(&admin, json!({"id": "future", "cert": future})).await;
    assert!(!authenticate(&backend, "future", json!({"cert": future})).await);
}

#[tokio::test]
async fn every_presented_credential_must_hold() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    let cert = certs::valid("both");
    put(&admin, json!({"id": "both", "psk": PSK, "cert": cert})).await;

    assert!(authenticate(&backend, "both", json!({"psk": PSK, "cert": cert})).await);
    assert!(authenticate(&backend, "both", json!({"psk": PSK})).await);
    assert!(authenticate(&backend, "both", json!({"cert": cert})).await);
    let other = certs::valid("both");
    assert!(!authenticate(&backend, "both", json!({"psk": PSK, "cert": other})).await);
    assert!(!authenticate(&backend, "both", json!({"psk": "wrong psk", "cert": cert})).await);
    assert!(!authenticate(&backend, "both", json!({"psk": PSK, "cert": "garbage"})).await);
}

#[tokio::test]
async fn repeated_failures_lock_the_id_until_the_backoff_ends() {
    let s = Setup::start_with(|c| {
        c.lockout_failures = 3;
        // Long enough that a loaded machine still fits the locked-phase checks inside it.
        c.lockout_base_ms = 1000;
        c.lockout_max_secs = 4;
    })
    .await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    put(&admin, json!({"id": "dev", "psk": PSK})).await;
    put(&admin, json!({"id": "bystander", "psk": PSK})).await;
    let good = json!({"psk": PSK});
    let bad = json!({"psk": "guess"});

    // Failures below the limit, then a success: the streak is cleared.
    for _ in 0..2 {
        assert!(!authenticate(&backend, "dev", bad.clone()).await);
    }
    assert!(authenticate(&backend, "dev", good.clone()).await);
    for _ in 0..2 {
        assert!(!authenticate(&backend, "dev", bad.clone()).await);
    }
    assert!(
        authenticate(&backend, "dev", good.clone()).await,
        "not locked: the success reset the count"
    );

    // Three in a row lock it: even the right PSK is refused, other ids are not affected.
    for _ in 0..3 {
        assert!(!authenticate(&backend, "dev", bad.clone()).await);
    }
    let locked_at = std::time::Instant::now();
    assert!(!authenticate(&backend, "dev", good.clone()).await, "locked");
    assert!(authenticate(&backend, "bystander", good.clone()).await);
    // Attempts while locked do not extend the lock.
    for _ in 0..5 {
        assert!(!authenticate(&backend, "dev", bad.clone()).await);
    }
    assert!(
        locked_at.elapsed() < Duration::from_millis(1000),
        "the machine is too slow for this test's timing"
    );
    tokio::time::sleep(Duration::from_millis(1050).saturating_sub(locked_at.elapsed())).await;
    assert!(
        authenticate(&backend, "dev", good.clone()).await,
        "the 1 s lock ended"
    );

    // The next streak locks it again; the guard also covers unknown ids.
    for _ in 0..3 {
        assert!(!authenticate(&backend, "ghost", bad.clone()).await);
    }
    put(&admin, json!({"id": "ghost", "psk": PSK})).await;
    assert!(
        !authenticate(&backend, "ghost", good.clone()).await,
        "locked before it existed"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(authenticate(&backend, "ghost", good).await);
}

#[tokio::test]
async fn the_guard_can_be_turned_off() {
    let s = Setup::start_with(|c| c.lockout_failures = 0).await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    put(&admin, json!({"id": "dev", "psk": PSK})).await;
    for _ in 0..20 {
        assert!(!authenticate(&backend, "dev", json!({"psk": "guess"})).await);
    }
    assert!(authenticate(&backend, "dev", json!({"psk": PSK})).await);
}
