//! `nimbus keys create|ls|revoke`: API keys for `auth = "api_key"` routes.

use std::process::ExitCode;

use clap::Subcommand;
use nimbus_core::api::{ApiKeyInfo, CreateKeyRequest, CreatedKey};

use crate::client::{Api, enc, print_json, table};
use crate::{Global, Output};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Make a key; it is printed once and stored only as a hash.
    Create {
        name: String,
        /// What the key may do: invoke:FUNCTION, invoke:* (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Token bucket: 50/s, 600/m, 10/s:20 (burst 20).
        #[arg(long)]
        rate: Option<String>,
        /// Requests per UTC calendar day or month: 10000/day, 250000/month.
        #[arg(long)]
        quota: Option<String>,
        /// Lifetime, e.g. 30d or 12h (default: until revoked).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (never their secrets).
    Ls,
    /// Revoke a key: refused by the gateway from now on.
    Revoke { name: String },
}

pub fn run(g: &Global, cmd: &KeysCmd) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    match cmd {
        KeysCmd::Create {
            name,
            scopes,
            rate,
            quota,
            expires,
        } => {
            let created: CreatedKey = api.json(api.req(reqwest::Method::POST, "/v1/keys").json(
                &CreateKeyRequest {
                    name: name.clone(),
                    scopes: scopes.clone(),
                    rate: rate.clone(),
                    quota: quota.clone(),
                    expires_in: expires.clone(),
                },
            ))?;
            if g.output == Output::Json {
                print_json(&created)?;
            } else {
                outln!(
                    "created API key {} (id {})",
                    created.info.name,
                    created.info.id
                );
                outln!("  scopes   {}", created.info.scopes.join(" "));
                if let Some(r) = created.info.rate {
                    outln!("  rate     {r}");
                }
                if let Some(q) = created.info.quota {
                    outln!("  quota    {q}");
                }
                if let Some(t) = created.info.expires_at_ms {
                    outln!("  expires  {}", when(t));
                }
                outln!("  key      {}", created.key);
                outln!("store it now: it is not shown again");
            }
        }
        KeysCmd::Ls => {
            let list: Vec<ApiKeyInfo> = api.json(api.req(reqwest::Method::GET, "/v1/keys"))?;
            if g.output == Output::Json {
                print_json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                outln!("no API keys");
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = table(&[
                "name", "id", "scopes", "rate", "quota", "created", "expires", "state",
            ]);
            for k in list {
                t.add_row(vec![
                    k.name,
                    k.id,
                    k.scopes.join(" "),
                    k.rate.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                    match k.quota {
                        Some(q) => format!("{} of {q}", k.quota_used.unwrap_or(0)),
                        None => "-".into(),
                    },
                    when(k.created_at_ms),
                    k.expires_at_ms.map(when).unwrap_or_else(|| "never".into()),
                    match k.revoked_at_ms {
                        Some(t) => format!("revoked {}", when(t)),
                        None => k.status.to_string(),
                    },
                ]);
            }
            outln!("{t}");
        }
        KeysCmd::Revoke { name } => {
            let k: ApiKeyInfo =
                api.json(api.req(reqwest::Method::DELETE, &format!("/v1/keys/{}", enc(name))))?;
            if g.output == Output::Json {
                print_json(&k)?;
            } else {
                outln!("revoked API key {} (id {})", k.name, k.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}
