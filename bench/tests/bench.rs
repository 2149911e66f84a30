//! `authd bench`, as the README runs it, at a tiny size: `authd` hands over to
//! `authd-bench`, which starts its own mosquitto, `authd serve` (the binary beside it) and
//! its null worker, and prints the table. Needs `/usr/sbin/mosquitto`, like every test here.

use std::path::PathBuf;
use std::process::Command;

/// `authd` beside `authd-bench`: `cargo test` at the workspace root builds both (with
/// `-p authd-bench` alone, an `authd` from an earlier build may be used, or none).
fn authd() -> Option<Command> {
    let authd = PathBuf::from(env!("CARGO_BIN_EXE_authd-bench"))
        .with_file_name(format!("authd{}", std::env::consts::EXE_SUFFIX));
    if !authd.is_file() {
        return None;
    }
    let mut command = Command::new(authd);
    // Only what the test sets: the runner's AUTHD_* would reach `authd serve`.
    for (name, _) in std::env::vars() {
        if name.starts_with("AUTHD_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    Some(command)
}

#[test]
fn authd_bench_runs_the_load_generator_end_to_end() {
    let Some(mut authd) = authd() else {
        eprintln!("SKIPPED: no authd beside authd-bench; run `cargo test` at the workspace root");
        return;
    };
    // This build's own null worker stands in for another build's (`--baseline`).
    let out = authd
        .args(["bench", "-n", "50", "--rounds", "1", "-w", "1"])
        .args(["--scenarios", "get-token,authenticate"])
        .arg("--baseline")
        .arg(env!("CARGO_BIN_EXE_authd-bench"))
        .output()
        .expect("authd bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // A row's target is the last word before the first `|`.
    let baseline_rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains('|'))
        .filter(|l| {
            l.split('|')
                .next()
                .and_then(|h| h.split_whitespace().last())
                == Some("baseline")
        })
        .collect();
    assert_eq!(
        baseline_rows.len(),
        2,
        "a baseline row per scenario:\n{stdout}"
    );
    for row in &baseline_rows {
        // Its latencies and the CPU columns: cpu, broker, gen (µs per request).
        assert_eq!(
            row.matches("us").count(),
            6,
            "p50, p99, max, cpu, broker, gen: {row}"
        );
    }
    for row in ["get-token", "authenticate", "cold start"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(row) || l.contains(row)),
            "no `{row}` line:\n{stdout}"
        );
    }
}

#[test]
fn authd_bench_passes_its_arguments_through() {
    let Some(mut help) = authd() else {
        eprintln!("SKIPPED: no authd beside authd-bench; run `cargo test` at the workspace root");
        return;
    };
    let out = help.args(["bench", "--help"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Usage: authd-bench") && help.contains("--scenarios"),
        "{help}"
    );
    // A bad argument is authd-bench's usage error, exit 2.
    let out = authd()
        .expect("found above")
        .args(["bench", "--scale", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ENTITIES,RULES"));
}
