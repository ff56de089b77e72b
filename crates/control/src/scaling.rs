//! `/v1/instances` and `/v1/functions/{name}/scale`: what runs, and how much may.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use nimbus_core::InstanceInfo;
use serde::{Deserialize, Serialize};

use crate::json::JsonBody;
use crate::{ApiError, ControlState, blocking, require_function};

#[derive(Deserialize)]
pub(crate) struct InstancesQuery {
    function: Option<String>,
}

pub(crate) async fn list_instances(
    State(st): State<Arc<ControlState>>,
    query: Result<Query<InstancesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<InstanceInfo>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(f) = &q.function {
        let store = Arc::clone(&st.store);
        let f = f.clone();
        blocking(move || require_function(&store, &f)).await?;
    }
    Ok(Json(st.invoker.instances(q.function).await))
}

#[derive(Deserialize, Default)]
pub(crate) struct ScaleRequest {
    min_instances: Option<u32>,
    max_instances: Option<u32>,
    /// Back to the manifest's values (applied before min/max).
    #[serde(default)]
    reset: bool,
}

#[derive(Serialize)]
pub(crate) struct ScaleResponse {
    name: String,
    min_instances: u32,
    max_instances: u32,
    /// Whether each bound comes from `nimbus scale` rather than the manifest.
    min_overridden: bool,
    max_overridden: bool,
}

pub(crate) async fn scale(
    State(st): State<Arc<ControlState>>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ScaleRequest>,
) -> Result<Json<ScaleResponse>, ApiError> {
    if req.min_instances.is_none() && req.max_instances.is_none() && !req.reset {
        return Err(ApiError::BadRequest(
            "give min_instances, max_instances or reset".into(),
        ));
    }
    let store = Arc::clone(&st.store);
    blocking(move || {
        let _floors = st.capacity.lock_floors();
        crate::capacity::check_scale(&st, &name, req.min_instances, req.max_instances, req.reset)?;
        let row = store
            .set_scaling(&name, req.min_instances, req.max_instances, req.reset)
            .map_err(ApiError::from_store)?;
        let shown = row.live_version.unwrap_or(row.latest_version);
        let v = store
            .get_version(&name, shown)
            .map_err(ApiError::from_store)?
            .ok_or_else(|| ApiError::NotFound(format!("function `{name}` not found")))?;
        tracing::info!(
            function = %name,
            min = v.config.concurrency.min_instances,
            max = v.config.concurrency.max_instances,
            "scaled"
        );
        Ok(Json(ScaleResponse {
            name,
            min_instances: v.config.concurrency.min_instances,
            max_instances: v.config.concurrency.max_instances,
            min_overridden: row.scale.min_instances.is_some(),
            max_overridden: row.scale.max_instances.is_some(),
        }))
    })
    .await
}
