//! `loadgen publish`: durable-publish load (CloudEvents over HTTP, each request
//! answered only after the server's fsync), and `loadgen fsync`: the disk's own
//! fsync rate in the same directory, the floor any durable ack has to beat.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use http::Method;
use serde_json::{Value, json};

use crate::stats::Stats;
use crate::target::Target;
use crate::{Conn, Stop};

#[derive(Args)]
pub struct PublishArgs {
    /// http://127.0.0.1:PORT/v1/topics/TOPIC/events
    #[arg(long)]
    pub url: String,
    /// Concurrent producers, one keep-alive connection each, each awaiting its ack.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub connections: usize,
    /// Events per request: 1 sends structured mode, more a cloudevents-batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 1024)]
    pub event_bytes: usize,
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Read the admin token from this environment variable (never on the command line).
    #[arg(long, default_value = "NIMBUS_TOKEN")]
    pub token_env: String,
}

#[derive(Args)]
pub struct FsyncArgs {
    /// Directory on the disk to measure (the server's data dir).
    #[arg(long)]
    pub dir: std::path::PathBuf,
    #[arg(long, default_value_t = 2.0)]
    pub duration: f64,
}

fn body(seq: &AtomicU64, batch: usize, data: &str, run: u64) -> Bytes {
    let one = |i: u64| {
        json!({"specversion": "1.0", "id": format!("bench-{run}-{i}"), "source": "bench",
               "type": "bench.event", "datacontenttype": "application/json",
               "data": {"pad": data}})
    };
    if batch <= 1 {
        Bytes::from(one(seq.fetch_add(1, Ordering::Relaxed)).to_string())
    } else {
        let first = seq.fetch_add(batch as u64, Ordering::Relaxed);
        let items: Vec<Value> = (first..first + batch as u64).map(one).collect();
        Bytes::from(Value::Array(items).to_string())
    }
}

async fn drive(
    mut conn: Conn,
    stop: Stop,
    record: bool,
    seq: Arc<AtomicU64>,
    a: Arc<(usize, String, String, u64)>,
) -> anyhow::Result<(Conn, Vec<f64>, u64)> {
    let (batch, data, token, run) = (a.0, a.1.as_str(), a.2.as_str(), a.3);
    let ct = if batch <= 1 {
        "application/cloudevents+json"
    } else {
        "application/cloudevents-batch+json"
    };
    let headers = [
        ("authorization", format!("Bearer {token}")),
        ("content-type", ct.to_string()),
    ];
    let path = conn.target.path.clone();
    let mut lat = Vec::new();
    let mut failed = 0u64;
    while stop.take() {
        let b = body(&seq, batch, data, run);
        let t = Instant::now();
        let ans = conn.send(Method::POST, &path, &headers, b).await?;
        if ans.status.is_success() {
            if record {
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        } else {
            failed += 1;
            if failed == 1 {
                let text =
                    String::from_utf8_lossy(&ans.body[..ans.body.len().min(200)]).into_owned();
                eprintln!("loadgen publish: HTTP {}: {text}", ans.status);
            }
        }
    }
    Ok((conn, lat, failed))
}

async fn phase(
    conns: Vec<Conn>,
    secs: f64,
    record: bool,
    seq: &Arc<AtomicU64>,
    a: &Arc<(usize, String, String, u64)>,
) -> anyhow::Result<(Vec<Conn>, Vec<f64>, u64, f64)> {
    let stop = Stop::new(None, Some(secs));
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| {
            tokio::spawn(drive(
                c,
                stop.clone(),
                record,
                Arc::clone(seq),
                Arc::clone(a),
            ))
        })
        .collect();
    let (mut back, mut lat, mut failed) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        let (c, l, f) = t.await.context("producer task")??;
        back.push(c);
        lat.extend(l);
        failed += f;
    }
    Ok((back, lat, failed, started.elapsed().as_secs_f64()))
}

pub async fn publish(a: PublishArgs) -> anyhow::Result<Value> {
    let target = Target::parse(&a.url)?;
    if a.connections == 0 || a.batch == 0 {
        bail!("--connections and --batch must be at least 1");
    }
    let token = std::env::var(&a.token_env)
        .with_context(|| format!("read the admin token from ${}", a.token_env))?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let shared = Arc::new((
        a.batch,
        "x".repeat(a.event_bytes),
        token.trim().to_string(),
        run,
    ));
    let seq = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        conns.push(Conn::open(&target).await?);
    }
    if a.warmup_secs > 0.0 {
        conns = phase(conns, a.warmup_secs, false, &seq, &shared).await?.0;
    }
    let (_, lat, failed, elapsed) = phase(conns, a.duration, true, &seq, &shared).await?;
    let requests = lat.len() as f64;
    Ok(json!({
        "url": a.url,
        "connections": a.connections,
        "batch": a.batch,
        "event_bytes": a.event_bytes,
        "elapsed_s": elapsed,
        "requests_ok": lat.len(),
        "requests_failed": failed,
        "events_per_s": if elapsed > 0.0 { requests * a.batch as f64 / elapsed } else { 0.0 },
        "ack_ms": Stats::of(lat),
    }))
}

/// Appends 1 KiB and fdatasyncs, in a loop: what one durable write costs on this disk.
pub fn fsync(a: &FsyncArgs) -> anyhow::Result<Value> {
    let path = a.dir.join(".loadgen-fsync");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let block = [0u8; 1024];
    let end = Instant::now() + Duration::from_secs_f64(a.duration);
    let mut lat = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        f.write_all(&block).context("write")?;
        f.sync_data().context("fdatasync")?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    let n = lat.len() as f64;
    Ok(json!({
        "dir": a.dir,
        "fsyncs_per_s": n / a.duration,
        "fsync_ms": Stats::of(lat),
    }))
}
