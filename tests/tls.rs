//! TLS to the broker (`mqtts://`, `broker_ca`, `broker_cert`/`broker_key`) against a real
//! mosquitto TLS listener, with a CA and certificates made in the test.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use authd::client::{Client, ClientOptions};
use authd::config::BrokerAddress;
use authd::mqtt::Tls;
use serde_json::json;
use support::certs::Ca;
use support::*;

/// Files of one TLS setup: the CA, mosquitto's certificate for 127.0.0.1 and localhost,
/// and a client certificate for authd.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new(ca_name: &str) -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new(ca_name),
        };
        pki.write("ca.pem", &pki.ca.pem());
        let (cert, key) = pki.ca.server(&["127.0.0.1", "localhost"]);
        pki.write("server.pem", &cert);
        pki.write("server.key", &key);
        let (cert, key) = pki.ca.client("authd");
        pki.write("client.pem", &cert);
        pki.write("client.key", &key);
        pki
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A mosquitto with only a TLS listener; `require_certificate` asks clients for one.
    fn broker(&self, require_certificate: bool) -> Broker {
        let p = |n: &str| self.path(n).display().to_string();
        Broker::start_config(&format!(
            "listener {{port}} 127.0.0.1\nallow_anonymous true\nuser root\n\
             cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_certificate}\n\
             log_dest stderr\nlog_type error\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key"),
        ))
    }
}

fn tls_url(broker: &Broker, host: &str) -> String {
    format!("mqtts://{host}:{}", broker.port)
}

async fn tls_client(
    broker: &Broker,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Client, String> {
    let address = BrokerAddress::parse(&tls_url(broker, "127.0.0.1")).unwrap();
    let mut options = ClientOptions::new(address);
    options.tls = Some(Tls::from_files(Some(ca), client).map_err(|e| e.to_string())?);
    options.key = Some(SERVICE_KEY.into());
    options.src = "alice".into();
    Client::connect(options, Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())
}

async fn worker(
    broker: &Broker,
    data: &Path,
    tweak: impl FnOnce(&mut authd::config::Config),
) -> authd::Worker {
    let mut config = worker_config(broker, data);
    config.broker = tls_url(broker, "127.0.0.1");
    tweak(&mut config);
    authd::Worker::start(config).await.expect("worker starts")
}

async fn becomes_ready(w: &authd::Worker, within: Duration) -> bool {
    tokio::time::timeout(within, w.ready()).await.is_ok()
}

#[tokio::test]
async fn worker_and_client_talk_over_tls() {
    let pki = Pki::new("authd test CA");
    let broker = pki.broker(false);
    let data = tempfile::tempdir().unwrap();
    let w = worker(&broker, data.path(), |c| {
        c.broker_ca = Some(pki.path("ca.pem"))
    })
    .await;
    assert!(becomes_ready(&w, TIMEOUT).await, "worker connects over TLS");
    let alice = tls_client(&broker, &pki.path("ca.pem"), None)
        .await
        .unwrap();
    assert_eq!(
        ok(&alice, "/v1/Auth.ListToken", json!({})).await,
        Some(json!([]))
    );

    // The CLI, with the broker named by its DNS name (checked against the certificate).
    let mut call = std::process::Command::new(authd_bin());
    call.args([
        "call",
        "/v1/Auth.ListToken",
        "--src",
        "bob",
        "--key",
        SERVICE_KEY,
    ])
    .args(["--broker", &tls_url(&broker, "localhost")])
    .arg("--broker-ca")
    .arg(pki.path("ca.pem"));
    let out = tokio::task::spawn_blocking(move || call.output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let response: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(response["result"], json!([]));
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_broker_certificate_from_another_ca_is_refused() {
    let pki = Pki::new("authd test CA");
    let broker = pki.broker(false);
    let other = Pki::new("some other CA");
    let data = tempfile::tempdir().unwrap();
    let w = worker(&broker, data.path(), |c| {
        c.broker_ca = Some(other.path("ca.pem"))
    })
    .await;
    assert!(
        !becomes_ready(&w, Duration::from_secs(2)).await,
        "connected although the broker's certificate is not signed by the CA given"
    );
    assert_eq!(w.broker_state(), authd::mqtt::BrokerState::Down);
    w.stop().await.unwrap();
    let e = tls_client(&broker, &other.path("ca.pem"), None)
        .await
        .err()
        .expect("the client refuses the broker too");
    assert!(e.contains("could not reach the broker"), "{e}");

    // What an operator sees from the CLI: exit 2 and the reason.
    let mut call = std::process::Command::new(authd_bin());
    call.args([
        "call",
        "/v1/Auth.ListToken",
        "--key",
        SERVICE_KEY,
        "--timeout",
        "2",
    ])
    .args(["--broker", &tls_url(&broker, "127.0.0.1")])
    .arg("--broker-ca")
    .arg(other.path("ca.pem"))
    .env_remove("RUST_LOG");
    let out = tokio::task::spawn_blocking(move || call.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_broker_that_requires_a_client_certificate() {
    let pki = Pki::new("authd test CA");
    let broker = pki.broker(true);
    let data = tempfile::tempdir().unwrap();
    let without = worker(&broker, data.path(), |c| {
        c.broker_ca = Some(pki.path("ca.pem"))
    })
    .await;
    assert!(
        !becomes_ready(&without, Duration::from_secs(2)).await,
        "mosquitto let a client without a certificate in"
    );
    without.stop().await.unwrap();

    let w = worker(&broker, data.path(), |c| {
        c.broker_ca = Some(pki.path("ca.pem"));
        c.broker_cert = Some(pki.path("client.pem"));
        c.broker_key = Some(pki.path("client.key"));
    })
    .await;
    assert!(
        becomes_ready(&w, TIMEOUT).await,
        "worker presents its certificate"
    );
    let alice = tls_client(
        &broker,
        &pki.path("ca.pem"),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    )
    .await
    .unwrap();
    assert_eq!(
        ok(&alice, "/v1/Auth.ListToken", json!({})).await,
        Some(json!([]))
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn unusable_tls_files_fail_at_start_naming_the_file() {
    let pki = Pki::new("authd test CA");
    pki.write("empty.pem", "no certificate here\n");
    let broker = pki.broker(false);
    let data = tempfile::tempdir().unwrap();
    for (ca, cert, key, expect) in [
        ("missing.pem", None, None, "missing.pem"),
        ("empty.pem", None, None, "no CERTIFICATE"),
        ("ca.pem", Some("client.pem"), Some("ca.pem"), "private key"),
    ] {
        let mut config = worker_config(&broker, data.path());
        config.broker = tls_url(&broker, "127.0.0.1");
        config.broker_ca = Some(pki.path(ca));
        config.broker_cert = cert.map(|c| pki.path(c));
        config.broker_key = key.map(|k| pki.path(k));
        let e = authd::Worker::start(config)
            .await
            .err()
            .unwrap_or_else(|| panic!("{ca} {cert:?} {key:?}: started"))
            .to_string();
        assert!(e.contains(expect), "{e}");
    }
}
