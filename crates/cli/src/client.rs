//! The CLI verbs that talk to a running server over the control API.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use comfy_table::{Table, presets::NOTHING};
use nimbus_core::api::{
    AliasInfo, DeployResponse, ErrorBody, FunctionDetail, FunctionSummary, InvokeResponse,
    RollbackResponse, VersionInfo,
};
use nimbus_core::routes::RouteEntry;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::de::DeserializeOwned;

use crate::build::{BuildOptions, prepare};
use crate::term;
use crate::{Global, Output};

/// Archives above this size get a progress bar while uploading.
const PROGRESS_THRESHOLD: u64 = 1024 * 1024;

#[derive(Args)]
pub struct DeployArgs {
    /// The function folder (holds nimbus.toml).
    pub dir: PathBuf,
    /// Skip installing requirements.txt / package.json dependencies.
    #[arg(long)]
    pub no_build: bool,
}

#[derive(Args)]
pub struct InvokeArgs {
    pub name: String,
    /// The event: inline JSON, @file.json, or - for stdin.
    #[arg(long, short = 'd')]
    pub data: Option<String>,
    /// Also print what the function wrote to stdout/stderr.
    #[arg(long)]
    pub logs: bool,
    /// Invoke this version.
    #[arg(long, conflicts_with = "alias")]
    pub version: Option<u32>,
    /// Invoke the version this alias points at (default `live`).
    #[arg(long)]
    pub alias: Option<String>,
    /// Queue the invocation and return its request id at once (202); follow it with
    /// `nimbus invocation get ID`.
    #[arg(long = "async", conflicts_with = "logs")]
    pub is_async: bool,
    /// Retries after a failed async attempt: 0, 1 or 2 (default 2).
    #[arg(long, requires = "is_async")]
    pub max_retries: Option<u32>,
    /// Drop the async invocation if not run within this long (1m..6h, default 6h).
    #[arg(long, requires = "is_async")]
    pub max_event_age: Option<String>,
    /// Topic that receives a destination record when the async invocation succeeds.
    #[arg(long, requires = "is_async")]
    pub on_success: Option<String>,
    /// Topic that receives a destination record when it finally fails or expires.
    #[arg(long, requires = "is_async")]
    pub on_failure: Option<String>,
}

pub struct Api {
    base: String,
    token: Option<String>,
    http: Client,
}

impl Api {
    pub fn new(g: &Global) -> anyhow::Result<Api> {
        let token = match &g.token {
            Some(t) => Some(t.clone()),
            None => read_token(&g.data_dir),
        };
        let http = Client::builder()
            .timeout(Duration::from_secs(20 * 60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("build HTTP client")?;
        Ok(Api {
            base: g.server.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    pub(crate) fn req(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let r = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn send(&self, r: RequestBuilder) -> anyhow::Result<Response> {
        r.send().map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach nimbus at {}: is `nimbus serve` running? (set --server or NIMBUS_SERVER)",
                    self.base
                )
            } else if e.is_timeout() {
                anyhow!("request to {} timed out", self.base)
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })
    }

    /// Sends and decodes a JSON answer, turning API errors into one-line messages.
    pub(crate) fn json<T: DeserializeOwned>(&self, r: RequestBuilder) -> anyhow::Result<T> {
        let resp = self.send(r)?;
        let status = resp.status();
        let bytes = resp.bytes().context("read response")?;
        if !status.is_success() {
            bail!(
                "{}",
                api_error_message(status, &bytes, self.token.is_some())
            );
        }
        serde_json::from_slice(&bytes).context("decode server response")
    }
}

fn api_error_message(status: reqwest::StatusCode, body: &[u8], had_token: bool) -> String {
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return if had_token {
            "the server rejected the admin token (check NIMBUS_TOKEN or --data-dir)".into()
        } else {
            "no admin token: set NIMBUS_TOKEN or point --data-dir at the server's data directory"
                .into()
        };
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error.message,
        Err(_) => format!("server answered {status}"),
    }
}

fn read_token(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join("admin.token"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    outln!("{}", json_text(&serde_json::to_string_pretty(v)?));
    Ok(())
}

/// JSON escapes C0 controls itself but passes DEL and C1 (U+0080..U+009F, where 8-bit
/// CSI lives) through raw; they can only be inside strings, where `\u00XX` keeps the
/// document valid and equal.
pub(crate) fn json_text(json: &str) -> std::borrow::Cow<'_, str> {
    if !json.contains(char::is_control) {
        return std::borrow::Cow::Borrowed(json);
    }
    json.chars()
        .map(|c| match c {
            '\n' | '\t' | '\r' => c.to_string(),
            c if c.is_control() => format!("\\u{:04x}", u32::from(c)),
            c => c.to_string(),
        })
        .collect::<String>()
        .into()
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.iter().map(|h| h.to_uppercase()));
    t
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn deploy(g: &Global, args: &DeployArgs) -> anyhow::Result<ExitCode> {
    let resp = deploy_dir(g, &args.dir, args.no_build, g.output == Output::Table)?;
    if g.output == Output::Json {
        print_json(&resp)?;
    } else {
        print_deploy(&resp);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_deploy(resp: &DeployResponse) {
    if resp.created {
        outln!("deployed {} version {}", resp.name, resp.version);
    } else {
        outln!(
            "{} is unchanged: still version {} (no new version created)",
            resp.name,
            resp.version
        );
    }
    outln!("  digest  {}", resp.digest);
    outln!("  size    {}", human_bytes(resp.size));
    outln!("  alias   live -> {}", resp.version);
    for w in &resp.warnings {
        outln!("  warning: {w}");
    }
}

/// Builds, packs and uploads a folder; shared by `deploy` and `serve --deploy`.
pub fn deploy_dir(
    g: &Global,
    dir: &Path,
    no_build: bool,
    chatty: bool,
) -> anyhow::Result<DeployResponse> {
    let api = Api::new(g)?;
    let opts = BuildOptions {
        no_build,
        cache_dir: cache_dir(),
    };
    let prepared = prepare(dir, &opts)?;
    if chatty {
        errln!("packed {}", prepared.summary());
    }
    let size = prepared.archive_bytes;
    let file = prepared.archive.reopen().context("reopen packed archive")?;
    let body = if size > PROGRESS_THRESHOLD && chatty {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        reqwest::blocking::Body::sized(ProgressReader { inner: file, bar }, size)
    } else {
        reqwest::blocking::Body::sized(file, size)
    };
    api.json(
        api.req(reqwest::Method::POST, "/v1/functions")
            .header("content-type", "application/gzip")
            .body(body),
    )
}

struct ProgressReader<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        if n == 0 {
            self.bar.finish_and_clear();
        }
        Ok(n)
    }
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NIMBUS_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("nimbus");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("nimbus"),
        None => std::env::temp_dir().join("nimbus-cache"),
    }
}

pub(crate) fn read_event(data: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let raw = match data {
        None => return Ok(b"{}".to_vec()),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("read event from stdin")?;
            buf
        }
        Some(s) if s.starts_with('@') => {
            let path = &s[1..];
            std::fs::read(path).with_context(|| format!("read event file {path}"))?
        }
        Some(s) => s.as_bytes().to_vec(),
    };
    if raw.len() > nimbus_core::MAX_PAYLOAD_BYTES {
        bail!(
            "the event is {} bytes; the limit is {} bytes (6 MiB)",
            raw.len(),
            nimbus_core::MAX_PAYLOAD_BYTES
        );
    }
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&raw) {
        bail!("--data is not valid JSON: {e}");
    }
    Ok(raw)
}

pub fn invoke(g: &Global, args: &InvokeArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let event = read_event(args.data.as_deref())?;
    let mut path = format!(
        "/v1/functions/{}/invoke?logs={}",
        enc(&args.name),
        args.logs
    );
    if let Some(v) = args.version {
        path.push_str(&format!("&version={v}"));
    }
    if let Some(a) = &args.alias {
        path.push_str(&format!("&alias={}", enc(a)));
    }
    let mut req = api
        .req(reqwest::Method::POST, &path)
        .header("content-type", "application/json")
        .body(event);
    if args.is_async {
        req = req.header("x-nimbus-invocation-type", "Event");
        let opts = [
            (
                "x-nimbus-max-retries",
                args.max_retries.map(|n| n.to_string()),
            ),
            ("x-nimbus-max-event-age", args.max_event_age.clone()),
            ("x-nimbus-on-success", args.on_success.clone()),
            ("x-nimbus-on-failure", args.on_failure.clone()),
        ];
        for (name, value) in opts {
            if let Some(v) = value {
                req = req.header(name, v);
            }
        }
        let queued: nimbus_core::api::AsyncInvokeResponse = api.json(req)?;
        if g.output == Output::Json {
            print_json(&queued)?;
        } else {
            outln!("{}", queued.request_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let resp = api.send(req)?;
    let status = resp.status();
    let bytes = resp.bytes().context("read response")?;
    // Failed invocations still answer with the envelope (504, 502 ...); other errors don't.
    let envelope: InvokeResponse = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(_) => bail!("{}", api_error_message(status, &bytes, api.token.is_some())),
    };
    if g.output == Output::Json {
        print_json(&envelope)?;
    } else {
        if let Some(logs) = envelope.logs.as_deref().filter(|l| !l.is_empty()) {
            let mut err = std::io::stderr().lock();
            crate::term::print_log(&mut err, logs)?;
            if !logs.ends_with('\n') {
                writeln!(err)?;
            }
        }
        if let Some(result) = &envelope.result {
            outln!("{}", json_text(&serde_json::to_string_pretty(result)?));
        }
    }
    match &envelope.error {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => {
            if g.output == Output::Table {
                errln!(
                    "error: {}: {}",
                    term::line(&e.error_type),
                    term::line(&e.error_message)
                );
                if args.logs {
                    for line in &e.stack_trace {
                        errln!("  {}", term::line(line.trim_end()));
                    }
                }
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Percent-encodes a path segment or query value.
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn list(g: &Global) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let fns: Vec<FunctionSummary> = api.json(api.req(reqwest::Method::GET, "/v1/functions"))?;
    if g.output == Output::Json {
        print_json(&fns)?;
        return Ok(ExitCode::SUCCESS);
    }
    if fns.is_empty() {
        outln!("no functions yet: deploy one with `nimbus deploy <folder>`");
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = table(&["name", "runtime", "live", "latest", "memory", "updated"]);
    for f in fns {
        t.add_row(vec![
            f.name,
            f.runtime,
            f.live_version.map_or("-".into(), |v| v.to_string()),
            f.latest_version.to_string(),
            format!("{} MB", f.memory_mb),
            f.updated_at,
        ]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}

pub fn get(g: &Global, name: &str) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let f: FunctionDetail = api.json(api.req(
        reqwest::Method::GET,
        &format!("/v1/functions/{}", enc(name)),
    ))?;
    if g.output == Output::Json {
        print_json(&f)?;
        return Ok(ExitCode::SUCCESS);
    }
    let c = &f.config;
    outln!("name      {}", f.name);
    outln!("runtime   {}", c.runtime_name);
    outln!("handler   {}", c.handler);
    outln!("memory    {} MB", c.memory_mb);
    outln!(
        "timeout   {}",
        nimbus_core::duration::format_ms(c.timeout_ms)
    );
    outln!(
        "instances max {}, min {}, idle timeout {}",
        c.concurrency.max_instances,
        c.concurrency.min_instances,
        nimbus_core::duration::format_ms(c.concurrency.idle_timeout_ms)
    );
    outln!("network   {:?}", c.network);
    outln!("versions  {} (latest)", f.latest_version);
    for a in &f.aliases {
        outln!("alias     {} -> {}", a.name, a.version);
    }
    for r in &f.routes {
        let kind = if r.options.websocket {
            " (websocket)"
        } else {
            ""
        };
        outln!("route     {} {}{kind} -> {}", r.method, r.path, r.alias);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn versions(g: &Global, name: &str) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let vs: Vec<VersionInfo> = api.json(api.req(
        reqwest::Method::GET,
        &format!("/v1/functions/{}/versions", enc(name)),
    ))?;
    if g.output == Output::Json {
        print_json(&vs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = table(&[
        "version", "aliases", "digest", "size", "runtime", "memory", "created",
    ]);
    for v in vs {
        t.add_row(vec![
            v.version.to_string(),
            v.aliases.join(","),
            short_digest(&v.digest),
            human_bytes(v.size),
            v.runtime,
            format!("{} MB", v.memory_mb),
            v.created_at,
        ]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}

fn short_digest(d: &str) -> String {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    format!("sha256:{}", &hex[..hex.len().min(12)])
}

pub fn alias_set(g: &Global, name: &str, alias: &str, version: u32) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let a: AliasInfo = api.json(
        api.req(
            reqwest::Method::PUT,
            &format!("/v1/functions/{}/aliases/{}", enc(name), enc(alias)),
        )
        .json(&serde_json::json!({ "version": version })),
    )?;
    if g.output == Output::Json {
        print_json(&a)?;
    } else {
        outln!("{name}: alias {} -> {}", a.name, a.version);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn alias_ls(g: &Global, name: &str) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let aliases: Vec<AliasInfo> = api.json(api.req(
        reqwest::Method::GET,
        &format!("/v1/functions/{}/aliases", enc(name)),
    ))?;
    if g.output == Output::Json {
        print_json(&aliases)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = table(&["alias", "version"]);
    for a in aliases {
        t.add_row(vec![a.name, a.version.to_string()]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}

pub fn rollback(g: &Global, name: &str, alias: &str) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let r: RollbackResponse = api.json(
        api.req(
            reqwest::Method::POST,
            &format!("/v1/functions/{}/rollback", enc(name)),
        )
        .json(&serde_json::json!({ "alias": alias })),
    )?;
    if g.output == Output::Json {
        print_json(&r)?;
    } else {
        outln!(
            "{}: alias {} moved from {} back to {}",
            r.name,
            r.alias,
            r.from,
            r.to
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn remove(g: &Global, name: &str) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let resp = api.send(api.req(
        reqwest::Method::DELETE,
        &format!("/v1/functions/{}", enc(name)),
    ))?;
    let status = resp.status();
    if !status.is_success() {
        let bytes = resp.bytes().unwrap_or_default();
        bail!("{}", api_error_message(status, &bytes, api.token.is_some()));
    }
    if g.output == Output::Json {
        print_json(&serde_json::json!({ "deleted": name }))?;
    } else {
        outln!("deleted {name}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn evict(g: &Global, name: &str) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let v: serde_json::Value = api.json(api.req(
        reqwest::Method::POST,
        &format!("/v1/functions/{}/evict", enc(name)),
    ))?;
    if g.output == Output::Json {
        print_json(&v)?;
    } else {
        outln!("{name}: stopped {} instance(s)", v["evicted"]);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn routes(g: &Global) -> anyhow::Result<ExitCode> {
    let api = Api::new(g)?;
    let rs: Vec<RouteEntry> = api.json(api.req(reqwest::Method::GET, "/v1/routes"))?;
    if g.output == Output::Json {
        print_json(&rs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = table(&["method", "host", "path", "target", "auth", "limits"]);
    for r in rs {
        let auth = serde_json::to_value(r.auth)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut limits = Vec::new();
        if let Some(x) = r.options.rate {
            limits.push(format!("route {x}"));
        }
        if let Some(x) = r.options.rate_per_ip {
            limits.push(format!("per ip {x}"));
        }
        if r.options.cors.is_some() {
            limits.push("cors".into());
        }
        if let Some(ms) = r.options.timeout_ms {
            limits.push(format!("timeout {ms}ms"));
        }
        let target = r.target();
        let host = if r.host.is_empty() {
            "any".into()
        } else {
            r.host
        };
        // A WebSocket route is stored as GET; say what it is.
        let method = if r.options.websocket {
            "WS".to_string()
        } else {
            r.method
        };
        t.add_row(vec![method, host, r.path, target, auth, limits.join(", ")]);
    }
    outln!("{t}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(enc("hello"), "hello");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
    }

    #[test]
    fn events_are_checked_before_sending() {
        assert!(read_event(Some("{\"a\":1}")).is_ok());
        assert!(read_event(Some("{oops")).is_err());
        assert!(read_event(Some("@/nonexistent/file.json")).is_err());
        assert_eq!(read_event(None).ok(), Some(b"{}".to_vec()));
    }

    #[test]
    fn api_errors_become_one_line() {
        let body = br#"{"error":{"code":"not_found","message":"function `x` not found"}}"#;
        assert_eq!(
            api_error_message(reqwest::StatusCode::NOT_FOUND, body, true),
            "function `x` not found"
        );
        assert!(
            api_error_message(reqwest::StatusCode::UNAUTHORIZED, b"", false)
                .contains("NIMBUS_TOKEN")
        );
    }
}
