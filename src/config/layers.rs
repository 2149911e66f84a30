//! The layers above the file: `AUTHD_*` variables, then flags, both read key by key
//! through one path (`Config::apply_layer`), so a value means the same wherever it is set.

use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::{Config, ConfigError};
use crate::caller::parse_caller_keys;
use crate::secret::wipe_json;

/// A source of settings above the file, consulted key by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// `AUTHD_<KEY>` environment variables.
    Env,
    /// Command-line flags.
    Flags,
}

impl Layer {
    /// How an operator spells `key` in this layer: `AUTHD_MAX_IN_FLIGHT`, `--client-id`.
    pub fn name_of(self, key: &str) -> String {
        match (self, key) {
            (Layer::Env, "caller") => "AUTHD_CALLER_KEYS".into(),
            (Layer::Env, _) => format!("AUTHD_{}", key.to_uppercase()),
            (Layer::Flags, "caller") => "--caller-keys".into(),
            (Layer::Flags, _) => format!("--{}", key.replace('_', "-")),
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Env => "environment variable",
            Layer::Flags => "flag",
        })
    }
}

impl Config {
    /// The configuration in force: the defaults, overridden by `file`, by the `AUTHD_*`
    /// variables (read through `env`, by name), then by `flags`. Not yet validated: `serve`
    /// validates, `import` needs only the data directory.
    ///
    /// `flags` is anything that serializes to a table of configuration keys, such as the
    /// CLI's flag struct (its fields named as the keys); absent (`None`) flags are skipped.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &impl Serialize,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.apply_flags(flags)?;
        Ok(config)
    }

    /// Overlays `AUTHD_<KEY>` variables (read through `var`, by name) on every key. An empty
    /// variable counts as unset.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        self.apply_layer(Layer::Env, |key| {
            var(&Layer::Env.name_of(key)).filter(|v| !v.is_empty())
        })
    }

    /// Overlays flags: `flags` serializes to a table of keys (see [`Config::load`]). Each
    /// value is taken as the text a variable would hold, so flags and variables are read
    /// alike.
    pub fn apply_flags(&mut self, flags: &impl Serialize) -> Result<(), ConfigError> {
        let invalid = |e: serde_json::Error| ConfigError::Invalid(format!("flags: {e}"));
        // The flags may carry secrets (--caller-keys, --broker-password): wiped when done.
        let table = Wiped(serde_json::to_value(flags).map_err(invalid)?);
        let table = match &table.0 {
            Value::Object(table) => table,
            Value::Null => return Ok(()),
            _ => return Err(ConfigError::Invalid("flags: not a table of keys".into())),
        };
        self.apply_layer(Layer::Flags, |key| match table.get(key)? {
            Value::Null => None,
            Value::String(text) => Some(text.clone()),
            other => Some(other.to_string()),
        })
    }

    /// Overlays the value `lookup` gives for each key (`None`: not set in this layer). A
    /// value's type is the key's: whole numbers, numbers and `true`/`false` are parsed, the
    /// `caller` key is `name:scope:secret,…`, anything else is a string.
    ///
    /// The configuration goes through a JSON table, which holds copies of its secrets: every
    /// string of it that is not moved into the new configuration is wiped.
    fn apply_layer(
        &mut self,
        layer: Layer,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let mut table =
            Wiped(serde_json::to_value(&*self).map_err(|e| ConfigError::Invalid(e.to_string()))?);
        let Value::Object(map) = &mut table.0 else {
            return Err(ConfigError::Invalid("configuration is not a table".into()));
        };
        let mut changed = false;
        for (key, slot) in map.iter_mut() {
            let Some(text) = lookup(key).map(zeroize::Zeroizing::new) else {
                continue;
            };
            let value =
                parse_setting(key, slot, &text).map_err(|message| ConfigError::Setting {
                    layer,
                    name: layer.name_of(key),
                    message,
                })?;
            wipe_json(&mut std::mem::replace(slot, value));
            changed = true;
        }
        if changed {
            // Deserializing the owned table moves its strings into the configuration.
            let table = std::mem::take(&mut table.0);
            // Only enums and out-of-range numbers can still fail here (e.g.
            // AUTHD_LOG_FORMAT=xml); the error names the variable or flag.
            *self = serde_path_to_error::deserialize(table).map_err(|e| {
                let path = e.path().to_string();
                let key = path.split(['.', '[']).next().unwrap_or_default();
                ConfigError::Setting {
                    layer,
                    name: layer.name_of(key),
                    message: e.inner().to_string(),
                }
            })?;
        }
        Ok(())
    }
}

/// A JSON table that may hold secrets: its strings are wiped when it is dropped.
struct Wiped(Value);

impl Drop for Wiped {
    fn drop(&mut self) {
        wipe_json(&mut self.0);
    }
}

/// The value of `key` from its text in a variable or flag, typed as `current` is. Errors
/// say what was expected, never the value.
fn parse_setting(key: &str, current: &Value, text: &str) -> Result<Value, String> {
    if key == "caller" {
        let callers = parse_caller_keys(text)?;
        return serde_json::to_value(callers).map_err(|e| e.to_string());
    }
    Ok(match current {
        // A float key (rate_limit_per_sec) takes a fraction; the others whole numbers.
        Value::Number(n) if n.is_f64() => text
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .ok_or("expected a number")?
            .into(),
        Value::Number(_) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| "expected a whole number")?
            .into(),
        Value::Bool(_) => match text.trim() {
            "true" | "1" => true.into(),
            "false" | "0" => false.into(),
            _ => return Err("expected true or false".into()),
        },
        _ => text.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFormat;

    /// The variable of a key as the documentation states it (not as the code derives it).
    fn documented_variable(key: &str) -> String {
        match key {
            "caller" => "AUTHD_CALLER_KEYS".into(),
            _ => format!("AUTHD_{}", key.to_uppercase()),
        }
    }

    /// Every key `authd.example.toml` documents, set through its `AUTHD_*` variable to a
    /// valid value other than its default, takes effect.
    #[test]
    fn every_key_of_the_example_file_has_an_env_variable() {
        let example = include_str!("../../authd.example.toml");
        // Settings are `#key = value` lines; those after `#[[caller]]` belong to the tables.
        let (top, tables) = example
            .split_once("\n#[[caller]]")
            .expect("the example documents [[caller]]");
        let mut documented: Vec<&str> = top
            .lines()
            .filter_map(|l| l.strip_prefix('#')?.split_once(" = "))
            .map(|(key, _)| key)
            .filter(|key| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        assert!(tables.contains("#scope = "), "{tables}");
        documented.push("caller");
        documented.sort_unstable();

        let values: &[(&str, &str)] = &[
            ("broker", "mqtts://broker.example.com:8884"),
            ("broker_ca", "/etc/authd/ca.pem"),
            ("broker_cert", "/etc/authd/authd.crt"),
            ("broker_key", "/etc/authd/authd.key"),
            ("broker_password", "pw"),
            ("broker_username", "worker"),
            ("cache_mib", "16"),
            (
                "caller",
                "ops:admin:s3cret-0123456789,backend:service:k2-0123456789abcd",
            ),
            ("client_id", "authd-2"),
            ("data", "/var/lib/authd-2"),
            ("drain_secs", "3"),
            ("events", "false"),
            ("events_retention_secs", "600"),
            ("events_topic", "{id}/ev"),
            ("id", "svc"),
            ("keep_alive_secs", "31"),
            ("lockout_base_ms", "500"),
            ("lockout_failures", "6"),
            ("lockout_forget_secs", "120"),
            ("lockout_max_entries", "10"),
            ("lockout_max_secs", "60"),
            ("log_filter", "warn,authd::audit=info"),
            ("log_format", "json"),
            ("max_frame_bytes", "1000"),
            ("max_in_flight", "7"),
            ("max_packet_bytes", "2097152"),
            ("max_tokens_per_user", "50"),
            ("metrics", "127.0.0.1:9464"),
            ("rate_limit_burst", "4"),
            ("rate_limit_per_sec", "2.5"),
            ("replay_max_records", "5000"),
            ("replay_window_secs", "60"),
            ("reply_topic", "{src}/rpc2"),
            ("request_topic", "{id}/rpc2"),
            ("share_group", "authd"),
            ("store", "postgres://authd:pw@db:5432/authd"),
            ("store_pool", "4"),
            ("store_timeout_ms", "2500"),
            ("token_ttl_secs", "3600"),
        ];
        let keys: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, documented, "a test value for each documented key");

        let vars: std::collections::HashMap<String, &str> = values
            .iter()
            .map(|(key, value)| (documented_variable(key), *value))
            .collect();
        let mut c = Config::default();
        c.apply_env(|name| vars.get(name).map(|v| v.to_string()))
            .unwrap();
        c.validate().unwrap();
        let before = serde_json::to_value(Config::default()).unwrap();
        let after = serde_json::to_value(&c).unwrap();
        for (key, text) in values {
            let expected = match *key {
                "caller" => serde_json::to_value(parse_caller_keys(text).unwrap()).unwrap(),
                _ => serde_json::from_str::<Value>(text)
                    .ok()
                    .filter(|v| v.is_number() || v.is_boolean())
                    .unwrap_or_else(|| Value::String(text.to_string())),
            };
            assert_eq!(
                after[key],
                expected,
                "{} took effect",
                documented_variable(key)
            );
            assert_ne!(after[key], before[key], "{key}: not the default");
        }
        assert_eq!(c.rate_limit_per_sec, 2.5);
    }

    #[test]
    fn env_values_must_fit_their_key_and_empty_is_unset() {
        let refused = |name: &str, value: &str| {
            Config::default()
                .apply_env(|k| (k == name).then(|| value.to_string()))
                .unwrap_err()
                .to_string()
        };
        let e = refused("AUTHD_MAX_IN_FLIGHT", "lots");
        assert!(
            e.contains("AUTHD_MAX_IN_FLIGHT") && e.contains("whole number"),
            "{e}"
        );
        let e = refused("AUTHD_MAX_IN_FLIGHT", "2.5");
        assert!(e.contains("whole number"), "{e}");
        let e = refused("AUTHD_RATE_LIMIT_PER_SEC", "fast");
        assert!(
            e.contains("AUTHD_RATE_LIMIT_PER_SEC") && e.contains("a number"),
            "{e}"
        );
        assert!(refused("AUTHD_LOG_FORMAT", "xml").contains("AUTHD_LOG_FORMAT"));
        let e = refused("AUTHD_CALLER_KEYS", "ops:root:topsecret");
        assert!(
            e.contains("AUTHD_CALLER_KEYS")
                && e.contains("unknown scope")
                && !e.contains("topsecret"),
            "{e}"
        );
        let mut c = Config::default();
        c.apply_env(|k| (k == "AUTHD_BROKER_USERNAME").then(String::new))
            .unwrap();
        assert_eq!(c.broker_username, None, "empty counts as unset");
    }

    #[test]
    fn flags_go_through_the_same_path_above_the_environment() {
        #[derive(Default, Serialize)]
        struct Flags {
            id: Option<String>,
            max_in_flight: Option<usize>,
            rate_limit_per_sec: Option<f64>,
            log_format: Option<LogFormat>,
            #[serde(rename = "caller")]
            caller_keys: Option<String>,
            metrics: Option<String>,
        }
        let env = |name: &str| {
            match name {
                "AUTHD_ID" => Some("from-env"),
                "AUTHD_CLIENT_ID" => Some("client-from-env"),
                "AUTHD_MAX_IN_FLIGHT" => Some("3"),
                _ => None,
            }
            .map(String::from)
        };
        let flags = Flags {
            id: Some("from-flag".into()),
            max_in_flight: Some(9),
            rate_limit_per_sec: Some(0.5),
            log_format: Some(LogFormat::Json),
            caller_keys: Some("ops:admin:k1-0123456789abcd".into()),
            metrics: None,
        };
        let c = Config::load(None, env, &flags).unwrap();
        assert_eq!(c.id, "from-flag");
        assert_eq!(c.client_id, "client-from-env");
        assert_eq!(c.max_in_flight, 9);
        assert_eq!(c.rate_limit_per_sec, 0.5);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.callers.len(), 1);
        assert_eq!(c.metrics, None, "an absent flag leaves the key alone");

        let flags = Flags {
            caller_keys: Some("ops:root:topsecret".into()),
            ..Flags::default()
        };
        let e = Config::load(None, |_| None, &flags)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--caller-keys") && e.contains("unknown scope") && !e.contains("topsecret"),
            "{e}"
        );
    }
}
