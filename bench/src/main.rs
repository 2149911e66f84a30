//! `authd-bench`: the load generator that measures authd beside a ceiling, and the ceiling
//! itself (`authd-bench null-worker`). `authd bench …` runs this binary with its arguments.
//!
//! | module | what it is for |
//! |---|---|
//! | [`load`] | one benchmark run: the targets, the load, the table |
//! | [`scenario`] | the request mixes, their setup and their expected answers |
//! | [`setup`] | the processes a run starts (mosquitto, `authd serve`, the null worker) |
//! | [`null_worker`](mod@null_worker) | the ceiling: authd's serving path with a handler that answers `true` |

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use authd::config::{Config, DEFAULT_BROKER};

mod load;
mod null_worker;
mod scenario;
mod setup;

#[derive(Parser)]
#[command(
    name = "authd-bench",
    version,
    about = "Load generator: authd beside the null-worker ceiling, on the same broker, in one run",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand)]
enum Command {
    /// The ceiling: answers `true` to every frame, on authd's MQTT serving path.
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
    /// Measured runs per target and scenario, alternating the ceiling and authd.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// In-flight levels, comma separated.
    #[arg(long, short = 'w', value_delimiter = ',', default_values_t = vec![1, 64])]
    in_flight: Vec<usize>,
    /// Load ENTITIES,RULES (e.g. 1000000,100000) with `authd import` before starting authd.
    #[arg(long, value_name = "ENTITIES,RULES", value_parser = parse_scale)]
    scale: Option<(usize, usize)>,
    /// Also measure authd on PostgreSQL: the server, postgres://USER@HOST:PORT (the run
    /// makes a database there for each PostgreSQL target and drops them after).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Workers in one share group on PostgreSQL for the `pgN` target (with --store).
    #[arg(long, default_value_t = 2)]
    pg_workers: usize,
    /// Targets besides the ceiling, comma separated: sled, pg, pgN [default: all].
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Scenarios, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = scenario::NAMES.map(String::from))]
    scenarios: Vec<String>,
    /// Also measure the null worker of another build, in the same run (row `baseline`):
    /// that build's authd-bench binary, e.g. one of the commit before a change to the
    /// serving path.
    #[arg(long, value_name = "AUTHD_BENCH")]
    baseline: Option<PathBuf>,
}

#[derive(Args)]
struct NullWorkerArgs {
    #[arg(long, env = "AUTHD_BROKER", default_value = DEFAULT_BROKER)]
    broker: String,
    /// Service id: requests come on `{id}/rpc`.
    #[arg(long, default_value = "authd-null")]
    id: String,
}

/// `ENTITIES,RULES`.
fn parse_scale(text: &str) -> Result<(usize, usize), String> {
    let bad = || "takes ENTITIES,RULES, e.g. 1000000,100000".to_string();
    let (entities, rules) = text.split_once(',').ok_or_else(bad)?;
    Ok((
        entities.trim().parse().map_err(|_| bad())?,
        rules.trim().parse().map_err(|_| bad())?,
    ))
}

/// Exit 0 when done, 1 when the run (or the null worker) failed; clap's usage errors are 2.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, result) = match cli.command {
        Some(Command::NullWorker(args)) => ("null-worker", null_worker(args)),
        None => ("authd-bench", bench(cli.bench)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let options = load::BenchOptions {
        broker: args.broker,
        requests: args.requests.max(1),
        rounds: args.rounds.max(1),
        in_flight: args.in_flight,
        scenarios: args.scenarios,
        authd: authd_binary()?,
        scale: args.scale,
        store: args.store,
        pg_workers: args.pg_workers,
        only: args.only,
        baseline: args.baseline,
    };
    runtime()?.block_on(load::run(options))
}

fn null_worker(args: NullWorkerArgs) -> anyhow::Result<()> {
    // Quiet unless something is wrong, as the worker it stands beside (RUST_LOG=warn).
    authd::cli::init_logging(authd::config::LogFormat::Text, "warn");
    let config = Config {
        broker: args.broker,
        client_id: args.id.clone(),
        id: args.id,
        ..Config::default()
    };
    // The same runtime as `authd serve`.
    authd::cli::serve_runtime()?.block_on(null_worker::run(config, authd::cli::shutdown_signal()))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The `authd` binary beside this one: `cargo build` puts both in the same target directory.
fn authd_binary() -> anyhow::Result<PathBuf> {
    let authd =
        std::env::current_exe()?.with_file_name(format!("authd{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        authd.is_file(),
        "{} not found: build authd beside authd-bench with `cargo build --release` (target/release/) or `cargo build` (target/debug/)",
        authd.display()
    );
    Ok(authd)
}
