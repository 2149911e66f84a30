//! The operator's kit (`contrib/`, the `completions` and `man` subcommands, import progress),
//! each checked against the real thing:
//! - the Grafana dashboard and the alert rules use only metrics (and labels) that a real
//!   worker's `/metrics` exports, after a mix of requests;
//! - a real Prometheus scrapes a real worker, answers every dashboard query with data, and
//!   evaluates the alert rules on it (one fires: a handler panic);
//! - `promtool check rules` and `promtool test rules` pass, and every alert has a unit test
//!   where it fires and one where it does not;
//! - the systemd unit passes `systemd-analyze verify` (where it exists) and has its
//!   sandboxing keys;
//! - shell completions and the man page name every subcommand and flag;
//! - `authd import` draws progress on a terminal only.
//!
//! Prometheus and promtool are required (Debian's `prometheus` package; `.ci/run` installs
//! it): without them these tests fail, they never skip.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DASHBOARD: &str = "contrib/grafana/authd.json";
const RULES: &str = "contrib/prometheus/authd-rules.yml";
const RULE_TESTS: &str = "contrib/prometheus/authd-rules.test.yml";
const UNIT: &str = "contrib/systemd/authd.service";

/// Series Prometheus makes for every target (not in `/metrics`): checked against a real
/// Prometheus in `prometheus_scrapes_a_worker_and_answers_every_dashboard_query`.
const PROMETHEUS_SERIES: [&str; 1] = ["up"];

/// Labels Prometheus adds to every series of a target.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

// ---------------------------------------------------------------------------------------
// PromQL: which metrics and labels an expression uses.

/// What an expression reads: the metric of each selector with the labels it matches on,
/// and the labels it groups by (`by`, `without`, `on`, `ignoring`, `group_left/right`).
#[derive(Debug, Default)]
struct Uses {
    selectors: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

const KEYWORDS: [&str; 9] = [
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "__name__",
];
/// Aggregation operators: `sum by (x) (…)` is no metric named `sum`.
const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// A small PromQL scanner: enough to find every metric name (an identifier not followed by
/// `(` nor a keyword), the label names of its `{…}` matchers, and the grouping labels.
/// Strings, `[…]` ranges and numbers are skipped, and so are Grafana's `$variables`.
fn promql_uses(expr: &str) -> Uses {
    let chars: Vec<char> = expr.chars().collect();
    let mut uses = Uses::default();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let next_non_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    // Label names inside `{…}` or `(…)` starting at `open`; returns them and the index
    // after the closing bracket.
    let labels_in = |open: usize, close: char| {
        let mut names = Vec::new();
        let mut j = open + 1;
        while j < chars.len() && chars[j] != close {
            let c = chars[j];
            if c == '"' || c == '\'' || c == '`' {
                j = skip_string(&chars, j);
            } else if ident_start(c) {
                let start = j;
                while j < chars.len() && ident_char(chars[j]) {
                    j += 1;
                }
                names.push(chars[start..j].iter().collect::<String>());
            } else {
                j += 1;
            }
        }
        (names, j + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '{' {
            // A selector with no name before it: `{__name__="…"}` is not used here.
            let (names, end) = labels_in(i, '}');
            uses.selectors.push((String::new(), names));
            i = end;
        } else if ident_start(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_space(i);
            let lower = word.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                if chars.get(after) == Some(&'(') {
                    let (names, end) = labels_in(after, ')');
                    uses.grouping.extend(names);
                    i = end;
                }
            } else if KEYWORDS.contains(&lower.as_str())
                || AGGREGATIONS.contains(&lower.as_str())
                || chars.get(after) == Some(&'(')
            {
                // An operator, an aggregation, or a function.
            } else if chars.get(after) == Some(&'{') {
                let (names, end) = labels_in(after, '}');
                uses.selectors.push((word, names));
                i = end;
            } else {
                uses.selectors.push((word, Vec::new()));
            }
        } else {
            i += 1;
        }
    }
    uses
}

/// Index after the string literal starting at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut j = start + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' && quote != '`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

#[test]
fn the_promql_scanner_finds_metrics_labels_and_grouping() {
    let u = promql_uses(
        r#"histogram_quantile(0.99, sum by (method, le) (rate(authd_request_duration_seconds_bucket{job="$job", instance=~"a{b}"}[$__rate_interval])))
           / on(instance) group_left sum(rate(x_total[5m] offset 1h)) > bool 0.5 or vector(1e-3) unless absent(up{job="authd"})"#,
    );
    let names: Vec<_> = u.selectors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["authd_request_duration_seconds_bucket", "x_total", "up"]
    );
    assert_eq!(u.selectors[0].1, ["job", "instance"]);
    assert_eq!(u.grouping, ["method", "le", "instance"]);
}

// ---------------------------------------------------------------------------------------
// The files' queries.

/// Every PromQL expression of the dashboard (panel targets, in rows too, and the template
/// variables' queries), with where it is.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let mut out = Vec::new();
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().expect("a target has an expr");
                out.push((format!("panel `{title}`"), expr.to_owned()));
            }
            panels(&panel["panels"], out);
        }
    }
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if var["type"] == "query" {
            let query = var["query"]["query"]
                .as_str()
                .or(var["query"].as_str())
                .expect("a query variable has a query");
            // label_values(selector, label): the selector is PromQL.
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map_or(query, |(selector, _)| selector);
            out.push((format!("variable `{}`", var["name"]), inner.to_owned()));
        }
    }
    out
}

/// Every `expr:` of the alert rules (one line, or a `|` block), with its alert's name.
fn rule_expressions() -> Vec<(String, String)> {
    let text = read(RULES);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(rest) = line.strip_prefix("expr:") {
            let indent = lines[i].len() - line.len();
            let expr = if rest.trim() == "|" {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                block.join(" ")
            } else {
                rest.trim().to_owned()
            };
            out.push((format!("alert {alert}"), expr));
        }
        i += 1;
    }
    out
}

fn alert_names() -> Vec<String> {
    read(RULES)
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------
// A real worker with a mix of requests, scraped.

/// `GET path` over HTTP/1.0 (one response, no chunking) → (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("a response");
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    (status, body.to_owned())
}

async fn get(addr: SocketAddr, path: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(addr, &path))
        .await
        .unwrap()
}

/// A worker with its metrics endpoint, after requests that touch every family: results
/// and 4xx errors, a 500 (a handler panic), sign-ins ok, refused and locked, a lockout, a
/// replay, a dropped frame. Returns once a scrape (returned too) has counted them all.
async fn busy_worker() -> (Setup, SocketAddr, String) {
    let s = Setup::start_with(|c| {
        c.metrics = Some("127.0.0.1:0".into());
        c.lockout_failures = 2;
    })
    .await;
    let addr = s.worker().metrics_addr().expect("metrics listener");
    let admin = s.admin().await;
    let alice = s.service("alice").await;
    ok(&admin, "Entity.Put", json!({"id": "dev1", "psk": "right"})).await;
    ok(&admin, "Entity.Put", json!({"id": "dev2", "psk": "right"})).await;
    assert!(authenticate(&alice, "dev2", json!({"psk": "right"})).await);
    for _ in 0..3 {
        // Two failures lock dev1; the third attempt is refused unchecked.
        assert!(!authenticate(&alice, "dev1", json!({"psk": "wrong"})).await);
    }
    ok(&alice, "Auth.ListToken", json!({})).await;
    err(&alice, "Auth.GetToken", json!({}), 400).await;
    err(&alice, "No.Such", json!({}), 404).await;
    err(&alice, "Fault.Panic", json!({}), 500).await;
    let frame = alice.frame("Auth.GenerateToken", json!({"host": "app"}));
    let first = alice.call_frame(&frame, TIMEOUT).await.unwrap();
    let again = alice.call_frame(&frame, TIMEOUT).await.unwrap();
    assert_eq!(
        first.result, again.result,
        "answered from its replay record"
    );
    alice
        .publish(alice.request_topic(), b"not json".to_vec())
        .await
        .unwrap();
    // The clients stay connected until then: the last frame may still be on its way.
    let scrape = scrape_when_counted(addr).await;
    (s, addr, scrape)
}

/// Metric name → the label names its samples carry, from a scrape.
fn exported(scrape: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let entry = out.entry(name.to_owned()).or_default();
        for pair in labels.trim_end_matches('}').split(',') {
            if let Some((label, _)) = pair.split_once('=') {
                entry.insert(label.trim().to_owned());
            }
        }
    }
    out
}

/// Scrapes until the scrape has the signs of every request of [`busy_worker`] (the
/// server counts a request just after handing its reply over, a dropped frame when it
/// arrives).
async fn scrape_when_counted(addr: SocketAddr) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, body) = get(addr, "/metrics".into()).await;
        assert_eq!(status, 200, "{body}");
        let counted = [
            r#"authd_requests_total{method="other",outcome="500"} 1"#,
            r#"authd_requests_total{method="Auth.GenerateToken",outcome="ok"} 2"#,
            r#"authd_frames_dropped_total{reason="not_json"} 1"#,
            r#"authd_sign_ins_total{result="locked"} 1"#,
        ]
        .iter()
        .all(|line| body.lines().any(|l| l == *line));
        if counted {
            return body;
        }
        assert!(Instant::now() < deadline, "not all counted in\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Problems with `queries` against what the worker exports (empty: none).
fn check_against_scrape(
    queries: &[(String, String)],
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (place, expr) in queries {
        let uses = promql_uses(expr);
        if uses.selectors.is_empty() {
            problems.push(format!("{place}: no metric found in `{expr}`"));
        }
        let mut labels_here = BTreeSet::new();
        for (name, matchers) in &uses.selectors {
            if name.is_empty() {
                problems.push(format!(
                    "{place}: a selector without a metric name: `{expr}`"
                ));
                continue;
            }
            let known = match exported.get(name) {
                Some(labels) => labels.clone(),
                None if PROMETHEUS_SERIES.contains(&name.as_str()) => continue,
                None => {
                    problems.push(format!("{place}: `{name}` is not exported by the worker"));
                    continue;
                }
            };
            labels_here.extend(known.iter().cloned());
            for label in matchers {
                if !known.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!("{place}: `{name}` has no label `{label}`"));
                }
            }
        }
        let only_unchecked = uses
            .selectors
            .iter()
            .all(|(n, _)| PROMETHEUS_SERIES.contains(&n.as_str()));
        for label in &uses.grouping {
            if !only_unchecked
                && !labels_here.contains(label)
                && !TARGET_LABELS.contains(&label.as_str())
            {
                problems.push(format!(
                    "{place}: groups by `{label}`, which none of its metrics has"
                ));
            }
        }
    }
    problems
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_what_a_worker_exports() {
    let (mut s, _, scrape) = busy_worker().await;
    let exported = exported(&scrape);
    let dashboard = dashboard_queries();
    let rules = rule_expressions();
    assert!(
        dashboard.len() >= 20,
        "panels' queries found: {dashboard:?}"
    );
    assert_eq!(
        rules.len(),
        alert_names().len(),
        "one expr per alert: {rules:?}"
    );
    let mut problems = check_against_scrape(&dashboard, &exported);
    problems.extend(check_against_scrape(&rules, &exported));
    assert!(
        problems.is_empty(),
        "{}\n\nexported: {exported:?}",
        problems.join("\n")
    );

    // And the other way round: every family the worker exports is on the dashboard.
    let used: BTreeSet<String> = dashboard
        .iter()
        .flat_map(|(_, e)| promql_uses(e).selectors)
        .map(|(name, _)| name)
        .collect();
    let families: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for family in families {
        assert!(
            used.iter().any(|u| u.starts_with(family)),
            "`{family}` is exported but on no panel"
        );
    }
    s.stop().await;
}

#[test]
fn the_dashboard_is_an_importable_grafana_model() {
    let d: Value = serde_json::from_str(&read(DASHBOARD)).expect("JSON");
    assert_eq!(d["uid"], "authd");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 30);
    assert!(d.get("id").is_none() || d["id"].is_null(), "no database id");
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["name"] == "DS_PROMETHEUS")
        .expect("a data source variable");
    assert_eq!(
        (&ds["type"], &ds["query"]),
        (&json!("datasource"), &json!("prometheus"))
    );
    let mut ids = BTreeSet::new();
    let mut all = Vec::new();
    fn walk<'a>(list: &'a Value, all: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            all.push(p);
            walk(&p["panels"], all);
        }
    }
    walk(&d["panels"], &mut all);
    let mut rows = Vec::new();
    for p in &all {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate id: {title}"
        );
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && grid["h"].as_u64().unwrap() > 0,
            "{title}: {grid}"
        );
        if p["type"] == "row" {
            rows.push(title);
            continue;
        }
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title}: say what it shows"
        );
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        }
    }
    assert!(
        rows.iter().any(|r| r.starts_with("Change events")),
        "a row kept for the change-event metrics: {rows:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Tools: required, never skipped.

/// `name` on PATH (or in /usr/bin, /usr/sbin); panics with the install command otherwise.
fn required_tool(name: &str, package: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is missing: apt-get install {package} (.ci/run installs it); \
             these tests fail rather than skip without it"
        )
    })
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let promtool = required_tool("promtool", "prometheus");
    let out = Command::new(&promtool)
        .args(["check", "rules", RULES])
        .current_dir(ROOT)
        .output()
        .expect("promtool runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = alert_names().len();
    assert!(rules >= 10, "alerts: {:?}", alert_names());
    assert!(
        stdout.contains(&format!("SUCCESS: {rules} rules found")),
        "{stdout}"
    );
}

#[test]
fn promtool_unit_tests_fire_and_hold_every_alert() {
    let promtool = required_tool("promtool", "prometheus");
    let out = Command::new(&promtool)
        .args(["test", "rules", "authd-rules.test.yml"])
        .current_dir(Path::new(ROOT).join("contrib/prometheus"))
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Each alert has a case with expected alerts and one with none.
    let tests = read(RULE_TESTS);
    let mut fires = BTreeSet::new();
    let mut holds = BTreeSet::new();
    let mut current = String::new();
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = name.trim().to_owned();
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            if rest.trim() == "[]" {
                holds.insert(current.clone());
            } else {
                fires.insert(current.clone());
            }
        }
    }
    for alert in alert_names() {
        assert!(fires.contains(&alert), "no unit test where {alert} fires");
        assert!(holds.contains(&alert), "no unit test where {alert} holds");
    }
}

// ---------------------------------------------------------------------------------------
// A real Prometheus.

/// A Prometheus process of our own; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` every second as job `authd`, evaluating the shipped rules.
    fn start(target: SocketAddr) -> Prometheus {
        let binary = required_tool("prometheus", "prometheus");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {ROOT}/{RULES}\n\
                 scrape_configs:\n  - job_name: authd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            let addr = self.addr;
            let ready = tokio::task::spawn_blocking(move || {
                TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200
            })
            .await
            .unwrap();
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `/api/v1/<path>?query=<expr>`'s `data`; panics on an error answer (a bad query).
    async fn api(&self, path: &str, query: Option<&str>) -> Value {
        let mut url = format!("/api/v1/{path}");
        if let Some(q) = query {
            url.push_str("?query=");
            url.push_str(&percent_encode(q));
        }
        let (status, body) = get(self.addr, url).await;
        let answer: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} {query:?}: {e}: {body}"));
        assert!(
            status == 200 && answer["status"] == "success",
            "{path} {query:?}: {status} {body}"
        );
        answer["data"].clone()
    }

    /// The instant vector `expr` evaluates to now.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", Some(expr)).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A dashboard query as Grafana would send it for job `authd`, all workers.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$job", "authd")
        .replace("$instance", ".*")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_worker_and_answers_every_dashboard_query() {
    let (mut s, addr, _) = busy_worker().await;
    let mut prometheus = Prometheus::start(addr);
    prometheus.wait_ready().await;

    // Scraped: `up` is 1, and the worker's series are there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prometheus.query(r#"up{job="authd"}"#).await;
        if up.first().is_some_and(|s| s["value"][1] == "1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never scraped: {up:?}\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A handler panics now, between two scrapes: AuthdHandlerPanics fires.
    let alice = s.service("alice").await;
    err(&alice, "Fault.Panic", json!({}), 500).await;

    // Every dashboard query is valid PromQL and has data (rates need two scrapes).
    let queries = dashboard_queries();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut empty = Vec::new();
    loop {
        empty.clear();
        for (place, expr) in &queries {
            let result = prometheus.query(&as_grafana_sends(expr)).await;
            if result.is_empty() {
                empty.push(format!("{place}: {expr}"));
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no data for:\n{}\n{}",
            empty.join("\n"),
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The series the dashboard needs, by name (`up` included: Prometheus makes it).
    for (_, expr) in &queries {
        for (name, _) in promql_uses(expr).selectors {
            let series = prometheus.query(&format!("count({name})")).await;
            assert!(!series.is_empty(), "`{name}` not in Prometheus");
        }
    }
    let sign_ins = prometheus
        .query(r#"sum by (result) (authd_sign_ins_total{job="authd"})"#)
        .await;
    assert_eq!(sign_ins.len(), 3, "ok, refused, locked: {sign_ins:?}");

    // The rules load and evaluate without error on real series; the panic fires its alert.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules = prometheus.api("rules", None).await;
        let all: Vec<&Value> = rules["groups"]
            .as_array()
            .expect("rule groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        assert_eq!(all.len(), alert_names().len(), "{rules}");
        let evaluated = all.iter().all(|r| {
            r["lastEvaluation"]
                .as_str()
                .is_some_and(|t| !t.starts_with("0001"))
        });
        for r in &all {
            assert_ne!(r["health"], "err", "{r}");
        }
        let firing: Vec<&str> = all
            .iter()
            .filter(|r| r["state"] == "firing")
            .filter_map(|r| r["name"].as_str())
            .collect();
        if evaluated && firing.contains(&"AuthdHandlerPanics") {
            // Nothing else is wrong with this worker.
            assert_eq!(firing, ["AuthdHandlerPanics"], "{rules}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "AuthdHandlerPanics did not fire: {rules}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(prometheus);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------
// The systemd unit.

/// `Key=value` lines of the unit, by section; a key may repeat.
fn unit_keys() -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in read(UNIT).lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not Key=value: {line}"));
        out.entry((section.clone(), key.trim().to_owned()))
            .or_default()
            .push(value.trim().to_owned());
    }
    out
}

#[test]
fn the_systemd_unit_runs_authd_sandboxed_with_a_stop_timeout_past_the_drain() {
    let keys = unit_keys();
    let get = |key: &str| -> String {
        keys.get(&("Service".to_owned(), key.to_owned()))
            .unwrap_or_else(|| panic!("[Service] has no {key}="))
            .join(" ")
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "authd"),
        ("StateDirectoryMode", "0700"),
        ("UMask", "0077"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
        ("EnvironmentFile", "-/etc/authd/authd.env"),
        (
            "Environment",
            "AUTHD_DATA=/var/lib/authd AUTHD_LOG_FORMAT=json",
        ),
    ] {
        assert_eq!(get(key), value, "{key}=");
    }
    assert!(get("SystemCallFilter").starts_with("@system-service"));

    // The stop timeout outlasts authd's drain (default drain_secs) with room to flush.
    let stop: u64 = get("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    let drain = authd::config::Config::default().drain_secs;
    assert!(
        stop >= drain + 10,
        "TimeoutStopSec={stop} vs drain_secs={drain}"
    );

    // ExecStart is a command line authd accepts.
    let exec = get("ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[0], "/usr/local/bin/authd");
    assert_eq!(argv[1..], ["serve", "--config", "/etc/authd/authd.toml"]);
    let out = Command::new(authd_bin())
        .args([
            "serve",
            "--config",
            "/nonexistent/authd.toml",
            "--print-config",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/authd.toml"),
        "the flags parse and the config file is read: {out:?}"
    );
    // And the data directory it is given is the state directory.
    assert!(get("Environment").contains("AUTHD_DATA=/var/lib/authd"));
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let Some(analyze) = find_tool("systemd-analyze") else {
        println!(
            "NOT CHECKED BY systemd-analyze: it is not installed here (apt-get install systemd); \
             the unit's keys were checked by parsing it \
             (the_systemd_unit_runs_authd_sandboxed_with_a_stop_timeout_past_the_drain)"
        );
        return;
    };
    // The unit as shipped, but ExecStart pointing at the binary under test (verify checks
    // that the program exists), and its man page where `Documentation=man:authd(1)` looks.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("authd.service");
    let text = read(UNIT).replace(
        "ExecStart=/usr/local/bin/authd ",
        &format!("ExecStart={} ", authd_bin().display()),
    );
    std::fs::write(&unit, text).unwrap();
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    let page = Command::new(authd_bin()).arg("man").output().unwrap();
    assert!(page.status.success());
    std::fs::write(man1.join("authd.1"), &page.stdout).unwrap();
    let mut verify = Command::new(&analyze);
    verify.arg("verify");
    if find_tool("man").is_some() {
        verify.env("MANPATH", dir.path().join("man"));
    } else {
        println!("man is not installed: verify runs with --man=no");
        verify.arg("--man=no");
    }
    let out = verify.arg(&unit).output().expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify only warns (exit 0) about an unknown key or a bad value: any output fails.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    // The sandbox as systemd scores it (0 is best, 10 worst; 'OK' is under 4.5).
    let out = Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for authd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    println!("systemd-analyze security: exposure {score}");
    assert!(score <= 2.0, "exposure {score}:\n{text}");
}

// ---------------------------------------------------------------------------------------
// Completions and the man page.

/// Every visible subcommand path (`["ctl", "entity", "put"]`) with its visible long flags.
fn cli_tree() -> Vec<(Vec<String>, Vec<String>)> {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, Vec<String>)>) {
        let flags = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        out.push((path.clone(), flags));
        let visible = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help");
        for sub in visible {
            let mut p = path.clone();
            p.push(sub.get_name().to_owned());
            walk(sub, p, out);
        }
    }
    let mut cmd = authd::cli::Cli::command();
    cmd.build();
    let mut out = Vec::new();
    walk(&cmd, Vec::new(), &mut out);
    out
}

fn authd_output(args: &[&str]) -> String {
    let out = Command::new(authd_bin()).args(args).output().unwrap();
    assert!(out.status.success(), "authd {args:?}: {out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn completions_name_every_subcommand_and_flag() {
    let tree = cli_tree();
    let names: BTreeSet<&str> = tree
        .iter()
        .filter_map(|(p, _)| p.last().map(String::as_str))
        .collect();
    for expected in [
        "serve",
        "import",
        "completions",
        "man",
        "ctl",
        "entity",
        "rotate",
    ] {
        assert!(names.contains(expected), "{names:?}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = authd_output(&["completions", shell]);
        for (path, flags) in &tree {
            if let Some(name) = path.last() {
                assert!(script.contains(name.as_str()), "{shell}: no `{name}`");
            }
            // clap_complete's fish script completes two levels of subcommands: the flags
            // of `authd ctl entity put` are not in it (bash and zsh have them).
            if shell == "fish" && path.len() > 2 {
                continue;
            }
            for flag in flags {
                let written = match shell {
                    "fish" => format!("-l {flag}"),
                    _ => format!("--{flag}"),
                };
                assert!(
                    script.contains(&written),
                    "{shell}: no `{written}` ({path:?})"
                );
            }
        }
        if let Some(program) = find_tool(shell) {
            let check = Command::new(program)
                .arg("-n")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().unwrap().write_all(script.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap();
            assert!(check.status.success(), "{shell} -n: {check:?}");
        } else {
            println!("{shell} is not installed: its script was not syntax-checked");
        }
    }
    assert!(
        Command::new(authd_bin())
            .args(["completions", "tcsh"])
            .output()
            .unwrap()
            .status
            .code()
            == Some(2)
    );
}

#[test]
fn bash_completes_subcommands_and_flags() {
    let bash = required_tool("bash", "bash");
    // COMP_WORDS as bash has it while completing the last word (empty: after a space).
    let complete = |words: &[&str]| -> Vec<String> {
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let script = format!(
            "source <('{}' completions bash)\n\
             COMP_WORDS=({}); COMP_CWORD={}\n\
             COMP_LINE=\"{}\"; COMP_POINT=${{#COMP_LINE}}\n\
             _authd authd \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            authd_bin().display(),
            quoted.join(" "),
            words.len() - 1,
            words.join(" ")
        );
        let out = Command::new(&bash).arg("-c").arg(script).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(complete(&["authd", "se"]), ["serve"]);
    assert_eq!(complete(&["authd", "co"]), ["completions"]);
    assert_eq!(complete(&["authd", "serve", "--me"]), ["--metrics"]);
    assert_eq!(
        complete(&["authd", "ctl", "entity", "put", "--gen"]),
        ["--generate-psk"]
    );
    let shells = complete(&["authd", "completions", ""]);
    for shell in ["bash", "zsh", "fish"] {
        assert!(shells.contains(&shell.to_owned()), "{shells:?}");
    }
}

#[test]
fn the_man_page_documents_every_subcommand_and_flag() {
    let page = authd_output(&["man"]);
    assert!(page.contains(".TH authd 1"), "{}", shorten(&page));
    // roff escapes `-` as `\-`.
    let roff = |s: &str| s.replace('-', "\\-");
    for (path, flags) in cli_tree() {
        if !path.is_empty() {
            let heading = format!(".SH \"AUTHD {}\"", path.join(" ").to_uppercase());
            assert!(page.contains(&heading), "no `{heading}`");
        }
        for flag in flags {
            let flag = roff(&format!("--{flag}"));
            assert!(page.contains(&flag), "no `{flag}` (authd {path:?})");
        }
    }
    match find_tool("groff") {
        Some(groff) => {
            let mut child = Command::new(groff)
                .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(page.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && warnings.is_empty(),
                "groff: {warnings}"
            );
        }
        None => println!("groff is not installed: the page was not rendered"),
    }

    // --dir: a page per command.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(authd_bin())
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for page in [
        "authd.1",
        "authd-serve.1",
        "authd-ctl-entity-put.1",
        "authd-man.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
}

// ---------------------------------------------------------------------------------------
// Import progress.

/// `n` import lines (entities with a PSK), as a file in `dir`.
fn import_file(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("provision.jsonl");
    let mut text = String::new();
    for i in 0..n {
        text.push_str(
            &json!({"method": "Entity.Put", "args": {"id": format!("dev-{i}"), "psk": format!("psk-{i}")}})
                .to_string(),
        );
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `command` (a shell command line) on a pseudo-terminal with `script`; its output.
fn on_a_terminal(command: &str) -> String {
    let script = required_tool("script", "bsdutils");
    let out = Command::new(script)
        .args(["-q", "-e", "-c", command, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{command}: {out:?}\n{text}");
    text
}

/// The summary line in a terminal's output (after the bar's escape sequences).
fn summary_in(output: &str) -> String {
    let at = output
        .rfind(" applied, ")
        .unwrap_or_else(|| panic!("no summary in {output:?}"));
    let start = output[..at]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let end = at + output[at..].find(')').expect("the summary ends with `)`") + 1;
    output[start..end].to_owned()
}

/// One summary line: `N applied, 0 refused in S s (R lines/s)`.
fn assert_summary(line: &str, n: usize) {
    let rest = line
        .strip_prefix(&format!("{n} applied, 0 refused in "))
        .unwrap_or_else(|| panic!("summary: {line:?}"));
    assert!(
        rest.ends_with(" lines/s)") && rest.contains(" s ("),
        "{line:?}"
    );
}

#[test]
fn import_prints_only_its_summary_when_not_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let file = import_file(dir.path(), 300);
    let out = Command::new(authd_bin())
        .args(["import", "--data"])
        .arg(dir.path().join("data"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert_summary(stdout.trim_end(), 300);
    assert!(
        out.stderr.is_empty(),
        "no progress off a terminal: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Standard input too.
    let out = Command::new(authd_bin())
        .args(["import", "--data"])
        .arg(dir.path().join("data2"))
        .arg("-")
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    assert_summary(String::from_utf8(out.stdout).unwrap().trim_end(), 300);
}

#[test]
fn import_shows_progress_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let file = import_file(dir.path(), 2000);
    let size = std::fs::metadata(&file).unwrap().len();
    let bin = authd_bin();
    let data = dir.path().join("data");
    let output = on_a_terminal(&format!(
        "'{}' import --data '{}' '{}'",
        bin.display(),
        data.display(),
        file.display()
    ));
    // The bar: bytes of the file's size, a rate, time left; then the summary.
    let total = format!("{:.2} KiB", size as f64 / 1024.0);
    assert!(output.contains(&total), "no `{total}` in {output:?}");
    assert!(
        output.contains("B/s") && output.contains(" left"),
        "{output:?}"
    );
    assert_summary(&summary_in(&output), 2000);

    // From standard input the total is unknown: amount and rate, no time left.
    let output = on_a_terminal(&format!(
        "'{}' import --data '{}' - < '{}'",
        bin.display(),
        dir.path().join("data2").display(),
        file.display()
    ));
    assert!(output.contains("B/s"), "{output:?}");
    assert!(!output.contains(" left"), "{output:?}");
    assert_summary(&summary_in(&output), 2000);
}
