//! The deployment files: `docker-compose.yml` checked by the compose tool itself (when it
//! is installed; there is no Docker engine on the test machines, `config` needs none) and
//! kept in step with the shipped broker config and the Dockerfile.

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `docker compose` (the plugin) or `docker-compose` (v1), whichever answers.
fn compose_tool() -> Option<Vec<&'static str>> {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("docker", &["compose", "version"]) {
        Some(vec!["docker", "compose"])
    } else if works("docker-compose", &["version"]) {
        Some(vec!["docker-compose"])
    } else {
        None
    }
}

#[test]
fn the_compose_tool_accepts_the_stack() {
    let Some(tool) = compose_tool() else {
        println!(
            "SKIPPED: neither `docker compose` nor `docker-compose` is installed \
             (apt-get install docker-compose); the file was not checked by the tool"
        );
        return;
    };
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .args(["-f", &format!("{ROOT}/docker-compose.yml"), "config"])
        .output()
        .expect("compose runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{tool:?} config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the tool resolved: both services, the shipped config mounted read-only, the
    // worker's broker account, data in a volume.
    for expected in [
        "mosquitto:",
        "image: eclipse-mosquitto:2",
        &format!("{ROOT}/mosquitto:/mosquitto/config:ro"),
        "mosquitto-data:/mosquitto/data",
        "AUTHD_BROKER_USERNAME: authd",
        "AUTHD_BROKER_PASSWORD: authd-dev-only-password",
        "AUTHD_CALLER_KEYS: dev-backend:service:dev-only-service-key",
        "authd-data:/data",
        "mqtt://mosquitto:1883",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in\n{stdout}"
        );
    }
}

#[test]
fn the_stack_is_labelled_dev_only_and_matches_the_shipped_files() {
    let compose = read("docker-compose.yml");
    assert!(
        compose.contains("DEV ONLY"),
        "docker-compose.yml says it is dev-only"
    );
    // The broker config the stack mounts listens where authd is told to connect, and keeps
    // its data where the volume is.
    let conf = read("mosquitto/mosquitto.conf");
    assert!(conf.contains("\nlistener 1883\n"));
    assert!(conf.contains("persistence_location /mosquitto/data/"));
    assert!(conf.contains("password_file /mosquitto/config/passwd"));
    // The worker's account exists in the shipped passwd file (its password is checked
    // against mosquitto in tests/broker_gate.rs).
    assert!(read("mosquitto/passwd")
        .lines()
        .any(|l| l.starts_with("authd:")));

    let dockerfile = read("Dockerfile");
    for expected in [
        "FROM debian:bookworm-slim",
        "USER authd",
        "VOLUME /data",
        r#"CMD ["serve", "--broker", "mqtt://mosquitto:1883", "--data", "/data"]"#,
    ] {
        assert!(
            dockerfile.contains(expected),
            "Dockerfile lacks `{expected}`"
        );
    }
    assert!(read("README.md").contains("## Compose stack (dev-only)"));
}
