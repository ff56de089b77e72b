//! `nimbus scale` and `nimbus instances`: provisioned concurrency and what runs now.

use std::process::ExitCode;

use clap::Args;
use nimbus_core::InstanceInfo;

use crate::client::{Api, enc, human_bytes, print_json, table};
use crate::{Global, Output};

#[derive(Args)]
pub struct ScaleArgs {
    pub name: String,
    /// Instances kept warm at all times (provisioned concurrency).
    #[arg(long)]
    pub min: Option<u32>,
    /// Most instances at once; calls past it queue briefly, then get 429.
    #[arg(long)]
    pub max: Option<u32>,
    /// Go back to the manifest's values.
    #[arg(long)]
    pub reset: bool,
}

pub fn scale(g: &Global, args: &ScaleArgs) -> anyhow::Result<ExitCode> {
    if args.min.is_none() && args.max.is_none() && !args.reset {
        anyhow::bail!("give --min, --max or --reset");
    }
    let api = Api::new(g)?;
    let v: serde_json::Value = api.json(
        api.req(
            reqwest::Method::POST,
            &format!("/v1/functions/{}/scale", enc(&args.name)),
        )
        .json(&serde_json::json!({
            "min_instances": args.min,
            "max_instances": args.max,
            "reset": args.reset,
        })),
    )?;
    if g.output == Output::Json {
        print_json(&v)?;
    } else {
        outln!(
            "{}: min {} max {} instances",
            args.name,
            v["min_instances"],
            v["max_instances"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn instances(g: &Global, function: Option<&str>) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let path = match function {
        Some(f) => format!("/v1/instances?function={}", enc(f)),
        None => "/v1/instances".to_string(),
    };
    let list: Vec<InstanceInfo> = api.json(api.req(reqwest::Method::GET, &path))?;
    if g.output == Output::Json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        outln!("no instances running");
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = table(&[
        "function", "version", "instance", "state", "age", "calls", "memory",
    ]);
    for i in list {
        t.add_row(vec![
            i.function,
            i.version.to_string(),
            i.id,
            i.state,
            secs(i.age_ms),
            i.invocations.to_string(),
            match i.memory_bytes {
                Some(b) => format!("{} / {} MB", human_bytes(b), i.memory_mb),
                None => format!("- / {} MB", i.memory_mb),
            },
        ]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}

fn secs(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}
