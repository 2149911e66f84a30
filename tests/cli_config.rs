//! `authd serve --print-config` as an operator runs it: file, `AUTHD_*` environment and
//! flags in one documented order, secrets redacted, bad settings refused with exit 2.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

fn authd() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_authd"));
    // Only what the test sets: no AUTHD_* or RUST_LOG from the caller's environment.
    for (name, _) in std::env::vars() {
        if name.starts_with("AUTHD_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `command` (which names the `serve` subcommand) with `--print-config`.
fn print_config(command: &mut Command) -> (Output, String) {
    let out = command.arg("--print-config").output().expect("authd runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

fn parse(stdout: &str) -> toml::Table {
    toml::from_str(stdout).unwrap_or_else(|e| panic!("not TOML ({e}):\n{stdout}"))
}

#[test]
fn flags_beat_environment_beat_file_beat_defaults_and_secrets_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("authd.toml");
    std::fs::write(
        &file,
        r#"
broker = "mqtt://from-file:1884"
id = "from-file"
client_id = "client-from-file"
max_in_flight = 7
drain_secs = 3
broker_username = "authd"
broker_password = "file-broker-password"

[[caller]]
name = "filekey"
scope = "service"
key = "file-caller-secret"
"#,
    )
    .unwrap();
    let (out, stdout) = print_config(
        authd()
            .arg("--log-format")
            .arg("json")
            .env("AUTHD_CONFIG", &file)
            .env("AUTHD_ID", "from-env")
            .env("AUTHD_CLIENT_ID", "client-from-env")
            .env("AUTHD_MAX_IN_FLIGHT", "9")
            .env("AUTHD_BROKER_PASSWORD", "env-broker-password")
            .env(
                "AUTHD_CALLER_KEYS",
                "backend:service:env-service-secret,ops:admin:env-admin-secret",
            )
            .args(["serve", "--id", "from-flag", "--metrics", "127.0.0.1:9464"]),
    );
    assert!(out.status.success(), "{out:?}");
    for secret in [
        "file-broker-password",
        "env-broker-password",
        "file-caller-secret",
        "env-service-secret",
        "env-admin-secret",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
    let c = parse(&stdout);
    let s = |k: &str| c[k].as_str().unwrap_or_else(|| panic!("{k} in\n{stdout}"));
    assert_eq!(s("id"), "from-flag", "flag beats env beats file");
    assert_eq!(s("client_id"), "client-from-env", "env beats file");
    assert_eq!(c["max_in_flight"].as_integer(), Some(9), "env beats file");
    assert_eq!(s("broker"), "mqtt://from-file:1884", "file beats default");
    assert_eq!(c["drain_secs"].as_integer(), Some(3));
    assert_eq!(c["keep_alive_secs"].as_integer(), Some(30), "default");
    assert_eq!(s("broker_username"), "authd");
    assert_eq!(s("broker_password"), "<redacted>");
    assert_eq!(s("metrics"), "127.0.0.1:9464");
    assert_eq!(s("log_format"), "json", "the global --log-format flag");
    let callers = c["caller"].as_array().expect("[[caller]] tables");
    let names: Vec<_> = callers
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["backend", "ops"],
        "AUTHD_CALLER_KEYS replaces the file's"
    );
    assert!(callers
        .iter()
        .all(|t| t["key"].as_str() == Some("<redacted>")));
    assert!(stdout.contains("# broker_ca: not set"), "{stdout}");
}

#[test]
fn with_nothing_set_it_prints_the_defaults() {
    let home = tempfile::tempdir().unwrap();
    let (out, stdout) = print_config(
        authd()
            .env("HOME", home.path())
            .env_remove("XDG_DATA_HOME")
            .arg("serve"),
    );
    assert!(out.status.success(), "{out:?}");
    let c = parse(&stdout);
    assert_eq!(c["broker"].as_str(), Some("mqtt://127.0.0.1:1883"));
    assert_eq!(c["id"].as_str(), Some("//api.mongoose-iot.com"));
    assert_eq!(
        Path::new(c["data"].as_str().unwrap()),
        home.path().join(".local/share/authd")
    );
    assert_eq!(c["caller"].as_array().map(Vec::len), Some(0));
    assert!(c.get("metrics").is_none());
    assert!(stdout.contains("# caller: none configured"), "{stdout}");
    assert!(stdout.contains("# metrics: not set"), "{stdout}");
}

#[test]
fn bad_settings_exit_2_naming_the_setting_not_the_value() {
    /// (environment, flags, what stderr must say)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (
            &[("AUTHD_MAX_IN_FLIGHT", "lots")],
            &[],
            "AUTHD_MAX_IN_FLIGHT",
        ),
        (&[("AUTHD_LOG_FORMAT", "xml")], &[], "xml"),
        (&[], &["--broker", "tcp://x"], "mqtts://"),
        (&[], &["--metrics", "everywhere"], "metrics"),
        (
            &[("AUTHD_BROKER_CA", "/ca.pem")],
            &[],
            "broker_ca is set but broker",
        ),
        (
            &[("AUTHD_CALLER_KEYS", "ops:root:topsecret")],
            &[],
            "unknown scope",
        ),
    ];
    for (env, flags, expect) in cases {
        let mut command = authd();
        command.envs(env.iter().copied()).arg("serve").args(*flags);
        let (out, _) = print_config(&mut command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?} {flags:?}: {stderr}");
        assert!(stderr.contains(expect), "{env:?} {flags:?}: {stderr}");
        assert!(!stderr.contains("topsecret"), "{stderr}");
    }
}

#[test]
fn a_bad_file_is_refused_without_quoting_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("authd.toml");
    std::fs::write(&file, "broker_password = \"hunter2\"\nmax_in_flite = 3\n").unwrap();
    let (out, _) = print_config(authd().arg("serve").arg("--config").arg(&file));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("max_in_flite"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// `authd.example.toml` documents every key: with its settings uncommented it is a valid
/// config that names each key `--print-config` shows, at the value in force by default.
#[test]
fn the_example_file_lists_every_key() {
    let root = env!("CARGO_MANIFEST_DIR");
    let example = std::fs::read_to_string(format!("{root}/authd.example.toml")).unwrap();
    let (out, _) = print_config(
        authd()
            .arg("serve")
            .arg("--config")
            .arg(format!("{root}/authd.example.toml")),
    );
    assert!(
        out.status.success(),
        "the example as shipped is valid: {out:?}"
    );

    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let settings: toml::Table = toml::from_str(&uncommented).expect("uncommented example");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.toml");
    // TLS files need mqtts://; the rest is taken as written.
    std::fs::write(
        &file,
        uncommented.replace("mqtt://127.0.0.1", "mqtts://127.0.0.1"),
    )
    .unwrap();
    let (out, stdout) = print_config(authd().arg("serve").arg("--config").arg(&file));
    assert!(
        out.status.success(),
        "every example setting is valid: {out:?}"
    );
    let in_force = parse(&stdout);
    let documented: Vec<&String> = settings.keys().collect();
    let all: Vec<&String> = in_force.keys().collect();
    assert_eq!(
        documented.len(),
        all.len(),
        "documented {documented:?}, in force {all:?}"
    );

    // And the defaults it quotes are the real ones.
    let home = tempfile::tempdir().unwrap();
    let (_, defaults) = print_config(authd().env("HOME", home.path()).arg("serve"));
    let defaults = parse(&defaults);
    let quoted: HashMap<&str, &toml::Value> = settings
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "broker_username"
                    | "broker_password"
                    | "broker_ca"
                    | "broker_cert"
                    | "broker_key"
                    | "data"
                    | "metrics"
                    | "caller"
                    | "store"
                    | "share_group"
            )
        })
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    for (key, value) in quoted {
        assert_eq!(Some(value), defaults.get(key), "default of {key}");
    }
}

#[test]
fn a_float_key_takes_a_fraction_from_the_environment() {
    let (out, stdout) = print_config(
        authd()
            .env("AUTHD_RATE_LIMIT_PER_SEC", "2.5")
            .env("AUTHD_RATE_LIMIT_BURST", "4")
            .arg("serve"),
    );
    assert!(out.status.success(), "{out:?}");
    let c = parse(&stdout);
    assert_eq!(c["rate_limit_per_sec"].as_float(), Some(2.5));
    assert_eq!(c["rate_limit_burst"].as_integer(), Some(4));
}

#[test]
fn a_store_password_is_redacted_in_every_spelling() {
    let home = tempfile::tempdir().unwrap();
    for url in [
        "postgres://authd:store-secret@db:5432/authd",
        "postgres://authd:store/secret@db/authd",
        "postgres://authd@db/authd?sslmode=disable&password=store-secret",
    ] {
        let (out, stdout) = print_config(
            authd()
                .env("HOME", home.path())
                .env("AUTHD_STORE", url)
                .arg("serve"),
        );
        assert!(out.status.success(), "{url}: {out:?}");
        let c = parse(&stdout);
        let shown = c["store"].as_str().unwrap_or_default();
        assert!(shown.contains("<redacted>"), "{url}: {shown}");
        assert!(!stdout.contains("secret"), "{url}:\n{stdout}");
    }
}
