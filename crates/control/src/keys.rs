//! `/v1/keys`: API keys for the gateway. The key text leaves the server once, in the
//! answer to its creation; it is stored only as a hash.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use nimbus_core::api::{ApiKeyInfo, CreateKeyRequest, CreatedKey};
use nimbus_core::keys;

use crate::json::JsonBody;
use crate::{ApiError, ControlState, blocking};

/// Longest key lifetime accepted: ten years.
const MAX_LIFETIME_MS: i64 = 10 * 366 * 86_400_000;

use nimbus_core::now_ms;

/// Checks a creation request and turns it into the stored record (without the key).
fn validate(req: &CreateKeyRequest, id: String, now: i64) -> Result<ApiKeyInfo, ApiError> {
    nimbus_core::manifest::validate_name(&req.name)
        .map_err(|m| ApiError::BadRequest(format!("name: {m}")))?;
    if req.scopes.is_empty() {
        return Err(ApiError::BadRequest(
            "scopes: give at least one (e.g. invoke:hello); a key without scopes grants nothing"
                .into(),
        ));
    }
    if req.scopes.len() > 100 {
        return Err(ApiError::BadRequest("scopes: at most 100".into()));
    }
    for s in &req.scopes {
        keys::validate_scope(s).map_err(|m| ApiError::BadRequest(format!("scopes: {m}")))?;
    }
    let rate = req
        .rate
        .as_deref()
        .map(keys::parse_rate)
        .transpose()
        .map_err(|m| ApiError::BadRequest(format!("rate: {m}")))?;
    let quota = req
        .quota
        .as_deref()
        .map(keys::parse_quota)
        .transpose()
        .map_err(|m| ApiError::BadRequest(format!("quota: {m}")))?;
    let expires_at_ms = match req.expires_in.as_deref() {
        None => None,
        Some(text) => {
            let d = nimbus_core::duration::parse_duration(text)
                .map_err(|m| ApiError::BadRequest(format!("expires_in: {m}")))?;
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            if ms == 0 || ms > MAX_LIFETIME_MS {
                return Err(ApiError::BadRequest(
                    "expires_in: must be between 1ms and 10 years".into(),
                ));
            }
            Some(now + ms)
        }
    };
    let mut scopes = req.scopes.clone();
    scopes.sort();
    scopes.dedup();
    Ok(ApiKeyInfo {
        id,
        name: req.name.clone(),
        scopes,
        rate,
        quota,
        quota_used: quota.map(|_| 0),
        created_at_ms: now,
        expires_at_ms,
        revoked_at_ms: None,
        status: nimbus_core::api::KeyStatus::Active,
    })
}

pub(crate) async fn create(
    State(st): State<Arc<ControlState>>,
    JsonBody(req): JsonBody<CreateKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let new = keys::generate();
    let info = validate(&req, new.id.clone(), now_ms())?;
    let store = Arc::clone(&st.store);
    let stored = info.clone();
    blocking(move || {
        store
            .create_key(&stored, &new.hash)
            .map_err(ApiError::from_store)
    })
    .await?;
    tracing::info!(key = %info.name, id = %info.id, scopes = ?info.scopes, "API key created");
    Ok((StatusCode::CREATED, Json(CreatedKey { key: new.key, info })))
}

pub(crate) async fn list(
    State(st): State<Arc<ControlState>>,
) -> Result<Json<Vec<ApiKeyInfo>>, ApiError> {
    let store = Arc::clone(&st.store);
    blocking(move || Ok(Json(store.keys().map_err(ApiError::from_store)?))).await
}

pub(crate) async fn revoke(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
) -> Result<Json<ApiKeyInfo>, ApiError> {
    let store = Arc::clone(&st.store);
    let info = blocking(move || {
        store
            .revoke_key(&name, now_ms())
            .map_err(ApiError::from_store)
    })
    .await?;
    tracing::info!(key = %info.name, id = %info.id, "API key revoked");
    Ok(Json(info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(scopes: &[&str]) -> CreateKeyRequest {
        CreateKeyRequest {
            name: "ci".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            rate: Some("10/s:20".into()),
            quota: Some("100/day".into()),
            expires_in: Some("30d".into()),
        }
    }

    #[test]
    fn valid_requests_become_records() {
        let i = validate(&req(&["invoke:hello", "invoke:hello"]), "id".into(), 1000).expect("ok");
        assert_eq!(i.scopes, vec!["invoke:hello".to_string()]);
        assert_eq!(i.expires_at_ms, Some(1000 + 30 * 86_400_000));
        assert_eq!(i.rate.map(|r| r.burst), Some(20));
    }

    #[test]
    fn bad_requests_are_refused_with_the_field() {
        let cases: Vec<(CreateKeyRequest, &str)> = vec![
            (req(&[]), "scopes"),
            (req(&["root"]), "scopes"),
            (
                CreateKeyRequest {
                    name: "Bad Name".into(),
                    ..req(&["invoke:x"])
                },
                "name",
            ),
            (
                CreateKeyRequest {
                    rate: Some("fast".into()),
                    ..req(&["invoke:x"])
                },
                "rate",
            ),
            (
                CreateKeyRequest {
                    expires_in: Some("0s".into()),
                    ..req(&["invoke:x"])
                },
                "expires_in",
            ),
            (
                CreateKeyRequest {
                    expires_in: Some("soon".into()),
                    ..req(&["invoke:x"])
                },
                "expires_in",
            ),
        ];
        for (r, field) in cases {
            match validate(&r, "id".into(), 0) {
                Err(ApiError::BadRequest(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{field}: {:?}", other.map(|i| i.name)),
            }
        }
    }
}
