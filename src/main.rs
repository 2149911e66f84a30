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
    /// Load generator: authd beside the null-worker ceiling, on the same broker, in one run.
    Bench(BenchArgs),
    /// The ceiling for `bench`: answers `true` to every frame, on the same MQTT stack.
    NullWorker(NullWorkerArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Broker to use; default: start a private mosquitto (TCP_NODELAY on) on a free port.
    #[arg(long)]
    broker: Option<String>,
    /// Requests per measured run.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    requests: usize,
    /// In-flight levels, comma separated.
    #[arg(long, short = 'w', value_delimiter = ',', default_values_t = vec![1, 64])]
    in_flight: Vec<usize>,
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
    #[arg(long, env = "AUTHD_BROKER", default_value = DEFAULT_BROKER)]
    broker: String,
    /// Service id of the worker.
    #[arg(long, env = "AUTHD_ID", default_value = DEFAULT_SERVICE_ID)]
    id: String,
    /// Caller key. Default: the generated admin key in the data directory.
    #[arg(long, env = "AUTHD_KEY", hide_env_values = true)]
    key: Option<String>,
    /// File holding the caller key.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Data directory whose generated admin key to use when no key is given.
    #[arg(long, env = "AUTHD_DATA")]
    data: Option<PathBuf>,
    /// Our address (replies come on `{src}/rpc`); it is the user of the token methods.
    #[arg(long)]
    src: Option<String>,
    #[arg(long, env = "AUTHD_BROKER_USERNAME")]
    broker_username: Option<String>,
    #[arg(long, env = "AUTHD_BROKER_PASSWORD", hide_env_values = true)]
    broker_password: Option<String>,
    /// Seconds to wait for the response.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The worker logs its life at info; a one-shot client speaks only when something is wrong.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Call(_) | Command::Bench(_) | Command::NullWorker(_) => "warn",
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
            Command::Bench(args) => bench(args).await,
            Command::NullWorker(args) => null_worker(args).await,
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
    let fail = |msg: String| {
        eprintln!("authd call: {msg}");
        ExitCode::from(2)
    };
    let broker = match BrokerAddress::parse(&args.broker) {
        Ok(b) => b,
        Err(e) => return fail(e.to_string()),
    };
    let call_args: serde_json::Value = match serde_json::from_str(&args.args) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => {
            return fail(
                "ARGS_JSON must be a JSON object, e.g. '{\"host\":\"app.example.com\"}'".into(),
            )
        }
    };
    let key = match (args.key, args.key_file) {
        (Some(k), _) => Some(k),
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(k) => Some(k.trim().to_owned()),
            Err(e) => return fail(format!("{}: {e}", path.display())),
        },
        (None, None) => {
            let path = admin_key_path(&args.data.unwrap_or_else(default_data_dir));
            std::fs::read_to_string(path)
                .ok()
                .map(|k| k.trim().to_owned())
        }
    };
    let mut options = ClientOptions::new(broker);
    options.request_topic = format!("{}/rpc", args.id);
    options.service_id = args.id;
    options.key = key;
    options.credentials = args
        .broker_username
        .map(|u| (u, args.broker_password.unwrap_or_default()));
    if let Some(src) = args.src {
        options.src = src;
    }
    let timeout = Duration::from_secs_f64(args.timeout.max(0.0));
    let client = match Client::connect(options, timeout).await {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let result = client.call(&args.method, call_args, timeout).await;
    client.close().await;
    match result {
        Ok(response) => {
            match serde_json::to_string(&response) {
                Ok(text) => println!("{text}"),
                Err(e) => return fail(e.to_string()),
            }
            if response.error.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e @ (CallError::Timeout(_) | CallError::Closed | CallError::Connect(_))) => {
            fail(e.to_string())
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
        in_flight: args.in_flight,
        scenarios: args.scenarios,
        authd,
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
