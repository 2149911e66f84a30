//! Configuration: defaults, then a TOML file, then `AUTHD_*` environment variables, then
//! command-line flags — each later source overrides the earlier ones ([`Config::load`]).
//! With no file at all, `authd serve` runs against `mqtt://127.0.0.1:1883` with a store in
//! the user's data dir.
//!
//! Every key of the file is also an environment variable: `AUTHD_` and the key in upper
//! case (`max_in_flight` → `AUTHD_MAX_IN_FLIGHT`), except the `[[caller]]` tables, whose
//! variable is `AUTHD_CALLER_KEYS` (`name:scope:secret,…`). `authd.example.toml` lists
//! every key. Flags go through the same key-by-key path as the variables: a flag is a key
//! (`--client-id` is `client_id`, `--caller-keys` is `caller`). A new key is read from the
//! file and the environment with no code, and becomes a flag with one field in the CLI's
//! flag struct (`cli::serve`), never a hand-copied override.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::caller::CallerKeyConfig;
use crate::lockout::LockoutPolicy;
use crate::ratelimit::RatePolicy;
use crate::secret::Secret;

mod broker;
mod layers;

pub use broker::BrokerAddress;
pub use layers::Layer;

/// The Mongoose OS cloud's service address, the default `src` of every response.
pub const DEFAULT_SERVICE_ID: &str = "//api.mongoose-iot.com";
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";
/// Replaces every secret in `--print-config`.
pub const REDACTED: &str = "<redacted>";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

/// Everything `authd serve` needs. `Debug` shows it with its secrets redacted.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `mqtt://HOST[:PORT]` (port 1883 by default) or `mqtts://HOST[:PORT]` (TLS, 8883).
    pub broker: String,
    /// Broker account (optional).
    pub broker_username: Option<String>,
    /// Taken out ([`Config::take_secrets`]) before the configuration is shared.
    pub broker_password: Option<Secret>,
    /// PEM file of the CA(s) that sign the broker's certificate (`mqtts://` only). Unset:
    /// the system's trusted roots.
    pub broker_ca: Option<PathBuf>,
    /// PEM client certificate (chain) to present to the broker; needs `broker_key`.
    pub broker_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `broker_cert`.
    pub broker_key: Option<PathBuf>,
    /// MQTT client id. Fixed, so the broker keeps our session (and queued requests) while we
    /// are away. Two workers must not share one.
    pub client_id: String,
    /// Directory of the server key and the generated admin key, and of the sled database
    /// when `store` is unset.
    pub data: PathBuf,
    /// Where the state lives: unset, the embedded sled database in `data` (one worker);
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, a PostgreSQL database that several
    /// workers share. A password in it is a secret: taken out with the others
    /// ([`Config::take_secrets`]) and redacted when printed.
    pub store: Option<Secret>,
    /// Connections each worker keeps to the PostgreSQL store.
    pub store_pool: usize,
    /// How long one PostgreSQL statement may run, and how long a request waits for the
    /// database (retrying dropped connections and serialization failures), milliseconds.
    pub store_timeout_ms: u64,
    /// Shared subscription group: several workers with the same group (each with its own
    /// `client_id`) subscribe `$share/{group}/{request topic}` and the broker hands each
    /// request to one of them. Unset: a plain subscription.
    pub share_group: Option<String>,
    /// Service id: `src` of our responses, and the expected `dst` of requests.
    pub id: String,
    /// Request topic; `{id}` is replaced by the service id. We subscribe to it and to
    /// `<topic>/#` (method in the topic suffix).
    pub request_topic: String,
    /// Reply topic; `{src}` is replaced by the request's `src`.
    pub reply_topic: String,
    /// Largest request frame answered normally; larger frames get 413.
    pub max_frame_bytes: usize,
    /// Largest MQTT packet read or sent in normal operation. A larger incoming packet costs
    /// a reconnect (the MQTT client refuses it unread); a QoS 1 one is then read on the next
    /// connection and answered 413, a QoS 0 one is lost. Keep it well above
    /// `max_frame_bytes` and cap message size at the broker (mosquitto: `max_packet_size`).
    /// Replies that would exceed it are cut to a short error.
    pub max_packet_bytes: usize,
    /// Requests being worked on at once; QoS 0 requests beyond it are dropped and counted.
    pub max_in_flight: usize,
    /// How long the response to a state-changing request is kept for redelivery, seconds.
    pub replay_window_secs: u64,
    /// Most responses kept for redelivery; beyond it the oldest go early (a redelivery of
    /// those would run again). Bounds the database under a flood of writes.
    pub replay_max_records: u64,
    /// Most live app tokens one user may hold. GenerateToken for a new host beyond it is
    /// 409; replacing the token of a host the user has is always allowed. Bounds ListToken's
    /// answer and the transaction of an Entity.Delete.
    pub max_tokens_per_user: u64,
    /// sled page cache, MiB (embedded store). sled's memory grows well beyond it under
    /// writes; the README's Performance section has the measurements behind the default.
    pub cache_mib: u64,
    /// MQTT keep-alive, seconds.
    pub keep_alive_secs: u64,
    /// How long shutdown waits for requests in flight, seconds.
    pub drain_secs: u64,
    /// Authenticate's brute-force guard: consecutive failures that lock an id; 0 turns the
    /// guard off.
    pub lockout_failures: u32,
    /// Length of the first lock, milliseconds; each further lock doubles it.
    pub lockout_base_ms: u64,
    /// Longest lock, seconds.
    pub lockout_max_secs: u64,
    /// A failure streak idle this long (seconds) is forgotten.
    pub lockout_forget_secs: u64,
    /// Ids the guard remembers at most (bounds its memory).
    pub lockout_max_entries: usize,
    /// Where to serve Prometheus metrics (`/metrics`) and readiness (`/ready`), e.g.
    /// `127.0.0.1:9464`. Unset: no HTTP listener.
    pub metrics: Option<String>,
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// Which log lines to write, in `RUST_LOG` syntax (`RUST_LOG` itself wins), e.g.
    /// `info` or `warn,authd::audit=info`.
    pub log_filter: String,
    /// Caller keys (`[[caller]]` tables). Empty: a generated admin key is used. Taken out
    /// ([`Config::take_secrets`]) before the configuration is shared.
    #[serde(rename = "caller")]
    pub callers: Vec<CallerKeyConfig>,
    /// Per-caller rate limit: sustained requests per second per caller key name (429 beyond
    /// it); 0 turns it off.
    pub rate_limit_per_sec: f64,
    /// Requests a caller may send at once; 0 means `rate_limit_per_sec` (at least 1).
    pub rate_limit_burst: u32,
    /// Publish change events (docs/protocol.md#change-events): every change that can end a
    /// session or a permission writes one, with the change, and it is published on
    /// `events_topic`. Off: no event is written. Set it alike on every worker of a store.
    pub events: bool,
    /// Where events are published; `{id}` is replaced by the service id.
    pub events_topic: String,
    /// How long events are kept for `Events.Since`, seconds.
    pub events_retention_secs: u64,
    /// Lifetime of an app token GenerateToken makes without `ttl`, seconds; 0: no end.
    pub token_ttl_secs: u64,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(&self.redacted()) {
            Ok(text) => write!(f, "Config {text}"),
            Err(_) => f.write_str("Config { … }"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker: DEFAULT_BROKER.into(),
            broker_username: None,
            broker_password: None,
            broker_ca: None,
            broker_cert: None,
            broker_key: None,
            client_id: "authd".into(),
            data: default_data_dir(),
            store: None,
            store_pool: 16,
            store_timeout_ms: 5000,
            share_group: None,
            id: DEFAULT_SERVICE_ID.into(),
            request_topic: "{id}/rpc".into(),
            reply_topic: "{src}/rpc".into(),
            max_frame_bytes: 64 * 1024,
            max_packet_bytes: 1024 * 1024,
            max_in_flight: 1024,
            replay_window_secs: 600,
            replay_max_records: 1_000_000,
            max_tokens_per_user: 1000,
            cache_mib: 8,
            keep_alive_secs: 30,
            drain_secs: 10,
            lockout_failures: 5,
            lockout_base_ms: 1000,
            lockout_max_secs: 15 * 60,
            lockout_forget_secs: 60 * 60,
            lockout_max_entries: 100_000,
            metrics: None,
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            callers: Vec::new(),
            rate_limit_per_sec: 0.0,
            rate_limit_burst: 0,
            events: true,
            events_topic: "{id}/events".into(),
            events_retention_secs: 24 * 3600,
            token_ttl_secs: 0,
        }
    }
}

/// The longest token lifetime, seconds (ten years): beyond it, use 0 (no end).
pub const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// The per-user data directory (`$XDG_DATA_HOME/authd`, `~/.local/share/authd`), or
/// `./authd-data` where there is no home.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("authd"))
        .unwrap_or_else(|| PathBuf::from("authd-data"))
}

/// The secrets of a configuration, taken out of it ([`Config::take_secrets`]) so that the
/// configuration the worker shares for its whole life holds none. Each is wiped when dropped.
#[derive(Debug, Default)]
pub struct Secrets {
    /// The caller keys; the worker keeps their digests and drops these.
    pub callers: Vec<CallerKeyConfig>,
    /// The broker password; the worker moves it into its broker session's CONNECT packet.
    pub broker_password: Option<Secret>,
    /// The store's URL (it may hold the database password); the worker opens the store
    /// with it and drops it.
    pub store: Option<Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
    /// A value from the environment or a flag that does not fit its key; `name` is the
    /// variable or flag, never the value.
    #[error("{layer} {name}: {message}")]
    Setting {
        layer: Layer,
        name: String,
        message: String,
    },
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        // The file may hold secrets: our copy of its text is wiped once parsed.
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            ConfigError::Read {
                path: path.display().to_string(),
                source,
            }
        })?);
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            // toml's message quotes the offending line, which may hold a secret: keep the
            // first line (what and where) only.
            message: e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_owned(),
        })
    }

    /// Takes the secrets out (caller keys, broker password), leaving none in `self`: the
    /// worker does this before it shares the configuration. Call [`Config::validate`] first,
    /// which checks the caller keys.
    pub fn take_secrets(&mut self) -> Secrets {
        Secrets {
            callers: std::mem::take(&mut self.callers),
            broker_password: self.broker_password.take(),
            store: self.store.take(),
        }
    }

    /// The resolved request topic.
    pub fn request_topic(&self) -> String {
        self.request_topic.replace("{id}", &self.id)
    }

    /// The resolved events topic.
    pub fn events_topic(&self) -> String {
        self.events_topic.replace("{id}", &self.id)
    }

    /// Whether and how long change events are kept.
    pub fn event_policy(&self) -> crate::store::EventPolicy {
        crate::store::EventPolicy {
            enabled: self.events,
            retention_ms: self.events_retention_secs.saturating_mul(1000),
        }
    }

    /// The reply topic for a caller (`src` already validated).
    pub fn reply_topic(&self, src: &str) -> String {
        self.reply_topic.replace("{src}", src)
    }

    /// How long, and how many, responses are kept for redelivery.
    pub fn replay_policy(&self) -> crate::store::ReplayPolicy {
        crate::store::ReplayPolicy {
            window_ms: self.replay_window_secs.saturating_mul(1000),
            max_records: self.replay_max_records,
        }
    }

    /// The brute-force guard's settings.
    pub fn lockout(&self) -> LockoutPolicy {
        LockoutPolicy {
            failures: self.lockout_failures,
            base: Duration::from_millis(self.lockout_base_ms),
            max: Duration::from_secs(self.lockout_max_secs),
            forget: Duration::from_secs(self.lockout_forget_secs),
            max_entries: self.lockout_max_entries,
        }
    }

    /// The per-caller rate limit's settings.
    pub fn rate_limit(&self) -> RatePolicy {
        let burst = match self.rate_limit_burst {
            0 => self.rate_limit_per_sec.ceil().max(1.0),
            n => f64::from(n),
        };
        RatePolicy {
            per_sec: self.rate_limit_per_sec,
            burst,
        }
    }

    /// Checks values that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !crate::frame::valid_src(&self.id) {
            return invalid(format!("id `{}`: must be 1 to 256 bytes with no + # or control characters, not starting with $", self.id));
        }
        let topic = self.request_topic();
        if topic.is_empty() || topic.contains(['+', '#']) {
            return invalid(format!(
                "request_topic `{topic}`: must be a topic name without wildcards"
            ));
        }
        if !self.reply_topic.contains("{src}") {
            return invalid("reply_topic: must contain {src}".into());
        }
        if self.reply_topic.contains(['+', '#']) {
            return invalid(format!(
                "reply_topic `{}`: must be a topic name without wildcards",
                self.reply_topic
            ));
        }
        // What comes before the first {src} is in every reply topic: if it is already under
        // the request topic, every reply would come back to us as a request, forever. (A
        // template that loops only for some src is caught per frame: `reply_loop` drops.)
        let fixed = self.reply_topic.split("{src}").next().unwrap_or_default();
        if fixed.starts_with(&format!("{topic}/")) {
            return invalid(format!(
                "reply_topic `{}` puts every reply under the request topic `{topic}`: authd would read its own replies as requests and answer them forever. Choose a reply topic outside `{topic}/…`",
                self.reply_topic
            ));
        }
        let events = self.events_topic();
        if events.is_empty() || events.contains(['+', '#']) {
            return invalid(format!(
                "events_topic `{events}`: must be a topic name without wildcards"
            ));
        }
        if events == topic || events.starts_with(&format!("{topic}/")) {
            return invalid(format!(
                "events_topic `{events}` is under the request topic `{topic}`: authd would read its own events as requests"
            ));
        }
        if self.events_retention_secs == 0 {
            return invalid("events_retention_secs must be at least 1".into());
        }
        if self.token_ttl_secs > MAX_TOKEN_TTL_SECS {
            return invalid(format!(
                "token_ttl_secs must be at most {MAX_TOKEN_TTL_SECS} (ten years); 0 means no end"
            ));
        }
        if self.max_frame_bytes == 0 || self.max_packet_bytes < self.max_frame_bytes {
            return invalid(
                "max_frame_bytes must be at least 1 and at most max_packet_bytes".into(),
            );
        }
        if self.max_in_flight == 0 {
            return invalid("max_in_flight must be at least 1".into());
        }
        if self.max_tokens_per_user == 0 {
            return invalid("max_tokens_per_user must be at least 1".into());
        }
        if self.lockout_failures > 0 {
            if self.lockout_base_ms == 0
                || self.lockout_max_secs.saturating_mul(1000) < self.lockout_base_ms
            {
                return invalid(
                    "lockout_base_ms must be at least 1 and at most lockout_max_secs".into(),
                );
            }
            if self.lockout_max_entries == 0 {
                return invalid(
                    "lockout_max_entries must be at least 1 (set lockout_failures = 0 to turn the guard off)".into(),
                );
            }
        }
        crate::caller::check_caller_keys(&self.callers).map_err(ConfigError::Invalid)?;
        if !self.rate_limit_per_sec.is_finite() || self.rate_limit_per_sec < 0.0 {
            return invalid(
                "rate_limit_per_sec must be a number of at least 0 (0 turns the limit off)".into(),
            );
        }
        let broker = BrokerAddress::parse(&self.broker)?;
        let tls_files = [
            ("broker_ca", &self.broker_ca),
            ("broker_cert", &self.broker_cert),
            ("broker_key", &self.broker_key),
        ];
        if !broker.tls {
            if let Some((name, _)) = tls_files.iter().find(|(_, v)| v.is_some()) {
                return invalid(format!(
                    "{name} is set but broker `{}` is not TLS: use mqtts://",
                    self.broker
                ));
            }
        }
        if self.broker_cert.is_some() != self.broker_key.is_some() {
            return invalid("broker_cert and broker_key go together: set both or neither".into());
        }
        if let Some(addr) = &self.metrics {
            addr.parse::<std::net::SocketAddr>().map_err(|_| {
                ConfigError::Invalid(format!(
                    "metrics `{addr}`: expected IP:PORT, e.g. 127.0.0.1:9464"
                ))
            })?;
        }
        if let Some(store) = &self.store {
            crate::store::postgres::check_url(store.expose()).map_err(ConfigError::Invalid)?;
        }
        if self.store_pool == 0 || self.store_timeout_ms == 0 {
            return invalid("store_pool and store_timeout_ms must be at least 1".into());
        }
        if let Some(group) = &self.share_group {
            if group.is_empty()
                || group.contains(['/', '+', '#'])
                || group.chars().any(char::is_control)
            {
                return invalid(format!(
                    "share_group `{group}`: must be a non-empty name without / + # or control characters"
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_filter)
            .map_err(|e| ConfigError::Invalid(format!("log_filter `{}`: {e}", self.log_filter)))?;
        Ok(())
    }

    /// TOML of the configuration in force, secrets redacted, with the keys that are not
    /// set listed as comments (for `--print-config`).
    pub fn describe(&self) -> Result<String, ConfigError> {
        let redacted = self.redacted();
        let text = toml::to_string_pretty(&redacted)
            .map_err(|e| ConfigError::Invalid(format!("cannot print the configuration: {e}")))?;
        let mut out = String::from(
            "# authd configuration in force (defaults < file < AUTHD_* environment < flags).\n",
        );
        if let Ok(Value::Object(map)) = serde_json::to_value(&redacted) {
            for (key, value) in &map {
                if value.is_null() {
                    out.push_str(&format!("# {key}: not set\n"));
                }
            }
        }
        if redacted.callers.is_empty() {
            out.push_str("# caller: none configured (the generated admin key in `data` is used)\n");
        }
        out.push('\n');
        out.push_str(&text);
        Ok(out)
    }

    /// The configuration with every secret replaced, for `--print-config` and logs.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if c.broker_password.is_some() {
            c.broker_password = Some(REDACTED.into());
        }
        for caller in &mut c.callers {
            caller.key = REDACTED.into();
        }
        if let Some(store) = &c.store {
            c.store = Some(redact_url_password(store.expose()).into());
        }
        c
    }

    /// The subscriptions that bring requests: the request topic and everything under it
    /// (the method as the last level), each under `$share/{group}/` with a share group.
    pub fn subscriptions(&self) -> Vec<String> {
        let topic = self.request_topic();
        let share = match &self.share_group {
            Some(group) => format!("$share/{group}/"),
            None => String::new(),
        };
        vec![format!("{share}{topic}"), format!("{share}{topic}/#")]
    }
}

/// The store URL as it may be shown (`--print-config`, messages, logs): unchanged when it
/// holds no password, else rebuilt without it ([`crate::store::postgres::redact_url`]).
pub fn redact_url_password(url: &str) -> String {
    crate::store::postgres::redact_url(url, REDACTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_need_mqtts_and_cert_needs_key() {
        let c = Config {
            broker_ca: Some("ca.pem".into()),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("broker_ca") && e.contains("mqtts://"), "{e}");
        let c = Config {
            broker: "mqtts://localhost".into(),
            broker_cert: Some("c.pem".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("broker_key"));
        let c = Config {
            broker: "mqtts://localhost".into(),
            broker_ca: Some("ca.pem".into()),
            ..Config::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn a_reply_topic_under_the_request_topic_for_every_src_is_refused() {
        let with = |id: &str, request: &str, reply: &str| Config {
            id: id.into(),
            request_topic: request.into(),
            reply_topic: reply.into(),
            ..Config::default()
        };
        for c in [
            with("svc", "{id}/rpc", "svc/rpc/{src}"),
            with("svc", "{id}/rpc", "svc/rpc/x/{src}/rpc"),
            with("svc", "in", "in/{src}"),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("reply_topic") && e.contains("forever"),
                "{c:?}: {e}"
            );
        }
        let e = with("svc", "{id}/rpc", "{src}/#").validate().unwrap_err();
        assert!(e.to_string().contains("wildcards"), "{e}");
        // Loops for some src only (caught per frame), or never: accepted.
        for c in [
            with("svc", "{id}/rpc", "{src}/rpc"),
            with("svc", "{id}/rpc", "svc/rpc{src}"),
            with("svc", "{id}/rpc", "svc/rpcx/{src}"),
            with("svc", "{id}/rpc", "replies/{src}"),
        ] {
            c.validate().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        }
    }

    #[test]
    fn a_store_password_is_redacted() {
        for (url, shown) in [
            (
                "postgres://authd:pw@db:5432/authd",
                "postgres://authd:<redacted>@db:5432/authd",
            ),
            (
                "postgres://a:p@ss@db/x?sslmode=disable",
                "postgres://a:<redacted>@db:5432/x",
            ),
            ("postgres://authd@db/authd", "postgres://authd@db/authd"),
            ("postgres://db/authd", "postgres://db/authd"),
            // The parser takes the user part up to the first `@`, `/` and `?` included.
            (
                "postgres://a:p/s?s@db:5433/x",
                "postgres://a:<redacted>@db:5433/x",
            ),
            (
                "postgres://authd@db/authd?sslmode=disable&password=pw",
                "postgres://authd:<redacted>@db:5432/authd",
            ),
            (
                "postgres://u:pw@h1:5432,[::1]:5433/d",
                "postgres://u:<redacted>@h1:5432,[::1]:5433/d",
            ),
            ("not a url :pw@", "<not a valid postgres:// URL>"),
        ] {
            assert_eq!(redact_url_password(url), shown);
        }
        let c = Config {
            store: Some("postgres://authd:hunter2@db/authd".into()),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.describe().unwrap().contains("hunter2"));
    }

    #[test]
    fn share_group_prefixes_both_subscriptions() {
        let mut c = Config::default();
        assert_eq!(
            c.subscriptions(),
            ["//api.mongoose-iot.com/rpc", "//api.mongoose-iot.com/rpc/#"]
        );
        c.share_group = Some("authd".into());
        assert_eq!(
            c.subscriptions(),
            [
                "$share/authd///api.mongoose-iot.com/rpc",
                "$share/authd///api.mongoose-iot.com/rpc/#"
            ]
        );
        c.share_group = Some("a/b".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("share_group"));
    }

    #[test]
    fn describe_redacts_and_lists_unset_keys() {
        let c = Config {
            broker_password: Some("hunter2".into()),
            callers: crate::caller::parse_caller_keys("ops:admin:s3cret-0123456789").unwrap(),
            ..Config::default()
        };
        let text = c.describe().unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
        assert!(text.contains("broker_password = \"<redacted>\""), "{text}");
        assert!(text.contains("# broker_ca: not set"), "{text}");
        // What is printed reads back as the same configuration (secrets aside).
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c.redacted());
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authd.toml");
        std::fs::write(
            &path,
            "id = \"svc\"\n[[caller]]\nname = \"b\"\nscope = \"service\"\nkey = \"k1\"\n",
        )
        .unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.id, "svc");
        assert_eq!(c.request_topic(), "svc/rpc");
        assert_eq!(c.callers.len(), 1);
        assert_eq!(c.broker, DEFAULT_BROKER);
        assert!(!format!("{:?}", c.redacted()).contains("k1"));
        let with_password = Config {
            broker_password: Some("hunter2-password".into()),
            ..c.clone()
        };
        let shown = format!("{with_password:?}");
        assert!(
            !shown.contains("k1") && !shown.contains("hunter2"),
            "{shown}"
        );
        std::fs::write(&path, "idd = \"svc\"\n").unwrap();
        assert!(Config::from_file(&path).is_err());
    }

    #[test]
    fn take_secrets_leaves_no_secret_behind() {
        let mut c = Config {
            broker_username: Some("authd".into()),
            broker_password: Some("broker-pw-SECRET".into()),
            callers: crate::caller::parse_caller_keys("ops:admin:caller-SECRET-0123456789")
                .unwrap(),
            ..Config::default()
        };
        c.validate().unwrap();
        let secrets = c.take_secrets();
        let left = serde_json::to_string(&c).unwrap();
        assert!(!left.contains("SECRET"), "{left}");
        assert_eq!(c.broker_username.as_deref(), Some("authd"));
        assert_eq!(secrets.callers.len(), 1);
        assert_eq!(
            secrets.broker_password.map(|p| p.into_inner()).as_deref(),
            Some("broker-pw-SECRET")
        );
    }

    #[test]
    fn lockout_settings_are_checked_unless_the_guard_is_off() {
        let c = Config {
            lockout_base_ms: 0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            lockout_base_ms: 5_000,
            lockout_max_secs: 1,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            lockout_failures: 0,
            lockout_base_ms: 0,
            ..Config::default()
        };
        c.validate().unwrap();
        let p = Config::default().lockout();
        assert_eq!((p.failures, p.max.as_secs()), (5, 900));
    }

    #[test]
    fn rate_limit_is_off_by_default_and_burst_defaults_to_the_rate() {
        assert!(Config::default().rate_limit().is_off());
        let c = Config {
            rate_limit_per_sec: 2.5,
            ..Config::default()
        };
        assert_eq!(c.rate_limit().burst, 3.0);
        let c = Config {
            rate_limit_per_sec: 0.1,
            ..Config::default()
        };
        assert_eq!(c.rate_limit().burst, 1.0);
        let c = Config {
            rate_limit_per_sec: 50.0,
            rate_limit_burst: 200,
            ..Config::default()
        };
        assert_eq!(c.rate_limit().burst, 200.0);
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let c = Config {
                rate_limit_per_sec: bad,
                ..Config::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
        let c = Config {
            request_topic: "a/+".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            max_tokens_per_user: 0,
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_tokens_per_user"), "{e}");
    }
}
