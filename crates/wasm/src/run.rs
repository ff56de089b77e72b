//! One request: a fresh store and instance with the invocation's limits, the guest's
//! `wasi:http/incoming-handler.handle` called, its response collected.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::App;
use crate::logs::LogPipe;
use crate::outbound::{Hooks, OutboundPolicy};

/// Where the code folder appears inside the guest when `[wasm] files = true` (Lambda's
/// path, so a handler finds its files where a process function does).
pub const CODE_DIR: &str = "/var/task";

/// What one request may use and see.
pub struct Invocation {
    pub request: http::Request<Bytes>,
    /// Shared by the requests of one loaded version.
    pub env: Arc<Vec<(String, String)>>,
    /// The function folder, mounted read-only at [`CODE_DIR`] when set.
    pub files: Option<PathBuf>,
    pub outbound: OutboundPolicy,
    pub memory_bytes: u64,
    pub timeout: Duration,
    pub fuel: Option<u64>,
    pub log_limit: usize,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
}

/// How a request ended.
pub struct Finished {
    pub result: Result<http::Response<Bytes>, Failure>,
    pub logs: String,
    /// The most linear memory (all memories of the instance) in use at once.
    pub peak_memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The deadline passed (the guest was interrupted or its host call cut off).
    Timeout,
    /// The guest tried to grow its memory past `memory_mb`.
    OutOfMemory,
    /// The guest ran out of its `[wasm] fuel` budget.
    OutOfFuel,
    /// The guest trapped (a panic, `unreachable`, a bad memory access) or broke the
    /// `wasi:http` contract (returned without a response, an invalid response).
    Trap(String),
    /// The response body was larger than allowed.
    ResponseTooLarge,
    /// Every instance slot of the host is in use.
    Busy,
}

/// The store's data: WASI and wasi:http state, limits and the per-request flags.
pub(crate) struct State {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: Hooks,
    limiter: Limiter,
    deadline: Instant,
    flags: Arc<Flags>,
}

#[derive(Default)]
struct Flags {
    peak: AtomicU64,
    oom: AtomicBool,
    timed_out: AtomicBool,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// `memory_mb` over all of an instance's memories (a per-memory limit would let a
/// component with two memories use twice its share), and the peak for metering.
struct Limiter {
    limit: u64,
    total: u64,
    flags: Arc<Flags>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let after = self.total + (desired.saturating_sub(current)) as u64;
        if after > self.limit {
            self.flags.oom.store(true, Ordering::Relaxed);
            // A trap, not a refused grow: Lambda stops a function at its limit, and a
            // refused grow only turns into an abort inside the guest a moment later.
            wasmtime::bail!(
                "memory limit exceeded: {} MiB asked, {} MiB allowed",
                after >> 20,
                self.limit >> 20
            );
        }
        self.total = after;
        self.flags.peak.fetch_max(after, Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold references, not data; this bounds a runaway `table.grow`.
        Ok(desired <= 1 << 20)
    }
}

impl App {
    /// Runs one request in a new instance. Never panics on what the guest does.
    pub async fn handle(&self, inv: Invocation) -> Finished {
        let _running = self.host.ticker.enter();
        let logs = LogPipe::new(inv.log_limit);
        let flags = Arc::new(Flags::default());
        let deadline = Instant::now() + inv.timeout;
        let result = match self.build_store(&inv, &logs, &flags, deadline) {
            Ok(store) => {
                let run = self.run(store, inv.request, inv.max_response_bytes, &flags);
                // The epoch callback stops busy guests at the deadline; this timer stops
                // guests waiting in the host (a sleep, a slow upstream). A little later,
                // so a busy guest ends with its own trap.
                match tokio::time::timeout(inv.timeout + 2 * crate::TICK, run).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure::Timeout),
                }
            }
            Err(f) => Err(f),
        };
        let result = match result {
            Err(_) if flags.timed_out.load(Ordering::Relaxed) => Err(Failure::Timeout),
            Err(_) if flags.oom.load(Ordering::Relaxed) => Err(Failure::OutOfMemory),
            r => r,
        };
        Finished {
            result,
            logs: logs.take(),
            peak_memory_bytes: flags.peak.load(Ordering::Relaxed),
        }
    }

    fn build_store(
        &self,
        inv: &Invocation,
        logs: &LogPipe,
        flags: &Arc<Flags>,
        deadline: Instant,
    ) -> Result<Store<State>, Failure> {
        let mut b = WasiCtxBuilder::new();
        b.stdout(logs.clone()).stderr(logs.clone()).envs(&inv.env);
        // No sockets: HTTP goes through wasi:http and its allow-list only.
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if let Some(dir) = &inv.files {
            b.preopened_dir(dir, CODE_DIR, FsPerms::ReadOnly)
                .map_err(|e| Failure::Trap(format!("mount the code folder: {e}")))?;
        }
        let state = State {
            wasi: b.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: Hooks {
                policy: inv.outbound.clone(),
                deadline,
            },
            limiter: Limiter {
                limit: inv.memory_bytes,
                total: 0,
                flags: Arc::clone(flags),
            },
            deadline,
            flags: Arc::clone(flags),
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store
            .set_fuel(inv.fuel.unwrap_or(u64::MAX))
            .map_err(|e| Failure::Trap(format!("set fuel: {e}")))?;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            let st = ctx.data();
            if Instant::now() >= st.deadline {
                st.flags.timed_out.store(true, Ordering::Relaxed);
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        Ok(store)
    }

    async fn run(
        &self,
        mut store: Store<State>,
        request: http::Request<Bytes>,
        max_body: usize,
        flags: &Flags,
    ) -> Result<http::Response<Bytes>, Failure> {
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(
            parts,
            Full::new(body)
                .map_err(|never: Infallible| -> wasmtime_wasi_http::Error { match never {} }),
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        let setup = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .and_then(|req| Ok((req, store.data_mut().http().new_response_outparam(tx)?)));
        let (req, out) = setup.map_err(|e| {
            Failure::Trap(format!(
                "bad request for the guest: {}",
                crate::root_cause(&e)
            ))
        })?;

        let pre = self.pre.clone();
        let guest = async move {
            let r = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            }
            .await;
            // Dropping the store drops the response outparam, which ends the wait below
            // when the guest trapped before answering.
            drop(store);
            r
        };
        let response = async move {
            let resp = match rx.await {
                Ok(Ok(resp)) => resp,
                Ok(Err(code)) => {
                    return Err(Failure::Trap(format!(
                        "the component answered with an error: {code:?}"
                    )));
                }
                Err(_) => return Err(Failure::Trap(String::new())),
            };
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        Failure::ResponseTooLarge
                    } else {
                        Failure::Trap(format!("the response body broke off: {e}"))
                    }
                })?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body))
        };
        let (guest, response) = tokio::join!(guest, response);
        match (guest, response) {
            (_, Ok(resp)) => Ok(resp),
            // The guest fails writing once the host stops reading; the cause is the size.
            (_, Err(Failure::ResponseTooLarge)) => Err(Failure::ResponseTooLarge),
            (Err(e), Err(_)) => Err(classify(&e, flags)),
            (Ok(()), Err(Failure::Trap(m))) if m.is_empty() => Err(Failure::Trap(
                "the component returned without setting a response".into(),
            )),
            (Ok(()), Err(f)) => Err(f),
        }
    }
}

fn classify(e: &wasmtime::Error, flags: &Flags) -> Failure {
    if flags.timed_out.load(Ordering::Relaxed) {
        return Failure::Timeout;
    }
    if flags.oom.load(Ordering::Relaxed) {
        return Failure::OutOfMemory;
    }
    if e.is::<wasmtime::PoolConcurrencyLimitError>() {
        return Failure::Busy;
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => Failure::OutOfFuel,
        Some(wasmtime::Trap::Interrupt) => Failure::Timeout,
        Some(t) => Failure::Trap(t.to_string()),
        None => Failure::Trap(crate::root_cause(e)),
    }
}
