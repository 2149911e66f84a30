//! Malformed and hostile frames through a real broker (docs/protocol.md#dropped-frames: "no input, however malformed,
//! may crash the worker", §3 `src` checks). After every batch the worker still answers a
//! normal request; frames that cannot be answered are counted by reason and never produce a
//! publish anywhere; a spy subscribed to `#` sees every topic the worker published to.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use authd::frame::DropReason;
use serde_json::{json, Value};
use support::*;

/// A worker, a spy on every topic, and a well-behaved caller to probe it with.
struct Bench {
    s: Setup,
    spy: Spy,
    probe: authd::client::Client,
    /// Drops counted so far, by reason.
    dropped: Vec<(DropReason, u64)>,
}

impl Bench {
    async fn start(tweak: impl FnOnce(&mut authd::config::Config)) -> Bench {
        let s = Setup::start_with(tweak).await;
        // `#` does not match topics starting with `$`: watch the ones a bad src would make.
        let spy = Spy::start(&s.broker, &["#", "$SYS/x/#", "$share/#", "$CONTROL/#"]).await;
        let probe = s.service("probe").await;
        Bench {
            s,
            spy,
            probe,
            dropped: DropReason::ALL.iter().map(|r| (*r, 0)).collect(),
        }
    }

    /// Publishes each payload to the request topic, then checks the worker still serves a
    /// normal request, that `drops` more frames were dropped for each reason, and that
    /// nothing was published except requests and replies to `{src}/rpc` for `ok_srcs`.
    async fn batch(&mut self, payloads: &[Vec<u8>], drops: &[(DropReason, u64)], ok_srcs: &[&str]) {
        for p in payloads {
            self.spy.publish(&request_topic(), p.clone()).await;
        }
        let worker_metrics = self.s.worker().metrics().clone();
        for (reason, n) in drops {
            let slot = self.dropped.iter_mut().find(|(r, _)| r == reason).unwrap();
            slot.1 += n;
        }
        let expected = self.dropped.clone();
        let counted = || -> Vec<(DropReason, u64)> {
            DropReason::ALL
                .iter()
                .map(|r| (*r, worker_metrics.dropped(*r)))
                .collect()
        };
        let deadline = std::time::Instant::now() + TIMEOUT;
        while counted() != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "drops: expected {expected:?}, counted {:?}",
                counted()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.still_serving().await;
        // Every publish the spy saw went to an expected topic.
        let mut allowed: BTreeSet<String> = ok_srcs.iter().map(|s| format!("{s}/rpc")).collect();
        allowed.insert(format!("{}/rpc", self.probe.src()));
        let seen = self.spy.drain();
        for (topic, payload) in &seen {
            if topic.starts_with(&request_topic()) {
                continue;
            }
            assert!(
                allowed.contains(topic),
                "the worker published to {topic:?}: {}",
                String::from_utf8_lossy(&payload[..payload.len().min(200)])
            );
        }
    }

    async fn still_serving(&self) {
        let r = self
            .probe
            .call("Auth.ListToken", json!({}), TIMEOUT)
            .await
            .expect("the worker still answers");
        assert_eq!(r.result, Some(json!([])), "{:?}", r.error);
    }
}

fn frame(src: Value, id: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "src": src, "key": SERVICE_KEY, "method": "Auth.ListToken"
    }))
    .unwrap()
}

#[tokio::test]
async fn frames_that_are_not_json_objects_are_dropped() {
    let mut b = Bench::start(|_| {}).await;
    let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(50_000), "}".repeat(50_000));
    let payloads: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"not json".to_vec(),
        b"[1,2]".to_vec(),
        b"null".to_vec(),
        b"42".to_vec(),
        br#""a string""#.to_vec(),
        b"\xff\xfe\x00garbage".to_vec(),
        br#"{"id":1,"src":"x","key":"k""#.to_vec(), // truncated
        br#"{"id":1,"src":"x"} trailing"#.to_vec(),
        br#"{"id":1,"src":"x",}"#.to_vec(),
        br#"{"id":NaN,"src":"x"}"#.to_vec(),
        br#"{"id":1,"src":"x","deadline":Infinity}"#.to_vec(),
        // Invalid UTF-8 inside the strings that matter.
        b"{\"id\":1,\"src\":\"a\xffb\"}".to_vec(),
        b"{\"id\":1,\"src\":\"x\",\"method\":\"Auth.\xc0\xafList\"}".to_vec(),
        b"{\"id\":1,\"src\":\"\xed\xa0\x80\"}".to_vec(), // a UTF-16 surrogate in UTF-8
        deep_array.into_bytes(),
    ];
    let n = payloads.len() as u64;
    b.batch(&payloads, &[(DropReason::NotJson, n)], &[]).await;
    // Valid JSON, however deep, is parsed without recursion: this object has no `src`.
    b.batch(&[deep_object.into_bytes()], &[(DropReason::BadSrc, 1)], &[])
        .await;
}

#[tokio::test]
async fn unusable_src_is_dropped_and_never_becomes_a_topic() {
    let mut b = Bench::start(|_| {}).await;
    let bad_srcs = [
        json!(""),
        json!("+"),
        json!("a/+/b"),
        json!("a/#"),
        json!("#"),
        json!("$SYS/x"),
        json!("$share/g/x"),
        json!("$CONTROL/x"),
        json!("$"),
        json!("a\u{0}b"),
        json!("a\u{1}b"),
        json!("a\nb"),
        json!("a\u{1f}"),
        json!("a\u{7f}"),
        json!("a\u{85}"),
        json!("a\u{9f}"),
        // Unicode non-characters: MQTT forbids them in topic names, and mosquitto
        // disconnects a client that publishes to one.
        json!("a\u{ffff}"),
        json!("a\u{fffe}"),
        json!("a\u{fdd0}"),
        json!("a\u{10ffff}"),
        json!("a\u{1fffe}"),
        json!("s".repeat(257)),
        json!("é".repeat(129)),
        json!(5),
        json!(null),
        json!(true),
        json!(["a"]),
        json!({"a": 1}),
    ];
    let mut payloads: Vec<Vec<u8>> = bad_srcs
        .iter()
        .map(|s| frame(s.clone(), json!(1)))
        .collect();
    payloads.push(br#"{"id":1,"key":"k","method":"Auth.ListToken"}"#.to_vec()); // no src
    let n = payloads.len() as u64;
    b.batch(&payloads, &[(DropReason::BadSrc, n)], &[]).await;

    // The limits themselves are fine, and unusual but safe characters are answered.
    let good = [
        "s".repeat(256),
        "é".repeat(128),
        "a/b/c".into(),
        "/leading/slash".into(),
        "x$".into(),
        "日本".into(),
        "a\u{200b}b".into(),
    ];
    let mut spy = Spy::start(&b.s.broker, &["#"]).await;
    let mut payloads = Vec::new();
    for (n, src) in good.iter().enumerate() {
        payloads.push(frame(json!(src), json!(n + 1)));
    }
    for p in &payloads {
        spy.publish(&request_topic(), p.clone()).await;
    }
    let mut waiting: BTreeSet<String> = good.iter().map(|s| format!("{s}/rpc")).collect();
    while !waiting.is_empty() {
        let (topic, _) = spy
            .next(TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no reply on {waiting:?}"));
        waiting.remove(&topic);
    }
    let good_refs: Vec<&str> = good.iter().map(String::as_str).collect();
    b.batch(&[], &[], &good_refs).await;
}

#[tokio::test]
async fn unusable_ids_are_dropped() {
    let mut b = Bench::start(|_| {}).await;
    let ids: Vec<&str> = vec![
        "0",
        "-1",
        "-0",
        "9007199254740992", // 2^53
        "9007199254740993",
        "18446744073709551615",
        "18446744073709551616",
        "1e999",
        "-1e999",
        "1.5",
        "1.0",
        "1e3",
        r#""1""#,
        "null",
        "true",
        "[1]",
        r#"{"id":1}"#,
    ];
    let mut payloads: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            format!(
                r#"{{"id":{id},"src":"idtest","key":"{SERVICE_KEY}","method":"Auth.ListToken"}}"#
            )
            .into_bytes()
        })
        .collect();
    payloads.push(br#"{"src":"idtest","method":"Auth.ListToken"}"#.to_vec()); // no id
    let n = payloads.len() as u64;
    b.batch(&payloads, &[(DropReason::BadId, n)], &[]).await;
}

#[tokio::test]
async fn duplicated_keys() {
    let mut b = Bench::start(|_| {}).await;
    // Whom to answer is ambiguous: dropped.
    let ambiguous = [
        r#"{"id":1,"src":"dup","src":"other","method":"Auth.ListToken"}"#,
        r#"{"id":1,"id":2,"src":"dup","method":"Auth.ListToken"}"#,
        r#"{"id":1,"src":"dup","src":"dup"}"#,
    ];
    let payloads: Vec<Vec<u8>> = ambiguous.iter().map(|p| p.as_bytes().to_vec()).collect();
    b.batch(&payloads, &[(DropReason::AmbiguousAddress, 3)], &[])
        .await;

    // Any other field twice: a 400 naming it.
    let c = b.s.service("dup").await;
    for field in [
        "method", "key", "args", "v", "dst", "tag", "nr", "deadline", "timeout",
    ] {
        let value = match field {
            "method" => r#""Auth.ListToken""#.to_owned(),
            "key" => format!(r#""{SERVICE_KEY}""#),
            "args" => "{}".into(),
            "v" => "2".into(),
            "dst" => format!(r#""{SERVICE_ID}""#),
            "tag" => r#""t""#.into(),
            "nr" => "false".into(),
            _ => "1e12".into(),
        };
        let id = c.next_id();
        let payload = format!(
            r#"{{"id":{id},"src":"dup","key":"{SERVICE_KEY}","method":"Auth.ListToken","{field}":{value},"{field}":{value}}}"#
        );
        let r = raw(&c, &payload, id).await;
        let e = r
            .error
            .unwrap_or_else(|| panic!("{payload}: {:?}", r.result));
        assert_eq!(e.code, 400, "{payload}");
        assert!(
            e.message.starts_with(&format!("{field}:")),
            "{payload}: {}",
            e.message
        );
    }
    b.still_serving().await;
}

#[tokio::test]
async fn wrong_types_and_hostile_values_in_answerable_frames() {
    let mut b = Bench::start(|c| c.max_frame_bytes = 700 * 1024).await;
    let c = b.s.service("typed").await;
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let huge_array = format!("[{}0]", "0,".repeat(200_000));
    let mb_string = format!(r#""{}""#, "x".repeat(600 * 1024));
    // (field: raw JSON value, expected code)
    let cases: Vec<(&str, String, u16)> = vec![
        ("v", "1e999".into(), 400),
        ("v", "2.5".into(), 400),
        ("v", "null".into(), 400),
        ("dst", "[]".into(), 400),
        ("key", "{}".into(), 400),
        ("key", "null".into(), 400),
        ("method", "[]".into(), 400),
        ("method", "true".into(), 400),
        ("args", "true".into(), 400),
        ("args", deep(50_000), 400),
        ("args", huge_array.clone(), 400),
        ("nr", "1".into(), 400),
        ("nr", "null".into(), 400),
        ("deadline", "1e999".into(), 400),
        ("deadline", "-1e999".into(), 400),
        ("deadline", "null".into(), 400),
        ("timeout", "1e999".into(), 400),
        ("timeout", r#""5""#.into(), 400),
        ("timeout", "{}".into(), 400),
        // Unknown fields are ignored whatever they hold.
        ("zzz", deep(100_000), 0),
        ("zzz", huge_array.clone(), 0),
        ("zzz", mb_string.clone(), 0),
        ("zzz", "1e999".into(), 0),
        ("zzz", "\"\\ud800\"".into(), 0),
    ];
    for (field, value, code) in &cases {
        let id = c.next_id();
        let payload = format!(
            r#"{{"id":{id},"src":"typed","key":"{SERVICE_KEY}","method":"Auth.ListToken","{field}":{value}}}"#
        );
        let r = raw(&c, &payload, id).await;
        let shown = &value[..value.len().min(40)];
        match code {
            0 => assert_eq!(r.result, Some(json!([])), "{field}={shown}: {:?}", r.error),
            code => {
                let e = r
                    .error
                    .unwrap_or_else(|| panic!("{field}={shown}: {:?}", r.result));
                assert_eq!(e.code, *code, "{field}={shown}: {}", e.message);
                assert!(
                    e.message.starts_with(&format!("{field}:")),
                    "{field}={shown}: {}",
                    e.message
                );
            }
        }
    }
    // Hostile method arguments: a 400 naming the argument.
    let args_cases = [
        format!(r#"{{"host":{}}}"#, deep(50_000)),
        format!(r#"{{"host":{huge_array}}}"#),
        format!(r#"{{"host":{mb_string}}}"#),
        r#"{"host":1e999}"#.to_owned(),
        r#"{"host":"\ud800"}"#.to_owned(),
        r#"{"host":"h","host":"h"}"#.to_owned(),
        format!(r#"{{"host":"h","x":{}}}"#, deep(50_000)),
    ];
    for args in &args_cases {
        let id = c.next_id();
        let payload = format!(
            r#"{{"id":{id},"src":"typed","key":"{SERVICE_KEY}","method":"Auth.GenerateToken","args":{args}}}"#
        );
        let r = raw(&c, &payload, id).await;
        let shown = &args[..args.len().min(40)];
        let e = r.error.unwrap_or_else(|| panic!("{shown}: {:?}", r.result));
        assert_eq!(e.code, 400, "{shown}: {}", e.message);
        assert!(e.message.starts_with("args"), "{shown}: {}", e.message);
    }
    // A deeply nested tag is copied verbatim (the spy sees the raw reply).
    let tag = deep(10_000);
    let mut spy = Spy::start(&b.s.broker, &["deeptag/rpc"]).await;
    spy.publish(
        &request_topic(),
        format!(r#"{{"id":5,"src":"deeptag","key":"{SERVICE_KEY}","method":"Auth.ListToken","tag":{tag}}}"#),
    )
    .await;
    let (_, text) = spy.next_text().await;
    assert!(
        text.contains(&format!(r#""tag":{tag},"result":[]"#)),
        "tag not verbatim"
    );
    // None of it changed anything.
    assert_eq!(ok(&c, "Auth.ListToken", json!({})).await, Some(json!([])));
    b.batch(&[], &[], &["typed", "deeptag"]).await;
}

#[tokio::test]
async fn a_flood_of_garbage_is_survived() {
    let mut b = Bench::start(|_| {}).await;
    let mut payloads = Vec::new();
    for i in 0..500u32 {
        payloads.push(match i % 5 {
            0 => b"garbage".to_vec(),
            1 => frame(json!("+"), json!(1)),
            2 => frame(json!("ok"), json!(0)),
            3 => br#"{"id":1,"src":"a","src":"b"}"#.to_vec(),
            _ => i.to_le_bytes().to_vec(),
        });
    }
    b.batch(
        &payloads,
        &[
            (DropReason::NotJson, 200),
            (DropReason::BadSrc, 100),
            (DropReason::BadId, 100),
            (DropReason::AmbiguousAddress, 100),
        ],
        &[],
    )
    .await;
}

#[tokio::test]
async fn qos0_requests_are_answered() {
    let s = Setup::start().await;
    let c = s.service("qos0").await;
    let mut options = rumqttc::MqttOptions::new("qos0-publisher", "127.0.0.1", s.broker.port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (publisher, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    for _ in 0..3 {
        let id = c.next_id();
        let payload = format!(
            r#"{{"id":{id},"src":"qos0","key":"{SERVICE_KEY}","method":"Auth.ListToken"}}"#
        );
        publisher
            .publish(request_topic(), rumqttc::QoS::AtMostOnce, false, payload)
            .await
            .unwrap();
        // The reply comes to our client's reply topic, matching no call of its own.
        let reply = c
            .next_unmatched(TIMEOUT)
            .await
            .expect("a QoS 0 request is answered");
        let r: authd::frame::Response = serde_json::from_slice(&reply).unwrap();
        assert_eq!((r.id, r.result), (id, Some(json!([]))));
    }
    driver.abort();
}

/// A packet above the worker's transport limit (`max_packet_bytes`) cannot even be read: the
/// MQTT client drops the connection. On a persistent session the broker redelivers a QoS 1
/// one at every reconnect; the worker must not be wedged by it, and answers it (413) so the
/// caller learns why. A QoS 0 one is not redelivered: it is lost, the worker comes back.
#[tokio::test]
async fn a_packet_over_the_transport_limit_does_not_wedge_the_worker() {
    let s = Setup::start_with(|c| {
        c.max_frame_bytes = 16 * 1024;
        c.max_packet_bytes = 64 * 1024;
    })
    .await;
    let c = s.service("huge").await;
    let big = "p".repeat(200 * 1024);
    // The filler in an unknown field, then in the tag (which a reply would echo: that reply
    // is too large to send, so it goes without the tag).
    for filler in ["pad", "tag"] {
        let id = c.next_id();
        let payload = format!(
            r#"{{"id":{id},"src":"huge","key":"{SERVICE_KEY}","method":"Auth.GenerateToken","args":{{"host":"h"}},"{filler}":"{big}"}}"#
        );
        let r = raw(&c, &payload, id).await;
        let e = r.error.expect("an error reply");
        assert_eq!(e.code, 413, "{filler}: {}", e.message);
        assert_eq!(r.tag, None);
        // Back to normal, and the oversize request did not run.
        assert_eq!(
            ok(&c, "Auth.GetToken", json!({"host": "h"})).await,
            Some(json!({"exist": false}))
        );
    }
    // The first one cost a reconnect: it could not be read on the old connection.
    let reconnects = || {
        s.worker()
            .metrics()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(reconnects() >= 1);

    // QoS 0, larger than the limit the last refusal raised for this connection: the
    // connection drops once, the request is lost, the worker comes back.
    let bigger = "p".repeat(400 * 1024);
    let mut options = rumqttc::MqttOptions::new("huge-qos0", "127.0.0.1", s.broker.port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (publisher, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });

    let before = reconnects();
    let id = c.next_id();
    publisher
        .publish(
            request_topic(),
            rumqttc::QoS::AtMostOnce,
            false,
            format!(r#"{{"id":{id},"src":"huge","key":"{SERVICE_KEY}","method":"Auth.ListToken","pad":"{bigger}"}}"#),
        )
        .await
        .unwrap();
    wait_until("the worker reconnected", || reconnects() > before).await;
    wait_until("the worker is ready", || {
        s.worker().broker_state() == authd::mqtt::BrokerState::Ready
    })
    .await;
    ok(&c, "Auth.ListToken", json!({})).await;
    driver.abort();
}

/// A reply that would not fit in an MQTT packet (here: an error message quoting a long
/// argument name, plus a long tag) is cut short instead of breaking the connection.
#[tokio::test]
async fn a_reply_too_large_for_a_packet_is_cut_short() {
    let s = Setup::start_with(|c| {
        c.max_frame_bytes = 32 * 1024;
        c.max_packet_bytes = 32 * 1024;
    })
    .await;
    let c = s.service("long-reply").await;
    let name = "n".repeat(12 * 1024);
    let tag = "t".repeat(12 * 1024);
    let id = c.next_id();
    let payload = format!(
        r#"{{"id":{id},"src":"long-reply","key":"{SERVICE_KEY}","method":"Auth.ListToken","args":{{"{name}":1}},"tag":"{tag}"}}"#
    );
    let r = raw(&c, &payload, id).await;
    let e = r.error.expect("an error reply");
    assert_eq!(e.code, 400);
    assert!(
        e.message.starts_with("args.nnnn") && e.message.len() < 1024,
        "{}",
        shorten(&e.message)
    );
    assert_eq!(r.tag, None);
    ok(&c, "Auth.ListToken", json!({})).await;
    // The same with a short argument name fits, tag and all.
    let id = c.next_id();
    let payload = format!(
        r#"{{"id":{id},"src":"long-reply","key":"{SERVICE_KEY}","method":"Auth.ListToken","args":{{"x":1}},"tag":"{tag}"}}"#
    );
    let r = raw(&c, &payload, id).await;
    assert_eq!(r.tag, Some(json!(tag)));
}
