//! Change events (issue 14): each change that can end a session or a permission publishes
//! one event on `{id}/events`, numbered in commit order, with no secret in it; `Events.Since`
//! catches a consumer up; an event committed before a crash is published after the restart;
//! token lifetimes end sign-ins and publish `token.expired`. Real mosquitto, a real worker,
//! on the store the suite runs against.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// Makes an entity and deletes it: one change that publishes one event
/// (`entity.deleted`).
async fn one_event(admin: &authd::client::Client) {
    ok(
        admin,
        "Entity.Put",
        json!({"id": "d", "psk": "psk-0123456789abcdef"}),
    )
    .await;
    ok(admin, "Entity.Delete", json!({"id": "d"})).await;
}

fn events_topic() -> String {
    format!("{SERVICE_ID}/events")
}

/// Events seen by `spy`, in arrival order, until `n` distinct `seq`s have arrived (panics
/// after [`TIMEOUT`]).
async fn collect(spy: &mut Spy, n: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    let mut seqs = std::collections::BTreeSet::new();
    while seqs.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((topic, payload)) = spy.next(left).await else {
            panic!("{} of {n} events arrived: {seen:?}", seqs.len());
        };
        assert_eq!(topic, events_topic());
        let event: Value = serde_json::from_slice(&payload).expect("an event is JSON");
        seqs.insert(event["seq"].as_u64().expect("seq"));
        seen.push(event);
    }
    seen
}

/// The events, one per `seq`, in `seq` order; checks they are 1..=n with no gap.
fn in_order(events: &[Value]) -> Vec<Value> {
    let mut by_seq = std::collections::BTreeMap::new();
    for e in events {
        let seq = e["seq"].as_u64().unwrap();
        if let Some(earlier) = by_seq.insert(seq, e.clone()) {
            assert_eq!(earlier, *e, "a repeated seq carries the same event");
        }
    }
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "seq 1, 2, 3, … with no gap");
    by_seq.into_values().collect()
}

/// `(type, subject)` of an event: what it names.
fn what(e: &Value) -> (String, String) {
    let t = e["type"].as_str().unwrap().to_owned();
    let subject = if t.starts_with("token.") {
        format!(
            "{}/{}",
            e["user"].as_str().unwrap(),
            e["host"].as_str().unwrap()
        )
    } else if t.starts_with("entity.") {
        e["id"].as_str().unwrap().to_owned()
    } else {
        format!(
            "{} {} {} {} {}",
            e["rule_id"],
            e["src"].as_str().unwrap(),
            e["dst"].as_str().unwrap(),
            e["cmd"].as_str().unwrap(),
            e["effect"].as_str().unwrap()
        )
    };
    (t, subject)
}

/// GenerateToken with `args`: the token.
async fn generate(user: &authd::client::Client, args: Value) -> String {
    let result = ok(user, "Auth.GenerateToken", args)
        .await
        .expect("a result");
    result["token"].as_str().expect("token").to_owned()
}

fn pair(t: &str, subject: &str) -> (String, String) {
    (t.to_owned(), subject.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_that_ends_something_publishes_one_event_with_no_secret() {
    let s = Setup::start().await;
    let mut spy = Spy::start(&s.broker, &[&events_topic()]).await;
    let admin = s.admin().await;
    let alice = s.service("alice").await;
    let mut secrets: Vec<String> = Vec::new();

    // A new device ends nothing; a new PSK ends its sessions; disabling; deleting.
    let psk1 = "first-psk-of-dev1-0123456789";
    let psk2 = "second-psk-of-dev1-0123456789";
    secrets.extend([psk1.to_owned(), psk2.to_owned()]);
    ok(&admin, "Entity.Put", json!({"id": "dev1", "psk": psk1})).await;
    ok(
        &admin,
        "Entity.Put",
        json!({"id": "dev1", "psk": psk2, "owner": "alice"}),
    )
    .await;
    let generated = ok(
        &admin,
        "Entity.Put",
        json!({"id": "dev1", "generate_psk": true}),
    )
    .await;
    secrets.push(generated.unwrap()["psk"].as_str().unwrap().to_owned());
    ok(
        &admin,
        "Entity.Put",
        json!({"id": "dev1", "psk": psk2, "disabled": true}),
    )
    .await;
    ok(&admin, "Entity.Delete", json!({"id": "dev1"})).await;
    ok(&admin, "Entity.Delete", json!({"id": "dev1"})).await; // nothing left to end

    // A certificate-only device changing hands: only the owner changed.
    let cert = certs::valid("dev3");
    ok(
        &admin,
        "Entity.Put",
        json!({"id": "dev3", "cert": cert, "owner": "alice"}),
    )
    .await;
    ok(
        &admin,
        "Entity.Put",
        json!({"id": "dev3", "cert": cert, "owner": "bob"}),
    )
    .await;
    ok(
        &admin,
        "Entity.Put",
        json!({"id": "dev3", "cert": cert, "owner": "bob"}),
    )
    .await; // no change

    // App tokens: a first token ends nothing; a second replaces it; revoking twice.
    for _ in 0..2 {
        secrets.push(generate(&alice, json!({"host": "app1"})).await);
    }
    ok(&alice, "Auth.RevokeToken", json!({"host": "app1"})).await;
    ok(&alice, "Auth.RevokeToken", json!({"host": "app1"})).await;

    // Rules: added, deleted, deleted again (nothing).
    let added = ok(
        &admin,
        "ACL.Add",
        json!({"src": "alice", "dst": "dev*", "cmd": "On", "effect": "allow"}),
    )
    .await;
    let rule_id = added.unwrap()["rule_id"].as_u64().unwrap();
    ok(&admin, "ACL.Delete", json!({"rule_id": rule_id})).await;
    ok(&admin, "ACL.Delete", json!({"rule_id": rule_id})).await;

    // A user entity created over the user's app tokens ends them.
    secrets.push(generate(&alice, json!({"host": "app2"})).await);
    ok(
        &admin,
        "Entity.Put",
        json!({"id": "alice", "psk": "alice-own-psk-0123456789", "kind": "user"}),
    )
    .await;
    secrets.push("alice-own-psk-0123456789".to_owned());

    let rule = format!("{rule_id} alice dev* On allow");
    let want = vec![
        pair("entity.credentials_changed", "dev1"),
        pair("entity.credentials_changed", "dev1"),
        pair("entity.disabled", "dev1"),
        pair("entity.deleted", "dev1"),
        pair("entity.owner_changed", "dev3"),
        pair("token.replaced", "alice/app1"),
        pair("token.revoked", "alice/app1"),
        pair("rule.added", &rule),
        pair("rule.deleted", &rule),
        pair("entity.credentials_changed", "alice"),
    ];
    let seen = collect(&mut spy, want.len()).await;
    let events = in_order(&seen);
    let got: Vec<_> = events.iter().map(what).collect();
    assert_eq!(got, want);
    // Nothing more: the changes that ended nothing published nothing.
    assert!(spy.next(Duration::from_millis(500)).await.is_none());

    let now = authd::unix_ms();
    for e in &events {
        assert_eq!(e["v"], 1, "{e}");
        let at = e["at"].as_u64().expect("at");
        assert!(
            at <= now && at + 60_000 > now,
            "at is when the change was made: {e}"
        );
    }
    // No secret in any event: no PSK, no token, no field that could hold one, no hash.
    for e in &seen {
        let text = e.to_string();
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "a secret in {text}");
        }
        for field in ["psk", "token", "hash", "cert", "key"] {
            assert!(e.get(field).is_none(), "{field} in {text}");
        }
        assert!(
            !text
                .as_bytes()
                .windows(40)
                .any(|w| w.iter().all(u8::is_ascii_hexdigit)),
            "a hash-like value in {text}"
        );
    }

    // Events.Since gives the same events, in order, with the head.
    let since = ok(&alice, "Events.Since", json!({"after": 0}))
        .await
        .unwrap();
    assert_eq!(since["head"], want.len());
    assert_eq!(since["events"].as_array().unwrap(), &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_change_publishes_no_second_event() {
    let s = Setup::start().await;
    let mut spy = Spy::start(&s.broker, &[&events_topic()]).await;
    let admin = s.admin().await;
    ok(
        &admin,
        "Entity.Put",
        json!({"id": "d", "psk": "psk-of-d-0123456789"}),
    )
    .await;
    let frame = admin.frame("Entity.Delete", json!({"id": "d"}));
    for _ in 0..3 {
        let r = admin.call_frame(&frame, TIMEOUT).await.unwrap();
        assert!(r.error.is_none(), "{:?}", r.error);
    }
    let events = collect(&mut spy, 1).await;
    assert_eq!(what(&events[0]), pair("entity.deleted", "d"));
    assert!(
        spy.next(Duration::from_millis(500)).await.is_none(),
        "one event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_since_pages_in_order_and_answers_410_for_a_seq_it_cannot_follow() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("relay").await;
    let empty = ok(&backend, "Events.Since", json!({})).await.unwrap();
    assert_eq!(empty, json!({"events": [], "head": 0}));
    for n in 0..5 {
        let id = format!("d{n}");
        ok(
            &admin,
            "Entity.Put",
            json!({"id": id, "psk": "psk-0123456789abcdef"}),
        )
        .await;
        ok(&admin, "Entity.Delete", json!({"id": id})).await;
    }
    let first = ok(&backend, "Events.Since", json!({"after": 0, "limit": 2}))
        .await
        .unwrap();
    assert_eq!(first["head"], 5);
    let seqs = |v: &Value| -> Vec<u64> {
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&first), [1, 2]);
    let rest = ok(&backend, "Events.Since", json!({"after": 2}))
        .await
        .unwrap();
    assert_eq!(seqs(&rest), [3, 4, 5]);
    assert_eq!(rest["events"][2]["id"], "d4");
    let none = ok(&backend, "Events.Since", json!({"after": 5}))
        .await
        .unwrap();
    assert_eq!(none, json!({"events": [], "head": 5}));
    let head = ok(&backend, "Events.Since", json!({})).await.unwrap();
    assert_eq!(head, json!({"events": [], "head": 5}));

    // A seq beyond the head: another store's, or one reset; the consumer must start over.
    let message = err(&backend, "Events.Since", json!({"after": 6}), 410).await;
    assert!(message.contains("resynchronise"), "{message}");
    err(
        &backend,
        "Events.Since",
        json!({"after": 0, "limit": 0}),
        400,
    )
    .await;
    err(
        &backend,
        "Events.Since",
        json!({"after": 0, "limit": 1001}),
        400,
    )
    .await;
    err(&backend, "Events.Since", json!({"after": -1}), 400).await;
    err(&backend, "Events.Since", json!({"since": 1}), 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_their_retention_are_pruned_and_asking_for_them_is_410() {
    let s = Setup::start_with(|c| c.events_retention_secs = 1).await;
    let mut spy = Spy::start(&s.broker, &[&events_topic()]).await;
    let admin = s.admin().await;
    one_event(&admin).await;
    collect(&mut spy, 1).await; // published (and so prunable) once acknowledged
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = admin
            .call("Events.Since", json!({"after": 0}), TIMEOUT)
            .await
            .unwrap();
        match r.error {
            Some(e) => {
                assert_eq!(e.code, 410, "{e:?}");
                assert!(e.message.contains("no longer kept"), "{}", e.message);
                break;
            }
            None => assert!(Instant::now() < deadline, "never pruned: {:?}", r.result),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // From the head on, a consumer follows again.
    let head = ok(&admin, "Events.Since", json!({"after": 1}))
        .await
        .unwrap();
    assert_eq!(head, json!({"events": [], "head": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_events_off_no_event_is_written_or_published() {
    let s = Setup::start_with(|c| c.events = false).await;
    let mut spy = Spy::start(&s.broker, &[&events_topic()]).await;
    let admin = s.admin().await;
    one_event(&admin).await;
    assert!(spy.next(Duration::from_millis(800)).await.is_none());
    let head = ok(&admin, "Events.Since", json!({"after": 0}))
        .await
        .unwrap();
    assert_eq!(head, json!({"events": [], "head": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_lifetime_stops_signing_in_and_its_expiry_is_published() {
    let s = Setup::start().await;
    let mut spy = Spy::start(&s.broker, &[&events_topic()]).await;
    let alice = s.service("alice").await;
    let before = authd::unix_ms() / 1000;
    let token = generate(&alice, json!({"host": "short", "ttl": 2})).await;
    let forever = generate(&alice, json!({"host": "long", "ttl": 0})).await;
    let got = ok(&alice, "Auth.GetToken", json!({"host": "short"}))
        .await
        .unwrap();
    assert_eq!(got["exist"], true);
    assert_eq!(got["token"], token.as_str());
    let expires = got["expires"].as_u64().expect("expires");
    assert!(
        (before + 2..=before + 3).contains(&expires),
        "{expires} vs {before}"
    );
    let long = ok(&alice, "Auth.GetToken", json!({"host": "long"}))
        .await
        .unwrap();
    assert!(long.get("expires").is_none(), "no end: {long}");
    let list = ok(&alice, "Auth.ListToken", json!({})).await.unwrap();
    assert_eq!(list[0]["host"], "long");
    assert!(list[0].get("expires").is_none());
    assert_eq!(list[1]["host"], "short");
    assert_eq!(list[1]["expires"], expires);
    assert!(authenticate(&alice, "alice", json!({"psk": token})).await);

    // Past its end: refused at once, gone from GetToken and ListToken, and removed with a
    // token.expired event.
    while authd::unix_ms() / 1000 < expires {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!authenticate(&alice, "alice", json!({"psk": token})).await);
    assert_eq!(
        ok(&alice, "Auth.GetToken", json!({"host": "short"}))
            .await
            .unwrap(),
        json!({"exist": false})
    );
    let list = ok(&alice, "Auth.ListToken", json!({})).await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert!(authenticate(&alice, "alice", json!({"psk": forever})).await);
    let events = collect(&mut spy, 1).await;
    assert_eq!(what(&events[0]), pair("token.expired", "alice/short"));
    assert!(!events[0].to_string().contains(&token));
    // Removed: a new token for the host is a new pair again (no token.replaced).
    ok(&alice, "Auth.GenerateToken", json!({"host": "short"})).await;
    assert!(spy.next(Duration::from_millis(500)).await.is_none());

    let message = err(
        &alice,
        "Auth.GenerateToken",
        json!({"host": "x", "ttl": 400_000_000}),
        400,
    )
    .await;
    assert!(message.starts_with("args.ttl"), "{message}");
    err(
        &alice,
        "Auth.GenerateToken",
        json!({"host": "x", "ttl": -5}),
        400,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_ttl_secs_is_the_lifetime_of_a_token_made_without_ttl() {
    let s = Setup::start_with(|c| c.token_ttl_secs = 3600).await;
    let alice = s.service("alice").await;
    let now = authd::unix_ms() / 1000;
    ok(&alice, "Auth.GenerateToken", json!({"host": "app"})).await;
    let got = ok(&alice, "Auth.GetToken", json!({"host": "app"}))
        .await
        .unwrap();
    let expires = got["expires"].as_u64().unwrap();
    assert!((now + 3600..=now + 3601).contains(&expires), "{got}");
    ok(
        &alice,
        "Auth.GenerateToken",
        json!({"host": "app2", "ttl": 0}),
    )
    .await;
    let got = ok(&alice, "Auth.GetToken", json!({"host": "app2"}))
        .await
        .unwrap();
    assert!(got.get("expires").is_none(), "ttl 0: no end, {got}");
}

/// The worker is killed (SIGKILL, by the fault point `AUTHD_FAULT_KILL_BEFORE_PUBLISH` of
/// test builds) after an event is committed and before it is published. Restarted, it
/// publishes the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_before_a_kill_is_published_after_the_restart() {
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let mut spy = Spy::start(&broker, &[&events_topic()]).await;
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let start = |fault: bool| -> Killed {
        let mut command = authd_command(data.path());
        command
            .arg("serve")
            .env("AUTHD_METRICS", metrics.to_string())
            .env("AUTHD_BROKER", broker.url())
            .env("AUTHD_DATA", data.path())
            .env("AUTHD_CLIENT_ID", "authd-crash")
            .env(
                "AUTHD_CALLER_KEYS",
                format!("ops:admin:{ADMIN_KEY},backend:service:{SERVICE_KEY}"),
            )
            .env("AUTHD_LOG_FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if fault {
            command.env("AUTHD_FAULT_KILL_BEFORE_PUBLISH", "1");
        }
        let mut worker = Killed(command.spawn().expect("authd serve"));
        wait_ready(metrics, &mut worker.0, "authd-crash");
        worker
    };
    let mut worker = start(true);
    let admin = client(&broker, Some(ADMIN_KEY), None).await;
    // Provisioning publishes nothing, so the worker lives until the delete commits.
    let put = admin
        .call(
            "Entity.Put",
            json!({"id": "d", "psk": "psk-0123456789abcdef"}),
            Duration::from_secs(20),
        )
        .await
        .expect("the put is answered");
    assert!(put.error.is_none(), "{:?}", put.error);
    // Its reply may or may not leave before the kill.
    let _ = admin
        .call("Entity.Delete", json!({"id": "d"}), Duration::from_secs(3))
        .await;
    let status = wait_exit(&mut worker.0, Duration::from_secs(20));
    assert!(!status.success(), "killed: {status}");
    assert!(
        spy.next(Duration::from_millis(300)).await.is_none(),
        "nothing published before the kill"
    );

    let _worker = start(false);
    let events = collect(&mut spy, 1).await;
    assert_eq!(what(&events[0]), pair("entity.deleted", "d"));
    assert_eq!(events[0]["seq"], 1);
    // The change itself was made once.
    let gone = admin
        .call("Entity.Get", json!({"id": "d"}), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(gone.error.map(|e| e.code), Some(404));
}

/// A worker process, killed when dropped (a failed test leaves none behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
