//! The repository itself: no file committed with unresolved merge conflict markers, and no
//! doc that sends a reader to a specification outside the repository.

use std::path::Path;
use std::process::Command;

/// Every file git tracks, as text where it is text.
fn tracked_texts() -> Vec<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
        .expect("git ls-files");
    assert!(out.status.success(), "git ls-files: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split('\0')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let text = std::fs::read_to_string(Path::new(root).join(p)).ok()?;
            Some((p.to_owned(), text))
        })
        .collect()
}

#[test]
fn no_file_holds_merge_conflict_markers() {
    let mut found = Vec::new();
    for (path, text) in tracked_texts() {
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("<<<<<<< ") || line.starts_with(">>>>>>> ") || line == "=======" {
                found.push(format!("{path}:{}: {line}", n + 1));
            }
        }
    }
    assert!(found.is_empty(), "conflict markers:\n{}", found.join("\n"));
}

#[test]
fn docs_cite_the_repository_not_an_outside_spec() {
    let mut found = Vec::new();
    for (path, text) in tracked_texts() {
        if path == file!() {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if line.contains("SPEC §") || line.contains("shared/SPEC.md") {
                found.push(format!("{path}:{}: {line}", n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "outside references:\n{}",
        found.join("\n")
    );
}
