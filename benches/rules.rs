//! How long an AuthorizeCommand decision takes with 10 rules and with 100,000 (docs/protocol.md#auth-authorizecommand: the
//! cost must not grow with rules that cannot match). No criterion: batches of 100 decisions
//! are timed and the median (and p99) per decision is printed.
//!
//! `cargo bench --bench rules` (add `-- --quick` for a shorter run).
//!
//! Rules, per 10: 7 literal (`userN`, `dev/I`, a command), 1 with a wildcard `dst` prefix
//! (`fleet/N/*`), 1 with a wildcard suffix (`*/N/lamp`, cmd `Lamp.*`), 1 of: a wildcard
//! `src` prefix (`appN/*`), a wildcard `cmd` (`Sys.*`), an infix (`*N*`) or `*`/`*`/`Debug.N`.
//! Every 13th rule denies.
//!
//! Two question sets:
//! - *same questions*: about the first 10 rules (hits, near misses and strangers), asked of
//!   10 rules and of 100,000 rules that include those 10 — the cost the extra rules add;
//! - *spread*: about rules all over the set, so the index is touched far and wide (the
//!   difference to the first is the memory hierarchy, not the number of rules examined).

use std::hint::black_box;
use std::time::Instant;

use authd::rules::{Effect, Parties, Rule, RuleIndex};
use authd::store::{Change, RequestKey, Store};

/// (src, dst, cmd) of one AuthorizeCommand.
type Question = (String, String, String);

const CMDS: [&str; 8] = [
    "Sys.Reboot",
    "Sys.GetInfo",
    "Config.Set",
    "Config.Get",
    "OTA.Update",
    "Shadow.Get",
    "Lamp.On",
    "Lamp.Off",
];

fn rule(i: usize) -> Rule {
    let n = i / 10;
    let cmd = CMDS[i % CMDS.len()].to_owned();
    let (src, dst, cmd) = match i % 10 {
        0..=6 => (format!("user{}", i % 20_000), format!("dev/{i}"), cmd),
        7 => (format!("user{n}"), format!("fleet/{n}/*"), cmd),
        8 => (
            format!("user{n}"),
            format!("*/{n}/lamp"),
            "Lamp.*".to_owned(),
        ),
        _ => match n % 4 {
            0 => (format!("app{n}/*"), format!("dev/{i}"), cmd),
            1 => (format!("ops{n}"), format!("dev/{i}"), "Sys.*".to_owned()),
            2 => (
                format!("audit{n}"),
                format!("*{n}*"),
                "Shadow.Get".to_owned(),
            ),
            _ => ("*".to_owned(), "*".to_owned(), format!("Debug.{n}")),
        },
    };
    Rule {
        src,
        dst,
        cmd,
        effect: if i % 13 == 5 {
            Effect::Deny
        } else {
            Effect::Allow
        },
    }
}

/// 3000 (src, dst, cmd) questions about rules `0..about`.
fn questions(about: usize) -> Vec<Question> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m as u64) as usize
    };
    (0..3000)
        .map(|q| {
            let r = rule(next(about));
            let fill = format!("x{}", q % 97);
            let text = |p: &str| p.replace('*', &fill);
            match q % 3 {
                // Exactly what a rule is about.
                0 => (text(&r.src), text(&r.dst), text(&r.cmd)),
                // A rule's subject, another command.
                1 => (text(&r.src), text(&r.dst), "Shell.Exec".to_owned()),
                // Nobody's rule.
                _ => (
                    format!("stranger{q}"),
                    format!("dev/none{q}"),
                    CMDS[q % CMDS.len()].to_owned(),
                ),
            }
        })
        .collect()
}

/// Median and 99th percentile ns per decision over batches of 100 questions.
fn measure(
    rounds: usize,
    questions: &[Question],
    decide: impl Fn(&str, &str, &str) -> bool,
) -> (f64, f64, usize) {
    let mut per_decision = Vec::new();
    let mut allowed = 0usize;
    for _ in 0..rounds {
        allowed = 0;
        for batch in questions.chunks(100) {
            let start = Instant::now();
            for (s, d, c) in batch {
                allowed += decide(black_box(s), black_box(d), black_box(c)) as usize;
            }
            per_decision.push(start.elapsed().as_nanos() as f64 / batch.len() as f64);
        }
    }
    per_decision.sort_by(f64::total_cmp);
    let at = |q: f64| per_decision[((per_decision.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), allowed)
}

/// This process's resident memory (Linux), for the index's footprint.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 5 } else { 40 };
    let same = questions(10);
    println!("AuthorizeCommand decision, ns per decision: median / p99 of 100-decision batches");
    for n in [10usize, 100_000] {
        let rules: Vec<Rule> = (0..n).map(rule).collect();
        let spread = questions(n);
        let sets: &[(&str, &[Question])] = if n == 10 {
            &[("same questions", &same)]
        } else {
            &[("same questions", &same), ("spread", &spread)]
        };

        let before = resident_bytes();
        let mut index = RuleIndex::new();
        for (i, r) in rules.iter().enumerate() {
            index.insert(i as u64 + 1, r);
        }
        if let (Some(before), Some(after)) = (before, resident_bytes()) {
            println!(
                "  {n:>6} rules: the index adds {:.1} MiB resident",
                after.saturating_sub(before) as f64 / (1 << 20) as f64
            );
        }
        for (name, qs) in sets {
            let nobody = Parties::default();
            let (median, p99, allowed) = measure(rounds, qs, |s, d, c| {
                index.decide(s, d, c, &nobody).allowed()
            });
            println!(
                "  {n:>6} rules, {name:<14}  rule index        median {median:5.0}  p99 {p99:5.0}  ({allowed}/{} allowed)",
                qs.len()
            );
        }
        drop(index);

        // The whole decision as AuthorizeCommand makes it: the store's reads of the src and
        // dst entities, plus the index under its lock.
        let store = Store::temporary().expect("temporary store");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for (i, r) in rules.iter().enumerate() {
            let request = RequestKey {
                src: "bench",
                id: i as u64 + 1,
                at_ms: 0,
                binding: None,
            };
            let change = Change::AddRule { rule: r.clone() };
            runtime
                .block_on(store.apply(&request, change))
                .expect("add rule");
        }
        // The embedded store decides synchronously: measured without a runtime in the way.
        let Store::Embedded(embedded) = &store else {
            unreachable!("a temporary store is embedded")
        };
        for (name, qs) in sets {
            let (median, p99, allowed) = measure(rounds, qs, |s, d, c| {
                embedded.authorize(s, d, c).is_ok_and(|x| x.allowed())
            });
            println!(
                "  {n:>6} rules, {name:<14}  Store::authorize  median {median:5.0}  p99 {p99:5.0}  ({allowed}/{} allowed)",
                qs.len()
            );
        }
    }
}
