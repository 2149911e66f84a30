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
