//! Delivery across broker and worker restarts (docs/protocol.md#delivery-and-durability): the worker reconnects by itself,
//! re-subscribes when the broker lost its session, and requests queued on its persistent
//! session while it was away are answered when it comes back.

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use authd::mqtt::BrokerState;
use authd::Worker;
use serde_json::json;
use support::*;

async fn wait_reconnected(worker: &Worker, at_least: u64) {
    wait_until("the worker reconnected", || {
        worker.metrics().reconnects.load(Relaxed) >= at_least
    })
    .await;
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("ready again");
}

#[tokio::test]
async fn the_worker_comes_back_after_a_broker_restart() {
    let mut s = Setup::start().await;
    let before = s.service("restart-user").await;
    ok(&before, "Auth.GenerateToken", json!({"host": "h"})).await;
    drop(before);

    // Session kept by the broker (persistence on).
    s.broker.restart();
    wait_reconnected(s.worker(), 1).await;
    let c = s.service("restart-user").await;
    assert_eq!(
        ok(&c, "Auth.GetToken", json!({"host": "h"})).await.unwrap()["exist"],
        true
    );
    drop(c);

    // Session lost by the broker: the worker must subscribe again.
    s.broker.stop();
    std::fs::remove_file(s.broker.dir().join("mosquitto.db")).expect("persistence file");
    s.broker.restart();
    wait_reconnected(s.worker(), 2).await;
    let c = s.service("restart-user").await;
    ok(&c, "Auth.ListToken", json!({})).await;
}

#[tokio::test]
async fn a_worker_started_before_its_broker_connects_when_it_comes_up() {
    let mut broker = Broker::start();
    broker.stop();
    let data = tempfile::tempdir().unwrap();
    let worker = Worker::start(worker_config(&broker, data.path()))
        .await
        .expect("the worker starts without a broker");
    assert_eq!(worker.broker_state(), BrokerState::Down);
    tokio::time::sleep(Duration::from_millis(300)).await; // a few failed attempts
    broker.restart();
    tokio::time::timeout(TIMEOUT, worker.ready())
        .await
        .expect("connected once the broker is up");
    let c = client(&broker, Some(SERVICE_KEY), Some("late-broker")).await;
    ok(&c, "Auth.ListToken", json!({})).await;
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn requests_sent_while_the_worker_is_away_are_answered_when_it_returns() {
    let broker = Broker::start();
    let data = tempfile::tempdir().unwrap();
    let config = worker_config(&broker, data.path());
    let first = Worker::start(config.clone()).await.unwrap();
    tokio::time::timeout(TIMEOUT, first.ready()).await.unwrap();
    let c = Arc::new(client(&broker, Some(SERVICE_KEY), Some("patient")).await);
    ok(&c, "Auth.GenerateToken", json!({"host": "before"})).await;
    first.stop().await.unwrap();

    // Sent with no worker connected: the broker keeps them on the worker's session.
    let mut spy = Spy::start(&broker, &[&request_topic()]).await;
    let calls: Vec<_> = [
        ("Auth.GenerateToken", json!({"host": "while-away"})),
        ("Auth.GetToken", json!({"host": "before"})),
    ]
    .into_iter()
    .map(|(method, args)| {
        let c = c.clone();
        tokio::spawn(async move { c.call(method, args, Duration::from_secs(8)).await })
    })
    .collect();
    for _ in 0..calls.len() {
        spy.next(TIMEOUT)
            .await
            .expect("the broker took the request");
    }

    // The same data and client id: the same worker, restarted.
    let second = Worker::start(config).await.unwrap();
    for call in calls {
        let r = call.await.unwrap().expect("answered after the restart");
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.result.unwrap().get("token").is_some());
    }
    assert_eq!(
        ok(&c, "Auth.GetToken", json!({"host": "while-away"}))
            .await
            .unwrap()["exist"],
        true
    );
    second.stop().await.unwrap();
}
