//! `nimbus route add|ls|rm`: routes outside manifests (they survive deploys).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use nimbus_core::api::AddRouteRequest;
use nimbus_core::routes::RouteEntry;

use crate::client::{Api, print_json};
use crate::{Global, Output};

#[derive(Subcommand)]
pub enum RouteCmd {
    /// Point METHOD PATH (e.g. GET /v2/items/{id}) at a function's alias, or at
    /// upstream HTTP services (--upstream, repeatable: round-robin over the healthy ones).
    Add(Box<AddArgs>),
    /// List every route (manifest and added ones).
    Ls,
    /// Remove a route added with `route add`.
    Rm {
        method: String,
        path: String,
        /// The host the route was added for.
        #[arg(long, default_value = "")]
        host: String,
    },
}

#[derive(Args)]
pub struct AddArgs {
    pub method: String,
    pub path: String,
    /// The function whose alias the route calls (or --upstream).
    #[arg(
        long,
        required_unless_present = "upstream",
        conflicts_with = "upstream"
    )]
    pub function: Option<String>,
    /// Upstream base URL, http://host[:port][/base] (repeatable).
    #[arg(long)]
    pub upstream: Vec<String>,
    /// Only requests for this host: api.example.com or *.example.com.
    #[arg(long)]
    pub host: Option<String>,
    /// How long the gateway waits for an answer (e.g. 5s).
    #[arg(long)]
    pub timeout: Option<String>,
    /// How long an upstream that failed is skipped (default 10s).
    #[arg(long)]
    pub upstream_down_for: Option<String>,
    #[arg(long, default_value = "live")]
    pub alias: String,
    /// none, api_key or jwt.
    #[arg(long, default_value = "none")]
    pub auth: String,
    /// Scopes a JWT must carry (repeatable; auth jwt only).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Token bucket for the whole route: 100/s, 10/s:20.
    #[arg(long)]
    pub rate: Option<String>,
    /// Token bucket per client address.
    #[arg(long)]
    pub rate_per_ip: Option<String>,
}

pub fn run(g: &Global, cmd: RouteCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        RouteCmd::Ls => crate::client::routes(g),
        RouteCmd::Add(args) => {
            let AddArgs {
                method,
                path,
                function,
                upstream,
                host,
                timeout,
                upstream_down_for,
                alias,
                auth,
                scopes,
                rate,
                rate_per_ip,
            } = *args;
            let api = Api::new(g)?;
            let r: RouteEntry = api.json(api.req(reqwest::Method::POST, "/v1/routes").json(
                &AddRouteRequest {
                    method,
                    path,
                    function: function.unwrap_or_default(),
                    alias: Some(alias),
                    auth: Some(auth),
                    scopes,
                    rate,
                    rate_per_ip,
                    upstream,
                    host,
                    timeout,
                    upstream_down_for,
                },
            ))?;
            if g.output == Output::Json {
                print_json(&r)?;
            } else {
                outln!("added route {} -> {}", r.route_key(), r.target());
            }
            Ok(ExitCode::SUCCESS)
        }
        RouteCmd::Rm { method, path, host } => {
            let api = Api::new(g)?;
            let r: RouteEntry =
                api.json(api.req(reqwest::Method::DELETE, "/v1/routes").query(&[
                    ("method", method.as_str()),
                    ("path", path.as_str()),
                    ("host", host.as_str()),
                ]))?;
            if g.output == Output::Json {
                print_json(&r)?;
            } else {
                outln!("removed route {}", r.route_key());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
