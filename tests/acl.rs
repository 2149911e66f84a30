//! Access rules and AuthorizeCommand through a real broker (docs/protocol.md#auth-authorizecommand, #acl-add).
//! The owner rule needs entities (Entity.Put); it is tested against the store in
//! `src/methods/authorize.rs`, and through the broker with disabled entities here.

mod support;

use serde_json::{json, Value};
use support::*;

async fn add(admin: &authd::client::Client, src: &str, dst: &str, cmd: &str, effect: &str) -> u64 {
    let r = ok(
        admin,
        "/v1/ACL.Add",
        json!({"src": src, "dst": dst, "cmd": cmd, "effect": effect}),
    )
    .await
    .expect("ACL.Add has a result");
    r["rule_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("rule_id in {r}"))
}

async fn may(client: &authd::client::Client, src: &str, dst: &str, cmd: &str) -> bool {
    let r = ok(
        client,
        "/v1/Auth.AuthorizeCommand",
        json!({"src": src, "dst": dst, "cmd": cmd}),
    )
    .await;
    match r {
        Some(Value::Bool(b)) => b,
        other => {
            panic!("AuthorizeCommand {src} {dst} {cmd}: expected true or false, got {other:?}")
        }
    }
}

async fn rules(admin: &authd::client::Client) -> Vec<Value> {
    let r = ok(admin, "/v1/ACL.List", json!({}))
        .await
        .expect("ACL.List has a result");
    r["rules"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("rules in {r}"))
}

fn ids(rules: &[Value]) -> Vec<u64> {
    rules
        .iter()
        .map(|r| r["rule_id"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn add_list_delete() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    assert!(rules(&admin).await.is_empty());

    let a = add(&admin, "backend", "dev/*", "Sys.Reboot", "allow").await;
    let b = add(&admin, "*", "dev/42", "*", "deny").await;
    let c = add(&admin, "ops", "dev/1", "Shell.Exec", "allow").await;
    assert!(a < b && b < c, "ids increase: {a} {b} {c}");

    let listed = rules(&admin).await;
    assert_eq!(ids(&listed), [a, b, c]);
    assert_eq!(
        listed[1],
        json!({"rule_id": b, "src": "*", "dst": "dev/42", "cmd": "*", "effect": "deny"})
    );

    assert_eq!(
        ok(&admin, "/v1/ACL.Delete", json!({"rule_id": b})).await,
        None
    );
    assert_eq!(ids(&rules(&admin).await), [a, c]);
    // Idempotent: deleting again, or an id that never existed, succeeds.
    assert_eq!(ok(&admin, "ACL.Delete", json!({"rule_id": b})).await, None);
    assert_eq!(
        ok(&admin, "ACL.Delete", json!({"rule_id": 999_999})).await,
        None
    );

    let d = add(&admin, "*", "dev/42", "*", "deny").await;
    assert!(d > c, "a deleted rule's id is not reused: {d}");

    // Pages, for long lists.
    let page = ok(&admin, "ACL.List", json!({"limit": 2})).await.unwrap();
    assert_eq!(ids(page["rules"].as_array().unwrap()), [a, c]);
    assert_eq!(page["next"], json!(c));
    let page = ok(&admin, "ACL.List", json!({"after": c, "limit": 2}))
        .await
        .unwrap();
    assert_eq!(ids(page["rules"].as_array().unwrap()), [d]);
    assert!(page.get("next").is_none(), "last page: {page}");
}

#[tokio::test]
async fn decisions_follow_rule_changes_at_once() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;

    assert!(
        !may(&backend, "alice", "dev/1", "Sys.Reboot").await,
        "deny by default"
    );

    let allow = add(&admin, "alice", "dev/*", "*", "allow").await;
    assert!(may(&backend, "alice", "dev/1", "Sys.Reboot").await);
    assert!(
        may(&backend, "alice", "dev/1/sub", "Any").await,
        "* spans /"
    );
    assert!(!may(&backend, "bob", "dev/1", "Sys.Reboot").await);
    assert!(!may(&backend, "alice", "devices/1", "Sys.Reboot").await);

    let deny = add(&admin, "*", "dev/1", "Sys.Reboot", "deny").await;
    assert!(
        !may(&backend, "alice", "dev/1", "Sys.Reboot").await,
        "deny beats allow"
    );
    assert!(may(&backend, "alice", "dev/1", "Sys.GetInfo").await);
    assert!(may(&backend, "alice", "dev/2", "Sys.Reboot").await);

    ok(&admin, "ACL.Delete", json!({"rule_id": deny})).await;
    assert!(may(&backend, "alice", "dev/1", "Sys.Reboot").await);
    ok(&admin, "ACL.Delete", json!({"rule_id": allow})).await;
    assert!(!may(&backend, "alice", "dev/1", "Sys.Reboot").await);
}

#[tokio::test]
async fn mqtt_and_regex_metacharacters_are_literal() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    add(&admin, "app", "dev/+/lamp", "On", "allow").await;
    add(&admin, "app", "dev/#", "On", "allow").await;
    add(&admin, "app", "a.b", "Cmd?", "allow").await;
    add(&admin, "app", "[xy]", "^Go$", "allow").await;
    add(&admin, "app", "back\\*", "Esc", "allow").await;

    assert!(may(&backend, "app", "dev/+/lamp", "On").await);
    assert!(
        !may(&backend, "app", "dev/kitchen/lamp", "On").await,
        "+ is not an MQTT wildcard"
    );
    assert!(may(&backend, "app", "dev/#", "On").await);
    assert!(
        !may(&backend, "app", "dev/x", "On").await,
        "# is not an MQTT wildcard"
    );
    assert!(may(&backend, "app", "a.b", "Cmd?").await);
    assert!(
        !may(&backend, "app", "axb", "Cmd?").await,
        ". is not a regex wildcard"
    );
    assert!(
        !may(&backend, "app", "a.b", "Cmdx").await,
        "? is not a glob wildcard"
    );
    assert!(may(&backend, "app", "[xy]", "^Go$").await);
    assert!(
        !may(&backend, "app", "x", "Go").await,
        "no character classes or anchors"
    );
    assert!(
        may(&backend, "app", "back\\slash", "Esc").await,
        "\\ does not escape *"
    );
    assert!(!may(&backend, "app", "back*", "Esc").await);
}

#[tokio::test]
async fn acl_methods_need_an_admin_key_and_checked_arguments() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    let rule = json!({"src": "a", "dst": "b", "cmd": "c", "effect": "allow"});

    for (method, args) in [
        ("/v1/ACL.Add", rule.clone()),
        ("/v1/ACL.List", json!({})),
        ("/v1/ACL.Delete", json!({"rule_id": 1})),
    ] {
        let msg = err(&backend, method, args, 403).await;
        assert!(msg.contains("ACL."), "{msg}");
    }
    assert!(
        rules(&admin).await.is_empty(),
        "the refused ACL.Add added nothing"
    );
    // The service key may ask for decisions.
    assert!(!may(&backend, "a", "b", "c").await);

    for (args, field) in [
        (
            json!({"src": "a", "dst": "b", "cmd": "c", "effect": "maybe"}),
            "args.effect",
        ),
        (
            json!({"src": "a", "dst": "b", "cmd": "c", "effect": "Allow"}),
            "args.effect",
        ),
        (json!({"src": "a", "dst": "b", "cmd": "c"}), "effect"),
        (json!({"dst": "b", "cmd": "c", "effect": "deny"}), "src"),
        (
            json!({"src": "a", "dst": "", "cmd": "c", "effect": "deny"}),
            "args.dst",
        ),
        (
            json!({"src": "a", "dst": "b", "cmd": "x".repeat(257), "effect": "deny"}),
            "args.cmd",
        ),
        (
            json!({"src": "a\u{1}", "dst": "b", "cmd": "c", "effect": "deny"}),
            "args.src",
        ),
        (
            json!({"src": 1, "dst": "b", "cmd": "c", "effect": "deny"}),
            "args.src",
        ),
        (
            json!({"src": "a", "dst": "b", "cmd": "c", "effect": "deny", "extra": 1}),
            "extra",
        ),
    ] {
        let msg = err(&admin, "/v1/ACL.Add", args.clone(), 400).await;
        assert!(msg.contains(field), "{args}: {msg}");
    }
    for args in [json!({}), json!({"rule_id": "1"}), json!({"rule_id": -1})] {
        let msg = err(&admin, "/v1/ACL.Delete", args.clone(), 400).await;
        assert!(msg.contains("rule_id"), "{args}: {msg}");
    }
    for limit in [0, 1001] {
        let msg = err(&admin, "/v1/ACL.List", json!({ "limit": limit }), 400).await;
        assert!(msg.contains("args.limit: must be 1 to 1000"), "{msg}");
    }
    let msg = err(
        &backend,
        "/v1/Auth.AuthorizeCommand",
        json!({"src": "a", "dst": "b"}),
        400,
    )
    .await;
    assert!(msg.contains("cmd"), "{msg}");
    assert!(
        rules(&admin).await.is_empty(),
        "no bad request added a rule"
    );
}

#[tokio::test]
async fn a_redelivered_add_returns_the_same_rule_and_adds_nothing() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let rule = json!({"src": "a", "dst": "b", "cmd": "c", "effect": "allow"});

    // One after the other: the second is answered from the replay record.
    let frame = admin.frame("/v1/ACL.Add", rule.clone());
    let first = admin
        .call_frame(&frame, TIMEOUT)
        .await
        .unwrap()
        .result
        .unwrap();
    let again = admin
        .call_frame(&frame, TIMEOUT)
        .await
        .unwrap()
        .result
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(rules(&admin).await.len(), 1);

    // Both copies at once, as a broker redelivering to a busy worker would.
    let frame = admin.frame("/v1/ACL.Add", rule.clone());
    let payload = serde_json::to_vec(&frame).unwrap();
    admin.publish(admin.request_topic(), payload).await.unwrap();
    let one = admin
        .call_frame(&frame, TIMEOUT)
        .await
        .unwrap()
        .result
        .unwrap();
    let other = admin
        .next_unmatched(TIMEOUT)
        .await
        .expect("the second copy is answered too");
    let other: authd::frame::Response = serde_json::from_slice(&other).unwrap();
    assert_eq!(other.result, Some(one.clone()));
    assert_ne!(one, first, "a new request (new id) is a new rule");
    assert_eq!(rules(&admin).await.len(), 2);
}

#[tokio::test]
async fn rules_survive_a_worker_restart() {
    let mut s = Setup::start().await;
    let (a, b) = {
        let admin = s.admin().await;
        let a = add(&admin, "alice", "dev/*", "*", "allow").await;
        let b = add(&admin, "*", "dev/9", "*", "deny").await;
        admin.close().await;
        (a, b)
    };
    s.restart_worker().await;

    let admin = s.admin().await;
    let backend = s.service("backend").await;
    assert_eq!(ids(&rules(&admin).await), [a, b]);
    assert!(may(&backend, "alice", "dev/1", "Reboot").await);
    assert!(!may(&backend, "alice", "dev/9", "Reboot").await);
    let c = add(&admin, "bob", "dev/1", "*", "allow").await;
    assert!(c > b, "the id counter survives the restart too: {c}");
}

/// Runs the `authd` binary with `args` (blocking, off the runtime the worker runs on).
async fn authd(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(authd_bin())
            .args(&args)
            .output()
            .expect("run authd")
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn ctl_acl_add_list_delete() {
    let s = Setup::start().await;
    let ctl = |words: &[&str]| {
        let mut args: Vec<String> = ["ctl", "acl"].iter().map(|w| w.to_string()).collect();
        args.extend(words.iter().map(|w| w.to_string()));
        args.extend([
            "--broker".into(),
            s.broker.url(),
            "--key".into(),
            ADMIN_KEY.into(),
        ]);
        authd(args)
    };
    let text = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).trim().to_owned();

    let out = ctl(&["add", "alice", "dev/*", "*", "allow"]).await;
    assert!(out.status.success(), "{out:?}");
    let added: Value = serde_json::from_str(&text(&out)).unwrap();
    let id = added["rule_id"].as_u64().expect("rule_id");

    let out = ctl(&["list"]).await;
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_str(&text(&out)).unwrap();
    assert_eq!(
        listed,
        json!({"rules": [{"rule_id": id, "src": "alice", "dst": "dev/*", "cmd": "*", "effect": "allow"}]})
    );

    let out = ctl(&["delete", &id.to_string()]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out), "", "no result, nothing printed");
    let listed: Value = serde_json::from_str(&text(&ctl(&["list"]).await)).unwrap();
    assert_eq!(listed, json!({"rules": []}));

    // An error frame: exit 1, the error on stderr.
    let mut args: Vec<String> = ["ctl", "acl", "list", "--broker", &s.broker.url(), "--key"]
        .iter()
        .map(|w| w.to_string())
        .collect();
    args.push(SERVICE_KEY.into());
    let out = authd(args).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );

    // A bad effect is refused before anything is sent.
    let out = ctl(&["add", "a", "b", "c", "perhaps"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// A disabled `src` or `dst` entity is refused before any rule, the owner rule included;
/// enabling it again restores what the rules say (security review #8).
#[tokio::test]
async fn a_disabled_src_or_dst_is_refused_before_any_rule() {
    let s = Setup::start().await;
    let admin = s.admin().await;
    let backend = s.service("backend").await;
    let put = |args: Value| {
        let admin = &admin;
        async move { ok(admin, "/v1/Entity.Put", args).await }
    };
    put(json!({"id": "lamp", "psk": "lamp psk", "owner": "alice"})).await;
    put(json!({"id": "alice", "psk": "alice psk", "kind": "user"})).await;
    add(&admin, "bob", "*", "*", "allow").await;
    add(&admin, "lamp", "*", "*", "allow").await;
    assert!(may(&backend, "alice", "lamp", "On").await, "owner");
    assert!(may(&backend, "bob", "lamp", "On").await, "allow rule");
    assert!(may(&backend, "lamp", "bob", "Report").await, "allow rule");

    // The device disabled: neither its owner nor a rule lets anyone command it, and it
    // commands nobody.
    put(json!({"id": "lamp", "psk": "lamp psk", "owner": "alice", "disabled": true})).await;
    assert!(!may(&backend, "alice", "lamp", "On").await);
    assert!(!may(&backend, "bob", "lamp", "On").await);
    assert!(!may(&backend, "lamp", "bob", "Report").await);

    // The user disabled: no longer the owner that commands, for any command.
    put(json!({"id": "lamp", "psk": "lamp psk", "owner": "alice"})).await;
    put(json!({"id": "alice", "psk": "alice psk", "kind": "user", "disabled": true})).await;
    assert!(!may(&backend, "alice", "lamp", "On").await);
    assert!(
        may(&backend, "bob", "lamp", "On").await,
        "others are unaffected"
    );
    put(json!({"id": "alice", "psk": "alice psk", "kind": "user"})).await;
    assert!(may(&backend, "alice", "lamp", "On").await);
}

/// `ACL.List` without `limit` answers at most 1000 rules and says where to go on;
/// `authd ctl acl list` follows the pages (security review #9). The 1001 rules are
/// provisioned with `authd import`, which writes without a flush per rule.
#[tokio::test]
async fn acl_list_pages_by_default_and_ctl_follows() {
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let input = data.path().join("rules.jsonl");
    let lines: Vec<String> = (0..1001)
        .map(|n| {
            json!({"method": "ACL.Add", "args": {"src": format!("u{n}"), "dst": "*", "cmd": "*", "effect": "allow"}})
                .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let db = data.path().join("worker");
    let out = authd_command(&db)
        .args(["import", "--data"])
        .arg(&db)
        .arg(&input)
        .output()
        .expect("run authd import");
    assert!(out.status.success(), "{out:?}");
    let worker = authd::Worker::start(worker_config(&broker, &db))
        .await
        .expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready()).await.unwrap();
    let admin = client(&broker, Some(ADMIN_KEY), None).await;

    let first = ok(&admin, "/v1/ACL.List", json!({})).await.unwrap();
    assert_eq!(first["rules"].as_array().unwrap().len(), 1000);
    assert_eq!(first["next"], 1000);
    let last = ok(&admin, "/v1/ACL.List", json!({"after": 1000}))
        .await
        .unwrap();
    assert_eq!(ids(last["rules"].as_array().unwrap()), [1001]);
    assert!(last.get("next").is_none(), "{last}");

    let out = authd(vec![
        "ctl".into(),
        "acl".into(),
        "list".into(),
        "--broker".into(),
        broker.url(),
        "--key".into(),
        ADMIN_KEY.into(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let all = ids(listed["rules"].as_array().unwrap());
    assert_eq!(all, (1..=1001).collect::<Vec<u64>>());
    worker.stop().await.unwrap();
}
