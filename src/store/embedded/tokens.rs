//! App tokens: `tokens` holds the live token of each (user, host) under `lp(user) ‖ host`;
//! `token_ids` maps a token id back to that key, so a presented token finds its owner in one
//! read; `token_counts` holds how many live tokens each user has (`user` → u64 BE, absent
//! for none), so that the per-user cap is checked inside the transaction that issues a
//! token. All three change together, in one transaction.

use std::ops::Bound;

use super::encoding::{decode, encode, lp, pair_key, split_pair_key, u64_of};
use super::writer::{abort, Trees, Tx, TxResult};
use crate::crypto::TokenId;
use crate::store::records::{
    Change, Changed, ExportError, LiveToken, Record, StoreError, TokenPage, TokenRecord,
};

/// The live token record of (user, host).
pub fn token(trees: &Trees, user: &str, host: &str) -> Result<Option<TokenRecord>, StoreError> {
    trees
        .tokens
        .get(pair_key(user, host))?
        .map(|v| decode("tokens", &v))
        .transpose()
}

/// Up to `limit` live tokens of `user` whose host sorts after `after`, in host order.
pub fn tokens_of(
    trees: &Trees,
    user: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<TokenPage, StoreError> {
    let prefix = lp(user);
    let start = match after {
        Some(host) => Bound::Excluded(pair_key(user, host)),
        None => Bound::Included(prefix.clone()),
    };
    let mut page = TokenPage::default();
    for item in trees.tokens.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
        let (k, v) = item?;
        if !k.starts_with(&prefix) {
            break;
        }
        if page.tokens.len() == limit {
            page.more = true;
            break;
        }
        let host = std::str::from_utf8(&k[prefix.len()..])
            .map_err(|e| StoreError::corrupt("tokens", e))?
            .to_owned();
        page.tokens.push((host, decode("tokens", &v)?));
    }
    Ok(page)
}

/// How many live tokens `user` has.
#[cfg(test)]
pub fn count_of(trees: &Trees, user: &str) -> Result<u64, StoreError> {
    match trees.token_counts.get(user.as_bytes())? {
        Some(v) => u64_of(&v, "token_counts"),
        None => Ok(0),
    }
}

/// Counts every user's live tokens again from `tokens` (the upgrade to schema 2, which
/// added the counts). Idempotent: it starts from an empty count tree. One pass in key
/// order, so a user's tokens are adjacent and memory stays constant. Not a transaction:
/// the caller marks the upgrade done only after this has reached the disk.
pub fn rebuild_counts(trees: &Trees) -> Result<u64, StoreError> {
    trees.token_counts.clear()?;
    let mut users = 0;
    let mut current: Option<(Vec<u8>, u64)> = None;
    for key in trees.tokens.iter().keys() {
        let key = key?;
        let user = user_of(&key)?.to_vec();
        match &mut current {
            Some((u, n)) if *u == user => *n += 1,
            _ => {
                if let Some((u, n)) = current.replace((user, 1)) {
                    trees.token_counts.insert(u, &n.to_be_bytes())?;
                    users += 1;
                }
            }
        }
    }
    if let Some((u, n)) = current {
        trees.token_counts.insert(u, &n.to_be_bytes())?;
        users += 1;
    }
    Ok(users)
}

/// The user part of a token key (`lp(user) ‖ host`).
fn user_of(key: &[u8]) -> Result<&[u8], StoreError> {
    let bad = || StoreError::corrupt("tokens", "bad compound key");
    let (len, rest) = key.split_first_chunk::<2>().ok_or_else(bad)?;
    rest.get(..u16::from_be_bytes(*len) as usize)
        .ok_or_else(bad)
}

/// `user`'s live-token count, inside a transaction.
fn count(tx: &Tx<'_>, user: &[u8]) -> TxResult<u64> {
    match tx.token_counts.get(user)? {
        Some(v) => u64_of(&v, "token_counts").map_err(abort),
        None => Ok(0),
    }
}

fn set_count(tx: &Tx<'_>, user: &[u8], n: u64) -> TxResult<()> {
    if n == 0 {
        tx.token_counts.remove(user)?;
    } else {
        tx.token_counts.insert(user, &n.to_be_bytes())?;
    }
    Ok(())
}

/// The live token with this id, if any: its user, host and record.
pub fn live_token(trees: &Trees, token_id: &TokenId) -> Result<Option<LiveToken>, StoreError> {
    let Some(key) = trees.token_ids.get(token_id)? else {
        return Ok(None);
    };
    let (user, host) = split_pair_key(&key, "token_ids")?;
    // The id maps to the pair's key; the pair's record says whether it is still the live one.
    let Some(record) = trees.tokens.get(&key)? else {
        return Ok(None);
    };
    let record: TokenRecord = decode("tokens", &record)?;
    Ok((record.token_id == *token_id).then_some(LiveToken { user, host, record }))
}

/// The keys of user `user`'s live tokens, including those issued by `earlier` changes of the
/// same batch (not yet visible outside its transaction). At most `max_tokens_per_user` plus
/// the batch's, unless tokens issued before the cap existed exceed it.
pub fn keys_of<'a>(
    trees: &Trees,
    user: &str,
    earlier: impl Iterator<Item = &'a Change>,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut keys = trees
        .tokens
        .scan_prefix(lp(user))
        .keys()
        .map(|k| k.map(|k| k.to_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    for change in earlier {
        if let Change::ReplaceToken { user: u, host, .. } = change {
            if u == user {
                keys.push(pair_key(u, host));
            }
        }
    }
    Ok(keys)
}

/// Makes `record` the live token of (user, host), retiring the id of any earlier one. A
/// host with no token yet is refused, and nothing written, when the user already has
/// `max_per_user` tokens; replacing a host's token is always allowed.
pub fn replace(
    tx: &Tx<'_>,
    user: &str,
    host: &str,
    record: &TokenRecord,
    max_per_user: u64,
) -> TxResult<Changed> {
    let key = pair_key(user, host);
    let earlier = match tx.tokens.get(key.as_slice())? {
        Some(old) => {
            let old: TokenRecord = decode("tokens", &old).map_err(abort)?;
            retire(tx, &key, &old)?;
            true
        }
        None => {
            let n = count(tx, user.as_bytes())?;
            if n >= max_per_user {
                return Ok(Changed::TooManyTokens {
                    limit: max_per_user,
                });
            }
            set_count(tx, user.as_bytes(), n + 1)?;
            false
        }
    };
    insert(tx, &key, record)?;
    Ok(Changed::TokenReplaced { earlier })
}

/// Writes `record` under `key` with its id and, if it has a lifetime, its expiry entry.
fn insert(tx: &Tx<'_>, key: &[u8], record: &TokenRecord) -> TxResult<()> {
    tx.tokens.insert(key, encode(record))?;
    tx.token_ids.insert(&record.token_id[..], key)?;
    if let Some(at) = record.expires {
        tx.token_expiry
            .insert(expiry_key(at, key), &record.token_id[..])?;
    }
    Ok(())
}

/// Removes the id and the expiry entry of `old`, the record under `key`.
fn retire(tx: &Tx<'_>, key: &[u8], old: &TokenRecord) -> TxResult<()> {
    tx.token_ids.remove(&old.token_id[..])?;
    if let Some(at) = old.expires {
        tx.token_expiry.remove(expiry_key(at, key))?;
    }
    Ok(())
}

/// `expires ‖ key`: the expiry entry of the token under `key`.
fn expiry_key(expires: u64, key: &[u8]) -> Vec<u8> {
    let mut k = expires.to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

/// Up to `limit` tokens whose lifetime ended by `now` (UNIX seconds), soonest first.
pub fn expired(
    trees: &Trees,
    now: u64,
    limit: usize,
) -> Result<Vec<crate::store::records::ExpiredToken>, StoreError> {
    let mut out = Vec::new();
    for item in trees
        .token_expiry
        .range(..(now.saturating_add(1)).to_be_bytes())
        .take(limit)
    {
        let (k, v) = item?;
        let (user, host) = split_pair_key(&k[8..], "token_expiry")?;
        let token_id = <TokenId>::try_from(v.as_ref())
            .map_err(|_| StoreError::corrupt("token_expiry", "bad token id"))?;
        out.push(crate::store::records::ExpiredToken {
            user,
            host,
            token_id,
        });
    }
    Ok(out)
}

/// Removes each of `tokens` that is still the live token of its pair and has expired by
/// `now` (UNIX seconds): the pairs removed.
pub fn expire(
    tx: &Tx<'_>,
    tokens: &[crate::store::records::ExpiredToken],
    now: u64,
) -> TxResult<Changed> {
    let mut removed = Vec::new();
    for t in tokens {
        let key = pair_key(&t.user, &t.host);
        let live = match tx.tokens.get(key.as_slice())? {
            Some(v) => decode::<TokenRecord>("tokens", &v).map_err(abort)?,
            None => continue,
        };
        if live.token_id == t.token_id && live.expired(now) && remove(tx, &key)? {
            removed.push((t.user.clone(), t.host.clone()));
        }
    }
    Ok(Changed::TokensExpired(removed))
}

/// Removes the live token of (user, host), if any.
pub fn revoke(tx: &Tx<'_>, user: &str, host: &str) -> TxResult<Changed> {
    Ok(Changed::TokenRevoked {
        existed: remove(tx, &pair_key(user, host))?,
    })
}

/// Removes the token under `key` (a [`pair_key`]) and its id; whether there was one.
pub fn remove(tx: &Tx<'_>, key: &[u8]) -> TxResult<bool> {
    match tx.tokens.remove(key)? {
        Some(old) => {
            let old: TokenRecord = decode("tokens", &old).map_err(abort)?;
            retire(tx, key, &old)?;
            let user = user_of(key).map_err(abort)?;
            let n = count(tx, user)?;
            set_count(tx, user, n.saturating_sub(1))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Removes the tokens under `keys` (user `id`'s, listed by [`keys_of`]); how many there were.
pub fn remove_all(tx: &Tx<'_>, keys: &[Vec<u8>]) -> TxResult<usize> {
    let mut removed = 0;
    for key in keys {
        if remove(tx, key)? {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Hands every live token to `sink`, in key order (by user, then host); how many.
pub fn export(
    trees: &Trees,
    mut sink: impl FnMut(Record) -> std::io::Result<()>,
) -> Result<u64, ExportError> {
    let mut n = 0;
    for item in trees.tokens.iter() {
        let (key, value) = item.map_err(StoreError::from)?;
        let (user, host) = split_pair_key(&key, "tokens")?;
        let token = decode("tokens", &value)?;
        sink(Record::Token { user, host, token }).map_err(ExportError::Write)?;
        n += 1;
    }
    Ok(n)
}

/// Makes `record` the live token of (user, host) as it is: the id of a different earlier
/// token of the pair is retired, and a pair new to the store counts for its user. No cap:
/// the records are what the store they came from held.
pub fn restore(tx: &Tx<'_>, user: &str, host: &str, record: &TokenRecord) -> TxResult<()> {
    let key = pair_key(user, host);
    match tx.tokens.get(key.as_slice())? {
        Some(old) => retire(tx, &key, &decode("tokens", &old).map_err(abort)?)?,
        None => {
            let n = count(tx, user.as_bytes())?;
            set_count(tx, user.as_bytes(), n + 1)?;
        }
    }
    insert(tx, &key, record)
}
