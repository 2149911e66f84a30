//! An RPC client for authd over MQTT: used by `authd call`, `authd ctl`, `authd watch`,
//! `authd bench` and the tests. It subscribes to its own reply topic `{src}/rpc`, sends
//! request frames and matches responses to requests by `id`. It can subscribe to more topics
//! (`authd watch`: the change events), whose messages it hands out apart from the replies
//! ([`Client::next_message`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerAddress, DEFAULT_SERVICE_ID};
use crate::frame::{Response, MAX_ID};
use tokio::sync::watch;

use crate::mqtt::{BrokerState, Message, Publisher, Session, SessionOptions, Tls};

/// Where and as whom to call.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub broker: BrokerAddress,
    pub credentials: Option<(String, String)>,
    /// The service id (`dst` of requests).
    pub service_id: String,
    /// Where requests go; default `{service id}/rpc`.
    pub request_topic: String,
    /// Our address; replies come on `{src}/rpc`. Default: a fresh random one.
    pub src: String,
    /// Caller key sent in every frame.
    pub key: Option<String>,
    pub max_packet_bytes: usize,
    /// MQTT client id; default: `src`.
    pub client_id: Option<String>,
    /// Keep the broker session across reconnects (fixed client id), so replies published
    /// while we are away are delivered when we are back.
    pub persistent: bool,
    /// TLS for an `mqtts://` broker ([`Tls::for_broker`]).
    pub tls: Option<Tls>,
    /// More topic filters to subscribe to (QoS 1), besides the reply topic. Their messages
    /// come out of [`Client::next_message`], never as responses.
    pub subscriptions: Vec<String>,
}

impl ClientOptions {
    pub fn new(broker: BrokerAddress) -> ClientOptions {
        ClientOptions {
            broker,
            credentials: None,
            service_id: DEFAULT_SERVICE_ID.into(),
            request_topic: format!("{DEFAULT_SERVICE_ID}/rpc"),
            src: format!("authd-client-{}", uuid::Uuid::new_v4().simple()),
            key: None,
            max_packet_bytes: 16 * 1024 * 1024,
            client_id: None,
            persistent: false,
            tls: None,
            subscriptions: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("could not reach the broker at {0} within the time limit")]
    Connect(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("the broker connection is closed")]
    Closed,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// A connected client.
pub struct Client {
    options: ClientOptions,
    publisher: Publisher,
    pending: Pending,
    unmatched: tokio::sync::Mutex<mpsc::UnboundedReceiver<Bytes>>,
    messages: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Bytes)>>,
    broker: watch::Receiver<BrokerState>,
    next_id: AtomicU64,
    close: CancellationToken,
    session: Option<JoinHandle<()>>,
}

impl Client {
    /// Connects and subscribes to the reply topic (and [`ClientOptions::subscriptions`]);
    /// fails if that takes longer than `within`.
    pub async fn connect(options: ClientOptions, within: Duration) -> Result<Client, CallError> {
        let reply_topic = format!("{}/rpc", options.src);
        let mut subscriptions = vec![reply_topic.clone()];
        subscriptions.extend(options.subscriptions.iter().cloned());
        let (session, publisher, mut broker) = Session::new(SessionOptions {
            broker: options.broker.clone(),
            client_id: options
                .client_id
                .clone()
                .unwrap_or_else(|| options.src.clone()),
            credentials: options.credentials.clone(),
            persistent: options.persistent,
            manual_acks: false,
            subscriptions,
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: options.max_packet_bytes,
            tls: options.tls.clone(),
            outbox: None,
        });
        let pending: Pending = Arc::default();
        let (unmatched_tx, unmatched) = mpsc::unbounded_channel();
        let (messages_tx, messages) = mpsc::unbounded_channel();
        let on_message = {
            let pending = pending.clone();
            // By topic, not by content: a message on another subscription is never taken for
            // a response, whatever it looks like.
            move |msg: Message| {
                if msg.topic == reply_topic {
                    deliver(&pending, &unmatched_tx, msg.payload)
                } else {
                    let _ = messages_tx.send((msg.topic, msg.payload));
                }
            }
        };
        let close = CancellationToken::new();
        let session =
            tokio::spawn(session.run(on_message, CancellationToken::new(), close.clone(), |_| {}));
        let ready = matches!(
            tokio::time::timeout(within, broker.wait_for(|b| *b == BrokerState::Ready)).await,
            Ok(Ok(_))
        );
        if !ready {
            close.cancel();
            return Err(CallError::Connect(format!(
                "{}:{}",
                options.broker.host, options.broker.port
            )));
        }
        // Random start: ids stay unique per src across runs of short-lived clients, which
        // matters because authd answers a repeated (src, id) from its replay record.
        let start = u64::from_le_bytes(crate::crypto::random_bytes()) % (MAX_ID / 2) + 1;
        Ok(Client {
            options,
            publisher,
            pending,
            unmatched: tokio::sync::Mutex::new(unmatched),
            messages: tokio::sync::Mutex::new(messages),
            broker,
            next_id: AtomicU64::new(start),
            close,
            session: Some(session),
        })
    }

    pub fn src(&self) -> &str {
        &self.options.src
    }

    /// A fresh request id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A request frame with our src, key and a fresh id.
    pub fn frame(&self, method: &str, args: Value) -> Value {
        let mut frame = json!({
            "v": 2,
            "id": self.next_id(),
            "src": self.options.src,
            "dst": self.options.service_id,
            "method": method,
            "args": args,
        });
        if let Some(key) = &self.options.key {
            frame["key"] = json!(key);
        }
        frame
    }

    /// Calls `method` and waits for its response.
    pub async fn call(
        &self,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let frame = self.frame(method, args);
        self.call_frame(&frame, timeout).await
    }

    /// Sends a prepared frame (its `id` is used to match the response) to the request topic.
    pub async fn call_frame(
        &self,
        frame: &Value,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let id = frame["id"].as_u64().unwrap_or(0);
        let topic = self.options.request_topic.clone();
        self.call_raw(
            &topic,
            serde_json::to_vec(frame).unwrap_or_default(),
            id,
            timeout,
        )
        .await
    }

    /// Publishes any payload to any topic and waits for a response with id `id`.
    pub async fn call_raw(
        &self,
        topic: &str,
        payload: Vec<u8>,
        id: u64,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let result = async {
            self.publisher
                .publish(topic.to_owned(), payload)
                .map_err(|_| CallError::Closed)?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) => Err(CallError::Closed),
                Err(_) => Err(CallError::Timeout(timeout)),
            }
        }
        .await;
        lock(&self.pending).remove(&id);
        result
    }

    /// Publishes without waiting for anything (for `nr` and for frames that get no answer).
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), CallError> {
        self.publisher
            .publish(topic.to_owned(), payload)
            .map_err(|_| CallError::Closed)
    }

    /// The next message on our reply topic that matched no pending call, if one comes
    /// within `timeout`.
    pub async fn next_unmatched(&self, timeout: Duration) -> Option<Bytes> {
        let mut rx = self.unmatched.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message on one of [`ClientOptions::subscriptions`] (topic, payload), in the
    /// order they arrived; `None` once the connection is closed for good. Cancel-safe.
    pub async fn next_message(&self) -> Option<(String, Bytes)> {
        self.messages.lock().await.recv().await
    }

    /// The connection's state, to learn when it comes back: after a lost connection it goes
    /// [`BrokerState::Down`], then [`BrokerState::Ready`] once every subscription is granted
    /// again. Messages published while we were away are lost (the session is not kept, but
    /// with [`ClientOptions::persistent`]). The value seen at connect is marked seen, so
    /// `changed()` fires at the first change after it.
    pub fn broker_state(&self) -> watch::Receiver<BrokerState> {
        self.broker.clone()
    }

    pub fn request_topic(&self) -> &str {
        &self.options.request_topic
    }

    /// Disconnects cleanly.
    pub async fn close(mut self) {
        self.publisher.disconnect();
        self.close.cancel();
        if let Some(session) = self.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), session).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close.cancel();
        if let Some(session) = &self.session {
            session.abort();
        }
    }
}

fn deliver(pending: &Pending, unmatched: &mpsc::UnboundedSender<Bytes>, payload: Bytes) {
    if let Ok(response) = serde_json::from_slice::<Response>(&payload) {
        if let Some(tx) = lock(pending).remove(&response.id) {
            let _ = tx.send(response);
            return;
        }
    }
    let _ = unmatched.send(payload);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
