//! The shipped mosquitto configuration (`mosquitto/`) enforces the broker's half of "only
//! the backend may call authd" (docs/protocol.md#caller-keys-and-scopes). These tests run the real mosquitto with it.

mod support;

use std::time::Duration;

use authd::client::{Client, ClientOptions};
use authd::Worker;
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

/// A worker of the shipped config logged in as `account`, in share group `authd`; returns
/// once the broker granted its `$share/authd/…` subscriptions (the worker reports ready
/// only then).
async fn share_group_worker(broker: &Broker, account: &str, data: &std::path::Path) -> Worker {
    let mut config = worker_config(broker, data);
    config.broker_username = Some(account.into());
    config.broker_password = Some(password(account).into());
    config.share_group = Some("authd".into());
    let worker = Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .unwrap_or_else(|_| panic!("{account} not granted $share/authd/ under the shipped ACL"));
    worker
}

#[tokio::test]
async fn two_worker_accounts_share_the_requests() {
    let broker = Broker::start_config(&shipped_config());
    let (a_data, b_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = share_group_worker(&broker, "authd", a_data.path()).await;
    let b = share_group_worker(&broker, "authd-2", b_data.path()).await;
    let backend = login(&broker, "backend", "backend")
        .await
        .expect("backend logs in");
    for _ in 0..20 {
        assert_eq!(
            ok(&backend, "/v1/Auth.ListToken", json!({})).await,
            Some(json!([]))
        );
    }
    // Every request answered once, by one of the two: the broker spreads the group's
    // requests over its members (round robin in mosquitto).
    let (by_a, by_b) = (a.metrics().answered_ok(), b.metrics().answered_ok());
    assert_eq!(
        by_a + by_b,
        20,
        "answered by authd {by_a}, by authd-2 {by_b}"
    );
    assert!(
        by_a > 0 && by_b > 0,
        "one worker got everything: authd {by_a}, authd-2 {by_b}"
    );
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
}

/// mosquitto 2.0's `acl_file` does not check subscriptions at all (src/security_default.c:
/// "FIXME - implement ACL subscription strings"); it checks each message as it is
/// delivered. So any account may join the workers' share group: the broker then gives it
/// its turn and drops each request it may not read. The device reads nothing, but the
/// requests of its turns are lost (their callers time out and retry). README ("Running
/// several workers") and mosquitto/README.md say so; if this test fails because the
/// broker refused the device, they are out of date.
#[tokio::test]
async fn a_device_in_the_share_group_reads_nothing_but_takes_turns() {
    use authd::mqtt::{BrokerState, Session, SessionOptions};
    let broker = Broker::start_config(&shipped_config());
    let data = tempfile::tempdir().unwrap();
    let worker = share_group_worker(&broker, "authd", data.path()).await;

    let topic = request_topic();
    let (session, _publisher, mut state) = Session::new(SessionOptions {
        broker: broker.address(),
        client_id: "device1".into(),
        credentials: Some(("device1".into(), password("device1"))),
        persistent: false,
        manual_acks: false,
        subscriptions: vec![
            format!("$share/authd/{topic}"),
            format!("$share/authd/{topic}/#"),
        ],
        keep_alive: Duration::from_secs(30),
        max_packet_bytes: 1 << 20,
        tls: None,
        outbox: None,
    });
    let (tx, mut read) = tokio::sync::mpsc::unbounded_channel();
    let close = tokio_util::sync::CancellationToken::new();
    let device = tokio::spawn(session.run(
        move |m: authd::mqtt::Message| {
            let _ = tx.send(m.topic);
        },
        tokio_util::sync::CancellationToken::new(),
        close.clone(),
        |_| {},
    ));
    tokio::time::timeout(TIMEOUT, state.wait_for(|s| *s == BrokerState::Ready))
        .await
        .expect("mosquitto refused the device's $share/authd/ subscription: update the docs")
        .expect("device session alive");

    let backend = login(&broker, "backend", "backend")
        .await
        .expect("backend logs in");
    let seen = || {
        let m = worker.metrics();
        m.answered_ok() + m.answered_error() + m.dropped_total()
    };
    const SENT: u64 = 10;
    for _ in 0..SENT {
        let frame = backend.frame("/v1/Auth.ListToken", json!({}));
        backend
            .publish(&topic, serde_json::to_vec(&frame).unwrap())
            .await
            .expect("backend publishes");
    }
    wait_until("the worker saw a request", || seen() > 0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(read.try_recv().is_err(), "a device read a request");
    let reached = seen();
    assert!(
        reached < SENT,
        "all {SENT} requests reached the worker: the broker no longer gives the device a \
         turn; update README (Running several workers) and mosquitto/README.md"
    );
    close.cancel();
    device.abort();
    worker.stop().await.expect("clean stop");
}
