//! Entity admin methods through a real broker (docs/protocol.md#entity-put).

mod support;

use serde_json::{json, Value};
use support::*;

const PSK: &str = "correct horse battery staple";

#[tokio::test]
async fn put_get_never_shows_a_secret() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let cert = certs::valid("dev1");

    let put = ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "dev1", "psk": PSK, "cert": cert, "owner": "alice"}),
    )
    .await;
    assert_eq!(put, None, "Put returns no result");

    let got = ok(&admin, "/v1/Entity.Get", json!({"id": "dev1"}))
        .await
        .unwrap();
    let created = got["created"].as_u64().unwrap();
    let now = authd::unix_ms() / 1000;
    assert!(created <= now && created + 60 > now, "{got}");
    assert_eq!(
        got,
        json!({
            "id": "dev1",
            "kind": "device",
            "owner": "alice",
            "has_psk": true,
            "cert_sha256": certs::sha256_hex(&cert),
            "disabled": false,
            "created": created,
        })
    );
    assert!(!got.to_string().contains(PSK));

    let msg = err(&admin, "/v1/Entity.Get", json!({"id": "nope"}), 404).await;
    assert!(msg.contains("nope"), "{msg}");
}

#[tokio::test]
async fn generated_psk_is_returned_once_and_works() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let service = s.service("backend").await;

    let frame = admin.frame(
        "/v1/Entity.Put",
        json!({"id": "dev2", "generate_psk": true}),
    );
    let r = admin.call_frame(&frame, TIMEOUT).await.unwrap();
    let psk = r.result.as_ref().unwrap()["psk"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(psk.len(), 43, "256 bits in base64url: {psk}");
    assert!(authenticate(&service, "dev2", json!({"psk": psk})).await);

    // A redelivered request (same src and id) gets the same PSK, and changes nothing.
    let again = admin.call_frame(&frame, TIMEOUT).await.unwrap();
    assert_eq!(again.result, r.result);
    assert!(authenticate(&service, "dev2", json!({"psk": psk})).await);

    // A new Put makes a new PSK; the old one stops working.
    let psk2 = ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "dev2", "generate_psk": true}),
    )
    .await
    .unwrap()["psk"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(psk, psk2);
    assert!(!authenticate(&service, "dev2", json!({"psk": psk})).await);
    assert!(authenticate(&service, "dev2", json!({"psk": psk2})).await);

    let got = ok(&admin, "/v1/Entity.Get", json!({"id": "dev2"}))
        .await
        .unwrap();
    assert_eq!(got["has_psk"], true);
    assert!(!got.to_string().contains(&psk2));
}

#[tokio::test]
async fn create_only_conflicts_and_put_replaces_the_whole_entity() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let service = s.service("backend").await;

    ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "d", "psk": PSK, "create_only": true, "owner": "alice"}),
    )
    .await;
    let created = ok(&admin, "Entity.Get", json!({"id": "d"})).await.unwrap()["created"].clone();
    err(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "d", "psk": "other psk value", "create_only": true}),
        409,
    )
    .await;
    assert!(
        authenticate(&service, "d", json!({"psk": PSK})).await,
        "a refused create_only changed nothing"
    );

    // Replacing with a certificate only: the PSK goes, the owner goes, created stays.
    let cert = certs::valid("d");
    ok(&admin, "/v1/Entity.Put", json!({"id": "d", "cert": cert})).await;
    let got = ok(&admin, "Entity.Get", json!({"id": "d"})).await.unwrap();
    assert_eq!(got["has_psk"], false);
    assert!(got.get("owner").is_none(), "{got}");
    assert_eq!(got["created"], created);
    assert!(!authenticate(&service, "d", json!({"psk": PSK})).await);
    assert!(authenticate(&service, "d", json!({"cert": cert})).await);
}

#[tokio::test]
async fn cert_sha256_pins_without_the_pem() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let service = s.service("backend").await;
    let cert = certs::valid("cam");
    let fp = certs::sha256_hex(&cert);

    ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "cam", "cert_sha256": fp.to_uppercase()}),
    )
    .await;
    let got = ok(&admin, "Entity.Get", json!({"id": "cam"}))
        .await
        .unwrap();
    assert_eq!(got["cert_sha256"], fp.as_str());
    assert!(authenticate(&service, "cam", json!({"cert": cert})).await);

    // openssl's colon form works too.
    let colons: Vec<String> = fp
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "cam2", "cert_sha256": colons.join(":")}),
    )
    .await;
    assert!(authenticate(&service, "cam2", json!({"cert": cert})).await);
}

#[tokio::test]
async fn bad_put_arguments_are_400_naming_the_field() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let cases = [
        (json!({"id": "d"}), "args"),
        (json!({"psk": PSK}), "id"),
        (json!({"id": "", "psk": PSK}), "args.id"),
        (
            json!({"id": "d", "psk": PSK, "generate_psk": true}),
            "args.psk",
        ),
        (json!({"id": "d", "psk": ""}), "args.psk"),
        (json!({"id": "d", "psk": 5}), "args.psk"),
        (json!({"id": "d", "cert": "garbage"}), "args.cert"),
        (
            json!({"id": "d", "cert": certs::valid("d"), "cert_sha256": "00".repeat(32)}),
            "args.cert_sha256",
        ),
        (json!({"id": "d", "cert_sha256": "abc"}), "args.cert_sha256"),
        (
            json!({"id": "d", "psk": PSK, "disabled": "yes"}),
            "args.disabled",
        ),
        (json!({"id": "d", "psk": PSK, "colour": "red"}), "colour"),
    ];
    for (args, field) in cases {
        let msg = err(&admin, "/v1/Entity.Put", args.clone(), 400).await;
        assert!(msg.contains(field), "{args}: {msg}");
    }
    err(&admin, "/v1/Entity.Get", json!({"id": "d"}), 404).await;
}

#[tokio::test]
async fn delete_removes_the_entity_and_its_tokens_and_is_idempotent() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let service = s.service("backend").await;
    let dev = s.service("dev1").await;

    // A user: app tokens sign in only as users.
    ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "dev1", "psk": PSK, "kind": "user"}),
    )
    .await;
    let token = ok(&dev, "/v1/Auth.GenerateToken", json!({"host": "app"}))
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(authenticate(&service, "dev1", json!({"psk": token})).await);

    assert_eq!(
        ok(&admin, "/v1/Entity.Delete", json!({"id": "dev1"})).await,
        None
    );
    err(&admin, "/v1/Entity.Get", json!({"id": "dev1"}), 404).await;
    assert_eq!(
        ok(&dev, "/v1/Auth.GetToken", json!({"host": "app"}))
            .await
            .unwrap(),
        json!({"exist": false})
    );
    assert!(!authenticate(&service, "dev1", json!({"psk": token})).await);
    assert!(!authenticate(&service, "dev1", json!({"psk": PSK})).await);
    // Idempotent.
    assert_eq!(
        ok(&admin, "/v1/Entity.Delete", json!({"id": "dev1"})).await,
        None
    );
    assert_eq!(
        ok(&admin, "/v1/Entity.Delete", json!({"id": "never-was"})).await,
        None
    );
}

#[tokio::test]
async fn list_pages_in_id_order_by_owner_and_prefix() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    for (id, owner) in [
        ("cam-2", "alice"),
        ("cam-1", "bob"),
        ("lamp-1", "alice"),
        ("cam-3", "alice"),
        ("door", "bob"),
    ] {
        ok(
            &admin,
            "/v1/Entity.Put",
            json!({"id": id, "psk": PSK, "owner": owner}),
        )
        .await;
    }
    let ids = |page: &Value| -> Vec<String> {
        page["entities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };

    // Every entity, two at a time, following `next`.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = json!({"limit": 2});
        if let Some(a) = &after {
            args["after"] = json!(a);
        }
        let page = ok(&admin, "/v1/Entity.List", args).await.unwrap();
        seen.extend(ids(&page));
        for e in page["entities"].as_array().unwrap() {
            assert_eq!(e["has_psk"], true);
            assert!(!e.to_string().contains(PSK));
        }
        match page.get("next") {
            Some(next) => after = Some(next.as_str().unwrap().to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["cam-1", "cam-2", "cam-3", "door", "lamp-1"]);

    let all = ok(&admin, "/v1/Entity.List", json!({})).await.unwrap();
    assert_eq!(ids(&all).len(), 5);
    assert!(all.get("next").is_none(), "{all}");

    let alice = ok(&admin, "/v1/Entity.List", json!({"owner": "alice"}))
        .await
        .unwrap();
    assert_eq!(ids(&alice), ["cam-2", "cam-3", "lamp-1"]);
    let alice_cams = ok(
        &admin,
        "/v1/Entity.List",
        json!({"owner": "alice", "prefix": "cam-", "limit": 1}),
    )
    .await
    .unwrap();
    assert_eq!(ids(&alice_cams), ["cam-2"]);
    assert_eq!(alice_cams["next"], "cam-2");
    let cams = ok(&admin, "/v1/Entity.List", json!({"prefix": "cam-"}))
        .await
        .unwrap();
    assert_eq!(ids(&cams), ["cam-1", "cam-2", "cam-3"]);

    for bad in [
        json!({"limit": 0}),
        json!({"limit": 100000}),
        json!({"limit": -1}),
    ] {
        let msg = err(&admin, "/v1/Entity.List", bad, 400).await;
        assert!(msg.contains("limit"), "{msg}");
    }
}

#[tokio::test]
async fn entity_methods_need_an_admin_key() {
    let s = Setup::start().await;
    let service = s.service("backend").await;
    let nokey = client(&s.broker, None, None).await;
    for (method, args) in [
        ("/v1/Entity.Put", json!({"id": "d", "psk": PSK})),
        ("/v1/Entity.Get", json!({"id": "d"})),
        ("/v1/Entity.Delete", json!({"id": "d"})),
        ("/v1/Entity.List", json!({})),
    ] {
        err(&service, method, args.clone(), 403).await;
        err(&nokey, method, args, 401).await;
    }
    // Nothing was created by the refused Put.
    err(&s.admin().await, "/v1/Entity.Get", json!({"id": "d"}), 404).await;
}

async fn token_of(s: &Setup, user: &str, host: &str) -> String {
    let c = s.service(user).await;
    ok(&c, "/v1/Auth.GenerateToken", json!({"host": host}))
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn hosts_of(s: &Setup, user: &str) -> Vec<Value> {
    let c = s.service(user).await;
    let list = ok(&c, "/v1/Auth.ListToken", json!({})).await.unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| t["host"].clone())
        .collect()
}

/// Re-provisioning a user (new credentials) or disabling it removes its app tokens in the
/// same transaction: they stop working at once, and stay dead when it is enabled again
/// (security review #5).
#[tokio::test]
async fn reprovisioning_or_disabling_a_user_kills_its_tokens_at_once() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    let put = |args: Value| {
        let admin = &admin;
        async move { ok(admin, "/v1/Entity.Put", args).await }
    };

    put(json!({"id": "u1", "kind": "user", "psk": PSK})).await;
    let t1 = token_of(&s, "u1", "app").await;
    let t2 = token_of(&s, "u1", "other").await;
    assert!(authenticate(&backend, "u1", json!({"psk": t1})).await);
    put(json!({"id": "u1", "kind": "user", "psk": "a new psk"})).await;
    assert!(!authenticate(&backend, "u1", json!({"psk": t1})).await);
    assert!(!authenticate(&backend, "u1", json!({"psk": t2})).await);
    assert!(hosts_of(&s, "u1").await.is_empty());
    assert!(authenticate(&backend, "u1", json!({"psk": "a new psk"})).await);

    // Disabling, then enabling again.
    let t3 = token_of(&s, "u1", "app").await;
    assert!(authenticate(&backend, "u1", json!({"psk": t3})).await);
    put(json!({"id": "u1", "kind": "user", "psk": "a new psk", "disabled": true})).await;
    put(json!({"id": "u1", "kind": "user", "psk": "a new psk"})).await;
    assert!(!authenticate(&backend, "u1", json!({"psk": t3})).await);
    assert!(hosts_of(&s, "u1").await.is_empty());

    // A certificate-only user: a new pin kills the tokens; changing only the owner does not.
    let cert = certs::valid("u2");
    put(json!({"id": "u2", "kind": "user", "cert": cert})).await;
    let t4 = token_of(&s, "u2", "app").await;
    put(json!({"id": "u2", "kind": "user", "cert": cert, "owner": "ops"})).await;
    assert!(authenticate(&backend, "u2", json!({"psk": t4})).await);
    put(json!({"id": "u2", "kind": "user", "cert": certs::valid("u2")})).await;
    assert!(!authenticate(&backend, "u2", json!({"psk": t4})).await);

    // Tokens a user held before it became an entity go when it is created.
    let t5 = token_of(&s, "u3", "app").await;
    assert!(authenticate(&backend, "u3", json!({"psk": t5})).await);
    put(json!({"id": "u3", "kind": "user", "generate_psk": true})).await;
    assert!(!authenticate(&backend, "u3", json!({"psk": t5})).await);
}

#[tokio::test]
async fn the_kind_is_stored_shown_listed_and_checked() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    ok(&admin, "/v1/Entity.Put", json!({"id": "a-dev", "psk": PSK})).await;
    ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "a-user", "psk": PSK, "kind": "user"}),
    )
    .await;
    ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "b-dev", "psk": PSK, "kind": "device"}),
    )
    .await;
    let kind_of = |v: &Value| v["kind"].as_str().unwrap().to_owned();
    let got = ok(&admin, "/v1/Entity.Get", json!({"id": "a-user"}))
        .await
        .unwrap();
    assert_eq!(kind_of(&got), "user");
    let got = ok(&admin, "/v1/Entity.Get", json!({"id": "a-dev"}))
        .await
        .unwrap();
    assert_eq!(kind_of(&got), "device", "the default");
    let list = ok(&admin, "/v1/Entity.List", json!({})).await.unwrap();
    let kinds: Vec<String> = list["entities"]
        .as_array()
        .unwrap()
        .iter()
        .map(kind_of)
        .collect();
    assert_eq!(kinds, ["device", "user", "device"]);
    let msg = err(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "x", "psk": PSK, "kind": "robot"}),
        400,
    )
    .await;
    assert!(msg.contains("args.kind"), "{msg}");
}
