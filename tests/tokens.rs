//! Token methods through a real broker (docs/protocol.md#auth-generatetoken).

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn generate_get_list_revoke() {
    let s = Setup::start().await;
    let alice = s.service("alice").await;

    let generated = ok(
        &alice,
        "/v1/Auth.GenerateToken",
        json!({"host": "b.example"}),
    )
    .await
    .unwrap();
    let token = generated["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("authd_"), "{token}");
    ok(&alice, "Auth.GenerateToken", json!({"host": "a.example"})).await;

    let got = ok(&alice, "/v1/Auth.GetToken", json!({"host": "b.example"}))
        .await
        .unwrap();
    assert_eq!(got, json!({"exist": true, "token": token}));

    let list = ok(&alice, "/v1/Auth.ListToken", json!({})).await.unwrap();
    let hosts: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["a.example", "b.example"], "sorted by host");
    let now = authd::unix_ms() / 1000;
    for t in list.as_array().unwrap() {
        let created = t["created"].as_u64().unwrap();
        assert!(created <= now && created + 60 > now, "{t}");
        assert_eq!(
            t.as_object().unwrap().len(),
            2,
            "only host and created: {t}"
        );
    }

    assert_eq!(
        ok(&alice, "/v1/Auth.RevokeToken", json!({"host": "b.example"})).await,
        None
    );
    assert_eq!(
        ok(&alice, "/v1/Auth.GetToken", json!({"host": "b.example"}))
            .await
            .unwrap(),
        json!({"exist": false})
    );
    // Idempotent.
    assert_eq!(
        ok(&alice, "/v1/Auth.RevokeToken", json!({"host": "b.example"})).await,
        None
    );
    let list = ok(&alice, "/v1/Auth.ListToken", json!({})).await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_new_token_replaces_the_old_and_users_are_separate() {
    let s = Setup::start().await;
    let alice = s.service("alice").await;
    let bob = s.service("bob").await;
    let t1 = ok(&alice, "Auth.GenerateToken", json!({"host": "h"}))
        .await
        .unwrap()["token"]
        .clone();
    let t2 = ok(&alice, "Auth.GenerateToken", json!({"host": "h"}))
        .await
        .unwrap()["token"]
        .clone();
    assert_ne!(t1, t2);
    assert_eq!(
        ok(&alice, "Auth.GetToken", json!({"host": "h"}))
            .await
            .unwrap()["token"],
        t2
    );
    assert_eq!(
        ok(&bob, "Auth.GetToken", json!({"host": "h"}))
            .await
            .unwrap(),
        json!({"exist": false})
    );
    assert_eq!(
        ok(&bob, "Auth.ListToken", json!({})).await.unwrap(),
        json!([])
    );
}

/// A user holds at most `max_tokens_per_user` tokens: a new host beyond it is 409 and
/// issues nothing; replacing a held host's token always works; a revoke makes room
/// (security review #9).
#[tokio::test]
async fn tokens_beyond_the_per_user_cap_are_refused_with_409() {
    let s = Setup::start_with(|c| c.max_tokens_per_user = 3).await;
    let alice = s.service("alice").await;
    let generate = |host: &'static str| {
        let alice = &alice;
        async move { ok(alice, "/v1/Auth.GenerateToken", json!({ "host": host })).await }
    };
    for host in ["a", "b", "c"] {
        generate(host).await;
    }
    let msg = err(&alice, "/v1/Auth.GenerateToken", json!({"host": "d"}), 409).await;
    assert!(msg.contains("3 tokens"), "{msg}");
    assert!(
        !msg.contains("already used"),
        "not the reused-id 409: {msg}"
    );
    let got = ok(&alice, "/v1/Auth.GetToken", json!({"host": "d"})).await;
    assert_eq!(got, Some(json!({"exist": false})));
    // The same request again is refused again (errors are not recorded).
    err(&alice, "/v1/Auth.GenerateToken", json!({"host": "d"}), 409).await;

    generate("b").await;
    ok(&alice, "/v1/Auth.RevokeToken", json!({"host": "a"})).await;
    generate("d").await;
    err(&alice, "/v1/Auth.GenerateToken", json!({"host": "e"}), 409).await;
    let list = ok(&alice, "/v1/Auth.ListToken", json!({})).await.unwrap();
    let hosts: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["host"].clone())
        .collect();
    assert_eq!(hosts, [json!("b"), json!("c"), json!("d")]);

    // Other users have caps of their own.
    let bob = s.service("bob").await;
    ok(&bob, "/v1/Auth.GenerateToken", json!({"host": "e"})).await;
}
