//! Logs as an operator reads them: `authd serve --log-format json` writes one JSON object
//! per line, audit lines carry target `authd::audit` and the documented fields, and the
//! README's `RUST_LOG` recipe keeps just the audit trail and warnings. No secret appears.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const PSK: &str = "the-devices-secret-psk";

#[tokio::test]
async fn json_lines_with_a_separable_audit_trail() {
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let log_path = data.path().join("stderr.log");
    let mut child = Command::new(authd_bin())
        .args(["serve", "--log-format", "json", "--broker", &broker.url()])
        .arg("--data")
        .arg(data.path().join("authd"))
        .args(["--client-id", "authd-logs-test"])
        .env("AUTHD_CALLER_KEYS", format!("ops:admin:{ADMIN_KEY}"))
        .env("RUST_LOG", "warn,authd::audit=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("authd serve starts");

    let admin = client(&broker, Some(ADMIN_KEY), Some("ops-console")).await;
    // The worker subscribes shortly after it starts: retry the first request until then.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let put = json!({"id": "dev1", "psk": PSK, "owner": "alice"});
        match admin
            .call("/v1/Entity.Put", put, Duration::from_millis(300))
            .await
        {
            Ok(r) => {
                assert!(r.error.is_none(), "{r:?}");
                break;
            }
            Err(_) => assert!(Instant::now() < deadline, "authd serve never answered"),
        }
    }
    for psk in ["wrong", PSK] {
        ok(
            &admin,
            "/v1/Auth.Authenticate",
            json!({"id": "dev1", "credentials": {"psk": psk}}),
        )
        .await;
    }
    ok(&admin, "/v1/Auth.ListToken", json!({})).await; // not audited
    admin.close().await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success(), "clean exit on SIGTERM");

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !log.contains(PSK) && !log.contains(ADMIN_KEY),
        "a secret in\n{log}"
    );
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let audit: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "authd::audit")
        .collect();
    for l in &lines {
        let level = l["level"].as_str().unwrap_or_default();
        assert!(
            l["target"] == "authd::audit" || level == "WARN" || level == "ERROR",
            "the filter lets through {l}"
        );
        assert!(l["timestamp"].is_string(), "{l}");
    }
    // Every audit line, decision or change: rpc_id, src, method, subject, result, reason.
    for l in &audit {
        let f = &l["fields"];
        for field in ["rpc_id", "src", "method", "subject", "result", "reason"] {
            assert!(!f[field].is_null(), "audit line without {field}: {l}");
        }
        assert_eq!(f["src"], "ops-console", "{l}");
        assert_eq!(l["level"], "INFO", "{l}");
    }
    let summary: Vec<(Value, Value, Value, Value)> = audit
        .iter()
        .map(|l| &l["fields"])
        .map(|f| {
            (
                f["method"].clone(),
                f["subject"].clone(),
                f["result"].clone(),
                f["reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                json!("Entity.Put"),
                json!("dev1"),
                json!(true),
                json!("created")
            ),
            (
                json!("Auth.Authenticate"),
                json!("dev1"),
                json!(false),
                json!("bad_psk")
            ),
            (
                json!("Auth.Authenticate"),
                json!("dev1"),
                json!(true),
                json!("ok")
            ),
        ],
        "{log}"
    );
}
