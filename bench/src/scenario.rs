//! The request mixes `authd-bench` sends: what each provisions first, the frame of request
//! `i`, and the answer it must get. A wrong answer fails the run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Value};

use authd::client::Client;
use authd::frame::Response;

/// The scenarios `authd-bench` knows.
pub const NAMES: [&str; 4] = ["authenticate", "authorize", "get-token", "generate-token"];

/// Devices provisioned for the `authenticate` and `authorize` scenarios.
pub const DEVICES: usize = 1000;

/// A request mix and how to check its answers.
pub struct Scenario {
    pub name: &'static str,
    pub method: &'static str,
    /// `args(i)` for request i.
    pub args: fn(usize) -> Value,
    /// `check(i, result)`: is this the expected answer to request i?
    pub check: fn(usize, &Value) -> bool,
}

impl Scenario {
    pub async fn prepare(name: &str, authd: &[Arc<Client>]) -> anyhow::Result<Scenario> {
        match name {
            "authenticate" => {
                provision_devices(authd).await?;
                Ok(Scenario {
                    name: "authenticate",
                    method: "Auth.Authenticate",
                    args: |i| {
                        let d = i % DEVICES;
                        json!({"id": format!("bench-dev-{d}"), "credentials": {"psk": format!("bench-psk-{d}")}})
                    },
                    check: |_, r| *r == json!(true),
                })
            }
            "authorize" => {
                provision_devices(authd).await?;
                let admin = &authd[0];
                for (src, dst, cmd, effect) in [
                    ("bench-ops-*", "bench-dev-*", "Sys.*", "allow"),
                    ("*", "bench-dev-13", "Sys.Reboot", "deny"),
                ] {
                    let rule = json!({"src": src, "dst": dst, "cmd": cmd, "effect": effect});
                    ensure_ok(admin.call("ACL.Add", rule, Duration::from_secs(5)).await?)?;
                }
                Ok(Scenario {
                    name: "authorize",
                    method: "Auth.AuthorizeCommand",
                    // A third each: the owner, an operator allowed by a wildcard rule, a
                    // stranger; bench-dev-13 is denied to everyone.
                    args: |i| {
                        let d = i % DEVICES;
                        let src = match i % 3 {
                            0 => format!("bench-user-{}", d % 100),
                            1 => "bench-ops-1".into(),
                            _ => "stranger".into(),
                        };
                        json!({"src": src, "dst": format!("bench-dev-{d}"), "cmd": "Sys.Reboot"})
                    },
                    check: |i, r| *r == json!(i % 3 != 2 && i % DEVICES != 13),
                })
            }
            "get-token" => {
                // Each bench client (the token's user) gets a token for host "app".
                for c in authd {
                    ensure_ok(
                        c.call(
                            "Auth.GenerateToken",
                            json!({"host": "app"}),
                            Duration::from_secs(5),
                        )
                        .await?,
                    )?;
                }
                Ok(Scenario {
                    name: "get-token",
                    method: "Auth.GetToken",
                    args: |_| json!({"host": "app"}),
                    check: |_, r| {
                        r["exist"] == json!(true)
                            && r["token"].as_str().is_some_and(|t| t.starts_with("authd_"))
                    },
                })
            }
            "generate-token" => Ok(Scenario {
                name: "generate-token",
                method: "Auth.GenerateToken",
                // Fewer hosts per user than the token cap (1000), `app` of get-token included.
                args: |i| json!({"host": format!("app-{}", i % 500)}),
                check: |_, r| r["token"].as_str().is_some_and(|t| t.starts_with("authd_")),
            }),
            other => bail!("unknown scenario `{other}` (known: {})", NAMES.join(", ")),
        }
    }
}

/// Creates `bench-dev-<i>` with PSK `bench-psk-<i>`, a few calls in flight per client.
async fn provision_devices(authd: &[Arc<Client>]) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for k in 0..authd.len() * 8 {
        let client = authd[k % authd.len()].clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let d = next.fetch_add(1, Ordering::Relaxed);
                if d >= DEVICES {
                    return Ok::<_, anyhow::Error>(());
                }
                let args = device(d);
                ensure_ok(
                    client
                        .call("Entity.Put", args, Duration::from_secs(10))
                        .await?,
                )?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The Entity.Put arguments of bench device `d`.
pub fn device(d: usize) -> Value {
    json!({"id": format!("bench-dev-{d}"), "psk": format!("bench-psk-{d}"), "owner": format!("bench-user-{}", d % 100)})
}

fn ensure_ok(r: Response) -> anyhow::Result<Value> {
    match (r.result, r.error) {
        (_, Some(e)) => bail!("setup call failed: {e}"),
        (r, None) => Ok(r.unwrap_or(Value::Null)),
    }
}
