//! `authd ctl`: provisioning, in the style of `mosquitto_ctrl dynsec`: each command is one
//! admin method (`authd ctl entity put dev1` is `Entity.Put`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use super::{read_text, Connection, Failure};
use crate::client::{CallError, Client};
use crate::frame::RpcError;

#[derive(Args)]
pub struct CtlArgs {
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
    /// List every rule, by rule id (follows ACL.List's pages).
    List,
    /// Delete a rule (succeeds if there is no such rule).
    Delete { rule_id: u64 },
}

#[derive(Clone, Copy, ValueEnum)]
enum EffectArg {
    Allow,
    Deny,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Device,
    User,
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
    /// `device` (the default) or `user`: only a user signs in with app tokens.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
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

/// Prints the result (pretty JSON); an error frame is exit 1 with its code and message.
pub(super) async fn run(args: CtlArgs) -> Result<(), Failure> {
    let (method, call_args, follow) = match args.what {
        CtlCommand::Entity(command) => entity_request(command)?,
        CtlCommand::Acl(command) => acl_request(command),
    };
    let (client, timeout) = args.connection.connect().await?;
    let result = ctl_call(&client, method, call_args, follow, timeout).await;
    client.close().await;
    match result.map_err(Failure::unable)? {
        Ok(Some(value)) => {
            let text = serde_json::to_string_pretty(&value).map_err(Failure::unable)?;
            println!("{text}");
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(Failure::Refused(format!("{} {}", e.code, e.message))),
    }
}

/// One `ctl` command's method and arguments, and the list to gather across pages by
/// following `next` (`None`: one call).
type Request = (&'static str, Value, Option<&'static str>);

/// One `ctl entity` command's request; `list --all` gathers `entities`.
fn entity_request(command: EntityCommand) -> Result<Request, Failure> {
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
                args["cert"] = json!(read_text(&path)?);
            }
            if let Some(fp) = put.cert_sha256 {
                args["cert_sha256"] = json!(fp);
            }
            if let Some(kind) = put.kind {
                args["kind"] = json!(match kind {
                    KindArg::Device => "device",
                    KindArg::User => "user",
                });
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
            ("/v1/Entity.Put", args, None)
        }
        EntityCommand::Get { id } => ("/v1/Entity.Get", json!({ "id": id }), None),
        EntityCommand::Delete { id } => ("/v1/Entity.Delete", json!({ "id": id }), None),
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
            ("/v1/Entity.List", args, list.all.then_some("entities"))
        }
    })
}

/// One `ctl acl` command's request; `list` gathers every page's `rules`.
fn acl_request(command: AclCommand) -> Request {
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
            ("/v1/ACL.Add", args, None)
        }
        AclCommand::List => ("/v1/ACL.List", json!({}), Some("rules")),
        AclCommand::Delete { rule_id } => ("/v1/ACL.Delete", json!({ "rule_id": rule_id }), None),
    }
}

/// A PSK from a file, or from standard input for `-`; one trailing newline is dropped.
fn read_secret(path: &std::path::Path) -> Result<String, Failure> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Failure::Unable(format!("standard input: {e}")))?
    } else {
        read_text(path)?
    };
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_owned())
}

/// Calls `method`; with `follow` (a list's name), repeats with `after` = `next` and joins
/// the pages' lists. The outer error is a transport failure, the inner one an error frame.
async fn ctl_call(
    client: &Client,
    method: &str,
    mut args: Value,
    follow: Option<&str>,
    timeout: Duration,
) -> Result<Result<Option<Value>, RpcError>, CallError> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let response = client.call(method, args.clone(), timeout).await?;
        if let Some(e) = response.error {
            return Ok(Err(e));
        }
        let Some(list) = follow else {
            return Ok(Ok(response.result));
        };
        let mut page = response.result.unwrap_or_default();
        if let Some(Value::Array(items)) = page.get_mut(list).map(Value::take) {
            all.extend(items);
        }
        match page.get("next") {
            Some(next) => args["after"] = next.clone(),
            None => return Ok(Ok(Some(json!({ list: all })))),
        }
    }
}
