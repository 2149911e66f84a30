//! The rule index: a three-level tree, one level per field (`src` → `dst` → `cmd`), rule ids
//! at the leaves. See the parent module for how each level finds the patterns a text can
//! match.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use fxhash::FxHasher;

use super::{Decision, Effect, Glob, Parties, Rule};

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
    /// Whether the tree holds no node at all (removals prune what they empty).
    #[cfg(test)]
    pub(super) fn tree_is_empty(&self) -> bool {
        self.tree.is_empty()
    }

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

    /// Decides whether `src` may send `cmd` to `dst`, in the documented order: a disabled
    /// `src` or `dst` entity (before any rule), then a matching deny rule, then ownership,
    /// then a matching allow rule, else deny. `parties` is what the store knows of the two
    /// entities.
    pub fn decide(&self, src: &str, dst: &str, cmd: &str, parties: &Parties) -> Decision {
        if parties.src_disabled || parties.dst_disabled {
            return Decision::Disabled;
        }
        let found = self.matches(src, dst, cmd);
        if let Some(id) = found.deny {
            return Decision::Deny(id);
        }
        if parties.dst_owner.as_deref() == Some(src) {
            return Decision::Owner;
        }
        match found.allow {
            Some(id) => Decision::Allow(id),
            None => Decision::DefaultDeny,
        }
    }
}
