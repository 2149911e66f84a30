//! The operator's endpoint (`metrics` in the config): Prometheus `/metrics` and `/ready`,
//! scraped over HTTP as Prometheus and a load balancer would.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// `GET path` → (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("metrics endpoint accepts");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: authd\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a response");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    (status, body.to_owned())
}

async fn get_async(addr: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || get(addr, path))
        .await
        .unwrap()
}

/// Sample lines (`name{labels} value`) of a scrape, by `name{labels}`.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Scrapes until every `(sample, value)` is there (the server counts a request just after
/// handing its reply over, so a scrape can run a hair ahead of it).
async fn wait_for_samples(addr: SocketAddr, want: &[(&str, f64)]) -> HashMap<String, f64> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, body) = get_async(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let s = samples(&body);
        let missing: Vec<_> = want.iter().filter(|(k, v)| s.get(*k) != Some(v)).collect();
        if missing.is_empty() {
            return s;
        }
        assert!(Instant::now() < deadline, "missing {missing:?} in\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(addr: SocketAddr, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (got, body) = get_async(addr, "/ready").await;
        if got == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/ready stayed {got}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn counters_latency_and_readiness_are_served() {
    let mut s = Setup::start_with(|c| {
        c.metrics = Some("127.0.0.1:0".into());
        c.lockout_failures = 2;
    })
    .await;
    let addr = s.worker().metrics_addr().expect("metrics listener");
    assert_eq!(get_async(addr, "/ready").await, (200, "ready\n".into()));
    assert_eq!(get_async(addr, "/live").await.0, 200);
    assert_eq!(get_async(addr, "/nothing").await.0, 404);

    let admin = s.admin().await;
    let alice = s.service("alice").await;
    ok(&alice, "/v1/Auth.ListToken", json!({})).await;
    ok(&alice, "Auth.ListToken", json!({})).await;
    ok(
        &admin,
        "/v1/Entity.Put",
        json!({"id": "dev1", "psk": "right"}),
    )
    .await;
    for _ in 0..3 {
        // Two failures lock dev1; the third attempt is refused unchecked.
        let r = ok(
            &alice,
            "/v1/Auth.Authenticate",
            json!({"id": "dev1", "credentials": {"psk": "wrong"}}),
        )
        .await;
        assert_eq!(r, Some(json!(false)));
    }
    err(&alice, "/v1/Auth.GetToken", json!({}), 400).await;
    err(&alice, "/v1/No.Such", json!({}), 404).await;
    let anonymous = client(&s.broker, None, Some("anon")).await;
    err(&anonymous, "/v1/Auth.ListToken", json!({}), 401).await;
    // A redelivered state change (same src and id) is answered from its stored response.
    let frame = alice.frame("/v1/Auth.GenerateToken", json!({"host": "app"}));
    let first = alice.call_frame(&frame, TIMEOUT).await.unwrap();
    let again = alice.call_frame(&frame, TIMEOUT).await.unwrap();
    assert_eq!(first.result, again.result);
    // A frame nobody can be answered for is dropped and counted by reason.
    alice
        .publish(alice.request_topic(), b"not json".to_vec())
        .await
        .unwrap();

    let m = wait_for_samples(
        addr,
        &[
            (
                r#"authd_requests_total{method="Auth.ListToken",outcome="ok"}"#,
                2.0,
            ),
            (
                r#"authd_requests_total{method="Auth.ListToken",outcome="401"}"#,
                1.0,
            ),
            (
                r#"authd_requests_total{method="Auth.Authenticate",outcome="ok"}"#,
                3.0,
            ),
            (
                r#"authd_requests_total{method="Auth.GetToken",outcome="400"}"#,
                1.0,
            ),
            (r#"authd_requests_total{method="other",outcome="404"}"#, 1.0),
            (
                r#"authd_requests_total{method="Entity.Put",outcome="ok"}"#,
                1.0,
            ),
            (
                r#"authd_requests_total{method="Auth.GenerateToken",outcome="ok"}"#,
                2.0,
            ),
            (r#"authd_frames_dropped_total{reason="not_json"}"#, 1.0),
            (r#"authd_frames_dropped_total{reason="bad_src"}"#, 0.0),
            ("authd_replays_total", 1.0),
            ("authd_lockouts_total", 1.0),
            // Two wrong PSKs checked, the third refused unchecked (locked).
            (r#"authd_sign_ins_total{result="ok"}"#, 0.0),
            (r#"authd_sign_ins_total{result="refused"}"#, 2.0),
            (r#"authd_sign_ins_total{result="locked"}"#, 1.0),
            ("authd_overload_dropped_total", 0.0),
            ("authd_broker_connected", 1.0),
            ("authd_broker_reconnects_total", 0.0),
            (
                r#"authd_request_duration_seconds_count{method="Auth.Authenticate"}"#,
                3.0,
            ),
            (
                r#"authd_request_duration_seconds_bucket{method="Auth.Authenticate",le="+Inf"}"#,
                3.0,
            ),
        ],
    )
    .await;
    let sum = m[r#"authd_request_duration_seconds_sum{method="Auth.Authenticate"}"#];
    assert!(sum > 0.0 && sum < 15.0, "latency sum {sum}");

    // Broker gone: not ready, and the gauge says so. Back: ready again, one reconnect.
    s.broker.stop();
    let body = wait_ready(addr, 503).await;
    assert!(body.contains("not connected"), "{body}");
    wait_for_samples(addr, &[("authd_broker_connected", 0.0)]).await;
    s.broker.restart();
    wait_ready(addr, 200).await;
    wait_for_samples(
        addr,
        &[
            ("authd_broker_connected", 1.0),
            ("authd_broker_reconnects_total", 1.0),
        ],
    )
    .await;
    drop((admin, alice, anonymous));
    s.stop().await;
}

#[tokio::test]
async fn no_listener_unless_configured() {
    let s = Setup::start().await;
    assert_eq!(s.worker().metrics_addr(), None);
}

#[tokio::test]
async fn a_taken_address_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let mut config = worker_config(&broker, data.path());
    config.metrics = Some(addr.to_string());
    let e = authd::Worker::start(config)
        .await
        .err()
        .expect("the worker refuses to start");
    assert!(
        e.to_string().contains(&format!("cannot listen on {addr}")),
        "{e}"
    );
}
