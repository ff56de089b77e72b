//! Embedded schema migrations.
//!
//! `PRAGMA user_version` holds how many steps of [`MIGRATIONS`] a file has had. Steps
//! are append-only: never edit a released step, add a new one at the end. All pending
//! steps and the version bump run in one transaction, so a crash mid-migration leaves
//! the file at its previous version. `foreign_keys` is already ON when steps run and
//! cannot be switched inside a transaction, so a step that rebuilds a table must copy
//! it in an order that keeps every reference valid (or use `PRAGMA defer_foreign_keys`).

use rusqlite::{Connection, TransactionBehavior};

use crate::Error;

/// Step N (1-based) brings a file from schema version N-1 to N.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: functions, immutable versions, aliases and routes.
    r#"
    CREATE TABLE functions (
        name        TEXT PRIMARY KEY NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    ) STRICT;

    CREATE TABLE versions (
        function     TEXT NOT NULL REFERENCES functions (name) ON DELETE CASCADE,
        version      INTEGER NOT NULL CHECK (version >= 1),
        digest       TEXT NOT NULL,
        size         INTEGER NOT NULL CHECK (size >= 0),
        config_json  TEXT NOT NULL,
        config_hash  TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        PRIMARY KEY (function, version)
    ) STRICT;
    CREATE INDEX versions_by_digest ON versions (digest);

    -- A version is what an alias, a worker pool and a user's rollback refer to; changing
    -- one in place would make all of them lie.
    CREATE TRIGGER versions_are_immutable BEFORE UPDATE ON versions
    BEGIN
        SELECT RAISE (ABORT, 'versions are immutable');
    END;

    -- The version FK is NO ACTION (checked at statement end) rather than RESTRICT, so
    -- deleting a function cascades through versions and aliases in one statement.
    CREATE TABLE aliases (
        function    TEXT NOT NULL REFERENCES functions (name) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        version     INTEGER NOT NULL,
        updated_at  TEXT NOT NULL,
        PRIMARY KEY (function, name),
        FOREIGN KEY (function, version) REFERENCES versions (function, version)
    ) STRICT;

    CREATE TABLE routes (
        method      TEXT NOT NULL,
        path        TEXT NOT NULL,
        function    TEXT NOT NULL REFERENCES functions (name) ON DELETE CASCADE,
        alias       TEXT NOT NULL,
        auth        TEXT NOT NULL,
        source      TEXT NOT NULL CHECK (source IN ('manifest', 'api')),
        created_at  TEXT NOT NULL,
        PRIMARY KEY (method, path),
        FOREIGN KEY (function, alias) REFERENCES aliases (function, name)
    ) STRICT;
    CREATE INDEX routes_by_function ON routes (function);
    "#,
    // 2: a small integer per function from which the worker derives the function's
    // sandbox uid/gid, so two functions never share files or signals.
    r#"
    ALTER TABLE functions ADD COLUMN sandbox_id INTEGER;
    UPDATE functions SET sandbox_id = rowid;
    CREATE UNIQUE INDEX functions_by_sandbox_id ON functions (sandbox_id);
    "#,
    // 3: operator overrides of a function's scaling (`nimbus scale`), NULL = the manifest's.
    r#"
    ALTER TABLE functions ADD COLUMN min_instances INTEGER;
    ALTER TABLE functions ADD COLUMN max_instances INTEGER;
    "#,
    // 4: metering. One row per finished invocation, and its captured output apart so
    // usage scans never read log text. No foreign key to `functions`: usage outlives
    // a deleted function until retention prunes it. `invocation_logs.seq` is
    // AUTOINCREMENT so a `logs -f` cursor never sees a number twice, even after the
    // newest rows were pruned.
    r#"
    CREATE TABLE invocations (
        request_id         TEXT PRIMARY KEY NOT NULL,
        function           TEXT NOT NULL,
        version            INTEGER NOT NULL,
        trigger            TEXT NOT NULL,
        started_at_ms      INTEGER NOT NULL,
        duration_ms        REAL NOT NULL,
        billed_ms          INTEGER NOT NULL CHECK (billed_ms >= 0),
        memory_mb          INTEGER NOT NULL,
        gb_seconds         REAL NOT NULL,
        peak_memory_bytes  INTEGER,
        cpu_ms             REAL,
        cold_start         INTEGER NOT NULL CHECK (cold_start IN (0, 1)),
        init_duration_ms   REAL,
        status             TEXT NOT NULL,
        error_type         TEXT
    ) STRICT;
    CREATE INDEX invocations_by_function_time ON invocations (function, started_at_ms);
    CREATE INDEX invocations_by_time ON invocations (started_at_ms);

    CREATE TABLE invocation_logs (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id     TEXT NOT NULL UNIQUE,
        function       TEXT NOT NULL,
        started_at_ms  INTEGER NOT NULL,
        logs           TEXT NOT NULL
    ) STRICT;
    CREATE INDEX invocation_logs_by_function_time ON invocation_logs (function, started_at_ms);

    -- Pruning deletes invocations; their output goes with them.
    CREATE TRIGGER invocations_drop_logs AFTER DELETE ON invocations
    BEGIN
        DELETE FROM invocation_logs WHERE request_id = old.request_id;
    END;
    "#,
    // 5: API keys for the gateway. Only the SHA-256 of a key is kept; `id` is the
    // public part of the key text and finds the row. Revoked keys stay, so `keys ls`
    // can show when and so a name is never silently reused for another secret.
    r#"
    CREATE TABLE api_keys (
        id             TEXT PRIMARY KEY NOT NULL,
        name           TEXT NOT NULL UNIQUE,
        key_sha256     BLOB NOT NULL CHECK (length(key_sha256) = 32),
        scopes         TEXT NOT NULL,
        rate           TEXT,
        created_at_ms  INTEGER NOT NULL,
        expires_at_ms  INTEGER,
        revoked_at_ms  INTEGER
    ) STRICT;
    "#,
    // 6: per-route options (CORS, rate limits) as JSON; '{}' is none.
    r#"
    ALTER TABLE routes ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
    "#,
    // 7: API key quotas (JSON, NULL = none) and the requests counted against them per
    // period, written by the gateway's counters about once a second.
    r#"
    ALTER TABLE api_keys ADD COLUMN quota TEXT;
    CREATE TABLE key_usage (
        key_id          TEXT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
        period_start_ms INTEGER NOT NULL,
        count           INTEGER NOT NULL,
        PRIMARY KEY (key_id, period_start_ms)
    ) STRICT;
    "#,
    // 8: routes to upstream HTTP services and per-host routes. A route added with
    // `route add --upstream` belongs to no function, so `function`/`alias` become
    // nullable (SQLite checks no foreign key with a NULL column); a manifest's
    // upstream route keeps its function as owner, so its deploy and delete still
    // reach it. The key gains the host ('' = any). SQLite cannot change a key or a
    // NOT NULL in place: rebuild. Nothing references `routes`, so dropping it with
    // foreign keys on is safe.
    r#"
    CREATE TABLE routes_v7 (
        host        TEXT NOT NULL DEFAULT '',
        method      TEXT NOT NULL,
        path        TEXT NOT NULL,
        function    TEXT REFERENCES functions (name) ON DELETE CASCADE,
        alias       TEXT,
        auth        TEXT NOT NULL,
        source      TEXT NOT NULL CHECK (source IN ('manifest', 'api')),
        created_at  TEXT NOT NULL,
        options     TEXT NOT NULL DEFAULT '{}',
        upstream    TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (host, method, path),
        FOREIGN KEY (function, alias) REFERENCES aliases (function, name),
        CHECK ((function IS NULL) = (alias IS NULL)),
        CHECK (function IS NOT NULL OR upstream <> '[]')
    ) STRICT;
    INSERT INTO routes_v7 (host, method, path, function, alias, auth, source, created_at, options)
        SELECT '', method, path, function, alias, auth, source, created_at, options FROM routes;
    DROP TABLE routes;
    ALTER TABLE routes_v7 RENAME TO routes;
    CREATE INDEX routes_by_function ON routes (function);
    "#,
];

pub(crate) fn migrate(conn: &mut Connection) -> Result<(), Error> {
    migrate_steps(conn, MIGRATIONS)
}

/// Brings a database to the last of `steps` (each file kind has its own list).
pub(crate) fn migrate_steps(conn: &mut Connection, steps: &[&str]) -> Result<(), Error> {
    let at = |version: u32| move |source| Error::Migrate { version, source };
    let target = steps.len() as u32;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(at(target))?;
    let current: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(at(target))?;
    // user_version is a signed 32-bit field; a negative one was not written by us.
    let current = u32::try_from(current).map_err(|_| Error::SchemaTooNew {
        found: current as u32,
        supported: target,
    })?;
    if current > target {
        return Err(Error::SchemaTooNew {
            found: current,
            supported: target,
        });
    }
    for (i, step) in steps.iter().enumerate().skip(current as usize) {
        let version = i as u32 + 1;
        tx.execute_batch(step).map_err(at(version))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(at(version))?;
    }
    tx.commit().map_err(at(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("read user_version")
    }

    #[test]
    fn applies_all_steps_once() {
        let mut conn = Connection::open_in_memory().expect("open");
        migrate(&mut conn).expect("first migration");
        assert_eq!(user_version(&conn), MIGRATIONS.len() as i64);
        // Running again must be a no-op, not a "table already exists" error.
        migrate(&mut conn).expect("second migration");
        assert_eq!(user_version(&conn), MIGRATIONS.len() as i64);
    }

    #[test]
    fn step_7_keeps_routes_and_allows_function_less_ones() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "foreign_keys", true).expect("fk");
        let tx = conn.transaction().expect("tx");
        for step in &MIGRATIONS[..6] {
            tx.execute_batch(step).expect("old step");
        }
        tx.pragma_update(None, "user_version", 6).expect("version");
        tx.execute_batch(
            "INSERT INTO functions VALUES ('f', 'now', 'now', 1, NULL, NULL);
             INSERT INTO versions VALUES ('f', 1, 'd', 1, '{}', 'h', 'now');
             INSERT INTO aliases VALUES ('f', 'live', 1, 'now');
             INSERT INTO routes (method, path, function, alias, auth, source, created_at, options)
                 VALUES ('GET', '/x', 'f', 'live', 'none', 'api', 'now', '{\"rate\":null}');",
        )
        .expect("old rows");
        tx.commit().expect("commit");
        migrate(&mut conn).expect("step 7");
        let row: (String, String, String, String) = conn
            .query_row(
                "SELECT host, function, options, upstream FROM routes WHERE path = '/x'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("kept");
        assert_eq!(
            row,
            ("".into(), "f".into(), "{\"rate\":null}".into(), "[]".into())
        );
        conn.execute(
            "INSERT INTO routes (host, method, path, auth, source, created_at, upstream)
             VALUES ('', 'GET', '/x', 'none', 'api', 'now', '[\"http://a\"]')",
            [],
        )
        .expect_err("same key");
        conn.execute(
            "INSERT INTO routes (host, method, path, auth, source, created_at, upstream)
             VALUES ('a.test', 'GET', '/x', 'none', 'api', 'now', '[\"http://a\"]')",
            [],
        )
        .expect("function-less route on another host");
        conn.execute(
            "INSERT INTO routes (host, method, path, auth, source, created_at)
             VALUES ('', 'GET', '/y', 'none', 'api', 'now')",
            [],
        )
        .expect_err("a route needs a function or upstreams");
        conn.execute("DELETE FROM functions WHERE name = 'f'", [])
            .expect("cascade");
        let left: i64 = conn
            .query_row("SELECT count(*) FROM routes", [], |r| r.get(0))
            .expect("count");
        assert_eq!(left, 1);
    }

    #[test]
    fn refuses_newer_schema() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "user_version", 999)
            .expect("set user_version");
        let err = migrate(&mut conn).expect_err("newer schema");
        assert!(
            matches!(err, Error::SchemaTooNew { found: 999, .. }),
            "{err}"
        );
    }

    #[test]
    fn failed_step_leaves_version_unchanged() {
        let mut conn = Connection::open_in_memory().expect("open");
        // A table the first step wants to create already exists: step 1 must fail whole.
        conn.execute_batch("CREATE TABLE routes (x INTEGER);")
            .expect("pre-create");
        let err = migrate(&mut conn).expect_err("step 1 fails");
        assert!(matches!(err, Error::Migrate { version: 1, .. }), "{err}");
        assert_eq!(user_version(&conn), 0);
        let functions: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'functions'",
                [],
                |r| r.get(0),
            )
            .expect("query schema");
        assert_eq!(functions, 0, "partial step must roll back");
    }
}
