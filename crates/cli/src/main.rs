//! nimbus: the one binary. `nimbus serve` runs the platform; every other verb is a
//! client of its control API.
//!
//! Owns: reading flags, env (`NIMBUS_*`) and files for configuration, wiring the
//! components together in `serve` (and their shutdown), the HTTP listeners (`listen`,
//! `tls`), JWT key loading (`jwks`), and the CLI verbs. It is the
//! only crate that reads configuration; components receive plain config structs.
//!
//! The hidden `__sandbox-init` verb is the child side of the sandbox; it is dispatched
//! before anything else (no tokio runtime, no logging) because it runs inside a fresh
//! instance.
#![forbid(unsafe_code)]

// First: its printing macros are used by every verb below.
#[macro_use]
mod term;

mod build;
mod capacity;
mod client;
mod cron;
mod init;
mod invocation;
mod jwks;
mod keys;
mod listen;
mod meter;
mod owner;
mod route;
mod scale;
mod serve;
mod storage;
mod subscribe;
mod tls;
mod topic;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "nimbus",
    version,
    about = "Self-hosted serverless functions: deploy a folder, call it over HTTP."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// URL of the nimbus server.
    #[arg(
        long,
        global = true,
        env = "NIMBUS_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Admin token (default: read from <data-dir>/admin.token).
    #[arg(long, global = true, env = "NIMBUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory of the server (holds state and the admin token).
    #[arg(
        long,
        global = true,
        env = "NIMBUS_DATA_DIR",
        default_value = ".nimbus"
    )]
    pub data_dir: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Print what functions and the server sent as is, control characters and escape
    /// sequences included (by default they are shown escaped, e.g. `\x1b`).
    #[arg(long, global = true)]
    pub raw: bool,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform: control API, gateway and workers.
    Serve(Box<serve::ServeArgs>),
    /// Package a function folder, upload it and point alias `live` at the new version.
    Deploy(client::DeployArgs),
    /// Call a function and print its result.
    Invoke(client::InvokeArgs),
    /// List functions.
    #[command(alias = "list")]
    Ls,
    /// Show one function: aliases, routes and configuration.
    Get { name: String },
    /// List the versions of a function.
    Versions { name: String },
    /// Manage aliases.
    Alias {
        #[command(subcommand)]
        cmd: AliasCmd,
    },
    /// Point an alias (default `live`) back at the previous version.
    Rollback {
        name: String,
        #[arg(long, default_value = "live")]
        alias: String,
    },
    /// Delete a function with all its versions, aliases and routes.
    #[command(alias = "delete")]
    Rm { name: String },
    /// List the routes of the gateway (same as `route ls`).
    Routes,
    /// Add, list and remove routes outside manifests.
    Route {
        #[command(subcommand)]
        cmd: route::RouteCmd,
    },
    /// Stop a function's warm instances (the next call is a cold start).
    Evict { name: String },
    /// Set how many instances a function keeps warm and may run at most.
    Scale(scale::ScaleArgs),
    /// List running instances (of one function, or all).
    Instances { name: Option<String> },
    /// Show the server's instance budget, what is in use and what floors ask for.
    Status,
    /// Usage per function: invocations, errors, cold starts, GB-seconds, latency, memory.
    Usage(usage::UsageArgs),
    /// Print what a function wrote to stdout/stderr, per invocation (-f to follow).
    Logs(usage::LogsArgs),
    /// Write a new, working function folder.
    Init(init::InitArgs),
    /// Manage API keys for `auth = "api_key"` routes.
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCmd,
    },
    /// Manage durable topics (CloudEvents).
    Topic {
        #[command(subcommand)]
        cmd: topic::TopicCmd,
    },
    /// Publish a CloudEvent to a topic (acknowledged once durable).
    Publish(topic::PublishArgs),
    /// Subscribe a function to a topic (at-least-once delivery, retries, dead letters).
    Subscribe(subscribe::SubscribeArgs),
    /// List, show, delete and reset (replay) subscriptions.
    Subscription {
        #[command(subcommand)]
        cmd: subscribe::SubscriptionCmd,
    },
    /// Show an invocation: an async one's state, attempts, error and result.
    Invocation {
        #[command(subcommand)]
        cmd: invocation::InvocationCmd,
    },
    /// List cron triggers and their next fire times, or fire one now.
    Cron {
        #[command(subcommand)]
        cmd: cron::CronCmd,
    },
    #[command(name = "__sandbox-init", hide = true)]
    SandboxInit,
}

#[derive(Subcommand)]
enum AliasCmd {
    /// Point ALIAS of function NAME at VERSION.
    Set {
        name: String,
        alias: String,
        version: u32,
    },
    /// List the aliases of a function.
    Ls { name: String },
}

fn main() -> ExitCode {
    // The sandbox child must not start threads or touch anything before isolating.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == nimbus_sandbox::INIT_ARG)
    {
        nimbus_sandbox::init_main();
    }
    // The wasm compiler child (see nimbus_wasm::HostConfig::compiler): no runtime, no logs.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == nimbus_wasm::COMPILE_ARG) {
        return nimbus_wasm::compile_main(&args[2..]);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    term::set_raw(cli.global.raw);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            errln!("error: {}", term::line(&one_line(&e)));
            ExitCode::FAILURE
        }
    }
}

/// A whole error chain on one line: users get one line, never a backtrace.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = cli.global;
    match cli.command {
        Command::Serve(args) => serve::run(*args, &g),
        Command::Deploy(args) => client::deploy(&g, &args),
        Command::Invoke(args) => client::invoke(&g, &args),
        Command::Ls => client::list(&g),
        Command::Get { name } => client::get(&g, &name),
        Command::Versions { name } => client::versions(&g, &name),
        Command::Alias { cmd } => match cmd {
            AliasCmd::Set {
                name,
                alias,
                version,
            } => client::alias_set(&g, &name, &alias, version),
            AliasCmd::Ls { name } => client::alias_ls(&g, &name),
        },
        Command::Rollback { name, alias } => client::rollback(&g, &name, &alias),
        Command::Rm { name } => client::remove(&g, &name),
        Command::Routes => client::routes(&g),
        Command::Route { cmd } => route::run(&g, cmd),
        Command::Evict { name } => client::evict(&g, &name),
        Command::Scale(args) => scale::scale(&g, &args),
        Command::Instances { name } => scale::instances(&g, name.as_deref()),
        Command::Status => capacity::status(&g),
        Command::Usage(args) => usage::usage(&g, &args),
        Command::Logs(args) => usage::logs(&g, &args),
        Command::Init(args) => init::run(&args),
        Command::Keys { cmd } => keys::run(&g, &cmd),
        Command::Topic { cmd } => topic::run(&g, cmd),
        Command::Publish(args) => topic::publish(&g, &args),
        Command::Subscribe(args) => subscribe::subscribe(&g, &args),
        Command::Subscription { cmd } => subscribe::run(&g, cmd),
        Command::Invocation { cmd } => invocation::run(&g, cmd),
        Command::Cron { cmd } => cron::run(&g, cmd),
        Command::SandboxInit => anyhow::bail!("__sandbox-init is internal"),
    }
}
