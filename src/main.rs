//! The `authd` command: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use authd::caller::{admin_key_path, parse_caller_keys};
use authd::client::{CallError, Client, ClientOptions};
use authd::config::{
    default_data_dir, BrokerAddress, Config, LogFormat, DEFAULT_BROKER, DEFAULT_SERVICE_ID,
};
use authd::frame::RpcError;
use authd::mqtt::Tls;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "authd",
    version,
    about = "Authentication and authorization worker for an IoT cloud (mg_rpc over MQTT)"
)]
struct Cli {
    /// Log format on stderr [default: text, or `log_format` in the config file].
    #[arg(long, global = true, value_enum, env = "AUTHD_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker.
    Serve(ServeArgs),
    /// Send one request and print the response frame (exit 0: result, 1: error frame,
    /// 2: timeout or transport failure).
    Call(CallArgs),
    /// Admin commands (exit codes as for `call`): `authd ctl entity put dev1 --generate-psk`.
    Ctl(CtlArgs),
    /// Bulk provisioning into a stopped worker's data directory: JSON lines of
    /// `{"method": "Entity.Put", "args": {…}}` (or ACL.Add, …).
    Import(ImportArgs),
    /// Server keys: `authd key rotate` adds one (restart the worker to use it), `authd key
    /// list` shows what each key still signs.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Load generator: authd beside the null-worker ceiling, on the same broker, in one run.
    Bench(BenchArgs),
    /// The ceiling for `bench`: answers `true` to every frame, on the same MQTT stack.
    NullWorker(NullWorkerArgs),
}

#[derive(Args)]
struct ImportArgs {
    /// JSON lines file; `-` reads standard input.
    file: PathBuf,
    /// TOML configuration file (for `data` and `cache_mib`).
    #[arg(long, env = "AUTHD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory of the (stopped) worker.
    #[arg(long, env = "AUTHD_DATA")]
    data: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Add a fresh server key to `<data>/server.key` and print its id (never the key). The
    /// worker uses it after a restart; older keys keep verifying.
    Rotate {
        /// Data directory of the worker.
        #[arg(long, env = "AUTHD_DATA")]
        data: Option<PathBuf>,
    },
    /// For each server key id: whether it is in the key file, whether it is the newest, and
    /// how many PSK hashes and live tokens use it (as JSON). Needs the worker stopped.
    List {
        /// Data directory of the (stopped) worker.
        #[arg(long, env = "AUTHD_DATA")]
        data: Option<PathBuf>,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Broker to use; default: start a private mosquitto (TCP_NODELAY on) on a free port.
    #[arg(long)]
    broker: Option<String>,
    /// Requests per measured run.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    requests: usize,
    /// Measured runs per target and scenario, alternating the ceiling and authd.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// In-flight levels, comma separated.
    #[arg(long, short = 'w', value_delimiter = ',', default_values_t = vec![1, 64])]
    in_flight: Vec<usize>,
    /// Load ENTITIES,RULES (e.g. 1000000,100000) with `authd import` before starting authd.
    #[arg(long, value_name = "ENTITIES,RULES", value_delimiter = ',')]
    scale: Option<Vec<usize>>,
    /// Scenarios, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = authd::bench::SCENARIOS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    scenarios: Vec<String>,
}

#[derive(Args)]
struct NullWorkerArgs {
    #[arg(long, env = "AUTHD_BROKER", default_value = DEFAULT_BROKER)]
    broker: String,
    /// Service id: requests come on `{id}/rpc`.
    #[arg(long, default_value = "authd-null")]
    id: String,
}

/// Flags override `AUTHD_*` variables, which override the config file, which overrides
/// the defaults. Every key of the file is also a variable: `AUTHD_` + the key in upper case.
#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (see authd.example.toml).
    #[arg(long, env = "AUTHD_CONFIG")]
    config: Option<PathBuf>,
    /// Broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS).
    #[arg(long, env = "AUTHD_BROKER")]
    broker: Option<String>,
    /// Data directory (database, server key, generated admin key).
    #[arg(long, env = "AUTHD_DATA")]
    data: Option<PathBuf>,
    /// Service id: the request topic is `{id}/rpc`.
    #[arg(long, env = "AUTHD_ID")]
    id: Option<String>,
    /// MQTT client id (fixed per worker: the broker keeps its session).
    #[arg(long, env = "AUTHD_CLIENT_ID")]
    client_id: Option<String>,
    #[arg(long, env = "AUTHD_BROKER_USERNAME")]
    broker_username: Option<String>,
    #[arg(long, env = "AUTHD_BROKER_PASSWORD", hide_env_values = true)]
    broker_password: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Caller keys, `name:scope:secret` items separated by commas.
    #[arg(
        long = "caller-keys",
        env = "AUTHD_CALLER_KEYS",
        hide_env_values = true
    )]
    caller_keys: Option<String>,
    /// Serve Prometheus /metrics and /ready on this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR", env = "AUTHD_METRICS")]
    metrics: Option<String>,
    /// Print the configuration in force (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
}

/// TLS to an `mqtts://` broker (`serve`, `call` and `ctl`).
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

#[derive(Args)]
struct CallArgs {
    /// Method, e.g. /v1/Auth.GetToken or Auth.GetToken.
    method: String,
    /// Arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
    #[command(flatten)]
    connection: Connection,
}

/// Where the worker is and which key to call it with (`call` and `ctl`).
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

/// Provisioning, in the style of `mosquitto_ctrl dynsec`: each command is one admin method.
#[derive(Args)]
struct CtlArgs {
    #[command(subcommand)]
    what: CtlCommand,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Entities: the devices and users that sign in (Entity.Put/Get/List/Delete).
    #[command(subcommand)]
    Entity(EntityCommand),
    /// Access rules for AuthorizeCommand (ACL.Add, ACL.List, ACL.Delete).
    #[command(subcommand)]
    Acl(AclCommand),
}

#[derive(Subcommand)]
enum AclCommand {
    /// Add a rule (`*` in a pattern matches any run of characters); prints {"rule_id": N}.
    Add {
        /// Who sends the command (pattern).
        #[arg(value_name = "SRC")]
        src_pattern: String,
        /// Whom it is sent to (pattern).
        #[arg(value_name = "DST")]
        dst_pattern: String,
        /// Which command (pattern).
        #[arg(value_name = "CMD")]
        cmd_pattern: String,
        #[arg(value_enum)]
        effect: EffectArg,
    },
    /// List the rules, by rule id.
    List,
    /// Delete a rule (succeeds if there is no such rule).
    Delete { rule_id: u64 },
}

#[derive(Clone, Copy, ValueEnum)]
enum EffectArg {
    Allow,
    Deny,
}

#[derive(Subcommand)]
enum EntityCommand {
    /// Create or replace an entity (Entity.Put). Prints `{"psk": …}` with --generate-psk.
    Put(EntityPutArgs),
    /// Show an entity, never its secrets (Entity.Get).
    Get {
        /// Entity id.
        id: String,
    },
    /// List entities in id order (Entity.List).
    List(EntityListArgs),
    /// Remove an entity and its app tokens (Entity.Delete). Idempotent.
    Delete {
        /// Entity id.
        id: String,
    },
}

#[derive(Args)]
struct EntityPutArgs {
    /// Entity id.
    id: String,
    /// The PSK. Visible to other local users in the process list: prefer --psk-file.
    #[arg(long, conflicts_with_all = ["psk_file", "generate_psk"])]
    psk: Option<String>,
    /// File holding the PSK (trailing newline ignored); `-` reads standard input.
    #[arg(long, conflicts_with = "generate_psk")]
    psk_file: Option<PathBuf>,
    /// Make a 256-bit PSK; it is printed once.
    #[arg(long)]
    generate_psk: bool,
    /// PEM certificate file to pin.
    #[arg(long, conflicts_with = "cert_sha256")]
    cert: Option<PathBuf>,
    /// SHA-256 fingerprint of the certificate to pin (hex, colons allowed).
    #[arg(long)]
    cert_sha256: Option<String>,
    /// The owning user.
    #[arg(long)]
    owner: Option<String>,
    /// Create it disabled (every sign-in refused).
    #[arg(long)]
    disabled: bool,
    /// Fail (exit 1, error 409) if the id exists instead of replacing it.
    #[arg(long)]
    create_only: bool,
}

#[derive(Args)]
struct EntityListArgs {
    /// Only entities of this owner.
    #[arg(long)]
    owner: Option<String>,
    /// Only ids starting with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Start after this id (the `next` of the previous page).
    #[arg(long, conflicts_with = "all")]
    after: Option<String>,
    /// Page size (1 to 1000).
    #[arg(long)]
    limit: Option<u32>,
    /// Follow `next` and print every page as one list.
    #[arg(long)]
    all: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` resolves its configuration first: the log format and filter are part of it.
    let command = match cli.command {
        Command::Serve(args) => {
            let (mut config, print) = match load_config(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("authd: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(format) = cli.log_format {
                config.log_format = format;
            }
            if print {
                return match config.describe() {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("authd: {e}");
                        ExitCode::from(2)
                    }
                };
            }
            init_logging(config.log_format, &config.log_filter);
            Run::Serve(Box::new(config))
        }
        // A one-shot client speaks only when something is wrong.
        other => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text), "warn");
            Run::Other(Box::new(other))
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("authd: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        let other = match command {
            Run::Serve(config) => return serve(*config).await,
            Run::Other(other) => *other,
        };
        match other {
            Command::Call(args) => call(args).await,
            Command::Ctl(args) => ctl(args).await,
            Command::Import(args) => import(args).await,
            Command::Key(command) => key(command).await,
            Command::Bench(args) => bench(args).await,
            Command::NullWorker(args) => null_worker(args).await,
            Command::Serve(_) => ExitCode::from(2), // resolved above
        }
    })
}

/// What `main` runs once logging is set up.
enum Run {
    Serve(Box<Config>),
    Other(Box<Command>),
}

/// Logs to stderr. `RUST_LOG`, when set, wins over `default_filter`; a bare level in either
/// is authd's level, other crates stay at info (see `authd::logging`).
fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = authd::logging::filter(std::env::var("RUST_LOG").ok().as_deref(), default_filter);
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

/// defaults < file < `AUTHD_*` environment < flags (clap reads a flag's own variable when
/// the flag is absent, which keeps the same order).
fn load_config(args: ServeArgs) -> anyhow::Result<(Config, bool)> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.apply_env(|name| std::env::var(name).ok())?;
    let overrides = [
        (args.broker, &mut config.broker),
        (args.id, &mut config.id),
        (args.client_id, &mut config.client_id),
    ];
    for (value, slot) in overrides {
        if let Some(v) = value {
            *slot = v;
        }
    }
    if let Some(data) = args.data {
        config.data = data;
    }
    if args.broker_username.is_some() {
        config.broker_username = args.broker_username;
    }
    if args.broker_password.is_some() {
        config.broker_password = args.broker_password;
    }
    if let Some(keys) = args.caller_keys {
        config.callers = parse_caller_keys(&keys).map_err(anyhow::Error::msg)?;
    }
    if args.metrics.is_some() {
        config.metrics = args.metrics;
    }
    let tls = args.tls;
    for (value, slot) in [
        (tls.broker_ca, &mut config.broker_ca),
        (tls.broker_cert, &mut config.broker_cert),
        (tls.broker_key, &mut config.broker_key),
    ] {
        if value.is_some() {
            *slot = value;
        }
    }
    config.validate()?;
    Ok((config, args.print_config))
}

async fn serve(config: Config) -> ExitCode {
    match authd::serve(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
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

/// Exit status of `call` and `ctl`: 1 for an error frame, 2 for anything else that failed.
fn failed(command: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("authd {command}: {msg}");
    ExitCode::from(2)
}

async fn call(args: CallArgs) -> ExitCode {
    let call_args: serde_json::Value = match serde_json::from_str(&args.args) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => {
            return failed(
                "call",
                "ARGS_JSON must be a JSON object, e.g. '{\"host\":\"app.example.com\"}'",
            )
        }
    };
    let (client, timeout) = match connect(args.connection).await {
        Ok(c) => c,
        Err(e) => return failed("call", e),
    };
    let result = client.call(&args.method, call_args, timeout).await;
    client.close().await;
    match result {
        Ok(response) => {
            match serde_json::to_string(&response) {
                Ok(text) => println!("{text}"),
                Err(e) => return failed("call", e),
            }
            if response.error.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => failed("call", e),
    }
}

/// Connects as `connection` says; returns the client and the per-call timeout.
async fn connect(connection: Connection) -> Result<(Client, Duration), String> {
    let broker = BrokerAddress::parse(&connection.broker).map_err(|e| e.to_string())?;
    let key = match (connection.key, connection.key_file) {
        (Some(k), _) => Some(k),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => {
            let path = admin_key_path(&connection.data.unwrap_or_else(default_data_dir));
            std::fs::read_to_string(path)
                .ok()
                .map(|k| k.trim().to_owned())
        }
    };
    let tls = &connection.tls;
    let tls = Tls::for_broker(
        &broker,
        tls.broker_ca.as_deref(),
        tls.broker_cert.as_deref(),
        tls.broker_key.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let mut options = ClientOptions::new(broker);
    options.tls = tls;
    options.request_topic = format!("{}/rpc", connection.service_id);
    options.service_id = connection.service_id;
    options.key = key;
    options.credentials = connection
        .broker_username
        .map(|u| (u, connection.broker_password.unwrap_or_default()));
    if let Some(src) = connection.src {
        options.src = src;
    }
    let timeout = Duration::from_secs_f64(connection.timeout.max(0.0));
    let client = Client::connect(options, timeout)
        .await
        .map_err(|e| e.to_string())?;
    Ok((client, timeout))
}

async fn ctl(args: CtlArgs) -> ExitCode {
    let request = match args.what {
        CtlCommand::Entity(command) => entity_request(command),
        CtlCommand::Acl(command) => Ok(acl_request(command)),
    };
    let (method, call_args, follow) = match request {
        Ok(r) => r,
        Err(e) => return failed("ctl", e),
    };
    let (client, timeout) = match connect(args.connection).await {
        Ok(c) => c,
        Err(e) => return failed("ctl", e),
    };
    let result = ctl_call(&client, method, call_args, follow, timeout).await;
    client.close().await;
    match result {
        Ok(Ok(Some(value))) => match serde_json::to_string_pretty(&value) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => failed("ctl", e),
        },
        Ok(Ok(None)) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("authd ctl: {} {}", e.code, e.message);
            ExitCode::from(1)
        }
        Err(e) => failed("ctl", e),
    }
}

/// One `ctl` command's method and arguments, and whether to follow `next` (list --all).
fn entity_request(command: EntityCommand) -> Result<(&'static str, Value, bool), String> {
    Ok(match command {
        EntityCommand::Put(put) => {
            let mut args = json!({ "id": put.id });
            let psk = match (put.psk, put.psk_file) {
                (Some(psk), _) => Some(psk),
                (None, Some(path)) => Some(read_secret(&path)?),
                (None, None) => None,
            };
            if let Some(psk) = psk {
                args["psk"] = json!(psk);
            }
            if put.generate_psk {
                args["generate_psk"] = json!(true);
            }
            if let Some(path) = put.cert {
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                args["cert"] = json!(pem);
            }
            if let Some(fp) = put.cert_sha256 {
                args["cert_sha256"] = json!(fp);
            }
            if let Some(owner) = put.owner {
                args["owner"] = json!(owner);
            }
            if put.disabled {
                args["disabled"] = json!(true);
            }
            if put.create_only {
                args["create_only"] = json!(true);
            }
            ("/v1/Entity.Put", args, false)
        }
        EntityCommand::Get { id } => ("/v1/Entity.Get", json!({ "id": id }), false),
        EntityCommand::Delete { id } => ("/v1/Entity.Delete", json!({ "id": id }), false),
        EntityCommand::List(list) => {
            let mut args = json!({});
            for (name, value) in [
                ("owner", list.owner),
                ("prefix", list.prefix),
                ("after", list.after),
            ] {
                if let Some(v) = value {
                    args[name] = json!(v);
                }
            }
            if let Some(limit) = list.limit {
                args["limit"] = json!(limit);
            }
            ("/v1/Entity.List", args, list.all)
        }
    })
}

/// One `ctl acl` command's method and arguments.
fn acl_request(command: AclCommand) -> (&'static str, Value, bool) {
    match command {
        AclCommand::Add {
            src_pattern,
            dst_pattern,
            cmd_pattern,
            effect,
        } => {
            let effect = match effect {
                EffectArg::Allow => "allow",
                EffectArg::Deny => "deny",
            };
            let args = json!({"src": src_pattern, "dst": dst_pattern, "cmd": cmd_pattern, "effect": effect});
            ("/v1/ACL.Add", args, false)
        }
        AclCommand::List => ("/v1/ACL.List", json!({}), false),
        AclCommand::Delete { rule_id } => ("/v1/ACL.Delete", json!({ "rule_id": rule_id }), false),
    }
}

/// A PSK from a file, or from standard input for `-`; one trailing newline is dropped.
fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("standard input: {e}"))?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
    };
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_owned())
}

/// Calls `method`; with `follow`, repeats with `after` = `next` and joins the pages'
/// `entities`. The outer error is a transport failure, the inner one an error frame.
async fn ctl_call(
    client: &Client,
    method: &str,
    mut args: Value,
    follow: bool,
    timeout: Duration,
) -> Result<Result<Option<Value>, RpcError>, CallError> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let response = client.call(method, args.clone(), timeout).await?;
        if let Some(e) = response.error {
            return Ok(Err(e));
        }
        if !follow {
            return Ok(Ok(response.result));
        }
        let mut page = response.result.unwrap_or_default();
        if let Some(Value::Array(entities)) = page.get_mut("entities").map(Value::take) {
            all.extend(entities);
        }
        match page.get("next") {
            Some(next) => args["after"] = next.clone(),
            None => return Ok(Ok(Some(json!({ "entities": all })))),
        }
    }
}

async fn bench(args: BenchArgs) -> ExitCode {
    let authd = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("authd bench: {e}");
            return ExitCode::from(2);
        }
    };
    let options = authd::bench::BenchOptions {
        broker: args.broker,
        requests: args.requests.max(1),
        rounds: args.rounds.max(1),
        in_flight: args.in_flight,
        scenarios: args.scenarios,
        authd,
        scale: match args.scale.as_deref() {
            None => None,
            Some([entities, rules]) => Some((*entities, *rules)),
            Some(_) => {
                eprintln!("authd bench: --scale takes ENTITIES,RULES, e.g. 1000000,100000");
                return ExitCode::from(2);
            }
        },
    };
    match authd::bench::run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("authd bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn null_worker(args: NullWorkerArgs) -> ExitCode {
    let config = Config {
        broker: args.broker,
        client_id: args.id.clone(),
        id: args.id,
        ..Config::default()
    };
    match authd::bench::null_worker(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("authd null-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn key(command: KeyCommand) -> ExitCode {
    match command {
        KeyCommand::Rotate { data } => {
            let data = data.unwrap_or_else(default_data_dir);
            match authd::keys::rotate(&data) {
                Ok(id) => {
                    println!("{id}");
                    eprintln!("authd key rotate: added server key {id} to {}; restart the worker to use it, and keep the older keys while tokens or PSK hashes use them (authd key list)", authd::keys::key_file(&data).display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("authd key rotate: {e}");
                    ExitCode::from(2)
                }
            }
        }
        KeyCommand::List { data } => {
            let config = Config {
                data: data.unwrap_or_else(default_data_dir),
                ..Config::default()
            };
            match authd::keys::list(&config)
                .await
                .and_then(|keys| Ok(serde_json::to_string_pretty(&json!({ "keys": keys }))?))
            {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("authd key list: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

async fn import(args: ImportArgs) -> ExitCode {
    let result = async {
        let mut config = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(data) = args.data {
            config.data = data;
        }
        if args.file.as_os_str() == "-" {
            authd::import::import(&config, std::io::stdin().lock()).await
        } else {
            let file = std::fs::File::open(&args.file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
            authd::import::import(&config, std::io::BufReader::new(file)).await
        }
    }
    .await;
    match result {
        Ok(report) => {
            for (line, error) in &report.errors {
                eprintln!("line {line}: {error}");
            }
            println!("{} applied, {} refused", report.applied, report.refused);
            if report.refused == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("authd import: {e:#}");
            ExitCode::from(2)
        }
    }
}
