//! `nimbus usage` and `nimbus logs`: the metering verbs.

use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use nimbus_control::{RecommendationsResponse, UsageResponse};
use nimbus_store::metering::{Action, LogEntry, LogPage};

use crate::client::{Api, enc, human_bytes, print_json, table};
use crate::{Global, Output};

/// How often `logs -f` asks for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

#[derive(Args)]
pub struct UsageArgs {
    /// Only this function.
    #[arg(long)]
    pub function: Option<String>,
    /// How far back: a duration such as 30m, 24h or 7d.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// One row per function and hour or day.
    #[arg(long, value_parser = ["hour", "day"])]
    pub by: Option<String>,
    /// Suggest a memory size per function from its measured peaks instead.
    #[arg(long, conflicts_with = "by")]
    pub recommend: bool,
}

#[derive(Args)]
pub struct LogsArgs {
    pub name: String,
    /// Keep printing new lines until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How far back: a duration such as 30s, 10m or 2h (default 10m; with --request,
    /// any age).
    #[arg(long)]
    pub since: Option<String>,
    /// Only this invocation.
    #[arg(long)]
    pub request: Option<String>,
    /// At most this many invocations' logs per answer.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

pub fn usage(g: &Global, args: &UsageArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let mut query = format!("since={}", enc(&args.since));
    if let Some(f) = &args.function {
        query.push_str(&format!("&function={}", enc(f)));
    }
    if args.recommend {
        let r: RecommendationsResponse = api.json(api.req(
            reqwest::Method::GET,
            &format!("/v1/usage/recommendations?{query}"),
        ))?;
        if g.output == Output::Json {
            print_json(&r)?;
        } else {
            print_recommendations(&r, &args.since);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(by) = &args.by {
        query.push_str(&format!("&by={}", enc(by)));
    }
    let u: UsageResponse =
        api.json(api.req(reqwest::Method::GET, &format!("/v1/usage?{query}")))?;
    if g.output == Output::Json {
        print_json(&u)?;
    } else {
        print_usage(&u, &args.since);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_usage(u: &UsageResponse, since: &str) {
    if u.usage.is_empty() {
        outln!("no invocations in the last {since}");
        return;
    }
    let mut header = vec!["function"];
    if u.by.is_some() {
        header.push("period");
    }
    header.extend([
        "invocations",
        "errors",
        "cold",
        "GB-s",
        "p50",
        "p99",
        "mem avg",
        "mem max",
        "cpu",
    ]);
    let mut t = table(&header);
    for r in &u.usage {
        let mut row = vec![r.function.clone()];
        if let Some(by) = u.by {
            let start = r.bucket_start_ms.unwrap_or_default();
            row.push(match by {
                nimbus_store::metering::Bucket::Hour => format_time(start, "%Y-%m-%d %H:00"),
                nimbus_store::metering::Bucket::Day => format_time(start, "%Y-%m-%d"),
            });
        }
        row.extend([
            r.invocations.to_string(),
            r.errors.to_string(),
            r.cold_starts.to_string(),
            gb_s(r.gb_seconds),
            format!("{:.1} ms", r.duration_p50_ms),
            format!("{:.1} ms", r.duration_p99_ms),
            r.peak_memory_avg_bytes.map_or("-".into(), human_bytes),
            r.peak_memory_max_bytes.map_or("-".into(), human_bytes),
            format!("{:.0} ms", r.cpu_ms),
        ]);
        t.add_row(row);
    }
    outln!("{t}");
}

fn print_recommendations(r: &RecommendationsResponse, since: &str) {
    if r.recommendations.is_empty() {
        outln!("no invocations in the last {since}");
        return;
    }
    let mut t = table(&[
        "function",
        "memory",
        "suggested",
        "action",
        "p99 peak",
        "max peak",
        "GB-s saved",
        "why",
    ]);
    for rec in &r.recommendations {
        t.add_row(vec![
            rec.function.clone(),
            format!("{} MB", rec.current_memory_mb),
            rec.recommended_memory_mb
                .map_or("-".into(), |m| format!("{m} MB")),
            match rec.action {
                Action::Lower => "lower",
                Action::Keep => "keep",
                Action::Raise => "raise",
                Action::Unknown => "-",
            }
            .to_string(),
            rec.peak_p99_bytes.map_or("-".into(), human_bytes),
            rec.peak_max_bytes.map_or("-".into(), human_bytes),
            if rec.gb_seconds_saved == 0.0 {
                "-".into()
            } else {
                gb_s(rec.gb_seconds_saved)
            },
            rec.reason.clone(),
        ]);
    }
    outln!("{t}");
}

/// GB-seconds of short invocations are tiny: keep the significant digits.
fn gb_s(v: f64) -> String {
    if v.abs() < 1.0 {
        format!("{v:.6}")
    } else {
        format!("{v:.3}")
    }
}

fn format_time(ms: i64, fmt: &str) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |t| t.format(fmt).to_string())
}

pub fn logs(g: &Global, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let mut base = format!(
        "/v1/functions/{}/logs?limit={}",
        enc(&args.name),
        args.limit
    );
    if let Some(s) = &args.since {
        base.push_str(&format!("&since={}", enc(s)));
    }
    if let Some(r) = &args.request {
        base.push_str(&format!("&request={}", enc(r)));
    }
    // Listen before the first request, so an early Ctrl-C still ends cleanly.
    let interrupted = if args.follow {
        Some(interrupts()?)
    } else {
        None
    };
    let fetch = |after: Option<i64>| -> anyhow::Result<LogPage> {
        let path = match after {
            Some(c) => format!("{base}&after={c}"),
            None => base.clone(),
        };
        api.json(api.req(reqwest::Method::GET, &path))
    };
    let page = fetch(None)?;
    let Some(interrupted) = interrupted else {
        if g.output == Output::Json {
            print_json(&page)?;
        } else {
            // A closed pipe (`| head`) ends the output, not in an error.
            let _ = print_entries(&page.entries, Output::Table);
        }
        return Ok(ExitCode::SUCCESS);
    };
    let mut cursor = page.cursor;
    if print_entries(&page.entries, g.output).is_err() {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        match interrupted.recv_timeout(FOLLOW_EVERY) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return Ok(ExitCode::SUCCESS),
            Err(RecvTimeoutError::Timeout) => {}
        }
        // A full page means more is waiting: keep reading before sleeping again.
        loop {
            let page = fetch(Some(cursor))?;
            cursor = page.cursor;
            if print_entries(&page.entries, g.output).is_err() {
                return Ok(ExitCode::SUCCESS);
            }
            if page.entries.len() < args.limit || interrupted.try_recv().is_ok() {
                break;
            }
        }
    }
}

/// `<time> <request id> <line>` per line (or one JSON object per entry).
fn print_entries(entries: &[LogEntry], output: Output) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for e in entries {
        if output == Output::Json {
            let line = serde_json::to_string(e).map_err(std::io::Error::other)?;
            writeln!(out, "{}", crate::client::json_text(&line))?;
            continue;
        }
        let time = format_time(e.started_at_ms, "%Y-%m-%dT%H:%M:%S%.3fZ");
        let id = crate::term::line(&e.request_id);
        for line in e.logs.lines() {
            write!(out, "{time} {id} ")?;
            crate::term::print_log(&mut out, line)?;
            writeln!(out)?;
        }
    }
    out.flush()
}

/// A receiver that gets a message on SIGINT or SIGTERM. The handlers are installed
/// before this returns, so the default action (dying with 130) no longer applies.
fn interrupts() -> anyhow::Result<Receiver<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(_) => {
                    let _ = ready_tx.send(false);
                    return;
                }
            };
            rt.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    let _ = ready_tx.send(false);
                    return;
                };
                let _ = ready_tx.send(true);
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                let _ = tx.send(());
            });
        })
        .context("start the signal listener")?;
    match ready_rx.recv() {
        Ok(true) => Ok(rx),
        _ => bail!("cannot listen for Ctrl-C"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gb_seconds_keep_significant_digits() {
        assert_eq!(gb_s(0.000_125), "0.000125");
        assert_eq!(gb_s(0.016), "0.016000");
        assert_eq!(gb_s(12.3456), "12.346");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(
            format_time(1_700_000_000_123, "%Y-%m-%dT%H:%M:%S%.3fZ"),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            format_time(1_700_000_000_123, "%Y-%m-%d %H:00"),
            "2023-11-14 22:00"
        );
    }
}
