//! hyper-floor: the smallest honest HTTP server on this machine, the baseline that
//! `bench/run.py` puts next to nimbus's gateway figures.
//!
//! tokio multi-thread runtime (as `nimbus serve` uses), hyper 1.x HTTP/1.1 with
//! keep-alive, one tiny JSON body for every request. Anything nimbus spends per request
//! above this is the platform's own cost. It listens on loopback only, prints
//! `listening on http://ADDR` once bound, and exits on SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// About the size of the hello examples' answer, so bodies cost the same on the wire.
const BODY: &[u8] = br#"{"message":"hello ada"}"#;

fn main() -> anyhow::Result<()> {
    let listen = parse_listen(std::env::args().skip(1))?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?
        .block_on(serve(listen))
}

/// `[--listen ADDR]`, loopback only: a benchmark server has no business elsewhere.
fn parse_listen(mut args: impl Iterator<Item = String>) -> anyhow::Result<SocketAddr> {
    let mut listen: SocketAddr = "127.0.0.1:0".parse().context("default address")?;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                let v = args.next().context("--listen needs ADDR")?;
                listen = v.parse().with_context(|| format!("parse address {v:?}"))?;
            }
            "-h" | "--help" => {
                println!("usage: hyper-floor [--listen 127.0.0.1:PORT]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (usage: hyper-floor [--listen ADDR])"),
        }
    }
    if !listen.ip().is_loopback() {
        bail!("refusing to listen on {listen}: loopback addresses only");
    }
    Ok(listen)
}

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    let addr = listener.local_addr().context("read bound address")?;
    println!("listening on http://{addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    accept_loop(listener, shutdown).await;
    Ok(())
}

async fn accept_loop(listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                // Out of descriptors and the like: keep serving the connections we have.
                Err(e) => { eprintln!("accept: {e}"); continue; }
            },
            () = &mut shutdown => return,
        };
        // Latency figures must not include Nagle's delay.
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // A client hanging up mid-request is normal at the end of a run.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> impl Iterator<Item = String> {
        a.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn listens_on_a_free_loopback_port_by_default() {
        let a = parse_listen(args(&[])).expect("default");
        assert!(a.ip().is_loopback());
        assert_eq!(a.port(), 0);
    }

    #[test]
    fn refuses_non_loopback_and_junk() {
        assert!(parse_listen(args(&["--listen", "0.0.0.0:80"])).is_err());
        assert!(parse_listen(args(&["--listen", "nope"])).is_err());
        assert!(parse_listen(args(&["--listen"])).is_err());
        assert!(parse_listen(args(&["--bogus"])).is_err());
        let a = parse_listen(args(&["--listen", "127.0.0.1:8181"])).expect("loopback");
        assert_eq!(a.port(), 8181);
    }

    #[tokio::test]
    async fn serves_json_on_one_kept_alive_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(accept_loop(listener, async {
            let _ = stopped.await;
        }));
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n";
        let mut seen = String::new();
        for _ in 0..2 {
            c.write_all(req).await.expect("write");
            let mut buf = vec![0u8; 4096];
            // Both answers come back on the same socket: keep-alive works.
            while !seen.ends_with("hello ada\"}") {
                let n = c.read(&mut buf).await.expect("read");
                assert!(n > 0, "server closed the kept-alive connection");
                seen.push_str(std::str::from_utf8(&buf[..n]).expect("utf8"));
            }
            seen.push('|');
        }
        assert_eq!(seen.matches("HTTP/1.1 200 OK").count(), 2, "{seen}");
        assert!(seen.contains("content-type: application/json"), "{seen}");
        let _ = stop.send(());
        server.await.expect("server task ends on shutdown");
    }
}
