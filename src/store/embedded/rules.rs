//! Access rules: `rules` maps a rule id (u64 BE) to the rule (JSON); `meta`'s
//! `next_rule_id` makes ids increase and never repeat, even across restarts. The rules are
//! mirrored in memory by a [`RuleIndex`], built at open and kept in step by the writer thread
//! after each commit, so AuthorizeCommand never reads this tree.

use super::encoding::{decode, encode, u64_of};
use super::writer::{abort, Trees, Tx, TxResult};
use crate::rules::{Rule, RuleIndex};
use crate::store::records::{Changed, StoreError};

const NEXT_RULE_ID: &str = "next_rule_id";

/// Every rule, indexed.
pub fn load_index(trees: &Trees) -> Result<RuleIndex, StoreError> {
    let mut index = RuleIndex::new();
    for item in trees.rules.iter() {
        let (k, v) = item?;
        index.insert(u64_of(&k, "rules")?, &decode("rules", &v)?);
    }
    Ok(index)
}

/// Rules with an id above `after`, in id order, at most `limit`.
pub fn list(trees: &Trees, after: u64, limit: usize) -> Result<Vec<(u64, Rule)>, StoreError> {
    let mut out = Vec::new();
    for item in trees
        .rules
        .range(after.saturating_add(1).to_be_bytes()..)
        .take(limit)
    {
        let (k, v) = item?;
        out.push((u64_of(&k, "rules")?, decode("rules", &v)?));
    }
    Ok(out)
}

/// Adds `rule` under the next id.
pub fn add(tx: &Tx<'_>, rule: &Rule) -> TxResult<Changed> {
    let rule_id = match tx.meta.get(NEXT_RULE_ID)? {
        None => 1,
        Some(v) => u64_of(&v, "meta").map_err(abort)?,
    };
    tx.meta.insert(NEXT_RULE_ID, &(rule_id + 1).to_be_bytes())?;
    tx.rules.insert(&rule_id.to_be_bytes(), encode(rule))?;
    Ok(Changed::RuleAdded { rule_id })
}

/// Deletes rule `rule_id` if it exists.
pub fn delete(tx: &Tx<'_>, rule_id: u64) -> TxResult<Changed> {
    let old = match tx.rules.remove(&rule_id.to_be_bytes())? {
        None => None,
        Some(v) => Some(decode::<Rule>("rules", &v).map_err(abort)?),
    };
    Ok(Changed::RuleDeleted(old))
}
