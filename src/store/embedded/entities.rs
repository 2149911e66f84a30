//! Entities: `entities` maps an id to its record (binary, see `encoding`); `entity_owners`
//! indexes ids by owner (`lp(owner) ‖ id`) so that listing an owner's entities reads only
//! those. Both change together, in the transaction that records the request's reply.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::ops::Bound;

use super::encoding::{decode, entity_from_bytes, entity_to_bytes, lp, pair_key, DUMMY_ENTITY};
use super::tokens;
use super::writer::{abort, Trees, Tx, TxResult};
use crate::crypto::KeyId;
use crate::store::records::{
    Changed, Ended, EntityPage, EntityRecord, ExportError, KeyUsage, PskHash, PutOutcome, Record,
    StoreError, TokenRecord,
};

/// The entity `id`: the `Authenticate` hot path, one read. An unknown id decodes a dummy
/// record, so that it costs what a known one does.
pub fn entity(trees: &Trees, id: &str) -> Result<Option<EntityRecord>, StoreError> {
    match trees.entities.get(id.as_bytes())? {
        None => {
            black_box(entity_from_bytes(black_box(&DUMMY_ENTITY)).ok());
            Ok(None)
        }
        Some(v) => entity_from_bytes(&v).map(Some),
    }
}

/// Replaces the PSK hash of entity `id` with `psk` if the record is still exactly `seen`
/// (compare-and-swap); returns whether it did. Not a transaction and no replay record:
/// nobody asked for this change, and losing it (a concurrent `Entity.Put`, a crash before
/// sled's background flush) loses nothing — the old hash still verifies and the next sign-in
/// tries again.
pub fn replace_psk_hash(
    trees: &Trees,
    id: &str,
    seen: &EntityRecord,
    psk: PskHash,
) -> Result<bool, StoreError> {
    let new = EntityRecord {
        psk: Some(psk),
        ..seen.clone()
    };
    let swapped = trees.entities.compare_and_swap(
        id.as_bytes(),
        Some(entity_to_bytes(seen)),
        Some(entity_to_bytes(&new)),
    )?;
    Ok(swapped.is_ok())
}

/// How many PSK hashes and live app tokens were made with each server key. A full scan.
pub fn key_usage(trees: &Trees) -> Result<BTreeMap<KeyId, KeyUsage>, StoreError> {
    let mut usage = BTreeMap::<KeyId, KeyUsage>::new();
    for item in trees.entities.iter() {
        let (_, v) = item?;
        if let Some(psk) = entity_from_bytes(&v)?.psk {
            usage.entry(psk.key_id).or_default().psk_hashes += 1;
        }
    }
    for item in trees.tokens.iter() {
        let (_, v) = item?;
        let token: TokenRecord = decode("tokens", &v)?;
        usage.entry(token.key_id).or_default().tokens += 1;
    }
    Ok(usage)
}

/// Up to `limit` entities in id order whose id starts with `prefix` and sorts after `after`,
/// optionally only those of `owner`.
pub fn list(
    trees: &Trees,
    owner: Option<&str>,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<EntityPage, StoreError> {
    let (tree, base) = match owner {
        Some(owner) => (&trees.entity_owners, lp(owner)),
        None => (&trees.entities, Vec::new()),
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
            .map_err(|e| StoreError::corrupt("entities", e))?
            .to_owned();
        let record = if owner.is_some() {
            match trees.entities.get(id.as_bytes())? {
                Some(r) => entity_from_bytes(&r)?,
                // The index and the records change in one transaction; a miss here is an
                // entity deleted since the index was read.
                None => continue,
            }
        } else {
            entity_from_bytes(&value)?
        };
        page.entities.push((id, record));
    }
    Ok(page)
}

/// Creates or replaces entity `id`; a replaced entity keeps its `created`. With
/// `create_only`, an existing id is left alone. A put that re-provisions the id
/// ([`EntityRecord::reprovisions`]) also removes the tokens under `token_keys` (user `id`'s,
/// listed by [`tokens::keys_of`]).
pub fn put(
    tx: &Tx<'_>,
    id: &str,
    record: &EntityRecord,
    create_only: bool,
    token_keys: &[Vec<u8>],
) -> TxResult<Changed> {
    let old = match tx.entities.get(id.as_bytes())? {
        Some(v) => Some(entity_from_bytes(&v).map_err(abort)?),
        None => None,
    };
    if create_only && old.is_some() {
        return Ok(Changed::EntityPut {
            outcome: PutOutcome::Exists,
            tokens: 0,
            ended: None,
        });
    }
    let tokens = if record.reprovisions(old.as_ref()) {
        tokens::remove_all(tx, token_keys)?
    } else {
        0
    };
    let mut new = record.clone();
    if let Some(old) = &old {
        new.created = old.created;
        if let Some(owner) = &old.owner {
            tx.entity_owners.remove(pair_key(owner, id))?;
        }
    }
    if let Some(owner) = &new.owner {
        tx.entity_owners.insert(pair_key(owner, id), &[][..])?;
    }
    tx.entities.insert(id.as_bytes(), entity_to_bytes(&new))?;
    Ok(Changed::EntityPut {
        outcome: if old.is_some() {
            PutOutcome::Replaced
        } else {
            PutOutcome::Created
        },
        tokens,
        ended: Ended::of_put(old.as_ref(), &new, tokens),
    })
}

/// Removes entity `id` and the tokens under `token_keys` (user `id`'s, listed by
/// [`tokens::keys_of`]).
pub fn delete(tx: &Tx<'_>, id: &str, token_keys: &[Vec<u8>]) -> TxResult<Changed> {
    let existed = match tx.entities.remove(id.as_bytes())? {
        Some(v) => {
            let old = entity_from_bytes(&v).map_err(abort)?;
            if let Some(owner) = &old.owner {
                tx.entity_owners.remove(pair_key(owner, id))?;
            }
            true
        }
        None => false,
    };
    Ok(Changed::EntityDeleted {
        existed,
        tokens: tokens::remove_all(tx, token_keys)?,
    })
}

/// Hands every entity to `sink`, in id order; how many.
pub fn export(
    trees: &Trees,
    mut sink: impl FnMut(Record) -> std::io::Result<()>,
) -> Result<u64, ExportError> {
    let mut n = 0;
    for item in trees.entities.iter() {
        let (key, value) = item.map_err(StoreError::from)?;
        let id = String::from_utf8(key.to_vec()).map_err(|e| StoreError::corrupt("entities", e))?;
        let entity = entity_from_bytes(&value)?;
        sink(Record::Entity { id, entity }).map_err(ExportError::Write)?;
        n += 1;
    }
    Ok(n)
}

/// Makes `record` entity `id` as it is (its `created` too), keeping the owner index true.
/// Unlike [`put`], removes no token: a restore writes records, it does not re-provision.
pub fn restore(tx: &Tx<'_>, id: &str, record: &EntityRecord) -> TxResult<()> {
    if let Some(old) = tx.entities.insert(id.as_bytes(), entity_to_bytes(record))? {
        if let Some(owner) = entity_from_bytes(&old).map_err(abort)?.owner {
            tx.entity_owners.remove(pair_key(&owner, id))?;
        }
    }
    if let Some(owner) = &record.owner {
        tx.entity_owners.insert(pair_key(owner, id), &[][..])?;
    }
    Ok(())
}
