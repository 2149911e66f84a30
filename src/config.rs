//! Configuration: defaults, then a TOML file, then `AUTHD_*` environment variables, then
//! command-line flags — each later source overrides the earlier ones. With no file at all,
//! `authd serve` runs against `mqtt://127.0.0.1:1883` with a store in the user's data dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::caller::CallerKeyConfig;
use crate::lockout::LockoutPolicy;
use crate::ratelimit::RatePolicy;

/// The Mongoose OS cloud's service address, the default `src` of every response.
pub const DEFAULT_SERVICE_ID: &str = "//api.mongoose-iot.com";
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";

/// Everything `authd serve` needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `mqtt://HOST[:PORT]`.
    pub broker: String,
    /// Broker account (optional).
    pub broker_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_password: Option<String>,
    /// MQTT client id. Fixed, so the broker keeps our session (and queued requests) while we
    /// are away. Two workers must not share one.
    pub client_id: String,
    /// Directory of the sled database, the server key and the generated admin key.
    pub data: PathBuf,
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
    /// sled page cache, MiB.
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
    /// Caller keys (`[[caller]]` tables). Empty: a generated admin key is used.
    #[serde(rename = "caller")]
    pub callers: Vec<CallerKeyConfig>,
    /// Per-caller rate limit: sustained requests per second per caller key name (429 beyond
    /// it); 0 turns it off.
    pub rate_limit_per_sec: f64,
    /// Requests a caller may send at once; 0 means `rate_limit_per_sec` (at least 1).
    pub rate_limit_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker: DEFAULT_BROKER.into(),
            broker_username: None,
            broker_password: None,
            client_id: "authd".into(),
            data: default_data_dir(),
            id: DEFAULT_SERVICE_ID.into(),
            request_topic: "{id}/rpc".into(),
            reply_topic: "{src}/rpc".into(),
            max_frame_bytes: 64 * 1024,
            max_packet_bytes: 1024 * 1024,
            max_in_flight: 1024,
            replay_window_secs: 600,
            cache_mib: 64,
            keep_alive_secs: 30,
            drain_secs: 10,
            lockout_failures: 5,
            lockout_base_ms: 1000,
            lockout_max_secs: 15 * 60,
            lockout_forget_secs: 60 * 60,
            lockout_max_entries: 100_000,
            callers: Vec::new(),
            rate_limit_per_sec: 0.0,
            rate_limit_burst: 0,
        }
    }
}

/// The per-user data directory (`$XDG_DATA_HOME/authd`, `~/.local/share/authd`), or
/// `./authd-data` where there is no home.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("authd"))
        .unwrap_or_else(|| PathBuf::from("authd-data"))
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
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
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

    /// The resolved request topic.
    pub fn request_topic(&self) -> String {
        self.request_topic.replace("{id}", &self.id)
    }

    /// The reply topic for a caller (`src` already validated).
    pub fn reply_topic(&self, src: &str) -> String {
        self.reply_topic.replace("{src}", src)
    }

    pub fn replay_window(&self) -> Duration {
        Duration::from_secs(self.replay_window_secs)
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
        if self.max_frame_bytes == 0 || self.max_packet_bytes < self.max_frame_bytes {
            return invalid(
                "max_frame_bytes must be at least 1 and at most max_packet_bytes".into(),
            );
        }
        if self.max_in_flight == 0 {
            return invalid("max_in_flight must be at least 1".into());
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
        if !self.rate_limit_per_sec.is_finite() || self.rate_limit_per_sec < 0.0 {
            return invalid(
                "rate_limit_per_sec must be a number of at least 0 (0 turns the limit off)".into(),
            );
        }
        BrokerAddress::parse(&self.broker)?;
        Ok(())
    }

    /// The configuration with every secret replaced, for `--print-config` and logs.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if c.broker_password.is_some() {
            c.broker_password = Some("<redacted>".into());
        }
        for caller in &mut c.callers {
            caller.key = "<redacted>".into();
        }
        c
    }
}

/// A parsed `--broker` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
}

impl BrokerAddress {
    pub fn parse(url: &str) -> Result<BrokerAddress, ConfigError> {
        let bad = |why: &str| ConfigError::Invalid(format!("broker `{url}`: {why}"));
        let rest = if let Some(rest) = url.strip_prefix("mqtt://") {
            rest
        } else if url.starts_with("mqtts://") {
            return Err(bad("TLS (mqtts://) is not supported by this build yet"));
        } else {
            return Err(bad("expected mqtt://HOST[:PORT]"));
        };
        let rest = rest.trim_end_matches('/');
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| bad("port must be a number 1-65535"))
        };
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            match after.strip_prefix(':') {
                Some(p) => (h, port(p)?),
                None if after.is_empty() => (h, 1883),
                None => return Err(bad("expected mqtt://[IPV6]:PORT")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, port(p)?),
                None => (rest, 1883),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad("expected mqtt://HOST[:PORT]"));
        }
        Ok(BrokerAddress {
            host: host.to_owned(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = BrokerAddress::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 1884));
        assert_eq!(BrokerAddress::parse("mqtt://broker").unwrap().port, 1883);
        assert_eq!(BrokerAddress::parse("mqtt://[::1]:99").unwrap().host, "::1");
        assert!(BrokerAddress::parse("tcp://x").is_err());
        assert!(BrokerAddress::parse("mqtt://x:notaport").is_err());
        assert!(BrokerAddress::parse("mqtt://").is_err());
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
        std::fs::write(&path, "idd = \"svc\"\n").unwrap();
        assert!(Config::from_file(&path).is_err());
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
    }
}
