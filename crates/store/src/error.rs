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
    Sql(rusqlite::Error),

    /// The disk under the data dir is full (SQLITE_FULL, ENOSPC, EDQUOT): nothing of
    /// the write was kept. Every `?` on a SQLite error lands here through `From`.
    #[error("{}", nimbus_core::storage::FULL_MESSAGE)]
    StorageFull(String),

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

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        let full = match &e {
            rusqlite::Error::SqliteFailure(f, _) => f.code == rusqlite::ErrorCode::DiskFull,
            _ => false,
        };
        if full {
            Error::StorageFull(e.to_string())
        } else {
            Error::Sql(e)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_full_becomes_storage_full_other_errors_stay_sql() {
        // max_page_count makes SQLite answer SQLITE_FULL exactly as a full disk does.
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        conn.execute_batch("CREATE TABLE t (b BLOB); PRAGMA max_page_count = 3;")
            .expect("setup");
        let full = conn
            .execute("INSERT INTO t VALUES (zeroblob(1000000))", [])
            .expect_err("past max_page_count");
        assert!(matches!(Error::from(full), Error::StorageFull(_)));
        let other = conn
            .execute("INSERT INTO nope VALUES (1)", [])
            .expect_err("no table");
        assert!(matches!(Error::from(other), Error::Sql(_)));
    }
}
