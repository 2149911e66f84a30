//! Entities: the devices and users that sign in with `Authenticate` (SPEC §4, §6).
//!
//! `entities` maps an id to its [`EntityRecord`]; `entity_owners` indexes ids by owner
//! (`lp(owner) ‖ id`) so that `Entity.List {owner}` reads only that owner's entities. Both
//! change together, in the transaction that records the request's reply.
//!
//! Entity records are a small binary layout, not JSON like the other records: `Authenticate`
//! decodes one per request, and decoding must be cheap and take the same time for every
//! record (an unknown id decodes a dummy record, so that existence does not show in timing).
//! Layout (integers big-endian):
//!
//! ```text
//! version = 1 (u8) | flags (u8: 1 psk, 2 cert, 4 disabled, 8 owner) | created (u64)
//! [psk key id (u32) | psk hash (32)] [cert sha256 (32)] [owner length (u16) | owner]
//! ```

use std::ops::Bound;

use super::{abort, lp, Replay, RequestKey, Store, StoreError};
use crate::crypto::KeyId;

/// An entity as stored. Holds no usable secret: the PSK is a keyed hash, the certificate a
/// fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRecord {
    /// Who owns it (a user id): owners may command their devices.
    pub owner: Option<String>,
    pub psk: Option<PskHash>,
    /// SHA-256 of the pinned certificate's DER encoding.
    pub cert_sha256: Option<[u8; 32]>,
    pub disabled: bool,
    /// UNIX seconds when the id was first created; kept when the entity is replaced.
    pub created: u64,
}

const VERSION: u8 = 1;
const HAS_PSK: u8 = 1;
const HAS_CERT: u8 = 2;
const DISABLED: u8 = 4;
const HAS_OWNER: u8 = 8;

impl EntityRecord {
    /// The stored form (see the module doc).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut flags = 0;
        let mut out =
            Vec::with_capacity(10 + 36 + 32 + self.owner.as_ref().map_or(0, |o| 2 + o.len()));
        out.extend_from_slice(&[VERSION, 0]);
        out.extend_from_slice(&self.created.to_be_bytes());
        if let Some(psk) = &self.psk {
            flags |= HAS_PSK;
            out.extend_from_slice(&psk.key_id.to_be_bytes());
            out.extend_from_slice(&psk.hash);
        }
        if let Some(fp) = &self.cert_sha256 {
            flags |= HAS_CERT;
            out.extend_from_slice(fp);
        }
        if self.disabled {
            flags |= DISABLED;
        }
        if let Some(owner) = &self.owner {
            flags |= HAS_OWNER;
            // Owners are names (at most 256 bytes): the length fits.
            out.extend_from_slice(&(owner.len() as u16).to_be_bytes());
            out.extend_from_slice(owner.as_bytes());
        }
        out[1] = flags;
        out
    }

    /// Reads the stored form.
    pub fn from_bytes(bytes: &[u8]) -> Result<EntityRecord, StoreError> {
        let bad = |detail: &str| StoreError::Corrupt {
            tree: "entities",
            detail: detail.to_owned(),
        };
        let mut r = Reader(bytes);
        let [version, flags] = r.take::<2>().ok_or_else(|| bad("truncated"))?;
        if version != VERSION {
            return Err(bad("unknown record version"));
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
            owner,
            psk,
            cert_sha256,
            disabled: flags & DISABLED != 0,
            created,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

/// `ServerKeys::psk_hash` of an entity's PSK and the key it was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskHash {
    pub key_id: KeyId,
    pub hash: [u8; 32],
}

/// What one server key is still used for ([`Store::key_usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyUsage {
    /// Entities whose PSK is hashed under this key.
    pub psk_hashes: u64,
    /// Live app tokens made with this key.
    pub tokens: u64,
}

/// What [`Store::put_entity`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
    /// `create_only` and the id exists: nothing was written.
    Exists,
}

/// One page of [`Store::list_entities`].
#[derive(Debug, Default)]
pub struct EntityPage {
    /// In id order.
    pub entities: Vec<(String, EntityRecord)>,
    /// More entities match after the last one.
    pub more: bool,
}

impl Store {
    /// The entity `id`. The `Authenticate` hot path: one sled read.
    pub fn entity(&self, id: &str) -> Result<Option<EntityRecord>, StoreError> {
        match self.entities.get(id.as_bytes())? {
            None => Ok(None),
            Some(v) => EntityRecord::from_bytes(&v).map(Some),
        }
    }

    /// Replaces the PSK hash of entity `id` with `psk` if the record is still exactly `seen`
    /// (compare-and-swap); returns whether it did. `Authenticate` uses it to move a PSK that
    /// was hashed under an older server key to the newest one after checking it. Not a
    /// transaction and no replay record: nobody asked for this change, and losing it (a
    /// concurrent `Entity.Put`, a crash before sled's background flush) loses nothing — the
    /// old hash still verifies and the next sign-in tries again.
    pub fn replace_psk_hash(
        &self,
        id: &str,
        seen: &EntityRecord,
        psk: PskHash,
    ) -> Result<bool, StoreError> {
        let new = EntityRecord {
            psk: Some(psk),
            ..seen.clone()
        };
        let swapped = self.entities.compare_and_swap(
            id.as_bytes(),
            Some(seen.to_bytes()),
            Some(new.to_bytes()),
        )?;
        Ok(swapped.is_ok())
    }

    /// How many PSK hashes and live app tokens were made with each server key: what still
    /// needs a key before it can be removed from the key file. A full scan (operators only).
    pub fn key_usage(&self) -> Result<std::collections::BTreeMap<KeyId, KeyUsage>, StoreError> {
        let mut usage = std::collections::BTreeMap::<KeyId, KeyUsage>::new();
        for item in self.entities.iter() {
            let (_, v) = item?;
            if let Some(psk) = EntityRecord::from_bytes(&v)?.psk {
                usage.entry(psk.key_id).or_default().psk_hashes += 1;
            }
        }
        for item in self.tokens.iter() {
            let (_, v) = item?;
            let token: super::TokenRecord = super::decode("tokens", &v)?;
            usage.entry(token.key_id).or_default().tokens += 1;
        }
        Ok(usage)
    }

    /// Creates or replaces the entity `id` and records the reply for `request`. A replaced
    /// entity keeps its `created` time. With `create_only`, an existing id is left alone
    /// ([`PutOutcome::Exists`]) and no reply is recorded.
    pub fn put_entity(
        &self,
        id: &str,
        record: &EntityRecord,
        create_only: bool,
        request: &RequestKey<'_>,
        reply: &Replay,
    ) -> Result<PutOutcome, StoreError> {
        let replay = self.replay_entry(request, reply);
        let (id, record) = (id.to_owned(), record.clone());
        self.transact(move |tx| {
            let id = id.as_str();
            let old = match tx.entities.get(id.as_bytes())? {
                Some(v) => Some(EntityRecord::from_bytes(&v).map_err(abort)?),
                None => None,
            };
            let mut new = record.clone();
            if let Some(old) = &old {
                if create_only {
                    return Ok(PutOutcome::Exists);
                }
                new.created = old.created;
                if let Some(owner) = &old.owner {
                    tx.entity_owners.remove(owner_key(owner, id))?;
                }
            }
            if let Some(owner) = &new.owner {
                tx.entity_owners.insert(owner_key(owner, id), &[][..])?;
            }
            tx.entities.insert(id.as_bytes(), new.to_bytes())?;
            tx.put_replay(&replay)?;
            Ok(if old.is_some() {
                PutOutcome::Replaced
            } else {
                PutOutcome::Created
            })
        })
    }

    /// Removes the entity `id` and every app token issued to user `id`, and records the reply
    /// for `request`. Returns whether the entity existed and how many tokens went.
    pub fn delete_entity(
        &self,
        id: &str,
        request: &RequestKey<'_>,
        reply: &Replay,
    ) -> Result<(bool, usize), StoreError> {
        // sled transactions cannot scan, so the user's token keys are read first. A token
        // generated between this scan and the transaction is one issued after the delete,
        // which a user id (not necessarily an entity) may legitimately hold.
        let token_keys = self
            .tokens
            .scan_prefix(lp(id))
            .keys()
            .collect::<Result<Vec<_>, _>>()?;
        let replay = self.replay_entry(request, reply);
        let id = id.to_owned();
        self.transact(move |tx| {
            let id = id.as_str();
            let existed = match tx.entities.remove(id.as_bytes())? {
                Some(v) => {
                    let old = EntityRecord::from_bytes(&v).map_err(abort)?;
                    if let Some(owner) = &old.owner {
                        tx.entity_owners.remove(owner_key(owner, id))?;
                    }
                    true
                }
                None => false,
            };
            let mut tokens = 0;
            for key in &token_keys {
                if let Some(old) = tx.tokens.remove(&key[..])? {
                    let old: super::TokenRecord = super::decode("tokens", &old).map_err(abort)?;
                    tx.token_ids.remove(&old.token_id[..])?;
                    tokens += 1;
                }
            }
            tx.put_replay(&replay)?;
            Ok((existed, tokens))
        })
    }

    /// Up to `limit` entities in id order whose id starts with `prefix` and sorts after
    /// `after`, optionally only those of `owner`.
    pub fn list_entities(
        &self,
        owner: Option<&str>,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EntityPage, StoreError> {
        let (tree, base) = match owner {
            Some(owner) => (&self.entity_owners, lp(owner)),
            None => (&self.entities, Vec::new()),
        };
        let mut first = base.clone();
        first.extend_from_slice(prefix.as_bytes());
        let start = match after {
            Some(after) if after.as_bytes() >= prefix.as_bytes() => {
                let mut k = base.clone();
                k.extend_from_slice(after.as_bytes());
                Bound::Excluded(k)
            }
            _ => Bound::Included(first.clone()),
        };
        let mut page = EntityPage::default();
        for item in tree.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (key, value) = item?;
            if !key.starts_with(&first) {
                break;
            }
            if page.entities.len() == limit {
                page.more = true;
                break;
            }
            let id = std::str::from_utf8(&key[base.len()..])
                .map_err(|e| super::corrupt("entities", e))?
                .to_owned();
            let record = if owner.is_some() {
                match self.entity(&id)? {
                    Some(r) => r,
                    // The index and the records change in one transaction; a miss here is
                    // an entity deleted since the index was read.
                    None => continue,
                }
            } else {
                EntityRecord::from_bytes(&value)?
            };
            page.entities.push((id, record));
        }
        Ok(page)
    }
}

fn owner_key(owner: &str, id: &str) -> Vec<u8> {
    let mut k = lp(owner);
    k.extend_from_slice(id.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TokenRecord;

    fn req(id: u64) -> RequestKey<'static> {
        RequestKey {
            src: "ops",
            id,
            at_ms: 1,
            record_reply: true,
        }
    }

    fn entity(owner: Option<&str>, created: u64) -> EntityRecord {
        EntityRecord {
            owner: owner.map(str::to_owned),
            psk: None,
            cert_sha256: Some([9; 32]),
            disabled: false,
            created,
        }
    }

    fn ids(page: &EntityPage) -> Vec<&str> {
        page.entities.iter().map(|(id, _)| id.as_str()).collect()
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let full = EntityRecord {
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
            owner: None,
            psk: None,
            cert_sha256: None,
            disabled: false,
            created: 0,
        };
        for r in [&full, &empty] {
            assert_eq!(&EntityRecord::from_bytes(&r.to_bytes()).unwrap(), r);
        }
        let bytes = full.to_bytes();
        for cut in 0..bytes.len() {
            assert!(EntityRecord::from_bytes(&bytes[..cut]).is_err(), "{cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(EntityRecord::from_bytes(&longer).is_err());
        let mut other_version = bytes;
        other_version[0] = 2;
        assert!(EntityRecord::from_bytes(&other_version).is_err());
    }

    #[test]
    fn put_keeps_created_and_moves_the_owner_index() {
        let s = Store::temporary().unwrap();
        let put = |id, r: &EntityRecord, create_only, n| {
            s.put_entity(id, r, create_only, &req(n), &Replay::Empty)
                .unwrap()
        };
        assert_eq!(
            put("d1", &entity(Some("alice"), 10), true, 1),
            PutOutcome::Created
        );
        assert_eq!(
            put("d1", &entity(Some("bob"), 20), true, 2),
            PutOutcome::Exists
        );
        assert_eq!(
            s.entity("d1").unwrap().unwrap().owner.as_deref(),
            Some("alice")
        );
        assert_eq!(
            put("d1", &entity(Some("bob"), 20), false, 3),
            PutOutcome::Replaced
        );
        let d1 = s.entity("d1").unwrap().unwrap();
        assert_eq!((d1.owner.as_deref(), d1.created), (Some("bob"), 10));
        assert!(s
            .list_entities(Some("alice"), "", None, 10)
            .unwrap()
            .entities
            .is_empty());
        assert_eq!(
            ids(&s.list_entities(Some("bob"), "", None, 10).unwrap()),
            ["d1"]
        );
    }

    #[test]
    fn listing_pages_by_prefix_owner_and_after() {
        let s = Store::temporary().unwrap();
        for (n, (id, owner)) in [
            ("a1", Some("o")),
            ("b1", Some("o")),
            ("b2", None),
            ("b3", Some("o")),
            ("c1", Some("o")),
        ]
        .into_iter()
        .enumerate()
        {
            s.put_entity(id, &entity(owner, 1), false, &req(n as u64), &Replay::Empty)
                .unwrap();
        }
        let page = s.list_entities(None, "", None, 2).unwrap();
        assert_eq!((ids(&page), page.more), (vec!["a1", "b1"], true));
        let page = s.list_entities(None, "", Some("b1"), 2).unwrap();
        assert_eq!((ids(&page), page.more), (vec!["b2", "b3"], true));
        let page = s.list_entities(None, "", Some("b3"), 2).unwrap();
        assert_eq!((ids(&page), page.more), (vec!["c1"], false));
        let page = s.list_entities(None, "b", None, 10).unwrap();
        assert_eq!((ids(&page), page.more), (vec!["b1", "b2", "b3"], false));
        // `after` before the prefix starts at the prefix.
        let page = s.list_entities(None, "b", Some("a9"), 2).unwrap();
        assert_eq!((ids(&page), page.more), (vec!["b1", "b2"], true));
        let page = s.list_entities(Some("o"), "b", None, 10).unwrap();
        assert_eq!(ids(&page), ["b1", "b3"]);
        let page = s.list_entities(Some("o"), "", Some("b1"), 2).unwrap();
        assert_eq!((ids(&page), page.more), (vec!["b3", "c1"], false));
        // An owner whose name is a prefix of another's sees only its own.
        assert!(s
            .list_entities(Some(""), "", None, 10)
            .unwrap()
            .entities
            .is_empty());
    }

    #[test]
    fn delete_removes_the_entity_its_index_and_its_tokens_only() {
        let s = Store::temporary().unwrap();
        s.put_entity("d1", &entity(Some("o"), 1), false, &req(1), &Replay::Empty)
            .unwrap();
        let token = |n: u8| TokenRecord {
            token_id: [n; 16],
            key_id: 1,
            created: 1,
        };
        s.replace_token("d1", "h1", &token(1), &req(2), &Replay::Empty)
            .unwrap();
        s.replace_token("d1", "h2", &token(2), &req(3), &Replay::Empty)
            .unwrap();
        s.replace_token("d10", "h1", &token(3), &req(4), &Replay::Empty)
            .unwrap();
        assert_eq!(
            s.delete_entity("d1", &req(5), &Replay::Empty).unwrap(),
            (true, 2)
        );
        assert_eq!(s.entity("d1").unwrap(), None);
        assert!(s.tokens_of("d1").unwrap().is_empty());
        assert_eq!(s.token_owner(&[1; 16]).unwrap(), None);
        assert_eq!(s.tokens_of("d10").unwrap().len(), 1);
        assert!(s
            .list_entities(Some("o"), "", None, 10)
            .unwrap()
            .entities
            .is_empty());
        assert_eq!(
            s.delete_entity("d1", &req(6), &Replay::Empty).unwrap(),
            (false, 0)
        );
    }
}
