//! `authd import`: bulk provisioning into a stopped worker's data directory.
//!
//! Input is JSON lines, one admin call per line: `{"method": "Entity.Put", "args": {…}}`
//! (or `ACL.Add`, …). Each line goes through the same [`Dispatcher`] as a request from the
//! bus — same validation, same records — but without the broker, and with one flush at the
//! end instead of one per change, and no reply recorded for redelivery (nobody redelivers a file).

use std::io::BufRead;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::caller::{CallerKeyConfig, CallerKeys, Scope};
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::frame::Response;
use crate::metrics::Metrics;

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub applied: u64,
    /// `(line number, error)` of the first few lines refused.
    pub errors: Vec<(u64, String)>,
    pub refused: u64,
}

const MAX_REPORTED_ERRORS: usize = 20;

/// Applies every line of `input` to the data directory of `config`.
pub async fn import(config: &Config, input: impl BufRead) -> anyhow::Result<ImportReport> {
    import_observed(config, input, |_| {}).await
}

/// As [`import`], calling `observe` with the report so far after each line that was not
/// blank (the command line's progress display).
pub async fn import_observed(
    config: &Config,
    input: impl BufRead,
    mut observe: impl FnMut(&ImportReport),
) -> anyhow::Result<ImportReport> {
    // One flush at the end, not one per line.
    let (store, keys) = crate::server::open_data(config, config.store.as_ref(), false).await?;
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
    for (n, line) in input.lines().enumerate() {
        let n = n as u64 + 1;
        let line = line.with_context(|| format!("reading line {n}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let refused = |report: &mut ImportReport, why: String| {
            report.refused += 1;
            if report.errors.len() < MAX_REPORTED_ERRORS {
                report.errors.push((n, why));
            }
        };
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
