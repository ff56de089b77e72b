//! API Gateway WebSocket events (what Lambda handlers for `$connect`, `$default` and
//! `$disconnect` expect), and what a function's answer means for the connection.

use std::collections::BTreeMap;

use axum::extract::ws::Message;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::HeaderMap;
use serde_json::{Map, Value, json};

use super::registry::ConnInfo;

/// Which of a connection's events this is.
pub(crate) enum Kind<'a> {
    Connect {
        headers: &'a HeaderMap,
        raw_query: &'a str,
        /// An API key checked by the gateway is kept from the function.
        strip_credentials: bool,
    },
    Message {
        message_id: &'a str,
        body: &'a [u8],
        binary: bool,
    },
    Disconnect {
        code: u16,
        reason: &'a str,
    },
}

pub(crate) fn build(conn: &ConnInfo, request_id: &str, now_ms: i64, kind: &Kind<'_>) -> Value {
    let (route_key, event_type) = match kind {
        Kind::Connect { .. } => ("$connect", "CONNECT"),
        Kind::Message { .. } => ("$default", "MESSAGE"),
        Kind::Disconnect { .. } => ("$disconnect", "DISCONNECT"),
    };
    let time = chrono::DateTime::from_timestamp_millis(now_ms)
        .unwrap_or_default()
        .format("%d/%b/%Y:%H:%M:%S %z")
        .to_string();
    let mut rc = Map::new();
    rc.insert("routeKey".into(), json!(route_key));
    rc.insert("eventType".into(), json!(event_type));
    rc.insert("extendedRequestId".into(), json!(request_id));
    rc.insert("requestTime".into(), json!(time));
    rc.insert("messageDirection".into(), json!("IN"));
    rc.insert("stage".into(), json!("$default"));
    rc.insert("connectedAt".into(), json!(conn.connected_at_ms));
    rc.insert("requestTimeEpoch".into(), json!(now_ms));
    rc.insert(
        "identity".into(),
        json!({"sourceIp": conn.source_ip, "userAgent": conn.user_agent}),
    );
    rc.insert("requestId".into(), json!(request_id));
    rc.insert("domainName".into(), json!(conn.domain));
    rc.insert("connectionId".into(), json!(conn.id));
    rc.insert("apiId".into(), json!("nimbus"));
    if let Some(a) = &conn.authorizer {
        rc.insert("authorizer".into(), a.clone());
    }

    let mut ev = Map::new();
    let mut is_b64 = false;
    match kind {
        Kind::Connect {
            headers,
            raw_query,
            strip_credentials,
        } => {
            let (single, multi) = header_maps(headers, *strip_credentials);
            ev.insert("headers".into(), json!(single));
            ev.insert("multiValueHeaders".into(), json!(multi));
            let (single, multi) = query_maps(raw_query);
            if !single.is_empty() {
                ev.insert("queryStringParameters".into(), json!(single));
                ev.insert("multiValueQueryStringParameters".into(), json!(multi));
            }
        }
        Kind::Message {
            message_id,
            body,
            binary,
        } => {
            rc.insert("messageId".into(), json!(message_id));
            let text = if *binary {
                None
            } else {
                std::str::from_utf8(body).ok()
            };
            let body = match text {
                Some(t) => t.to_string(),
                None => {
                    is_b64 = true;
                    B64.encode(body)
                }
            };
            ev.insert("body".into(), json!(body));
        }
        Kind::Disconnect { code, reason } => {
            rc.insert("disconnectStatusCode".into(), json!(code));
            rc.insert("disconnectReason".into(), json!(reason));
        }
    }
    ev.insert("requestContext".into(), Value::Object(rc));
    ev.insert("isBase64Encoded".into(), json!(is_b64));
    Value::Object(ev)
}

type Single = BTreeMap<String, String>;
type Multi = BTreeMap<String, Vec<String>>;

/// API Gateway's v1 shapes: the last value of each header, and all of them.
fn header_maps(headers: &HeaderMap, strip_credentials: bool) -> (Single, Multi) {
    let mut single = Single::new();
    let mut multi = Multi::new();
    for (name, value) in headers {
        let name = name.as_str();
        if crate::is_hop_header(name)
            || name.starts_with("sec-websocket-")
            || (strip_credentials && crate::auth::is_credential_header(name))
        {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        single.insert(name.to_string(), value.clone());
        multi.entry(name.to_string()).or_default().push(value);
    }
    (single, multi)
}

fn query_maps(raw_query: &str) -> (Single, Multi) {
    let mut single = Single::new();
    let mut multi = Multi::new();
    let decode = |s: &str| nimbus_core::routes::percent_decode(&s.replace('+', " "));
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k), decode(v));
        single.insert(k.clone(), v.clone());
        multi.entry(k).or_default().push(v);
    }
    (single, multi)
}

/// Whether a `$connect` answer lets the connection in: anything but an object with a
/// non-2xx `statusCode` does. A refusal carries the status to answer the upgrade with.
pub(crate) fn connect_verdict(result: &[u8]) -> Result<(), u16> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(result) else {
        return Ok(());
    };
    let Some(code) = obj.get("statusCode") else {
        return Ok(());
    };
    match code.as_u64() {
        Some(200..=299) => Ok(()),
        Some(c @ 300..=599) => Err(c as u16),
        // A malformed verdict is the function's fault: the answer for HTTP too.
        _ => Err(502),
    }
}

/// What a `$default` answer sends back on the connection (API Gateway's two-way
/// route response): a proxy response's `body` (binary if `isBase64Encoded`), a JSON
/// string's text, any other JSON as written; `null`, no body or an empty one send
/// nothing.
pub(crate) fn reply(result: &[u8]) -> Option<Message> {
    let value: Value = match serde_json::from_slice(result) {
        Ok(v) => v,
        Err(_) => {
            return match std::str::from_utf8(result) {
                Ok("") => None,
                Ok(t) => Some(Message::text(t)),
                Err(_) => Some(Message::binary(result.to_vec())),
            };
        }
    };
    match value {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(Message::text(s)),
        Value::Object(obj) if obj.contains_key("statusCode") => match obj.get("body") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => {
                if obj.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
                    match B64.decode(s) {
                        Ok(b) => Some(Message::binary(b)),
                        Err(_) => None,
                    }
                } else {
                    Some(Message::text(s.clone()))
                }
            }
            Some(other) => Some(Message::text(other.to_string())),
        },
        other => Some(Message::text(other.to_string())),
    }
}

/// What API Gateway sends a client whose message the function failed on.
pub(crate) fn error_frame(connection_id: &str, request_id: &str) -> Message {
    Message::text(
        json!({
            "message": "Internal server error",
            "connectionId": connection_id,
            "requestId": request_id,
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn text(m: Option<Message>) -> Option<String> {
        match m {
            Some(Message::Text(t)) => Some(t.as_str().to_string()),
            Some(other) => Some(format!("non-text {other:?}")),
            None => None,
        }
    }

    #[test]
    fn connect_events_carry_the_connection_headers_and_query() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("chat.example.com"));
        h.insert("x-api-key", HeaderValue::from_static("nmb_secret"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("sec-websocket-key", HeaderValue::from_static("abc"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        let mut conn = crate::ws::registry::info("Abc-123_xyz");
        conn.authorizer = Some(json!({"apiKey": {"id": "k", "name": "ci"}}));
        let kind = Kind::Connect {
            headers: &h,
            raw_query: "room=a%20b&x=1&x=2",
            strip_credentials: true,
        };
        let ev = build(&conn, "rid", conn.connected_at_ms, &kind);
        let rc = &ev["requestContext"];
        assert_eq!(rc["routeKey"], "$connect");
        assert_eq!(rc["eventType"], "CONNECT");
        assert_eq!(rc["connectionId"], "Abc-123_xyz");
        assert_eq!(rc["requestId"], "rid");
        assert_eq!(rc["connectedAt"], conn.connected_at_ms);
        assert_eq!(rc["requestTimeEpoch"], conn.connected_at_ms);
        assert_eq!(rc["stage"], "$default");
        assert_eq!(rc["identity"]["sourceIp"], "127.0.0.1");
        assert_eq!(rc["authorizer"]["apiKey"]["name"], "ci");
        assert!(rc.get("messageId").is_none());
        assert_eq!(ev["headers"]["host"], "chat.example.com");
        assert_eq!(ev["multiValueHeaders"]["x-multi"], json!(["a", "b"]));
        for gone in ["x-api-key", "upgrade", "sec-websocket-key"] {
            assert!(ev["headers"].get(gone).is_none(), "{gone}");
        }
        assert_eq!(ev["queryStringParameters"]["room"], "a b");
        assert_eq!(
            ev["multiValueQueryStringParameters"]["x"],
            json!(["1", "2"])
        );
        assert_eq!(ev["isBase64Encoded"], false);
        assert!(ev.get("body").is_none());
    }

    #[test]
    fn message_and_disconnect_events() {
        let conn = crate::ws::registry::info("c1");
        let m = Kind::Message {
            message_id: "m1",
            body: b"hello",
            binary: false,
        };
        let ev = build(&conn, "r2", conn.connected_at_ms + 10, &m);
        assert_eq!(ev["requestContext"]["routeKey"], "$default");
        assert_eq!(ev["requestContext"]["eventType"], "MESSAGE");
        assert_eq!(ev["requestContext"]["messageId"], "m1");
        assert_eq!(ev["body"], "hello");
        assert_eq!(ev["isBase64Encoded"], false);
        assert!(ev.get("headers").is_none());

        let b = Kind::Message {
            message_id: "m2",
            body: &[0xff, 0, 1],
            binary: true,
        };
        let ev = build(&conn, "r3", 0, &b);
        assert_eq!(ev["body"], "/wAB");
        assert_eq!(ev["isBase64Encoded"], true);

        let d = Kind::Disconnect {
            code: 1001,
            reason: "Going away",
        };
        let ev = build(&conn, "r4", 0, &d);
        let rc = &ev["requestContext"];
        assert_eq!(rc["routeKey"], "$disconnect");
        assert_eq!(rc["eventType"], "DISCONNECT");
        assert_eq!(rc["disconnectStatusCode"], 1001);
        assert_eq!(rc["disconnectReason"], "Going away");
        assert!(ev.get("body").is_none());
    }

    #[test]
    fn connect_verdicts() {
        assert_eq!(connect_verdict(b"null"), Ok(()));
        assert_eq!(connect_verdict(b"not json"), Ok(()));
        assert_eq!(connect_verdict(br#"{"ok":true}"#), Ok(()));
        assert_eq!(connect_verdict(br#"{"statusCode":200}"#), Ok(()));
        assert_eq!(connect_verdict(br#"{"statusCode":204}"#), Ok(()));
        assert_eq!(connect_verdict(br#"{"statusCode":403}"#), Err(403));
        assert_eq!(
            connect_verdict(br#"{"statusCode":401,"body":"x"}"#),
            Err(401)
        );
        assert_eq!(connect_verdict(br#"{"statusCode":"403"}"#), Err(502));
        assert_eq!(connect_verdict(br#"{"statusCode":101}"#), Err(502));
    }

    #[test]
    fn replies_follow_the_two_way_route_response() {
        assert_eq!(
            text(reply(br#"{"statusCode":200,"body":"echo: hi"}"#)).as_deref(),
            Some("echo: hi")
        );
        assert_eq!(text(reply(br#"{"statusCode":200}"#)), None);
        assert_eq!(text(reply(br#"{"statusCode":200,"body":""}"#)), None);
        assert_eq!(
            text(reply(br#"{"statusCode":200,"body":{"a":1}}"#)).as_deref(),
            Some(r#"{"a":1}"#)
        );
        assert!(matches!(
            reply(br#"{"statusCode":200,"body":"/wAB","isBase64Encoded":true}"#),
            Some(Message::Binary(b)) if b.as_ref() == [0xff, 0, 1]
        ));
        assert_eq!(text(reply(br#""plain""#)).as_deref(), Some("plain"));
        assert_eq!(text(reply(br#"{"a":1}"#)).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(text(reply(b"null")), None);
        assert_eq!(text(reply(b"")), None);
        assert_eq!(text(reply(b"raw text")).as_deref(), Some("raw text"));
        let e = text(Some(error_frame("c", "r"))).unwrap_or_default();
        let v: Value = serde_json::from_str(&e).unwrap_or_default();
        assert_eq!(v["message"], "Internal server error");
        assert_eq!(v["connectionId"], "c");
    }
}
