//! API Gateway HTTP API payload 2.0: request -> event, and function result -> response.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Map, Value, json};

use crate::{error_response, is_hop_header};

pub struct EventInput<'a> {
    pub request_id: &'a str,
    pub route_key: &'a str,
    pub method: &'a str,
    pub raw_path: &'a str,
    pub raw_query: &'a str,
    pub headers: &'a HeaderMap,
    pub path_params: &'a BTreeMap<String, String>,
    pub body: &'a [u8],
    pub source_ip: &'a str,
    pub protocol: &'a str,
    /// The gateway checked the caller's credentials: keep them from the function.
    pub strip_credentials: bool,
    /// `requestContext.authorizer`, when the route authenticated its caller.
    pub authorizer: Option<Value>,
    /// `requestContext.authentication` (the verified mTLS client certificate).
    pub authentication: Option<Value>,
}

/// Builds the event exactly as API Gateway would: lower-case headers with duplicates
/// comma-joined, cookies split out of the `cookie` header, decoded query parameters,
/// and a body that is base64 unless it is text. Header values are JSON strings, so bytes
/// that are not UTF-8 become U+FFFD (documented in the README's HTTP event section).
pub fn build_event(i: &EventInput<'_>) -> Value {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    let mut cookies: Vec<String> = Vec::new();
    for (name, value) in i.headers {
        let name = name.as_str();
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if name == "cookie" {
            cookies.extend(
                value
                    .split(';')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string),
            );
            continue;
        }
        if is_hop_header(name) || (i.strip_credentials && crate::auth::is_credential_header(name)) {
            continue;
        }
        headers
            .entry(name.to_string())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }

    let mut query: BTreeMap<String, String> = BTreeMap::new();
    for pair in i.raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode_query(k);
        let v = decode_query(v);
        query
            .entry(k)
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert(v);
    }

    let content_type = headers
        .get("content-type")
        .map(String::as_str)
        .unwrap_or("");
    let (body, is_b64) = match std::str::from_utf8(i.body) {
        Ok(text) if nimbus_core::routes::is_textual(content_type) => (text.to_string(), false),
        _ => (B64.encode(i.body), true),
    };
    let host = headers.get("host").cloned().unwrap_or_default();
    let domain = host.split(':').next().unwrap_or("").to_string();
    let domain_prefix = domain.split('.').next().unwrap_or("").to_string();
    let user_agent = headers.get("user-agent").cloned().unwrap_or_default();
    let now = chrono::Utc::now();

    let mut ev = Map::new();
    ev.insert("version".into(), json!("2.0"));
    ev.insert("routeKey".into(), json!(i.route_key));
    ev.insert("rawPath".into(), json!(i.raw_path));
    ev.insert("rawQueryString".into(), json!(i.raw_query));
    if !cookies.is_empty() {
        ev.insert("cookies".into(), json!(cookies));
    }
    ev.insert("headers".into(), json!(headers));
    if !query.is_empty() {
        ev.insert("queryStringParameters".into(), json!(query));
    }
    if !i.path_params.is_empty() {
        ev.insert("pathParameters".into(), json!(i.path_params));
    }
    ev.insert(
        "requestContext".into(),
        json!({
            "accountId": "000000000000",
            "apiId": "nimbus",
            "domainName": domain,
            "domainPrefix": domain_prefix,
            "http": {
                "method": i.method,
                "path": i.raw_path,
                "protocol": i.protocol,
                "sourceIp": i.source_ip,
                "userAgent": user_agent,
            },
            "requestId": i.request_id,
            "routeKey": i.route_key,
            "stage": "$default",
            "time": now.format("%d/%b/%Y:%H:%M:%S %z").to_string(),
            "timeEpoch": now.timestamp_millis(),
        }),
    );
    if let Some(Value::Object(rc)) = ev.get_mut("requestContext") {
        if let Some(a) = &i.authorizer {
            rc.insert("authorizer".into(), a.clone());
        }
        if let Some(a) = &i.authentication {
            rc.insert("authentication".into(), a.clone());
        }
    }
    if !i.body.is_empty() {
        ev.insert("body".into(), json!(body));
    }
    ev.insert("isBase64Encoded".into(), json!(is_b64));
    Value::Object(ev)
}

fn decode_query(s: &str) -> String {
    nimbus_core::routes::percent_decode(&s.replace('+', " "))
}

/// Maps a function's result to a response. An object with `statusCode` is a structured
/// response; any other JSON value is a 200 `application/json` body.
pub fn map_result(result: &[u8]) -> Response {
    let value: Value = match serde_json::from_slice(result) {
        Ok(v) => v,
        Err(_) => return json_response(StatusCode::OK, result.to_vec()),
    };
    let Some(obj) = value.as_object().filter(|o| o.contains_key("statusCode")) else {
        return json_response(StatusCode::OK, result.to_vec());
    };
    let invalid = || {
        error_response(
            StatusCode::BAD_GATEWAY,
            "invalid_response",
            "the function returned a malformed response",
        )
    };
    let Some(status) = obj
        .get("statusCode")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
    else {
        return invalid();
    };
    let body = match obj.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => {
            if obj.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
                match B64.decode(s) {
                    Ok(b) => b,
                    Err(_) => return invalid(),
                }
            } else {
                s.clone().into_bytes()
            }
        }
        // Lambda stringifies non-string bodies; do the same.
        Some(other) => other.to_string().into_bytes(),
    };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    if let Some(Value::Object(h)) = obj.get("headers") {
        for (k, v) in h {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(_) | Value::Bool(_) => v.to_string(),
                _ => continue,
            };
            let (Ok(name), Ok(val)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&text),
            ) else {
                return invalid();
            };
            if is_hop_header(name.as_str()) || name == http::header::CONTENT_LENGTH {
                continue;
            }
            headers.insert(name, val);
        }
    }
    if let Some(Value::Array(cookies)) = obj.get("cookies") {
        for c in cookies.iter().filter_map(Value::as_str) {
            match HeaderValue::from_str(c) {
                Ok(v) => {
                    headers.append(http::header::SET_COOKIE, v);
                }
                Err(_) => return invalid(),
            }
        }
    }
    if !headers.contains_key(http::header::CONTENT_TYPE) {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    resp
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn input<'a>(
        headers: &'a HeaderMap,
        params: &'a BTreeMap<String, String>,
        query: &'a str,
        body: &'a [u8],
    ) -> EventInput<'a> {
        EventInput {
            request_id: "rid",
            route_key: "GET /hello/{name}",
            method: "GET",
            raw_path: "/hello/ada",
            raw_query: query,
            headers,
            path_params: params,
            body,
            source_ip: "127.0.0.1",
            protocol: "HTTP/1.1",
            strip_credentials: false,
            authorizer: None,
            authentication: None,
        }
    }

    #[test]
    fn builds_payload_v2() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("api.example.com:8080"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.insert("cookie", HeaderValue::from_static("s=1; t=2"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let p = BTreeMap::from([("name".to_string(), "ada".to_string())]);
        let ev = build_event(&input(&h, &p, "a=1&a=2&b=x%20y&c", b"{\"k\":1}"));
        assert_eq!(ev["version"], "2.0");
        assert_eq!(ev["routeKey"], "GET /hello/{name}");
        assert_eq!(ev["headers"]["x-multi"], "a,b");
        assert!(ev["headers"].get("cookie").is_none());
        assert_eq!(ev["cookies"], json!(["s=1", "t=2"]));
        assert_eq!(ev["queryStringParameters"]["a"], "1,2");
        assert_eq!(ev["queryStringParameters"]["b"], "x y");
        assert_eq!(ev["queryStringParameters"]["c"], "");
        assert_eq!(ev["pathParameters"]["name"], "ada");
        assert_eq!(ev["requestContext"]["domainName"], "api.example.com");
        assert_eq!(ev["requestContext"]["domainPrefix"], "api");
        assert_eq!(ev["requestContext"]["http"]["method"], "GET");
        assert_eq!(ev["body"], "{\"k\":1}");
        assert_eq!(ev["isBase64Encoded"], false);
    }

    #[test]
    fn header_bytes_that_are_not_utf8_become_replacement_characters() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-latin",
            HeaderValue::from_bytes(b"caf\xe9 ok").expect("obs-text"),
        );
        h.insert(
            "cookie",
            HeaderValue::from_bytes(b"n=\xff\xfe; m=1").expect("obs-text"),
        );
        let p = BTreeMap::new();
        let ev = build_event(&input(&h, &p, "", b""));
        assert_eq!(ev["headers"]["x-latin"], "caf\u{FFFD} ok");
        assert_eq!(ev["cookies"], json!(["n=\u{FFFD}\u{FFFD}", "m=1"]));
    }

    #[test]
    fn binary_bodies_are_base64() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        let p = BTreeMap::new();
        let ev = build_event(&input(&h, &p, "", &[0xff, 0x00, 0x01]));
        assert_eq!(ev["isBase64Encoded"], true);
        assert_eq!(ev["body"], "/wAB");
        assert!(ev.get("pathParameters").is_none());
        assert!(ev.get("queryStringParameters").is_none());
    }

    async fn body_of(r: Response) -> Vec<u8> {
        r.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes().to_vec())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn maps_structured_responses() {
        let r = map_result(
            br#"{"statusCode":201,"headers":{"x-a":"1","content-type":"text/plain"},"cookies":["a=1","b=2"],"body":"hi"}"#,
        );
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["x-a"], "1");
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(r.headers().get_all("set-cookie").iter().count(), 2);
        assert_eq!(body_of(r).await, b"hi");

        let r = map_result(br#"{"statusCode":200,"body":"aGk=","isBase64Encoded":true}"#);
        assert_eq!(body_of(r).await, b"hi");

        let r = map_result(br#"{"message":"hello"}"#);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(body_of(r).await, br#"{"message":"hello"}"#);

        let r = map_result(b"[1,2]");
        assert_eq!(body_of(r).await, b"[1,2]");
    }

    #[tokio::test]
    async fn malformed_structured_responses_are_502() {
        for bad in [
            &br#"{"statusCode":"abc"}"#[..],
            br#"{"statusCode":99999}"#,
            br#"{"statusCode":200,"body":"%%%","isBase64Encoded":true}"#,
            br#"{"statusCode":200,"headers":{"bad header":"x"}}"#,
        ] {
            assert_eq!(
                map_result(bad).status(),
                502,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
