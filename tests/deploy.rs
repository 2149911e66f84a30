//! The deployment files: `docker-compose.yml` checked by the compose tool itself (when it
//! is installed; there is no Docker engine on the test machines, `config` needs none) and
//! kept in step with the shipped broker config and the Dockerfile; its hardening (read-only
//! root, no capabilities, no new privileges, pinned images) checked by reading the YAML.

use std::collections::BTreeMap;
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
        "image: eclipse-mosquitto:2.0.22@sha256:",
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
        "FROM debian:12.15-slim",
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

/// A service's keys, each with its value as a list of items: an inline scalar is one item,
/// a flow sequence (`[a, b]`) or a block sequence (`- a` lines) one item per element,
/// nested maps their lines. Quotes are removed.
type Service = BTreeMap<String, Vec<String>>;

/// The `services:` of a compose file, read with the subset of YAML the file uses (block
/// maps indented by two spaces, flow and block sequences, full-line comments). Panics on
/// anything else, so that a file this reader misreads fails loudly instead of passing.
fn compose_services(yaml: &str) -> BTreeMap<String, Service> {
    let unquote = |v: &str| v.trim().trim_matches('"').trim_matches('\'').to_owned();
    let items = |v: &str| -> Vec<String> {
        let v = v.trim();
        match v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
            Some(inner) => inner
                .split(',')
                .map(unquote)
                .filter(|i| !i.is_empty())
                .collect(),
            None if v.is_empty() => Vec::new(),
            None => vec![unquote(v)],
        }
    };
    let mut services = BTreeMap::new();
    let mut in_services = false;
    let mut service: Option<String> = None;
    let mut key: Option<String> = None;
    for line in yaml.lines() {
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        match indent {
            0 => {
                in_services = text == "services:";
                service = None;
            }
            _ if !in_services => {}
            2 => {
                let name = text
                    .strip_suffix(':')
                    .unwrap_or_else(|| panic!("service? {line}"));
                services.insert(name.to_owned(), Service::new());
                service = Some(name.to_owned());
                key = None;
            }
            4 => {
                let (k, v) = text
                    .split_once(':')
                    .unwrap_or_else(|| panic!("key? {line}"));
                let name = service.as_ref().expect("a service");
                services
                    .get_mut(name)
                    .unwrap()
                    .insert(k.to_owned(), items(v));
                key = Some(k.to_owned());
            }
            _ => {
                let (name, k) = (
                    service.as_ref().expect("a service"),
                    key.as_ref().expect("a key"),
                );
                let item = text
                    .strip_prefix("- ")
                    .map_or_else(|| text.to_owned(), unquote);
                services
                    .get_mut(name)
                    .unwrap()
                    .get_mut(k)
                    .unwrap()
                    .push(item);
            }
        }
    }
    services
}

/// `name:tag` or `name:tag@sha256:…` → (tag, digest). The tag must name a release (a
/// version with at least major.minor, never `latest` or a bare major).
fn pinned(image: &str) -> (bool, Option<&str>) {
    let (reference, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    let tag = reference.rsplit_once(':').map_or("", |(_, t)| t);
    let version = tag.split('-').next().unwrap_or("");
    let parts: Vec<&str> = version.split('.').collect();
    let release = parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (release, digest)
}

#[test]
fn the_stack_is_hardened_and_its_images_pinned() {
    let services = compose_services(&read("docker-compose.yml"));
    assert_eq!(
        services.keys().collect::<Vec<_>>(),
        [
            "authd",
            "authd-a",
            "authd-b",
            "authd-key",
            "mosquitto",
            "postgres"
        ],
        "services read from docker-compose.yml"
    );
    for (name, service) in &services {
        let get = |key: &str| service.get(key).cloned().unwrap_or_default();
        assert_eq!(get("read_only"), ["true"], "{name}: read_only");
        assert_eq!(get("cap_drop"), ["ALL"], "{name}: cap_drop");
        assert!(
            get("cap_add").is_empty(),
            "{name}: cap_add {:?}",
            get("cap_add")
        );
        assert!(
            get("security_opt")
                .iter()
                .any(|o| o == "no-new-privileges:true"),
            "{name}: security_opt {:?}",
            get("security_opt")
        );
        assert!(get("privileged").is_empty(), "{name}: privileged");
        // With a read-only root, whatever is written goes to a volume.
        assert!(!get("volumes").is_empty(), "{name}: no volume to write to");
    }

    // The broker: a released image, by digest, as the image's unprivileged user.
    let mosquitto = &services["mosquitto"];
    let image = &mosquitto["image"][0];
    let (release, digest) = pinned(image);
    assert!(release, "mosquitto image not pinned to a release: {image}");
    let digest = digest.unwrap_or_else(|| panic!("mosquitto image without a digest: {image}"));
    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{digest}"
    );
    assert_eq!(
        mosquitto["user"],
        ["1883:1883"],
        "mosquitto runs as its own user"
    );
    // PostgreSQL (profile `workers`): the same, as the image's `postgres` user.
    let postgres = &services["postgres"];
    let image = &postgres["image"][0];
    assert!(image.starts_with("postgres:"), "{image}");
    let (release, digest) = pinned(image);
    assert!(release, "postgres image not pinned to a release: {image}");
    let digest = digest.unwrap_or_else(|| panic!("postgres image without a digest: {image}"));
    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{digest}"
    );
    assert_eq!(
        postgres["user"],
        ["999:999"],
        "postgres runs as its own user"
    );

    // authd: built here, from base images pinned to releases, as a non-root user.
    let authd = &services["authd"];
    assert_eq!(authd["build"], ["."]);
    let dockerfile = read("Dockerfile");
    let bases: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|l| l.split_whitespace().next().unwrap_or_default())
        .collect();
    assert_eq!(bases.len(), 2, "{bases:?}");
    for base in bases {
        assert!(
            pinned(base).0,
            "Dockerfile base image not pinned to a release: {base}"
        );
    }
    assert!(dockerfile.contains("\nUSER authd\n"));
}

#[test]
fn the_compose_reader_reads_what_the_checks_rely_on() {
    let services = compose_services(
        "x-a: 1\nservices:\n  s:\n    image: \"a:1.2.3\"\n    cap_drop: [ALL, NET_RAW]\n    security_opt:\n      - no-new-privileges:true\n    read_only: true\nvolumes:\n  v:\n",
    );
    let s = &services["s"];
    assert_eq!(s["image"], ["a:1.2.3"]);
    assert_eq!(s["cap_drop"], ["ALL", "NET_RAW"]);
    assert_eq!(s["security_opt"], ["no-new-privileges:true"]);
    assert_eq!(s["read_only"], ["true"]);
    assert_eq!(services.len(), 1);
    assert_eq!(pinned("eclipse-mosquitto:2"), (false, None));
    assert_eq!(pinned("eclipse-mosquitto:latest"), (false, None));
    assert_eq!(pinned("rust:1-bookworm"), (false, None));
    assert_eq!(pinned("rust:1.95.0-bookworm"), (true, None));
    assert_eq!(pinned("debian:12.15-slim"), (true, None));
    assert_eq!(pinned("m:2.0.22@sha256:ab"), (true, Some("sha256:ab")));
}

#[test]
fn the_shipped_broker_config_binds_client_ids_and_bounds_queues() {
    let conf = read("mosquitto/mosquitto.conf");
    let setting = |name: &str| -> Option<String> {
        conf.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
    };
    // A client's id is its account: no account can connect as the worker (tests/session.rs
    // runs the takeover against it). A listener option: every listener needs the line,
    // after its `listener` line and before the next.
    let mut blocks = conf.split("\nlistener ");
    let before = blocks.next().unwrap_or_default();
    assert!(
        !before.contains("\nuse_username_as_clientid"),
        "before any listener it opens a default one"
    );
    let listeners: Vec<&str> = blocks.collect();
    assert!(!listeners.is_empty(), "no listener");
    for block in listeners {
        assert!(
            block.lines().any(|l| l == "use_username_as_clientid true"),
            "listener {} without use_username_as_clientid true",
            block.lines().next().unwrap_or_default()
        );
    }
    // Queues per client bounded in messages and in bytes (0 would mean unbounded).
    for name in ["max_queued_messages", "max_queued_bytes"] {
        let value: u64 = setting(name)
            .unwrap_or_else(|| panic!("mosquitto.conf sets no {name}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(value > 0, "{name} 0 is unbounded");
    }
    let bytes: u64 = setting("max_queued_bytes").unwrap().parse().unwrap();
    assert!(bytes <= 256 * 1024 * 1024, "max_queued_bytes {bytes}");
}

/// The `topic` lines of `user` in an acl file, in order.
fn acl_rules<'a>(acl: &'a str, user: &str) -> Vec<&'a str> {
    let mut current: Option<&str> = None;
    let mut rules = Vec::new();
    for line in acl.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("user ") {
            current = Some(name.trim());
        } else if line.starts_with("pattern ") {
            current = None;
        } else if line.starts_with("topic ") && current == Some(user) {
            rules.push(line);
        }
    }
    rules
}

#[test]
fn every_worker_account_has_the_workers_rights_and_a_password() {
    // Several workers take one broker account each (client ids are accounts); the shipped
    // files have two, with the same rights (tests/broker_gate.rs runs both in one share
    // group against mosquitto).
    let acl = read("mosquitto/acl");
    let passwd = read("mosquitto/passwd");
    let worker = acl_rules(&acl, "authd");
    assert_eq!(
        worker,
        [
            "topic read //api.mongoose-iot.com/rpc",
            "topic read //api.mongoose-iot.com/rpc/#",
            "topic write +/rpc",
            "topic write //api.mongoose-iot.com/events"
        ]
    );
    for account in ["authd", "authd-2"] {
        assert_eq!(acl_rules(&acl, account), worker, "{account}'s rights");
        assert!(
            passwd
                .lines()
                .any(|l| l.starts_with(&format!("{account}:"))),
            "{account} not in mosquitto/passwd"
        );
    }
    // The backend accounts may follow the change events; nobody else reads them.
    for account in ["backend", "relay", "ops"] {
        assert!(
            acl_rules(&acl, account).contains(&"topic read //api.mongoose-iot.com/events"),
            "{account} reads the events"
        );
    }
    // Devices have no rules of their own (only `pattern read %u/rpc`).
    assert!(acl_rules(&acl, "device1").is_empty());
    assert!(acl_rules(&acl, "nobody").is_empty());
}

/// A service's `environment:` (map form) as name → value, quotes removed.
fn environment(service: &Service) -> BTreeMap<String, String> {
    service
        .get("environment")
        .map(|lines| {
            lines
                .iter()
                .map(|l| {
                    let (k, v) = l
                        .split_once(':')
                        .unwrap_or_else(|| panic!("environment entry? {l}"));
                    (k.trim().to_owned(), v.trim().trim_matches('"').to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A service's `depends_on:` (long form) as service → condition.
fn depends_on(service: &Service) -> BTreeMap<String, String> {
    let lines = service.get("depends_on").cloned().unwrap_or_default();
    lines
        .chunks(2)
        .map(|pair| {
            let name = pair[0]
                .strip_suffix(':')
                .unwrap_or_else(|| panic!("depends_on entry? {pair:?}"));
            let condition = pair
                .get(1)
                .and_then(|c| c.strip_prefix("condition: "))
                .unwrap_or_else(|| panic!("depends_on {name} without a condition"));
            (name.to_owned(), condition.to_owned())
        })
        .collect()
}

#[test]
fn the_workers_profile_runs_two_workers_on_one_group_and_postgres() {
    let services = compose_services(&read("docker-compose.yml"));
    let profiles = |name: &str| services[name].get("profiles").cloned().unwrap_or_default();
    // `docker compose up` is as before; the profile adds the rest.
    for name in ["mosquitto", "authd"] {
        assert!(profiles(name).is_empty(), "{name} has profiles");
    }
    for name in ["postgres", "authd-key", "authd-a", "authd-b"] {
        assert_eq!(profiles(name), ["workers"], "{name}'s profiles");
    }

    // PostgreSQL: a healthcheck the workers wait for, its data in a named volume.
    let postgres = &services["postgres"];
    let postgres_env = environment(postgres);
    assert!(
        postgres["healthcheck"]
            .iter()
            .any(|l| l.starts_with("test:") && l.contains("pg_isready")),
        "postgres healthcheck: {:?}",
        postgres["healthcheck"]
    );
    assert_eq!(
        postgres["volumes"],
        ["postgres-data:/var/lib/postgresql/data"]
    );
    assert!(postgres_env["POSTGRES_PASSWORD"].contains("dev-only"));

    // The server key: made once in the authd-key volume, linked by every worker.
    assert_eq!(services["authd-key"]["volumes"], ["authd-key:/data"]);

    let acl = read("mosquitto/acl");
    let passwd = read("mosquitto/passwd");
    let worker_rights = acl_rules(&acl, "authd");
    let workers = ["authd-a", "authd-b"];
    let env: Vec<_> = workers.iter().map(|w| environment(&services[*w])).collect();
    for (name, env) in workers.iter().zip(&env) {
        let service = &services[*name];
        // One share group, one store: the postgres service's database, as its user.
        assert_eq!(env["AUTHD_SHARE_GROUP"], "authd", "{name}");
        let store = &env["AUTHD_STORE"];
        let expected = format!(
            "postgres://{}:{}@postgres:5432/{}",
            postgres_env["POSTGRES_USER"],
            postgres_env["POSTGRES_PASSWORD"],
            postgres_env["POSTGRES_DB"]
        );
        assert_eq!(store, &expected, "{name}: AUTHD_STORE");
        // Its own broker account, from the shipped files, with the worker's rights; the
        // client id is the account (the broker makes it so: use_username_as_clientid).
        let account = &env["AUTHD_BROKER_USERNAME"];
        assert_eq!(&env["AUTHD_CLIENT_ID"], account, "{name}: client id");
        assert_eq!(
            env["AUTHD_BROKER_PASSWORD"],
            format!("{account}-dev-only-password"),
            "{name}"
        );
        assert!(
            passwd
                .lines()
                .any(|l| l.starts_with(&format!("{account}:"))),
            "{name}: account {account} not in mosquitto/passwd"
        );
        assert_eq!(
            acl_rules(&acl, account),
            worker_rights,
            "{name}: {account}'s rights"
        );
        // Started once the database is healthy and the key exists.
        let deps = depends_on(service);
        assert_eq!(deps["postgres"], "service_healthy", "{name}");
        assert_eq!(
            deps["authd-key"], "service_completed_successfully",
            "{name}"
        );
        assert!(deps.contains_key("mosquitto"), "{name}");
        // Its own data volume; the shared key read-only, linked into the data directory
        // before authd starts.
        assert_eq!(
            service["volumes"],
            [format!("{name}-data:/data"), "authd-key:/key:ro".to_owned()],
            "{name}: volumes"
        );
        let command = service["command"].join(" ");
        assert!(
            command.starts_with("ln -sfn /key/server.key /data/server.key && exec authd serve ")
                && command.contains("--data /data"),
            "{name}: command {command}"
        );
        assert!(service["healthcheck"].iter().any(|l| l.contains("/ready")));
    }
    // Distinct accounts and client ids (one session each), the same caller keys.
    assert_ne!(
        env[0]["AUTHD_BROKER_USERNAME"], env[1]["AUTHD_BROKER_USERNAME"],
        "two workers on one broker account take each other's session"
    );
    assert_ne!(env[0]["AUTHD_CLIENT_ID"], env[1]["AUTHD_CLIENT_ID"]);
    assert_eq!(env[0]["AUTHD_CALLER_KEYS"], env[1]["AUTHD_CALLER_KEYS"]);
    assert_ne!(services["authd-a"]["ports"], services["authd-b"]["ports"]);
}

#[test]
fn the_compose_tool_accepts_the_workers_profile() {
    let Some(tool) = compose_tool() else {
        println!(
            "SKIPPED: neither `docker compose` nor `docker-compose` is installed \
             (apt-get install docker-compose); the file was not checked by the tool"
        );
        return;
    };
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .args([
            "-f",
            &format!("{ROOT}/docker-compose.yml"),
            "--profile",
            "workers",
            "config",
        ])
        .output()
        .expect("compose runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{tool:?} --profile workers config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "postgres:",
        "image: postgres:17.11-bookworm@sha256:",
        "condition: service_healthy",
        "condition: service_completed_successfully",
        "AUTHD_SHARE_GROUP: authd",
        "AUTHD_BROKER_USERNAME: authd-2",
        "AUTHD_STORE: postgres://authd:authd-dev-only-password@postgres:5432/authd",
        "authd-key:/key:ro",
        "authd-a-data:/data",
        "authd-b-data:/data",
        "postgres-data:/var/lib/postgresql/data",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in\n{stdout}"
        );
    }
}
