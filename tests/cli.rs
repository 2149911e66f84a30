//! The built `authd` binary as an operator uses it (README "Two commands", "Try it"):
//! `authd serve` as a child process, `authd call` and its exit codes, the generated admin
//! key, and the README's `mosquitto_rr` example. These tests drive processes only, so they
//! are plain blocking tests.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, so a failing test
/// leaves nothing running.
struct ChildGuard {
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Sends SIGTERM and waits (bounded) for the exit status.
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `authd` with no `AUTHD_*` variables from the environment of whoever runs the tests.
fn authd() -> Command {
    let mut cmd = Command::new(authd_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTHD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Starts `authd serve --broker … --data DIR` and waits until it answers a call.
fn serve(broker: &Broker, data: &Path) -> ChildGuard {
    let log = data.with_extension("log");
    let child = authd()
        .args(["serve", "--broker", &broker.url(), "--data"])
        .arg(data)
        .args([
            "--client-id",
            &format!("authd-cli-{}", uuid::Uuid::new_v4().simple()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start authd serve");
    let guard = ChildGuard {
        child: Some(child),
        log,
    };
    // Ready when a call succeeds. Until the worker has subscribed a request goes nowhere,
    // so each attempt waits briefly; the loop waits for the condition, not for a time.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let out = call(broker, data, &["/v1/Auth.ListToken", "--timeout", "0.3"]);
        if out.status.code() == Some(0) {
            return guard;
        }
        assert!(
            Instant::now() < deadline,
            "authd serve did not answer; its log:\n{}",
            guard.log()
        );
    }
}

/// `authd call --broker … --data DIR <args>`.
fn call(broker: &Broker, data: &Path, args: &[&str]) -> Output {
    authd()
        .args(["call", "--broker", &broker.url(), "--data"])
        .arg(data)
        .args(args)
        .output()
        .expect("run authd call")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON frame ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn serve_and_call_with_the_generated_admin_key() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut worker = serve(&broker, &data);

    // The quick-start admin key: generated, owner-only, and what `call --data` uses.
    let key_path = data.join("admin.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "admin.key mode {mode:o}");
    }
    let key = std::fs::read_to_string(&key_path).unwrap();
    assert!(
        !worker.log().contains(key.trim()),
        "the key reached the log"
    );

    // Exit 0 on a result; stdout is the response frame.
    let out = call(
        &broker,
        &data,
        &[
            "--src",
            "alice",
            "/v1/Auth.GenerateToken",
            r#"{"host":"app.example.com"}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let frame = stdout_json(&out);
    assert_eq!(frame["dst"], "alice");
    assert_eq!(frame["src"], SERVICE_ID);
    let token = frame["result"]["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("authd_"));
    let out = call(
        &broker,
        &data,
        &[
            "--src",
            "alice",
            "Auth.GetToken",
            r#"{"host":"app.example.com"}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout_json(&out)["result"]["token"], token.as_str());

    // Exit 1 on an error frame, which is still printed.
    let out = call(&broker, &data, &["/v1/Auth.Nope"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stdout_json(&out)["error"]["code"], 404);
    let out = call(&broker, &data, &["Auth.GetToken", r#"{"host":5}"#]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["error"]["code"], 400);
    // A wrong key (given explicitly, overriding the data dir's) is an error frame too.
    let out = call(&broker, &data, &["--key", "wrong", "Auth.ListToken"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["error"]["code"], 401);
    // Arguments that are not a JSON object never leave the client.
    let out = call(&broker, &data, &["Auth.GetToken", "[1]"]);
    assert_eq!(out.status.code(), Some(2));

    // SIGTERM: a clean exit 0.
    let status = worker.terminate().expect("authd serve exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log());
    // The worker is gone: a call now times out (exit 2).
    let out = call(&broker, &data, &["Auth.ListToken", "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no response"),
        "{out:?}"
    );
}

#[test]
fn call_exits_2_when_the_broker_is_unreachable() {
    let port = free_port();
    let started = Instant::now();
    let out = authd()
        .args([
            "call",
            "--broker",
            &format!("mqtt://127.0.0.1:{port}"),
            "--key",
            "k",
            "--timeout",
            "1",
            "Auth.ListToken",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&port.to_string()), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by --timeout"
    );
    // Not a broker URL at all: exit 2 too.
    let out = authd()
        .args(["call", "--broker", "tcp://x", "Auth.ListToken"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_readme_mosquitto_rr_example() {
    let Ok(rr) = which("mosquitto_rr") else {
        eprintln!("SKIPPED the_readme_mosquitto_rr_example: mosquitto_rr is not installed (apt-get install mosquitto-clients)");
        return;
    };
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _worker = serve(&broker, &data);
    let key = std::fs::read_to_string(data.join("admin.key")).unwrap();
    let key = key.trim();
    let out = Command::new(rr)
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-t", "//api.mongoose-iot.com/rpc", "-e", "alice/rpc", "-W", "5"])
        .arg("-m")
        .arg(format!(
            r#"{{"v":2,"id":1,"src":"alice","key":"{key}","method":"/v1/Auth.ListToken","args":{{}}}}"#
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let frame = stdout_json(&out);
    assert_eq!(
        frame,
        serde_json::json!({"v": 2, "src": SERVICE_ID, "dst": "alice", "id": 1, "result": []})
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

/// `authd bench` runs `authd-bench` from beside `authd`; where it is missing it says how to
/// build it (exit 2).
#[test]
fn bench_without_authd_bench_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let lone = dir
        .path()
        .join(format!("authd{}", std::env::consts::EXE_SUFFIX));
    std::fs::copy(authd_bin(), &lone).unwrap();
    let out = Command::new(&lone)
        .args(["bench", "-n", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("authd bench: ")
            && stderr.contains("authd-bench not found")
            && stderr.contains("cargo build --release"),
        "{stderr}"
    );
}
