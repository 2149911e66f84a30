//! A panic while handling one request must not stall the others (security review #12).
//! Acks leave in arrival order, so a request whose task died without acking held back every
//! later ack: the broker stopped delivering once its in-flight window was full and
//! redelivered everything after the next reconnect. Now the panic is caught, the request
//! answered 500 and acknowledged. The panic is provoked with the test-only
//! `fault-injection` feature (`Fault.Panic`), which release builds do not have.

mod support;

use std::sync::Arc;
use std::time::Duration;

use authd::Worker;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_answered_500_and_acked_and_later_requests_flow() {
    // The harness's mosquitto keeps its default in-flight window (20 messages): with one
    // ack missing, delivery would stop after 20 more requests.
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let config = worker_config(&broker, data.path());
    let worker = Worker::start(config.clone()).await.expect("worker starts");
    tokio::time::timeout(TIMEOUT, worker.ready()).await.unwrap();
    let c = Arc::new(client(&broker, Some(SERVICE_KEY), Some("panic-victim")).await);

    let message = err(&c, "Fault.Panic", json!({}), 500).await;
    assert!(message.contains("retry it with the same id"), "{message}");
    // Also with the method in the topic suffix, and several at once.
    let r = c
        .call_raw(
            &format!("{}/Fault.Panic", request_topic()),
            serde_json::to_vec(&json!({"id": 1, "src": "panic-victim", "key": SERVICE_KEY}))
                .unwrap(),
            1,
            TIMEOUT,
        )
        .await
        .expect("answered");
    assert_eq!(r.error.map(|e| e.code), Some(500));

    // 100 requests after the panics, 10 at a time: every one answered.
    for round in 0..10 {
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.call(
                        "Auth.GenerateToken",
                        json!({"host": format!("h{round}-{i}")}),
                        TIMEOUT,
                    )
                    .await
                })
            })
            .collect();
        for call in calls {
            let r = call.await.unwrap().expect("answered after the panic");
            assert!(r.error.is_none(), "{:?}", r.error);
        }
    }
    let metrics = worker.metrics().clone();
    assert_eq!(metrics.panics.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(metrics.requests("other", "500"), 2);
    assert!(metrics
        .render(true, None)
        .unwrap()
        .lines()
        .any(|l| l == "authd_handler_panics_total 2"));
    worker.stop().await.expect("clean stop");

    // Everything was acked: the same session, started again, gets nothing redelivered.
    let again = Worker::start(config).await.expect("worker restarts");
    tokio::time::timeout(TIMEOUT, again.ready()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = again.metrics();
    assert_eq!(
        m.answered_ok() + m.answered_error() + m.dropped_total(),
        0,
        "messages were redelivered to the restarted worker"
    );
    again.stop().await.unwrap();
}
