//! One frame must not make the worker answer itself forever (security review #3). A frame
//! whose reply would land on the worker's own request subscriptions (`src` equal to the
//! service id, or a reply topic under the request topic) is dropped as `reply_loop`; a
//! frame carrying `result` or `error` is a response, dropped as `response_frame`; and a
//! configuration whose every reply lands under the request topic is refused at start.
//! A spy on `#` sees everything published.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use authd::frame::DropReason;
use serde_json::{json, Value};
use support::*;

/// Publishes `frames` to `topic`, waits until the worker counted `drops`, then gives a
/// loop time to show and returns every publish the spy saw on or under `request_topic`.
async fn publish_and_watch(
    s: &Setup,
    spy: &mut Spy,
    topic: &str,
    frames: &[Value],
    drops: &[(DropReason, u64)],
    request_topic: &str,
) -> Vec<(String, bytes::Bytes)> {
    for f in frames {
        spy.publish(topic, serde_json::to_vec(f).unwrap()).await;
    }
    let metrics = s.worker().metrics().clone();
    wait_until("the frames are counted as dropped", || {
        drops.iter().all(|(r, n)| metrics.dropped(*r) == *n)
    })
    .await;
    // A loop runs at thousands of messages a second: half a second shows it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    spy.drain()
        .into_iter()
        .filter(|(t, _)| authd::dispatch::under_topic(t, request_topic))
        .collect()
}

#[tokio::test]
async fn frames_whose_reply_would_come_back_as_a_request_are_dropped() {
    let s = Setup::start().await;
    let mut spy = Spy::start(&s.broker, &["#"]).await;
    let request = request_topic();
    let frame = |src: &str, id: u64| json!({"v": 2, "id": id, "src": src, "key": SERVICE_KEY, "method": "Auth.ListToken"});
    let looping = [
        // The service id itself: its reply topic `{id}/rpc` is the request topic.
        frame(SERVICE_ID, 1),
        // Under `{id}/rpc/…`: the reply topic is under the request subscription's `#`.
        frame(&format!("{SERVICE_ID}/rpc/x"), 2),
        frame(&format!("{SERVICE_ID}/rpc/Auth.ListToken"), 3),
        // Answered with an error otherwise (bad `v`, `nr`, too large): dropped all the same.
        json!({"v": 3, "id": 4, "src": SERVICE_ID}),
        json!({"id": 5, "src": SERVICE_ID, "nr": true, "key": SERVICE_KEY, "method": "Auth.GenerateToken", "args": {"host": "h"}}),
        json!({"id": 6, "src": SERVICE_ID, "pad": "x".repeat(70_000)}),
    ];
    let responses = [
        json!({"id": 7, "src": SERVICE_ID, "dst": "probe", "result": []}),
        json!({"id": 8, "src": "probe", "error": {"code": 500, "message": "x"}}),
        // A response addressed like a request, to the service itself: one drop, not a loop.
        json!({"v": 2, "id": 9, "src": SERVICE_ID, "dst": SERVICE_ID, "result": null}),
    ];
    let mut frames = looping.to_vec();
    frames.extend(responses.iter().cloned());
    let seen = publish_and_watch(
        &s,
        &mut spy,
        &request,
        &frames,
        &[
            (DropReason::ReplyLoop, looping.len() as u64),
            (DropReason::ResponseFrame, responses.len() as u64),
        ],
        &request,
    )
    .await;
    // Only what we published ourselves was on the request topics.
    assert_eq!(
        seen.len(),
        frames.len(),
        "publishes on the request topics: {:?}",
        seen.iter()
            .map(|(t, p)| format!("{t}: {}", shorten(&String::from_utf8_lossy(p))))
            .collect::<Vec<_>>()
    );
    // Nothing was published anywhere else either, and nothing was executed.
    assert!(spy.drain().is_empty());
    let probe = s.service("probe").await;
    assert_eq!(
        ok(&probe, "Auth.ListToken", json!({})).await,
        Some(json!([]))
    );
    let metrics = s.worker().metrics();
    assert_eq!(metrics.dropped(DropReason::ReplyLoop), looping.len() as u64);
    assert_eq!(
        metrics.dropped(DropReason::ResponseFrame),
        responses.len() as u64
    );
    let text = metrics.render(true, None).unwrap();
    for line in [
        format!(
            "authd_frames_dropped_total{{reason=\"reply_loop\"}} {}",
            looping.len()
        ),
        format!(
            "authd_frames_dropped_total{{reason=\"response_frame\"}} {}",
            responses.len()
        ),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
}

#[tokio::test]
async fn the_loop_check_follows_the_configured_topics() {
    // Request topic `svc/req` (and `svc/req/#`), replies on `{src}/req`.
    let s = Setup::start_with(|c| {
        c.id = "svc".into();
        c.request_topic = "{id}/req".into();
        c.reply_topic = "{src}/req".into();
    })
    .await;
    let mut spy = Spy::start(&s.broker, &["#"]).await;
    let frame = |src: &str, id: u64| json!({"v": 2, "id": id, "src": src, "dst": "svc", "key": SERVICE_KEY, "method": "Auth.ListToken"});
    let looping = [frame("svc", 1), frame("svc/req/a", 2), frame("svc/req/", 3)];
    let seen = publish_and_watch(
        &s,
        &mut spy,
        "svc/req",
        &looping,
        &[(DropReason::ReplyLoop, 3)],
        "svc/req",
    )
    .await;
    assert_eq!(seen.len(), looping.len(), "{seen:?}");
    // `svc/reqx/req` is not under `svc/req`: answered.
    spy.publish(
        "svc/req",
        serde_json::to_vec(&frame("svc/reqx", 4)).unwrap(),
    )
    .await;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no reply on svc/reqx/req");
        if let Some((topic, payload)) = spy.next(Duration::from_millis(200)).await {
            if topic == "svc/reqx/req" {
                let reply: Value = serde_json::from_slice(&payload).unwrap();
                assert_eq!(reply["result"], json!([]), "{reply}");
                break;
            }
        }
    }
    assert_eq!(s.worker().metrics().dropped(DropReason::ReplyLoop), 3);
}

#[test]
fn a_reply_topic_that_always_loops_is_refused_at_start() {
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(authd_bin());
    for (name, _) in std::env::vars() {
        if name.starts_with("AUTHD_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    // Every reply would go to `//api.mongoose-iot.com/rpc/<src>`, under the request topic.
    let mut child = command
        .env("AUTHD_REPLY_TOPIC", format!("{SERVICE_ID}/rpc/{{src}}"))
        .args(["serve", "--broker", "mqtt://127.0.0.1:1", "--data"])
        .arg(data.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("authd runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("authd serve started with a reply topic under the request topic");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("reply_topic `//api.mongoose-iot.com/rpc/{src}`")
            && stderr.contains("request topic `//api.mongoose-iot.com/rpc`")
            && stderr.contains("forever"),
        "{stderr}"
    );
    // Refused before anything was created.
    assert!(std::fs::read_dir(data.path()).unwrap().next().is_none());
}
