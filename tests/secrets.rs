//! Secrets hygiene (SECURITY.md: "never a secret, at any level"): a child `authd serve` at
//! `RUST_LOG=trace`, in text and in JSON log format, runs a scenario with every kind of
//! secret authd handles — PSKs, a generated PSK, app tokens, caller keys (configured and
//! generated), the broker password, the server key — and a pinned certificate, through the
//! error paths too (wrong caller key, wrong PSK, arguments that carry a secret where it does
//! not belong, lockout). None of those values may appear in anything the worker writes, nor
//! in `authd serve --print-config`.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use authd::client::Client;
use serde_json::{json, Value};
use support::*;

/// Values that look like what they stand for and appear nowhere else by chance.
const ADMIN: &str = "caller-admin-SECRET-4f1c9a7e";
const SERVICE: &str = "caller-service-SECRET-8b2d6e01";
const WRONG_KEY: &str = "caller-wrong-SECRET-77aa01bc";
const BROKER_PW: &str = "broker-password-SECRET-c0ffee42";
const PSK: &str = "device-psk-SECRET-91b3f0d2";
const WRONG_PSK: &str = "device-wrong-psk-SECRET-5e6f7a8b";
const MISPLACED: &str = "misplaced-SECRET-2c4e6a8d";

/// A worker process; killed on drop if still running.
struct Worker {
    child: Option<Child>,
}

impl Worker {
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `authd` with none of the test runner's `AUTHD_*` or `RUST_LOG`.
fn authd() -> Command {
    let mut cmd = Command::new(authd_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTHD_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// `authd serve` at `RUST_LOG=trace`, stdout and stderr into `log`.
fn serve(broker: &Broker, data: &Path, log: &Path, format: &str, caller_keys: bool) -> Worker {
    let out = std::fs::File::create(log).expect("log file");
    let mut cmd = authd();
    cmd.args(["serve", "--broker", &broker.url(), "--log-format", format])
        .arg("--data")
        .arg(data)
        .args([
            "--client-id",
            &format!("authd-secrets-{}", uuid::Uuid::new_v4().simple()),
        ])
        .env("RUST_LOG", "trace")
        .env("AUTHD_BROKER_USERNAME", "authd")
        .env("AUTHD_BROKER_PASSWORD", BROKER_PW)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out);
    if caller_keys {
        cmd.env(
            "AUTHD_CALLER_KEYS",
            format!("ops:admin:{ADMIN},backend:service:{SERVICE}"),
        );
    }
    Worker {
        child: Some(cmd.spawn().expect("start authd serve")),
    }
}

/// A client with `key`, once the worker answers.
async fn connect(broker: &Broker, key: &str, src: &str) -> Client {
    let c = client(broker, Some(key), Some(src)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .call("/v1/Auth.ListToken", json!({}), Duration::from_millis(300))
            .await;
        if matches!(&r, Ok(r) if r.error.is_none()) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not answer: {r:?}"
        );
    }
}

/// Calls and returns the result or the error code (no assertion on which).
async fn call(c: &Client, method: &str, args: Value) -> Result<Value, u16> {
    let r = c.call(method, args, TIMEOUT).await.expect("an answer");
    match r.error {
        Some(e) => Err(e.code),
        None => Ok(r.result.unwrap_or(Value::Null)),
    }
}

/// Everything a caller can do with secrets, right and wrong. Returns the secrets the
/// worker made (generated PSK, token) and a line of the certificate's body.
async fn scenario(broker: &Broker, admin_key: &str, service_key: &str) -> (Vec<String>, String) {
    let admin = connect(broker, admin_key, "ops").await;
    let backend = connect(broker, service_key, "alice").await;
    let cert = certs::valid("dev1");
    call(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "dev1", "psk": PSK, "cert": cert}),
    )
    .await
    .expect("put dev1");
    let generated = call(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "dev2", "generate_psk": true}),
    )
    .await
    .expect("put dev2")["psk"]
        .as_str()
        .expect("a generated psk")
        .to_owned();
    let token = call(&backend, "/v1/Auth.GenerateToken", json!({"host": "app"}))
        .await
        .expect("a token")["token"]
        .as_str()
        .expect("a token")
        .to_owned();
    let sign_in = |id: &'static str, creds: Value| {
        let backend = &backend;
        async move {
            call(
                backend,
                "/v1/Auth.Authenticate",
                json!({"id": id, "credentials": creds}),
            )
            .await
        }
    };
    assert_eq!(
        sign_in("dev1", json!({"psk": PSK, "cert": cert})).await,
        Ok(json!(true))
    );
    assert_eq!(
        sign_in("dev2", json!({"psk": generated})).await,
        Ok(json!(true))
    );
    assert_eq!(
        sign_in("alice", json!({"psk": token})).await,
        Ok(json!(true))
    );
    // Wrong PSKs until the id is locked, and once more while locked.
    for _ in 0..7 {
        assert_eq!(
            sign_in("dev1", json!({"psk": WRONG_PSK})).await,
            Ok(json!(false))
        );
    }
    // Someone else's token, and a token presented for the wrong user.
    assert_eq!(
        sign_in("bob", json!({"psk": token})).await,
        Ok(json!(false))
    );
    // A wrong caller key.
    let intruder = client(broker, Some(WRONG_KEY), Some("eve")).await;
    assert_eq!(
        call(&intruder, "/v1/Auth.ListToken", json!({})).await,
        Err(401)
    );
    // Secrets where they do not belong: as a mistyped argument's value (serde quotes it in
    // the error), beside an unknown credential kind, as an unknown argument's name, as a
    // method name, too long, and a service key on an admin method.
    let mut misplaced = vec![
        (
            &admin,
            "/v1/Entity.Put",
            json!({"id": "dev3", "psk": PSK, "disabled": MISPLACED}),
        ),
        (
            &backend,
            "/v1/Auth.Authenticate",
            json!({"id": "dev2", "credentials": {"psk": generated, "pin": MISPLACED}}),
        ),
        (
            &backend,
            "/v1/Auth.Authenticate",
            json!({"id": "dev2", "credentials": {"psk": generated, MISPLACED: 1}}),
        ),
        (
            &backend,
            "/v1/Auth.Authenticate",
            json!({"id": "dev2", MISPLACED: {"psk": PSK}}),
        ),
        (
            &backend,
            "/v1/Auth.GetToken",
            json!({ "host": [MISPLACED] }),
        ),
        (
            &admin,
            "/v1/Entity.Put",
            json!({"id": "dev4", "psk": MISPLACED.repeat(100)}),
        ),
        (&admin, MISPLACED, json!({"psk": PSK})),
    ];
    if admin_key != service_key {
        misplaced.push((
            &backend,
            "/v1/Entity.Put",
            json!({"id": "dev5", "psk": PSK}),
        ));
    }
    for (c, method, args) in misplaced {
        let code = match call(c, method, args.clone()).await {
            Err(code) => code,
            Ok(v) => panic!("{method} {args}: expected an error, got {v}"),
        };
        assert!([400, 403, 404].contains(&code), "{method} {args}: {code}");
    }
    let cert_line = cert.lines().nth(1).expect("a PEM body").to_owned();
    (vec![generated, token], cert_line)
}

/// The secrets of a data directory: its server key(s) and generated admin key, if any.
fn data_secrets(data: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(data.join("server.key")) {
        out.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .map(str::to_owned),
        );
    }
    if let Ok(key) = std::fs::read_to_string(data.join("admin.key")) {
        out.push(key.trim().to_owned());
    }
    out
}

fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!s.is_empty());
        if let Some(at) = text.find(s.as_str()) {
            let start = text[..at].rfind('\n').map_or(0, |n| n + 1);
            let end = text[at..].find('\n').map_or(text.len(), |n| at + n);
            panic!(
                "{what} contains a secret ({}…) in:\n{}",
                &s[..8.min(s.len())],
                &text[start..end]
            );
        }
    }
}

fn fixed_secrets() -> Vec<String> {
    [
        ADMIN, SERVICE, WRONG_KEY, BROKER_PW, PSK, WRONG_PSK, MISPLACED,
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test]
async fn no_secret_in_the_log_at_trace_in_text_or_json() {
    let broker = Broker::start();
    for (format, caller_keys) in [("text", true), ("json", false)] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let log = dir.path().join("authd.log");
        let mut worker = serve(&broker, &data, &log, format, caller_keys);
        let (admin_key, service_key) = if caller_keys {
            (ADMIN.to_owned(), SERVICE.to_owned())
        } else {
            // Quick start: the generated admin key does everything.
            let path = data.join("admin.key");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !path.exists() {
                assert!(Instant::now() < deadline, "no generated admin key");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(50));
            let key = std::fs::read_to_string(&path).unwrap().trim().to_owned();
            (key.clone(), key)
        };
        let (made, cert_line) = scenario(&broker, &admin_key, &service_key).await;
        worker.stop();
        let text = std::fs::read_to_string(&log).unwrap();
        let mut secrets = fixed_secrets();
        secrets.extend(made);
        secrets.extend(data_secrets(&data));
        assert_no_secret(&format!("the {format} log"), &text, &secrets);
        // The certificate is no secret, but a log line has no business carrying it.
        assert_no_secret("the log (certificate)", &text, &[cert_line]);
        // The log really was verbose and really covered the scenario.
        assert!(text.contains("error reply"), "debug lines are on:\n{text}");
        for word in [
            "bad_psk",
            "locked",
            "too many failed sign-ins",
            "Entity.Put",
        ] {
            assert!(text.contains(word), "the log mentions {word}:\n{text}");
        }
        if format == "json" {
            for line in text.lines() {
                let line: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                // Other crates (sled, the PostgreSQL client) stay at info under
                // RUST_LOG=trace: their debug and trace lines are not ours to vouch for.
                let target = line["target"].as_str().unwrap_or_default();
                if !target.starts_with("authd") {
                    assert!(
                        matches!(line["level"].as_str(), Some("INFO" | "WARN" | "ERROR")),
                        "another crate's line below info: {line}"
                    );
                }
            }
        }
    }
}

#[test]
fn print_config_redacts_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("authd.toml");
    std::fs::write(
        &file,
        format!(
            "broker_password = \"{BROKER_PW}\"\n[[caller]]\nname = \"file\"\nscope = \"admin\"\nkey = \"{ADMIN}\"\n"
        ),
    )
    .unwrap();
    for args in [
        vec!["--config".to_owned(), file.display().to_string()],
        vec![
            "--broker-password".to_owned(),
            BROKER_PW.to_owned(),
            "--caller-keys".to_owned(),
            format!("ops:admin:{ADMIN},backend:service:{SERVICE}"),
        ],
    ] {
        let out = authd()
            .args(["serve", "--print-config"])
            .args(&args)
            .env("RUST_LOG", "trace")
            .output()
            .expect("run authd serve --print-config");
        assert!(out.status.success(), "{:?}", out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stdout.contains("<redacted>"), "{stdout}");
        assert_no_secret(
            "--print-config",
            &format!("{stdout}{stderr}"),
            &fixed_secrets(),
        );
    }
    // The same through the environment.
    let out = authd()
        .args(["serve", "--print-config"])
        .env("AUTHD_BROKER_PASSWORD", BROKER_PW)
        .env("AUTHD_CALLER_KEYS", format!("ops:admin:{ADMIN}"))
        .output()
        .expect("run authd serve --print-config");
    assert!(out.status.success());
    assert_no_secret(
        "--print-config",
        &String::from_utf8_lossy(&out.stdout),
        &fixed_secrets(),
    );
}

#[test]
fn config_errors_do_not_quote_secrets() {
    let out = authd()
        .args(["serve", "--print-config", "--caller-keys"])
        .arg(format!("ops:root:{ADMIN}"))
        .output()
        .expect("run authd serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("root"), "says what is wrong: {stderr}");
    assert_no_secret("a config error", &stderr, &fixed_secrets());
}

/// A broker that checks passwords: account `authd` with `BROKER_PW`, in `dir`.
fn password_broker(dir: &Path) -> Broker {
    let passwd = dir.join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["authd", BROKER_PW])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(status.success());
    Broker::start_config(&format!(
        "listener {{port}} 127.0.0.1\nallow_anonymous false\npassword_file {}\nuser root\npersistence true\npersistence_location {{dir}}/\nlog_dest stderr\nlog_type error\n",
        passwd.display()
    ))
}

/// A client of the `authd` account (the password broker knows no other).
async fn account_client(broker: &Broker, key: &str) -> Client {
    let mut options = authd::client::ClientOptions::new(broker.address());
    options.credentials = Some(("authd".into(), BROKER_PW.into()));
    options.key = Some(key.into());
    options.src = "ops".into();
    Client::connect(options, TIMEOUT)
        .await
        .expect("client connects")
}

/// SECURITY.md "Secrets in memory": the configuration the worker shares with its tasks for
/// its whole life holds neither caller keys nor the broker password; the keys work as
/// digests, and the password is still there for a reconnect (in the MQTT client's options).
#[tokio::test]
async fn the_configuration_the_worker_shares_holds_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = password_broker(dir.path());
    let data = dir.path().join("data");
    let mut config = worker_config(&broker, &data);
    config.callers =
        authd::caller::parse_caller_keys(&format!("ops:admin:{ADMIN},backend:service:{SERVICE}"))
            .unwrap();
    config.broker_username = Some("authd".into());
    config.broker_password = Some(BROKER_PW.into());
    let worker = authd::Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("worker connected with its password");

    // Serialized, a secret would appear as itself (only `redacted()` replaces it).
    let shared = serde_json::to_string(worker.config()).unwrap();
    assert_no_secret("the shared configuration", &shared, &fixed_secrets());
    assert!(worker.config().callers.is_empty());
    assert!(worker.config().broker_password.is_none());
    assert_eq!(worker.config().broker_username.as_deref(), Some("authd"));

    let admin = account_client(&broker, ADMIN).await;
    call(&admin, "/v1/Entity.List", json!({}))
        .await
        .expect("the admin key works from its digest");
    let wrong = account_client(&broker, WRONG_KEY).await;
    assert_eq!(call(&wrong, "/v1/Entity.List", json!({})).await, Err(401));

    // The broker restarts: the worker logs in again with the one copy it kept.
    broker.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let admin = account_client(&broker, ADMIN).await;
        let r = admin
            .call("/v1/Entity.List", json!({}), Duration::from_millis(500))
            .await;
        if matches!(&r, Ok(r) if r.error.is_none()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not log in again: {r:?}"
        );
    }
    worker.stop().await.expect("clean stop");
}
