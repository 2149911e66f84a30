//! Moving a deployment in and out: [`Record`]s read in pages (constant memory), and written
//! a batch per transaction with one statement per kind of record.

use std::collections::BTreeMap;

use super::{rows, Failure, PostgresStore};
use crate::store::records::{ExportError, Record, StoreError};

/// Rows read per statement while exporting.
const PAGE: i64 = 1000;

const ENTITIES_AFTER: &str =
    "SELECT id, kind, owner, psk_key_id, psk_hash, cert_sha256, disabled, created \
     FROM entities WHERE id > $1 ORDER BY id LIMIT $2";
const TOKENS_AFTER: &str = "SELECT user_id, host, token_id, key_id, created, expires FROM tokens \
     WHERE (user_id, host) > ($1, $2) ORDER BY user_id, host LIMIT $3";
const RULES_AFTER: &str = "SELECT id, rule FROM rules WHERE id > $1 ORDER BY id LIMIT $2";
const NEXT_RULE_ID: &str =
    "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM rule_ids";

const RESTORE_ENTITIES: &str = "INSERT INTO entities (id, kind, owner, psk_key_id, psk_hash, cert_sha256, disabled, created) \
     SELECT * FROM unnest($1::text[], $2::int2[], $3::text[], $4::int8[], $5::bytea[], $6::bytea[], $7::bool[], $8::int8[]) \
     ON CONFLICT (id) DO UPDATE SET kind = EXCLUDED.kind, owner = EXCLUDED.owner, \
       psk_key_id = EXCLUDED.psk_key_id, psk_hash = EXCLUDED.psk_hash, \
       cert_sha256 = EXCLUDED.cert_sha256, disabled = EXCLUDED.disabled, created = EXCLUDED.created";
const RESTORE_TOKENS: &str =
    "INSERT INTO tokens (user_id, host, token_id, key_id, created, expires) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[], $5::int8[], $6::int8[]) \
     ON CONFLICT (user_id, host) DO UPDATE SET token_id = EXCLUDED.token_id, \
       key_id = EXCLUDED.key_id, created = EXCLUDED.created, expires = EXCLUDED.expires";
/// Rules under their ids, each logged under a new rules version so that running workers'
/// indexes catch up.
const RESTORE_RULES: &str =
    "WITH bump AS (UPDATE rules_version SET version = version + cardinality($1::int8[]) \
       RETURNING version - cardinality($1::int8[]) AS base), \
     given AS (SELECT * FROM unnest($1::int8[], $2::jsonb[]) WITH ORDINALITY AS g(id, rule, n)), \
     stored AS (INSERT INTO rules (id, rule) SELECT id, rule FROM given \
       ON CONFLICT (id) DO UPDATE SET rule = EXCLUDED.rule) \
     INSERT INTO rule_log (version, rule_id, rule, deleted) \
     SELECT bump.base + given.n, given.id, given.rule, false FROM bump, given";
/// The next rule id becomes at least $1 (never lower).
const RAISE_NEXT_RULE_ID: &str = "SELECT setval('rule_ids', GREATEST($1::int8 - 1, \
       (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM rule_ids)), true) \
     WHERE $1::int8 > 1";

impl PostgresStore {
    pub async fn export(
        &self,
        sink: &mut (dyn FnMut(Record) -> std::io::Result<()> + Send),
    ) -> Result<u64, ExportError> {
        let mut n = 0u64;
        let mut give = |r: Record| -> Result<(), ExportError> {
            n += 1;
            sink(r).map_err(ExportError::Write)
        };
        let mut after = String::new();
        loop {
            let from = after.clone();
            let page = self
                .db
                .run(1, async |c| {
                    let stmt = c.prepare_cached(ENTITIES_AFTER).await?;
                    c.query(&stmt, &[&from, &PAGE])
                        .await?
                        .iter()
                        .map(|r| Ok((r.try_get::<_, String>(0)?, rows::entity(r, 1)?)))
                        .collect::<Result<Vec<_>, Failure>>()
                })
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            for (id, entity) in page {
                give(Record::Entity { id, entity })?;
            }
        }
        let mut after = (String::new(), String::new());
        loop {
            let (user, host) = after.clone();
            let page = self
                .db
                .run(1, async |c| {
                    let stmt = c.prepare_cached(TOKENS_AFTER).await?;
                    c.query(&stmt, &[&user, &host, &PAGE])
                        .await?
                        .iter()
                        .map(|r| {
                            Ok((
                                r.try_get::<_, String>(0)?,
                                r.try_get::<_, String>(1)?,
                                rows::token(r, 2)?,
                            ))
                        })
                        .collect::<Result<Vec<_>, Failure>>()
                })
                .await?;
            let Some((u, h, _)) = page.last() else { break };
            after = (u.clone(), h.clone());
            for (user, host, token) in page {
                give(Record::Token { user, host, token })?;
            }
        }
        let mut after = 0i64;
        loop {
            let page = self
                .db
                .run(1, async |c| {
                    let stmt = c.prepare_cached(RULES_AFTER).await?;
                    c.query(&stmt, &[&after, &PAGE])
                        .await?
                        .iter()
                        .map(|r| Ok((r.try_get::<_, i64>(0)?, rows::rule(r, 1)?)))
                        .collect::<Result<Vec<_>, Failure>>()
                })
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (rule_id, rule) in page {
                give(Record::Rule {
                    rule_id: rule_id as u64,
                    rule,
                })?;
            }
        }
        let next: i64 = self
            .db
            .run(1, async |c| {
                Ok(c.query_one(NEXT_RULE_ID, &[]).await?.try_get(0)?)
            })
            .await?;
        give(Record::NextRuleId(next.max(1) as u64))?;
        Ok(n)
    }

    pub async fn restore(&self, records: Vec<Record>) -> Result<(), StoreError> {
        // Later records win over earlier ones with the same key (one statement cannot
        // write a row twice).
        let mut entities = BTreeMap::new();
        let mut tokens = BTreeMap::new();
        let mut rules = BTreeMap::new();
        let mut next_rule_id = 1u64;
        for record in records {
            match record {
                Record::Entity { id, entity } => {
                    entities.insert(id, entity);
                }
                Record::Token { user, host, token } => {
                    tokens.insert((user, host), token);
                }
                Record::Rule { rule_id, rule } => {
                    next_rule_id = next_rule_id.max(rule_id.saturating_add(1));
                    rules.insert(rule_id, rule);
                }
                Record::NextRuleId(id) => next_rule_id = next_rule_id.max(id),
            }
        }
        let e_ids: Vec<&str> = entities.keys().map(String::as_str).collect();
        let e_kinds: Vec<i16> = entities.values().map(|e| rows::kind_code(e.kind)).collect();
        let e_owners: Vec<Option<&str>> = entities.values().map(|e| e.owner.as_deref()).collect();
        let e_keys: Vec<Option<i64>> = entities
            .values()
            .map(|e| e.psk.as_ref().map(|p| i64::from(p.key_id)))
            .collect();
        let e_hashes: Vec<Option<&[u8]>> = entities
            .values()
            .map(|e| e.psk.as_ref().map(|p| &p.hash[..]))
            .collect();
        let e_certs: Vec<Option<&[u8]>> = entities
            .values()
            .map(|e| e.cert_sha256.as_ref().map(|c| &c[..]))
            .collect();
        let e_disabled: Vec<bool> = entities.values().map(|e| e.disabled).collect();
        let e_created: Vec<i64> = entities.values().map(|e| e.created as i64).collect();
        let t_users: Vec<&str> = tokens.keys().map(|(u, _)| u.as_str()).collect();
        let t_hosts: Vec<&str> = tokens.keys().map(|(_, h)| h.as_str()).collect();
        let t_ids: Vec<&[u8]> = tokens.values().map(|t| &t.token_id[..]).collect();
        let t_keys: Vec<i64> = tokens.values().map(|t| i64::from(t.key_id)).collect();
        let t_created: Vec<i64> = tokens.values().map(|t| t.created as i64).collect();
        let t_expires: Vec<Option<i64>> = tokens
            .values()
            .map(|t| t.expires.map(|e| e.min(i64::MAX as u64) as i64))
            .collect();
        let r_ids: Vec<i64> = rules.keys().map(|id| *id as i64).collect();
        let r_rules: Vec<serde_json::Value> = rules
            .values()
            .map(|r| serde_json::to_value(r).unwrap_or_default())
            .collect();
        let next = next_rule_id.min(i64::MAX as u64) as i64;
        self.db
            .run(5, async |mut c| {
                let tx = c.transaction().await?;
                if !e_ids.is_empty() {
                    tx.execute(
                        RESTORE_ENTITIES,
                        &[
                            &e_ids,
                            &e_kinds,
                            &e_owners,
                            &e_keys,
                            &e_hashes,
                            &e_certs,
                            &e_disabled,
                            &e_created,
                        ],
                    )
                    .await?;
                }
                if !t_users.is_empty() {
                    tx.execute(
                        RESTORE_TOKENS,
                        &[&t_users, &t_hosts, &t_ids, &t_keys, &t_created, &t_expires],
                    )
                    .await?;
                }
                if !r_ids.is_empty() {
                    tx.execute(RESTORE_RULES, &[&r_ids, &r_rules]).await?;
                }
                tx.execute(RAISE_NEXT_RULE_ID, &[&next]).await?;
                tx.commit().await?;
                Ok(())
            })
            .await
    }
}
