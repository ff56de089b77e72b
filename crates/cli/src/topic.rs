//! `nimbus topic create|ls|get|stats|rm` and `nimbus publish`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use nimbus_core::api::CreateTopicRequest;
use nimbus_core::events::Published;
use nimbus_store::events::TopicInfo;

use crate::client::{Api, enc, print_json, table};
use crate::{Global, Output};

#[derive(Subcommand)]
pub enum TopicCmd {
    /// Create a durable topic.
    Create {
        name: String,
        /// Keep events this long (default 7d).
        #[arg(long)]
        retention: Option<String>,
        /// Keep at most this much (default 1GiB); the oldest events go first.
        #[arg(long)]
        max_bytes: Option<String>,
        /// Remember event ids this long to drop duplicates (default 10m).
        #[arg(long)]
        dedup_window: Option<String>,
    },
    /// List topics.
    Ls,
    /// Show a topic's settings and bounds.
    Get { name: String },
    /// Size, oldest and newest event of a topic.
    Stats { name: String },
    /// Delete a topic and its events.
    Rm { name: String },
}

#[derive(Args)]
pub struct PublishArgs {
    pub topic: String,
    /// CloudEvents `type`, e.g. order.created.
    #[arg(long = "type")]
    pub ty: String,
    /// CloudEvents `source`, e.g. shop.
    #[arg(long)]
    pub source: String,
    /// The data: inline JSON, @file.json, or - for stdin.
    #[arg(long, short = 'd')]
    pub data: Option<String>,
    /// Partition key: events with one key are delivered in order to ordered subscriptions.
    #[arg(long)]
    pub key: Option<String>,
    /// Event id (default: a new UUID); publishing an id again within the dedup window
    /// is acknowledged without storing it twice.
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub subject: Option<String>,
}

fn when(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

fn human_bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} KB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

fn duration(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn show(t: &TopicInfo) {
    outln!("topic      {}", t.name);
    outln!("retention  {}", duration(t.settings.retention_ms));
    outln!("max bytes  {}", human_bytes(t.settings.max_bytes));
    outln!("dedup      {}", duration(t.settings.dedup_window_ms));
    outln!("events     {} ({})", t.count, human_bytes(t.bytes));
    outln!(
        "offsets    {}..{}",
        t.oldest_offset.unwrap_or(t.next_offset),
        t.next_offset
    );
    outln!("oldest     {}", when(t.oldest_at_ms));
    outln!("newest     {}", when(t.newest_at_ms));
}

pub fn run(g: &Global, cmd: TopicCmd) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let get = reqwest::Method::GET;
    match cmd {
        TopicCmd::Create {
            name,
            retention,
            max_bytes,
            dedup_window,
        } => {
            let t: TopicInfo = api.json(api.req(reqwest::Method::POST, "/v1/topics").json(
                &CreateTopicRequest {
                    name,
                    retention,
                    max_bytes,
                    dedup_window,
                },
            ))?;
            if g.output == Output::Json {
                print_json(&t)?;
            } else {
                outln!("created topic {}", t.name);
            }
        }
        TopicCmd::Ls => {
            let list: Vec<TopicInfo> = api.json(api.req(get, "/v1/topics"))?;
            if g.output == Output::Json {
                print_json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                outln!("no topics");
                return Ok(ExitCode::SUCCESS);
            }
            let mut tbl = table(&["topic", "events", "size", "retention", "newest"]);
            for t in list {
                tbl.add_row(vec![
                    t.name.clone(),
                    t.count.to_string(),
                    human_bytes(t.bytes),
                    duration(t.settings.retention_ms),
                    when(t.newest_at_ms),
                ]);
            }
            outln!("{tbl}");
        }
        TopicCmd::Get { name } | TopicCmd::Stats { name } => {
            let t: serde_json::Value =
                api.json(api.req(get, &format!("/v1/topics/{}", enc(&name))))?;
            if g.output == Output::Json {
                print_json(&t)?;
            } else {
                let info: TopicInfo = serde_json::from_value(t.clone())?;
                show(&info);
                if let Some(subs) = t.get("subscriptions").and_then(|s| s.as_array()) {
                    for s in subs {
                        outln!(
                            "subscription {} -> {}: lag {}",
                            s["name"].as_str().unwrap_or("?"),
                            s["function"].as_str().unwrap_or("?"),
                            s["lag"]
                        );
                    }
                }
            }
        }
        TopicCmd::Rm { name } => {
            let t: TopicInfo = api.json(api.req(
                reqwest::Method::DELETE,
                &format!("/v1/topics/{}", enc(&name)),
            ))?;
            if g.output == Output::Json {
                print_json(&t)?;
            } else {
                outln!("deleted topic {} ({} events)", t.name, t.count);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn publish(g: &Global, args: &PublishArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let data = match &args.data {
        None => None,
        Some(_) => {
            let bytes = crate::client::read_event(args.data.as_deref())?;
            Some(
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .map_err(|e| anyhow::anyhow!("--data is not JSON: {e}"))?,
            )
        }
    };
    let mut event = serde_json::json!({
        "specversion": "1.0",
        "id": args.id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        "source": args.source,
        "type": args.ty,
    });
    if let Some(d) = data {
        event["datacontenttype"] = "application/json".into();
        event["data"] = d;
    }
    if let Some(k) = &args.key {
        event[nimbus_core::events::PARTITION_KEY] = k.clone().into();
    }
    if let Some(s) = &args.subject {
        event["subject"] = s.clone().into();
    }
    #[derive(serde::Deserialize, serde::Serialize)]
    struct Answer {
        results: Vec<Published>,
    }
    let answer: Answer = api.json(
        api.req(
            reqwest::Method::POST,
            &format!("/v1/topics/{}/events", enc(&args.topic)),
        )
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string()),
    )?;
    if g.output == Output::Json {
        print_json(&answer)?;
    } else {
        for r in &answer.results {
            if r.duplicate {
                outln!(
                    "duplicate of event {} at offset {} (not stored again)",
                    r.id,
                    r.offset
                );
            } else {
                outln!("published event {} at offset {}", r.id, r.offset);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
