//! How records and their keys are laid out in sled's trees.
//!
//! Keys are binary; a string inside a compound key is length-prefixed ([`lp`]) so that
//! `("ab", "c")` and `("a", "bc")` stay apart. Values are JSON, except entity records, which
//! have a small fixed binary layout: `Authenticate` decodes one per request, and decoding must
//! be cheap and take the same time for every record (an unknown id decodes a dummy record, so
//! that existence does not show in timing). Entity layout (integers big-endian):
//!
//! ```text
//! version = 1 (u8) | flags (u8: 1 psk, 2 cert, 4 disabled, 8 owner, 16 user) | created (u64)
//! [psk key id (u32) | psk hash (32)] [cert sha256 (32)] [owner length (u16) | owner]
//! ```
//!
//! Flag 16 (the entity is a user; without it, a device) came with schema 2. A schema-1
//! record never has it, so it reads as a device unchanged: the upgrade rewrites no entity.
//! Any other flag bit is refused as damage.

use serde::{Deserialize, Serialize};

use crate::crypto::KeyId;
use crate::store::records::{EntityKind, EntityRecord, PskHash, StoreError};

/// Length-prefixed string: the prefix keeps `("ab","c")` and `("a","bc")` apart.
pub fn lp(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + s.len());
    // Names are at most 256 bytes: the length fits.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

/// `lp(a) ‖ b`: the key of a record that belongs to `a` (a user's token for a host, an
/// owner's entity).
pub fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut k = lp(a);
    k.extend_from_slice(b.as_bytes());
    k
}

/// The two strings of a [`pair_key`].
pub fn split_pair_key(k: &[u8], what: &'static str) -> Result<(String, String), StoreError> {
    let bad = || StoreError::corrupt(what, "bad compound key");
    let (len, rest) = k.split_first_chunk::<2>().ok_or_else(bad)?;
    let len = u16::from_be_bytes(*len) as usize;
    let (a, b) = (rest.get(..len).ok_or_else(bad)?, &rest[len..]);
    Ok((
        String::from_utf8(a.to_vec()).map_err(|_| bad())?,
        String::from_utf8(b.to_vec()).map_err(|_| bad())?,
    ))
}

/// The key of a request's replay record: `lp(src) ‖ id`.
pub fn replay_key(src: &str, id: u64) -> Vec<u8> {
    let mut k = lp(src);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// A big-endian u64 (rule ids, counters).
pub fn u64_of(bytes: &[u8], what: &'static str) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::corrupt(what, "not an 8-byte number"))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our records are plain structs: serializing them cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(what, e))
}

const VERSION: u8 = 1;
const HAS_PSK: u8 = 1;
const HAS_CERT: u8 = 2;
const DISABLED: u8 = 4;
const HAS_OWNER: u8 = 8;
const USER: u8 = 16;
const KNOWN_FLAGS: u8 = HAS_PSK | HAS_CERT | DISABLED | HAS_OWNER | USER;

/// A stored device with a PSK and a pinned certificate, all zeros: decoded for an unknown
/// id, so that an unknown id costs what a known one does (the kind is one flag bit, read the
/// same way for either kind).
pub const DUMMY_ENTITY: [u8; 78] = {
    let mut r = [0u8; 78];
    r[0] = VERSION;
    r[1] = HAS_PSK | HAS_CERT;
    r
};

/// The stored form of an entity (see the module doc).
pub fn entity_to_bytes(e: &EntityRecord) -> Vec<u8> {
    let mut flags = 0;
    let mut out = Vec::with_capacity(10 + 36 + 32 + e.owner.as_ref().map_or(0, |o| 2 + o.len()));
    out.extend_from_slice(&[VERSION, 0]);
    out.extend_from_slice(&e.created.to_be_bytes());
    if let Some(psk) = &e.psk {
        flags |= HAS_PSK;
        out.extend_from_slice(&psk.key_id.to_be_bytes());
        out.extend_from_slice(&psk.hash);
    }
    if let Some(fp) = &e.cert_sha256 {
        flags |= HAS_CERT;
        out.extend_from_slice(fp);
    }
    if e.disabled {
        flags |= DISABLED;
    }
    if e.kind == EntityKind::User {
        flags |= USER;
    }
    if let Some(owner) = &e.owner {
        flags |= HAS_OWNER;
        // Owners are names (at most 256 bytes): the length fits.
        out.extend_from_slice(&(owner.len() as u16).to_be_bytes());
        out.extend_from_slice(owner.as_bytes());
    }
    out[1] = flags;
    out
}

/// Reads the stored form of an entity.
pub fn entity_from_bytes(bytes: &[u8]) -> Result<EntityRecord, StoreError> {
    let bad = |detail: &str| StoreError::corrupt("entities", detail);
    let mut r = Reader(bytes);
    let [version, flags] = r.take::<2>().ok_or_else(|| bad("truncated"))?;
    if version != VERSION {
        return Err(bad("unknown record version"));
    }
    if flags & !KNOWN_FLAGS != 0 {
        return Err(bad("unknown flags"));
    }
    let created = u64::from_be_bytes(r.take().ok_or_else(|| bad("truncated"))?);
    let psk = if flags & HAS_PSK != 0 {
        let key_id = KeyId::from_be_bytes(r.take().ok_or_else(|| bad("truncated"))?);
        let hash = r.take().ok_or_else(|| bad("truncated"))?;
        Some(PskHash { key_id, hash })
    } else {
        None
    };
    let cert_sha256 = if flags & HAS_CERT != 0 {
        Some(r.take().ok_or_else(|| bad("truncated"))?)
    } else {
        None
    };
    let owner = if flags & HAS_OWNER != 0 {
        let len = u16::from_be_bytes(r.take().ok_or_else(|| bad("truncated"))?) as usize;
        let owner = r.0.get(..len).ok_or_else(|| bad("truncated"))?;
        r.0 = &r.0[len..];
        Some(
            std::str::from_utf8(owner)
                .map_err(|_| bad("owner is not UTF-8"))?
                .to_owned(),
        )
    } else {
        None
    };
    if !r.0.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(EntityRecord {
        kind: if flags & USER != 0 {
            EntityKind::User
        } else {
            EntityKind::Device
        },
        owner,
        psk,
        cert_sha256,
        disabled: flags & DISABLED != 0,
        created,
    })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dummy_entity_is_an_entity_with_psk_and_cert() {
        let r = entity_from_bytes(&DUMMY_ENTITY).unwrap();
        assert!(r.psk.is_some() && r.cert_sha256.is_some());
        assert_eq!(r.kind, EntityKind::Device);
    }

    /// A record as schema 1 wrote it (no kind flag) reads as a device, and the kind is the
    /// only difference a user makes on disk.
    #[test]
    fn a_schema_1_record_is_a_device() {
        let mut v1 = vec![1, HAS_PSK | HAS_OWNER];
        v1.extend_from_slice(&1_700_000_000u64.to_be_bytes());
        v1.extend_from_slice(&7u32.to_be_bytes());
        v1.extend_from_slice(&[3; 32]);
        v1.extend_from_slice(&5u16.to_be_bytes());
        v1.extend_from_slice(b"alice");
        let r = entity_from_bytes(&v1).unwrap();
        assert_eq!(r.kind, EntityKind::Device);
        assert_eq!(r.owner.as_deref(), Some("alice"));
        assert_eq!(entity_to_bytes(&r), v1, "written back byte for byte");
        let user = entity_to_bytes(&EntityRecord {
            kind: EntityKind::User,
            ..r
        });
        assert_eq!(user[1], v1[1] | USER);
        assert_eq!(user[2..], v1[2..]);
        let mut unknown = v1;
        unknown[1] |= 32;
        assert!(entity_from_bytes(&unknown).is_err());
    }

    #[test]
    fn entity_records_round_trip_and_damage_is_refused() {
        let full = EntityRecord {
            kind: EntityKind::User,
            owner: Some("alice".into()),
            psk: Some(PskHash {
                key_id: 7,
                hash: [3; 32],
            }),
            cert_sha256: Some([4; 32]),
            disabled: true,
            created: 1_700_000_000,
        };
        let empty = EntityRecord {
            kind: EntityKind::Device,
            owner: None,
            psk: None,
            cert_sha256: None,
            disabled: false,
            created: 0,
        };
        for r in [&full, &empty] {
            assert_eq!(&entity_from_bytes(&entity_to_bytes(r)).unwrap(), r);
        }
        let bytes = entity_to_bytes(&full);
        for cut in 0..bytes.len() {
            assert!(entity_from_bytes(&bytes[..cut]).is_err(), "{cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(entity_from_bytes(&longer).is_err());
        let mut other_version = bytes;
        other_version[0] = 2;
        assert!(entity_from_bytes(&other_version).is_err());
    }

    #[test]
    fn pair_keys_keep_their_boundary() {
        assert_ne!(pair_key("ab", "c"), pair_key("a", "bc"));
        assert_eq!(
            split_pair_key(&pair_key("ab", "c"), "t").unwrap(),
            ("ab".to_owned(), "c".to_owned())
        );
        assert!(split_pair_key(&[0, 9, b'a'], "t").is_err());
    }
}
