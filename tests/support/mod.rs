//! Test harness: a real mosquitto on an ephemeral loopback port, an authd worker in-process
//! (or as the built binary), and clients that speak the wire protocol to it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use authd::client::{Client, ClientOptions};
use authd::config::{BrokerAddress, Config};
use authd::frame::Response;
use authd::Worker;
use serde_json::Value;

pub mod certs;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
pub const ADMIN_KEY: &str = "test-admin-key-0123";
pub const SERVICE_KEY: &str = "test-service-key";
pub const SERVICE_ID: &str = "//api.mongoose-iot.com";
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The harness's mosquitto config: anonymous, loopback, persistent.
// As root, mosquitto would drop to user `mosquitto` and could not write its persistence
// file into our temporary directory: `user root` keeps it as it is.
const BASE_CONFIG: &str = "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nuser root\npersistence true\npersistence_location {dir}/\nlog_dest stderr\nlog_type error\nlog_type warning\n";

/// A mosquitto process of our own. Stopped (and its files removed) on drop.
pub struct Broker {
    pub port: u16,
    dir: tempfile::TempDir,
    template: String,
    child: Option<Child>,
}

impl Broker {
    /// Starts mosquitto with anonymous access on a free loopback port.
    pub fn start() -> Broker {
        Self::start_with("")
    }

    /// Starts mosquitto with extra lines appended to the base config.
    pub fn start_with(extra_config: &str) -> Broker {
        Self::start_config(&format!("{BASE_CONFIG}{extra_config}\n"))
    }

    /// Starts mosquitto with a whole config of our own, in which `{port}` and `{dir}` (a
    /// private temporary directory) are replaced.
    pub fn start_config(template: &str) -> Broker {
        let mut broker = Broker {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            template: template.to_owned(),
            child: None,
        };
        broker.launch();
        broker
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn launch(&mut self) {
        assert!(
            Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} is missing: apt-get install mosquitto"
        );
        let conf = self.dir.path().join("mosquitto.conf");
        let text = self
            .template
            .replace("{port}", &self.port.to_string())
            .replace("{dir}", &self.dir.path().display().to_string());
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn address(&self) -> BrokerAddress {
        BrokerAddress::plain("127.0.0.1", self.port)
    }

    /// Stops the broker (SIGTERM, so it writes its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe_kill(child.id(), "TERM");
            let _ = child.wait();
        }
    }

    /// Stops and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A worker config for `broker` with a fresh data dir, an admin and a service key, on the
/// store the suite runs against ([`store_for`]).
pub fn worker_config(broker: &Broker, data: &Path) -> Config {
    Config {
        store: store_for(data).map(Into::into),
        ..embedded_worker_config(broker, data)
    }
}

/// [`worker_config`] on the embedded store whatever the suite runs against (tests of the
/// sled database itself).
pub fn embedded_worker_config(broker: &Broker, data: &Path) -> Config {
    Config {
        broker: broker.url(),
        data: data.to_path_buf(),
        client_id: format!("authd-test-{}", uuid::Uuid::new_v4().simple()),
        callers: authd::caller::parse_caller_keys(&format!(
            "ops:admin:{ADMIN_KEY},backend:service:{SERVICE_KEY}"
        ))
        .unwrap(),
        ..Config::default()
    }
}

/// The PostgreSQL server the tests use (trust auth): `AUTHD_TEST_PG`, default
/// `postgres://postgres@127.0.0.1:5432`.
pub fn pg_server() -> String {
    std::env::var("AUTHD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Whether the suite runs against PostgreSQL (`AUTHD_TEST_STORE=postgres`) rather than the
/// embedded store (unset or `embedded`). Anything else is a mistake, not a silent default.
pub fn on_postgres() -> bool {
    match std::env::var("AUTHD_TEST_STORE").as_deref() {
        Err(_) | Ok("") | Ok("embedded") => false,
        Ok("postgres") => true,
        Ok(other) => panic!("AUTHD_TEST_STORE={other}: expected `embedded` or `postgres`"),
    }
}

/// The store URL for the worker whose data directory is `data`, when the suite runs on
/// PostgreSQL: a database of its own (created now, dropped when the test process exits),
/// the same one for every worker started on that directory.
pub fn store_for(data: &Path) -> Option<String> {
    if !on_postgres() {
        return None;
    }
    let digest = authd::crypto::sha256(data.as_os_str().as_encoded_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Some(test_database(&format!("authd_test_{name}")))
}

/// A fresh database `name` on [`pg_server`] (created if missing, dropped at process exit);
/// its URL. Panics if the server cannot be reached: the PostgreSQL suite never skips.
pub fn test_database(name: &str) -> String {
    static CREATED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let server = pg_server();
    let mut created = CREATED.lock().unwrap_or_else(|e| e.into_inner());
    if !created.iter().any(|n| n == name) {
        pg_admin(&format!("CREATE DATABASE {name}"));
        if created.is_empty() {
            extern "C" fn drop_all() {
                let names = CREATED.lock().map(|n| n.clone()).unwrap_or_default();
                for name in names {
                    pg_admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
                }
            }
            // SAFETY: registers a plain function to run at exit.
            unsafe { libc::atexit(drop_all) };
        }
        created.push(name.to_owned());
    }
    format!("{server}/{name}")
}

/// Runs `sql` on the server's `postgres` database, from a thread of its own (callers may be
/// inside a runtime). Panics if it fails, but for a database that exists already.
pub fn pg_admin(sql: &str) {
    let url = format!("{}/postgres", pg_server());
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| {
                    panic!("PostgreSQL at {url} (AUTHD_TEST_PG) is needed by AUTHD_TEST_STORE=postgres and the multi-worker tests: {e}")
                });
            tokio::spawn(connection);
            match client.batch_execute(&sql).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
                Err(e) => panic!("{sql}: {e:?}"),
            }
        })
    })
    .join()
    .expect("PostgreSQL admin thread");
}

/// `authd` (the built binary) for a worker whose data directory is `data`, with the store
/// the suite runs against (`AUTHD_STORE`).
pub fn authd_command(data: &Path) -> Command {
    let mut command = Command::new(authd_bin());
    if let Some(url) = store_for(data) {
        command.env("AUTHD_STORE", url);
    }
    command
}

/// A broker and a ready worker, in-process.
pub struct Setup {
    pub broker: Broker,
    pub data: tempfile::TempDir,
    pub worker: Option<Worker>,
}

impl Setup {
    pub async fn start() -> Setup {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Setup {
        let broker = Broker::start();
        let data = tempfile::tempdir().expect("temp dir");
        let mut config = worker_config(&broker, data.path());
        tweak(&mut config);
        let worker = Worker::start(config).await.expect("worker starts");
        tokio::time::timeout(TIMEOUT, worker.ready())
            .await
            .expect("worker ready");
        Setup {
            broker,
            data,
            worker: Some(worker),
        }
    }

    pub fn worker(&self) -> &Worker {
        self.worker.as_ref().expect("worker running")
    }

    /// A client with the admin key.
    pub async fn admin(&self) -> Client {
        client(&self.broker, Some(ADMIN_KEY), None).await
    }

    /// A client with the service key, calling as `src`.
    pub async fn service(&self, src: &str) -> Client {
        client(&self.broker, Some(SERVICE_KEY), Some(src)).await
    }

    pub async fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop().await.expect("clean stop");
        }
    }

    /// Stops the worker and starts a new one on the same broker and data directory.
    pub async fn restart_worker(&mut self) {
        self.stop().await;
        let config = worker_config(&self.broker, self.data.path());
        let worker = Worker::start(config).await.expect("worker restarts");
        tokio::time::timeout(TIMEOUT, worker.ready())
            .await
            .expect("restarted worker ready");
        self.worker = Some(worker);
    }
}

/// A connected client with `key`, as `src` (default: random).
pub async fn client(broker: &Broker, key: Option<&str>, src: Option<&str>) -> Client {
    let mut options = ClientOptions::new(broker.address());
    options.key = key.map(str::to_owned);
    if let Some(src) = src {
        options.src = src.to_owned();
    }
    Client::connect(options, TIMEOUT)
        .await
        .expect("client connects")
}

/// Calls and expects a result (or no result); panics on an error frame.
pub async fn ok(client: &Client, method: &str, args: Value) -> Option<Value> {
    let r = client
        .call(method, args.clone(), TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{method} {args}: {e}"));
    assert!(
        r.error.is_none(),
        "{method} {args}: unexpected error {:?}",
        r.error
    );
    r.result
}

/// Calls and expects an error frame with `code`; returns its message.
pub async fn err(client: &Client, method: &str, args: Value, code: u16) -> String {
    let r = client
        .call(method, args.clone(), TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{method} {args}: {e}"));
    let e = r.error.unwrap_or_else(|| {
        panic!(
            "{method} {args}: expected error {code}, got result {:?}",
            r.result
        )
    });
    assert_eq!(e.code, code, "{method} {args}: {}", e.message);
    e.message
}

/// Authenticate's answer for `id` with `credentials`; panics on an error frame.
pub async fn authenticate(client: &Client, id: &str, credentials: Value) -> bool {
    ok(
        client,
        "/v1/Auth.Authenticate",
        serde_json::json!({"id": id, "credentials": credentials}),
    )
    .await
    .and_then(|v| v.as_bool())
    .expect("Authenticate answers a boolean")
}

/// Sends a raw frame and returns the response with id `id`.
pub async fn raw(client: &Client, payload: &str, id: u64) -> Response {
    let topic = client.request_topic().to_owned();
    client
        .call_raw(&topic, payload.as_bytes().to_vec(), id, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", shorten(payload)))
}

/// At most the first 200 characters of `text`, for assertion messages.
pub fn shorten(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}… ({} bytes)", &text[..i], text.len()),
        None => text.to_owned(),
    }
}

/// Waits until the process exits, at most `limit`; its status.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the worker process `child` says ready on its metrics endpoint `metrics`;
/// panics if it exits first or is not ready within 20 s. `what` names it in the panic.
pub fn wait_ready(metrics: std::net::SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(metrics, "/ready").0 != 200 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("worker {what} exited: {status}");
        }
        assert!(Instant::now() < deadline, "worker {what} not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The built `authd` binary (for crash and CLI tests).
pub fn authd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_authd"))
}

/// A raw subscriber: sees every message on its topic filters, byte for byte, with its topic.
/// Used to assert what the worker published (and what it never published).
pub struct Spy {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, bytes::Bytes)>,
    publisher: authd::mqtt::Publisher,
    close: tokio_util::sync::CancellationToken,
    session: tokio::task::JoinHandle<()>,
}

impl Spy {
    /// Connects and subscribes to `filters`; returns once the broker granted them.
    pub async fn start(broker: &Broker, filters: &[&str]) -> Spy {
        use authd::mqtt::{BrokerState, Session, SessionOptions};
        let (session, publisher, mut state) = Session::new(SessionOptions {
            broker: broker.address(),
            client_id: format!("spy-{}", uuid::Uuid::new_v4().simple()),
            credentials: None,
            persistent: false,
            manual_acks: false,
            subscriptions: filters.iter().map(|f| f.to_string()).collect(),
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 16 * 1024 * 1024,
            tls: None,
            outbox: None,
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let close = tokio_util::sync::CancellationToken::new();
        let session = tokio::spawn(session.run(
            move |m: authd::mqtt::Message| {
                let _ = tx.send((m.topic, m.payload));
            },
            tokio_util::sync::CancellationToken::new(),
            close.clone(),
            |_| {},
        ));
        tokio::time::timeout(TIMEOUT, state.wait_for(|s| *s == BrokerState::Ready))
            .await
            .expect("spy subscribed")
            .expect("spy session alive");
        Spy {
            rx,
            publisher,
            close,
            session,
        }
    }

    /// The next message, if one comes within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<(String, bytes::Bytes)> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message's payload as text; panics if none comes within [`TIMEOUT`].
    pub async fn next_text(&mut self) -> (String, String) {
        let (topic, payload) = self.next(TIMEOUT).await.expect("a message for the spy");
        (topic, String::from_utf8(payload.to_vec()).expect("UTF-8"))
    }

    /// Everything received so far, without waiting.
    pub fn drain(&mut self) -> Vec<(String, bytes::Bytes)> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            out.push(m);
        }
        out
    }

    /// Publishes a raw payload (QoS 1) through the spy's own connection.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.publisher
            .publish(topic.to_owned(), payload.into())
            .expect("spy publishes");
    }
}

impl Drop for Spy {
    fn drop(&mut self) {
        self.close.cancel();
        self.session.abort();
    }
}

/// Waits until `cond` holds, polling every 20 ms; panics after [`TIMEOUT`] with `what`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The request topic of the default service id.
pub fn request_topic() -> String {
    format!("{SERVICE_ID}/rpc")
}

/// `GET path` from an operator endpoint → (status, body); (0, "") when nothing answers
/// (a worker still starting, or stopped).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    if write!(stream, "GET {path} HTTP/1.1\r\nHost: authd\r\n\r\n").is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return (0, String::new());
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}
