//! authd: the authentication and authorization worker of an IoT cloud.
//!
//! It listens on an MQTT broker for mg_rpc ("clubby v2") request frames, answers on the
//! caller's reply topic, and keeps its state in an embedded sled database. Data flows one
//! way: bus → frame → method → store → reply. The contract is `docs/protocol.md`; the map of
//! the code is `ARCHITECTURE.md`.
//!
//! | module | what it is for |
//! |---|---|
//! | [`config`] | file + `AUTHD_*` env + flags → [`config::Config`] |
//! | [`frame`] | the wire format: request/response types, parsing with limits, error codes |
//! | [`mqtt`] | the broker session: the connection loop over rumqttc's codec, subscribe, publish, ordered manual acks, backoff |
//! | [`server`] | wiring and shutdown: requests answered on the connection's task until they wait, drain, flush, disconnect |
//! | [`dispatch`] | envelope checks, caller keys, method lookup, deadline, redelivery record |
//! | [`methods`] | the method table; one file per method family, typed args → typed result against the store |
//! | [`cert`] | X.509 certificates: PEM parsing, SHA-256 fingerprint, validity |
//! | [`rules`] | access rules: `*` patterns, the AuthorizeCommand decision order, the rule index |
//! | [`store`] | the state behind operations in product words; `store::embedded` keeps it in sled (one writer thread, group commit), `store::postgres` in a database several workers share; `store::events` is the vocabulary of change events |
//! | [`events`] | the change events' publisher: from the store's outbox to the events topic, marked sent after the broker's PUBACK |
//! | [`crypto`] | server keys, keyed hashes, token derivation, constant-time comparison |
//! | [`durable`] | fsync of the files and directories authd creates (the database syncs its own) |
//! | [`lockout`] | `Authenticate`'s brute-force guard: failure streaks lock an id |
//! | [`caller`] | caller API keys and scopes |
//! | [`secret`] | configuration secrets in memory: wiped when dropped, taken out before the config is shared |
//! | [`data_dir`] | the data directory's permissions: 0700, umask 077, owner-only key files |
//! | [`ratelimit`] | per-caller token buckets (429) |
//! | [`client`] | the RPC client used by `authd call`, the tests and `authd-bench` (the load generator, crate `bench/`) |
//! | [`logging`] | the log filter: `RUST_LOG=trace` is authd's trace, other crates stay at info |
//! | [`export`] | `authd export`: a stopped worker's store as JSON lines (the dump that moves a deployment) |
//! | [`import`] | `authd import`: admin calls in bulk, or an export's records, into a stopped worker's store |
//! | [`metrics`] | counters and latency of requests, dropped frames, reconnects, sign-ins, lockouts |
//! | [`http`] | the operator's endpoint (hyper): `/metrics` (Prometheus), `/ready`, `/live` |
//! | [`cli`] | the `authd` command line: one file per subcommand, errors → exit status in one place |

pub mod caller;
pub mod cert;
pub mod cli;
pub mod client;
pub mod config;
pub mod crypto;
pub mod data_dir;
pub mod dispatch;
pub mod durable;
pub mod events;
pub mod export;
pub mod frame;
pub mod http;
pub mod import;
pub mod lockout;
pub mod logging;
pub mod methods;
pub mod metrics;
pub mod mqtt;
pub mod ratelimit;
pub mod rules;
pub mod secret;
pub mod server;
pub mod store;

pub use server::{serve, Worker};

/// Milliseconds since the UNIX epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
