//! The store's one error type; its user-facing variants are shown to API callers as-is.

use std::path::PathBuf;

use nimbus_core::routes::RouteConflict;

/// Everything the store can fail with.
///
/// `NotFound`, `Conflict`, `RouteConflict` and `Invalid` carry messages written for API
/// users and may be shown as they are. The other variants describe internal failures:
/// log them, answer 500, and do not echo them to clients.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// A PRAGMA the store relies on did not take effect (e.g. WAL on a file system
    /// without shared memory, or an SQLite built without foreign keys).
    #[error("configure database {}: PRAGMA {pragma} is `{found}` after setting it to `{wanted}`", path.display())]
    Pragma {
        path: PathBuf,
        pragma: &'static str,
        wanted: &'static str,
        found: String,
    },

    /// `PRAGMA synchronous` read back as something other than FULL (2), so an
    /// acknowledged commit could be lost on power failure. The store refuses to run so.
    #[error(
        "PRAGMA synchronous is {found} after setting it to FULL (2): acknowledged writes could be lost in a crash, refusing to open"
    )]
    Durability { found: i64 },

    #[error("migrate database to schema version {version}: {source}")]
    Migrate {
        version: u32,
        #[source]
        source: rusqlite::Error,
    },

    /// The file was written by a newer nimbus; running older migrations on it is unsafe.
    #[error(
        "database schema version {found} is newer than this build supports ({supported}); upgrade nimbus"
    )]
    SchemaTooNew { found: u32, supported: u32 },

    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),

    #[error("encode function config: {0}")]
    EncodeConfig(#[source] serde_json::Error),

    /// A stored value that should have been written by this crate does not decode.
    #[error("stored {what} is unreadable: {source}")]
    Corrupt {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    Conflict(String),

    #[error(transparent)]
    RouteConflict(#[from] RouteConflict),

    #[error("{0}")]
    Invalid(String),

    /// The event log cannot take writes (closed, or its writer thread is gone).
    #[error("event log: {0}")]
    Unavailable(String),

    #[error("start the metering writer thread: {0}")]
    SpawnRecorder(#[source] std::io::Error),
}

impl Error {
    /// True for the variants whose message is meant for API users (4xx answers).
    pub fn is_user_facing(&self) -> bool {
        matches!(
            self,
            Error::NotFound(_) | Error::Conflict(_) | Error::RouteConflict(_) | Error::Invalid(_)
        )
    }
}
