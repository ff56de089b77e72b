//! CloudEvents 1.0 as producers send them: structured JSON, a batch
//! (`application/cloudevents-batch+json`), or binary HTTP mode (`ce-*` headers and the
//! body as data). Parsing and validation use `cloudevents-sdk`; what is stored is the
//! event in structured JSON, re-serialized by the SDK, so every consumer sees one form.
//!
//! The partition key (ordering) is the CloudEvents Partitioning extension,
//! `partitionkey`. No I/O here.

use cloudevents::{AttributesReader, AttributesWriter, Event};
use serde_json::Value;

/// Largest event accepted, in its structured JSON form (the async invoke limit of
/// Lambda is 1 MB; EventBridge's 256 KB is too small for many payloads).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Most events in one batch request.
pub const MAX_BATCH: usize = 10_000;
/// The CloudEvents Partitioning extension attribute.
pub const PARTITION_KEY: &str = "partitionkey";

/// A validated event, ready to store.
#[derive(Debug, Clone)]
pub struct ParsedEvent {
    pub id: String,
    pub key: Option<String>,
    /// Structured JSON.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("{0}")]
    Invalid(String),
    #[error("event {index}: {message}")]
    InBatch { index: usize, message: String },
}

fn invalid(m: impl Into<String>) -> EventError {
    EventError::Invalid(m.into())
}

/// Extension names: lower-case letters and digits, at most 20 (CloudEvents 1.0 §3.1.1).
fn valid_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Checks what the SDK leaves to us, stamps `time` when the producer gave none (as
/// EventBridge does), and serializes.
fn finish(mut event: Event, now_ms: i64) -> Result<ParsedEvent, EventError> {
    if event.id().is_empty() {
        return Err(invalid("`id` must not be empty"));
    }
    if event.source().is_empty() {
        return Err(invalid("`source` must not be empty"));
    }
    if event.ty().is_empty() {
        return Err(invalid("`type` must not be empty"));
    }
    if let Some((bad, _)) = event
        .iter_extensions()
        .find(|(n, _)| !valid_attribute_name(n))
    {
        return Err(invalid(format!(
            "extension `{bad}`: attribute names are 1-20 lower-case letters or digits"
        )));
    }
    if event.time().is_none()
        && let Some(t) = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now_ms)
    {
        event.set_time(Some(t));
    }
    let key = event
        .extension(PARTITION_KEY)
        .map(|v| v.to_string())
        .filter(|k| !k.is_empty());
    let body = serde_json::to_vec(&event).map_err(|e| invalid(e.to_string()))?;
    if body.len() > MAX_EVENT_BYTES {
        return Err(invalid(format!(
            "the event is {} bytes; at most {MAX_EVENT_BYTES}",
            body.len()
        )));
    }
    Ok(ParsedEvent {
        id: event.id().to_string(),
        key,
        body,
    })
}

fn from_value(v: Value, now_ms: i64) -> Result<ParsedEvent, EventError> {
    if !v.is_object() {
        return Err(invalid("an event is a JSON object"));
    }
    match v.get("specversion").and_then(Value::as_str) {
        Some("1.0") => {}
        Some(other) => {
            return Err(invalid(format!(
                "specversion `{other}` is not supported; use 1.0"
            )));
        }
        None => return Err(invalid("`specversion` is required (\"1.0\")")),
    }
    let event: Event = serde_json::from_value(v).map_err(|e| invalid(e.to_string()))?;
    finish(event, now_ms)
}

/// One event in structured mode (`application/cloudevents+json`).
pub fn parse_structured(bytes: &[u8], now_ms: i64) -> Result<ParsedEvent, EventError> {
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(invalid(format!(
            "the event is over {MAX_EVENT_BYTES} bytes"
        )));
    }
    let v: Value = serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    from_value(v, now_ms)
}

/// A batch (`application/cloudevents-batch+json`): a JSON array of structured events.
/// All or nothing: one bad event refuses the batch, naming its index.
pub fn parse_batch(bytes: &[u8], now_ms: i64) -> Result<Vec<ParsedEvent>, EventError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let Value::Array(items) = v else {
        return Err(invalid("a batch is a JSON array of events"));
    };
    if items.is_empty() {
        return Err(invalid("the batch is empty"));
    }
    if items.len() > MAX_BATCH {
        return Err(invalid(format!("at most {MAX_BATCH} events per batch")));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            from_value(item, now_ms).map_err(|e| EventError::InBatch {
                index,
                message: e.to_string(),
            })
        })
        .collect()
}

/// Binary HTTP mode: attributes from `ce-*` headers (lower-case names), the body as
/// data with the request's content type. Turned into the structured form and parsed
/// as such, so both modes are held to exactly the same rules.
pub fn parse_binary(
    headers: &[(String, String)],
    content_type: Option<&str>,
    body: &[u8],
    now_ms: i64,
) -> Result<ParsedEvent, EventError> {
    use base64::Engine;
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let Some(attr) = name.strip_prefix("ce-") else {
            continue;
        };
        if attr == "data" || attr == "data_base64" || attr == "datacontenttype" {
            return Err(invalid(format!(
                "header ce-{attr}: data travels in the body"
            )));
        }
        if !valid_attribute_name(attr) {
            return Err(invalid(format!(
                "header ce-{attr}: attribute names are 1-20 lower-case letters or digits"
            )));
        }
        map.insert(attr.to_string(), Value::String(value.clone()));
    }
    if !map.contains_key("specversion") {
        return Err(invalid("ce-specversion is required (1.0)"));
    }
    if !body.is_empty() {
        let ct = content_type.unwrap_or("application/octet-stream");
        map.insert("datacontenttype".into(), Value::String(ct.to_string()));
        let data = if ct.starts_with("application/json") || ct.contains("+json") {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| invalid(format!("the body is declared JSON but is not: {e}")))?;
            ("data", v)
        } else {
            match std::str::from_utf8(body) {
                Ok(s) if ct.starts_with("text/") => ("data", Value::String(s.to_string())),
                _ => (
                    "data_base64",
                    Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
                ),
            }
        };
        map.insert(data.0.into(), data.1);
    }
    from_value(Value::Object(map), now_ms).map_err(|e| match e {
        EventError::Invalid(m) => invalid(format!("{m} (binary mode: ce-* headers)")),
        other => other,
    })
}

/// Where a published event landed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    pub id: String,
    pub offset: i64,
    /// Its id was already on the topic within the dedup window: not stored again.
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    NotFound(String),
    /// The log could not commit; nothing of the request was acknowledged.
    #[error("{0}")]
    Unavailable(String),
    /// The disk under the log is full; nothing of the request was acknowledged.
    #[error("{}", crate::storage::FULL_MESSAGE)]
    StorageFull,
}

/// Durable publishing, as the gateway and the control API see it: answered only
/// once the events are committed (see the event log's guarantees). Implemented by
/// the store's event log; a NATS JetStream backend would implement it too.
pub trait Publisher: Send + Sync + 'static {
    fn publish(
        &self,
        topic: &str,
        events: Vec<ParsedEvent>,
    ) -> crate::invoke::BoxFuture<'_, Result<Vec<Published>, PublishError>>;
}

/// The structured JSON of a stored event, for filters and deliveries.
pub fn as_json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_796_158_624_000;

    #[test]
    fn structured_events_are_validated_and_stamped() {
        let e = parse_structured(
            br#"{"specversion":"1.0","id":"1","source":"shop","type":"order.created",
                "partitionkey":"customer-42","data":{"amount":5}}"#,
            NOW,
        )
        .expect("valid");
        assert_eq!(e.id, "1");
        assert_eq!(e.key.as_deref(), Some("customer-42"));
        let v = as_json(&e.body);
        assert_eq!(v["data"]["amount"], 5);
        assert_eq!(v["time"], "2026-12-01T20:57:04Z");
        for bad in [
            &br#"{"id":"1","source":"s","type":"t"}"#[..],
            br#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#,
            br#"{"specversion":"1.0","source":"s","type":"t"}"#,
            br#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#,
            br#"{"specversion":"1.0","id":"1","source":"s","type":"t","Bad-Ext":"x"}"#,
            br#"[1]"#,
            br#"not json"#,
        ] {
            assert!(
                parse_structured(bad, NOW).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!(
            r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","data":"{}"}}"#,
            "x".repeat(MAX_EVENT_BYTES)
        );
        assert!(parse_structured(big.as_bytes(), NOW).is_err());
    }

    #[test]
    fn batches_are_all_or_nothing_naming_the_bad_one() {
        let ok = json!([
            {"specversion":"1.0","id":"1","source":"s","type":"t"},
            {"specversion":"1.0","id":"2","source":"s","type":"t","data_base64":"AAE="}
        ]);
        let parsed = parse_batch(ok.to_string().as_bytes(), NOW).expect("batch");
        assert_eq!(parsed.len(), 2);
        let bad = json!([{"specversion":"1.0","id":"1","source":"s","type":"t"}, {"id": "x"}]);
        match parse_batch(bad.to_string().as_bytes(), NOW) {
            Err(EventError::InBatch { index: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(parse_batch(b"[]", NOW).is_err());
        assert!(parse_batch(b"{}", NOW).is_err());
    }

    #[test]
    fn binary_mode_reads_ce_headers_and_the_body() {
        let h = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let headers = h(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "42"),
            ("ce-source", "/shop"),
            ("ce-type", "order.created"),
            ("ce-partitionkey", "c-1"),
            ("ce-traceid", "abc"),
        ]);
        let e =
            parse_binary(&headers, Some("application/json"), br#"{"a":1}"#, NOW).expect("binary");
        let v = as_json(&e.body);
        assert_eq!(v["data"]["a"], 1);
        assert_eq!(v["traceid"], "abc");
        assert_eq!(e.key.as_deref(), Some("c-1"));
        let text = parse_binary(&headers, Some("text/plain"), b"hello", NOW).expect("text");
        assert_eq!(as_json(&text.body)["data"], "hello");
        let bin = parse_binary(&headers, None, &[0, 159, 146, 150], NOW).expect("bytes");
        assert!(as_json(&bin.body)["data_base64"].is_string());
        assert!(parse_binary(&h(&[("ce-specversion", "1.0")]), None, b"", NOW).is_err());
        assert!(parse_binary(&headers, Some("application/json"), b"{", NOW).is_err());
        let mut bad = headers.clone();
        bad.push(("ce-Bad_Name".into(), "x".into()));
        assert!(parse_binary(&bad, None, b"", NOW).is_err());
    }
}
