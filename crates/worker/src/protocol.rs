//! The host side of the instance frame protocol (docs/runtime-protocol.md).
//!
//! A frame is one type byte, a big-endian u32 length and that many payload bytes.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest frame the host accepts: the payload limit plus room for the envelope.
pub const MAX_FRAME: usize = nimbus_core::MAX_PAYLOAD_BYTES + 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ready,
    InitFailed,
    SandboxFailed,
    Invoke,
    Assign,
    Success,
    Error,
}

impl Kind {
    pub fn byte(self) -> u8 {
        match self {
            Kind::Ready => b'R',
            Kind::InitFailed => b'F',
            Kind::SandboxFailed => b'X',
            Kind::Invoke => b'I',
            Kind::Assign => b'A',
            Kind::Success => b'S',
            Kind::Error => b'E',
        }
    }

    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            b'R' => Kind::Ready,
            b'F' => Kind::InitFailed,
            b'X' => Kind::SandboxFailed,
            b'I' => Kind::Invoke,
            b'A' => Kind::Assign,
            b'S' => Kind::Success,
            b'E' => Kind::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("instance closed its control channel")]
    Closed,
    #[error("unknown frame type {0:#04x}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("read frame: {0}")]
    Io(String),
}

pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind.byte());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads one frame. Not cancel-safe: keep the future alive until it finishes.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Err(FrameError::Closed);
        }
        Err(e) => return Err(FrameError::Io(e.to_string())),
    }
    let kind = Kind::from_byte(head[0]).ok_or(FrameError::UnknownKind(head[0]))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e.to_string())
        }
    })?;
    Ok(Frame {
        kind,
        payload: Bytes::from(payload),
    })
}

/// What a tagged instance announces in its `R` frame (docs/runtime-protocol.md).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// Its `S` and `E` payloads begin with the invocation's request id and a newline.
    #[serde(default)]
    pub tagged_results: bool,
    /// A stem cell's first `R`, before it has a function: it answers no invocation yet,
    /// so it need not announce tags (the `R` after its `A` must).
    #[serde(default)]
    pub stem: bool,
}

impl Ready {
    /// A payload that is not the object we know reads as an untagged instance, which
    /// the host refuses to invoke.
    pub fn parse(payload: &[u8]) -> Ready {
        serde_json::from_slice(payload).unwrap_or_default()
    }
}

/// The payload of a tagged result frame once its tag has been checked against the
/// invocation in flight; `None` if it carries no tag or another invocation's.
/// A prefix compare and a slice: the result itself is not looked at.
pub fn untag(payload: &Bytes, request_id: &str) -> Option<Bytes> {
    let id = request_id.as_bytes();
    let rest = payload.strip_prefix(id)?.strip_prefix(b"\n")?;
    Some(payload.slice(payload.len() - rest.len()..))
}

/// Builds an `I` frame around an event that is already valid JSON, without re-encoding it.
pub fn invoke_frame(
    request_id: &str,
    deadline_ms: u64,
    arn: &str,
    trace: Option<&str>,
    event: &[u8],
) -> Vec<u8> {
    let mut head = serde_json::json!({
        "requestId": request_id,
        "deadlineMs": deadline_ms,
        "invokedFunctionArn": arn,
    });
    if let Some(t) = trace {
        head["traceId"] = serde_json::Value::from(t);
    }
    let head = head.to_string();
    // head is `{...}`: splice `,"event":<event>}` in place of its closing brace.
    let mut body = Vec::with_capacity(head.len() + event.len() + 16);
    body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    body.extend_from_slice(b",\"event\":");
    body.extend_from_slice(if event.is_empty() { b"null" } else { event });
    body.push(b'}');
    encode(Kind::Invoke, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_frames_split_and_joined() {
        let mut wire = encode(Kind::Success, b"{\"a\":1}");
        wire.extend(encode(Kind::Ready, b"{}"));
        let mut r = &wire[..];
        let f = read_frame(&mut r).await.expect("frame");
        assert_eq!(f.kind, Kind::Success);
        assert_eq!(&f.payload[..], b"{\"a\":1}");
        assert_eq!(read_frame(&mut r).await.expect("frame").kind, Kind::Ready);
        assert_eq!(read_frame(&mut r).await, Err(FrameError::Closed));
    }

    #[tokio::test]
    async fn rejects_unknown_kind_oversize_and_truncation() {
        let mut r = &b"Q\0\0\0\0"[..];
        assert_eq!(read_frame(&mut r).await, Err(FrameError::UnknownKind(b'Q')));
        let mut big = vec![b'S'];
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut r = &big[..];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(FrameError::TooLarge(_))
        ));
        let mut cut = encode(Kind::Success, b"12345");
        cut.truncate(7);
        let mut r = &cut[..];
        assert_eq!(read_frame(&mut r).await, Err(FrameError::Closed));
    }

    #[test]
    fn untag_accepts_only_the_invocation_in_flight() {
        let id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        let tagged = Bytes::from(format!("{id}\n{{\"n\":1}}"));
        assert_eq!(untag(&tagged, id).as_deref(), Some(&b"{\"n\":1}"[..]));
        // An empty result after the tag is the host's problem to judge, not a mismatch.
        assert_eq!(
            untag(&Bytes::from(format!("{id}\n")), id).as_deref(),
            Some(&b""[..])
        );
        let other = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c";
        assert_eq!(untag(&tagged, other), None);
        // Untagged, a prefix of the id, the id without its newline, the id inside.
        for bad in [
            "{\"n\":1}".to_string(),
            format!("{}\n1", &id[..10]),
            format!("{id}1"),
            format!("x{id}\n1"),
            String::new(),
        ] {
            assert_eq!(untag(&Bytes::from(bad.clone()), id), None, "{bad}");
        }
    }

    #[test]
    fn ready_announces_tags_and_old_shims_read_as_untagged() {
        assert!(Ready::parse(br#"{"runtime":"python 3.12","taggedResults":true}"#).tagged_results);
        for old in [
            &b"{}"[..],
            b"",
            b"not json",
            b"[1]",
            br#"{"taggedResults":"yes"}"#,
        ] {
            assert!(!Ready::parse(old).tagged_results);
        }
    }

    #[test]
    fn invoke_frame_embeds_event_verbatim() {
        let f = invoke_frame("r1", 42, "arn", Some("00-t"), br#"{"x":[1,2]}"#);
        assert_eq!(f[0], b'I');
        let v: serde_json::Value = serde_json::from_slice(&f[5..]).expect("json");
        assert_eq!(v["requestId"], "r1");
        assert_eq!(v["deadlineMs"], 42);
        assert_eq!(v["event"]["x"][1], 2);
        assert_eq!(v["traceId"], "00-t");
        let f = invoke_frame("r1", 42, "arn", None, b"");
        let v: serde_json::Value = serde_json::from_slice(&f[5..]).expect("json");
        assert!(v["event"].is_null());
        assert!(v.get("traceId").is_none());
    }
}
