//! App tokens: `tokens` holds the live token of each (user, host) under `lp(user) ‖ host`;
//! `token_ids` maps a token id back to that key, so a presented token finds its owner in one
//! read. Both change together, in one transaction.

use super::encoding::{decode, encode, lp, pair_key, split_pair_key};
use super::writer::{abort, Trees, Tx, TxResult};
use crate::crypto::TokenId;
use crate::store::records::{Change, Changed, LiveToken, StoreError, TokenRecord};

/// The live token record of (user, host).
pub fn token(trees: &Trees, user: &str, host: &str) -> Result<Option<TokenRecord>, StoreError> {
    trees
        .tokens
        .get(pair_key(user, host))?
        .map(|v| decode("tokens", &v))
        .transpose()
}

/// All live tokens of a user, sorted by host.
pub fn tokens_of(trees: &Trees, user: &str) -> Result<Vec<(String, TokenRecord)>, StoreError> {
    let prefix = lp(user);
    let mut out = Vec::new();
    for item in trees.tokens.scan_prefix(&prefix) {
        let (k, v) = item?;
        let host = std::str::from_utf8(&k[prefix.len()..])
            .map_err(|e| StoreError::corrupt("tokens", e))?
            .to_owned();
        out.push((host, decode("tokens", &v)?));
    }
    Ok(out)
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
/// same batch (not yet visible outside its transaction).
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

/// Makes `record` the live token of (user, host), retiring the id of any earlier one.
pub fn replace(tx: &Tx<'_>, user: &str, host: &str, record: &TokenRecord) -> TxResult<Changed> {
    let key = pair_key(user, host);
    if let Some(old) = tx.tokens.insert(key.as_slice(), encode(record))? {
        let old: TokenRecord = decode("tokens", &old).map_err(abort)?;
        tx.token_ids.remove(&old.token_id[..])?;
    }
    tx.token_ids.insert(&record.token_id[..], key.as_slice())?;
    Ok(Changed::TokenReplaced)
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
            tx.token_ids.remove(&old.token_id[..])?;
            Ok(true)
        }
        None => Ok(false),
    }
}
