//! `/v1/topics`: durable topics (create, list, describe, delete). Publishing is the
//! gateway's (`/v1/topics/{t}/events`, which API keys may use too).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use nimbus_core::api::CreateTopicRequest;
use nimbus_store::events::{TopicInfo, TopicSettings};

use crate::json::JsonBody;
use crate::{ApiError, ControlState, blocking};

/// Bounds that keep one topic from being set up to hold the disk or forever.
const MAX_RETENTION_MS: i64 = 366 * 86_400_000;
const MAX_BYTES: i64 = 1 << 40;
const MAX_DEDUP_MS: i64 = 86_400_000;

fn settings(req: &CreateTopicRequest) -> Result<TopicSettings, ApiError> {
    let bad = |f: &str, m: String| ApiError::BadRequest(format!("{f}: {m}"));
    let mut s = TopicSettings::default();
    if let Some(r) = &req.retention {
        let ms = nimbus_core::duration::parse_duration(r).map_err(|m| bad("retention", m))?;
        let ms = i64::try_from(ms.as_millis()).unwrap_or(i64::MAX);
        if !(1_000..=MAX_RETENTION_MS).contains(&ms) {
            return Err(bad("retention", "must be between 1s and 366d".into()));
        }
        s.retention_ms = ms;
    }
    if let Some(b) = &req.max_bytes {
        let n = parse_bytes(b).map_err(|m| bad("max_bytes", m))?;
        if !(1024..=MAX_BYTES).contains(&n) {
            return Err(bad("max_bytes", "must be between 1KB and 1TB".into()));
        }
        s.max_bytes = n;
    }
    if let Some(d) = &req.dedup_window {
        let ms = nimbus_core::duration::parse_duration(d).map_err(|m| bad("dedup_window", m))?;
        let ms = i64::try_from(ms.as_millis()).unwrap_or(i64::MAX);
        if ms > MAX_DEDUP_MS {
            return Err(bad("dedup_window", "must be at most 24h".into()));
        }
        s.dedup_window_ms = ms;
    }
    Ok(s)
}

/// `512MB`, `1GB`, `2GiB`, `1048576`.
pub fn parse_bytes(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 512MB or 1GB"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "TB" | "T" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0f64.powi(4),
        _ => {
            return Err(format!(
                "`{text}`: unknown unit; use B, KB, MB, GB, TB (or KiB..TiB)"
            ));
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > i64::MAX as f64 {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(v as i64)
}

pub(crate) async fn create(
    State(st): State<Arc<ControlState>>,
    JsonBody(req): JsonBody<CreateTopicRequest>,
) -> Result<(StatusCode, Json<TopicInfo>), ApiError> {
    nimbus_core::manifest::validate_name(&req.name)
        .map_err(|m| ApiError::BadRequest(format!("name: {m}")))?;
    let s = settings(&req)?;
    let t = st
        .events
        .create_topic(&req.name, s, nimbus_core::now_ms())
        .await
        .map_err(ApiError::from_store)?;
    Ok((StatusCode::CREATED, Json(t)))
}

pub(crate) async fn list(
    State(st): State<Arc<ControlState>>,
) -> Result<Json<Vec<TopicInfo>>, ApiError> {
    let events = Arc::clone(&st.events);
    blocking(move || events.topics().map(Json).map_err(ApiError::from_store)).await
}

/// The topic and, for `nimbus topic stats`, each subscription's lag.
pub(crate) async fn get(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let events = Arc::clone(&st.events);
    blocking(move || {
        let t = events.topic(&name).map_err(ApiError::from_store)?;
        let mut subs = Vec::new();
        for r in events.subscriptions().map_err(ApiError::from_store)? {
            if r.spec.topic == name {
                let i = crate::subscriptions::info(&events, r)?;
                subs.push(serde_json::json!({
                    "name": i.spec.name,
                    "function": i.spec.function,
                    "lag": i.lag,
                    "cursor": i.cursor,
                    "retrying": i.retrying,
                }));
            }
        }
        let mut v = serde_json::to_value(&t)
            .map_err(|e| ApiError::Internal(format!("serialize topic: {e}")))?;
        v["subscriptions"] = serde_json::Value::Array(subs);
        Ok(Json(v))
    })
    .await
}

pub(crate) async fn remove(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<TopicInfo>, ApiError> {
    st.events
        .delete_topic(&name)
        .await
        .map(Json)
        .map_err(ApiError::from_store)
}

#[derive(serde::Deserialize)]
pub(crate) struct ReadQuery {
    #[serde(default)]
    from: i64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// `GET /v1/topics/{name}/events?from=OFFSET&limit=N`: stored events in offset order
/// (structured JSON, with each one's offset), and where to read next.
pub(crate) async fn read(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.clamp(1, 10_000);
    let events = Arc::clone(&st.events);
    blocking(move || {
        let topic = events.topic(&name).map_err(ApiError::from_store)?;
        let rows = events
            .read_events(&name, q.from.max(0), limit)
            .map_err(ApiError::from_store)?;
        let next = rows
            .last()
            .map_or(q.from.max(topic.oldest_offset.unwrap_or(0)), |e| {
                e.offset + 1
            });
        let list: Vec<serde_json::Value> = rows
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "offset": e.offset,
                    "published_at_ms": e.published_at_ms,
                    "event": nimbus_core::events::as_json(&e.body),
                })
            })
            .collect();
        Ok(Json(
            serde_json::json!({"topic": name, "events": list, "next_offset": next}),
        ))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_settings_parse_or_name_the_field() {
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("2GiB"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_bytes("512"), Ok(512));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1XB").is_err());
        let req = |r: &str, b: &str| CreateTopicRequest {
            name: "t".into(),
            retention: Some(r.into()),
            max_bytes: Some(b.into()),
            dedup_window: None,
        };
        let s = settings(&req("7d", "1GB")).expect("ok");
        assert_eq!(s.retention_ms, 7 * 86_400_000);
        for (r, b, field) in [
            ("0s", "1GB", "retention"),
            ("7d", "1B", "max_bytes"),
            ("x", "1GB", "retention"),
        ] {
            match settings(&req(r, b)) {
                Err(ApiError::BadRequest(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
