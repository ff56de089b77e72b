//! The host's end of an instance's control socket, registered with the reactor for
//! reads only.
//!
//! tokio's `UnixStream` always asks epoll for writability as well, and on Linux every
//! read the instance makes frees room in our send buffer and wakes whoever waits for
//! "writable" on this socket: a runtime thread, once per invocation, for nothing. Here
//! a write is a plain non-blocking `write`; only a frame bigger than the socket buffer
//! waits for room, through a registration for writability that lives as long as that
//! wait.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

pub(crate) struct Control {
    fd: AsyncFd<UnixStream>,
}

impl Control {
    pub fn new(stream: UnixStream) -> io::Result<Control> {
        stream.set_nonblocking(true)?;
        Ok(Control {
            fd: register(stream, Interest::READABLE)?,
        })
    }

    /// Writes all of `buf`. Cancel-safe only in the sense that matters here: a cancelled
    /// write (deadline) leaves the instance with a partial frame, and the caller kills it.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.fd.get_ref().write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let room = register(self.fd.get_ref().try_clone()?, Interest::WRITABLE)?;
                    let mut guard = room.writable().await?;
                    guard.clear_ready();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Control {
    /// Whether anything (a frame, or end-of-file) waits on an idle instance's channel.
    /// Between invocations nothing may: a frame there was written outside any
    /// invocation and would be taken for the next caller's answer. std has no stable
    /// `peek` on Unix sockets, so this is a non-blocking read of one byte; an instance
    /// for which it finds anything is discarded, so the byte is never missed.
    pub fn has_pending(&self) -> bool {
        let mut byte = [0u8; 1];
        loop {
            match self.fd.get_ref().read(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                _ => return true,
            }
        }
    }
}

/// tokio deprecated its safe constructors because an arbitrary `T` could hand out a
/// different or closed fd later; its replacement is `unsafe`, which this crate forbids.
/// A std `UnixStream` owns its fd for its whole life and never changes it, which is
/// exactly the contract the unsafe constructor asks for.
#[allow(deprecated)]
fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    AsyncFd::with_interest(stream, interest)
}

impl AsyncRead for Control {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn frames_bigger_than_the_socket_buffer_get_through() {
        let (host, peer) = UnixStream::pair().expect("pair");
        let ctl = Control::new(host).expect("control");
        let big = vec![7u8; 4 * 1024 * 1024];
        let reader = std::thread::spawn(move || {
            let mut peer = peer;
            let mut got = vec![0u8; 4 * 1024 * 1024];
            peer.read_exact(&mut got).expect("read");
            peer.write_all(b"ok").expect("answer");
            got
        });
        ctl.write_all(&big).await.expect("write");
        let mut ctl = ctl;
        let mut answer = [0u8; 2];
        ctl.read_exact(&mut answer).await.expect("answer");
        assert_eq!(&answer, b"ok");
        assert_eq!(reader.join().expect("join"), big);
    }

    #[tokio::test]
    async fn pending_sees_a_stray_frame_and_end_of_file_but_not_silence() {
        let (host, mut peer) = UnixStream::pair().expect("pair");
        let mut ctl = Control::new(host).expect("control");
        assert!(!ctl.has_pending());
        // A frame read in full, as after an invocation, leaves nothing behind.
        peer.write_all(b"S\0\0\0\x011").expect("write");
        let mut frame = [0u8; 6];
        ctl.read_exact(&mut frame).await.expect("read");
        assert!(!ctl.has_pending());
        peer.write_all(b"S").expect("write stray");
        assert!(ctl.has_pending());
        drop(peer);
        assert!(ctl.has_pending());
    }

    #[tokio::test]
    async fn a_closed_peer_reads_as_eof() {
        let (host, peer) = UnixStream::pair().expect("pair");
        let mut ctl = Control::new(host).expect("control");
        drop(peer);
        let mut b = [0u8; 1];
        assert_eq!(ctl.read(&mut b).await.expect("read"), 0);
    }
}
