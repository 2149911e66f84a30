//! The `authd` command line: one file per subcommand, each parsing its arguments (clap
//! derive) and calling the library (`docs.rs`: completions and the man page, made from
//! [`Cli`]; `progress.rs`: progress of long commands on a terminal). [`run`] runs one and is the only place that reports a
//! failure and turns it into the exit status:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | done, and the answer is no (an error frame, refused import lines), or the worker stopped on an error |
//! | 2 | could not do the work: bad arguments or configuration, an unreadable file, a timeout, the broker unreachable |

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::caller::admin_key_path;
use crate::client::{Client, ClientOptions};
use crate::config::{
    default_data_dir, BrokerAddress, Config, LogFormat, DEFAULT_BROKER, DEFAULT_SERVICE_ID,
};
use crate::mqtt::Tls;

mod bench;
mod call;
mod ctl;
mod docs;
mod export;
mod import;
mod key;
pub mod progress;
mod serve;
mod watch;

/// The `authd` command line (`Cli::parse()`, then [`run`]). Also what shell completions
/// and the man page are generated from (`clap::CommandFactory`).
#[derive(Parser)]
#[command(
    name = "authd",
    version,
    about = "Authentication and authorization worker for an IoT cloud (mg_rpc over MQTT)"
)]
pub struct Cli {
    /// Log format on stderr, also AUTHD_LOG_FORMAT [default: text, or `log_format` in the
    /// config file].
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker.
    Serve(serve::ServeArgs),
    /// Send one request and print the response frame (exit 0: result, 1: error frame,
    /// 2: timeout or transport failure).
    Call(call::CallArgs),
    /// Admin commands (exit codes as for `call`): `authd ctl entity put dev1 --generate-psk`.
    Ctl(ctl::CtlArgs),
    /// Bulk provisioning into a stopped worker's store: JSON lines of `{"method":
    /// "Entity.Put", "args": {…}}` (or ACL.Add, …), or a dump made by `authd export`
    /// (moving a deployment, e.g. to PostgreSQL with --store).
    Import(import::ImportArgs),
    /// Every record of a stopped worker's store as JSON lines, for `authd import`: entities,
    /// live tokens, rules with their ids. No secret, and not the server key: copy server.key
    /// yourself.
    Export(export::ExportArgs),
    /// Server keys: `authd key rotate` adds one (restart the worker to use it), `authd key
    /// list` shows what each key still signs.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Follow the change events: each once, as a JSON line on stdout, in seq order, across
    /// broker restarts (exit 3: the events to follow on from are no longer retained).
    Watch(watch::WatchArgs),
    /// Load generator: authd beside the null-worker ceiling, on the same broker, in one run
    /// (runs `authd-bench`, built beside authd; `authd bench --help` shows its options).
    Bench(bench::BenchArgs),
    /// Shell completion script on stdout (bash, zsh, fish, elvish, powershell):
    /// `authd completions bash > /usr/share/bash-completion/completions/authd`.
    Completions(docs::CompletionsArgs),
    /// The manual page (roff) on stdout, every subcommand and flag in one page:
    /// `authd man | man -l -`.
    Man(docs::ManArgs),
}

impl Command {
    /// How a failure names the command: `authd <name>: <message>`.
    fn name(&self) -> &'static str {
        match self {
            Command::Serve(_) => "serve",
            Command::Call(_) => "call",
            Command::Ctl(_) => "ctl",
            Command::Import(_) => "import",
            Command::Export(_) => "export",
            Command::Key(command) => command.name(),
            Command::Watch(_) => "watch",
            Command::Bench(_) => "bench",
            Command::Completions(_) => "completions",
            Command::Man(_) => "man",
        }
    }
}

/// Runs the command `cli` names and returns its exit status (see the module docs).
pub fn run(cli: Cli) -> ExitCode {
    let name = cli.command.name();
    let log_format = cli.log_format;
    let result = match cli.command {
        // `serve` sets up logging itself: the format and filter are part of its configuration.
        Command::Serve(args) => serve::run(args, log_format),
        // Becomes `authd-bench`: nothing to set up.
        Command::Bench(args) => bench::run(args),
        // Made from the command line's definition: nothing to set up.
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
        Command::Call(args) => one_shot(log_format, call::run(args)),
        Command::Ctl(args) => one_shot(log_format, ctl::run(args)),
        Command::Import(args) => one_shot(log_format, import::run(args)),
        Command::Export(args) => one_shot(log_format, export::run(args)),
        Command::Key(command) => one_shot(log_format, key::run(command)),
        Command::Watch(args) => one_shot(log_format, watch::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.report(name);
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Why a command did not succeed. Only [`run`] prints it and turns it into the exit status.
#[derive(Debug)]
pub enum Failure {
    /// Exit 2: the command could not do its work (bad arguments or configuration, an
    /// unreadable file, a timeout, the broker unreachable).
    Unable(String),
    /// Exit 1: the command ran and the answer is no (`ctl`: the worker's error frame).
    Refused(String),
    /// Exit 1: the worker stopped on an error once running. Reported through its log, which
    /// is what stderr carries by then (JSON lines with `--log-format json`).
    Stopped(anyhow::Error),
    /// Exit 3: what the command was to continue from is gone (`watch`: the events after
    /// the seq it follows on from were pruned, or the store is not the one it followed);
    /// the caller must start over from a full read.
    Resync(String),
    /// Exit with this status and print nothing more: the output already says what went
    /// wrong (`call`'s error frame, `import`'s refused lines, `authd-bench`'s messages).
    Reported(u8),
}

impl Failure {
    /// [`Failure::Unable`] with `error`'s message (and its causes, for an `anyhow` error).
    pub fn unable(error: impl fmt::Display) -> Failure {
        Failure::Unable(format!("{error:#}"))
    }

    /// The process exit status.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Unable(_) => 2,
            Failure::Refused(_) | Failure::Stopped(_) => 1,
            Failure::Resync(_) => 3,
            Failure::Reported(code) => *code,
        }
    }

    fn report(&self, command: &str) {
        match self {
            Failure::Unable(message) | Failure::Refused(message) | Failure::Resync(message) => {
                eprintln!("authd {command}: {message}")
            }
            Failure::Stopped(e) => tracing::error!("{e:#}"),
            Failure::Reported(_) => {}
        }
    }
}

/// Sets up a one-shot command (logging at `warn`: it speaks only when something is wrong;
/// the async runtime) and runs `command`.
fn one_shot(
    log_format: Option<LogFormat>,
    command: impl Future<Output = Result<(), Failure>>,
) -> Result<(), Failure> {
    init_logging(one_shot_log_format(log_format)?, "warn");
    runtime()?.block_on(command)
}

/// `--log-format`, else `AUTHD_LOG_FORMAT`, else text: the configuration's layers with only
/// that key, since these commands have no configuration (another variable's bad value is
/// `serve`'s concern, not theirs).
fn one_shot_log_format(flag: Option<LogFormat>) -> Result<LogFormat, Failure> {
    #[derive(Serialize)]
    struct Flags {
        log_format: Option<LogFormat>,
    }
    let env = |name: &str| match name {
        "AUTHD_LOG_FORMAT" => std::env::var(name).ok(),
        _ => None,
    };
    let config = Config::load(None, env, &Flags { log_format: flag }).map_err(Failure::unable)?;
    Ok(config.log_format)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Unable(format!("cannot start the async runtime: {e}")))
}

/// The runtime a worker serves on: one thread. The serving path is the connection's one
/// task, which answers the reads itself (see `server.rs`); what waits (a write, the network
/// store) waits without a thread, and the embedded store's writer and syncer have threads of
/// their own. A second runtime thread would only park and wake beside it: measured, that cost
/// more CPU per request than answering did (README, Performance).
pub fn serve_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Logs to stderr. `RUST_LOG`, when set, wins over `default_filter`; a bare level in either
/// is authd's level, other crates stay at info (see [`crate::logging`]).
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = crate::logging::filter(std::env::var("RUST_LOG").ok().as_deref(), default_filter);
    // Colours only on a terminal: a log file or a container log gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM: the worker's cue to drain and stop.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A file's text; the failure names the file.
fn read_text(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| Failure::Unable(format!("{}: {e}", path.display())))
}

/// TLS to an `mqtts://` broker (`call`, `ctl` and `watch`).
#[derive(Args)]
struct TlsArgs {
    /// PEM CA certificate(s) that sign the broker's certificate [default: system roots].
    #[arg(long, global = true, value_name = "FILE", env = "AUTHD_BROKER_CA")]
    broker_ca: Option<PathBuf>,
    /// PEM client certificate to present to the broker (with --broker-key).
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "AUTHD_BROKER_CERT",
        requires = "broker_key"
    )]
    broker_cert: Option<PathBuf>,
    /// PEM private key of --broker-cert.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "AUTHD_BROKER_KEY",
        requires = "broker_cert"
    )]
    broker_key: Option<PathBuf>,
}

/// Where the worker is and which key to call it with (`call`, `ctl` and `watch`). A client
/// has no configuration file: clap reads these flags' variables itself.
#[derive(Args)]
#[command(next_help_heading = "Connection")]
struct Connection {
    #[arg(long, global = true, env = "AUTHD_BROKER", default_value = DEFAULT_BROKER)]
    broker: String,
    /// Service id of the worker.
    #[arg(long = "id", value_name = "ID", global = true, env = "AUTHD_ID", default_value = DEFAULT_SERVICE_ID)]
    service_id: String,
    /// Caller key. Default: the generated admin key in the data directory.
    #[arg(long, global = true, env = "AUTHD_KEY", hide_env_values = true)]
    key: Option<String>,
    /// File holding the caller key.
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// Data directory whose generated admin key to use when no key is given.
    #[arg(long, global = true, env = "AUTHD_DATA")]
    data: Option<PathBuf>,
    /// Our address (replies come on `{src}/rpc`); it is the user of the token methods.
    /// Default: the broker account (--broker-username), whose reply topic the shipped
    /// broker ACL lets it read; without an account, a fresh random one.
    #[arg(long, global = true)]
    src: Option<String>,
    #[arg(long, global = true, env = "AUTHD_BROKER_USERNAME")]
    broker_username: Option<String>,
    #[arg(
        long,
        global = true,
        env = "AUTHD_BROKER_PASSWORD",
        hide_env_values = true
    )]
    broker_password: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Seconds to wait for the response.
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
}

impl Connection {
    /// Connects as these flags say; returns the client and the per-call timeout.
    async fn connect(self) -> Result<(Client, Duration), Failure> {
        let (options, timeout) = self.client_options()?;
        let client = Client::connect(options, timeout)
            .await
            .map_err(Failure::unable)?;
        Ok((client, timeout))
    }

    /// The client's options as these flags say, and the per-call timeout (for a command
    /// that adds to them, e.g. `watch` its subscription).
    fn client_options(self) -> Result<(ClientOptions, Duration), Failure> {
        let broker = BrokerAddress::parse(&self.broker).map_err(Failure::unable)?;
        let key = match (self.key, self.key_file) {
            (Some(k), _) => Some(k),
            (None, Some(path)) => Some(read_text(&path)?.trim().to_owned()),
            // No key file is not an error here: the worker answers 401, which says more.
            (None, None) => {
                let path = admin_key_path(&self.data.unwrap_or_else(default_data_dir));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|k| k.trim().to_owned())
            }
        };
        let tls = &self.tls;
        let tls = Tls::for_broker(
            &broker,
            tls.broker_ca.as_deref(),
            tls.broker_cert.as_deref(),
            tls.broker_key.as_deref(),
        )
        .map_err(Failure::unable)?;
        let mut options = ClientOptions::new(broker);
        options.tls = tls;
        options.request_topic = format!("{}/rpc", self.service_id);
        options.service_id = self.service_id;
        options.key = key;
        // The shipped broker lets an account read only `<account>/rpc`, and makes its
        // account name its client id.
        if let Some(src) = self.src.or_else(|| self.broker_username.clone()) {
            options.src = src;
        }
        options.credentials = self
            .broker_username
            .map(|u| (u, self.broker_password.unwrap_or_default()));
        let timeout = Duration::from_secs_f64(self.timeout.max(0.0));
        Ok((options, timeout))
    }
}
