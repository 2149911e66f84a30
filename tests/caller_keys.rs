//! Caller keys that would weaken the gate are refused at start (docs/protocol.md#caller-keys-and-scopes):
//! `authd serve`, the built binary, exits 2 before it touches its data directory, naming the
//! key by its name and never printing its secret, for an empty key, a key under 16 bytes,
//! one secret under two names (or twice under one), and one name with two scopes — from
//! `[[caller]]` tables, `AUTHD_CALLER_KEYS` and `--caller-keys` alike. Keys sharing a name
//! and a scope (rotation) still start.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `authd` with none of the test runner's `AUTHD_*` or `RUST_LOG`.
fn authd() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_authd"));
    for (name, _) in std::env::vars() {
        if name.starts_with("AUTHD_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
}

/// Where a set of caller keys comes from.
enum Source<'a> {
    /// `[[caller]]` tables: (name, scope, key).
    File(&'a [(&'a str, &'a str, &'a str)]),
    Env(&'a str),
    Flag(&'a str),
}

/// `authd serve` (a real start, not `--print-config`) with these keys, against a broker
/// that is not there; returns its output and whether it made its data directory. A worker
/// that accepted the keys would run on: it is killed after 5 s.
fn serve(source: Source<'_>) -> (Output, bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut command = authd();
    command
        .args(["serve", "--broker", "mqtt://127.0.0.1:1"])
        .arg("--data")
        .arg(&data)
        .env("RUST_LOG", "trace");
    match source {
        Source::File(keys) => {
            let file = dir.path().join("authd.toml");
            write_tables(&file, keys);
            command.arg("--config").arg(&file);
        }
        Source::Env(text) => {
            command.env("AUTHD_CALLER_KEYS", text);
        }
        Source::Flag(text) => {
            command.arg("--caller-keys").arg(text);
        }
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("authd runs");
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("authd's output");
    (out, data.exists())
}

fn write_tables(file: &Path, keys: &[(&str, &str, &str)]) {
    let text: String = keys
        .iter()
        .map(|(name, scope, key)| {
            format!("[[caller]]\nname = \"{name}\"\nscope = \"{scope}\"\nkey = \"{key}\"\n")
        })
        .collect();
    std::fs::write(file, text).unwrap();
}

/// Exit 2, `says` on stderr, no `secret` anywhere, nothing started.
fn assert_refused(what: &str, (out, started): (Output, bool), says: &str, secret: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
    assert!(
        stderr.contains(says),
        "{what}: expected `{says}` in: {stderr}"
    );
    if !secret.is_empty() {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{what}: the secret is in the output: {stdout}{stderr}"
        );
    }
    assert!(
        !started,
        "{what}: refused before the data directory is made"
    );
}

const LONG: &str = "caller-SECRET-long-enough-1";
const OTHER: &str = "caller-SECRET-long-enough-2";
const SHORT: &str = "SECRET-short-15";

#[test]
fn an_empty_caller_key_is_refused() {
    assert_refused(
        "[[caller]]",
        serve(Source::File(&[("ops", "admin", "")])),
        "caller key `ops` is empty",
        "",
    );
    assert_refused(
        "AUTHD_CALLER_KEYS",
        serve(Source::Env(
            "backend:service:caller-SECRET-long-enough-1,ops:admin:",
        )),
        "caller key `ops` is empty",
        LONG,
    );
    assert_refused(
        "--caller-keys",
        serve(Source::Flag("ops:admin:")),
        "caller key `ops` is empty",
        "",
    );
}

#[test]
fn a_caller_key_under_16_bytes_is_refused() {
    assert_eq!(SHORT.len(), 15);
    let says = "caller key `ops` is shorter than 16 bytes";
    assert_refused(
        "[[caller]]",
        serve(Source::File(&[
            ("backend", "service", LONG),
            ("ops", "admin", SHORT),
        ])),
        says,
        SHORT,
    );
    assert_refused(
        "AUTHD_CALLER_KEYS",
        serve(Source::Env(&format!("ops:admin:{SHORT}"))),
        says,
        SHORT,
    );
    assert_refused(
        "--caller-keys",
        serve(Source::Flag(&format!("ops:admin:{SHORT}"))),
        says,
        SHORT,
    );
}

#[test]
fn one_secret_under_two_names_is_refused() {
    let says = "caller keys `backend` and `ops` have the same secret";
    assert_refused(
        "[[caller]]",
        serve(Source::File(&[
            ("backend", "service", LONG),
            ("ops", "admin", LONG),
        ])),
        says,
        LONG,
    );
    let items = format!("backend:service:{LONG},ops:admin:{LONG}");
    assert_refused("AUTHD_CALLER_KEYS", serve(Source::Env(&items)), says, LONG);
    assert_refused("--caller-keys", serve(Source::Flag(&items)), says, LONG);
    // The same key twice under one name is a mistake too.
    assert_refused(
        "a key given twice",
        serve(Source::Env(&format!("ops:admin:{LONG},ops:admin:{LONG}"))),
        "caller key `ops` is configured twice with the same secret",
        LONG,
    );
}

#[test]
fn one_name_with_two_scopes_is_refused() {
    assert_refused(
        "[[caller]]",
        serve(Source::File(&[
            ("ops", "service", LONG),
            ("ops", "admin", OTHER),
        ])),
        "caller key name `ops` is given with scopes `service` and `admin`",
        LONG,
    );
    assert_refused(
        "AUTHD_CALLER_KEYS",
        serve(Source::Env(&format!(
            "ops:service:{LONG},ops:admin:{OTHER}"
        ))),
        "caller key name `ops` is given with scopes",
        OTHER,
    );
}

#[test]
fn good_keys_and_a_rotation_pass_the_same_checks() {
    // The checks refuse what they should and nothing else: one name and scope with two
    // secrets (a key being rotated) and distinct long keys are accepted.
    for keys in [
        format!("backend:service:{LONG},ops:admin:{OTHER}"),
        format!("backend:service:{LONG},backend:service:{OTHER}"),
        format!("backend:service:{}", "x".repeat(16)),
    ] {
        let out = authd()
            .args(["serve", "--print-config", "--caller-keys", &keys])
            .output()
            .expect("authd runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
