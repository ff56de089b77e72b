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
    /// A Rust wasi:http component (needs `rustup target add wasm32-wasip2` to build).
    Wasm,
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
    let name = &args.name;
    let (runtime, handler, file, code) = match args.runtime {
        InitRuntime::Python3 => ("python3", "main.handler", "main.py", PYTHON),
        InitRuntime::Node => ("node", "index.handler", "index.mjs", NODE),
        InitRuntime::Wasm => return init_wasm(&dir, name),
    };
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

/// A Cargo project whose build copies its component to `app.wasm`, the handler; the
/// source is the example's, so what `init` writes is what the tests run.
fn init_wasm(dir: &std::path::Path, name: &str) -> anyhow::Result<ExitCode> {
    let artifact = name.replace('-', "_");
    let files = [
        (
            "nimbus.toml",
            format!(
                "name = \"{name}\"\nruntime = \"wasm\"\nhandler = \"app.wasm\"\nmemory_mb = 64\ntimeout = \"5s\"\n\n[[http]]\nmethod = \"GET\"\npath = \"/{name}/{{name}}\"\n"
            ),
        ),
        (
            "Cargo.toml",
            format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nwasi = \"0.14\"\n\n[profile.release]\nopt-level = \"s\"\nlto = true\nstrip = true\ncodegen-units = 1\npanic = \"abort\"\n\n# Not part of any enclosing workspace.\n[workspace]\n"
            ),
        ),
        (
            "build.sh",
            format!(
                "#!/bin/sh\n# Builds app.wasm (a wasi:http component); needs: rustup target add wasm32-wasip2\nset -eu\ncd \"$(dirname \"$0\")\"\ncargo build --release --target wasm32-wasip2\ncp target/wasm32-wasip2/release/{artifact}.wasm app.wasm\necho \"built $(pwd)/app.wasm\"\n"
            ),
        ),
        ("src/lib.rs", WASM_HELLO.to_string()),
        (".gitignore", "target/\n".to_string()),
    ];
    std::fs::create_dir_all(dir.join("src")).context("create src")?;
    for (file, text) in &files {
        std::fs::write(dir.join(file), text).with_context(|| format!("write {file}"))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("build.sh"), std::fs::Permissions::from_mode(0o755))
        .context("make build.sh executable")?;
    println!("created {} (wasm)", dir.display());
    println!(
        "next: rustup target add wasm32-wasip2 && {}/build.sh && nimbus deploy {} && curl 127.0.0.1:8080/{name}/ada",
        dir.display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

const WASM_HELLO: &str = include_str!("../../../examples/wasm-hello/src/lib.rs");

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
