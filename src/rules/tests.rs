use std::collections::BTreeMap;

use super::*;
use proptest::prelude::*;

/// The obvious definition, by dynamic programming over characters.
fn reference(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // m[i][j]: p[..i] matches t[..j].
    let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
    m[0][0] = true;
    for i in 1..=p.len() {
        for j in 0..=t.len() {
            m[i][j] = if p[i - 1] == '*' {
                m[i - 1][j] || (j > 0 && m[i][j - 1])
            } else {
                j > 0 && m[i - 1][j - 1] && p[i - 1] == t[j - 1]
            };
        }
    }
    m[p.len()][t.len()]
}

fn rule(src: &str, dst: &str, cmd: &str, effect: Effect) -> Rule {
    Rule {
        src: src.into(),
        dst: dst.into(),
        cmd: cmd.into(),
        effect,
    }
}

const ALPHABET: &str = "[ab*/.+#?é]{0,8}";

proptest! {
    #[test]
    fn matcher_agrees_with_the_reference(pattern in ALPHABET, text in "[ab*/.+#?é]{0,10}") {
        prop_assert_eq!(matches(&pattern, &text), reference(&pattern, &text));
    }

    /// Text derived from the pattern (each star replaced by something) always matches.
    #[test]
    fn a_pattern_matches_its_own_expansions(pattern in ALPHABET, fill in "[ab/é]{0,3}") {
        let text = pattern.replace('*', &fill);
        prop_assert!(matches(&pattern, &text));
        prop_assert!(reference(&pattern, &text));
    }

    /// The index finds exactly what a scan of every rule finds, also after removals.
    #[test]
    fn index_agrees_with_a_scan(
        rules in prop::collection::vec(
            (ALPHABET, ALPHABET, "[ab*]{0,3}", any::<bool>()), 0..40),
        removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        queries in prop::collection::vec(
            ("[ab/.+#é]{0,6}", "[ab/.+#é]{0,6}", "[ab]{0,3}"), 1..20),
    ) {
        let mut index = RuleIndex::new();
        let mut all = BTreeMap::new();
        for (n, (s, d, c, deny)) in rules.iter().enumerate() {
            let effect = if *deny { Effect::Deny } else { Effect::Allow };
            let id = n as u64 + 1;
            index.insert(id, &rule(s, d, c, effect));
            all.insert(id, rule(s, d, c, effect));
        }
        for r in &removed {
            if !all.is_empty() {
                let id = *all.keys().nth(r.index(all.len())).unwrap_or(&0);
                let gone = all.remove(&id).unwrap();
                prop_assert!(index.remove(id, &gone));
            }
        }
        prop_assert_eq!(index.len(), all.len());
        // Random texts rarely match long patterns: also ask with each rule's expansion.
        let expansions = rules.iter().map(|(s, d, c, _)| {
            (s.replace('*', "a/"), d.replace('*', ""), c.replace('*', "b"))
        });
        for (s, d, c) in queries.iter().cloned().chain(expansions) {
            let (s, d, c) = (s.as_str(), d.as_str(), c.as_str());
            for effect in [Effect::Allow, Effect::Deny] {
                let scan = all.iter().find(|(_, r)| {
                    r.effect == effect
                        && reference(&r.src, s)
                        && reference(&r.dst, d)
                        && reference(&r.cmd, c)
                }).map(|(id, _)| *id);
                let found = index.matches(s, d, c);
                let indexed = match effect {
                    Effect::Allow => found.allow,
                    Effect::Deny => found.deny,
                };
                prop_assert_eq!(indexed, scan, "{:?} {} {} {}", effect, s, d, c);
            }
        }
    }
}

#[test]
fn metacharacters_are_literal() {
    assert!(matches("a.b", "a.b"));
    assert!(!matches("a.b", "axb"));
    assert!(matches("dev/+/cmd", "dev/+/cmd"));
    assert!(!matches("dev/+/cmd", "dev/x/cmd"));
    assert!(!matches("dev/#", "dev/x"));
    assert!(!matches("a?", "ab"));
    assert!(!matches("[ab]", "a"));
    assert!(matches("[ab]", "[ab]"));
    assert!(
        matches("a\\*", "a\\anything"),
        "backslash does not escape the star"
    );
    assert!(!matches("^a$", "a"));
    assert!(matches("*", ""));
    assert!(matches("*", "a/b/c"));
    assert!(matches("dev/*", "dev/"));
    assert!(matches("dev/*/reboot", "dev/x/y/reboot"));
    assert!(!matches("dev/*/reboot", "dev/reboot"));
    assert!(matches("a*a", "aa"));
    assert!(!matches("a*a", "a"));
}

#[test]
fn deny_beats_owner_beats_allow() {
    let mut index = RuleIndex::new();
    let owner = |who: &str| Parties {
        dst_owner: Some(who.to_owned()),
        ..Parties::default()
    };
    let nobody = &Parties::default();

    assert_eq!(index.decide("u", "d", "c", nobody), Decision::DefaultDeny);
    assert_eq!(index.decide("u", "d", "c", &owner("u")), Decision::Owner);
    assert_eq!(
        index.decide("u", "d", "c", &owner("someone else")),
        Decision::DefaultDeny
    );

    index.insert(1, &rule("u", "d", "*", Effect::Allow));
    assert_eq!(index.decide("u", "d", "c", nobody), Decision::Allow(1));
    assert_eq!(index.decide("u", "d", "c", &owner("u")), Decision::Owner);

    let deny = rule("*", "d", "c", Effect::Deny);
    index.insert(2, &deny);
    assert_eq!(index.decide("u", "d", "c", nobody), Decision::Deny(2));
    assert_eq!(index.decide("u", "d", "c", &owner("u")), Decision::Deny(2));
    assert!(!Decision::Deny(2).allowed());
    assert_eq!(index.decide("u", "d", "other", nobody), Decision::Allow(1));

    // Removing the deny rule takes effect at once.
    assert!(index.remove(2, &deny));
    assert_eq!(index.decide("u", "d", "c", nobody), Decision::Allow(1));
    assert!(!index.remove(2, &deny));
    assert_eq!(index.len(), 1);
}

/// A disabled `src` or `dst` is refused before any rule and before ownership.
#[test]
fn a_disabled_party_is_refused_before_any_rule() {
    let mut index = RuleIndex::new();
    index.insert(1, &rule("u", "d", "*", Effect::Allow));
    index.insert(2, &rule("*", "*", "Reboot", Effect::Deny));
    let owned = Parties {
        dst_owner: Some("u".into()),
        ..Parties::default()
    };
    assert_eq!(index.decide("u", "d", "On", &owned), Decision::Owner);
    for parties in [
        Parties {
            src_disabled: true,
            ..owned.clone()
        },
        Parties {
            dst_disabled: true,
            ..owned.clone()
        },
    ] {
        for cmd in ["On", "Reboot"] {
            let decision = index.decide("u", "d", cmd, &parties);
            assert_eq!(decision, Decision::Disabled, "{cmd} {parties:?}");
            assert!(!decision.allowed());
            assert_eq!(decision.reason(), "disabled");
            assert_eq!(decision.rule_id(), None);
        }
    }
}

#[test]
fn lowest_matching_rule_is_named_and_duplicates_are_separate() {
    let mut index = RuleIndex::new();
    let (r5, r3, r9) = (
        rule("u", "d/*", "c", Effect::Allow),
        rule("u*", "d/1", "*", Effect::Allow),
        rule("u", "d/*", "c", Effect::Allow),
    );
    index.insert(5, &r5);
    index.insert(3, &r3);
    index.insert(9, &r9);
    index.insert(9, &r9);
    assert_eq!(index.len(), 3, "an id is indexed once");
    let allow = |index: &RuleIndex| index.matches("u", "d/1", "c").allow;
    assert_eq!(allow(&index), Some(3));
    assert!(index.remove(3, &r3));
    assert_eq!(allow(&index), Some(5));
    assert!(index.remove(5, &r5));
    assert_eq!(allow(&index), Some(9));
    assert!(index.remove(9, &r9));
    assert_eq!(allow(&index), None);
    assert!(index.is_empty());
    assert!(index.tree_is_empty(), "removals prune the tree");
}

#[test]
fn affixes_that_split_a_character_are_skipped() {
    let mut index = RuleIndex::new();
    // "é" is two bytes; a one-byte prefix of the text falls inside it.
    index.insert(1, &rule("x*", "*", "*", Effect::Allow));
    index.insert(2, &rule("*x", "*", "*", Effect::Allow));
    index.insert(3, &rule("éé*", "*", "*", Effect::Allow));
    assert_eq!(index.matches("é", "d", "c").allow, None);
    assert_eq!(index.matches("ééa", "d", "c").allow, Some(3));
    assert_eq!(index.matches("éx", "d", "c").allow, Some(2));
}
