//! The HTTP listener: hyper with the limits a public port needs, and graceful drain.
//!
//! `axum::serve` configures no timer, and hyper silently disables its header-read
//! timeout without one: a client sending a header byte now and then could hold a
//! connection (and a task) forever. Here every connection gets a deadline for its
//! request head (also before its first byte), a cap on header size and count, and the
//! listener stops accepting past `max_connections` (the backlog queues in the kernel
//! until a slot frees). A request with both Content-Length and Transfer-Encoding is
//! framed by the latter and its connection closed after the answer (hyper, RFC 9112
//! 6.1), so nothing can be smuggled behind it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use clap::Args;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower::util::Oneshot;

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
                    serve_io(&builder, watcher, stream, app, conn).await
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
                            serve_io(&builder, watcher, tls, app, conn).await;
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
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move_app(app, conn));
    // With upgrades: a WebSocket route takes the connection over after its 101.
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let _ = watcher.watch(conn.into_owned()).await;
}

/// The per-connection service: the router, with the peer address where axum's
/// `ConnectInfo` extractor looks for it, whether it is TLS, the verified client
/// certificate if any, and the connection's slot.
fn move_app(
    app: Router,
    conn: Conn,
) -> impl Fn(http::Request<Incoming>) -> Oneshot<Router, http::Request<axum::body::Body>> + Clone {
    move |mut req: http::Request<Incoming>| {
        let ext = req.extensions_mut();
        ext.insert(ConnectInfo(conn.peer));
        if conn.tls {
            ext.insert(nimbus_core::TlsConnection);
        }
        if let Some(c) = &conn.cert {
            ext.insert(c.clone());
        }
        ext.insert(conn.slot.clone());
        app.clone().oneshot(req.map(axum::body::Body::new))
    }
}
