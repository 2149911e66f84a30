//! Server keys, keyed hashes, token derivation, constant-time comparison.
//!
//! The server key file holds one or more versioned 256-bit keys (`<id> <base64>` per line).
//! New tokens and hashes use the newest key and record its id; older keys still verify, so a
//! rotation appends a line and breaks nothing ([`rotate_key_file`], `authd key rotate`). The
//! file is created with mode 0600 on first start and is never stored in the database: a copy
//! of the database alone cannot produce a working token.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of every app token, so secret scanners can recognise a leaked one.
pub const TOKEN_PREFIX: &str = "authd_";

/// Length of the random part of a token (128 bits).
pub const TOKEN_ID_BYTES: usize = 16;

pub type KeyId = u32;
pub type TokenId = [u8; TOKEN_ID_BYTES];
/// The random input of a generated PSK.
pub type PskNonce = [u8; 16];

/// Fills a buffer from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS RNG failing is not something a security service can carry on from.
    getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
    buf
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// SHA-256 of a value; used to compare secrets of different lengths in constant time.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The server's secret keys, by version.
#[derive(Clone)]
pub struct ServerKeys {
    keys: BTreeMap<KeyId, [u8; 32]>,
}

impl fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("ServerKeys")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("server key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("server key file {path}, line {line}: expected `<id> <base64 of 32 bytes>`")]
    Format { path: String, line: usize },
    #[error("server key file {path} holds no key")]
    Empty { path: String },
    #[error(
        "server key file {path}: key id {id} is the largest possible; ids cannot grow further"
    )]
    IdsExhausted { path: String, id: KeyId },
}

impl ServerKeys {
    /// The server key file of a data directory.
    pub fn file_in(data: &Path) -> std::path::PathBuf {
        data.join("server.key")
    }

    /// Loads the key file, creating it with one fresh key (mode 0600) when it does not exist.
    /// A key file that group or others may read is refused ([`crate::data_dir::read_private`]).
    pub fn load_or_create(path: &Path) -> Result<ServerKeys, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.display().to_string(),
            source,
        };
        match crate::data_dir::read_private(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = random_bytes();
                let line = format!("1 {}\n", STANDARD.encode(key));
                write_secret_file(path, line.as_bytes()).map_err(io)?;
                Ok(ServerKeys {
                    keys: BTreeMap::from([(1, key)]),
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Loads an existing key file (no key is created). A key file that group or others may
    /// read is refused, as in [`ServerKeys::load_or_create`].
    pub fn load(path: &Path) -> Result<ServerKeys, KeyFileError> {
        let text = crate::data_dir::read_private(path).map_err(|source| KeyFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The ids of the loaded keys, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.keys().copied()
    }

    fn parse(text: &str, path: &Path) -> Result<ServerKeys, KeyFileError> {
        let mut keys = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || KeyFileError::Format {
                path: path.display().to_string(),
                line: n + 1,
            };
            let (id, b64) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let id: KeyId = id.parse().map_err(|_| bad())?;
            let key: [u8; 32] = STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or_else(bad)?;
            keys.insert(id, key);
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty {
                path: path.display().to_string(),
            });
        }
        Ok(ServerKeys { keys })
    }

    /// Keys for tests and benchmarks: one fixed key.
    pub fn for_tests() -> ServerKeys {
        ServerKeys {
            keys: BTreeMap::from([(1, [7u8; 32])]),
        }
    }

    /// The id of the key new writes use.
    pub fn newest(&self) -> KeyId {
        // A ServerKeys is never empty (enforced at construction).
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    fn mac(&self, key_id: KeyId, domain: &str, parts: &[&[u8]]) -> Option<[u8; 32]> {
        let key = self.keys.get(&key_id)?;
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).ok()?;
        mac.update(domain.as_bytes());
        for part in parts {
            // Length-prefixed, so no two different inputs hash the same bytes.
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        Some(mac.finalize().into_bytes().into())
    }

    /// Derives the app token for (user, host) from its id.
    pub fn token(
        &self,
        key_id: KeyId,
        token_id: &TokenId,
        user: &str,
        host: &str,
    ) -> Option<String> {
        let mac = self.mac(
            key_id,
            "authd/token/v1",
            &[token_id, user.as_bytes(), host.as_bytes()],
        )?;
        Some(format!(
            "{TOKEN_PREFIX}{key_id}.{}.{}",
            URL_SAFE_NO_PAD.encode(token_id),
            URL_SAFE_NO_PAD.encode(mac)
        ))
    }

    /// Checks a presented token against the (user, host) it is recorded for, in constant time.
    pub fn verify_token(&self, presented: &ParsedToken, user: &str, host: &str) -> bool {
        match self.mac(
            presented.key_id,
            "authd/token/v1",
            &[&presented.token_id, user.as_bytes(), host.as_bytes()],
        ) {
            Some(mac) => ct_eq(&mac, &presented.mac),
            None => false,
        }
    }

    /// Keyed hash of an entity's PSK (domain-separated from tokens).
    pub fn psk_hash(&self, key_id: KeyId, entity: &str, psk: &str) -> Option<[u8; 32]> {
        self.mac(key_id, "authd/psk/v1", &[entity.as_bytes(), psk.as_bytes()])
    }

    /// A PSK generated for `entity` (`Entity.Put {generate_psk: true}`): 256 bits derived from
    /// a random nonce and the server key, base64url. Only the nonce is ever recorded (in the
    /// replay record, so a redelivered request gets the same PSK); the entity record keeps
    /// the PSK's [`psk_hash`](Self::psk_hash).
    pub fn generated_psk(&self, key_id: KeyId, entity: &str, nonce: &PskNonce) -> Option<String> {
        let mac = self.mac(key_id, "authd/psk-gen/v1", &[entity.as_bytes(), nonce])?;
        Some(URL_SAFE_NO_PAD.encode(mac))
    }
}

/// The parts of a presented token string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken {
    pub key_id: KeyId,
    pub token_id: TokenId,
    pub mac: [u8; 32],
}

/// Splits `authd_<key id>.<b64url token id>.<b64url mac>`; `None` if it is not of that shape.
/// Only the canonical form parses, the one [`ServerKeys::token`] writes: the key id in
/// decimal without sign or leading zero, base64url without padding or stray bits. So a token
/// has one spelling, and `authd_01.…` is not another name for `authd_1.…`.
pub fn parse_token(token: &str) -> Option<ParsedToken> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let mut parts = rest.split('.');
    let key_id = parts.next()?;
    if key_id.is_empty()
        || key_id.len() > 10
        || !key_id.bytes().all(|b| b.is_ascii_digit())
        || (key_id.len() > 1 && key_id.starts_with('0'))
    {
        return None;
    }
    let key_id = key_id.parse().ok()?;
    let token_id = URL_SAFE_NO_PAD
        .decode(parts.next()?)
        .ok()?
        .try_into()
        .ok()?;
    let mac = URL_SAFE_NO_PAD
        .decode(parts.next()?)
        .ok()?
        .try_into()
        .ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(ParsedToken {
        key_id,
        token_id,
        mac,
    })
}

/// Adds a fresh key to the key file at `path` and returns its id (one more than the newest).
///
/// The file is rewritten whole, never edited in place: the old lines and the new one go to
/// `<path>.tmp` (created new, mode 0600, fsynced), which is then renamed over `path`, and the
/// directory is fsynced. A crash leaves either the old file or the new one, never half of
/// one. A leftover `<path>.tmp` (a crashed or concurrent rotation) stops the rotation rather
/// than be overwritten. The running worker keeps the keys it loaded: it writes with the new
/// key after a restart.
pub fn rotate_key_file(path: &Path) -> Result<KeyId, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let keys = ServerKeys::parse(&text, path)?;
    let newest = keys.newest();
    let id = newest
        .checked_add(1)
        .ok_or_else(|| KeyFileError::IdsExhausted {
            path: path.display().to_string(),
            id: newest,
        })?;
    let key: [u8; 32] = random_bytes();
    let mut contents = text;
    if !contents.is_empty() && !contents.ends_with('\n') {
        contents.push('\n');
    }
    contents.push_str(&format!("{id} {}\n", STANDARD.encode(key)));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    write_secret_file(&tmp, contents.as_bytes()).map_err(|source| KeyFileError::Io {
        path: tmp.display().to_string(),
        source,
    })?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    // The rename itself is durable only once the directory is.
    crate::durable::sync_parent(path).map_err(io)?;
    Ok(id)
}

/// Writes a new file readable by its owner only, and returns once it survives a power cut
/// (the file and its directory synced). Fails if the file exists.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    crate::durable::sync_parent(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bind_user_and_host() {
        let keys = ServerKeys::for_tests();
        let id: TokenId = random_bytes();
        let token = keys.token(1, &id, "alice", "app.example").unwrap();
        assert!(token.starts_with("authd_1."));
        let parsed = parse_token(&token).unwrap();
        assert_eq!(parsed.token_id, id);
        assert!(keys.verify_token(&parsed, "alice", "app.example"));
        assert!(!keys.verify_token(&parsed, "bob", "app.example"));
        assert!(!keys.verify_token(&parsed, "alice", "app.exampl"));
        // Length prefixes: moving a byte between user and host changes the token.
        assert!(!keys.verify_token(&parsed, "alicea", "pp.example"));
    }

    #[test]
    fn generated_psks_are_bound_to_entity_and_nonce() {
        let keys = ServerKeys::for_tests();
        let a = keys.generated_psk(1, "dev1", &[1; 16]).unwrap();
        assert_eq!(a.len(), 43, "256 bits, base64url without padding");
        assert_eq!(a, keys.generated_psk(1, "dev1", &[1; 16]).unwrap());
        assert_ne!(a, keys.generated_psk(1, "dev2", &[1; 16]).unwrap());
        assert_ne!(a, keys.generated_psk(1, "dev1", &[2; 16]).unwrap());
        assert!(keys.generated_psk(2, "dev1", &[1; 16]).is_none());
        // Domain separation: not the stored hash of anything.
        assert_ne!(
            URL_SAFE_NO_PAD.encode(keys.psk_hash(1, "dev1", "x").unwrap()),
            a
        );
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        for t in [
            "",
            "authd_",
            "authd_1.a.b",
            "x_1.AAAAAAAAAAAAAAAAAAAAAA.AAAA",
            "authd_-1.a.b",
            "authd_1...",
        ] {
            assert!(parse_token(t).is_none(), "{t}");
        }
    }

    #[test]
    fn only_the_canonical_key_id_parses() {
        let keys = ServerKeys::for_tests();
        let token = keys.token(1, &[7; 16], "alice", "app").unwrap();
        let rest = token.strip_prefix("authd_1").unwrap();
        assert!(parse_token(&token).is_some());
        for key_id in ["01", "0001", "+1", "00", " 1", "1 "] {
            let t = format!("authd_{key_id}{rest}");
            assert!(parse_token(&t).is_none(), "{t}");
        }
        // The token id's last character carries 4 unused bits: only zeros parse.
        let zeros = keys.token(1, &[0; 16], "alice", "app").unwrap();
        let stray = zeros.replacen("AAA.", "AAB.", 1);
        assert_ne!(stray, zeros);
        assert!(parse_token(&zeros).is_some());
        assert!(parse_token(&stray).is_none(), "{stray}");
    }

    #[test]
    fn key_file_is_created_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let a = ServerKeys::load_or_create(&path).unwrap();
        let b = ServerKeys::load_or_create(&path).unwrap();
        assert_eq!(a.keys, b.keys);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{a:?}").contains(&STANDARD.encode(a.keys[&1])));
    }

    #[test]
    fn rotation_appends_a_key_and_old_keys_still_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let before = ServerKeys::load_or_create(&path).unwrap();
        let id: TokenId = random_bytes();
        let old_token = before.token(1, &id, "alice", "app").unwrap();
        assert_eq!(rotate_key_file(&path).unwrap(), 2);
        assert_eq!(rotate_key_file(&path).unwrap(), 3);
        let after = ServerKeys::load(&path).unwrap();
        assert_eq!(after.ids().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(after.newest(), 3);
        assert_eq!(
            after.keys[&1], before.keys[&1],
            "old lines are kept as they were"
        );
        assert!(after.verify_token(&parse_token(&old_token).unwrap(), "alice", "app"));
        assert!(!dir.path().join("server.key.tmp").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A leftover temporary file stops a rotation instead of being clobbered.
        std::fs::write(dir.path().join("server.key.tmp"), "x").unwrap();
        assert!(rotate_key_file(&path).is_err());
        assert_eq!(ServerKeys::load(&path).unwrap().newest(), 3);
        // No key file: nothing to rotate (and none is made up).
        assert!(rotate_key_file(&dir.path().join("missing.key")).is_err());
        assert!(!dir.path().join("missing.key").exists());
    }
}
