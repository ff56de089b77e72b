//! What every JSON endpoint of the control API does with its body, in one place: the
//! declared media type must be JSON (415 otherwise), and the bytes must be UTF-8 JSON
//! whose strings are all Unicode text (400 otherwise), before any handler sees them.
//!
//! Reading the bytes (size and time limits) is [`crate::read_body`]'s job; this module
//! owns what is done with them.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use http::HeaderMap;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::{ApiError, read_body};

/// Bodies of the endpoints that take a small JSON document (everything but invoke).
pub(crate) const MAX_JSON_BODY: usize = 64 * 1024;

/// A JSON endpoint's body, typed. An empty body reads as JSON `null`, so
/// `JsonBody<Option<T>>` makes the body optional and `JsonBody<T>` requires one.
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let bytes = json_bytes(&parts.headers, body, MAX_JSON_BODY).await?;
        let text = bytes.as_deref().unwrap_or(b"null");
        serde_json::from_slice(text).map(JsonBody).map_err(|e| {
            if bytes.is_none() {
                ApiError::BadRequest("this request needs a JSON body".into())
            } else {
                ApiError::BadRequest(format!("invalid JSON body: {e}"))
            }
        })
    }
}

/// Reads a JSON endpoint's body and checks it; `None` when it is empty (whitespace
/// only). A media type that is not JSON is refused before the body is read.
pub(crate) async fn json_bytes(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Option<Bytes>, ApiError> {
    let declared = declared_json(headers)?;
    let bytes = read_body(body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !declared {
        return Err(unsupported());
    }
    check_json(&bytes)?;
    Ok(Some(bytes))
}

fn unsupported() -> ApiError {
    ApiError::UnsupportedMediaType(
        "send the body as JSON with Content-Type: application/json".into(),
    )
}

/// `Ok(true)` for a JSON media type, `Ok(false)` when none is declared, 415 for any
/// other. `application/json` and `application/*+json` are JSON; a `charset` parameter
/// may only say UTF-8 (JSON's only encoding, RFC 8259).
fn declared_json(headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else {
        return Ok(false);
    };
    let value = value.to_str().map_err(|_| unsupported())?;
    let mut params = value.split(';');
    let essence = params.next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.len() > "+json".len() && sub.ends_with("+json"));
    if !json {
        return Err(unsupported());
    }
    for param in params {
        let Some((name, v)) = param.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset")
            && !(v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8"))
        {
            return Err(ApiError::UnsupportedMediaType(format!(
                "charset `{v}`: JSON bodies are UTF-8"
            )));
        }
    }
    Ok(true)
}

/// Refuses bytes that are not UTF-8, are not one JSON value, or hold a string that is
/// not Unicode text (a lone surrogate escape such as `"\ud800"`): such a value cannot
/// be handed on as a string by any runtime without being silently altered.
pub(crate) fn check_json(bytes: &[u8]) -> Result<(), ApiError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ApiError::BadRequest(format!(
            "invalid JSON body: not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )));
    }
    serde_json::from_slice::<Checked>(bytes)
        .map(|_| ())
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Visits a JSON value without building it. Unlike `IgnoredAny`, it asks for every
/// string (keys included) as `str`, which makes serde_json decode its escapes and
/// refuse lone surrogates.
struct Checked;

impl<'de> de::Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_type(ct: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(ct) = ct {
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_str(ct).expect("value"),
            );
        }
        h
    }

    fn is_415(r: Result<bool, ApiError>) -> bool {
        matches!(r, Err(ApiError::UnsupportedMediaType(_)))
    }

    #[test]
    fn json_media_types_are_accepted() {
        for ct in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/merge-patch+json",
            "application/vnd.nimbus.v1+json; charset=utf8",
        ] {
            assert!(
                matches!(declared_json(&with_type(Some(ct))), Ok(true)),
                "{ct}"
            );
        }
        assert!(matches!(declared_json(&with_type(None)), Ok(false)));
    }

    #[test]
    fn other_media_types_are_415() {
        for ct in [
            "text/plain",
            "text/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/+json",
            "application/jsonp",
            "application/json; charset=latin1",
            "",
        ] {
            assert!(is_415(declared_json(&with_type(Some(ct)))), "{ct:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_bytes(b"application/json\xff").expect("value"),
        );
        assert!(is_415(declared_json(&h)));
    }

    #[test]
    fn bodies_must_be_utf8_json_with_unicode_strings() {
        assert!(check_json(br#"{"a": ["\ud83d\ude00", 1, null, true]}"#).is_ok());
        assert!(check_json("{\"caf\u{e9}\": \"\u{65e5}\"}".as_bytes()).is_ok());
        for bad in [
            &br#""\ud800""#[..],
            br#"{"k": "x\udc00y"}"#,
            br#"{"\ud800": 1}"#,
            br#"["\ud800\u0041"]"#,
            b"\"\xff\"",
            b"{\"a\": \"\xc0\xaf\"}",
            b"{\"a\": 1",
            b"1 2",
        ] {
            let r = check_json(bad);
            assert!(
                matches!(&r, Err(ApiError::BadRequest(m)) if m.starts_with("invalid JSON body")),
                "{}: {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn the_extractor_checks_type_then_bytes() {
        async fn extract<T: DeserializeOwned>(
            ct: Option<&str>,
            body: &'static [u8],
        ) -> Result<T, ApiError> {
            let mut req = Request::new(Body::from(body));
            *req.headers_mut() = with_type(ct);
            JsonBody::<T>::from_request(req, &())
                .await
                .map(|JsonBody(v)| v)
        }
        let ok: serde_json::Value = extract(Some("application/json"), br#"{"a":1}"#)
            .await
            .expect("json");
        assert_eq!(ok, serde_json::json!({"a": 1}));
        let r = extract::<serde_json::Value>(Some("text/plain"), br#"{"a":1}"#).await;
        assert!(matches!(r, Err(ApiError::UnsupportedMediaType(_))), "{r:?}");
        let r = extract::<serde_json::Value>(None, br#"{"a":1}"#).await;
        assert!(matches!(r, Err(ApiError::UnsupportedMediaType(_))), "{r:?}");
        let r = extract::<serde_json::Value>(Some("application/json"), br#""\ud800""#).await;
        assert!(matches!(r, Err(ApiError::BadRequest(_))), "{r:?}");
        // An empty body needs no type; it is `null`: fine for an optional body only.
        let none: Option<serde_json::Value> = extract(None, b"").await.expect("optional");
        assert!(none.is_none());
        #[derive(serde::Deserialize, Debug)]
        struct Needs {
            #[allow(dead_code)]
            a: u32,
        }
        let r = extract::<Needs>(None, b" ").await;
        assert!(
            matches!(&r, Err(ApiError::BadRequest(m)) if m.contains("needs a JSON body")),
            "{r:?}"
        );
    }
}
