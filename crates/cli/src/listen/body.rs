//! The request body's deadline, like Apache's `mod_reqtimeout` (nginx's
//! `client_body_timeout` counts only pauses, so a byte every 59 s passes there).
//!
//! A body gets `timeout` from the moment a handler first asks for it, plus one second
//! for every `min_rate` bytes that arrive, and never more than `max_time` in all. So a
//! silent client is cut off after `timeout`, a trickle slower than `min_rate` soon
//! after, while a large upload at any reasonable speed keeps earning time. Past the
//! deadline the body yields [`BodyTimeout`], which the shared reader reports as 408 and
//! the listener turns into 408 and a closed connection whatever the handler made of it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, SizeHint};
use nimbus_core::body::BodyTimeout;
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a request body may take.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline {
    pub timeout: Duration,
    /// Bytes per second that earn one more second (0: none do).
    pub min_rate: u64,
    pub max_time: Duration,
}

impl BodyDeadline {
    /// Time allowed for a body of which `received` bytes have arrived so far.
    fn allowance(&self, received: u64) -> Duration {
        let earned = match self.min_rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(received as f64 / rate as f64),
        };
        self.timeout.saturating_add(earned).min(self.max_time)
    }
}

/// A request body with its deadline; `expired` tells the listener it passed.
pub struct TimedBody<B> {
    inner: B,
    deadline: BodyDeadline,
    /// Set on the first poll: until a handler reads, the client is not keeping anyone
    /// waiting (and an unread body is dropped with its connection after the answer).
    timer: Option<(Instant, Pin<Box<Sleep>>)>,
    received: u64,
    expired: Arc<AtomicBool>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, deadline: BodyDeadline) -> (Self, Arc<AtomicBool>) {
        let expired = Arc::new(AtomicBool::new(false));
        let body = TimedBody {
            inner,
            deadline,
            timer: None,
            received: 0,
            expired: Arc::clone(&expired),
        };
        (body, expired)
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.expired.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        let allowance = this.deadline.allowance(this.received);
        let (started, sleep) = this.timer.get_or_insert_with(|| {
            let now = Instant::now();
            (now, Box::pin(tokio::time::sleep_until(now + allowance)))
        });
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                    let at = *started + this.deadline.allowance(this.received);
                    sleep.as_mut().reset(at);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.expired.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(Box::new(BodyTimeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    // The declared length passes through: readers refuse an oversized one at once.
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::body::{BodyError, read_body};

    // Real time, scaled down: the runtime's paused clock needs a feature we lack.
    const DEADLINE: BodyDeadline = BodyDeadline {
        timeout: Duration::from_millis(400),
        min_rate: 1000,
        max_time: Duration::from_secs(2),
    };

    /// A body fed by the test, one chunk at a time.
    struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
        }
    }

    /// Sends `chunk` every `every` until the body is dropped.
    fn feed(chunk: &'static [u8], every: Duration, times: usize) -> Fed {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for _ in 0..times {
                if tx.send(Bytes::from_static(chunk)).await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
            // Then silence, with the body still open.
            tx.closed().await;
        });
        Fed(rx)
    }

    #[test]
    fn allowance_grows_with_what_arrived_up_to_the_cap() {
        assert_eq!(DEADLINE.allowance(0), Duration::from_millis(400));
        assert_eq!(DEADLINE.allowance(300), Duration::from_millis(700));
        assert_eq!(DEADLINE.allowance(1 << 30), Duration::from_secs(2));
        let no_rate = BodyDeadline {
            min_rate: 0,
            ..DEADLINE
        };
        assert_eq!(no_rate.allowance(1 << 30), Duration::from_millis(400));
    }

    #[tokio::test]
    async fn a_silent_body_times_out_and_says_so() {
        let (body, expired) = TimedBody::new(feed(b"{", Duration::ZERO, 1), DEADLINE);
        let started = Instant::now();
        assert_eq!(read_body(body, 4096).await, Err(BodyError::TimedOut));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        assert!(expired.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_trickle_below_the_rate_times_out() {
        let trickle = feed(b"x", Duration::from_millis(50), 1000);
        let (body, expired) = TimedBody::new(trickle, DEADLINE);
        let started = Instant::now();
        assert_eq!(read_body(body, 1 << 20).await, Err(BodyError::TimedOut));
        assert!(started.elapsed() < Duration::from_millis(1500));
        assert!(expired.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_slow_body_faster_than_the_rate_is_read_whole() {
        // 1000 bytes over 600 ms: longer than `timeout` alone would allow for the
        // whole, but each 100-byte chunk earns 100 ms and arrives every 60.
        let (body, expired) =
            TimedBody::new(feed(&[b'a'; 100], Duration::from_millis(60), 10), DEADLINE);
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            let mut body = std::pin::pin!(body);
            let mut n = 0;
            while n < 1000 {
                match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                    Some(Ok(f)) => n += f.data_ref().map_or(0, |d| d.len()),
                    other => panic!("{:?}", other.map(|r| r.map(|_| ()))),
                }
            }
            n
        })
        .await;
        assert_eq!(got.ok(), Some(1000));
        assert!(!expired.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn the_cap_holds_whatever_the_rate() {
        let fast = feed(&[b'a'; 1000], Duration::from_millis(100), 1000);
        let (body, _) = TimedBody::new(fast, DEADLINE);
        let started = Instant::now();
        assert_eq!(read_body(body, 1 << 30).await, Err(BodyError::TimedOut));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }
}
