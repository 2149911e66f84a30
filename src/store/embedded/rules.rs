//! Access rules: `rules` maps a rule id (u64 BE) to the rule (JSON); `meta`'s
//! `next_rule_id` makes ids increase and never repeat, even across restarts. The rules are
//! mirrored in memory by a [`RuleIndex`], built at open and kept in step by the writer thread
//! after each commit, so AuthorizeCommand never reads this tree.

use super::encoding::{decode, encode, u64_of};
use super::writer::{abort, Trees, Tx, TxResult};
use crate::rules::{Rule, RuleIndex};
use crate::store::records::{Changed, ExportError, Record, StoreError};

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

/// The id the next rule gets.
fn next_id(tx: &Tx<'_>) -> TxResult<u64> {
    match tx.meta.get(NEXT_RULE_ID)? {
        None => Ok(1),
        Some(v) => u64_of(&v, "meta").map_err(abort),
    }
}

/// Adds `rule` under the next id.
pub fn add(tx: &Tx<'_>, rule: &Rule) -> TxResult<Changed> {
    let rule_id = next_id(tx)?;
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

/// Hands every rule to `sink` in id order, then the next rule id; how many records.
pub fn export(
    trees: &Trees,
    mut sink: impl FnMut(Record) -> std::io::Result<()>,
) -> Result<u64, ExportError> {
    let mut n = 0;
    for item in trees.rules.iter() {
        let (key, value) = item.map_err(StoreError::from)?;
        let rule_id = u64_of(&key, "rules")?;
        let rule = decode("rules", &value)?;
        sink(Record::Rule { rule_id, rule }).map_err(ExportError::Write)?;
        n += 1;
    }
    let next = match trees.meta.get(NEXT_RULE_ID).map_err(StoreError::from)? {
        None => 1,
        Some(v) => u64_of(&v, "meta")?,
    };
    sink(Record::NextRuleId(next)).map_err(ExportError::Write)?;
    Ok(n + 1)
}

/// Stores `rule` under `rule_id` and keeps the next id above it; the rule it replaced, if
/// any (the caller updates the rule index after the commit).
pub fn restore(tx: &Tx<'_>, rule_id: u64, rule: &Rule) -> TxResult<Option<Rule>> {
    let old = match tx.rules.insert(&rule_id.to_be_bytes(), encode(rule))? {
        None => None,
        Some(v) => Some(decode::<Rule>("rules", &v).map_err(abort)?),
    };
    raise_next_id(tx, rule_id.saturating_add(1))?;
    Ok(old)
}

/// Makes the next rule id at least `at_least` (it never goes down).
pub fn raise_next_id(tx: &Tx<'_>, at_least: u64) -> TxResult<()> {
    if at_least > next_id(tx)? {
        tx.meta.insert(NEXT_RULE_ID, &at_least.to_be_bytes())?;
    }
    Ok(())
}
