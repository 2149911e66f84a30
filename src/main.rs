//! The `authd` command: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use authd::caller::{admin_key_path, parse_caller_keys};
use authd::client::{CallError, Client, ClientOptions};
use authd::config::{default_data_dir, BrokerAddress, Config, DEFAULT_BROKER, DEFAULT_SERVICE_ID};

#[derive(Parser)]
#[command(
    name = "authd",
    version,
    about = "Authentication and authorization worker for an IoT cloud (mg_rpc over MQTT)"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "AUTHD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker.
    Serve(ServeArgs),
    /// Send one request and print the response frame (exit 0: result, 1: error frame,
    /// 2: timeout or transport failure).
    Call(CallArgs),
    /// Administer authd over the bus, in the style of mosquitto_ctrl (`authd ctl acl add …`).
    /// Prints the result as JSON (exit 0), or the error (exit 1: error frame, 2: timeout or
    /// transport failure).
    Ctl(CtlArgs),
}

/// Flags override `AUTHD_*` variables, which override the config file.
#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "AUTHD_CONFIG")]
    config: Option<PathBuf>,
    /// Broker URL, mqtt://HOST[:PORT].
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
    /// Caller keys, `name:scope:secret` items separated by commas.
    #[arg(
        long = "caller-keys",
        env = "AUTHD_CALLER_KEYS",
        hide_env_values = true
    )]
    caller_keys: Option<String>,
    /// Print the configuration in force (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
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

/// How `call` and `ctl` reach the worker. Global, so `ctl` takes them after its
/// subcommands too (`authd ctl acl list --broker …`).
#[derive(Args)]
struct Connection {
    #[arg(long, global = true, env = "AUTHD_BROKER", default_value = DEFAULT_BROKER)]
    broker: String,
    /// Service id of the worker.
    #[arg(long, global = true, env = "AUTHD_ID", default_value = DEFAULT_SERVICE_ID)]
    id: String,
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
    /// Seconds to wait for the response.
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
}

#[derive(Args)]
struct CtlArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    group: CtlGroup,
}

/// One group per admin method family; each command maps onto one method.
#[derive(Subcommand)]
enum CtlGroup {
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

impl CtlGroup {
    /// The method and arguments this command stands for.
    fn request(self) -> (&'static str, serde_json::Value) {
        use serde_json::json;
        match self {
            CtlGroup::Acl(AclCommand::Add {
                src_pattern,
                dst_pattern,
                cmd_pattern,
                effect,
            }) => {
                let effect = match effect {
                    EffectArg::Allow => "allow",
                    EffectArg::Deny => "deny",
                };
                (
                    "/v1/ACL.Add",
                    json!({"src": src_pattern, "dst": dst_pattern, "cmd": cmd_pattern, "effect": effect}),
                )
            }
            CtlGroup::Acl(AclCommand::List) => ("/v1/ACL.List", json!({})),
            CtlGroup::Acl(AclCommand::Delete { rule_id }) => {
                ("/v1/ACL.Delete", json!({ "rule_id": rule_id }))
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The worker logs its life at info; a one-shot client speaks only when something is wrong.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Call(_) | Command::Ctl(_) => "warn",
    };
    init_logging(cli.log_format, default_level);
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
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Call(args) => call(args).await,
            Command::Ctl(args) => {
                let (method, call_args) = args.group.request();
                send(args.connection, method, call_args, Print::Result).await
            }
        }
    })
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load_config(args: ServeArgs) -> anyhow::Result<(Config, bool)> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
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
    config.validate()?;
    Ok((config, args.print_config))
}

async fn serve(args: ServeArgs) -> ExitCode {
    let (config, print) = match load_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("authd: {e}");
            return ExitCode::from(2);
        }
    };
    if print {
        match toml::to_string_pretty(&config.redacted()) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("authd: {e}");
                return ExitCode::from(2);
            }
        }
    }
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

async fn call(args: CallArgs) -> ExitCode {
    let call_args: serde_json::Value = match serde_json::from_str(&args.args) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => {
            return Print::Frame
                .fail("ARGS_JSON must be a JSON object, e.g. '{\"host\":\"app.example.com\"}'")
        }
    };
    send(args.connection, &args.method, call_args, Print::Frame).await
}

/// What `send` prints on success: the whole response frame (`call`) or its result (`ctl`).
#[derive(Clone, Copy)]
enum Print {
    Frame,
    Result,
}

impl Print {
    fn fail(self, msg: impl std::fmt::Display) -> ExitCode {
        let who = match self {
            Print::Frame => "call",
            Print::Result => "ctl",
        };
        eprintln!("authd {who}: {msg}");
        ExitCode::from(2)
    }
}

/// Sends one request and prints the answer. Exit 0: a result, 1: an error frame,
/// 2: a timeout or transport failure.
async fn send(
    connection: Connection,
    method: &str,
    call_args: serde_json::Value,
    print: Print,
) -> ExitCode {
    let broker = match BrokerAddress::parse(&connection.broker) {
        Ok(b) => b,
        Err(e) => return print.fail(e),
    };
    let key = match (connection.key, connection.key_file) {
        (Some(k), _) => Some(k),
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(k) => Some(k.trim().to_owned()),
            Err(e) => return print.fail(format!("{}: {e}", path.display())),
        },
        (None, None) => {
            let path = admin_key_path(&connection.data.unwrap_or_else(default_data_dir));
            std::fs::read_to_string(path)
                .ok()
                .map(|k| k.trim().to_owned())
        }
    };
    let mut options = ClientOptions::new(broker);
    options.request_topic = format!("{}/rpc", connection.id);
    options.service_id = connection.id;
    options.key = key;
    options.credentials = connection
        .broker_username
        .map(|u| (u, connection.broker_password.unwrap_or_default()));
    if let Some(src) = connection.src {
        options.src = src;
    }
    let timeout = Duration::from_secs_f64(connection.timeout.max(0.0));
    let client = match Client::connect(options, timeout).await {
        Ok(c) => c,
        Err(e) => return print.fail(e),
    };
    let result = client.call(method, call_args, timeout).await;
    client.close().await;
    let response = match result {
        Ok(response) => response,
        Err(e @ (CallError::Timeout(_) | CallError::Closed | CallError::Connect(_))) => {
            return print.fail(e)
        }
    };
    match (print, &response.error) {
        (Print::Frame, _) => match serde_json::to_string(&response) {
            Ok(text) => println!("{text}"),
            Err(e) => return print.fail(e),
        },
        (Print::Result, Some(e)) => eprintln!("authd ctl: error {}: {}", e.code, e.message),
        (Print::Result, None) => {
            if let Some(result) = &response.result {
                println!("{result}");
            }
        }
    }
    if response.error.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
