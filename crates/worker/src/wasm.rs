//! `runtime = "wasm"` functions: a new WebAssembly instance per invocation, through the
//! `wasm` crate's host, with the same slots, statuses and records as process functions.
//!
//! A pool of a wasm version holds no instances, only the loaded component (its
//! `InstancePre`): loading it is the cold start, and it is dropped after `idle_timeout`
//! unused (unless `min_instances` asks to keep it), so an idle function costs nothing.
//!
//! Events become requests here: an API Gateway payload-2.0 event (an HTTP route) is
//! turned back into the request it describes, and any other event is a `POST /` with
//! the event as its JSON body. The response goes back the same way: as Lambda's proxy
//! response for routes, and as the result (2xx) or a function error for the rest.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use nimbus_core::{FunctionError, InvokeRequest, InvokeStatus, Trigger};
use nimbus_wasm::{App, Failure, Invocation, OutboundPolicy};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::pool::Pool;
use crate::{Inner, lock};

/// The loaded component of a pool, and when it last served.
#[derive(Default)]
pub(crate) struct WasmSlot {
    app: Mutex<Option<Loaded>>,
    /// One load at a time: requests arriving during a cold start wait for it.
    loading: tokio::sync::Mutex<()>,
}

/// What a request needs from a loaded version: made once per load, not per request.
#[derive(Clone)]
pub(crate) struct Loaded {
    app: App,
    /// The environment, as a process instance gets it at start-up (its log stream is
    /// named once, like an execution environment's).
    env: Arc<Vec<(String, String)>>,
    used: Instant,
}

impl WasmSlot {
    /// The loaded component, marked as used now.
    fn warm(&self) -> Option<Loaded> {
        let mut slot = lock(&self.app);
        let loaded = slot.as_mut()?;
        loaded.used = Instant::now();
        Some(loaded.clone())
    }

    /// Drops the component if unused for `idle`; true when it did.
    pub(crate) fn unload_idle(&self, idle: Duration) -> bool {
        let mut app = lock(&self.app);
        if app.as_ref().is_some_and(|l| l.used.elapsed() >= idle) {
            *app = None;
            return true;
        }
        false
    }

    /// Drops the component now (`nimbus evict`); true if one was loaded.
    pub(crate) fn unload(&self) -> bool {
        lock(&self.app).take().is_some()
    }

    pub(crate) fn is_loaded(&self) -> bool {
        lock(&self.app).is_some()
    }
}

impl Inner {
    /// The pool's component, loaded on first use. `Some(ms)` when this call loaded it.
    pub(crate) async fn wasm_app(&self, pool: &Pool) -> Result<(Loaded, Option<f64>), String> {
        if let Some(l) = pool.wasm.warm() {
            return Ok((l, None));
        }
        let _one = pool.wasm.loading.lock().await;
        if let Some(l) = pool.wasm.warm() {
            return Ok((l, None));
        }
        let started = Instant::now();
        let host = Arc::clone(&self.wasm);
        let path = pool.code_dir.join(&pool.config.handler);
        let app = if host.is_compiled(&path) {
            // Mapping a compiled file is a fraction of a millisecond: cheaper here than
            // the hand-off to a blocking thread and back, and it is the cold start.
            host.load(&path)
        } else {
            // Compiling (after a restart with an emptied cache) takes seconds.
            tokio::task::spawn_blocking(move || host.load(&path))
                .await
                .map_err(|e| format!("load task: {e}"))?
        }
        .map_err(|e| e.to_string())?;
        let loaded = Loaded {
            app,
            env: Arc::new(self.wasm_env(pool)),
            used: Instant::now(),
        };
        *lock(&pool.wasm.app) = Some(loaded.clone());
        Ok((loaded, Some(crate::ms(started.elapsed()))))
    }

    fn wasm_env(&self, pool: &Pool) -> Vec<(String, String)> {
        let mut env = crate::spawn::function_env(pool, "wasm");
        env.push(("AWS_REGION".into(), self.cfg.region.clone()));
        env.push(("AWS_DEFAULT_REGION".into(), self.cfg.region.clone()));
        env.push(("AWS_EXECUTION_ENV".into(), "nimbus_wasm".into()));
        env.push(("TZ".into(), "UTC".into()));
        if pool.config.wasm.files {
            env.push(("LAMBDA_TASK_ROOT".into(), nimbus_wasm::CODE_DIR.into()));
        }
        env
    }

    /// Runs one invocation of a wasm function; fills in `outcome`.
    pub(crate) async fn invoke_wasm(
        &self,
        pool: &Pool,
        req: &InvokeRequest,
        outcome: &mut nimbus_core::InvokeOutcome,
    ) -> Result<(), nimbus_core::InvokeError> {
        let loaded = match self.wasm_app(pool).await {
            Ok((loaded, loaded_ms)) => {
                outcome.cold_start = loaded_ms.is_some();
                outcome.init_duration_ms = loaded_ms;
                loaded
            }
            Err(msg) => {
                tracing::warn!(function = %pool.function, version = pool.version, error = %msg, "loading a wasm component failed");
                outcome.cold_start = true;
                outcome.status = InvokeStatus::SandboxFailed(msg);
                return Ok(());
            }
        };
        let http_event = req.trigger == Trigger::Http;
        let request = match to_request(req, http_event) {
            Ok(r) => r,
            Err(msg) => {
                return Err(nimbus_core::InvokeError::BadRequest(msg));
            }
        };
        let c = &pool.config;
        let started = Instant::now();
        let done = loaded
            .app
            .handle(Invocation {
                request,
                env: loaded.env,
                files: c.wasm.files.then(|| pool.code_dir.clone()),
                outbound: OutboundPolicy {
                    rules: Arc::clone(&pool.outbound),
                    allow_private: self.wasm.config().allow_private_outbound,
                },
                memory_bytes: u64::from(c.memory_mb) << 20,
                timeout: Duration::from_millis(c.timeout_ms),
                fuel: c.wasm.fuel,
                log_limit: self.cfg.log_limit,
                max_response_bytes: nimbus_core::MAX_PAYLOAD_BYTES,
            })
            .await;
        outcome.duration_ms = crate::ms(started.elapsed());
        outcome.logs = done.logs;
        outcome.peak_memory_bytes = Some(done.peak_memory_bytes);
        outcome.status = match done.result {
            Ok(resp) => from_response(resp, http_event),
            Err(Failure::Busy) => {
                return Err(nimbus_core::InvokeError::Throttled {
                    function: pool.function.clone(),
                    retry_after_s: 1,
                });
            }
            Err(f) => failure_status(f, c.wasm.fuel),
        };
        Ok(())
    }
}

fn failure_status(f: Failure, fuel: Option<u64>) -> InvokeStatus {
    match f {
        Failure::Timeout => InvokeStatus::Timeout,
        Failure::OutOfMemory => InvokeStatus::OutOfMemory,
        Failure::ResponseTooLarge => InvokeStatus::ResultTooLarge,
        Failure::OutOfFuel => InvokeStatus::Crashed(format!(
            "the component used up its fuel ([wasm] fuel = {})",
            fuel.unwrap_or(0)
        )),
        Failure::Trap(m) => InvokeStatus::Crashed(m),
        Failure::Busy => InvokeStatus::Crashed("no free instance slot".into()),
    }
}

/// The parts of an API Gateway payload-2.0 event that make up the request.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpEvent {
    version: String,
    raw_path: String,
    #[serde(default)]
    raw_query_string: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    cookies: Vec<String>,
    request_context: EventContext,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    is_base64_encoded: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventContext {
    http: EventHttp,
    #[serde(default)]
    request_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventHttp {
    method: String,
    #[serde(default)]
    source_ip: String,
}

fn to_request(req: &InvokeRequest, http_event: bool) -> Result<http::Request<Bytes>, String> {
    let event = if http_event {
        serde_json::from_slice::<HttpEvent>(&req.payload)
            .ok()
            .filter(|e| e.version == "2.0")
    } else {
        None
    };
    let Some(ev) = event else {
        let trigger = match req.trigger {
            Trigger::Api => "api",
            Trigger::Http => "http",
            Trigger::Event => "event",
            Trigger::Cron => "cron",
            Trigger::Hook => "hook",
        };
        return http::Request::post("/")
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-nimbus-trigger", trigger)
            .header("x-nimbus-request-id", req.request_id.as_str())
            .body(req.payload.clone())
            .map_err(|e| format!("build the request: {e}"));
    };
    let uri = if ev.raw_query_string.is_empty() {
        ev.raw_path.clone()
    } else {
        format!("{}?{}", ev.raw_path, ev.raw_query_string)
    };
    let body = match ev.body {
        None => Bytes::new(),
        Some(b) if ev.is_base64_encoded => Bytes::from(
            B64.decode(b.as_bytes())
                .map_err(|_| "the event's body is not valid base64".to_string())?,
        ),
        Some(b) => Bytes::from(b),
    };
    let mut builder = http::Request::builder()
        .method(ev.request_context.http.method.as_str())
        .uri(uri);
    let headers = builder
        .headers_mut()
        .ok_or("invalid method or path in the event")?;
    for (k, v) in &ev.headers {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) else {
            return Err(format!("the event has an invalid header `{k}`"));
        };
        headers.insert(name, value);
    }
    if !ev.cookies.is_empty()
        && let Ok(v) = http::HeaderValue::from_str(&ev.cookies.join("; "))
    {
        headers.insert(http::header::COOKIE, v);
    }
    if !headers.contains_key(http::header::HOST) {
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("localhost"),
        );
    }
    if !ev.request_context.http.source_ip.is_empty()
        && let Ok(v) = http::HeaderValue::from_str(&ev.request_context.http.source_ip)
    {
        headers.entry("x-forwarded-for").or_insert(v);
    }
    let rid = if ev.request_context.request_id.is_empty() {
        req.request_id.as_str()
    } else {
        ev.request_context.request_id.as_str()
    };
    if let Ok(v) = http::HeaderValue::from_str(rid) {
        headers.insert("x-nimbus-request-id", v);
    }
    builder
        .body(body)
        .map_err(|e| format!("the event does not describe a request: {e}"))
}

fn from_response(resp: http::Response<Bytes>, http_event: bool) -> InvokeStatus {
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    if !http_event {
        if !parts.status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
            return InvokeStatus::FunctionError(FunctionError {
                error_type: format!("HttpStatus{status}"),
                error_message: format!("the component answered {status}: {}", text.trim()),
                stack_trace: Vec::new(),
            });
        }
        // A JSON body is the result; anything else is handed back as a JSON string. The
        // same check as a process instance's result: a body no reader could decode
        // (invalid UTF-8 inside a string used to pass) never goes out as a success.
        match nimbus_core::result::check_result(&body) {
            Ok(()) => return InvokeStatus::Success(body),
            Err(why @ nimbus_core::result::InvalidResult::Nesting { .. }) => {
                return InvokeStatus::InvalidResult(why);
            }
            Err(_) => {}
        }
        let text = String::from_utf8_lossy(&body);
        return InvokeStatus::Success(Bytes::from(json!(text).to_string()));
    }
    let mut headers = serde_json::Map::new();
    let mut cookies = Vec::new();
    for (name, value) in &parts.headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if name == http::header::SET_COOKIE {
            cookies.push(Value::String(v));
            continue;
        }
        match headers.get_mut(name.as_str()) {
            Some(Value::String(s)) => {
                s.push(',');
                s.push_str(&v);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(v));
            }
        }
    }
    let textual = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(nimbus_core::routes::is_textual);
    let (body, b64) = match std::str::from_utf8(&body) {
        Ok(s) if textual => (s.to_string(), false),
        _ => (B64.encode(&body), true),
    };
    let mut out = json!({
        "statusCode": status,
        "headers": headers,
        "body": body,
        "isBase64Encoded": b64,
    });
    if !cookies.is_empty() {
        out["cookies"] = Value::Array(cookies);
    }
    InvokeStatus::Success(Bytes::from(out.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(trigger: Trigger, payload: Value) -> InvokeRequest {
        InvokeRequest {
            request_id: "rid-1".into(),
            function: "f".into(),
            target: nimbus_core::Target::default(),
            trigger,
            payload: Bytes::from(payload.to_string()),
            trace: None,
        }
    }

    #[test]
    fn a_route_event_becomes_its_request() {
        let ev = json!({
            "version": "2.0", "rawPath": "/a/b", "rawQueryString": "x=1&y=2",
            "headers": {"host": "api.test", "content-type": "application/octet-stream"},
            "cookies": ["s=1", "t=2"],
            "requestContext": {"http": {"method": "PUT", "sourceIp": "10.0.0.9"}, "requestId": "gw-1"},
            "body": B64.encode([0u8, 159, 146, 150]), "isBase64Encoded": true,
        });
        let r = to_request(&req(Trigger::Http, ev), true).expect("request");
        assert_eq!(r.method(), "PUT");
        assert_eq!(r.uri(), "/a/b?x=1&y=2");
        assert_eq!(r.headers()["host"], "api.test");
        assert_eq!(r.headers()["cookie"], "s=1; t=2");
        assert_eq!(r.headers()["x-forwarded-for"], "10.0.0.9");
        assert_eq!(r.headers()["x-nimbus-request-id"], "gw-1");
        assert_eq!(&r.body()[..], &[0u8, 159, 146, 150]);
    }

    #[test]
    fn other_events_are_posted_as_json() {
        let r = to_request(&req(Trigger::Event, json!({"id": 1})), false).expect("request");
        assert_eq!(r.method(), "POST");
        assert_eq!(r.uri(), "/");
        assert_eq!(r.headers()["x-nimbus-trigger"], "event");
        assert_eq!(&r.body()[..], br#"{"id":1}"#);
        // An HTTP-triggered payload that is not a route event (a WebSocket event) too.
        let r =
            to_request(&req(Trigger::Http, json!({"requestContext": {}})), true).expect("request");
        assert_eq!(r.method(), "POST");
    }

    #[test]
    fn responses_map_back() {
        let resp = http::Response::builder()
            .status(201)
            .header("content-type", "text/plain")
            .header("x-a", "1")
            .header("x-a", "2")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(Bytes::from_static(b"hi"))
            .expect("resp");
        let InvokeStatus::Success(out) = from_response(resp, true) else {
            panic!("status")
        };
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["statusCode"], 201);
        assert_eq!(v["headers"]["x-a"], "1,2");
        assert_eq!(v["cookies"], json!(["a=1", "b=2"]));
        assert_eq!(v["body"], "hi");
        assert_eq!(v["isBase64Encoded"], false);

        let ok = http::Response::new(Bytes::from_static(b"{\"n\":1}"));
        assert_eq!(
            from_response(ok, false),
            InvokeStatus::Success(Bytes::from_static(b"{\"n\":1}"))
        );
        let text = http::Response::new(Bytes::from_static(b"plain"));
        assert_eq!(
            from_response(text, false),
            InvokeStatus::Success(Bytes::from_static(b"\"plain\""))
        );
        let latin1 = http::Response::new(Bytes::from_static(b"\"caf\xe9\""));
        assert_eq!(
            from_response(latin1, false),
            InvokeStatus::Success(Bytes::from("\"\\\"caf\u{fffd}\\\"\"".to_string()))
        );
        let deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(matches!(
            from_response(http::Response::new(Bytes::from(deep)), false),
            InvokeStatus::InvalidResult(nimbus_core::result::InvalidResult::Nesting { .. })
        ));
        let bad = http::Response::builder()
            .status(503)
            .body(Bytes::from_static(b"down"))
            .expect("resp");
        let InvokeStatus::FunctionError(e) = from_response(bad, false) else {
            panic!("status")
        };
        assert_eq!(e.error_type, "HttpStatus503");
        assert!(e.error_message.contains("down"));
    }
}
