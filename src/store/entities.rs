//! Entities: the devices and users that sign in with `Authenticate` (SPEC §4, §6).
//!
//! `entities` maps an id to its [`EntityRecord`]; `entity_owners` indexes ids by owner
//! (`lp(owner) ‖ id`) so that `Entity.List {owner}` reads only that owner's entities. Both
//! change together, in the transaction that records the request's reply.

use std::ops::Bound;

use serde::{Deserialize, Serialize};

use super::{abort, decode, encode, lp, Replay, RequestKey, Store, StoreError};
use crate::crypto::KeyId;

/// An entity as stored. Holds no usable secret: the PSK is a keyed hash, the certificate a
/// fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityRecord {
    /// Who owns it (a user id): owners may command their devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<PskHash>,
    /// SHA-256 of the pinned certificate's DER encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<[u8; 32]>,
    #[serde(default)]
    pub disabled: bool,
    /// UNIX seconds when the id was first created; kept when the entity is replaced.
    pub created: u64,
}

/// `ServerKeys::psk_hash` of an entity's PSK and the key it was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PskHash {
    pub key_id: KeyId,
    pub hash: [u8; 32],
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
            Some(v) => decode("entities", &v).map(Some),
        }
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
        self.transact(|tx| {
            let old = match tx.entities.get(id.as_bytes())? {
                Some(v) => Some(decode::<EntityRecord>("entities", &v).map_err(abort)?),
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
            tx.entities.insert(id.as_bytes(), encode(&new))?;
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
        self.transact(|tx| {
            let existed = match tx.entities.remove(id.as_bytes())? {
                Some(v) => {
                    let old: EntityRecord = decode("entities", &v).map_err(abort)?;
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
                    let old: super::TokenRecord = decode("tokens", &old).map_err(abort)?;
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
                decode("entities", &value)?
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
