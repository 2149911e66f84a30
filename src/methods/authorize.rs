//! `AuthorizeCommand {src, dst, cmd}` → `true` | `false` (docs/protocol.md#auth-authorizecommand): may `src` send `cmd` to
//! `dst`? Deny by default; the order (deny rule, owner, allow rule) is in [`crate::rules`].

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{storage_failed, Ctx, Name};
use crate::frame::{parse_args, RpcError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeArgs {
    src: Name,
    dst: Name,
    cmd: Name,
}

/// `AuthorizeCommand {src, dst, cmd}` → `true` | `false`, with one audit line per decision.
pub async fn authorize(ctx: &Ctx<'_>, args: Option<&RawValue>) -> Result<Option<Value>, RpcError> {
    let AuthorizeArgs { src, dst, cmd } = parse_args(args)?;
    let decision = ctx
        .store
        .authorize(&src, &dst, &cmd)
        .await
        .map_err(storage_failed)?;
    crate::audit!(
        ctx,
        subject_src = &*src,
        subject_dst = &*dst,
        subject_cmd = &*cmd,
        result = decision.allowed(),
        reason = decision.reason(),
        rule_id = decision.rule_id(),
        "decision"
    );
    Ok(Some(Value::Bool(decision.allowed())))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::lockout::LockoutPolicy;
    use crate::methods::testing::{Capture, Fixture};
    use crate::rules::{Decision, Effect, Rule};
    use crate::store::{Change, EntityRecord, RequestKey, Store};

    fn fixture() -> Fixture {
        Fixture::new(LockoutPolicy::default())
    }

    async fn ask(ctx: &Ctx<'_>, src: &str, dst: &str, cmd: &str) -> bool {
        let args = json!({"src": src, "dst": dst, "cmd": cmd}).to_string();
        let raw = RawValue::from_string(args).expect("json");
        match authorize(ctx, Some(&raw)).await {
            Ok(Some(Value::Bool(b))) => b,
            other => panic!("{src} {dst} {cmd}: {other:?}"),
        }
    }

    async fn add(store: &Store, id: u64, src: &str, dst: &str, cmd: &str, effect: Effect) {
        let rule = Rule {
            src: src.into(),
            dst: dst.into(),
            cmd: cmd.into(),
            effect,
        };
        let request = RequestKey {
            src: "admin",
            id,
            at_ms: 1,
            binding: None,
        };
        store
            .apply(&request, Change::AddRule { rule })
            .await
            .expect("rule added");
    }

    async fn put(store: &Store, id: &str, owner: Option<&str>) {
        put_as(store, id, owner, false).await
    }

    async fn put_as(store: &Store, id: &str, owner: Option<&str>, disabled: bool) {
        let record = EntityRecord {
            kind: Default::default(),
            owner: owner.map(str::to_owned),
            psk: None,
            cert_sha256: Some([1; 32]),
            disabled,
            created: 1,
        };
        let change = Change::PutEntity {
            id: id.into(),
            record,
            create_only: false,
            generated: None,
        };
        let request = RequestKey {
            src: "admin",
            id: 1000,
            at_ms: 1,
            binding: None,
        };
        store.apply(&request, change).await.expect("entity put");
    }

    #[tokio::test]
    async fn deny_beats_owner_beats_allow_against_a_store() {
        let f = fixture();
        let (ctx, store) = (f.ctx("Auth.AuthorizeCommand", 1), &f.store);
        put(store, "lamp", Some("alice")).await;
        put(store, "sensor", None).await;

        // Deny by default; owners command their devices; nobody else does.
        assert!(!ask(&ctx, "bob", "lamp", "On").await);
        assert!(ask(&ctx, "alice", "lamp", "On").await);
        assert!(
            !ask(&ctx, "alice", "sensor", "Read").await,
            "no owner field"
        );
        assert!(
            !ask(&ctx, "alice", "unknown", "Read").await,
            "no such entity"
        );

        add(store, 1, "bob", "lamp", "*", Effect::Allow).await;
        assert!(ask(&ctx, "bob", "lamp", "On").await);
        assert_eq!(
            store.authorize("bob", "lamp", "On").await.unwrap(),
            Decision::Allow(1)
        );
        assert_eq!(
            store.authorize("alice", "lamp", "On").await.unwrap(),
            Decision::Owner
        );

        add(store, 2, "*", "lamp", "Reboot", Effect::Deny).await;
        assert!(
            !ask(&ctx, "alice", "lamp", "Reboot").await,
            "deny beats owner"
        );
        assert!(
            !ask(&ctx, "bob", "lamp", "Reboot").await,
            "deny beats allow"
        );
        assert!(ask(&ctx, "alice", "lamp", "On").await);
        assert!(ask(&ctx, "bob", "lamp", "On").await);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_decision_has_one_audit_line_naming_its_reason() {
        let f = fixture();
        put(&f.store, "lamp", Some("alice")).await;
        add(&f.store, 1, "bob", "lamp", "On", Effect::Allow).await;
        add(&f.store, 2, "bob", "lamp", "Reboot", Effect::Deny).await;
        put_as(&f.store, "off", Some("alice"), true).await;
        add(&f.store, 3, "bob", "off", "On", Effect::Allow).await;

        let capture = Capture::default();
        {
            // One thread (current_thread runtime): the capture sees every line.
            let _logging = capture.start();
            let ctx = f.ctx("Auth.AuthorizeCommand", 41);
            ask(&ctx, "bob", "lamp", "On").await;
            ask(&ctx, "bob", "lamp", "Reboot").await;
            ask(&ctx, "alice", "lamp", "Reboot").await;
            ask(&ctx, "carol", "lamp", "On").await;
            ask(&ctx, "alice", "off", "On").await;
            ask(&ctx, "bob", "off", "On").await;
        }
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|l: &Value| l["target"] == "authd::audit")
            .collect();
        assert_eq!(lines.len(), 6, "{text}");
        let fields: Vec<&Value> = lines.iter().map(|l| &l["fields"]).collect();
        assert_eq!(fields[0]["rpc_id"], 41);
        assert_eq!(fields[0]["src"], "backend");
        assert_eq!(fields[0]["method"], "Auth.AuthorizeCommand");
        assert_eq!(fields[0]["subject_src"], "bob");
        assert_eq!(fields[0]["subject_dst"], "lamp");
        assert_eq!(fields[0]["subject_cmd"], "On");
        let outcome = |f: &Value| {
            (
                f["result"].as_bool().unwrap(),
                f["reason"].as_str().unwrap().to_owned(),
                f["rule_id"].as_u64(),
            )
        };
        assert_eq!(outcome(fields[0]), (true, "allow_rule".into(), Some(1)));
        assert_eq!(outcome(fields[1]), (false, "deny_rule".into(), Some(2)));
        assert_eq!(outcome(fields[2]), (true, "owner".into(), None));
        assert_eq!(outcome(fields[3]), (false, "default_deny".into(), None));
        assert_eq!(outcome(fields[4]), (false, "disabled".into(), None));
        assert_eq!(outcome(fields[5]), (false, "disabled".into(), None));
    }

    #[tokio::test]
    async fn arguments_are_checked() {
        let f = fixture();
        let ctx = f.ctx("Auth.AuthorizeCommand", 1);
        for (args, field) in [
            (json!({"dst": "d", "cmd": "c"}), "src"),
            (json!({"src": "s", "dst": "", "cmd": "c"}), "args.dst"),
            (json!({"src": "s", "dst": "d", "cmd": "a\nb"}), "args.cmd"),
            (json!({"src": "s", "dst": "d", "cmd": 5}), "args.cmd"),
        ] {
            let raw = RawValue::from_string(args.to_string()).unwrap();
            let e = authorize(&ctx, Some(&raw)).await.unwrap_err();
            assert_eq!(e.code, 400, "{args}");
            assert!(e.message.contains(field), "{args}: {}", e.message);
        }
    }
}
