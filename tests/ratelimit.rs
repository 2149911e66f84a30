//! Per-caller rate limit through the broker (429, docs/protocol.md#caller-keys-and-scopes): off by default; when set, each
//! caller key name gets `rate_limit_burst` requests at once and `rate_limit_per_sec` after
//! that. A redelivered state-changing request is answered from its record even when its
//! caller is over the limit.

mod support;

use std::sync::atomic::Ordering::Relaxed;

use serde_json::json;
use support::*;

#[tokio::test]
async fn over_the_limit_is_429_per_caller_name_and_counted() {
    let s = Setup::start_with(|c| {
        // One new request every 4 s: nothing refills during the test.
        c.rate_limit_per_sec = 0.25;
        c.rate_limit_burst = 3;
    })
    .await;
    let backend = s.service("alice").await;
    let admin = s.admin().await;
    for _ in 0..3 {
        ok(&backend, "/v1/Auth.ListToken", json!({})).await;
    }
    let msg = err(&backend, "/v1/Auth.ListToken", json!({}), 429).await;
    assert!(
        msg.contains("`backend`") && msg.contains("rate limit"),
        "names the caller key and says why: {msg}"
    );
    // Another client with the same key is the same caller.
    let backend2 = s.service("bob").await;
    err(&backend2, "/v1/Auth.GetToken", json!({"host": "h"}), 429).await;
    // Another key has its own bucket.
    ok(&admin, "/v1/Entity.List", json!({})).await;
    assert_eq!(s.worker().metrics().rate_limited.load(Relaxed), 2);
}

#[tokio::test]
async fn a_redelivered_change_gets_its_recorded_answer_over_the_limit() {
    let s = Setup::start_with(|c| {
        c.rate_limit_per_sec = 0.25;
        c.rate_limit_burst = 2;
    })
    .await;
    let backend = s.service("alice").await;
    let frame = |id: u64| {
        json!({"v": 2, "id": id, "src": "alice", "key": SERVICE_KEY,
               "method": "/v1/Auth.GenerateToken", "args": {"host": "app"}})
        .to_string()
    };
    let first = raw(&backend, &frame(77), 77).await;
    let token = first.result.expect("a token")["token"].clone();
    ok(&backend, "/v1/Auth.ListToken", json!({})).await;
    // Over the limit now: a new request is refused, the same request again is answered.
    let refused = raw(&backend, &frame(78), 78).await;
    assert_eq!(refused.error.map(|e| e.code), Some(429));
    let again = raw(&backend, &frame(77), 77).await;
    assert_eq!(
        again.result.map(|r| r["token"].clone()),
        Some(token.clone())
    );
    // And the refused one changed nothing: the live token is still the first.
    let backend_get = raw(
        &backend,
        &json!({"v": 2, "id": 79, "src": "alice", "key": ADMIN_KEY,
                "method": "/v1/Auth.GetToken", "args": {"host": "app"}})
        .to_string(),
        79,
    )
    .await;
    assert_eq!(
        backend_get.result,
        Some(json!({"exist": true, "token": token}))
    );
}

#[tokio::test]
async fn off_by_default() {
    let s = Setup::start().await;
    let backend = s.service("alice").await;
    for _ in 0..50 {
        ok(&backend, "/v1/Auth.ListToken", json!({})).await;
    }
    assert_eq!(s.worker().metrics().rate_limited.load(Relaxed), 0);
}
