//! The worker's broker session under attack (security review #1): another client connecting
//! with the worker's client id. Against the shipped broker config (`mosquitto/`) a device
//! account cannot do it at all; against an open broker it can, but cannot leave the worker
//! deaf: the worker subscribes after every CONNACK and is ready only once the SUBACK grants
//! every topic at QoS 1.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use authd::client::{Client, ClientOptions};
use authd::mqtt::BrokerState;
use serde_json::json;
use support::*;

const MOSQUITTO_SUB: &str = "/usr/bin/mosquitto_sub";

/// The shipped config with our port, the repository's passwd/acl and a private data dir.
fn shipped_config() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let conf = std::fs::read_to_string(format!("{root}/mosquitto/mosquitto.conf"))
        .expect("mosquitto/mosquitto.conf");
    assert!(conf.contains("\nlistener 1883\n"));
    conf.replace("\nlistener 1883\n", "\nlistener {port} 127.0.0.1\n")
        .replace("/mosquitto/config/", &format!("{root}/mosquitto/"))
        .replace("/mosquitto/data/", "{dir}/")
        + "\nuser root\n"
}

fn password(account: &str) -> String {
    format!("{account}-dev-only-password")
}

/// mosquitto_sub as the review ran it: connects with `client_id` and clean session off
/// (`-c`), unsubscribes the worker's request topics, subscribes to its own reply topic.
/// `linger`: `-W 1` (stay a second, as in the review) or `-E` (leave once subscribed).
fn intruder(
    port: u16,
    account: Option<&str>,
    client_id: &str,
    linger: bool,
) -> std::io::Result<Child> {
    let mut command = Command::new(MOSQUITTO_SUB);
    command.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", client_id]);
    if let Some(account) = account {
        command.args(["-u", account, "-P", &password(account)]);
    }
    let topic = request_topic();
    command.args(["-c", "-q", "1", "-U", &topic, "-U", &format!("{topic}/#")]);
    command.args(["-t", &format!("{}/rpc", account.unwrap_or("intruder"))]);
    if linger {
        command.args(["-W", "1"]);
    } else {
        command.arg("-E");
    }
    command.stdout(Stdio::null()).stderr(Stdio::null()).spawn()
}

/// Runs [`intruder`] every `every` on a thread of its own until stopped; collects the
/// exit status of each run.
struct Attack {
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<Option<i32>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Attack {
    fn start(
        port: u16,
        account: Option<&'static str>,
        client_id: String,
        linger: bool,
        every: Duration,
    ) -> Attack {
        assert!(
            std::path::Path::new(MOSQUITTO_SUB).exists(),
            "{MOSQUITTO_SUB} is missing: apt-get install mosquitto-clients"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, statuses) = (stop.clone(), statuses.clone());
            std::thread::spawn(move || {
                let mut running: Vec<Child> = Vec::new();
                while !stop.load(Relaxed) {
                    running
                        .push(intruder(port, account, &client_id, linger).expect("mosquitto_sub"));
                    std::thread::sleep(every);
                    running.retain_mut(|child| match child.try_wait() {
                        Ok(Some(status)) => {
                            statuses.lock().unwrap().push(status.code());
                            false
                        }
                        _ => true,
                    });
                }
                for mut child in running {
                    let status = child.wait().expect("mosquitto_sub exits");
                    statuses.lock().unwrap().push(status.code());
                }
            })
        };
        Attack {
            stop,
            statuses,
            thread: Some(thread),
        }
    }

    /// Stops and waits for every intruder to exit; returns their exit statuses.
    fn stop(mut self) -> Vec<Option<i32>> {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("attack thread");
        }
        self.statuses.lock().unwrap().clone()
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// Sends `n` GenerateToken requests, one every `every`, each waited for up to 15 s;
/// returns how many were answered.
async fn answered_of(client: &Arc<Client>, n: usize, every: Duration) -> usize {
    let mut calls = Vec::new();
    for i in 0..n {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .call(
                    "Auth.GenerateToken",
                    json!({"host": format!("host-{i}")}),
                    Duration::from_secs(15),
                )
                .await
                .is_ok_and(|r| r.error.is_none())
        }));
        tokio::time::sleep(every).await;
    }
    let mut answered = 0;
    for call in calls {
        if call.await.expect("call task") {
            answered += 1;
        }
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connecting_with_the_workers_client_id_takes_nothing_under_the_shipped_config() {
    let broker = Broker::start_config(&shipped_config());
    let data = tempfile::tempdir().unwrap();
    let mut config = worker_config(&broker, data.path());
    // The default client id, which the review's device used.
    config.client_id = "authd".into();
    config.broker_username = Some("authd".into());
    config.broker_password = Some(password("authd").into());
    let worker = authd::Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("worker ready");

    let mut options = ClientOptions::new(broker.address());
    options.credentials = Some(("backend".into(), password("backend")));
    options.key = Some(SERVICE_KEY.into());
    options.src = "backend".into();
    let backend = Arc::new(
        Client::connect(options, TIMEOUT)
            .await
            .expect("backend logs in"),
    );

    // The review's attack: device1 connects as `authd` every 0.5 s, unsubscribes the
    // request topics, stays a second.
    let attack = Attack::start(
        broker.port,
        Some("device1"),
        "authd".into(),
        true,
        Duration::from_millis(500),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered = answered_of(&backend, 30, Duration::from_millis(100)).await;
    let statuses = attack.stop();

    // The device did log in each time (27: mosquitto_sub's -W timeout after a successful
    // connection; a refused login is 5), so the attack was real.
    assert!(
        statuses.len() >= 4 && statuses.iter().all(|s| *s == Some(27)),
        "mosquitto_sub exit statuses: {statuses:?}"
    );
    assert_eq!(answered, 30, "requests lost during the attack");
    // The broker gave the device a client id of its own: the worker was never disturbed.
    let metrics = worker.metrics();
    assert_eq!(metrics.reconnects.load(Relaxed), 0);
    assert_eq!(metrics.session_takeovers(), 0);
    assert_eq!(worker.broker_state(), BrokerState::Ready);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_unsubscribe_cannot_leave_the_worker_deaf_on_an_open_broker() {
    // Anonymous, no binding of client ids to accounts: anyone can take the session.
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let config = worker_config(&broker, data.path());
    let client_id = config.client_id.clone();
    let worker = authd::Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("worker ready");
    let caller = Arc::new(client(&broker, Some(SERVICE_KEY), Some("after-attack")).await);
    assert_eq!(answered_of(&caller, 3, Duration::ZERO).await, 3);

    // Take the session, unsubscribe the request topics, leave; again every 0.4 s.
    let attack = Attack::start(
        broker.port,
        None,
        client_id,
        false,
        Duration::from_millis(400),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let statuses = attack.stop();
    assert!(
        statuses.len() >= 5 && statuses.iter().all(|s| *s == Some(0)),
        "mosquitto_sub exit statuses: {statuses:?}"
    );

    // The worker came back, subscribed again and serves. (A moment for it to notice the
    // last intruder's takeover: until then it would still look ready.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(worker.metrics().reconnects.load(Relaxed) >= 3);
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("ready again");
    assert_eq!(
        answered_of(&caller, 10, Duration::ZERO).await,
        10,
        "the worker went deaf"
    );
    // Each time the broker closed the worker's connection moments after accepting it (or
    // had lost its session): counted, and on /metrics.
    let takeovers = worker.metrics().session_takeovers();
    assert!(
        takeovers >= 3,
        "takeovers counted: {takeovers}, intruders: {}",
        statuses.len()
    );
    let text = worker.metrics().render(true, None).unwrap();
    assert!(
        text.contains("# TYPE authd_session_takeovers_total counter"),
        "{text}"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_subscription_granted_below_qos_1_is_not_ready() {
    // mosquitto 2's max_qos caps what a SUBACK grants: QoS 0 would mean requests lost
    // unacknowledged, so the worker must not report ready.
    let broker = Broker::start_with("max_qos 0");
    let data = tempfile::tempdir().unwrap();
    let worker = authd::Worker::start(worker_config(&broker, data.path()))
        .await
        .expect("worker starts");
    let ready = tokio::time::timeout(Duration::from_millis(1500), worker.ready()).await;
    assert!(ready.is_err(), "ready on a QoS 0 grant");
    assert_eq!(worker.broker_state(), BrokerState::Down);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authd_call_with_an_account_and_no_src_is_answered_under_the_shipped_config() {
    let broker = Broker::start_config(&shipped_config());
    let data = tempfile::tempdir().unwrap();
    let mut config = worker_config(&broker, data.path());
    config.broker_username = Some("authd".into());
    config.broker_password = Some(password("authd").into());
    let worker = authd::Worker::start(config).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("worker ready");
    // The operators' account: `src` defaults to it, the one reply topic it may read.
    let url = broker.url();
    let out = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(authd_bin());
        for (name, _) in std::env::vars() {
            if name.starts_with("AUTHD_") || name == "RUST_LOG" {
                command.env_remove(name);
            }
        }
        command
            .args(["call", "--broker", &url, "--broker-username", "ops"])
            .args(["--broker-password", &password("ops"), "--key", SERVICE_KEY])
            .args(["/v1/Auth.ListToken"])
            .output()
            .expect("authd call runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frame: serde_json::Value = serde_json::from_str(stdout.trim()).expect("a response frame");
    assert_eq!(
        (&frame["dst"], &frame["result"]),
        (&json!("ops"), &json!([]))
    );
    worker.stop().await.unwrap();
}
