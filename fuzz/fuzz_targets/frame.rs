//! Feeds arbitrary bytes to the frame parser and to the whole dispatcher (with a throw-away
//! store), and checks what a reply may look like: it goes to `{valid src}/rpc`, it is JSON,
//! and it fits in one MQTT packet.
//!
//! An input may start with `<topic suffix>\n`: the rest is then the payload, as if it came
//! on `{request topic}/<suffix>`.
//!
//! Run from `fuzz/` (nightly toolchain; cargo install cargo-fuzz):
//! `cargo +nightly fuzz run frame corpus/frame corpus/seeds -- -dict=frame.dict -max_total_time=600`

#![no_main]

use std::sync::{Arc, OnceLock};

use authd::caller::{parse_caller_keys, CallerKeys};
use authd::config::Config;
use authd::crypto::ServerKeys;
use authd::dispatch::Dispatcher;
use authd::frame;
use authd::metrics::Metrics;
use authd::store::Store;
use libfuzzer_sys::fuzz_target;

const MAX_FRAME: usize = 2048;
const MAX_PACKET: usize = 4096;

fn dispatcher() -> &'static Dispatcher {
    static D: OnceLock<Dispatcher> = OnceLock::new();
    D.get_or_init(|| {
        let config = Config {
            max_frame_bytes: MAX_FRAME,
            max_packet_bytes: MAX_PACKET,
            ..Config::default()
        };
        let callers = CallerKeys::new(
            &parse_caller_keys("ops:admin:k,backend:service:s").expect("caller keys"),
        );
        Dispatcher::new(
            Arc::new(config),
            callers,
            Store::temporary().expect("temporary store"),
            ServerKeys::for_tests(),
            Arc::new(Metrics::default()),
        )
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static R: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    R.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = frame::parse(data, MAX_FRAME);

    let (suffix, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(i) if i <= 64 => match std::str::from_utf8(&data[..i]) {
            Ok(s) => (Some(s), &data[i + 1..]),
            Err(_) => (None, data),
        },
        _ => (None, data),
    };
    let outcome = runtime().block_on(dispatcher().handle(suffix, payload, authd::unix_ms()));
    if let Some((topic, reply)) = outcome.reply {
        let src = topic.strip_suffix("/rpc").expect("reply topic is {src}/rpc");
        assert!(frame::valid_src(src), "reply to an unsafe topic {topic:?}");
        assert!(
            authd::mqtt::publish_fits(&topic, reply.len(), MAX_PACKET),
            "reply of {} bytes does not fit a packet",
            reply.len()
        );
        serde_json::from_slice::<serde::de::IgnoredAny>(&reply).expect("reply is JSON");
    }
});
