//! The operator's HTTP endpoint (`--metrics ADDR`): `GET /metrics` (Prometheus text
//! format), `GET /ready` (200 when connected to the broker and subscribed, 503 otherwise)
//! and `GET /live` (200 while the process serves HTTP at all).
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, `Connection: close`,
//! request head capped at 8 KiB and 5 s, at most 32 connections at once (more are closed
//! unanswered). It is meant for a scraper and a health probe on a private interface, not
//! for the internet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::mqtt::BrokerState;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 32;

/// What the endpoint reports on.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    pub broker: watch::Receiver<BrokerState>,
    /// Fired when the worker stops taking requests: from then on it is not ready.
    pub stopping: CancellationToken,
}

impl Endpoint {
    /// Connected, subscribed and not shutting down.
    pub fn ready(&self) -> bool {
        *self.broker.borrow() == BrokerState::Ready && !self.stopping.is_cancelled()
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

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closes the connection
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(READ_TIMEOUT * 2, answer(stream, &endpoint)).await;
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, endpoint: &Endpoint) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
        }
        let n = match tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
        };
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path {
        "/metrics" => match endpoint.metrics.render(endpoint.ready()) {
            Ok(text) => {
                respond(
                    &mut stream,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &text,
                )
                .await
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot encode metrics");
                respond(&mut stream, 500, "text/plain", "cannot encode metrics\n").await
            }
        },
        "/ready" if endpoint.ready() => respond(&mut stream, 200, "text/plain", "ready\n").await,
        "/ready" => {
            let why = if endpoint.stopping.is_cancelled() {
                "not ready: shutting down\n"
            } else {
                "not ready: not connected to the broker or not subscribed\n"
            };
            respond(&mut stream, 503, "text/plain", why).await
        }
        "/live" => respond(&mut stream, 200, "text/plain", "live\n").await,
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics, /ready or /live\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
