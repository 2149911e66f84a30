//! Many decisions at once, each answered for its own arguments: with the PostgreSQL store,
//! reads that come together share one statement, and every answer must still be the one
//! for its request. Runs on the store the suite runs against.
//!
//! A break of that (a row handed to the wrong request) fails here: half of the sign-ins
//! are right and half wrong, and the decisions depend on src and dst.

mod support;

use std::sync::Arc;

use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decisions_each_get_their_own_answer() {
    let s = Setup::start_with(|c| c.max_in_flight = 512).await;
    let admin = s.admin().await;
    for d in 0..200 {
        let args = json!({"id": format!("dev{d}"), "psk": format!("psk{d}"), "owner": format!("user{}", d % 4)});
        ok(&admin, "/v1/Entity.Put", args).await;
    }
    ok(
        &admin,
        "/v1/ACL.Add",
        json!({"src": "ops", "dst": "dev1*", "cmd": "*", "effect": "allow"}),
    )
    .await;
    let admin = Arc::new(admin);
    let mut calls = Vec::new();
    for i in 0..400usize {
        let c = admin.clone();
        calls.push(tokio::spawn(async move {
            let d = i % 200;
            if i % 2 == 0 {
                // Half the sign-ins present a wrong PSK; two per id, below the guard's limit of
                // attempts in progress at once (5).
                let psk = if i % 4 == 0 {
                    format!("psk{d}")
                } else {
                    "wrong".into()
                };
                let got = authenticate(&c, &format!("dev{d}"), json!({"psk": psk})).await;
                assert_eq!(got, i % 4 == 0, "sign-in {i} of dev{d}");
            } else {
                let src = if i % 3 == 0 {
                    format!("user{}", d % 4)
                } else {
                    "ops".into()
                };
                let r = ok(
                    &c,
                    "/v1/Auth.AuthorizeCommand",
                    json!({"src": src, "dst": format!("dev{d}"), "cmd": "Sys.Reboot"}),
                )
                .await;
                let expected = i % 3 == 0 || format!("dev{d}").starts_with("dev1");
                assert_eq!(r, Some(json!(expected)), "decision {i}: {src} → dev{d}");
            }
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
}
