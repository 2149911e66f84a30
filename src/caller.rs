//! Caller API keys (docs/protocol.md#caller-keys-and-scopes, the worker's half of "only the backend may call it").
//!
//! Every frame carries a key in `key`. Keys have a name and a scope; several may be live at
//! once so they can be rotated. We keep only SHA-256 digests of the keys and compare a
//! presented key's digest with every configured one in constant time, without stopping at
//! the first match. Key values never reach a log line: `Debug` shows names only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::crypto::{random_bytes, sha256, write_secret_file};

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
    pub key: String,
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
/// name the item by position and name, never by its secret.
pub fn parse_caller_keys(text: &str) -> Result<Vec<CallerKeyConfig>, String> {
    let mut out = Vec::new();
    for (n, item) in text.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            continue;
        }
        let mut parts = item.splitn(3, ':');
        let (name, scope, key) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(scope), Some(key)) if !name.is_empty() && !key.is_empty() => {
                (name, scope, key)
            }
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
            key: key.to_owned(),
        });
    }
    Ok(out)
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
                .map(|c| (c.name.clone(), c.scope, sha256(c.key.as_bytes())))
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
/// Returns the key and whether it was just created.
pub fn load_or_create_admin_key(data_dir: &Path) -> std::io::Result<(CallerKeyConfig, bool)> {
    let path = admin_key_path(data_dir);
    let (key, created) = match std::fs::read_to_string(&path) {
        Ok(text) => (text.trim().to_owned(), false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = format!(
                "authd_admin_{}",
                URL_SAFE_NO_PAD.encode(random_bytes::<32>())
            );
            write_secret_file(&path, format!("{key}\n").as_bytes())?;
            (key, true)
        }
        Err(e) => return Err(e),
    };
    if key.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok((
        CallerKeyConfig {
            name: GENERATED_ADMIN_NAME.into(),
            scope: Scope::Admin,
            key,
        },
        created,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_items_parse_and_errors_hide_secrets() {
        let keys = parse_caller_keys("backend:service:s3cr:et, ops:admin:xyz").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            (keys[0].name.as_str(), keys[0].scope, keys[0].key.as_str()),
            ("backend", Scope::Service, "s3cr:et")
        );
        let err = parse_caller_keys("a:root:topsecret").unwrap_err();
        assert!(err.contains("root") && !err.contains("topsecret"), "{err}");
        assert!(parse_caller_keys("justsecret").is_err());
        assert!(!format!("{keys:?}").contains("xyz"));
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
