//! The operator's HTTP endpoint under hostile clients (README "Metrics and readiness",
//! SECURITY.md): idle and slow connections do not starve `/live` and `/ready`, request heads
//! are timed out and size-capped, and the responses keep their shape.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use authd::http::{HEAD_TIMEOUT, MAX_CONNECTIONS};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw request → (status, head, body).
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("the endpoint accepts");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("a response");
    let response = String::from_utf8(response).expect("UTF-8");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("head and body: {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: authd\r\n\r\n").as_bytes(),
    )
}

/// `GET path`, timed, off the runtime (the worker runs on it).
async fn timed_get(addr: SocketAddr, path: &'static str) -> ((u16, String, String), Duration) {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let r = get(addr, path);
        (r, start.elapsed())
    })
    .await
    .unwrap()
}

async fn with_endpoint() -> (Setup, SocketAddr) {
    let s = Setup::start_with(|c| c.metrics = Some("127.0.0.1:0".into())).await;
    let addr = s.worker().metrics_addr().expect("metrics listener");
    (s, addr)
}

/// `n` connections that send part of a request head and then say nothing.
async fn slow_clients(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /live HTTP/1.1\r\nHost: sl")
            .await
            .unwrap();
        held.push(c);
    }
    held
}

async fn assert_probes_answer_promptly(addr: SocketAddr) {
    for path in ["/live", "/ready"] {
        let ((status, _, body), took) = timed_get(addr, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(took < Duration::from_secs(2), "{path} took {took:?}");
    }
}

/// The security review: 32 slow connections used to take every slot for 10 s each, and a
/// healthy worker's `/live` went unanswered (so its orchestrator would restart it).
#[tokio::test]
async fn a_hundred_slow_connections_do_not_starve_live_and_ready() {
    let (_s, addr) = with_endpoint().await;
    let held = slow_clients(addr, 100).await;
    // Let the endpoint take them all in.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_probes_answer_promptly(addr).await;
    let ((status, _, _), _) = timed_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    drop(held);
}

/// Past the connection limit the oldest connection is closed, never the newest: a probe is
/// answered however many idle connections a client piles up.
#[tokio::test]
async fn past_the_limit_the_oldest_connections_are_closed() {
    let (_s, addr) = with_endpoint().await;
    let mut held = slow_clients(addr, MAX_CONNECTIONS + 50).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_probes_answer_promptly(addr).await;
    // The first ones were closed to make room (well before any timeout)...
    for (i, c) in held.iter_mut().take(40).enumerate() {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("slow connection {i} still open"))
            .unwrap_or(0);
        assert_eq!(n, 0, "connection {i} closed unanswered");
    }
    // ...and the newest are still open.
    let last = held.last_mut().unwrap();
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), last.read(&mut buf))
            .await
            .is_err(),
        "the newest slow connection is still waited for"
    );
}

/// A request head that does not arrive in time is cut off.
#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    let (_s, addr) = with_endpoint().await;
    let mut c = slow_clients(addr, 1).await.remove(0);
    let start = Instant::now();
    let mut response = Vec::new();
    tokio::time::timeout(
        HEAD_TIMEOUT + Duration::from_secs(3),
        c.read_to_end(&mut response),
    )
    .await
    .expect("closed after the head timeout")
    .ok();
    let took = start.elapsed();
    assert!(
        took >= HEAD_TIMEOUT - Duration::from_millis(500),
        "closed after {took:?}"
    );
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 408"),
        "{response}"
    );
}

#[tokio::test]
async fn responses_keep_their_shape() {
    let (_s, addr) = with_endpoint().await;
    tokio::task::spawn_blocking(move || {
        let (status, head, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(body.contains("authd_broker_connected 1"), "{body}");

        let (status, head, body) = get(addr, "/ready?verbose=1");
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        assert!(head.contains("content-type: text/plain"), "{head}");
        assert_eq!(get(addr, "/live").0, 200);
        assert_eq!(get(addr, "/live").2, "live\n");

        let (status, _, body) = get(addr, "/nothing");
        assert_eq!(status, 404);
        assert!(body.contains("/metrics, /ready or /live"), "{body}");

        let (status, head, _) = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(status, 405);
        assert!(head.contains("allow: get"), "{head}");

        let huge = format!(
            "GET /live HTTP/1.1\r\nHost: a\r\nX-Padding: {}\r\n\r\n",
            "x".repeat(16 * 1024)
        );
        assert_eq!(exchange(addr, huge.as_bytes()).0, 431);
    })
    .await
    .unwrap();
}

/// While the broker is down `/ready` is 503 and says why; `/live` stays 200.
#[tokio::test]
async fn ready_is_503_with_a_reason_while_the_broker_is_down() {
    let (mut s, addr) = with_endpoint().await;
    s.broker.stop();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ((status, _, body), _) = timed_get(addr, "/ready").await;
        if status == 503 {
            assert!(body.contains("not connected"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/ready stayed {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        timed_get(addr, "/live").await.0 .0,
        200,
        "live all the same"
    );
}
