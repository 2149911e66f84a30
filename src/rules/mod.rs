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

use std::fmt;

use serde::{Deserialize, Serialize};

mod index;

pub use index::{Matches, RuleIndex};

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

/// What AuthorizeCommand needs to know of the entities named by its `src` and `dst`
/// (nothing, for an id that is no entity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parties {
    /// `src` is a disabled entity.
    pub src_disabled: bool,
    /// `dst` is a disabled entity.
    pub dst_disabled: bool,
    /// The owner of entity `dst`.
    pub dst_owner: Option<String>,
}

/// Why AuthorizeCommand answered as it did, in the documented order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `src` or `dst` is a disabled entity: refused before any rule.
    Disabled,
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

    /// A word for logs: `disabled`, `deny_rule`, `owner`, `allow_rule` or `default_deny`.
    pub fn reason(self) -> &'static str {
        match self {
            Decision::Disabled => "disabled",
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
            Decision::Disabled | Decision::Owner | Decision::DefaultDeny => None,
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
pub(crate) struct Glob {
    pattern: Box<str>,
    prefix_len: u32,
    suffix_len: u32,
}

impl Glob {
    /// `None` for a pattern without `*` (a literal).
    pub(crate) fn compile(pattern: &str) -> Option<Glob> {
        let first = pattern.find('*')?;
        let last = pattern.rfind('*')?;
        Some(Glob {
            pattern: pattern.into(),
            prefix_len: u32::try_from(first).ok()?,
            suffix_len: u32::try_from(pattern.len() - last - 1).ok()?,
        })
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.pattern[..self.prefix_len as usize]
    }

    pub(crate) fn suffix(&self) -> &str {
        &self.pattern[self.pattern.len() - self.suffix_len as usize..]
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
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

#[cfg(test)]
mod tests;
