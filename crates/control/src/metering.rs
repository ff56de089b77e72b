//! Usage, logs and invocation records: the read side of metering.
//!
//! `since` is a duration back from now (`10m`, `24h`, `7d`); times in answers are unix
//! milliseconds (UTC).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, Query, State};
use nimbus_store::Store;
use nimbus_store::metering::{
    Bucket, LogPage, LogQuery, Recommendation, Recorder, UsageQuery, UsageRow,
};
use serde::{Deserialize, Serialize};

use crate::{ApiError, ControlState, blocking};

const DEFAULT_USAGE_SINCE: &str = "24h";
const DEFAULT_RECOMMEND_SINCE: &str = "7d";
const DEFAULT_LOGS_SINCE: &str = "10m";
const DEFAULT_LOGS_LIMIT: usize = 100;
const MAX_LOGS_LIMIT: usize = 1000;

type Params = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

/// `GET /v1/usage`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UsageResponse {
    pub since_ms: i64,
    pub until_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<Bucket>,
    pub usage: Vec<UsageRow>,
}

/// `GET /v1/usage/recommendations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecommendationsResponse {
    pub since_ms: i64,
    pub until_ms: i64,
    pub recommendations: Vec<Recommendation>,
}

fn params(q: Params) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `since` as unix ms: a duration back from `now`.
pub(crate) fn parse_since(value: Option<&str>, default: &str, now: i64) -> Result<i64, ApiError> {
    let text = value.unwrap_or(default);
    let d = nimbus_core::duration::parse_duration(text).map_err(|e| {
        ApiError::BadRequest(format!(
            "`since` must be a duration back from now such as 10m, 24h or 7d: {e}"
        ))
    })?;
    let back = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    Ok(now.saturating_sub(back))
}

pub(crate) fn parse_by(value: Option<&str>) -> Result<Option<Bucket>, ApiError> {
    match value {
        None | Some("") => Ok(None),
        Some(v) => Bucket::parse(v).map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!("`by` must be `hour` or `day`, not `{v}`"))
        }),
    }
}

fn parse_limit(value: Option<&str>) -> Result<usize, ApiError> {
    match value {
        None => Ok(DEFAULT_LOGS_LIMIT),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LOGS_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "`limit` must be a number from 1 to {MAX_LOGS_LIMIT}, not `{v}`"
            ))),
        },
    }
}

fn parse_cursor(value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| {
            v.parse::<i64>().ok().filter(|c| *c >= 0).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`after` must be a cursor from an earlier answer, not `{v}`"
                ))
            })
        })
        .transpose()
}

fn store_err(e: nimbus_store::Error) -> ApiError {
    ApiError::from_store(e)
}

/// A function is known while it exists or while metering still holds its records.
fn require_known(store: &Store, rec: &Recorder, name: &str) -> Result<(), ApiError> {
    if store.get_function(name).map_err(store_err)?.is_some()
        || rec.has_records(name).map_err(store_err)?
    {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("function `{name}` not found")))
    }
}

pub(crate) async fn usage(
    State(st): State<Arc<ControlState>>,
    q: Params,
) -> Result<Json<UsageResponse>, ApiError> {
    let p = params(q)?;
    let now = now_ms();
    let since_ms = parse_since(p.get("since").map(String::as_str), DEFAULT_USAGE_SINCE, now)?;
    let by = parse_by(p.get("by").map(String::as_str))?;
    let function = p.get("function").filter(|f| !f.is_empty()).cloned();
    let (store, rec) = (Arc::clone(&st.store), Arc::clone(&st.metering));
    blocking(move || {
        if let Some(f) = &function {
            require_known(&store, &rec, f)?;
        }
        let usage = rec
            .usage(&UsageQuery {
                function,
                since_ms,
                bucket: by,
            })
            .map_err(store_err)?;
        Ok(Json(UsageResponse {
            since_ms,
            until_ms: now,
            by,
            usage,
        }))
    })
    .await
}

pub(crate) async fn recommendations(
    State(st): State<Arc<ControlState>>,
    q: Params,
) -> Result<Json<RecommendationsResponse>, ApiError> {
    let p = params(q)?;
    let now = now_ms();
    let since_ms = parse_since(
        p.get("since").map(String::as_str),
        DEFAULT_RECOMMEND_SINCE,
        now,
    )?;
    let function = p.get("function").filter(|f| !f.is_empty()).cloned();
    let (store, rec) = (Arc::clone(&st.store), Arc::clone(&st.metering));
    blocking(move || {
        if let Some(f) = &function {
            require_known(&store, &rec, f)?;
        }
        let recommendations = rec
            .recommendations(since_ms, function.as_deref())
            .map_err(store_err)?;
        Ok(Json(RecommendationsResponse {
            since_ms,
            until_ms: now,
            recommendations,
        }))
    })
    .await
}

pub(crate) async fn logs(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
    q: Params,
) -> Result<Json<LogPage>, ApiError> {
    let p = params(q)?;
    let now = now_ms();
    let request_id = p.get("request").filter(|r| !r.is_empty()).cloned();
    let since = p.get("since").map(String::as_str);
    // One invocation's logs are wanted whatever its age, unless a window is given.
    let since_ms = if request_id.is_some() && since.is_none() {
        None
    } else {
        Some(parse_since(since, DEFAULT_LOGS_SINCE, now)?)
    };
    let after = parse_cursor(p.get("after").map(String::as_str))?;
    let limit = parse_limit(p.get("limit").map(String::as_str))?;
    let (store, rec) = (Arc::clone(&st.store), Arc::clone(&st.metering));
    blocking(move || {
        require_known(&store, &rec, &name)?;
        rec.logs(&LogQuery {
            function: Some(name),
            request_id,
            since_ms,
            after,
            limit,
        })
        .map(Json)
        .map_err(store_err)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_duration_back_from_now() {
        let now = 10_000_000;
        assert_eq!(
            parse_since(Some("10m"), "24h", now).ok(),
            Some(now - 600_000)
        );
        assert_eq!(parse_since(None, "1h", now).ok(), Some(now - 3_600_000));
        assert_eq!(
            parse_since(Some("7d"), "1h", now).ok(),
            Some(now - 7 * 86_400_000)
        );
        let err = parse_since(Some("yesterday"), "1h", now).expect_err("bad since");
        assert!(
            matches!(err, ApiError::BadRequest(ref m) if m.contains("`since`")),
            "{err}"
        );
    }

    #[test]
    fn by_is_hour_or_day() {
        assert_eq!(parse_by(Some("hour")).ok(), Some(Some(Bucket::Hour)));
        assert_eq!(parse_by(Some("day")).ok(), Some(Some(Bucket::Day)));
        assert_eq!(parse_by(None).ok(), Some(None));
        let err = parse_by(Some("week")).expect_err("bad by");
        assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
        assert!(err.to_string().contains("`hour` or `day`"), "{err}");
    }

    #[test]
    fn limit_and_cursor_are_checked() {
        assert_eq!(parse_limit(None).ok(), Some(DEFAULT_LOGS_LIMIT));
        assert_eq!(parse_limit(Some("5")).ok(), Some(5));
        assert!(parse_limit(Some("0")).is_err());
        assert!(parse_limit(Some("100000")).is_err());
        assert_eq!(parse_cursor(Some("42")).ok(), Some(Some(42)));
        assert!(parse_cursor(Some("-1")).is_err());
        assert!(parse_cursor(Some("x")).is_err());
    }
}
