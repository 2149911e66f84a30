//! `authd serve`: resolve the configuration, then run the worker until SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::{init_logging, shutdown_signal, Failure};
use crate::config::{Config, LogFormat};
use crate::secret::Secret;

/// The worker's flags. Each one but `--config` and `--print-config` is a configuration key,
/// its field named as the key, so this struct is the top layer of [`Config::load`] as it
/// stands: a new flag needs a field here and nothing else. clap does not read their
/// variables; the configuration's environment layer does, below the flags.
#[derive(Args, Serialize)]
#[command(
    after_help = "Precedence: flags > AUTHD_* environment variables > the config file > defaults. \
Every key of the config file (authd.example.toml) is also a variable, AUTHD_ + the key in \
upper case, and so is every flag here: --client-id is AUTHD_CLIENT_ID, --caller-keys is \
AUTHD_CALLER_KEYS."
)]
pub struct ServeArgs {
    /// TOML configuration file (see authd.example.toml).
    #[arg(long, env = "AUTHD_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS).
    #[arg(long)]
    broker: Option<String>,
    /// Data directory (database, server key, generated admin key).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where the state lives: postgres://USER@HOST[:PORT]/DB (several workers share it)
    /// [default: the embedded database in --data]. Prefer AUTHD_STORE when the URL holds
    /// a password.
    #[arg(long, value_name = "URL")]
    store: Option<Secret>,
    /// Shared subscription group: workers of one group split the requests between them
    /// (`$share/NAME/…`); give each its own --client-id.
    #[arg(long, value_name = "NAME")]
    share_group: Option<String>,
    /// Service id: the request topic is `{id}/rpc`.
    #[arg(long)]
    id: Option<String>,
    /// MQTT client id (fixed per worker: the broker keeps its session).
    #[arg(long)]
    client_id: Option<String>,
    /// Broker account name (with --broker-password).
    #[arg(long)]
    broker_username: Option<String>,
    /// Prefer AUTHD_BROKER_PASSWORD: a flag is visible in the process list.
    #[arg(long)]
    broker_password: Option<Secret>,
    /// PEM CA certificate(s) that sign the broker's certificate [default: system roots].
    #[arg(long, value_name = "FILE")]
    broker_ca: Option<PathBuf>,
    /// PEM client certificate to present to the broker (with --broker-key).
    #[arg(long, value_name = "FILE", requires = "broker_key")]
    broker_cert: Option<PathBuf>,
    /// PEM private key of --broker-cert.
    #[arg(long, value_name = "FILE", requires = "broker_cert")]
    broker_key: Option<PathBuf>,
    /// Caller keys, `name:scope:secret` items separated by commas (replace the file's
    /// `[[caller]]` tables).
    #[arg(long = "caller-keys")]
    #[serde(rename = "caller")]
    caller_keys: Option<Secret>,
    /// Serve Prometheus /metrics and /ready on this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// The global `--log-format`, a key like the others.
    #[arg(skip)]
    log_format: Option<LogFormat>,
    /// Print the configuration in force (secrets redacted) and exit.
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
}

/// Exit 2 for a bad configuration or a worker that cannot start (an unsafe or missing key
/// file, a data directory others can read, a database in use…); once the worker runs, its
/// failure is logged (exit 1).
pub(super) fn run(mut args: ServeArgs, log_format: Option<LogFormat>) -> Result<(), Failure> {
    args.log_format = log_format;
    let loaded = Config::load(
        args.config.as_deref(),
        |name| std::env::var(name).ok(),
        &args,
    );
    // The flags' secrets are in the configuration now (or refused): wipe them here.
    let print_config = args.print_config;
    drop(args);
    let config = loaded.map_err(Failure::unable)?;
    config.validate().map_err(Failure::unable)?;
    if print_config {
        print!("{}", config.describe().map_err(Failure::unable)?);
        return Ok(());
    }
    init_logging(config.log_format, &config.log_filter);
    let runtime = super::serve_runtime()
        .map_err(|e| Failure::Unable(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let worker = crate::Worker::start(config)
            .await
            .map_err(Failure::unable)?;
        worker
            .serve_until(shutdown_signal())
            .await
            .map_err(Failure::Stopped)
    })
}
