//! The one request-body reader every handler uses, and the markers the listener and
//! the handlers exchange about a request (its body deadline, its client's failed
//! authentications).
//!
//! The reader refuses a declared length over the limit before reading a byte (so a
//! `Content-Length: 10737418240` costs nothing), stops counting at the limit whatever
//! the framing, and names a body the listener cut off for being too slow (408) apart
//! from one that could not be read (400).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

/// Why a request body was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// Declared or sent, the body is larger than `limit` bytes (413).
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    /// The client did not send it within the listener's body deadline (408).
    #[error("the request body did not arrive in time")]
    TimedOut,
    /// The connection failed or the framing was broken mid-body (400).
    #[error("could not read the request body")]
    Read,
}

impl BodyError {
    /// The HTTP status this refusal answers with.
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge { .. } => 413,
            BodyError::TimedOut => 408,
            BodyError::Read => 400,
        }
    }

    /// The JSON error code of that answer.
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::TooLarge { .. } => "payload_too_large",
            BodyError::TimedOut => "request_timeout",
            BodyError::Read => "bad_request",
        }
    }

    /// Classifies an error a body yielded: the listener's deadline is [`BodyTimeout`]
    /// somewhere in the chain (axum and hyper box it on the way).
    pub fn from_body_error(e: &(dyn std::error::Error + 'static)) -> BodyError {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if err.is::<BodyTimeout>() {
                return BodyError::TimedOut;
            }
            cur = err.source();
        }
        BodyError::Read
    }
}

/// The error the listener's body yields once its deadline has passed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request body timed out")]
pub struct BodyTimeout;

/// Refuses a body whose declared length (Content-Length, seen as the size hint) is
/// over `limit`, before anything is read. For handlers that stream the body.
pub fn check_declared<B: Body>(body: &B, limit: u64) -> Result<(), BodyError> {
    if body.size_hint().lower() > limit {
        return Err(BodyError::TooLarge { limit });
    }
    Ok(())
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = u64::try_from(limit).unwrap_or(u64::MAX);
    check_declared(&body, max)?;
    let mut body = std::pin::pin!(body);
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
            BodyError::from_body_error(&*e)
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing a handler reads
        };
        if out.len().saturating_add(data.len()) > limit {
            return Err(BodyError::TooLarge { limit: max });
        }
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

/// Set by the listener on the requests of a client address that failed
/// authentication too often: every credential check answers 429 with `Retry-After`
/// instead of looking at the credential, so guessing gains nothing, not even the
/// knowledge that a guess was right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthThrottled {
    pub retry_after: Duration,
}

impl AuthThrottled {
    /// `Retry-After` in whole seconds, never 0.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// Put by a credential check on its refusal, so the listener can count failures per
/// client address (and show them in `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// A missing or wrong credential (401).
    Failed,
    /// Refused unchecked because of [`AuthThrottled`] (429).
    Throttled,
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        // The bodies here are always ready: one poll with a no-op waker is enough.
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("body not ready"),
        }
    }

    /// A body of ready frames (or errors) that declares `declared` bytes.
    struct Frames {
        frames: VecDeque<Result<Bytes, BoxError>>,
        declared: Option<u64>,
    }

    fn frames(chunks: &[&'static [u8]], declared: Option<u64>) -> Frames {
        Frames {
            frames: chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect(),
            declared,
        }
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            if self.declared.is_some_and(|d| d > 1 << 30) {
                panic!("read a body whose declared length was over the limit")
            }
            Poll::Ready(
                self.frames
                    .pop_front()
                    .map(|f| f.map(http_body::Frame::data)),
            )
        }
        fn size_hint(&self) -> http_body::SizeHint {
            match self.declared {
                Some(n) => http_body::SizeHint::with_exact(n),
                None => http_body::SizeHint::default(),
            }
        }
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let huge = frames(&[b"x"], Some(10 * 1024 * 1024 * 1024));
        assert_eq!(
            block_on(read_body(huge, 1024)),
            Err(BodyError::TooLarge { limit: 1024 })
        );
        let over = frames(&[], Some(1025));
        assert_eq!(
            check_declared(&over, 1024).map_err(|e| e.status()),
            Err(413)
        );
        assert!(check_declared(&frames(&[], Some(1024)), 1024).is_ok());
    }

    #[test]
    fn a_body_at_the_limit_is_read_and_one_byte_more_is_not() {
        let ok = block_on(read_body(frames(&[b"0123456789", b"abcdef"], None), 16));
        assert_eq!(ok.map(|b| b.len()), Ok(16));
        // Without a declared length the chunks are counted as they come.
        let over = frames(&[b"0123456789", b"abcdefg"], None);
        assert_eq!(
            block_on(read_body(over, 16)),
            Err(BodyError::TooLarge { limit: 16 })
        );
    }

    #[test]
    fn the_listener_deadline_is_408_wherever_it_sits_in_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] BodyTimeout);
        assert_eq!(
            BodyError::from_body_error(&Wrapped(BodyTimeout)),
            BodyError::TimedOut
        );
        assert_eq!(BodyError::from_body_error(&BodyTimeout).status(), 408);
        let other = std::io::Error::other("reset");
        assert_eq!(BodyError::from_body_error(&other), BodyError::Read);
        let mut cut = frames(&[b"{"], Some(1000));
        cut.frames.push_back(Err(Box::new(BodyTimeout)));
        assert_eq!(block_on(read_body(cut, 4096)), Err(BodyError::TimedOut));
        let mut reset = frames(&[b"{"], Some(1000));
        reset.frames.push_back(Err(Box::new(other)));
        assert_eq!(block_on(read_body(reset, 4096)), Err(BodyError::Read));
    }

    #[test]
    fn retry_after_is_whole_seconds_and_never_zero() {
        let t = |ms| {
            AuthThrottled {
                retry_after: Duration::from_millis(ms),
            }
            .retry_after_secs()
        };
        assert_eq!((t(0), t(1), t(1000), t(1001)), (1, 1, 1, 2));
    }
}
