//! The operator's HTTP endpoint (`--metrics ADDR`): `GET /metrics` (Prometheus text
//! format), `GET /ready` (200 when connected to the broker and subscribed, 503 otherwise)
//! and `GET /live` (200 while the process serves HTTP at all).
//!
//! Served by hyper (HTTP/1.1, one request per connection, `Connection: close`). It is meant
//! for a scraper and a health probe on a private interface, and slow or idle clients must
//! not starve the probes:
//! - the request head must arrive within [`HEAD_TIMEOUT`] and be at most 8 KiB (else 431);
//! - a connection lives at most [`CONNECTION_TIMEOUT`], answer included;
//! - at most [`MAX_CONNECTIONS`] are open at once; a new connection beyond that closes the
//!   oldest one, so the newest caller (a probe) is always heard. A flood can cut short
//!   other clients' connections, but cannot keep a prompt one from being answered.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::mqtt::BrokerState;

/// The whole request head must have arrived within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 256;
/// Request heads larger than this are refused with 431 (hyper's smallest read buffer).
const MAX_HEAD: usize = 8 * 1024;

const PLAIN: &str = "text/plain";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoint reports on.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    pub broker: watch::Receiver<BrokerState>,
    /// Fired when the worker stops taking requests: from then on it is not ready.
    pub stopping: CancellationToken,
    /// The worker's store (none for the benchmark's null worker).
    pub store: Option<crate::store::Store>,
}

impl Endpoint {
    /// Connected and subscribed.
    fn broker_ready(&self) -> bool {
        *self.broker.borrow() == BrokerState::Ready
    }

    fn store_up(&self) -> bool {
        self.store.as_ref().is_none_or(|s| s.available())
    }

    /// Connected, subscribed, the store reachable, and not shutting down.
    pub fn ready(&self) -> bool {
        self.broker_ready() && self.store_up() && !self.stopping.is_cancelled()
    }
}

/// Binds `addr` (`IP:PORT`; port 0 picks a free one).
pub fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| anyhow::anyhow!("metrics `{addr}`: expected IP:PORT"))?;
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("metrics: cannot listen on {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

/// The open connections, oldest first, each with the token that closes it.
#[derive(Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, CancellationToken>,
}

/// Removes a connection from [`Open`] when its task ends.
struct Registered {
    open: Arc<Mutex<Open>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.open).by_age.remove(&self.id);
    }
}

fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves until `shutdown` fires (or this future is dropped); open connections are closed
/// then too.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, shutdown: CancellationToken) {
    let all = shutdown.child_token();
    let _close_all = all.clone().drop_guard();
    let open = Arc::new(Mutex::new(Open::default()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // e.g. out of file descriptors: wait instead of spinning.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = all.cancelled() => return,
        };
        let close = all.child_token();
        let registered = {
            let mut o = lock(&open);
            while o.by_age.len() >= MAX_CONNECTIONS {
                if let Some((_, oldest)) = o.by_age.pop_first() {
                    oldest.cancel();
                }
            }
            let id = o.next;
            o.next += 1;
            o.by_age.insert(id, close.clone());
            Registered {
                open: open.clone(),
                id,
            }
        };
        let endpoint = endpoint.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let response = answer(&endpoint, &req);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _registered = registered;
            tokio::select! {
                // Dropping the connection closes it.
                _ = close.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => {}
            }
        });
    }
}

fn answer(endpoint: &Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut r = respond(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into());
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => match endpoint.metrics.render(
            endpoint.broker_ready() && !endpoint.stopping.is_cancelled(),
            endpoint
                .store
                .as_ref()
                .map(|s| crate::metrics::StoreGauges {
                    up: s.available(),
                    round_trips: s.round_trips(),
                }),
        ) {
            Ok(text) => respond(StatusCode::OK, PROMETHEUS, text),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode metrics");
                respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    "cannot encode metrics\n".into(),
                )
            }
        },
        "/ready" if endpoint.ready() => respond(StatusCode::OK, PLAIN, "ready\n".into()),
        "/ready" => {
            let why = if endpoint.stopping.is_cancelled() {
                "not ready: shutting down\n"
            } else if !endpoint.store_up() {
                "not ready: the database is unavailable (requests are held until it is back)\n"
            } else {
                "not ready: not connected to the broker or not subscribed\n"
            };
            respond(StatusCode::SERVICE_UNAVAILABLE, PLAIN, why.into())
        }
        "/live" => respond(StatusCode::OK, PLAIN, "live\n".into()),
        _ => respond(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /ready or /live\n".into(),
        ),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
