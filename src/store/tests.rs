//! The store's promises, checked through [`Store`] (the operations the methods use).

use super::*;
use crate::rules::Effect;

fn req(src: &str, id: u64, at_ms: u64) -> RequestKey<'_> {
    RequestKey {
        src,
        id,
        at_ms,
        binding: Some(Binding {
            caller: "ops",
            method: "Test.Change",
            args_digest: [0; 32],
        }),
    }
}

async fn recorded(s: &Store, src: &str, id: u64, at_ms: u64) -> Recorded {
    s.recorded(&req(src, id, at_ms)).await.unwrap()
}

fn token(n: u8) -> TokenRecord {
    TokenRecord {
        token_id: [n; 16],
        key_id: 1,
        created: 10,
    }
}

async fn replace(s: &Store, user: &str, host: &str, record: TokenRecord, request: RequestKey<'_>) {
    let change = Change::ReplaceToken {
        user: user.into(),
        host: host.into(),
        record,
    };
    s.apply(&request, change).await.unwrap();
}

async fn owner_of_live(s: &Store, id: u8) -> Option<(String, String)> {
    s.live_token(&[id; 16])
        .await
        .unwrap()
        .map(|t| (t.user, t.host))
}

#[tokio::test]
async fn replacing_a_token_retires_the_old_id() {
    let s = Store::temporary().unwrap();
    replace(&s, "u", "h", token(1), req("u", 1, 1)).await;
    assert_eq!(owner_of_live(&s, 1).await, Some(("u".into(), "h".into())));
    replace(&s, "u", "h", token(2), req("u", 2, 1)).await;
    assert_eq!(s.token("u", "h").await.unwrap(), Some(token(2)));
    assert_eq!(owner_of_live(&s, 1).await, None);
    let revoke = Change::RevokeToken {
        user: "u".into(),
        host: "h".into(),
    };
    s.apply(&req("u", 3, 1), revoke).await.unwrap();
    assert_eq!(s.token("u", "h").await.unwrap(), None);
    assert_eq!(owner_of_live(&s, 2).await, None);
}

#[tokio::test]
async fn user_and_host_boundaries_are_kept_apart() {
    let s = Store::temporary().unwrap();
    replace(&s, "ab", "c", token(1), req("x", 1, 1)).await;
    assert_eq!(s.token("a", "bc").await.unwrap(), None);
    assert!(s.tokens_of("a").await.unwrap().is_empty());
    assert_eq!(s.tokens_of("ab").await.unwrap().len(), 1);
}

#[tokio::test]
async fn replays_are_kept_then_pruned() {
    let s = Store::temporary().unwrap();
    replace(&s, "u", "h", token(1), req("caller", 9, 1_000)).await;
    let reply = Reply::Token {
        user: "u".into(),
        host: "h".into(),
        token_id: [1; 16],
        key_id: 1,
    };
    let window = ReplayPolicy::default().window_ms;
    assert_eq!(
        recorded(&s, "caller", 9, 1_000).await,
        Recorded::Same(reply)
    );
    assert_eq!(recorded(&s, "caller", 10, 1_000).await, Recorded::Nothing);
    let late = 1_001 + window;
    assert_eq!(recorded(&s, "caller", 9, late).await, Recorded::Nothing);
    assert_eq!(s.prune_replays(1_000 + window).await.unwrap(), 0);
    assert_eq!(s.prune_replays(late).await.unwrap(), 1);
    assert_eq!(recorded(&s, "caller", 9, 1_000).await, Recorded::Nothing);
}

#[tokio::test]
async fn a_recorded_request_changes_nothing_and_gets_its_reply() {
    let s = Store::temporary().unwrap();
    let first = s
        .apply(&req("op", 7, 1), add_rule("a", Effect::Allow))
        .await
        .unwrap();
    // The same request again, as if it raced past the dispatcher's replay check.
    let again = s
        .apply(&req("op", 7, 1), add_rule("a", Effect::Allow))
        .await
        .unwrap();
    let Applied::Now(Changed::RuleAdded { rule_id: 1 }, reply) = first else {
        panic!("{first:?}")
    };
    assert_eq!(again, Applied::Before(reply));
    assert_eq!(s.rules(0, usize::MAX).await.unwrap().len(), 1);
}

fn rule(src: &str, effect: Effect) -> Rule {
    Rule {
        src: src.into(),
        dst: "d".into(),
        cmd: "c".into(),
        effect,
    }
}

fn add_rule(src: &str, effect: Effect) -> Change {
    Change::AddRule {
        rule: rule(src, effect),
    }
}

async fn added_id(s: &Store, n: u64, change: Change) -> u64 {
    match s.apply(&req("op", n, 1), change).await.unwrap() {
        Applied::Now(Changed::RuleAdded { rule_id }, reply) => {
            assert_eq!(
                reply,
                Reply::Value(serde_json::json!({ "rule_id": rule_id }))
            );
            rule_id
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rules_and_their_counter_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open_embedded(dir.path(), 1 << 20, true, ReplayPolicy::default()).unwrap();
        assert_eq!(added_id(&s, 1, add_rule("a", Effect::Allow)).await, 1);
        assert_eq!(added_id(&s, 2, add_rule("b", Effect::Deny)).await, 2);
        assert_eq!(added_id(&s, 3, add_rule("c", Effect::Allow)).await, 3);
        let deleted = s
            .apply(&req("op", 4, 1), Change::DeleteRule { rule_id: 3 })
            .await
            .unwrap();
        assert_eq!(
            deleted,
            Applied::Now(
                Changed::RuleDeleted(Some(rule("c", Effect::Allow))),
                Reply::Empty
            )
        );
        let again = s
            .apply(&req("op", 5, 1), Change::DeleteRule { rule_id: 3 })
            .await
            .unwrap();
        assert_eq!(
            again,
            Applied::Now(Changed::RuleDeleted(None), Reply::Empty)
        );
        s.flush().await.unwrap();
    }
    let s = Store::open_embedded(dir.path(), 1 << 20, true, ReplayPolicy::default()).unwrap();
    let ids: Vec<u64> = s
        .rules(0, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(s.rules(1, 10).await.unwrap().len(), 1);
    assert_eq!(
        s.authorize("a", "d", "c").await.unwrap(),
        Decision::Allow(1),
        "index rebuilt"
    );
    assert_eq!(s.authorize("b", "d", "c").await.unwrap(), Decision::Deny(2));
    assert_eq!(
        s.authorize("c", "d", "c").await.unwrap(),
        Decision::DefaultDeny
    );
    assert_eq!(
        added_id(&s, 6, add_rule("c", Effect::Allow)).await,
        4,
        "a deleted rule's id is not reused"
    );
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

async fn put(s: &Store, id: &str, record: EntityRecord, create_only: bool, n: u64) -> PutOutcome {
    let change = Change::PutEntity {
        id: id.into(),
        record,
        create_only,
        generated: None,
    };
    match s.apply(&req("ops", n, 1), change).await.unwrap() {
        Applied::Now(Changed::EntityPut(outcome), _) => outcome,
        other => panic!("{other:?}"),
    }
}

fn ids(page: &EntityPage) -> Vec<&str> {
    page.entities.iter().map(|(id, _)| id.as_str()).collect()
}

#[tokio::test]
async fn put_keeps_created_and_moves_the_owner_index() {
    let s = Store::temporary().unwrap();
    let created = put(&s, "d1", entity(Some("alice"), 10), true, 1).await;
    assert_eq!(created, PutOutcome::Created);
    let exists = put(&s, "d1", entity(Some("bob"), 20), true, 2).await;
    assert_eq!(exists, PutOutcome::Exists);
    assert_eq!(
        recorded(&s, "ops", 2, 1).await,
        Recorded::Nothing,
        "a 409 records nothing"
    );
    let d1 = s.entity("d1").await.unwrap().unwrap();
    assert_eq!(d1.owner.as_deref(), Some("alice"));
    let replaced = put(&s, "d1", entity(Some("bob"), 20), false, 3).await;
    assert_eq!(replaced, PutOutcome::Replaced);
    let d1 = s.entity("d1").await.unwrap().unwrap();
    assert_eq!((d1.owner.as_deref(), d1.created), (Some("bob"), 10));
    let alice = s.list_entities(Some("alice"), "", None, 10).await.unwrap();
    assert!(alice.entities.is_empty());
    let bob = s.list_entities(Some("bob"), "", None, 10).await.unwrap();
    assert_eq!(ids(&bob), ["d1"]);
}

#[tokio::test]
async fn listing_pages_by_prefix_owner_and_after() {
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
        put(&s, id, entity(owner, 1), false, n as u64).await;
    }
    let list = |owner, prefix, after, limit| s.list_entities(owner, prefix, after, limit);
    let page = list(None, "", None, 2).await.unwrap();
    assert_eq!((ids(&page), page.more), (vec!["a1", "b1"], true));
    let page = list(None, "", Some("b1"), 2).await.unwrap();
    assert_eq!((ids(&page), page.more), (vec!["b2", "b3"], true));
    let page = list(None, "", Some("b3"), 2).await.unwrap();
    assert_eq!((ids(&page), page.more), (vec!["c1"], false));
    let page = list(None, "b", None, 10).await.unwrap();
    assert_eq!((ids(&page), page.more), (vec!["b1", "b2", "b3"], false));
    // `after` before the prefix starts at the prefix.
    let page = list(None, "b", Some("a9"), 2).await.unwrap();
    assert_eq!((ids(&page), page.more), (vec!["b1", "b2"], true));
    let page = list(Some("o"), "b", None, 10).await.unwrap();
    assert_eq!(ids(&page), ["b1", "b3"]);
    let page = list(Some("o"), "", Some("b1"), 2).await.unwrap();
    assert_eq!((ids(&page), page.more), (vec!["b3", "c1"], false));
    // An owner whose name is a prefix of another's sees only its own.
    assert!(list(Some(""), "", None, 10)
        .await
        .unwrap()
        .entities
        .is_empty());
}

#[tokio::test]
async fn delete_removes_the_entity_its_index_and_its_tokens_only() {
    let s = Store::temporary().unwrap();
    put(&s, "d1", entity(Some("o"), 1), false, 1).await;
    replace(&s, "d1", "h1", token(1), req("ops", 2, 1)).await;
    replace(&s, "d1", "h2", token(2), req("ops", 3, 1)).await;
    replace(&s, "d10", "h1", token(3), req("ops", 4, 1)).await;
    let delete = || Change::DeleteEntity { id: "d1".into() };
    let deleted = s.apply(&req("ops", 5, 1), delete()).await.unwrap();
    assert_eq!(
        deleted,
        Applied::Now(
            Changed::EntityDeleted {
                existed: true,
                tokens: 2
            },
            Reply::Empty
        )
    );
    assert_eq!(s.entity("d1").await.unwrap(), None);
    assert!(s.tokens_of("d1").await.unwrap().is_empty());
    assert_eq!(owner_of_live(&s, 1).await, None);
    assert_eq!(s.tokens_of("d10").await.unwrap().len(), 1);
    let owned = s.list_entities(Some("o"), "", None, 10).await.unwrap();
    assert!(owned.entities.is_empty());
    let again = s.apply(&req("ops", 6, 1), delete()).await.unwrap();
    assert_eq!(
        again,
        Applied::Now(
            Changed::EntityDeleted {
                existed: false,
                tokens: 0
            },
            Reply::Empty
        )
    );
}

#[tokio::test]
async fn authorize_asks_the_owner_only_when_no_rule_denies() {
    let s = Store::temporary().unwrap();
    let Store::Embedded(raw) = &s;
    raw.put_entity_raw("lamp", &entity(Some("alice"), 5));
    raw.put_entity_raw("free", &entity(None, 5));
    assert_eq!(
        s.authorize("alice", "lamp", "x").await.unwrap(),
        Decision::Owner
    );
    assert_eq!(
        s.authorize("alice", "free", "x").await.unwrap(),
        Decision::DefaultDeny
    );
    assert_eq!(
        s.authorize("alice", "nothing", "x").await.unwrap(),
        Decision::DefaultDeny
    );
}

#[tokio::test]
async fn a_request_id_used_by_another_request_changes_nothing() {
    let s = Store::temporary().unwrap();
    replace(&s, "u", "h", token(1), req("u", 5, 1)).await;
    let mut other = req("u", 5, 1);
    other.binding = Some(Binding {
        caller: "ops",
        method: "Auth.RevokeToken",
        args_digest: [0; 32],
    });
    let revoke = Change::RevokeToken {
        user: "u".into(),
        host: "h".into(),
    };
    assert_eq!(s.apply(&other, revoke).await.unwrap(), Applied::IdReused);
    assert_eq!(s.token("u", "h").await.unwrap(), Some(token(1)));
    assert_eq!(s.recorded(&other).await.unwrap(), Recorded::Other);
}

#[tokio::test]
async fn replay_records_beyond_the_maximum_are_pruned_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let policy = ReplayPolicy {
        window_ms: 1_000_000,
        max_records: 3,
    };
    let s = Store::open_embedded(dir.path(), 1 << 20, false, policy).unwrap();
    for n in 0..5u8 {
        replace(&s, "u", "h", token(n), req("u", n.into(), n.into())).await;
    }
    assert_eq!(s.prune_replays(10).await.unwrap(), 2);
    let left: Vec<bool> = still_recorded(&s).await;
    assert_eq!(left, [false, false, true, true, true]);
}

/// Whether requests 0..5 of `u` are still recorded.
async fn still_recorded(s: &Store) -> Vec<bool> {
    let mut out = Vec::new();
    for n in 0..5u64 {
        out.push(matches!(recorded(s, "u", n, 10).await, Recorded::Same(_)));
    }
    out
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", &99u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Store::open_embedded(dir.path(), 1 << 20, true, ReplayPolicy::default()),
        Err(StoreError::Schema { .. })
    ));
}
