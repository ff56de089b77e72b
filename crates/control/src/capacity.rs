//! The host's budget seen from the control plane: deploys and scale changes whose
//! `min_instances` floors cannot all fit are refused before anything is stored, and
//! `GET /v1/status` shows the budget and what is in use.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use nimbus_core::FunctionConfig;
use nimbus_core::capacity::{Budget, Usage, floor_of};
use nimbus_store::{ScaleOverride, Store};
use serde::Serialize;

use crate::{ApiError, ControlState, blocking};

/// The floor `config` asks for under `scale`; wasm functions keep a loaded component,
/// not sandboxes, so they ask for none.
fn floor(config: &FunctionConfig, scale: &ScaleOverride) -> Usage {
    if config.runtime == nimbus_core::Runtime::Wasm {
        return Usage::default();
    }
    let mut c = config.concurrency.clone();
    scale.apply(&mut c);
    floor_of(c.min_instances, config.memory_mb)
}

/// The floors of every function's `live` version, but `except`'s.
fn floors_except(store: &Store, except: &str) -> Result<Usage, ApiError> {
    let mut total = Usage::default();
    for f in store.list_functions().map_err(ApiError::from_store)? {
        let Some(live) = f.live_version.filter(|_| f.name != except) else {
            continue;
        };
        if let Some(v) = store
            .get_version(&f.name, live)
            .map_err(ApiError::from_store)?
        {
            total = total + floor(&v.config, &f.scale);
        }
    }
    Ok(total)
}

fn fits(st: &ControlState, floor: Usage) -> Result<(), ApiError> {
    st.capacity
        .check_floor(floor)
        .map_err(ApiError::OverCapacity)
}

/// Before a deploy of `config` is stored (it becomes `live`).
pub(crate) fn check_deploy(st: &ControlState, config: &FunctionConfig) -> Result<(), ApiError> {
    let scale = st
        .store
        .get_function(&config.name)
        .map_err(ApiError::from_store)?
        .map(|f| f.scale)
        .unwrap_or_default();
    fits(
        st,
        floors_except(&st.store, &config.name)? + floor(config, &scale),
    )
}

/// Before `live` of `name` moves to `version` (its floor becomes the function's).
pub(crate) fn check_live(st: &ControlState, name: &str, version: u32) -> Result<(), ApiError> {
    let store = &st.store;
    let (Some(f), Some(v)) = (
        store.get_function(name).map_err(ApiError::from_store)?,
        store
            .get_version(name, version)
            .map_err(ApiError::from_store)?,
    ) else {
        return Ok(()); // set_alias answers 404
    };
    fits(st, floors_except(store, name)? + floor(&v.config, &f.scale))
}

/// Before a rollback of `live`: the version it would land on (the newest below the
/// current one) must fit, as for `alias set`.
pub(crate) fn check_rollback(st: &ControlState, name: &str) -> Result<(), ApiError> {
    let store = &st.store;
    let Some(from) = store
        .get_function(name)
        .map_err(ApiError::from_store)?
        .and_then(|f| f.live_version)
    else {
        return Ok(()); // rollback answers 404
    };
    let to = store
        .list_versions(name)
        .map_err(ApiError::from_store)?
        .into_iter()
        .map(|v| v.version)
        .filter(|v| *v < from)
        .max();
    match to {
        Some(to) => check_live(st, name, to),
        None => Ok(()), // rollback answers 409
    }
}

/// Before `nimbus scale` changes `name`'s overrides.
pub(crate) fn check_scale(
    st: &ControlState,
    name: &str,
    min_instances: Option<u32>,
    max_instances: Option<u32>,
    reset: bool,
) -> Result<(), ApiError> {
    let store = &st.store;
    let Some(f) = store.get_function(name).map_err(ApiError::from_store)? else {
        return Ok(()); // set_scaling answers 404
    };
    let Some(live) = f.live_version else {
        return Ok(());
    };
    let Some(v) = store
        .get_version(name, live)
        .map_err(ApiError::from_store)?
    else {
        return Ok(());
    };
    let mut scale = if reset {
        ScaleOverride::default()
    } else {
        f.scale
    };
    scale.min_instances = min_instances.or(scale.min_instances);
    scale.max_instances = max_instances.or(scale.max_instances);
    fits(st, floors_except(store, name)? + floor(&v.config, &scale))
}

#[derive(Serialize)]
pub(crate) struct StatusResponse {
    budget: Budget,
    /// Instances running or starting now, and their memory limits summed.
    usage: Usage,
    /// What every live version's `min_instances` asks for.
    floor: Usage,
    /// The data dir is full: writes answer 507 until space is freed.
    storage_full: bool,
}

pub(crate) async fn status(
    State(st): State<Arc<ControlState>>,
) -> Result<Json<StatusResponse>, ApiError> {
    let store = Arc::clone(&st.store);
    let floor = blocking(move || floors_except(&store, "")).await?;
    Ok(Json(StatusResponse {
        budget: st.capacity.budget(),
        usage: st.capacity.usage(),
        floor,
        storage_full: *st.storage_full.borrow(),
    }))
}
