//! A guest's stdout and stderr, captured into one capped buffer as the function's logs.
//!
//! Past the cap, output is dropped and a marker says so, as for process functions. The
//! guest never sees an error: Rust's `println!` panics when a write fails, and a function
//! must not crash because it logged a lot.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::lock;

#[derive(Clone)]
pub(crate) struct LogPipe {
    inner: Arc<Mutex<Buf>>,
}

struct Buf {
    bytes: Vec<u8>,
    limit: usize,
    dropped: bool,
}

impl LogPipe {
    pub(crate) fn new(limit: usize) -> LogPipe {
        LogPipe {
            inner: Arc::new(Mutex::new(Buf {
                bytes: Vec::new(),
                limit,
                dropped: false,
            })),
        }
    }

    fn push(&self, data: &[u8]) {
        let mut b = lock(&self.inner);
        let room = b.limit.saturating_sub(b.bytes.len());
        if data.len() > room {
            b.dropped = true;
        }
        let take = data.len().min(room);
        b.bytes.extend_from_slice(&data[..take]);
    }

    /// What was captured, with the marker if output was dropped.
    pub(crate) fn take(&self) -> String {
        let mut b = lock(&self.inner);
        let mut s = String::from_utf8_lossy(&std::mem::take(&mut b.bytes)).into_owned();
        if b.dropped {
            if !s.ends_with('\n') && !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&format!(
                "[nimbus: log output truncated at {} bytes]\n",
                b.limit
            ));
        }
        s
    }
}

impl IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogPipe {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    // A direct stream: the default adapter spawns a task per stream, per request.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_is_dropped_with_a_marker() {
        let mut p = LogPipe::new(10);
        p.write(Bytes::from_static(b"hello\n")).expect("write");
        p.write(Bytes::from_static(b"world, long line\n"))
            .expect("never fails");
        let s = p.take();
        assert!(s.starts_with("hello\nworl"), "{s}");
        assert!(s.contains("truncated at 10 bytes"), "{s}");
    }
}
