//! Caller API keys (docs/protocol.md#caller-keys-and-scopes, the worker's half of "only the backend may call it").
//!
//! Every frame carries a key in `key`. Keys have a name and a scope; several may be live at
//! once so they can be rotated. We keep only SHA-256 digests of the keys (the configured
//! values are wiped once digested, [`Secret`]) and compare a presented key's digest with
//! every configured one in constant time, without stopping at the first match. Key values
//! never reach a log line: `Debug` shows names only. Keys that would weaken the gate (empty,
//! short, one secret under two names) are refused at start ([`check_caller_keys`]).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::crypto::{random_bytes, sha256, write_secret_file};
use crate::secret::Secret;

/// What a key may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The six Auth methods.
    Service,
    /// Everything, including provisioning (the admin methods).
    Admin,
}

impl Scope {
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Service => "service",
            Scope::Admin => "admin",
        }
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "service" => Ok(Scope::Service),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope `{other}` (expected `service` or `admin`)"
            )),
        }
    }
}

/// One configured key: a `[[caller]]` table or an `AUTHD_CALLER_KEYS` item.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallerKeyConfig {
    pub name: String,
    pub scope: Scope,
    /// Wiped when dropped; the worker keeps only its digest ([`CallerKeys`]).
    pub key: Secret,
}

impl fmt::Debug for CallerKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerKeyConfig")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Parses `name:scope:secret` items separated by commas (`AUTHD_CALLER_KEYS`). Errors
/// name the item by position and name, never by its secret. An empty secret parses (as
/// `name:scope:`) so that [`check_caller_keys`] refuses it by name.
pub fn parse_caller_keys(text: &str) -> Result<Vec<CallerKeyConfig>, String> {
    let mut out = Vec::new();
    for (n, item) in text.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            continue;
        }
        let mut parts = item.splitn(3, ':');
        let (name, scope, key) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(scope), Some(key)) if !name.is_empty() => (name, scope, key),
            _ => {
                return Err(format!(
                    "caller key item {} is not `name:scope:secret`",
                    n + 1
                ))
            }
        };
        let scope = scope
            .parse()
            .map_err(|e| format!("caller key `{name}`: {e}"))?;
        out.push(CallerKeyConfig {
            name: name.to_owned(),
            scope,
            key: key.into(),
        });
    }
    Ok(out)
}

/// Shortest caller key accepted, in bytes.
pub const MIN_CALLER_KEY_BYTES: usize = 16;

/// Refuses caller keys that would weaken the gate: a key without a name (or with a control
/// character in it), an empty key or one shorter than [`MIN_CALLER_KEY_BYTES`], the same
/// secret under two names (a caller would be taken for whichever comes last) or twice under
/// one, and one name with two scopes. Keys sharing a name and scope with different secrets
/// are allowed: that is how a key is rotated. Messages name a key by its name (or its
/// position when the name is the problem), never by its secret, nor say how long it is.
pub fn check_caller_keys(keys: &[CallerKeyConfig]) -> Result<(), String> {
    let mut secrets: HashMap<[u8; 32], &str> = HashMap::new();
    let mut scopes: HashMap<&str, Scope> = HashMap::new();
    for (n, key) in keys.iter().enumerate() {
        let name = key.name.as_str();
        if name.is_empty() {
            return Err(format!("caller key {} has an empty name", n + 1));
        }
        if name.chars().any(char::is_control) {
            return Err(format!(
                "caller key {}: its name has a control character",
                n + 1
            ));
        }
        if key.key.is_empty() {
            return Err(format!("caller key `{name}` is empty"));
        }
        if key.key.len() < MIN_CALLER_KEY_BYTES {
            return Err(format!(
                "caller key `{name}` is shorter than {MIN_CALLER_KEY_BYTES} bytes; use a long random secret (e.g. `openssl rand -base64 32`)"
            ));
        }
        if let Some(first) = secrets.insert(sha256(key.key.expose().as_bytes()), name) {
            return Err(if first == name {
                format!("caller key `{name}` is configured twice with the same secret")
            } else {
                format!(
                    "caller keys `{first}` and `{name}` have the same secret; give each its own"
                )
            });
        }
        match scopes.insert(name, key.scope) {
            Some(other) if other != key.scope => {
                return Err(format!(
                    "caller key name `{name}` is given with scopes `{}` and `{}`; keys sharing a name (rotation) must share its scope",
                    other.as_str(),
                    key.scope.as_str()
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The live caller keys, ready for constant-time lookup.
#[derive(Clone)]
pub struct CallerKeys {
    keys: Vec<(String, Scope, [u8; 32])>,
}

impl fmt::Debug for CallerKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|(n, s, _)| (n, s)))
            .finish()
    }
}

/// Who is calling: the matched key's name and scope.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub name: &'a str,
    pub scope: Scope,
}

impl CallerKeys {
    pub fn new(configs: &[CallerKeyConfig]) -> CallerKeys {
        CallerKeys {
            keys: configs
                .iter()
                .map(|c| (c.name.clone(), c.scope, sha256(c.key.expose().as_bytes())))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = (&str, Scope)> {
        self.keys.iter().map(|(n, s, _)| (n.as_str(), *s))
    }

    /// Finds the key presented, if it is one of ours. Every configured key is compared, so
    /// the time taken does not say which key (if any) matched.
    pub fn check(&self, presented: Option<&str>) -> Option<Caller<'_>> {
        let presented = presented?;
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        for (i, (_, _, hash)) in self.keys.iter().enumerate() {
            // No early exit: every key is compared whatever the outcome.
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(i);
            }
        }
        found.map(|i| {
            let (name, scope, _) = &self.keys[i];
            Caller {
                name,
                scope: *scope,
            }
        })
    }
}

/// Name given to the key generated on first start.
pub const GENERATED_ADMIN_NAME: &str = "generated-admin";

/// The quick-start admin key file in a data directory.
pub fn admin_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.key")
}

/// Loads the quick-start admin key, generating it (mode 0600) if there is none yet.
/// Returns the key and whether it was just created. A key file that group or others may read
/// is refused ([`crate::data_dir::read_private`]), and so is a key [`check_caller_keys`]
/// would refuse.
pub fn load_or_create_admin_key(data_dir: &Path) -> std::io::Result<(CallerKeyConfig, bool)> {
    let path = admin_key_path(data_dir);
    let failed = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("admin key file {}: {e}", path.display()))
    };
    let (key, created): (Secret, bool) = match crate::data_dir::read_private(&path) {
        Ok(text) => (text.trim().into(), false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let body = zeroize::Zeroizing::new(URL_SAFE_NO_PAD.encode(random_bytes::<32>()));
            let key = Secret::new(format!("authd_admin_{}", body.as_str()));
            let line = zeroize::Zeroizing::new(format!("{}\n", key.expose()));
            write_secret_file(&path, line.as_bytes()).map_err(failed)?;
            (key, true)
        }
        Err(e) => return Err(failed(e)),
    };
    let key = CallerKeyConfig {
        name: GENERATED_ADMIN_NAME.into(),
        scope: Scope::Admin,
        key,
    };
    check_caller_keys(std::slice::from_ref(&key))
        .map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    Ok((key, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_items_parse_and_errors_hide_secrets() {
        let keys = parse_caller_keys("backend:service:s3cr:et, ops:admin:xyz").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            (keys[0].name.as_str(), keys[0].scope, keys[0].key.expose()),
            ("backend", Scope::Service, "s3cr:et")
        );
        let err = parse_caller_keys("a:root:topsecret").unwrap_err();
        assert!(err.contains("root") && !err.contains("topsecret"), "{err}");
        assert!(parse_caller_keys("justsecret").is_err());
        assert!(!format!("{keys:?}").contains("xyz"));
    }

    #[test]
    fn weak_duplicate_and_ambiguous_keys_are_refused_by_name() {
        let check = |text: &str| check_caller_keys(&parse_caller_keys(text).unwrap());
        let long = "0123456789abcdef";
        check(&format!("a:service:{long}, b:admin:{long}x")).unwrap();
        // Rotation: one name, one scope, two secrets.
        check(&format!("a:service:{long}, a:service:{long}x")).unwrap();
        for (text, says) in [
            ("a:admin:".to_owned(), "caller key `a` is empty"),
            (
                "a:admin:0123456789abcde".to_owned(),
                "caller key `a` is shorter than 16 bytes",
            ),
            (
                format!("a:service:{long}, b:admin:{long}"),
                "caller keys `a` and `b` have the same secret",
            ),
            (
                format!("a:service:{long}, a:service:{long}"),
                "caller key `a` is configured twice with the same secret",
            ),
            (
                format!("a:service:{long}, a:admin:{long}x"),
                "caller key name `a` is given with scopes `service` and `admin`",
            ),
        ] {
            let e = check(&text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
            assert!(!e.contains("0123456789abcde"), "{e}");
        }
        let unnamed = CallerKeyConfig {
            name: String::new(),
            scope: Scope::Admin,
            key: long.into(),
        };
        assert!(check_caller_keys(&[unnamed])
            .unwrap_err()
            .contains("caller key 1"));
    }

    #[test]
    fn check_finds_the_right_key_and_scope() {
        let keys = CallerKeys::new(&parse_caller_keys("a:service:one,b:admin:two").unwrap());
        assert_eq!(
            keys.check(Some("one")).map(|c| (c.name, c.scope)),
            Some(("a", Scope::Service))
        );
        assert_eq!(
            keys.check(Some("two")).map(|c| (c.name, c.scope)),
            Some(("b", Scope::Admin))
        );
        assert!(keys.check(Some("three")).is_none());
        assert!(keys.check(Some("")).is_none());
        assert!(keys.check(None).is_none());
        assert!(Scope::Admin.allows(Scope::Service));
        assert!(!Scope::Service.allows(Scope::Admin));
    }

    #[test]
    fn admin_key_is_generated_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create_admin_key(dir.path()).unwrap();
        assert!(created);
        let (b, created) = load_or_create_admin_key(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(admin_key_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
