//! `nimbus serve`: wires store, artifacts, sandbox, worker, control API and gateway
//! into one server, and owns its start-up and graceful shutdown.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use nimbus_core::Invoker;
use nimbus_core::routes::RouteTable;
use tokio::sync::watch;

use crate::Global;

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Address for the control API and the gateway (port 0 picks a free port).
    #[arg(long, env = "NIMBUS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Serve the control API (/v1) and /metrics on this address only, so the public
    /// listener carries functions alone (and /health).
    #[arg(long, env = "NIMBUS_CONTROL_LISTEN")]
    pub control_listen: Option<String>,
    /// Run functions without namespaces and cgroups. Unsafe: only for hosts that
    /// cannot isolate (no root), and only with trusted code.
    #[arg(long)]
    pub insecure_no_sandbox: bool,
    /// Map a runtime name to an interpreter, e.g. python3=/usr/bin/python3.11 (repeatable).
    #[arg(
        long = "interpreter",
        value_name = "NAME=PATH",
        env = "NIMBUS_INTERPRETERS",
        value_delimiter = ','
    )]
    pub interpreters: Vec<String>,
    /// Name of the cgroup under which instances are created.
    #[arg(long, env = "NIMBUS_CGROUP_PARENT", default_value = "nimbus")]
    pub cgroup_parent: String,
    /// Pre-started blank sandboxes kept per runtime, so cold starts skip interpreter
    /// start-up (0 disables them).
    #[arg(long, env = "NIMBUS_STEM_CELLS", default_value_t = 2)]
    pub stem_cells: usize,
    /// Instances run as uids leased from BASE+1 upwards, one per instance.
    #[arg(long, env = "NIMBUS_UID_BASE", default_value_t = 100_000)]
    pub uid_base: u32,
    /// Let `network = "egress"` functions reach this host's loopback, where the control
    /// API listens. Off by default.
    #[arg(long)]
    pub egress_allow_host_loopback: bool,
    /// Let wasm functions' outgoing HTTP reach loopback and private addresses (when
    /// their `allowed_outbound_hosts` lists them). Off by default.
    #[arg(long)]
    pub wasm_allow_private_outbound: bool,
    /// WebAssembly instances that may run at once, over all wasm functions (the size of
    /// the pooling allocator; its address space is reserved at start-up).
    #[arg(long, env = "NIMBUS_WASM_MAX_INSTANCES", default_value_t = 256)]
    pub wasm_max_instances: u32,
    /// Deploy these function folders once the server is up (repeatable).
    #[arg(long = "deploy", value_name = "DIR")]
    pub deploy: Vec<PathBuf>,
    /// Issuer (`iss`) that `auth = "jwt"` routes require.
    #[arg(long, env = "NIMBUS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Audience (`aud`) that `auth = "jwt"` routes accept (repeatable).
    #[arg(
        long = "jwt-audience",
        env = "NIMBUS_JWT_AUDIENCE",
        value_delimiter = ','
    )]
    pub jwt_audience: Vec<String>,
    /// Verification keys as a JWKS file.
    #[arg(long, env = "NIMBUS_JWKS_FILE", conflicts_with = "jwks_url")]
    pub jwks_file: Option<PathBuf>,
    /// Verification keys from a JWKS URL, fetched at start and every 5 minutes.
    #[arg(long, env = "NIMBUS_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Clock skew allowed on exp and nbf.
    #[arg(long, env = "NIMBUS_JWT_LEEWAY", default_value = "5s", value_parser = nimbus_core::duration::parse_duration)]
    pub jwt_leeway: std::time::Duration,
    /// Log one `nimbus_access` line per gateway request (JSON with --log-format json).
    #[arg(long, env = "NIMBUS_ACCESS_LOG")]
    pub access_log: bool,
    /// Log format.
    #[arg(long, env = "NIMBUS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// First retry delay of a failed event delivery (doubles per attempt, jittered).
    #[arg(long, env = "NIMBUS_EVENT_RETRY_BASE", default_value = "1s", value_parser = nimbus_core::duration::parse_duration)]
    pub event_retry_base: std::time::Duration,
    /// First retry delay of a failed async invocation (doubles per attempt, with
    /// jitter, capped at 1m). Lambda waits 1m then 2m; the shorter default keeps
    /// retries usable in development.
    #[arg(long, env = "NIMBUS_ASYNC_RETRY_BASE", default_value = "1s", value_parser = nimbus_core::duration::parse_duration)]
    pub async_retry_base: std::time::Duration,
    #[command(flatten)]
    pub capacity: crate::capacity::CapacityArgs,
    #[command(flatten)]
    pub metering: crate::meter::MeteringArgs,
    #[command(flatten)]
    pub limits: crate::listen::LimitsArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

pub fn run(args: ServeArgs, g: &Global) -> anyhow::Result<ExitCode> {
    init_tracing(&args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    runtime.block_on(serve(args, g.clone()))
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIMBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Escaped at the writer, so every field of every event is, whoever logs it; the
    // formatter's own colours would be escaped too, so there are none.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(crate::term::Escaping(std::io::stderr));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs, g: Global) -> anyhow::Result<ExitCode> {
    let data_dir = g.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("create data dir {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("resolve data dir {}", data_dir.display()))?;
    // Before anything touches the data dir or reaps cgroups: a live server may own them.
    let claim = crate::owner::claim(&data_dir)?;
    let token = admin_token(&data_dir)?;

    let store = Arc::new(
        nimbus_store::Store::open(&data_dir.join("state.db")).context("open state database")?,
    );
    let artifacts = Arc::new(
        nimbus_artifacts::ArtifactStore::open(data_dir.join("artifacts"))
            .context("open artifact store")?,
    );
    // Uploads cut off by a crash are garbage; nothing refers to them.
    artifacts.clean_tmp().context("clean artifact upload dir")?;

    // --- metering: records of every invocation, /metrics, retention ---
    let recorder = crate::meter::open_recorder(&data_dir.join("state.db"), &args.metering)?;
    let prometheus = crate::meter::install_exporter()?;
    let housekeeping = crate::meter::spawn_housekeeping(prometheus.clone(), Arc::clone(&recorder));
    // --- end metering ---

    if args.insecure_no_sandbox {
        eprintln!(
            "WARNING: --insecure-no-sandbox: functions run WITHOUT isolation (no namespaces, no cgroups). Never use this with untrusted code."
        );
    }
    let host = nimbus_sandbox::Host::detect(nimbus_sandbox::HostConfig {
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        proc_root: PathBuf::from("/proc"),
        init_exe: std::env::current_exe().context("locate the nimbus binary")?,
        insecure_no_sandbox: args.insecure_no_sandbox,
        parent: args.cgroup_parent.clone(),
        owner: Some(claim.cgroup.clone()),
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot isolate functions on this host: {e}; run as root on Linux, or start with --insecure-no-sandbox to run trusted code without isolation"
        )
    })?;
    let host = Arc::new(host);

    let interpreters = resolve_interpreters(&args.interpreters)?;
    let wasm = nimbus_wasm::Host::new(nimbus_wasm::HostConfig {
        cache_dir: data_dir.join("wasm-cache"),
        max_instances: args.wasm_max_instances.clamp(1, 100_000),
        allow_private_outbound: args.wasm_allow_private_outbound,
        compiler: Some(std::env::current_exe().context("locate the nimbus binary")?),
    })
    .context("start the WebAssembly host")?;
    let region = std::env::var("NIMBUS_REGION").unwrap_or_else(|_| "local".into());
    let capacity = crate::capacity::shared(&args.capacity);
    let worker = nimbus_worker::Worker::new(
        nimbus_worker::WorkerConfig {
            runtime_dir: data_dir.join("runtimes"),
            interpreters,
            region: region.clone(),
            log_limit: nimbus_worker::DEFAULT_LOG_LIMIT,
            queue_timeout: Duration::from_secs(2),
            init_timeout: Duration::from_secs(10),
            uid_base: args.uid_base,
            stem_cells: args.stem_cells,
            egress_allow_host_loopback: args.egress_allow_host_loopback,
            capacity: Arc::clone(&capacity),
        },
        Arc::clone(&store) as Arc<dyn nimbus_store::Catalog>,
        Arc::clone(&artifacts),
        host,
        Arc::clone(&recorder) as Arc<dyn nimbus_core::RecordSink>,
        Arc::clone(&wasm),
    )
    .context("start worker")?;
    let worker = Arc::new(worker);
    let maintainer = worker.spawn_maintainer();
    let invoker: Arc<dyn Invoker> = worker.clone();

    let (routes_rx, routes_gen) = spawn_feed(Arc::clone(&store), "routes", build_routes).await?;
    let (keys_rx, keys_gen) = spawn_feed(Arc::clone(&store), "api keys", build_keys).await?;
    let jwt_rx = crate::jwks::spawn(&args).await?;

    let events = nimbus_store::events::EventLog::open(&data_dir.join("events.db"))
        .context("open the event log")?;
    let event_upkeep = crate::meter::spawn_event_retention(Arc::clone(&events), &args.metering)?;
    let storage_full = crate::storage::spawn_probe(data_dir.clone());
    let control = nimbus_control::router(Arc::new(nimbus_control::ControlState {
        store: Arc::clone(&store),
        events: Arc::clone(&events),
        artifacts: Arc::clone(&artifacts),
        invoker: Arc::clone(&invoker),
        admin_token_sha256: nimbus_control::token_digest(&token),
        unpack_limits: nimbus_artifacts::Limits::default(),
        max_payload: nimbus_core::MAX_PAYLOAD_BYTES,
        metering: Arc::clone(&recorder),
        applied: vec![routes_gen, keys_gen],
        region: region.clone(),
        wasm,
        capacity,
        storage_full: storage_full.clone(),
    }));
    // After the worker (it invokes) and the event log (it reads and settles).
    let broker = nimbus_broker::Broker::spawn(
        Arc::clone(&events),
        Arc::clone(&store),
        Arc::clone(&invoker),
        nimbus_broker::BrokerConfig {
            retry_base_ms: u64::try_from(args.event_retry_base.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            ..Default::default()
        },
    );
    let quotas = Arc::new(nimbus_gateway::Quotas::default());
    let quota_writer = crate::meter::spawn_quota_writer(Arc::clone(&store), Arc::clone(&quotas))
        .await
        .context("load API key quota counters")?;
    let connections = Arc::new(nimbus_gateway::Connections::default());
    let gateway_state = nimbus_gateway::GatewayState {
        routes: routes_rx,
        invoker: Arc::clone(&invoker),
        max_body: nimbus_core::MAX_PAYLOAD_BYTES,
        keys: keys_rx,
        limiters: Arc::default(),
        access_log: args.access_log,
        jwt: jwt_rx,
        quotas: Arc::clone(&quotas),
        authorizers: Arc::default(),
        upstreams: Arc::default(),
        connections: Arc::clone(&connections),
        admin_token_sha256: None,
        publisher: Some(Arc::clone(&events) as Arc<dyn nimbus_core::events::Publisher>),
    };
    // `/v1/connections/{id}` and `/v1/topics/{t}/events` are the gateway's and take
    // API keys as well as the admin token: merged beside the control API, their routes
    // win over the control API's `/v1/{*rest}` and skip its admin-only middleware.
    let platform_state = |admin: bool| nimbus_gateway::GatewayState {
        admin_token_sha256: admin.then(|| nimbus_control::token_digest(&token)),
        ..gateway_state.clone()
    };
    let connections_api = |admin: bool| nimbus_gateway::platform_router(platform_state(admin));
    let gateway = nimbus_gateway::router(gateway_state.clone());
    let health = || crate::storage::health_router(storage_full.clone());
    // `/metrics` goes where the control API goes and takes the same admin token (or a
    // `metrics`-scoped key, for Prometheus).
    let control = control.merge(crate::meter::router(
        platform_state(true),
        prometheus,
        Arc::clone(&recorder),
        Arc::clone(&events),
    ));
    // One listener for everything, or the control API and metrics on their own.
    // Functions with egress reach the connections API on either.
    let (public_app, control_app) = match &args.control_listen {
        None => (
            health()
                .merge(control)
                .merge(connections_api(true))
                .fallback_service(gateway),
            None,
        ),
        // With the control API split off, the admin token is for the control listener
        // only: on the public one, pushing takes a `connections`-scoped key.
        Some(_) => (
            health()
                .merge(connections_api(false))
                .fallback_service(gateway),
            Some(health().merge(control).merge(connections_api(true))),
        ),
    };

    let tls = crate::tls::acceptor(&args.tls)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let addr = listener.local_addr().context("read listen address")?;
    let control_listener = match &args.control_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("listen on {a} (control API)"))?,
        ),
        None => None,
    };
    let control_addr = match &control_listener {
        Some(l) => l.local_addr().context("read control listen address")?,
        None => addr,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("nimbus listening on {scheme}://{addr}");
    if control_listener.is_some() {
        println!("nimbus control API on http://{control_addr}");
    }
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, %control_addr, data_dir = %data_dir.display(), "serving");

    if !args.deploy.is_empty() {
        let mut g2 = g.clone();
        let control_scheme = if args.control_listen.is_some() {
            "http"
        } else {
            scheme
        };
        g2.server = format!("{control_scheme}://{control_addr}");
        g2.token = Some(token.clone());
        let dirs = args.deploy.clone();
        tokio::task::spawn_blocking(move || {
            for dir in dirs {
                match crate::client::deploy_dir(&g2, &dir, false, false) {
                    Ok(resp) => crate::client::print_deploy(&resp),
                    Err(e) => errln!(
                        "error: deploy {}: {}",
                        dir.display(),
                        crate::term::line(&crate::one_line(&e))
                    ),
                }
            }
        });
    }

    // One signal stops both listeners and the scheduler.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // After the worker, so the first claimed invocation has somewhere to run.
    let (dispatcher, cron_loop) = nimbus_scheduler::spawn(
        nimbus_scheduler::SchedulerConfig {
            retry_base: args.async_retry_base,
            region: region.clone(),
            ..nimbus_scheduler::SchedulerConfig::default()
        },
        Arc::clone(&store),
        Arc::clone(&events),
        Arc::clone(&invoker),
        stop_rx.clone(),
    );
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    // Upgraded sockets are no longer hyper's, so its drain does not close them: on
    // the same signal they are closed (1001) and their `$disconnect` runs, while
    // in-flight requests drain, within the same timeout.
    let ws_drain = {
        let connections = Arc::clone(&connections);
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            stop.await;
            if !connections.is_empty() {
                tracing::info!(open = connections.len(), "closing WebSocket connections");
            }
            connections.shutdown().await;
        })
    };
    // No new deliveries once the signal comes; in-flight ones finish during the drain.
    let broker_stop = {
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            stop.await;
            broker.join().await;
        })
    };
    let public_tls = tls.clone();
    let public = crate::listen::serve(
        listener,
        public_app,
        &args.limits,
        public_tls,
        stopped(stop_rx.clone()),
    );
    match (control_listener, control_app) {
        (Some(l), Some(app)) => {
            // The control listener is for operators on a private address: plain HTTP.
            let ctl = crate::listen::serve(l, app, &args.limits, None, stopped(stop_rx));
            let (a, b) = tokio::join!(public, ctl);
            a.context("serve HTTP")?;
            b.context("serve control API")?;
        }
        _ => public.await.context("serve HTTP")?,
    }
    if tokio::time::timeout(args.limits.drain_timeout, ws_drain)
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: WebSocket connections left without $disconnect");
    }

    if tokio::time::timeout(args.limits.drain_timeout, broker_stop)
        .await
        .is_err()
    {
        // Their outcomes are not recorded: delivered again after the restart.
        tracing::warn!("drain timeout: event deliveries still in flight");
    }
    // In-flight async invocations finish within the drain; one cut off stays
    // `running` and is requeued at the next start (at-least-once).
    cron_loop.abort();
    if tokio::time::timeout(args.limits.drain_timeout, dispatcher)
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: async invocations left running are requeued at start-up");
    }

    tracing::info!("draining done; stopping instances");
    worker.shutdown().await;
    housekeeping.abort();
    crate::meter::flush(recorder).await;
    event_upkeep.abort();
    let _ = tokio::task::spawn_blocking(move || events.close()).await;
    quota_writer.abort();
    crate::meter::write_quotas(Arc::clone(&store), &quotas).await;
    maintainer.abort();
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining in-flight requests"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining in-flight requests"),
    }
}

/// Turns the store's change counter into snapshots for the gateway (route table, live
/// API keys): built once now, rebuilt after every change, swapped in whole. The second
/// receiver tells which store generation the current snapshot reflects.
async fn spawn_feed<T: Send + Sync + 'static>(
    store: Arc<nimbus_store::Store>,
    what: &'static str,
    build: fn(&nimbus_store::Store) -> anyhow::Result<T>,
) -> anyhow::Result<(watch::Receiver<Arc<T>>, watch::Receiver<u64>)> {
    let mut changes = store.subscribe();
    let first_gen = *changes.borrow_and_update();
    let initial = build(&store)?;
    let (tx, rx) = watch::channel(Arc::new(initial));
    let (gen_tx, gen_rx) = watch::channel(first_gen);
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            // Read the generation before building: the snapshot reflects at least it.
            let generation = *changes.borrow_and_update();
            let s = Arc::clone(&store);
            match tokio::task::spawn_blocking(move || build(&s)).await {
                Ok(Ok(snapshot)) => {
                    let _ = tx.send(Arc::new(snapshot));
                    let _ = gen_tx.send(generation);
                }
                Ok(Err(e)) => {
                    tracing::error!(what, error = %format!("{e:#}"), "snapshot rebuild failed")
                }
                Err(e) => tracing::error!(what, error = %e, "snapshot rebuild panicked"),
            }
        }
    });
    Ok((rx, gen_rx))
}

fn build_routes(store: &nimbus_store::Store) -> anyhow::Result<RouteTable> {
    let routes = store.routes().context("load routes")?;
    RouteTable::build(routes).context("build route table")
}

fn build_keys(store: &nimbus_store::Store) -> anyhow::Result<nimbus_core::keys::KeySet> {
    Ok(nimbus_core::keys::KeySet::new(
        store.live_keys().context("load API keys")?,
    ))
}

/// The admin token: made once, kept in the data dir readable by its owner only.
fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token: String = std::iter::once("nmb_".to_string())
        .chain(raw.iter().map(|b| format!("{b:02x}")))
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(token.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(token)
}

/// Finds the real interpreters once: `python3` on PATH may be a slow shim (pyenv).
fn resolve_interpreters(overrides: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut map = BTreeMap::new();
    if let Some(py) = real_python() {
        map.insert("python3".to_string(), py);
    }
    if let Some(node) = find_on_path("node") {
        map.insert("node".to_string(), node);
    }
    for o in overrides.iter().filter(|o| !o.is_empty()) {
        let Some((name, path)) = o.split_once('=') else {
            bail!("--interpreter `{o}` must be NAME=PATH");
        };
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("--interpreter {name}: {} does not exist", path.display());
        }
        map.insert(name.to_string(), path);
    }
    for (name, path) in &map {
        tracing::info!(runtime = %name, interpreter = %path.display(), "runtime");
    }
    Ok(map)
}

fn real_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NIMBUS_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    path.is_file().then_some(path)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}
