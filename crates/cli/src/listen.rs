//! The HTTP listener: hyper with the limits a public port needs, and graceful drain.
//!
//! `axum::serve` configures no timer, and hyper silently disables its header-read
//! timeout without one: a client sending a header byte now and then could hold a
//! connection (and a task) forever. Here every connection gets a deadline for its
//! request head (also before its first byte), a cap on header size and count, and the
//! listener stops accepting past `max_connections` (the backlog queues in the kernel
//! until a slot frees). A request with both Content-Length and Transfer-Encoding is
//! framed by the latter and its connection closed after the answer (hyper, RFC 9112
//! 6.1), so nothing can be smuggled behind it; requests with ambiguous hosts or
//! framing are refused before routing (`framing`). Each request body has a deadline
//! (`body`): past it the answer is 408 and the connection closes. Failed
//! authentications are counted per client address (`throttle`), and a client past the
//! limit is told so on its requests, so every credential check answers 429.

mod body;
mod framing;
mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use clap::Args;
use http::{HeaderValue, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use nimbus_core::api::ErrorBody;
use nimbus_core::body::AuthOutcome;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

#[derive(Args, Clone, Debug)]
pub struct LimitsArgs {
    /// Time a client has to send a request's head (request line and headers).
    #[arg(long, env = "NIMBUS_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_secs)]
    pub header_timeout: Duration,
    /// Largest request head, in bytes.
    #[arg(long, env = "NIMBUS_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Most headers in one request.
    #[arg(long, env = "NIMBUS_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,
    /// Most connections open at once; more wait in the kernel's accept queue.
    #[arg(long, env = "NIMBUS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Time a client has to send a request body once it is read, before 408...
    #[arg(long, env = "NIMBUS_BODY_TIMEOUT", default_value = "20s", value_parser = parse_secs)]
    pub body_timeout: Duration,
    /// ...extended by one second per this many bytes received (bytes per second).
    #[arg(long, env = "NIMBUS_BODY_MIN_RATE", default_value_t = 1024)]
    pub body_min_rate: u64,
    /// The longest any request body may take, however fast it arrives.
    #[arg(long, env = "NIMBUS_BODY_MAX_TIME", default_value = "10m", value_parser = parse_secs)]
    pub body_max_time: Duration,
    /// Longest request target (path and query), in bytes; longer ones get 414.
    #[arg(long, env = "NIMBUS_MAX_URI_BYTES", default_value_t = 8 * 1024)]
    pub max_uri_bytes: usize,
    /// Failed authentications one client address may make (N/s, N/m or N/h, :BURST)
    /// before its credential checks answer 429.
    #[arg(long, env = "NIMBUS_AUTH_FAILURE_RATE", default_value = "10/m:30", value_parser = nimbus_core::keys::parse_rate)]
    pub auth_failure_rate: nimbus_core::keys::Rate,
    /// How long in-flight requests get to finish at shutdown.
    #[arg(long, env = "NIMBUS_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_secs)]
    pub drain_timeout: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    nimbus_core::duration::parse_duration(s)
}

/// Serves `app` until `shutdown` resolves, then drains open connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &LimitsArgs,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let guard = Arc::new(Guard::new(limits));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p?,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let guard = Arc::clone(&guard);
        let first_byte = limits.header_timeout;
        // Shared with any WebSocket this connection upgrades to (see ConnectionSlot).
        let permit = Arc::new(permit);
        tokio::spawn(async move {
            // hyper's header timer starts once protocol detection has read something:
            // a client that connects and sends nothing would otherwise never time out.
            // (`readable()` is no use here: it may report ready spuriously.)
            let mut probe = [0u8; 1];
            if !matches!(
                tokio::time::timeout(first_byte, stream.peek(&mut probe)).await,
                Ok(Ok(1..))
            ) {
                drop(permit);
                return;
            }
            let slot = nimbus_core::ConnectionSlot(Arc::clone(&permit) as _);
            match tls {
                None => {
                    let conn = Conn {
                        peer,
                        cert: None,
                        tls: false,
                        slot,
                    };
                    serve_io(&builder, watcher, stream, app, conn, guard).await
                }
                // The handshake gets the same deadline as a request head.
                Some(acceptor) => {
                    match tokio::time::timeout(first_byte, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let cert = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| crate::tls::describe(c));
                            let conn = Conn {
                                peer,
                                cert,
                                tls: true,
                                slot,
                            };
                            serve_io(&builder, watcher, tls, app, conn, guard).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!("drain timeout: closing connections with requests in flight");
        }
    }
    Ok(())
}

/// What the listener knows about a connection, attached to each of its requests.
#[derive(Clone)]
struct Conn {
    peer: SocketAddr,
    /// The verified client certificate, if any.
    cert: Option<nimbus_core::ClientCert>,
    tls: bool,
    slot: nimbus_core::ConnectionSlot,
}

async fn serve_io<I>(
    builder: &Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    app: Router,
    conn: Conn,
    guard: Arc<Guard>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        handle(app.clone(), conn.clone(), Arc::clone(&guard), req)
    });
    // With upgrades: a WebSocket route takes the connection over after its 101.
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let _ = watcher.watch(conn.into_owned()).await;
}

/// What every request of a listener is held to.
struct Guard {
    body: body::BodyDeadline,
    max_uri: usize,
    throttle: throttle::AuthThrottle,
}

impl Guard {
    fn new(limits: &LimitsArgs) -> Guard {
        Guard {
            body: body::BodyDeadline {
                timeout: limits.body_timeout,
                min_rate: limits.body_min_rate,
                max_time: limits.body_max_time.max(limits.body_timeout),
            },
            max_uri: limits.max_uri_bytes,
            throttle: throttle::AuthThrottle::new(limits.auth_failure_rate),
        }
    }
}

/// One request: refused here if its head is ambiguous, otherwise handed to the router
/// with what the listener knows (the peer address where axum's `ConnectInfo` looks for
/// it, TLS, the verified client certificate, the connection's slot, whether the
/// client is throttled for failed authentications) and its body on a deadline.
async fn handle(
    app: Router,
    conn: Conn,
    guard: Arc<Guard>,
    mut req: http::Request<Incoming>,
) -> Result<Response, std::convert::Infallible> {
    let http1 = req.version() < http::Version::HTTP_2;
    if let Err(refusal) = framing::check(&req, guard.max_uri) {
        tracing::debug!(peer = %conn.peer, ?refusal, "request refused before routing");
        let resp = error(refusal.status(), refusal.code(), refusal.message());
        return Ok(closing(resp, http1));
    }
    let ip = conn.peer.ip();
    let ext = req.extensions_mut();
    ext.insert(ConnectInfo(conn.peer));
    if conn.tls {
        ext.insert(nimbus_core::TlsConnection);
    }
    if let Some(c) = &conn.cert {
        ext.insert(c.clone());
    }
    ext.insert(conn.slot.clone());
    if let Some(throttled) = guard.throttle.check(ip, Instant::now()) {
        ext.insert(throttled);
    }
    let (parts, incoming) = req.into_parts();
    let (timed, expired) = body::TimedBody::new(incoming, guard.body);
    let req = http::Request::from_parts(parts, axum::body::Body::new(timed));
    let resp = app.oneshot(req).await?;
    match resp.extensions().get::<AuthOutcome>() {
        Some(AuthOutcome::Failed) => {
            guard.throttle.fail(ip, Instant::now());
            metrics::counter!("nimbus_auth_failures_total").increment(1);
        }
        Some(AuthOutcome::Throttled) => {
            metrics::counter!("nimbus_auth_throttled_total").increment(1);
        }
        None => {}
    }
    // Whatever the handler made of the cut-off body (a 400, a 502 from an upstream
    // that got half of it), the client was too slow: it gets 408 and no second request.
    if expired.load(Ordering::Relaxed) {
        tracing::debug!(peer = %conn.peer, "request body timed out");
        metrics::counter!("nimbus_body_timeouts_total").increment(1);
        let resp = error(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        );
        return Ok(closing(resp, http1));
    }
    Ok(resp)
}

/// The JSON error body every nimbus surface answers with.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::to_vec(&ErrorBody::new(code, message)).unwrap_or_default();
    let mut resp = Response::new(axum::body::Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Ends the connection after this answer (HTTP/2 has no such header: hyper resets
/// only the stream, and the connection stays sound there).
fn closing(mut resp: Response, http1: bool) -> Response {
    if http1 {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
