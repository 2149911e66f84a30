//! `authd import`: bulk provisioning of a stopped worker's store, and moving a deployment
//! into a store. Two kinds of input, told apart by their first line:
//!
//! - **Admin calls**, one a line: `{"method": "Entity.Put", "args": {…}}` (or `ACL.Add`, …).
//!   Each line goes through the same [`Dispatcher`] as a request from the bus — same
//!   validation, same records — but without the broker, and with one flush at the end
//!   instead of one per change, and no reply recorded for redelivery (nobody redelivers a
//!   file).
//! - **A dump** written by `authd export` ([`crate::export`]; its first line is
//!   `{"authd_export":1,…}`): its records are restored as they are ([`Store::restore`]),
//!   [`BATCH`] to a transaction, so that entities keep their PSK hashes and certificates,
//!   tokens keep working and rules keep their ids. Before anything is written, the server
//!   key file in `data` must hold every key id of the header (the old `server.key`, copied).
//!   Restoring is idempotent: an import cut short can be run again.
//!
//! The target is the embedded database in `data`, or the database of `store` (`open_target`).

use std::io::BufRead;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::caller::{CallerKeyConfig, CallerKeys, Scope};
use crate::config::Config;
use crate::crypto::{KeyFileError, KeyId, ServerKeys};
use crate::dispatch::Dispatcher;
use crate::export::{End, Header, FORMAT};
use crate::frame::Response;
use crate::metrics::Metrics;
use crate::store::{Record, Store};

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Lines applied (admin calls) or records restored (a dump).
    pub applied: u64,
    /// `(line number, error)` of the first few lines refused.
    pub errors: Vec<(u64, String)>,
    pub refused: u64,
}

impl ImportReport {
    fn refuse(&mut self, line: u64, why: String) {
        self.refused += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push((line, why));
        }
    }
}

const MAX_REPORTED_ERRORS: usize = 20;

/// Records of a dump restored in one transaction.
pub const BATCH: usize = 1000;

/// Numbered lines of the input (from 1).
type Lines<'a> = Box<dyn Iterator<Item = (u64, std::io::Result<String>)> + 'a>;

/// Applies every line of `input` to the data directory of `config`.
pub async fn import(config: &Config, input: impl BufRead) -> anyhow::Result<ImportReport> {
    import_observed(config, input, |_| {}).await
}

/// As [`import`], calling `observe` with the report so far after each line that was not
/// blank (the command line's progress display).
pub async fn import_observed(
    config: &Config,
    input: impl BufRead,
    observe: impl FnMut(&ImportReport),
) -> anyhow::Result<ImportReport> {
    let mut lines: Lines<'_> = Box::new((1u64..).zip(input.lines()));
    // The first line that is not blank says which kind of input this is.
    let mut first = None;
    for (n, line) in &mut lines {
        let line = line.with_context(|| format!("reading line {n}"))?;
        if !line.trim().is_empty() {
            first = Some((n, line));
            break;
        }
    }
    match first {
        Some((n, line)) => match dump_header(&line).with_context(|| format!("line {n}"))? {
            Some(header) => restore_dump(config, header, n, lines, observe).await,
            None => {
                let first: Lines<'_> = Box::new(std::iter::once((n, Ok(line))));
                run_calls(config, Box::new(first.chain(lines)), observe).await
            }
        },
        None => run_calls(config, lines, observe).await,
    }
}

/// The header of a dump, if `line` is one (a JSON object with `authd_export`).
fn dump_header(line: &str) -> anyhow::Result<Option<Header>> {
    let object = match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line) {
        Ok(object) if object.contains_key("authd_export") => object,
        _ => return Ok(None),
    };
    let header: Header =
        serde_json::from_value(object.into()).context("not the header of an authd export")?;
    if header.authd_export != FORMAT {
        anyhow::bail!(
            "dump format {} is not the format {FORMAT} this authd reads: import it with an authd at least as new as the one that exported it",
            header.authd_export
        );
    }
    Ok(Some(header))
}

/// The store an import writes to, opened for bulk writing (no sync per change; one flush
/// at the end), and the server keys in `data`: the PostgreSQL database of `store`, else the
/// embedded database in `data`.
async fn open_target(config: &Config) -> anyhow::Result<(Store, ServerKeys)> {
    crate::server::open_data(config, config.store.as_ref(), false).await
}

/// Refuses, before anything is written, a target whose key file lacks a key the dump's
/// PSK hashes and tokens were made with: they would never verify there.
fn check_keys(config: &Config, needed: &[KeyId]) -> anyhow::Result<()> {
    if needed.is_empty() {
        return Ok(());
    }
    let file = ServerKeys::file_in(&config.data);
    let ids = |ids: &[KeyId]| {
        ids.iter()
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let copy = format!(
        "copy server.key from the old data directory to {} (mode 0600) and import again",
        file.display()
    );
    let keys = match ServerKeys::load(&file) {
        Ok(keys) => keys,
        Err(KeyFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!(
                "server key file {} is missing: the dump's PSK hashes and tokens were made with server key {} of the old deployment; {copy}",
                file.display(),
                ids(needed)
            )
        }
        // The message already names the file and the cause.
        Err(e) => anyhow::bail!("{e}"),
    };
    let missing: Vec<KeyId> = needed
        .iter()
        .copied()
        .filter(|id| !keys.ids().any(|k| k == *id))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "server key file {} lacks server key {} that the dump's PSK hashes and tokens were made with (they would never verify); {copy}",
            file.display(),
            ids(&missing)
        );
    }
    Ok(())
}

/// Restores the records of a dump whose header (line `header_line`) is `header`.
async fn restore_dump(
    config: &Config,
    header: Header,
    header_line: u64,
    lines: Lines<'_>,
    mut observe: impl FnMut(&ImportReport),
) -> anyhow::Result<ImportReport> {
    check_keys(config, &header.key_ids)?;
    let (store, _keys) = open_target(config).await?;
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(BATCH);
    // Record lines read (well-formed or not), to compare with the end line's count.
    let mut records = 0u64;
    let mut ended = false;
    let mut last = header_line;
    for (n, line) in lines {
        last = n;
        let line = line.with_context(|| format!("reading line {n}"))?;
        if line.trim().is_empty() {
            continue;
        }
        if ended {
            report.refuse(n, "after the end line of the export".into());
            observe(&report);
            continue;
        }
        match serde_json::from_str::<Record>(&line) {
            Ok(record) => {
                records += 1;
                match record.key_id() {
                    Some(id) if !header.key_ids.contains(&id) => {
                        report.refuse(n, format!("server key {id} is not in the header's key_ids"))
                    }
                    _ => {
                        batch.push(record);
                        report.applied += 1;
                    }
                }
                if batch.len() == BATCH {
                    store.restore(std::mem::take(&mut batch)).await?;
                }
            }
            Err(e) => match serde_json::from_str::<End>(&line) {
                Ok(End { authd_export_end }) => {
                    ended = true;
                    if authd_export_end.records != records {
                        report.refuse(
                            n,
                            format!(
                                "the end line counts {} records, {records} were read: the dump is damaged",
                                authd_export_end.records
                            ),
                        );
                    }
                }
                Err(_) => {
                    records += 1;
                    report.refuse(n, format!("not a record: {e}"));
                }
            },
        }
        observe(&report);
    }
    if !batch.is_empty() {
        store.restore(batch).await?;
    }
    if !ended {
        report.refuse(
            last + 1,
            "the dump ends before its end line: it was cut short (export it again)".into(),
        );
    }
    store.flush().await?;
    Ok(report)
}

/// Runs each line, an admin call, through the dispatcher.
async fn run_calls(
    config: &Config,
    lines: Lines<'_>,
    mut observe: impl FnMut(&ImportReport),
) -> anyhow::Result<ImportReport> {
    // One flush at the end, not one per line.
    let (store, keys) = open_target(config).await?;
    // A key that lives only as long as this call: import lines carry none.
    let key = format!("import-{}", uuid::Uuid::new_v4().simple());
    let callers = CallerKeys::new(&[CallerKeyConfig {
        name: "import".into(),
        scope: Scope::Admin,
        key: key.as_str().into(),
    }]);
    // The dispatcher's copy of the configuration holds no secret (the file's caller keys
    // are not the import's).
    let mut shared = config.clone();
    drop(shared.take_secrets());
    let dispatcher = Dispatcher::new(
        Arc::new(shared),
        callers,
        store.clone(),
        keys,
        Arc::new(Metrics::new(crate::methods::names().collect())),
    )
    .without_replay_records();

    #[derive(Deserialize)]
    struct Line<'a> {
        method: &'a str,
        #[serde(borrow, default)]
        args: Option<&'a RawValue>,
    }
    let mut report = ImportReport::default();
    let mut frame = Vec::new();
    for (n, line) in lines {
        let line = line.with_context(|| format!("reading line {n}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let refused = |report: &mut ImportReport, why: String| report.refuse(n, why);
        let parsed: Line<'_> = match serde_json::from_str(&line) {
            Ok(l) => l,
            Err(e) => {
                refused(
                    &mut report,
                    format!("not {{\"method\": …, \"args\": {{…}}}}: {e}"),
                );
                observe(&report);
                continue;
            }
        };
        frame.clear();
        serde_json::to_writer(
            &mut frame,
            &serde_json::json!({"v": 2, "id": n, "src": "authd-import", "key": key, "method": parsed.method}),
        )?;
        if let Some(args) = parsed.args {
            // Splice the raw args in: `{…,"args":<raw>}`.
            frame.pop();
            frame.extend_from_slice(b",\"args\":");
            frame.extend_from_slice(args.get().as_bytes());
            frame.push(b'}');
        }
        let outcome = dispatcher.handle(None, &frame, crate::unix_ms()).await;
        match outcome.reply {
            None => refused(&mut report, "no answer".into()),
            Some((_, reply)) => match serde_json::from_slice::<Response>(&reply) {
                Ok(Response { error: None, .. }) => report.applied += 1,
                Ok(Response { error: Some(e), .. }) => refused(&mut report, e.to_string()),
                Err(e) => refused(&mut report, e.to_string()),
            },
        }
        observe(&report);
    }
    store.flush().await?;
    Ok(report)
}
