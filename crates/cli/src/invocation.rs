//! `nimbus invocation get ID`: an async invocation's state (queued, running,
//! succeeded, failed), attempts, last error and result; for a synchronous one, its
//! metering record.

use std::process::ExitCode;

use clap::Subcommand;
use nimbus_core::InvocationRecord;
use nimbus_core::api::AsyncInvocationInfo;

use crate::client::{Api, enc, print_json};
use crate::{Global, Output};

#[derive(Subcommand)]
pub enum InvocationCmd {
    /// Show one invocation by request id.
    Get { id: String },
}

pub fn run(g: &Global, cmd: InvocationCmd) -> anyhow::Result<ExitCode> {
    let InvocationCmd::Get { id } = cmd;
    let api = Api::new(g)?;
    let v: serde_json::Value = api.json(api.req(
        reqwest::Method::GET,
        &format!("/v1/invocations/{}", enc(&id)),
    ))?;
    if g.output == Output::Json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    // An async invocation has a queue status; a synchronous one only its record.
    if v.get("max_attempts").is_some() {
        let i: AsyncInvocationInfo = serde_json::from_value(v)?;
        println!("request id  {}", i.request_id);
        println!("function    {}", i.function);
        println!("status      {}", i.status);
        println!("source      {}", i.source);
        println!("attempts    {} of {}", i.attempts, i.max_attempts);
        println!("created     {}", i.created_at);
        println!("updated     {}", i.updated_at);
        if let Some(n) = &i.next_attempt_at {
            println!("next try    {n}");
        }
        if let Some(e) = &i.error {
            println!("last error  {e}");
        }
        if let Some(t) = &i.on_success {
            println!("on success  {t}");
        }
        if let Some(t) = &i.on_failure {
            println!("on failure  {t}");
        }
        if let Some(r) = &i.result {
            println!("result      {}", serde_json::to_string(r)?);
        }
    } else {
        let r: InvocationRecord = serde_json::from_value(v)?;
        println!("request id  {}", r.request_id);
        println!("function    {} (version {})", r.function, r.version);
        println!("status      {}", r.status);
        println!("duration    {:.1} ms", r.duration_ms);
    }
    Ok(ExitCode::SUCCESS)
}
