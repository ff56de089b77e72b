//! `/v1/routes`: routes added and removed outside manifests (`nimbus route add|rm`).
//! They are checked like manifest routes (the same path rules, the same conflict check
//! against every installed route) and survive deploys of their function.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use nimbus_core::AuthKind;
use nimbus_core::api::AddRouteRequest;
use nimbus_core::route_options::RouteOptions;
use nimbus_core::routes::RouteEntry;
use serde::Deserialize;

use crate::json::JsonBody;
use crate::{ApiError, ControlState, blocking};

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
    let upstream = if req.upstream.is_empty() {
        nimbus_core::manifest::validate_name(&req.function).map_err(|m| bad("function", m))?;
        Vec::new()
    } else {
        if !req.function.is_empty() {
            return Err(bad(
                "upstream",
                "a route points at a function or at upstreams, not both".into(),
            ));
        }
        nimbus_core::route_options::parse_upstreams(&req.upstream)
            .map_err(|m| bad("upstream", m))?
    };
    let host = match req.host.as_deref() {
        None | Some("") => String::new(),
        Some(h) => nimbus_core::routes::validate_host(h).map_err(|m| bad("host", m))?,
    };
    let timeout_ms = match req.timeout.as_deref() {
        None => None,
        Some(t) => {
            let ms = nimbus_core::duration::parse_duration(t)
                .map_err(|m| bad("timeout", m))?
                .as_millis() as u64;
            if ms == 0 || ms > nimbus_core::manifest::TIMEOUT_MAX_MS {
                return Err(bad("timeout", format!("`{t}` is outside 1ms..15m")));
            }
            Some(ms)
        }
    };
    let upstream_down_for_ms = match req.upstream_down_for.as_deref() {
        None => None,
        Some(_) if upstream.is_empty() => {
            return Err(bad(
                "upstream_down_for",
                "only applies to routes with upstreams".into(),
            ));
        }
        Some(t) => Some(
            nimbus_core::route_options::parse_down_for(t)
                .map_err(|m| bad("upstream_down_for", m))?,
        ),
    };
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
            timeout_ms,
            upstream_down_for_ms,
            ..RouteOptions::default()
        },
        method,
        path: req.path,
        alias: if upstream.is_empty() {
            req.alias.unwrap_or_else(|| "live".into())
        } else {
            String::new()
        },
        function: req.function,
        host,
        upstream,
        auth,
    })
}

pub(crate) async fn add(
    State(st): State<Arc<ControlState>>,
    JsonBody(req): JsonBody<AddRouteRequest>,
) -> Result<(StatusCode, Json<RouteEntry>), ApiError> {
    let route = entry(req)?;
    let store = Arc::clone(&st.store);
    let stored = route.clone();
    blocking(move || store.add_route(&stored).map_err(ApiError::from_store)).await?;
    Ok((StatusCode::CREATED, Json(route)))
}

#[derive(Deserialize)]
pub(crate) struct RemoveQuery {
    method: String,
    path: String,
    #[serde(default)]
    host: String,
}

pub(crate) async fn remove(
    State(st): State<Arc<ControlState>>,
    query: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RouteEntry>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let store = Arc::clone(&st.store);
    let method = q.method.to_ascii_uppercase();
    let host = q.host.to_ascii_lowercase();
    blocking(move || {
        store
            .remove_route(&host, &method, &q.path)
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
        let up = entry(AddRouteRequest {
            function: String::new(),
            upstream: vec!["http://127.0.0.1:9001/".into()],
            host: Some("API.example.com".into()),
            timeout: Some("2s".into()),
            upstream_down_for: Some("1s".into()),
            ..req()
        })
        .expect("upstream route");
        assert_eq!(up.upstream, vec!["http://127.0.0.1:9001"]);
        assert_eq!(
            (up.host.as_str(), up.alias.as_str()),
            ("api.example.com", "")
        );
        assert_eq!(up.options.timeout_ms, Some(2_000));
        assert_eq!(up.options.upstream_down_for_ms, Some(1_000));
        let upstream = |u: &str| AddRouteRequest {
            function: String::new(),
            upstream: vec![u.into()],
            ..req()
        };
        for (r, field) in [
            (upstream("ftp://x"), "upstream"),
            (upstream("http://a:b@x"), "upstream"),
            (
                AddRouteRequest {
                    upstream: vec!["http://x".into()],
                    ..req()
                },
                "upstream",
            ),
            (
                AddRouteRequest {
                    host: Some("a.b:1".into()),
                    ..req()
                },
                "host",
            ),
            (
                AddRouteRequest {
                    upstream_down_for: Some("1s".into()),
                    ..req()
                },
                "upstream_down_for",
            ),
            (
                AddRouteRequest {
                    timeout: Some("soon".into()),
                    ..req()
                },
                "timeout",
            ),
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
