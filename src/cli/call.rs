//! `authd call`: send one request and print the response frame.

use clap::Args;
use serde_json::Value;

use super::{Connection, Failure};

#[derive(Args)]
pub struct CallArgs {
    /// Method, e.g. /v1/Auth.GetToken or Auth.GetToken.
    method: String,
    /// Arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
    #[command(flatten)]
    connection: Connection,
}

/// Prints the response frame, error frames too (exit 1: the frame says why).
pub(super) async fn run(args: CallArgs) -> Result<(), Failure> {
    let call_args = match serde_json::from_str(&args.args) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Err(Failure::Unable(
                "ARGS_JSON must be a JSON object, e.g. '{\"host\":\"app.example.com\"}'".into(),
            ))
        }
    };
    let (client, timeout) = args.connection.connect().await?;
    let result = client.call(&args.method, call_args, timeout).await;
    client.close().await;
    let response = result.map_err(Failure::unable)?;
    println!(
        "{}",
        serde_json::to_string(&response).map_err(Failure::unable)?
    );
    match response.error {
        Some(_) => Err(Failure::Reported(1)),
        None => Ok(()),
    }
}
