//! The shipped mosquitto configuration (`mosquitto/`) enforces the broker's half of "only
//! the backend may call authd" (docs/protocol.md#caller-keys-and-scopes). These tests run the real mosquitto with it.

mod support;

use std::time::Duration;

use authd::client::{Client, ClientOptions};
use serde_json::json;
use support::*;

/// The shipped config with our port, the repository's passwd/acl and a private data dir.
fn shipped_config() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let conf = std::fs::read_to_string(format!("{root}/mosquitto/mosquitto.conf"))
        .expect("mosquitto/mosquitto.conf");
    assert!(conf.contains("\nlistener 1883\n") && conf.contains("set_tcp_nodelay true"));
    // Run as root here so mosquitto can write persistence into the test's temporary dir.
    conf.replace("\nlistener 1883\n", "\nlistener {port} 127.0.0.1\n")
        .replace("/mosquitto/config/", &format!("{root}/mosquitto/"))
        .replace("/mosquitto/data/", "{dir}/")
        + "\nuser root\n"
}

fn password(account: &str) -> String {
    format!("{account}-dev-only-password")
}

async fn login(
    broker: &Broker,
    account: &str,
    src: &str,
) -> Result<Client, authd::client::CallError> {
    let mut options = ClientOptions::new(broker.address());
    options.credentials = Some((account.into(), password(account)));
    options.key = Some(SERVICE_KEY.into());
    options.src = src.into();
    Client::connect(options, Duration::from_secs(2)).await
}

async fn gated_setup() -> Setup {
    let broker = Broker::start_config(&shipped_config());
    let data = tempfile::tempdir().unwrap();
    let mut config = worker_config(&broker, data.path());
    config.broker_username = Some("authd".into());
    config.broker_password = Some(password("authd").into());
    let worker = authd::Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("worker subscribed under the shipped ACL");
    Setup {
        broker,
        data,
        worker: Some(worker),
    }
}

fn seen(setup: &Setup) -> u64 {
    let m = setup.worker().metrics();
    m.answered_ok() + m.answered_error() + m.dropped_total()
}

#[tokio::test]
async fn the_backend_is_answered() {
    let s = gated_setup().await;
    let backend = login(&s.broker, "backend", "backend")
        .await
        .expect("backend logs in");
    assert_eq!(
        ok(&backend, "/v1/Auth.ListToken", json!({})).await,
        Some(json!([]))
    );
}

#[tokio::test]
async fn a_device_request_never_reaches_the_worker() {
    let s = gated_setup().await;
    let device = login(&s.broker, "device1", "device1")
        .await
        .expect("device logs in");
    let before = seen(&s);
    // Even with a valid caller key, the broker drops the device's publish.
    let r = device
        .call("/v1/Auth.ListToken", json!({}), Duration::from_millis(1500))
        .await;
    assert!(r.is_err(), "a device was answered: {r:?}");
    let backend = login(&s.broker, "backend", "backend")
        .await
        .expect("backend logs in");
    ok(&backend, "/v1/Auth.ListToken", json!({})).await;
    // The backend's request is the only one the worker saw.
    assert_eq!(seen(&s), before + 1);
}

#[tokio::test]
async fn a_device_cannot_read_another_accounts_replies() {
    let s = gated_setup().await;
    // device1 tries to listen on the backend's reply topic. mosquitto 2.0 grants the
    // SUBACK for MQTT 3.1.1 but delivers nothing the ACL denies.
    let mut options = ClientOptions::new(s.broker.address());
    options.credentials = Some(("device1".into(), password("device1")));
    options.src = "backend".into();
    options.client_id = Some("device1-spy".into());
    let spy = Client::connect(options, Duration::from_secs(2)).await;
    let backend = login(&s.broker, "backend", "backend")
        .await
        .expect("backend logs in");
    ok(
        &backend,
        "/v1/Auth.GenerateToken",
        json!({"host": "secret.example"}),
    )
    .await;
    if let Ok(spy) = spy {
        assert_eq!(
            spy.next_unmatched(Duration::from_millis(1000)).await,
            None,
            "device1 read the backend's reply"
        );
    }
}

#[tokio::test]
async fn anonymous_and_wrong_passwords_are_refused() {
    let s = gated_setup().await;
    let mut options = ClientOptions::new(s.broker.address());
    options.src = "backend".into();
    assert!(Client::connect(options.clone(), Duration::from_secs(1))
        .await
        .is_err());
    options.credentials = Some(("backend".into(), "wrong".into()));
    assert!(Client::connect(options, Duration::from_secs(1))
        .await
        .is_err());
}
