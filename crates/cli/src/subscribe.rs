//! `nimbus subscribe` and `nimbus subscription ls|get|rm|reset`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use nimbus_core::api::{CreateSubscriptionRequest, ResetSubscriptionRequest, SubscriptionInfo};

use crate::client::{Api, enc, print_json, table};
use crate::{Global, Output};

#[derive(Args)]
pub struct SubscribeArgs {
    pub topic: String,
    /// The function that receives the events.
    #[arg(long)]
    pub function: String,
    /// Subscription name (default: <function>-<topic>).
    #[arg(long)]
    pub name: Option<String>,
    /// Alias of the function to invoke (default live).
    #[arg(long)]
    pub alias: Option<String>,
    /// EventBridge-style pattern as JSON, e.g. '{"type":["order.created"]}'.
    #[arg(long)]
    pub filter: Option<String>,
    /// Events per invocation; above 1 the function gets {"Records": [...]}.
    #[arg(long)]
    pub batch: Option<u32>,
    /// Attempts before an event goes to the dead-letter topic (default 3).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Give up on an event this long after it was published (default 24h).
    #[arg(long)]
    pub max_age: Option<String>,
    /// Topic that receives events that ran out of attempts or age.
    #[arg(long)]
    pub dead_letter: Option<String>,
    /// Deliver events with the same partition key one at a time, in order.
    #[arg(long)]
    pub ordered: bool,
}

#[derive(Subcommand)]
pub enum SubscriptionCmd {
    /// List subscriptions with their lag.
    Ls,
    /// Show one subscription.
    Get { name: String },
    /// Delete a subscription (its topic and events stay).
    Rm { name: String },
    /// Move a subscription back (or forward) to a time or an offset: replay.
    Reset {
        name: String,
        /// RFC 3339 time: from the first event published at or after it.
        #[arg(long, conflicts_with = "offset", required_unless_present = "offset")]
        to: Option<String>,
        #[arg(long)]
        offset: Option<i64>,
    },
}

fn show(s: &SubscriptionInfo) {
    let p = &s.spec;
    outln!("subscription  {}", p.name);
    outln!("topic         {}", p.topic);
    outln!("function      {} (alias {})", p.function, p.alias);
    outln!("filter        {}", p.filter);
    outln!("batch         {}", p.batch);
    outln!("max attempts  {}", p.max_attempts);
    outln!(
        "max age       {}",
        nimbus_core::duration::format_ms(p.max_age_ms.max(0) as u64)
    );
    outln!("dead letter   {}", p.dead_letter.as_deref().unwrap_or("-"));
    outln!("ordered       {}", p.ordered);
    outln!("source        {}", s.source);
    outln!("cursor        {}", s.cursor);
    outln!("lag           {} ({} retrying)", s.lag, s.retrying);
}

pub fn subscribe(g: &Global, a: &SubscribeArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let filter = match &a.filter {
        None => None,
        Some(f) => Some(
            serde_json::from_str::<serde_json::Value>(f)
                .map_err(|e| anyhow::anyhow!("--filter is not JSON: {e}"))?,
        ),
    };
    let req = CreateSubscriptionRequest {
        name: a.name.clone(),
        topic: a.topic.clone(),
        function: Some(a.function.clone()),
        alias: a.alias.clone(),
        filter,
        batch: a.batch,
        max_attempts: a.max_attempts,
        max_age: a.max_age.clone(),
        dead_letter: a.dead_letter.clone(),
        ordered: a.ordered.then_some(true),
    };
    let s: SubscriptionInfo = api.json(
        api.req(reqwest::Method::POST, "/v1/subscriptions")
            .json(&req),
    )?;
    if g.output == Output::Json {
        print_json(&s)?;
    } else {
        outln!(
            "subscribed {} to {} as {} (from offset {})",
            s.spec.function,
            s.spec.topic,
            s.spec.name,
            s.cursor
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(g: &Global, cmd: SubscriptionCmd) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let path = |n: &str| format!("/v1/subscriptions/{}", enc(n));
    let s: SubscriptionInfo = match cmd {
        SubscriptionCmd::Ls => {
            let list: Vec<SubscriptionInfo> =
                api.json(api.req(reqwest::Method::GET, "/v1/subscriptions"))?;
            if g.output == Output::Json {
                print_json(&list)?;
            } else if list.is_empty() {
                outln!("no subscriptions");
            } else {
                let mut tbl = table(&["subscription", "topic", "function", "lag", "source"]);
                for s in list {
                    tbl.add_row(vec![
                        s.spec.name.clone(),
                        s.spec.topic.clone(),
                        s.spec.function.clone(),
                        s.lag.to_string(),
                        s.source.clone(),
                    ]);
                }
                outln!("{tbl}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        SubscriptionCmd::Get { name } => api.json(api.req(reqwest::Method::GET, &path(&name)))?,
        SubscriptionCmd::Rm { name } => {
            let s: SubscriptionInfo = api.json(api.req(reqwest::Method::DELETE, &path(&name)))?;
            if g.output == Output::Json {
                print_json(&s)?;
            } else {
                outln!("deleted subscription {}", s.spec.name);
            }
            return Ok(ExitCode::SUCCESS);
        }
        SubscriptionCmd::Reset { name, to, offset } => {
            let s: SubscriptionInfo = api.json(
                api.req(reqwest::Method::POST, &format!("{}/reset", path(&name)))
                    .json(&ResetSubscriptionRequest { to, offset }),
            )?;
            if g.output != Output::Json {
                outln!("reset {} to offset {}", s.spec.name, s.cursor);
                return Ok(ExitCode::SUCCESS);
            }
            s
        }
    };
    if g.output == Output::Json {
        print_json(&s)?;
    } else {
        show(&s);
    }
    Ok(ExitCode::SUCCESS)
}
