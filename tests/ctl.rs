//! `authd ctl entity …` against a worker, as an operator would run it.

mod support;

use std::process::Output;

use serde_json::{json, Value};
use support::*;

/// Runs the built binary with `args` plus the broker and admin key of `s`.
async fn ctl(s: &Setup, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(authd_bin());
    command
        .arg("ctl")
        .args(args)
        .args(["--broker", &s.broker.url(), "--key", ADMIN_KEY]);
    tokio::task::spawn_blocking(move || command.output().expect("authd runs"))
        .await
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn entity_put_get_list_delete() {
    let s = Setup::start().await;
    let backend = s.service("backend").await;

    let out = ctl(
        &s,
        &[
            "entity",
            "put",
            "dev1",
            "--generate-psk",
            "--owner",
            "alice",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let psk = stdout_json(&out)["psk"].as_str().unwrap().to_owned();
    let signed_in = ok(
        &backend,
        "/v1/Auth.Authenticate",
        json!({"id": "dev1", "credentials": {"psk": psk}}),
    )
    .await;
    assert_eq!(signed_in, Some(json!(true)));

    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("dev2.pem");
    let cert = certs::valid("dev2");
    std::fs::write(&cert_path, &cert).unwrap();
    let out = ctl(
        &s,
        &[
            "entity",
            "put",
            "dev2",
            "--cert",
            cert_path.to_str().unwrap(),
            "--owner",
            "alice",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.is_empty(),
        "Put without --generate-psk prints nothing"
    );

    let out = ctl(&s, &["entity", "get", "dev2"]).await;
    assert!(out.status.success(), "{out:?}");
    let got = stdout_json(&out);
    assert_eq!(got["cert_sha256"], certs::sha256_hex(&cert).as_str());
    assert_eq!(got["has_psk"], false);
    assert_eq!(got["kind"], "device");

    let out = ctl(
        &s,
        &[
            "entity",
            "put",
            "alice",
            "--psk",
            "alice psk",
            "--kind",
            "user",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = ctl(&s, &["entity", "get", "alice"]).await;
    assert_eq!(stdout_json(&out)["kind"], "user");
    let out = ctl(&s, &["entity", "put", "x", "--psk", "p", "--kind", "robot"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "refused before sending: {out:?}"
    );

    let out = ctl(
        &s,
        &[
            "entity", "list", "--owner", "alice", "--limit", "1", "--all",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let ids: Vec<_> = stdout_json(&out)["entities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["dev1", "dev2"]);

    let out = ctl(
        &s,
        &[
            "entity",
            "put",
            "dev2",
            "--psk",
            "another psk",
            "--create-only",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("409"),
        "{out:?}"
    );

    let out = ctl(&s, &["entity", "delete", "dev1"]).await;
    assert!(out.status.success(), "{out:?}");
    let out = ctl(&s, &["entity", "get", "dev1"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
}

#[tokio::test]
async fn no_broker_is_exit_2() {
    let port = free_port();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(authd_bin())
            .args(["ctl", "entity", "get", "dev1", "--timeout", "1"])
            .args([
                "--broker",
                &format!("mqtt://127.0.0.1:{port}"),
                "--key",
                "k",
            ])
            .output()
            .expect("authd runs")
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
