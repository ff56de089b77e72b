//! `nimbus invocation get ID`: an async invocation's state (queued, running,
//! succeeded, failed), attempts, last error and result; for a synchronous one, its
//! metering record.

use std::process::ExitCode;

use clap::Subcommand;
use nimbus_core::InvocationRecord;
use nimbus_core::api::AsyncInvocationInfo;

use std::io::Write;

use crate::client::{Api, enc, json_text, print_json};
use crate::term::line;
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
        outln!("request id  {}", line(&i.request_id));
        outln!("function    {}", line(&i.function));
        outln!("status      {}", line(&i.status));
        outln!("source      {}", line(&i.source));
        outln!("attempts    {} of {}", i.attempts, i.max_attempts);
        outln!("created     {}", i.created_at);
        outln!("updated     {}", i.updated_at);
        if let Some(n) = &i.next_attempt_at {
            outln!("next try    {n}");
        }
        if let Some(e) = &i.error {
            outln!("last error  {}", line(e));
        }
        if let Some(t) = &i.on_success {
            outln!("on success  {}", line(t));
        }
        if let Some(t) = &i.on_failure {
            outln!("on failure  {}", line(t));
        }
        if let Some(r) = &i.result {
            outln!("result      {}", json_text(&serde_json::to_string(r)?));
        }
        if let Some(r) = &i.record {
            print_logs(&r.logs)?;
        }
    } else {
        let r: InvocationRecord = serde_json::from_value(v)?;
        outln!("request id  {}", line(&r.request_id));
        outln!("function    {} (version {})", line(&r.function), r.version);
        outln!("status      {}", line(&r.status));
        if let Some(t) = &r.error_type {
            outln!("error type  {}", line(t));
        }
        outln!("duration    {:.1} ms", r.duration_ms);
        print_logs(&r.logs)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The function's output, under the fields.
fn print_logs(logs: &str) -> anyhow::Result<()> {
    if logs.is_empty() {
        return Ok(());
    }
    outln!("logs");
    let mut out = std::io::stdout().lock();
    crate::term::print_log(&mut out, logs)?;
    if !logs.ends_with('\n') {
        writeln!(out)?;
    }
    Ok(())
}
