//! `/v1/routes`: routes added and removed outside manifests (`nimbus route add|rm`).
//! They are checked like manifest routes (the same path rules, the same conflict check
//! against every installed route) and survive deploys of their function.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use nimbus_core::AuthKind;
use nimbus_core::api::AddRouteRequest;
use nimbus_core::route_options::RouteOptions;
use nimbus_core::routes::RouteEntry;
use serde::Deserialize;

use crate::{ApiError, ControlState, blocking, parse_json, read_body};

fn entry(req: AddRouteRequest) -> Result<RouteEntry, ApiError> {
    let bad = |field: &str, m: String| ApiError::BadRequest(format!("{field}: {m}"));
    let method = req.method.to_ascii_uppercase();
    if !nimbus_core::manifest::METHODS.contains(&method.as_str()) {
        return Err(bad(
            "method",
            format!(
                "unknown method `{method}`; allowed: {}",
                nimbus_core::manifest::METHODS.join(", ")
            ),
        ));
    }
    nimbus_core::routes::validate_route_path(&req.path).map_err(|m| bad("path", m))?;
    nimbus_core::manifest::validate_name(&req.function).map_err(|m| bad("function", m))?;
    let auth = match req.auth.as_deref() {
        None | Some("none") => AuthKind::None,
        Some("api_key") => AuthKind::ApiKey,
        Some("jwt") => AuthKind::Jwt,
        Some(other) => {
            return Err(bad(
                "auth",
                format!("`{other}` is not one of none, api_key, jwt"),
            ));
        }
    };
    if !req.scopes.is_empty() && auth != AuthKind::Jwt {
        return Err(bad("scopes", "only applies to auth = jwt".into()));
    }
    let rate = |f: &str, r: &Option<String>| {
        r.as_deref()
            .map(nimbus_core::keys::parse_rate)
            .transpose()
            .map_err(|m| bad(f, m))
    };
    Ok(RouteEntry {
        options: RouteOptions {
            cors: None,
            rate: rate("rate", &req.rate)?,
            rate_per_ip: rate("rate_per_ip", &req.rate_per_ip)?,
            scopes: req.scopes,
            timeout_ms: None,
            websocket: false,
        },
        method,
        path: req.path,
        function: req.function,
        alias: req.alias.unwrap_or_else(|| "live".into()),
        auth,
    })
}

pub(crate) async fn add(
    State(st): State<Arc<ControlState>>,
    body: Body,
) -> Result<(StatusCode, Json<RouteEntry>), ApiError> {
    let bytes = read_body(body, 64 * 1024).await?;
    let route = entry(parse_json(&bytes)?)?;
    let store = Arc::clone(&st.store);
    let stored = route.clone();
    blocking(move || store.add_route(&stored).map_err(ApiError::from_store)).await?;
    Ok((StatusCode::CREATED, Json(route)))
}

#[derive(Deserialize)]
pub(crate) struct RemoveQuery {
    method: String,
    path: String,
}

pub(crate) async fn remove(
    State(st): State<Arc<ControlState>>,
    query: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RouteEntry>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let store = Arc::clone(&st.store);
    let method = q.method.to_ascii_uppercase();
    blocking(move || {
        store
            .remove_route(&method, &q.path)
            .map(Json)
            .map_err(ApiError::from_store)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> AddRouteRequest {
        AddRouteRequest {
            method: "get".into(),
            path: "/x/{id}".into(),
            function: "hello".into(),
            ..Default::default()
        }
    }

    #[test]
    fn requests_become_entries_or_name_the_bad_field() {
        let e = entry(AddRouteRequest {
            rate: Some("5/s".into()),
            ..req()
        })
        .expect("ok");
        assert_eq!((e.method.as_str(), e.alias.as_str()), ("GET", "live"));
        assert_eq!(e.options.rate.map(|r| r.requests), Some(5));
        for (r, field) in [
            (
                AddRouteRequest {
                    method: "FETCH".into(),
                    ..req()
                },
                "method",
            ),
            (
                AddRouteRequest {
                    path: "no-slash".into(),
                    ..req()
                },
                "path",
            ),
            (
                AddRouteRequest {
                    path: "/v1/x".into(),
                    ..req()
                },
                "path",
            ),
            (
                AddRouteRequest {
                    auth: Some("mtls".into()),
                    ..req()
                },
                "auth",
            ),
            (
                AddRouteRequest {
                    scopes: vec!["a".into()],
                    ..req()
                },
                "scopes",
            ),
            (
                AddRouteRequest {
                    rate: Some("x".into()),
                    ..req()
                },
                "rate",
            ),
        ] {
            match entry(r) {
                Err(ApiError::BadRequest(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{field}: {:?}", other.map(|e| e.route_key())),
            }
        }
    }
}
