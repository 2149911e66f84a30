//! The ceiling `authd-bench` measures authd against: the same serving path as authd
//! (session, requests answered on the connection's task, ordered manual acks, metrics, one
//! runtime thread), with a responder that parses `src` and `id` and answers `true`.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;

use authd::config::Config;
use authd::dispatch::{Outcome, Responder};
use authd::frame::Address;
use authd::Worker;

/// The ceiling's responder: parses `src` and `id`, answers `true`.
pub struct NullResponder {
    config: Arc<Config>,
}

impl Responder for NullResponder {
    async fn respond(&self, _suffix: Option<&str>, payload: &[u8], _arrived_ms: u64) -> Outcome {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            src: Cow<'a, str>,
            id: u64,
        }
        let Ok(head) = serde_json::from_slice::<Head<'_>>(payload) else {
            return Outcome::default();
        };
        let to = Address {
            src: head.src,
            id: head.id,
            tag: None,
            nr: false,
        };
        Outcome {
            reply: Some((
                self.config.reply_topic(&to.src),
                authd::frame::encode_result(&self.config.id, &to, Some(&true)),
            )),
            needs_durability: false,
            // Counted like authd's requests, so the ceiling pays the same metrics cost.
            label: Some(authd::metrics::RequestLabel::ok(None)),
            hold: false,
        }
    }
}

/// Runs the null worker until `shutdown`, with [`NullResponder`] in place of authd's
/// dispatcher.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let responder = Arc::new(NullResponder {
        config: Arc::new(config.clone()),
    });
    let worker = Worker::start_with_responder(config, responder)?;
    shutdown.await;
    worker.stop().await
}
