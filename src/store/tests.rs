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
        expires: None,
    }
}

async fn replace(s: &Store, user: &str, host: &str, record: TokenRecord, request: RequestKey<'_>) {
    let change = Change::ReplaceToken {
        user: user.into(),
        host: host.into(),
        record,
        max_per_user: 1000,
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
    assert!(s.tokens_of("a", None, 100).await.unwrap().tokens.is_empty());
    assert_eq!(s.tokens_of("ab", None, 100).await.unwrap().tokens.len(), 1);
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
        let s =
            Store::open_embedded(dir.path(), 1 << 20, true, ReplayPolicy::default(), true).unwrap();
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
    let s = Store::open_embedded(dir.path(), 1 << 20, true, ReplayPolicy::default(), true).unwrap();
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
        kind: EntityKind::Device,
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
        Applied::Now(Changed::EntityPut { outcome, .. }, _) => outcome,
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
    assert!(s
        .tokens_of("d1", None, 100)
        .await
        .unwrap()
        .tokens
        .is_empty());
    assert_eq!(owner_of_live(&s, 1).await, None);
    assert_eq!(s.tokens_of("d10", None, 100).await.unwrap().tokens.len(), 1);
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
    let Store::Embedded(raw) = &s else {
        unreachable!("a temporary store is embedded")
    };
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
    let s = Store::open_embedded(dir.path(), 1 << 20, false, policy, true).unwrap();
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
        let db = open_raw(dir.path());
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", &99u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Store::open_embedded(dir.path(), 1 << 20, true, ReplayPolicy::default(), true),
        Err(StoreError::Schema { .. })
    ));
}

/// Issues a token of (user, host) under a cap; what the store did.
async fn issue(s: &Store, user: &str, host: &str, n: u8, max_per_user: u64) -> Applied {
    let change = Change::ReplaceToken {
        user: user.into(),
        host: host.into(),
        record: token(n),
        max_per_user,
    };
    s.apply(&req("backend", 1000 + u64::from(n), 1), change)
        .await
        .unwrap()
}

async fn hosts_of(s: &Store, user: &str) -> Vec<String> {
    let page = s.tokens_of(user, None, 1000).await.unwrap();
    page.tokens.into_iter().map(|(host, _)| host).collect()
}

/// Puts `record` as `id`; how many of user `id`'s tokens went with it.
async fn put_tokens(s: &Store, id: &str, record: EntityRecord, create_only: bool, n: u64) -> usize {
    let change = Change::PutEntity {
        id: id.into(),
        record,
        create_only,
        generated: None,
    };
    match s.apply(&req("ops", n, 1), change).await.unwrap() {
        Applied::Now(Changed::EntityPut { tokens, .. }, _) => tokens,
        other => panic!("{other:?}"),
    }
}

fn psk_entity(kind: EntityKind, hash: u8) -> EntityRecord {
    EntityRecord {
        kind,
        owner: None,
        psk: Some(PskHash {
            key_id: 1,
            hash: [hash; 32],
        }),
        cert_sha256: None,
        disabled: false,
        created: 1,
    }
}

#[tokio::test]
async fn a_reprovisioning_put_removes_the_users_tokens_with_it() {
    let s = Store::temporary().unwrap();
    // Tokens of a user who is no entity yet: creating the entity provisions the id.
    issue(&s, "u", "h1", 1, 10).await;
    issue(&s, "u", "h2", 2, 10).await;
    assert_eq!(
        put_tokens(&s, "u", psk_entity(EntityKind::User, 1), false, 1).await,
        2
    );
    assert!(hosts_of(&s, "u").await.is_empty());
    assert_eq!(owner_of_live(&s, 1).await, None);

    // A put that gives a PSK re-provisions, even the same one.
    issue(&s, "u", "h1", 3, 10).await;
    assert_eq!(
        put_tokens(&s, "u", psk_entity(EntityKind::User, 1), false, 2).await,
        1
    );
    assert_eq!(owner_of_live(&s, 3).await, None);

    // A refused create_only put changes nothing, tokens included.
    issue(&s, "u", "h1", 4, 10).await;
    assert_eq!(
        put(&s, "u", psk_entity(EntityKind::User, 2), true, 3).await,
        PutOutcome::Exists
    );
    assert_eq!(hosts_of(&s, "u").await, ["h1"]);

    // A certificate-only entity: only the owner changing keeps the tokens; a new pin, a
    // dropped pin (a PSK instead), a change of kind or disabling removes them.
    let cam = |owner: Option<&str>| EntityRecord {
        kind: EntityKind::User,
        ..entity(owner, 1)
    };
    put_tokens(&s, "c", cam(None), false, 4).await;
    issue(&s, "c", "h", 5, 10).await;
    assert_eq!(put_tokens(&s, "c", cam(Some("o")), false, 5).await, 0);
    assert_eq!(hosts_of(&s, "c").await, ["h"]);
    let changes = [
        EntityRecord {
            cert_sha256: Some([8; 32]),
            ..cam(None)
        },
        psk_entity(EntityKind::User, 3),
        EntityRecord {
            kind: EntityKind::Device,
            ..cam(None)
        },
        EntityRecord {
            disabled: true,
            ..cam(None)
        },
    ];
    for (i, record) in changes.into_iter().enumerate() {
        let n = 6 + i as u64 * 2;
        put_tokens(&s, "c", cam(None), false, n).await;
        issue(&s, "c", "h", 6 + i as u8, 10).await;
        assert_eq!(
            put_tokens(&s, "c", record.clone(), false, n + 1).await,
            1,
            "{record:?}"
        );
        assert!(hosts_of(&s, "c").await.is_empty(), "{record:?}");
    }
    // Another user's tokens are not touched.
    issue(&s, "c2", "h", 20, 10).await;
    put_tokens(&s, "c", psk_entity(EntityKind::User, 4), false, 30).await;
    assert_eq!(hosts_of(&s, "c2").await, ["h"]);
}

#[tokio::test]
async fn the_token_cap_refuses_only_new_hosts_and_counts_every_removal() {
    let s = Store::temporary().unwrap();
    assert!(matches!(
        issue(&s, "u", "h1", 1, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    assert!(matches!(
        issue(&s, "u", "h2", 2, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    let refused = issue(&s, "u", "h3", 3, 2).await;
    assert_eq!(
        refused,
        Applied::Now(Changed::TooManyTokens { limit: 2 }, Reply::Empty)
    );
    assert_eq!(hosts_of(&s, "u").await, ["h1", "h2"]);
    assert_eq!(owner_of_live(&s, 3).await, None);
    assert_eq!(
        recorded(&s, "backend", 1003, 1).await,
        Recorded::Nothing,
        "a refusal is an error: not recorded"
    );
    // Replacing a host's token is always allowed, and counts nothing new.
    assert!(matches!(
        issue(&s, "u", "h1", 4, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    assert!(matches!(
        issue(&s, "u", "h3", 5, 2).await,
        Applied::Now(Changed::TooManyTokens { .. }, _)
    ));
    // A revoke makes room for one.
    let revoke = Change::RevokeToken {
        user: "u".into(),
        host: "h2".into(),
    };
    s.apply(&req("backend", 1, 1), revoke).await.unwrap();
    assert!(matches!(
        issue(&s, "u", "h3", 6, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    assert!(matches!(
        issue(&s, "u", "h4", 7, 2).await,
        Applied::Now(Changed::TooManyTokens { .. }, _)
    ));
    // A delete empties the count; other users have their own.
    assert!(matches!(
        issue(&s, "v", "h1", 8, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    s.apply(&req("ops", 2, 1), Change::DeleteEntity { id: "u".into() })
        .await
        .unwrap();
    assert!(matches!(
        issue(&s, "u", "h4", 9, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    assert!(matches!(
        issue(&s, "u", "h5", 10, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    assert!(matches!(
        issue(&s, "u", "h6", 11, 2).await,
        Applied::Now(Changed::TooManyTokens { .. }, _)
    ));
    assert!(matches!(
        issue(&s, "v", "h2", 12, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
}

#[tokio::test]
async fn a_users_tokens_are_read_a_page_at_a_time() {
    let s = Store::temporary().unwrap();
    for n in 0..5u8 {
        issue(&s, "u", &format!("h{n}"), n, 10).await;
    }
    issue(&s, "u2", "h0", 9, 10).await;
    let first = s.tokens_of("u", None, 2).await.unwrap();
    let hosts = |p: &TokenPage| p.tokens.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>();
    assert_eq!(hosts(&first), ["h0", "h1"]);
    assert!(first.more);
    let second = s.tokens_of("u", Some("h1"), 2).await.unwrap();
    assert_eq!(hosts(&second), ["h2", "h3"]);
    let last = s.tokens_of("u", Some("h3"), 2).await.unwrap();
    assert_eq!(hosts(&last), ["h4"]);
    assert!(!last.more, "the next user's tokens are not this user's");
    assert!(!s.tokens_of("u", None, 5).await.unwrap().more);
}

#[tokio::test]
async fn a_disabled_src_or_dst_is_refused_in_the_same_call() {
    let s = Store::temporary().unwrap();
    let Store::Embedded(raw) = &s else {
        unreachable!("a temporary store is embedded")
    };
    raw.put_entity_raw("lamp", &entity(Some("alice"), 5));
    raw.put_entity_raw(
        "alice",
        &EntityRecord {
            kind: EntityKind::User,
            ..entity(None, 5)
        },
    );
    let anything = Rule {
        src: "*".into(),
        dst: "*".into(),
        cmd: "*".into(),
        effect: Effect::Allow,
    };
    s.apply(&req("op", 1, 1), Change::AddRule { rule: anything })
        .await
        .unwrap();
    assert_eq!(
        s.authorize("alice", "lamp", "x").await.unwrap(),
        Decision::Owner
    );
    assert_eq!(
        s.authorize("bob", "lamp", "x").await.unwrap(),
        Decision::Allow(1)
    );
    let off = |owner: Option<&str>, kind| EntityRecord {
        kind,
        disabled: true,
        ..entity(owner, 5)
    };
    raw.put_entity_raw("lamp", &off(Some("alice"), EntityKind::Device));
    assert_eq!(
        s.authorize("alice", "lamp", "x").await.unwrap(),
        Decision::Disabled
    );
    assert_eq!(
        s.authorize("bob", "lamp", "x").await.unwrap(),
        Decision::Disabled
    );
    raw.put_entity_raw("lamp", &entity(Some("alice"), 5));
    raw.put_entity_raw("alice", &off(None, EntityKind::User));
    assert_eq!(
        s.authorize("alice", "lamp", "x").await.unwrap(),
        Decision::Disabled
    );
    assert_eq!(
        s.authorize("bob", "lamp", "x").await.unwrap(),
        Decision::Allow(1)
    );
    assert_eq!(
        s.authorize("lamp", "alice", "x").await.unwrap(),
        Decision::Disabled
    );
}

/// A schema-1 database is what schema 2 writes minus the user flag and the token counts,
/// stamped 1: one is made that way (with raw sled), then opened by this build.
#[tokio::test]
async fn a_schema_1_database_is_upgraded_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let open =
        || Store::open_embedded(dir.path(), 1 << 20, true, ReplayPolicy::default(), true).unwrap();
    {
        let s = open();
        put_tokens(&s, "dev", psk_entity(EntityKind::Device, 1), false, 1).await;
        put_tokens(&s, "cam", entity(Some("alice"), 7), false, 2).await;
        for (n, (user, host)) in [("alice", "a"), ("alice", "b"), ("bob", "a")]
            .iter()
            .enumerate()
        {
            issue(&s, user, host, n as u8, 10).await;
        }
        s.apply(&req("op", 3, 1), add_rule("alice", Effect::Allow))
            .await
            .unwrap();
        s.flush().await.unwrap();
    }
    {
        let db = open_raw(dir.path());
        db.drop_tree("token_counts").unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", &1u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let s = open();
    let dev = s.entity("dev").await.unwrap().unwrap();
    assert_eq!(dev.kind, EntityKind::Device);
    assert_eq!(dev.psk, psk_entity(EntityKind::Device, 1).psk);
    let cam = s.entity("cam").await.unwrap().unwrap();
    assert_eq!(
        (cam.kind, cam.owner.as_deref(), cam.created),
        (EntityKind::Device, Some("alice"), 7)
    );
    assert_eq!(hosts_of(&s, "alice").await, ["a", "b"]);
    assert_eq!(owner_of_live(&s, 2).await, Some(("bob".into(), "a".into())));
    assert_eq!(
        s.authorize("alice", "d", "c").await.unwrap(),
        Decision::Allow(1)
    );
    assert!(matches!(
        recorded(&s, "backend", 1000, 1).await,
        Recorded::Same(_)
    ));
    // The counts were rebuilt: alice holds 2 of a cap of 2, bob 1.
    assert!(matches!(
        issue(&s, "alice", "c", 10, 2).await,
        Applied::Now(Changed::TooManyTokens { .. }, _)
    ));
    assert!(matches!(
        issue(&s, "bob", "b", 11, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    drop(s);
    let db = open_raw(dir.path());
    let version = db.open_tree("meta").unwrap().get("schema_version").unwrap();
    assert_eq!(
        version.as_deref(),
        Some(&crate::store::embedded::SCHEMA_VERSION.to_be_bytes()[..])
    );
}

/// The database in `dir` opened with raw sled, once the store that had it has let go of its
/// file lock (sled releases it a little after the last handle drops).
fn open_raw(dir: &std::path::Path) -> sled::Db {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < give_up => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("opening {}: {e}", dir.display()),
        }
    }
}

/// Every record of `s`, in export order.
async fn exported(s: &Store) -> Vec<Record> {
    let mut records = Vec::new();
    let n = s
        .export(&mut |r| {
            records.push(r);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(n, records.len() as u64);
    records
}

/// A store with a bit of everything: entities of each shape, tokens of two users, rules with
/// a gap where one was deleted.
async fn provisioned() -> Store {
    let s = Store::temporary().unwrap();
    let mut alice = psk_entity(EntityKind::User, 1);
    alice.created = 5;
    put(&s, "alice", alice, false, 1).await;
    put(&s, "cam", entity(Some("alice"), 6), false, 2).await;
    let mut off = psk_entity(EntityKind::Device, 3);
    off.disabled = true;
    off.owner = Some("bob".into());
    off.cert_sha256 = Some([7; 32]);
    put(&s, "off", off, false, 3).await;
    issue(&s, "alice", "app1", 1, 10).await;
    issue(&s, "alice", "app2", 2, 10).await;
    issue(&s, "bob", "app1", 3, 10).await;
    added_id(&s, 10, add_rule("a", Effect::Allow)).await;
    added_id(&s, 11, add_rule("b", Effect::Deny)).await;
    added_id(&s, 12, add_rule("x", Effect::Allow)).await;
    s.apply(&req("op", 13, 1), Change::DeleteRule { rule_id: 2 })
        .await
        .unwrap();
    s
}

#[tokio::test]
async fn export_then_restore_moves_everything_and_every_index() {
    let from = provisioned().await;
    let records = exported(&from).await;
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| match r {
            Record::Entity { .. } => "entity",
            Record::Token { .. } => "token",
            Record::Rule { .. } => "rule",
            Record::NextRuleId(_) => "next",
        })
        .collect();
    assert_eq!(
        kinds,
        ["entity", "entity", "entity", "token", "token", "token", "rule", "rule", "next"]
    );
    assert_eq!(records.last(), Some(&Record::NextRuleId(4)));

    let to = Store::temporary().unwrap();
    for batch in records.chunks(2) {
        to.restore(batch.to_vec()).await.unwrap();
    }
    assert_eq!(
        exported(&to).await,
        records,
        "the same records, in the same order"
    );
    // The indexes: an owner's entities, token ids, the rule index, the token count.
    let alices = to.list_entities(Some("alice"), "", None, 10).await.unwrap();
    assert_eq!(ids(&alices), ["cam"]);
    let live = to.live_token(&[2; 16]).await.unwrap().unwrap();
    assert_eq!((live.user.as_str(), live.host.as_str()), ("alice", "app2"));
    assert_eq!(
        to.authorize("a", "d", "c").await.unwrap(),
        Decision::Allow(1)
    );
    assert_eq!(
        to.authorize("x", "d", "c").await.unwrap(),
        Decision::Allow(3)
    );
    assert_eq!(
        to.authorize("b", "d", "c").await.unwrap(),
        Decision::DefaultDeny
    );
    assert_eq!(
        to.authorize("alice", "cam", "c").await.unwrap(),
        Decision::Owner
    );
    assert_eq!(
        to.authorize("bob", "off", "c").await.unwrap(),
        Decision::Disabled
    );
    assert!(matches!(
        issue(&to, "alice", "app3", 9, 2).await,
        Applied::Now(Changed::TooManyTokens { limit: 2 }, _)
    ));
    assert!(matches!(
        issue(&to, "bob", "app2", 9, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    assert_eq!(
        added_id(&to, 20, add_rule("y", Effect::Allow)).await,
        4,
        "ids go on from the old store's counter"
    );
}

#[tokio::test]
async fn restoring_the_same_records_again_changes_nothing() {
    let records = exported(&provisioned().await).await;
    let to = Store::temporary().unwrap();
    to.restore(records.clone()).await.unwrap();
    to.restore(records.clone()).await.unwrap();
    // Twice within one batch, too.
    let doubled: Vec<Record> = records.iter().chain(&records).cloned().collect();
    to.restore(doubled).await.unwrap();
    assert_eq!(exported(&to).await, records);
    let alices = to.list_entities(Some("alice"), "", None, 10).await.unwrap();
    assert_eq!(ids(&alices), ["cam"]);
    // Still two tokens for alice: a third host fits under a cap of 3.
    assert!(matches!(
        issue(&to, "alice", "app3", 9, 3).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    assert!(matches!(
        issue(&to, "alice", "app4", 8, 3).await,
        Applied::Now(Changed::TooManyTokens { .. }, _)
    ));
    // The rule index holds each rule once: deleting it leaves no decision behind.
    to.apply(&req("op", 30, 1), Change::DeleteRule { rule_id: 1 })
        .await
        .unwrap();
    assert_eq!(
        to.authorize("a", "d", "c").await.unwrap(),
        Decision::DefaultDeny
    );
}

#[tokio::test]
async fn a_restored_record_replaces_what_has_its_key() {
    let s = Store::temporary().unwrap();
    let restore = |records: Vec<Record>| {
        let s = s.clone();
        async move { s.restore(records).await.unwrap() }
    };
    let owned = |owner: &str| Record::Entity {
        id: "d".into(),
        entity: entity(Some(owner), 1),
    };
    let token_of = |n: u8| Record::Token {
        user: "u".into(),
        host: "h".into(),
        token: token(n),
    };
    restore(vec![
        owned("alice"),
        token_of(1),
        Record::Rule {
            rule_id: 7,
            rule: rule("a", Effect::Allow),
        },
        Record::NextRuleId(20),
    ])
    .await;
    restore(vec![
        owned("bob"),
        token_of(2),
        Record::Rule {
            rule_id: 7,
            rule: rule("b", Effect::Deny),
        },
        Record::NextRuleId(3),
    ])
    .await;
    assert!(s
        .list_entities(Some("alice"), "", None, 10)
        .await
        .unwrap()
        .entities
        .is_empty());
    assert_eq!(
        ids(&s.list_entities(Some("bob"), "", None, 10).await.unwrap()),
        ["d"]
    );
    assert_eq!(
        owner_of_live(&s, 1).await,
        None,
        "the replaced token's id is retired"
    );
    assert_eq!(owner_of_live(&s, 2).await, Some(("u".into(), "h".into())));
    assert!(matches!(
        issue(&s, "u", "h2", 5, 2).await,
        Applied::Now(Changed::TokenReplaced { .. }, _)
    ));
    assert_eq!(
        s.authorize("a", "d", "c").await.unwrap(),
        Decision::DefaultDeny
    );
    assert_eq!(s.authorize("b", "d", "c").await.unwrap(), Decision::Deny(7));
    assert_eq!(
        added_id(&s, 1, add_rule("c", Effect::Allow)).await,
        20,
        "the counter never goes down"
    );
    // A rule restored above the counter raises it.
    restore(vec![Record::Rule {
        rule_id: 40,
        rule: rule("z", Effect::Allow),
    }])
    .await;
    assert_eq!(added_id(&s, 2, add_rule("c", Effect::Allow)).await, 41);
}

#[test]
fn records_read_and_write_as_documented_json() {
    let entity = Record::Entity {
        id: "dev1".into(),
        entity: EntityRecord {
            kind: EntityKind::User,
            owner: Some("alice".into()),
            psk: Some(PskHash {
                key_id: 2,
                hash: [0xab; 32],
            }),
            cert_sha256: Some([0x01; 32]),
            disabled: true,
            created: 1_700_000_000,
        },
    };
    let text = serde_json::to_string(&entity).unwrap();
    assert_eq!(
        text,
        format!(
            r#"{{"record":"entity","id":"dev1","kind":"user","owner":"alice","disabled":true,"created":1700000000,"psk":{{"key_id":2,"hash":"{}"}},"cert_sha256":"{}"}}"#,
            "ab".repeat(32),
            "01".repeat(32)
        )
    );
    let token = Record::Token {
        user: "alice".into(),
        host: "app1".into(),
        token: token(0x5c),
    };
    let rule = Record::Rule {
        rule_id: 3,
        rule: rule("a", Effect::Deny),
    };
    assert_eq!(
        serde_json::to_string(&token).unwrap(),
        format!(
            r#"{{"record":"token","user":"alice","host":"app1","token_id":"{}","key_id":1,"created":10}}"#,
            "5c".repeat(16)
        )
    );
    assert_eq!(
        serde_json::to_string(&rule).unwrap(),
        r#"{"record":"rule","rule_id":3,"src":"a","dst":"d","cmd":"c","effect":"deny"}"#
    );
    for r in [entity, token, rule, Record::NextRuleId(9)] {
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
    let bare: Record = serde_json::from_str(
        r#"{"record":"entity","id":"d","kind":"device","disabled":false,"created":1}"#,
    )
    .unwrap();
    assert_eq!(bare.key_id(), None);

    for (line, says) in [
        (
            r#"{"record":"entity","id":"","kind":"device","disabled":false,"created":1}"#,
            "id:",
        ),
        (
            r#"{"record":"entity","id":"d","kind":"device","disabled":false,"created":1,"psk":{"key_id":1,"hash":"ab"}}"#,
            "psk.hash",
        ),
        (
            r#"{"record":"entity","id":"d","kind":"device","disabled":false,"created":1,"cert_sha256":"zz"}"#,
            "cert_sha256",
        ),
        (
            r#"{"record":"entity","id":"d","kind":"device","disabled":false,"created":1,"extra":1}"#,
            "extra",
        ),
        (
            r#"{"record":"entity","id":"d","kind":"device","created":1}"#,
            "disabled",
        ),
        (
            r#"{"record":"token","user":"u","host":"h","token_id":"00","key_id":1,"created":1}"#,
            "token_id",
        ),
        (
            r#"{"record":"rule","rule_id":0,"src":"a","dst":"b","cmd":"c","effect":"allow"}"#,
            "rule_id",
        ),
        (
            r#"{"record":"rule","rule_id":1,"src":"a","dst":"b\u0001","cmd":"c","effect":"allow"}"#,
            "dst:",
        ),
        (
            r#"{"record":"next_rule_id","next_rule_id":0}"#,
            "next_rule_id",
        ),
        (r#"{"record":"replay"}"#, "replay"),
    ] {
        let e = serde_json::from_str::<Record>(line)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{line}: {e}");
    }
}
