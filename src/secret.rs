//! Secrets of the configuration (caller keys, the broker password) in memory: a [`Secret`]
//! wipes its bytes when it is dropped, and never shows them in `Debug`.
//!
//! The configuration is shared for the life of the worker, so the worker takes its secrets
//! out first ([`crate::config::Config::take_secrets`]): caller keys become digests and are
//! wiped; the broker password moves, uncopied, into the broker session's CONNECT packet,
//! which is sent at every reconnect (SECURITY.md, "Secrets in memory").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, Zeroizing};

/// A secret string, wiped (zeroize) when dropped. `Serialize` writes the value itself: the
/// configuration's layers round-trip through serde, and anything printed goes through
/// `Config::redacted` first.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    /// The value, for hashing or comparing it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Moves the value out for the one holder that must keep it as a plain `String` (the MQTT
    /// client's options): its bytes are not copied, and nothing is left here to wipe.
    pub fn into_inner(mut self) -> String {
        std::mem::take(&mut *self.0)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret::new(value.to_owned())
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(s.into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crate::config::REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        // From an owned value (the configuration's JSON layers) the string moves in uncopied.
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// Wipes every string in `value` (a configuration table that held secrets) before it is
/// dropped.
pub fn wipe_json(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe_json),
        Value::Object(map) => map.values_mut().for_each(wipe_json),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_value_and_serde_round_trips_it() {
        let s = Secret::from("hunter2-but-longer");
        assert_eq!(format!("{s:?}"), "<redacted>");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json, serde_json::json!("hunter2-but-longer"));
        assert_eq!(serde_json::from_value::<Secret>(json).unwrap(), s);
        assert_eq!(s.clone().into_inner(), "hunter2-but-longer");
    }

    #[test]
    fn wipe_json_empties_every_string() {
        let mut v = serde_json::json!({"a": "x", "b": [{"key": "y"}], "n": 1});
        wipe_json(&mut v);
        assert_eq!(v, serde_json::json!({"a": "", "b": [{"key": ""}], "n": 1}));
    }
}
