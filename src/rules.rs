//! Access rules (docs/protocol.md#auth-authorizecommand, #acl-add): the pattern language, the decision
//! order, and an in-memory index that keeps a decision's cost independent of the number of
//! rules that cannot match it.
//!
//! A pattern is literal text in which `*` matches any run of characters (none, or many,
//! `/` included). Nothing else is special: `.`, `+`, `#`, `?`, `[` and `\` are themselves.
//!
//! The index is a three-level tree, one level per field (`src` → `dst` → `cmd`), with the
//! rule ids at the leaves and one tree per effect. Each level ([`FieldIndex`]) looks a field
//! up by hash when its pattern is literal, and buckets wildcard patterns by their literal
//! prefix (or, for patterns starting with `*`, by their literal suffix), so a lookup visits
//! only buckets whose affix the text actually has. Only patterns that start *and* end with
//! `*` (like `*` itself, one shared entry however many rules use it) are scanned.
//!
//! Pure in-memory logic: the store keeps the rules and rebuilds this index from them.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;

use fxhash::FxHasher;

use serde::{Deserialize, Serialize};

/// What a matching rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}

/// One access rule: whether `src` may send `cmd` to `dst`, each a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub src: String,
    pub dst: String,
    pub cmd: String,
    pub effect: Effect,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} src={:?} dst={:?} cmd={:?}",
            self.effect.as_str(),
            self.src,
            self.dst,
            self.cmd
        )
    }
}

/// Why AuthorizeCommand answered as it did, in the documented order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A `deny` rule matched (the lowest-numbered one is named).
    Deny(u64),
    /// `dst` is an entity owned by `src`.
    Owner,
    /// An `allow` rule matched (the lowest-numbered one is named).
    Allow(u64),
    /// Nothing matched.
    DefaultDeny,
}

impl Decision {
    pub fn allowed(self) -> bool {
        matches!(self, Decision::Owner | Decision::Allow(_))
    }

    /// A word for logs: `deny_rule`, `owner`, `allow_rule` or `default_deny`.
    pub fn reason(self) -> &'static str {
        match self {
            Decision::Deny(_) => "deny_rule",
            Decision::Owner => "owner",
            Decision::Allow(_) => "allow_rule",
            Decision::DefaultDeny => "default_deny",
        }
    }

    /// The deciding rule, if a rule decided.
    pub fn rule_id(self) -> Option<u64> {
        match self {
            Decision::Deny(id) | Decision::Allow(id) => Some(id),
            Decision::Owner | Decision::DefaultDeny => None,
        }
    }
}

/// Whether `text` matches `pattern` (`*` = any run of characters, all else literal).
pub fn matches(pattern: &str, text: &str) -> bool {
    match Glob::compile(pattern) {
        None => pattern == text,
        Some(glob) => glob.matches(text),
    }
}

/// A pattern with at least one `*`: `prefix*…*suffix`, kept as its text and where its
/// literal prefix and suffix end (the index holds many; one allocation each).
#[derive(Debug, Clone)]
struct Glob {
    pattern: Box<str>,
    prefix_len: u32,
    suffix_len: u32,
}

impl Glob {
    /// `None` for a pattern without `*` (a literal).
    fn compile(pattern: &str) -> Option<Glob> {
        let first = pattern.find('*')?;
        let last = pattern.rfind('*')?;
        Some(Glob {
            pattern: pattern.into(),
            prefix_len: u32::try_from(first).ok()?,
            suffix_len: u32::try_from(pattern.len() - last - 1).ok()?,
        })
    }

    fn prefix(&self) -> &str {
        &self.pattern[..self.prefix_len as usize]
    }

    fn suffix(&self) -> &str {
        &self.pattern[self.pattern.len() - self.suffix_len as usize..]
    }

    fn matches(&self, text: &str) -> bool {
        let (prefix, suffix) = (self.prefix(), self.suffix());
        // The emptiness tests are not redundant: they keep the common `*…` and `…*` patterns
        // from calling memcmp, which costs more than everything else here.
        if text.len() < prefix.len() + suffix.len()
            || (!prefix.is_empty() && !text.starts_with(prefix))
            || (!suffix.is_empty() && !text.ends_with(suffix))
        {
            return false;
        }
        // Both ends are anchored; each piece between stars is placed leftmost, which leaves
        // the most room for the pieces after it, so greedy search is exact.
        let mut rest = &text[prefix.len()..text.len() - suffix.len()];
        let middle = &self.pattern[prefix.len()..self.pattern.len() - suffix.len()];
        for piece in middle.split('*').filter(|p| !p.is_empty()) {
            match rest.find(piece) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        true
    }
}

/// Hash maps of the index. FxHash, not SipHash: keys are patterns an admin wrote, lookups
/// are on the hot path, and the hash of a short name is most of a lookup's cost.
type Map<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Appends to a vector that stays small, growing it by one, not by doubling: the index has
/// a great many of them and most hold a single item.
fn push_exact<T>(v: &mut Vec<T>, item: T) {
    v.reserve_exact(1);
    v.push(item);
}

/// A node of the index: something that can become empty and be pruned.
trait Node: Default {
    fn is_empty(&self) -> bool;
}

/// The rules at the end of one (src, dst, cmd) path: `(id, effect)` sorted by id. Usually
/// one; more when rules repeat a pattern triple.
type Leaf = Vec<(u64, Effect)>;

impl Node for Leaf {
    fn is_empty(&self) -> bool {
        <[_]>::is_empty(self)
    }
}

/// Literal patterns and their children: a short list while there are few (most nodes have
/// one or two), a hash map beyond that.
enum Literals<T> {
    Few(Vec<(Box<str>, T)>),
    Many(Map<Box<str>, T>),
}

const FEW_LITERALS: usize = 8;

impl<T: Node> Literals<T> {
    fn get(&self, text: &str) -> Option<&T> {
        match self {
            Literals::Few(v) => v.iter().find(|(k, _)| **k == *text).map(|(_, t)| t),
            Literals::Many(m) => m.get(text),
        }
    }

    fn get_mut(&mut self, text: &str) -> Option<&mut T> {
        match self {
            Literals::Few(v) => v.iter_mut().find(|(k, _)| **k == *text).map(|(_, t)| t),
            Literals::Many(m) => m.get_mut(text),
        }
    }

    fn entry(&mut self, pattern: &str) -> &mut T {
        if let Literals::Few(v) = self {
            if v.len() >= FEW_LITERALS && !v.iter().any(|(k, _)| **k == *pattern) {
                *self = Literals::Many(std::mem::take(v).into_iter().collect());
            }
        }
        match self {
            Literals::Few(v) => {
                let at = match v.iter().position(|(k, _)| **k == *pattern) {
                    Some(at) => at,
                    None => {
                        push_exact(v, (pattern.into(), T::default()));
                        v.len() - 1
                    }
                };
                &mut v[at].1
            }
            Literals::Many(m) => m.entry(pattern.into()).or_default(),
        }
    }

    fn remove(&mut self, pattern: &str) {
        match self {
            Literals::Few(v) => v.retain(|(k, _)| **k != *pattern),
            Literals::Many(m) => {
                m.remove(pattern);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Literals::Few(v) => v.is_empty(),
            Literals::Many(m) => m.is_empty(),
        }
    }
}

/// Wildcard patterns with their children. Few per bucket, so a list.
type Globs<T> = Vec<(Glob, T)>;

fn glob_entry<T: Default>(globs: &mut Globs<T>, glob: Glob) -> &mut T {
    let at = match globs.iter().position(|(g, _)| g.pattern == glob.pattern) {
        Some(at) => at,
        None => {
            push_exact(globs, (glob, T::default()));
            globs.len() - 1
        }
    };
    &mut globs[at].1
}

fn glob_mut<'a, T>(globs: &'a mut Globs<T>, pattern: &str) -> Option<&'a mut T> {
    globs
        .iter_mut()
        .find(|(g, _)| *g.pattern == *pattern)
        .map(|(_, t)| t)
}

fn prune_globs<T: Node>(globs: &mut Globs<T>) {
    globs.retain(|(_, t)| !t.is_empty());
}

/// Wildcard patterns grouped by one literal affix (prefix or suffix) of a known length.
struct AffixBuckets<T> {
    /// affix → its patterns.
    buckets: Map<Box<str>, Globs<T>>,
    /// (affix length, how many buckets have an affix of that length), by length. A lookup
    /// tries each length once, so its cost is bounded by the distinct lengths (≤ 256), not
    /// by the rules.
    lengths: Vec<(usize, usize)>,
}

impl<T> Default for AffixBuckets<T> {
    fn default() -> Self {
        AffixBuckets {
            buckets: Map::default(),
            lengths: Vec::new(),
        }
    }
}

impl<T: Node> AffixBuckets<T> {
    fn entry(&mut self, affix: &str, glob: Glob) -> &mut T {
        if !self.buckets.contains_key(affix) {
            match self.lengths.binary_search_by_key(&affix.len(), |&(l, _)| l) {
                Ok(at) => self.lengths[at].1 += 1,
                Err(at) => self.lengths.insert(at, (affix.len(), 1)),
            }
        }
        glob_entry(self.buckets.entry(affix.into()).or_default(), glob)
    }

    fn get_mut(&mut self, affix: &str, pattern: &str) -> Option<&mut T> {
        glob_mut(self.buckets.get_mut(affix)?, pattern)
    }

    fn prune(&mut self, affix: &str) {
        let Some(bucket) = self.buckets.get_mut(affix) else {
            return;
        };
        prune_globs(bucket);
        if bucket.is_empty() {
            self.buckets.remove(affix);
            if let Ok(at) = self.lengths.binary_search_by_key(&affix.len(), |&(l, _)| l) {
                self.lengths[at].1 -= 1;
                if self.lengths[at].1 == 0 {
                    self.lengths.remove(at);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Calls `f` with the child of every pattern that matches `text` in a bucket whose
    /// affix `text` has (at its end if `suffixes`, else at its start).
    fn for_each_match<'a>(&'a self, text: &str, suffixes: bool, f: &mut impl FnMut(&'a T)) {
        for &(len, _) in &self.lengths {
            if len > text.len() {
                break; // lengths are sorted: no longer affix fits either
            }
            let affix = if suffixes {
                text.get(text.len() - len..)
            } else {
                text.get(..len)
            };
            // `None`: the cut falls inside a character, so no affix (whole characters) equals it.
            if let Some(bucket) = affix.and_then(|a| self.buckets.get(a)) {
                for (glob, child) in bucket {
                    if glob.matches(text) {
                        f(child);
                    }
                }
            }
        }
    }
}

/// The wildcard patterns of one field. Boxed and made on demand: most nodes have none.
struct Wildcards<T> {
    prefixed: AffixBuckets<T>,
    suffixed: AffixBuckets<T>,
    /// Patterns that start and end with `*`: the only ones a lookup tries one by one.
    floating: Globs<T>,
}

impl<T> Default for Wildcards<T> {
    fn default() -> Self {
        Wildcards {
            prefixed: AffixBuckets::default(),
            suffixed: AffixBuckets::default(),
            floating: Vec::new(),
        }
    }
}

/// The patterns of one field, each leading to a child node (the next field's index, or the
/// rules at the last field).
struct FieldIndex<T> {
    literals: Literals<T>,
    wildcards: Option<Box<Wildcards<T>>>,
}

impl<T> Default for FieldIndex<T> {
    fn default() -> Self {
        FieldIndex {
            literals: Literals::Few(Vec::new()),
            wildcards: None,
        }
    }
}

impl<T: Node> Node for FieldIndex<T> {
    fn is_empty(&self) -> bool {
        self.literals.is_empty() && self.wildcards.is_none()
    }
}

impl<T: Node> FieldIndex<T> {
    /// The child of `pattern`, created if new.
    fn entry(&mut self, pattern: &str) -> &mut T {
        let Some(glob) = Glob::compile(pattern) else {
            return self.literals.entry(pattern);
        };
        let wild = self.wildcards.get_or_insert_with(Box::default);
        if glob.prefix_len > 0 {
            wild.prefixed
                .entry(&pattern[..glob.prefix_len as usize], glob)
        } else if glob.suffix_len > 0 {
            let affix = &pattern[pattern.len() - glob.suffix_len as usize..];
            wild.suffixed.entry(affix, glob)
        } else {
            glob_entry(&mut wild.floating, glob)
        }
    }

    /// Runs `f` on the child of `pattern` if it exists, then drops the child if that left it
    /// empty.
    fn update<R>(&mut self, pattern: &str, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let Some(glob) = Glob::compile(pattern) else {
            let child = self.literals.get_mut(pattern)?;
            let r = f(child);
            if child.is_empty() {
                self.literals.remove(pattern);
            }
            return Some(r);
        };
        let wild = self.wildcards.as_mut()?;
        let r = if glob.prefix_len > 0 {
            let affix = glob.prefix();
            let r = f(wild.prefixed.get_mut(affix, pattern)?);
            wild.prefixed.prune(affix);
            r
        } else if glob.suffix_len > 0 {
            let affix = glob.suffix();
            let r = f(wild.suffixed.get_mut(affix, pattern)?);
            wild.suffixed.prune(affix);
            r
        } else {
            let r = f(glob_mut(&mut wild.floating, pattern)?);
            prune_globs(&mut wild.floating);
            r
        };
        if wild.prefixed.is_empty() && wild.suffixed.is_empty() && wild.floating.is_empty() {
            self.wildcards = None;
        }
        Some(r)
    }

    /// Calls `f` with the child of every pattern that matches `text`.
    fn for_each_match<'a>(&'a self, text: &str, f: &mut impl FnMut(&'a T)) {
        if let Some(child) = self.literals.get(text) {
            f(child);
        }
        if let Some(wild) = &self.wildcards {
            wild.prefixed.for_each_match(text, false, f);
            wild.suffixed.for_each_match(text, true, f);
            for (glob, child) in &wild.floating {
                if glob.matches(text) {
                    f(child);
                }
            }
        }
    }
}

/// src → dst → cmd → rules.
type BySrc = FieldIndex<FieldIndex<FieldIndex<Leaf>>>;

/// The lowest-numbered matching rule of each effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Matches {
    pub deny: Option<u64>,
    pub allow: Option<u64>,
}

/// All rules, indexed for [`RuleIndex::decide`]. Holds the patterns only once (as the tree's
/// keys); removing a rule takes the rule, which the store reads back from its record.
#[derive(Default)]
pub struct RuleIndex {
    tree: BySrc,
    len: usize,
}

impl RuleIndex {
    pub fn new() -> RuleIndex {
        RuleIndex::default()
    }

    /// How many rules are indexed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds rule `id` (ids are unique: adding one twice keeps one).
    pub fn insert(&mut self, id: u64, rule: &Rule) {
        let leaf = self.tree.entry(&rule.src).entry(&rule.dst).entry(&rule.cmd);
        if let Err(at) = leaf.binary_search_by_key(&id, |&(i, _)| i) {
            leaf.reserve_exact(1);
            leaf.insert(at, (id, rule.effect));
            self.len += 1;
        }
    }

    /// Removes rule `id`, which is `rule`. Returns whether it was there.
    pub fn remove(&mut self, id: u64, rule: &Rule) -> bool {
        let removed = self.tree.update(&rule.src, |by_dst| {
            by_dst.update(&rule.dst, |by_cmd| {
                by_cmd.update(&rule.cmd, |leaf| {
                    let at = leaf.binary_search_by_key(&id, |&(i, _)| i).ok()?;
                    leaf.remove(at);
                    Some(())
                })
            })
        });
        let removed = removed.flatten().flatten().flatten().is_some();
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// The lowest-numbered deny and allow rules that match (src, dst, cmd), found in one
    /// walk of the index.
    pub fn matches(&self, src: &str, dst: &str, cmd: &str) -> Matches {
        let mut found = Matches::default();
        self.tree.for_each_match(src, &mut |by_dst| {
            by_dst.for_each_match(dst, &mut |by_cmd| {
                by_cmd.for_each_match(cmd, &mut |leaf| {
                    for &(id, effect) in leaf {
                        let slot = match effect {
                            Effect::Deny => &mut found.deny,
                            Effect::Allow => &mut found.allow,
                        };
                        // The leaf is sorted: its first rule of an effect is its lowest.
                        if !matches!(*slot, Some(s) if s <= id) {
                            *slot = Some(id);
                        }
                    }
                });
            });
        });
        found
    }

    /// Decides whether `src` may send `cmd` to `dst`, in the documented order: a matching deny rule,
    /// then ownership (`owner_of_dst` is asked only when no deny rule matched), then a
    /// matching allow rule, else deny.
    pub fn decide<E>(
        &self,
        src: &str,
        dst: &str,
        cmd: &str,
        owner_of_dst: impl FnOnce() -> Result<Option<String>, E>,
    ) -> Result<Decision, E> {
        let found = self.matches(src, dst, cmd);
        if let Some(id) = found.deny {
            return Ok(Decision::Deny(id));
        }
        if owner_of_dst()?.as_deref() == Some(src) {
            return Ok(Decision::Owner);
        }
        Ok(match found.allow {
            Some(id) => Decision::Allow(id),
            None => Decision::DefaultDeny,
        })
    }
}

#[cfg(test)]
mod tests {
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
        let owner = |who: &str| {
            let who = who.to_owned();
            move || Ok::<_, ()>(Some(who))
        };
        let nobody = || Ok::<_, ()>(None);

        assert_eq!(
            index.decide("u", "d", "c", nobody),
            Ok(Decision::DefaultDeny)
        );
        assert_eq!(index.decide("u", "d", "c", owner("u")), Ok(Decision::Owner));
        assert_eq!(
            index.decide("u", "d", "c", owner("someone else")),
            Ok(Decision::DefaultDeny)
        );

        index.insert(1, &rule("u", "d", "*", Effect::Allow));
        assert_eq!(index.decide("u", "d", "c", nobody), Ok(Decision::Allow(1)));
        assert_eq!(index.decide("u", "d", "c", owner("u")), Ok(Decision::Owner));

        let deny = rule("*", "d", "c", Effect::Deny);
        index.insert(2, &deny);
        assert_eq!(index.decide("u", "d", "c", nobody), Ok(Decision::Deny(2)));
        assert_eq!(
            index.decide("u", "d", "c", owner("u")),
            Ok(Decision::Deny(2))
        );
        assert!(!Decision::Deny(2).allowed());
        assert_eq!(
            index.decide("u", "d", "other", nobody),
            Ok(Decision::Allow(1))
        );

        // Removing the deny rule takes effect at once.
        assert!(index.remove(2, &deny));
        assert_eq!(index.decide("u", "d", "c", nobody), Ok(Decision::Allow(1)));
        assert!(!index.remove(2, &deny));
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn the_owner_is_not_asked_when_a_deny_rule_matched() {
        let mut index = RuleIndex::new();
        index.insert(7, &rule("*", "*", "*", Effect::Deny));
        let asked = std::cell::Cell::new(false);
        let decision = index.decide("u", "d", "c", || {
            asked.set(true);
            Ok::<_, ()>(None)
        });
        assert_eq!(decision, Ok(Decision::Deny(7)));
        assert!(!asked.get());
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
        assert!(index.tree.is_empty(), "removals prune the tree");
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
}
