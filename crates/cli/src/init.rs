//! `nimbus init`: writes a small, working function folder to start from.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

#[derive(Args)]
pub struct InitArgs {
    /// Function name (also the folder name unless --dir is given).
    pub name: String,
    #[arg(long, value_enum, default_value_t = InitRuntime::Python3)]
    pub runtime: InitRuntime,
    /// Where to write the function (default: ./NAME).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Copy, Clone, ValueEnum)]
pub enum InitRuntime {
    Python3,
    Node,
}

pub fn run(args: &InitArgs) -> anyhow::Result<ExitCode> {
    nimbus_core::manifest::validate_name(&args.name).map_err(anyhow::Error::msg)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("read {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} already exists and is not empty", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let (runtime, handler, file, code) = match args.runtime {
        InitRuntime::Python3 => ("python3", "main.handler", "main.py", PYTHON),
        InitRuntime::Node => ("node", "index.handler", "index.mjs", NODE),
    };
    let name = &args.name;
    let manifest = format!(
        "name = \"{name}\"\nruntime = \"{runtime}\"\nhandler = \"{handler}\"\nmemory_mb = 128\ntimeout = \"5s\"\n\n[[http]]\nmethod = \"GET\"\npath = \"/{name}\"\n"
    );
    std::fs::write(dir.join("nimbus.toml"), manifest).context("write nimbus.toml")?;
    std::fs::write(dir.join(file), code).with_context(|| format!("write {file}"))?;
    println!("created {} ({runtime})", dir.display());
    println!(
        "next: nimbus deploy {} && nimbus invoke {name}",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

const PYTHON: &str = r#"def handler(event, context):
    # `event` is the invoke payload, or an API Gateway payload 2.0 event for HTTP routes.
    print("request", context.aws_request_id)
    return {"message": "hello from " + context.function_name}
"#;

const NODE: &str = r#"// `event` is the invoke payload, or an API Gateway payload 2.0 event for HTTP routes.
export const handler = async (event, context) => {
  console.log("request", context.awsRequestId);
  return { message: `hello from ${context.functionName}` };
};
"#;
