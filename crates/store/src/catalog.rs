//! The catalog: the read side of functions and versions that the worker runs from.
//!
//! The first role trait of the storage seam (`docs/design/003-storage-seam.md`): cut at
//! exactly what the worker asks of storage, so the worker holds an `Arc<dyn Catalog>`
//! and never learns which backend answers it. Every method is async; a backend whose
//! driver blocks (SQLite here) moves the blocking work off the runtime inside its impl,
//! so callers never wrap calls in `spawn_blocking`.
//!
//! Object safety: the workspace has no `async-trait`, so methods return
//! [`nimbus_core::invoke::BoxFuture`], the pattern `Invoker` and `Publisher` use.

use std::sync::Arc;

use nimbus_core::Target;
use nimbus_core::invoke::BoxFuture;
use tokio::sync::watch;

use crate::{Error, Store, VersionRow};

/// One function as the pool maintainer sees it: where `live` points and every version
/// some alias points at (pools of other versions are drained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasedVersions {
    pub function: String,
    pub live: Option<u32>,
    /// Sorted, without duplicates.
    pub aliased: Vec<u32>,
}

/// What a catalog call can fail with: a typed "not found" the worker answers 404 with,
/// or the failing operation with the backend's error (internal: log it, do not echo it).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The function, its alias or its version does not exist. The message is written
    /// for API users and names what is missing.
    #[error("{}", not_found_message(.function, .target))]
    NotFound { function: String, target: Target },

    #[error("resolve a version of `{function}`: {source}")]
    Resolve {
        function: String,
        #[source]
        source: Error,
    },

    #[error("read version {version} of `{function}`: {source}")]
    ReadVersion {
        function: String,
        version: u32,
        #[source]
        source: Error,
    },

    #[error("list aliased versions: {source}")]
    ListAliased {
        #[source]
        source: Error,
    },

    /// The blocking task running the query panicked or the runtime is shutting down.
    #[error("{operation}: the storage task did not finish: {source}")]
    Task {
        operation: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl CatalogError {
    /// True for the variants whose message is meant for API users.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CatalogError::NotFound { .. })
    }
}

/// `live` is every function's default target, so a missing `live` reads as a missing
/// function: that is what a user who never named an alias asked for.
fn not_found_message(function: &str, target: &Target) -> String {
    match target {
        Target::Alias(a) if a == crate::LIVE_ALIAS => format!("function `{function}` not found"),
        Target::Alias(a) => format!("alias `{a}` of function `{function}` not found"),
        Target::Version(v) => format!("version {v} of function `{function}` not found"),
    }
}

/// The functions and versions the worker resolves invocations against.
pub trait Catalog: Send + Sync + 'static {
    /// The version `target` (an alias or a number) of `function` designates, or
    /// [`CatalogError::NotFound`] when the function, alias or version does not exist.
    fn resolve(
        &self,
        function: &str,
        target: &Target,
    ) -> BoxFuture<'_, Result<VersionRow, CatalogError>>;

    /// One version, with the operator's scaling applied; `None` when it does not exist
    /// (deleted since the caller saw it).
    fn version(
        &self,
        function: &str,
        version: u32,
    ) -> BoxFuture<'_, Result<Option<VersionRow>, CatalogError>>;

    /// Every function with its `live` version and all aliased versions, by name.
    fn aliased_versions(&self) -> BoxFuture<'_, Result<Vec<AliasedVersions>, CatalogError>>;

    /// A receiver whose value grows after every committed change to functions,
    /// versions, aliases, routes or scaling; only "it changed" is meant.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

impl Catalog for Store {
    fn resolve(
        &self,
        function: &str,
        target: &Target,
    ) -> BoxFuture<'_, Result<VersionRow, CatalogError>> {
        let conn = Arc::clone(&self.conn);
        let (function, target) = (function.to_string(), target.clone());
        Box::pin(async move {
            let (f, t) = (function.clone(), target.clone());
            let row = tokio::task::spawn_blocking(move || {
                crate::read_on(&conn, |tx| crate::resolve_tx(tx, &f, &t))
            })
            .await
            .map_err(|source| CatalogError::Task {
                operation: "resolve a version",
                source,
            })?
            .map_err(|source| CatalogError::Resolve {
                function: function.clone(),
                source,
            })?;
            row.ok_or(CatalogError::NotFound { function, target })
        })
    }

    fn version(
        &self,
        function: &str,
        version: u32,
    ) -> BoxFuture<'_, Result<Option<VersionRow>, CatalogError>> {
        let conn = Arc::clone(&self.conn);
        let function = function.to_string();
        Box::pin(async move {
            let f = function.clone();
            tokio::task::spawn_blocking(move || {
                crate::read_on(&conn, |tx| crate::version_tx(tx, &f, version))
            })
            .await
            .map_err(|source| CatalogError::Task {
                operation: "read a version",
                source,
            })?
            .map_err(|source| CatalogError::ReadVersion {
                function,
                version,
                source,
            })
        })
    }

    fn aliased_versions(&self) -> BoxFuture<'_, Result<Vec<AliasedVersions>, CatalogError>> {
        let conn = Arc::clone(&self.conn);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || crate::read_on(&conn, crate::aliased_versions_tx))
                .await
                .map_err(|source| CatalogError::Task {
                    operation: "list aliased versions",
                    source,
                })?
                .map_err(|source| CatalogError::ListAliased { source })
        })
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        Store::subscribe(self)
    }
}
