//! A stored reply answers only the request it was stored for (docs/protocol.md#redelivery):
//! the record binds the caller key's name, `src`, `id`, the method and the arguments. Any
//! other request that reuses a recorded `src` and `id` gets 409 and changes nothing; the
//! reply of the first request never reaches it. Through a real broker.

mod support;

use authd::client::Client;
use serde_json::{json, Value};
use support::*;

/// Calls `frame` (an id and src of our choosing) and returns the response.
async fn call(client: &Client, frame: Value) -> authd::frame::Response {
    client.call_frame(&frame, TIMEOUT).await.expect("answered")
}

fn frame(key: &str, src: &str, id: u64, method: &str, args: Value) -> Value {
    json!({"v": 2, "id": id, "src": src, "key": key, "method": method, "args": args})
}

#[tokio::test]
async fn a_service_key_reusing_an_admin_requests_id_gets_409_not_its_psk() {
    let s = Setup::start().await;
    let ops = client(&s.broker, Some(ADMIN_KEY), Some("ops-console")).await;
    let put = frame(
        ADMIN_KEY,
        "ops-console",
        41,
        "/v1/Entity.Put",
        json!({"id": "dev1", "generate_psk": true}),
    );
    let first = call(&ops, put.clone()).await;
    let psk = first.result.expect("psk")["psk"]
        .as_str()
        .unwrap()
        .to_owned();
    // The true redelivery gets the same PSK.
    assert_eq!(call(&ops, put).await.result.unwrap()["psk"], psk.as_str());
    ops.close().await;

    let intruder = client(&s.broker, Some(SERVICE_KEY), Some("ops-console")).await;
    let stolen = frame(
        SERVICE_KEY,
        "ops-console",
        41,
        "/v1/Auth.RevokeToken",
        json!({"host": "x"}),
    );
    let response = call(&intruder, stolen).await;
    let error = response.error.expect("an error, not a stored reply");
    assert_eq!(error.code, 409, "{}", error.message);
    assert!(response.result.is_none());
    assert!(!error.message.contains(&psk));
    assert!(!error.message.contains("Entity.Put") && !error.message.contains("dev1"));
}

#[tokio::test]
async fn an_admin_delete_reusing_a_service_requests_id_gets_409_and_deletes_nothing() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "dev2", "psk": "secret-of-dev2"}),
    )
    .await;
    let backend = client(&s.broker, Some(SERVICE_KEY), Some("shared-src")).await;
    let generate = frame(
        SERVICE_KEY,
        "shared-src",
        7,
        "/v1/Auth.GenerateToken",
        json!({"host": "app.example"}),
    );
    assert!(call(&backend, generate).await.error.is_none());
    backend.close().await;

    let ops = client(&s.broker, Some(ADMIN_KEY), Some("shared-src")).await;
    let delete = frame(
        ADMIN_KEY,
        "shared-src",
        7,
        "/v1/Entity.Delete",
        json!({"id": "dev2"}),
    );
    let response = call(&ops, delete).await;
    assert_eq!(response.error.map(|e| e.code), Some(409));
    let still = ok(&admin, "/v1/Entity.Get", json!({"id": "dev2"})).await;
    assert_eq!(still.unwrap()["id"], "dev2", "nothing was deleted");
}

#[tokio::test]
async fn a_revoke_reusing_a_generates_id_gets_409_and_the_token_stays() {
    let s = Setup::start().await;
    let alice = s.service("alice").await;
    let generate = frame(
        SERVICE_KEY,
        "alice",
        9,
        "/v1/Auth.GenerateToken",
        json!({"host": "app.example"}),
    );
    let token = call(&alice, generate).await.result.unwrap()["token"].clone();
    let revoke = frame(
        SERVICE_KEY,
        "alice",
        9,
        "/v1/Auth.RevokeToken",
        json!({"host": "app.example"}),
    );
    let response = call(&alice, revoke).await;
    assert_eq!(response.error.as_ref().map(|e| e.code), Some(409));
    assert!(response.result.is_none(), "not the token");
    let got = ok(&alice, "/v1/Auth.GetToken", json!({"host": "app.example"})).await;
    assert_eq!(got.unwrap(), json!({"exist": true, "token": token}));
    // Other arguments to the same method are another request too.
    let other_host = frame(
        SERVICE_KEY,
        "alice",
        9,
        "/v1/Auth.GenerateToken",
        json!({"host": "other.example"}),
    );
    assert_eq!(
        call(&alice, other_host).await.error.map(|e| e.code),
        Some(409)
    );
}

#[tokio::test]
async fn a_redelivery_after_its_deadline_gets_its_stored_reply_not_504() {
    let s = Setup::start().await;
    let alice = s.service("alice").await;
    let deadline = authd::unix_ms() as f64 / 1000.0 + 1.0;
    let mut generate = frame(
        SERVICE_KEY,
        "alice",
        12,
        "/v1/Auth.GenerateToken",
        json!({"host": "late.example"}),
    );
    generate["deadline"] = json!(deadline);
    let first = call(&alice, generate.clone()).await;
    let token = first.result.expect("executed before its deadline")["token"].clone();
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let again = call(&alice, generate).await;
    assert!(again.error.is_none(), "{:?}", again.error);
    assert_eq!(again.result.unwrap()["token"], token);
}

#[tokio::test]
async fn import_neither_looks_up_nor_records_replies() {
    let mut s = Setup::start().await;
    // Pre-fill the replay records that an import's lines would be looked up under.
    let bus = client(&s.broker, Some(ADMIN_KEY), Some("authd-import")).await;
    for id in 1..=3 {
        let put = frame(
            ADMIN_KEY,
            "authd-import",
            id,
            "/v1/Entity.Put",
            json!({"id": format!("decoy{id}"), "psk": "decoy-psk"}),
        );
        assert!(call(&bus, put).await.error.is_none());
    }
    bus.close().await;
    s.stop().await;

    let config = worker_config(&s.broker, s.data.path());
    let lines = (1..=3)
        .map(|n| json!({"method": "Entity.Put", "args": {"id": format!("real{n}"), "psk": "real-psk"}}))
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let report = authd::import::import(&config, lines.as_bytes())
        .await
        .expect("import runs");
    assert_eq!((report.applied, report.refused), (3, 0));

    s.restart_worker().await;
    let admin = s.admin().await;
    for n in 1..=3 {
        let got = ok(&admin, "/v1/Entity.Get", json!({"id": format!("real{n}")})).await;
        assert_eq!(got.unwrap()["has_psk"], true, "line {n} was applied");
    }
}
