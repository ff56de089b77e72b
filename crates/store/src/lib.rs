//! nimbus-store: the platform's durable state, embedded in one SQLite file.
//!
//! Owns: functions, their immutable versions (artifact digest + validated config),
//! aliases (`live`, user-named) and installed routes; the schema and its embedded
//! migrations; and a change feed ([`Store::subscribe`]) the gateway rebuilds its route
//! table from. The API speaks only nimbus types (no SQL, no rusqlite handles), so a
//! PostgreSQL backend can implement the same methods later.
//!
//! Must not touch: artifact bytes (the `artifacts` crate stores them; this crate only
//! records digests and tells the caller which ones became unreferenced), the network,
//! config files or env. It reads the clock only to stamp rows.
//!
//! # What is durable
//! - Every method that changes state runs in one SQLite transaction (`BEGIN IMMEDIATE`)
//!   and returns `Ok` only after `COMMIT` returned. The file is opened with
//!   `journal_mode=WAL` and `synchronous=FULL`, under which SQLite fsyncs the WAL on
//!   every commit; [`Store::open`] reads `synchronous` back and refuses to run without
//!   FULL. So an acknowledged write (a deploy, an alias move, a rollback, a delete)
//!   survives a process crash, SIGKILL and power loss, provided the disk honours fsync.
//! - A write that returned `Err`, or was cut off by a crash before returning, changed
//!   nothing: there is no partially applied deploy (version without its `live` alias or
//!   routes, or routes that conflict).
//! - Not durable: the change-feed counter. It starts at 0 at every open and only counts
//!   changes made through this `Store` value; subscribers must treat any bump as "reload".
//! - Metering records ([`Recorder`]) are written off the invocation path in batches and
//!   are only crash-safe, not power-loss-safe; see [`metering`].
//! - Not covered: artifacts. A caller must have stored the artifact durably before
//!   [`Store::deploy`] records its digest, and should garbage-collect artifacts not in
//!   [`Store::digests_in_use`] at start-up, because a crash between
//!   [`Store::delete_function`] and the artifact deletion leaves orphans behind.
//!
//! # Concurrency
//! One connection behind a `Mutex`; methods are synchronous and short (SQL only, no I/O
//! besides SQLite's own while the lock is held). Async callers wrap them in
//! `spawn_blocking`, or go through an async role trait ([`Catalog`]) whose impl does it
//! for them; the rest of the storage seam follows (`docs/design/003-storage-seam.md`).
//! Another process opening the same file is tolerated (writers wait up to
//! [`BUSY_TIMEOUT`]), but its changes do not reach this `Store`'s change feed.
#![forbid(unsafe_code)]

mod catalog;
mod error;
pub mod events;
mod keys;
pub mod metering;
mod migrations;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use nimbus_core::routes::{RouteEntry, RouteTable, validate_route_path};
use nimbus_core::{AuthKind, FunctionConfig, Target};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use catalog::{AliasedVersions, Catalog, CatalogError};
pub use error::Error;
pub use keys::KeyUsage;
pub use metering::{LogRetention, Recorder, RecorderConfig, Retention};

/// The alias every deploy points at its new version, and routes from manifests use.
pub const LIVE_ALIAS: &str = "live";

/// How long a write waits for another connection's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// `PRAGMA synchronous` value the store requires (FULL).
const SYNCHRONOUS_FULL: i64 = 2;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One immutable version of a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub function: String,
    pub version: u32,
    /// Digest of the code archive, as the `artifacts` crate names it.
    pub digest: String,
    pub size: u64,
    pub config: FunctionConfig,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The function's small unique number (1, 2, ...), stable for its lifetime; the
    /// worker derives the sandbox uid/gid from it.
    pub sandbox_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRow {
    pub name: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC; moves on a new version or an alias change.
    pub updated_at: String,
    pub latest_version: u32,
    /// Where the `live` alias points.
    pub live_version: Option<u32>,
    /// Operator overrides of the manifest's scaling (`nimbus scale`).
    pub scale: ScaleOverride,
}

/// `nimbus scale`: replaces the manifest's `min_instances` / `max_instances` for every
/// version of a function until cleared. `None` keeps the manifest's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScaleOverride {
    pub min_instances: Option<u32>,
    pub max_instances: Option<u32>,
}

impl ScaleOverride {
    /// Applies the override to a manifest's concurrency, keeping min <= max.
    pub fn apply(&self, c: &mut nimbus_core::Concurrency) {
        if let Some(max) = self.max_instances {
            c.max_instances = max;
        }
        if let Some(min) = self.min_instances {
            c.min_instances = min;
        }
        c.min_instances = c.min_instances.min(c.max_instances);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRow {
    pub name: String,
    pub version: u32,
    /// RFC 3339, UTC.
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployResult {
    pub version: VersionRow,
    /// False when code and config equal the latest version's and nothing was created.
    pub created: bool,
}

/// Where a route came from: a deploy replaces its function's `Manifest` routes and
/// leaves `Api` ones alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSource {
    Manifest,
    Api,
}

impl RouteSource {
    fn as_str(self) -> &'static str {
        match self {
            RouteSource::Manifest => "manifest",
            RouteSource::Api => "api",
        }
    }
}

/// Alias names share URLs with version numbers (`hello:3`, `hello:live`), so an
/// all-digit alias would be ambiguous.
pub fn validate_alias_name(alias: &str) -> Result<()> {
    let ok = !alias.is_empty()
        && alias.len() <= 64
        && alias
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !alias.chars().all(|c| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "`{alias}` is not a valid alias name: use 1-64 characters of a-z, 0-9, `-` and `_`, not only digits"
        )))
    }
}

/// The nimbus state store. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Store {
    /// Shared with the blocking tasks the async [`Catalog`] impl runs its queries on.
    conn: Arc<Mutex<Connection>>,
    changes: watch::Sender<u64>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, checks it is configured for
    /// durable commits, and applies pending migrations. The parent directory must exist.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = open_configured(path)?;
        migrations::migrate(&mut conn)?;
        let (changes, _) = watch::channel(0);
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            changes,
        })
    }

    /// A receiver whose value grows after every committed change to functions, versions,
    /// aliases or routes. Only "it changed" is meant; the value itself is not durable.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records a deploy of `config.name` with code `digest` (`size` bytes).
    ///
    /// If the latest version has the same digest and config, no version is made, `live`
    /// is pointed at that version (it may have been rolled back) and it is returned with
    /// `created: false`. Otherwise a new version (latest + 1)
    /// is created, `live` points at it and the function's manifest routes are replaced
    /// by `config.routes`; if those conflict with any other installed route the whole
    /// deploy is rolled back and [`Error::RouteConflict`] returned.
    pub fn deploy(&self, digest: &str, size: u64, config: &FunctionConfig) -> Result<DeployResult> {
        let name = config.name.as_str();
        nimbus_core::manifest::validate_name(name).map_err(Error::Invalid)?;
        validate_digest(digest)?;
        for route in &config.routes {
            validate_route_path(&route.path)
                .map_err(|m| Error::Invalid(format!("route `{}`: {m}", route.route_key())))?;
            validate_route_target(&route.host, &route.upstream)
                .map_err(|m| Error::Invalid(format!("route `{}`: {m}", route.route_key())))?;
        }
        // serde_json writes struct fields in declaration order and `env` is a BTreeMap,
        // so equal configs always serialize to equal bytes.
        let config_json = serde_json::to_string(config).map_err(Error::EncodeConfig)?;
        let config_hash = sha256_hex(config_json.as_bytes());
        let now = now();

        self.write(|tx| {
            tx.execute(
                "INSERT INTO functions (name, created_at, updated_at, sandbox_id)
                 VALUES (?1, ?2, ?2, (SELECT COALESCE(MAX(sandbox_id), 0) + 1 FROM functions))
                 ON CONFLICT (name) DO NOTHING",
                params![name, now],
            )?;
            let latest: Option<(u32, String, String)> = tx
                .query_row(
                    "SELECT version, digest, config_hash FROM versions
                     WHERE function = ?1 ORDER BY version DESC LIMIT 1",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;

            let unchanged = latest
                .as_ref()
                .filter(|(_, d, h)| d == digest && *h == config_hash);
            if let Some((version, _, _)) = unchanged {
                // Deploying is "make this code live": after a rollback, redeploying the
                // latest code moves `live` forward again without a new version.
                let added = tx.execute(
                    "INSERT INTO aliases (function, name, version, updated_at)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (function, name)
                     DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at
                     WHERE aliases.version <> excluded.version",
                    params![name, LIVE_ALIAS, version, now],
                )?;
                let row = version_tx(tx, name, *version)?.ok_or_else(|| {
                    Error::NotFound(format!("version {version} of `{name}` not found"))
                })?;
                let result = DeployResult {
                    version: row,
                    created: false,
                };
                return Ok((result, added > 0));
            }

            let version = match &latest {
                None => 1,
                Some((v, _, _)) => v.checked_add(1).ok_or_else(|| {
                    Error::Conflict(format!("`{name}` has reached the maximum version number"))
                })?,
            };
            tx.execute(
                "INSERT INTO versions
                   (function, version, digest, size, config_json, config_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![name, version, digest, size, config_json, config_hash, now],
            )?;
            upsert_alias(tx, name, LIVE_ALIAS, version, &now)?;

            let new_routes: Vec<RouteEntry> = config
                .routes
                .iter()
                .map(|r| RouteEntry {
                    method: r.method.clone(),
                    path: r.path.clone(),
                    function: name.to_string(),
                    alias: LIVE_ALIAS.to_string(),
                    host: r.host.clone(),
                    upstream: r.upstream.clone(),
                    auth: r.auth,
                    options: r.options.clone(),
                })
                .collect();
            // Existing routes first, so a conflict names the new route as the offender.
            let mut all = routes_tx(
                tx,
                "WHERE NOT (function = ?1 AND source = 'manifest')",
                [name],
            )?;
            all.extend(new_routes.iter().cloned());
            RouteTable::build(all)?;

            tx.execute(
                "DELETE FROM routes WHERE function = ?1 AND source = 'manifest'",
                [name],
            )?;
            for route in &new_routes {
                insert_route(tx, route, RouteSource::Manifest, &now)?;
            }
            touch_function(tx, name, &now)?;

            let row = version_tx(tx, name, version)?.ok_or_else(|| {
                Error::NotFound(format!("version {version} of `{name}` not found"))
            })?;
            Ok((
                DeployResult {
                    version: row,
                    created: true,
                },
                true,
            ))
        })
    }

    /// All functions, by name.
    /// Overrides a function's scaling for all its versions (`nimbus scale`). `None`
    /// leaves a bound as it is; `clear` drops both overrides first.
    pub fn set_scaling(
        &self,
        name: &str,
        min_instances: Option<u32>,
        max_instances: Option<u32>,
        clear: bool,
    ) -> Result<FunctionRow> {
        let limit = nimbus_core::manifest::MAX_INSTANCES_LIMIT;
        if let Some(max) = max_instances
            && !(1..=limit).contains(&max)
        {
            return Err(Error::Invalid(format!(
                "max instances {max} is outside 1..{limit}"
            )));
        }
        if let (Some(min), Some(max)) = (min_instances, max_instances)
            && min > max
        {
            return Err(Error::Invalid(format!(
                "min instances {min} is above max instances {max}"
            )));
        }
        if min_instances.is_some_and(|m| m > limit) {
            return Err(Error::Invalid(format!("min instances is above {limit}")));
        }
        self.write(|tx| {
            require_function(tx, name)?;
            if clear {
                tx.execute(
                    "UPDATE functions SET min_instances = NULL, max_instances = NULL
                     WHERE name = ?1",
                    [name],
                )?;
            }
            if let Some(min) = min_instances {
                tx.execute(
                    "UPDATE functions SET min_instances = ?2 WHERE name = ?1",
                    params![name, min],
                )?;
            }
            if let Some(max) = max_instances {
                tx.execute(
                    "UPDATE functions SET max_instances = ?2 WHERE name = ?1",
                    params![name, max],
                )?;
            }
            touch_function(tx, name, &now())?;
            let row = function_tx(tx, name)?
                .ok_or_else(|| Error::NotFound(format!("function `{name}` not found")))?;
            Ok((row, true))
        })
    }

    pub fn list_functions(&self) -> Result<Vec<FunctionRow>> {
        self.read(|tx| {
            let sql = format!("{FUNCTION_SELECT} ORDER BY f.name");
            let mut stmt = tx.prepare(&sql)?;
            let rows = stmt.query_map([], function_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    pub fn get_function(&self, name: &str) -> Result<Option<FunctionRow>> {
        self.read(|tx| function_tx(tx, name))
    }

    /// Versions of `name`, oldest first; empty when the function does not exist.
    pub fn list_versions(&self, name: &str) -> Result<Vec<VersionRow>> {
        self.read(|tx| {
            let sql = format!("{VERSION_SELECT} WHERE v.function = ?1 ORDER BY v.version");
            let mut stmt = tx.prepare(&sql)?;
            let raws = stmt
                .query_map([name], RawVersion::from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            raws.into_iter().map(RawVersion::decode).collect()
        })
    }

    pub fn get_version(&self, name: &str, version: u32) -> Result<Option<VersionRow>> {
        self.read(|tx| version_tx(tx, name, version))
    }

    /// The cron triggers of every function's `live` version, as (function, spec):
    /// what the scheduler runs and `GET /v1/cron` lists.
    pub fn live_cron_specs(&self) -> Result<Vec<(String, nimbus_core::cron::CronSpec)>> {
        let mut out = Vec::new();
        for f in self.list_functions()? {
            let Some(live) = f.live_version else { continue };
            if let Some(v) = self.get_version(&f.name, live)? {
                out.extend(
                    v.config
                        .cron_specs()
                        .into_iter()
                        .map(|c| (f.name.clone(), c)),
                );
            }
        }
        Ok(out)
    }

    /// The version `target` designates, or `None` when the function, alias or version
    /// does not exist.
    pub fn resolve(&self, name: &str, target: &Target) -> Result<Option<VersionRow>> {
        self.read(|tx| resolve_tx(tx, name, target))
    }

    /// Aliases of `name`, by alias name; empty when the function does not exist.
    pub fn list_aliases(&self, name: &str) -> Result<Vec<AliasRow>> {
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT name, version, updated_at FROM aliases WHERE function = ?1 ORDER BY name",
            )?;
            let rows = stmt.query_map([name], |r| {
                Ok(AliasRow {
                    name: r.get(0)?,
                    version: r.get(1)?,
                    updated_at: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// Points `alias` of `name` at `version`, creating the alias if needed.
    pub fn set_alias(&self, name: &str, alias: &str, version: u32) -> Result<AliasRow> {
        validate_alias_name(alias)?;
        let now = now();
        self.write(|tx| {
            require_function(tx, name)?;
            if version_tx(tx, name, version)?.is_none() {
                return Err(Error::NotFound(format!(
                    "version {version} of `{name}` not found"
                )));
            }
            let changed = upsert_alias(tx, name, alias, version, &now)?;
            if changed {
                touch_function(tx, name, &now)?;
            }
            let row = tx.query_row(
                "SELECT name, version, updated_at FROM aliases WHERE function = ?1 AND name = ?2",
                params![name, alias],
                |r| {
                    Ok(AliasRow {
                        name: r.get(0)?,
                        version: r.get(1)?,
                        updated_at: r.get(2)?,
                    })
                },
            )?;
            Ok((row, changed))
        })
    }

    /// Moves `alias` to the highest version below the one it points at.
    /// Returns `(from, to)`.
    pub fn rollback(&self, name: &str, alias: &str) -> Result<(u32, u32)> {
        let now = now();
        self.write(|tx| {
            require_function(tx, name)?;
            let from = alias_version(tx, name, alias)?
                .ok_or_else(|| Error::NotFound(format!("alias `{alias}` of `{name}` not found")))?;
            let to: Option<u32> = tx.query_row(
                "SELECT MAX(version) FROM versions WHERE function = ?1 AND version < ?2",
                params![name, from],
                |r| r.get(0),
            )?;
            let Some(to) = to else {
                return Err(Error::Conflict(format!(
                    "`{alias}` is already at the oldest version ({from})"
                )));
            };
            upsert_alias(tx, name, alias, to, &now)?;
            touch_function(tx, name, &now)?;
            Ok(((from, to), true))
        })
    }

    /// Deletes a function with its versions, aliases and routes. Returns the digests
    /// that no version of any function references any more, so the caller can delete
    /// those artifacts.
    pub fn delete_function(&self, name: &str) -> Result<Vec<String>> {
        self.write(|tx| {
            require_function(tx, name)?;
            let digests: Vec<String> = {
                let mut stmt =
                    tx.prepare("SELECT DISTINCT digest FROM versions WHERE function = ?1")?;
                let rows = stmt.query_map([name], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            tx.execute("DELETE FROM functions WHERE name = ?1", [name])?;
            let mut unreferenced = Vec::new();
            for digest in digests {
                let used: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM versions WHERE digest = ?1)",
                    [&digest],
                    |r| r.get(0),
                )?;
                if !used {
                    unreferenced.push(digest);
                }
            }
            unreferenced.sort();
            Ok((unreferenced, true))
        })
    }

    /// Every installed route, ordered by path then method; always a conflict-free set.
    pub fn routes(&self) -> Result<Vec<RouteEntry>> {
        self.read(|tx| routes_tx(tx, "", []))
    }

    /// Routes of one function (manifest and API ones).
    pub fn function_routes(&self, name: &str) -> Result<Vec<RouteEntry>> {
        self.read(|tx| routes_tx(tx, "WHERE function = ?1", [name]))
    }

    /// Installs a route outside the manifest (it survives deploys). Rejects a route
    /// that conflicts with any installed one.
    ///
    /// A route points at a function's alias or, with no function, at upstreams.
    pub fn add_route(&self, route: &RouteEntry) -> Result<()> {
        let invalid = |m: String| Error::Invalid(format!("route `{}`: {m}", route.route_key()));
        validate_route_path(&route.path).map_err(invalid)?;
        validate_route_target(&route.host, &route.upstream).map_err(invalid)?;
        match (route.function.is_empty(), route.upstream.is_empty()) {
            (true, true) => return Err(invalid("needs a function or upstreams".into())),
            (false, false) => {
                return Err(invalid(
                    "points at a function or at upstreams, not both".into(),
                ));
            }
            _ => {}
        }
        let now = now();
        self.write(|tx| {
            if !route.function.is_empty() {
                require_function(tx, &route.function)?;
                if alias_version(tx, &route.function, &route.alias)?.is_none() {
                    return Err(Error::NotFound(format!(
                        "alias `{}` of `{}` not found",
                        route.alias, route.function
                    )));
                }
            }
            let mut all = routes_tx(tx, "", [])?;
            all.push(route.clone());
            RouteTable::build(all)?;
            insert_route(tx, route, RouteSource::Api, &now)?;
            Ok(((), true))
        })
    }

    /// Removes a route added with [`Store::add_route`]; manifest routes change by deploy.
    /// `host` is `""` for a host-less route.
    pub fn remove_route(&self, host: &str, method: &str, path: &str) -> Result<RouteEntry> {
        self.write(|tx| {
            let key = format!("{method} {host}{path}");
            let found: Option<(String, String)> = tx
                .query_row(
                    "SELECT COALESCE(function, ''), source FROM routes
                     WHERE host = ?1 AND method = ?2 AND path = ?3",
                    params![host, method, path],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((function, source)) = found else {
                return Err(Error::NotFound(format!("route `{key}` not found")));
            };
            if source != RouteSource::Api.as_str() {
                return Err(Error::Conflict(format!(
                    "route `{key}` comes from the manifest of `{function}`; change its nimbus.toml and deploy"
                )));
            }
            let entry = routes_tx(
                tx,
                "WHERE host = ?1 AND method = ?2 AND path = ?3",
                [host, method, path],
            )?
            .pop()
            .ok_or_else(|| Error::NotFound(format!("route `{key}` not found")))?;
            tx.execute(
                "DELETE FROM routes WHERE host = ?1 AND method = ?2 AND path = ?3",
                params![host, method, path],
            )?;
            Ok((entry, true))
        })
    }

    /// Every digest some version references, sorted; artifacts not in it are garbage.
    pub fn digests_in_use(&self) -> Result<Vec<String>> {
        self.read(|tx| {
            let mut stmt = tx.prepare("SELECT DISTINCT digest FROM versions ORDER BY digest")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        lock_conn(&self.conn)
    }

    /// Runs `f` in a write transaction. `f` returns its result and whether it changed
    /// anything the change feed covers; the feed is bumped only after a commit.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<(T, bool)>) -> Result<T> {
        let mut conn = self.lock();
        // IMMEDIATE takes the write lock up front, so a concurrent writer waits in
        // busy_timeout instead of failing with SQLITE_BUSY on a read->write upgrade.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (out, changed) = f(&tx)?;
        tx.commit()?;
        drop(conn);
        if changed {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(out)
    }

    /// Runs `f` in a read transaction, so multi-statement reads see one snapshot.
    fn read<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        read_on(&self.conn, f)
    }
}

fn lock_conn(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic under the lock cannot leave a transaction half-applied: `Transaction`
    // rolls back on drop while unwinding, so the connection is still sound.
    conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// [`Store::read`] on the shared connection itself, for blocking tasks that cannot
/// borrow the `Store`.
pub(crate) fn read_on<T>(
    conn: &Mutex<Connection>,
    f: impl FnOnce(&Transaction<'_>) -> Result<T>,
) -> Result<T> {
    let mut conn = lock_conn(conn);
    let tx = conn.transaction()?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
}

/// A connection to `path` with the durability PRAGMAs set and checked.
pub(crate) fn open_configured(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    configure(&conn, path)?;
    Ok(conn)
}

/// Sets the per-connection PRAGMAs and reads back the ones durability depends on.
fn configure(conn: &Connection, path: &Path) -> Result<()> {
    let open_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    enable_wal(conn, path)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    // Only macOS needs these for fsync to reach the platter; elsewhere they are no-ops.
    conn.pragma_update(None, "fullfsync", true)
        .map_err(open_err)?;
    conn.pragma_update(None, "checkpoint_fullfsync", true)
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(open_err)?;
    // An SQLite built without foreign keys answers no row at all; cascades would not run.
    let fk: Option<i64> = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .optional()
        .map_err(open_err)?;
    if fk != Some(1) {
        return Err(Error::Pragma {
            path: path.to_path_buf(),
            pragma: "foreign_keys",
            wanted: "1",
            found: fk.map_or_else(|| "unsupported".to_string(), |v| v.to_string()),
        });
    }
    check_synchronous(conn)
}

fn check_synchronous(conn: &Connection) -> Result<()> {
    let level: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if level == SYNCHRONOUS_FULL {
        Ok(())
    } else {
        Err(Error::Durability { found: level })
    }
}

fn validate_digest(digest: &str) -> Result<()> {
    let ok = !digest.is_empty()
        && digest.len() <= 256
        && digest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "`{digest}` is not a valid artifact digest"
        )))
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(hash.len() * 2);
    for b in hash {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

const FUNCTION_SELECT: &str = "SELECT f.name, f.created_at, f.updated_at,
        (SELECT MAX(v.version) FROM versions v WHERE v.function = f.name),
        (SELECT a.version FROM aliases a WHERE a.function = f.name AND a.name = 'live'),
        f.min_instances, f.max_instances
    FROM functions f";

/// Busy timeout and WAL, checked: every connection to the state file needs both.
pub(crate) fn enable_wal(conn: &Connection, path: &Path) -> Result<()> {
    let open_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Pragma {
            path: path.to_path_buf(),
            pragma: "journal_mode",
            wanted: "wal",
            found: mode,
        });
    }
    Ok(())
}

fn function_row(r: &Row<'_>) -> rusqlite::Result<FunctionRow> {
    Ok(FunctionRow {
        name: r.get(0)?,
        created_at: r.get(1)?,
        updated_at: r.get(2)?,
        // A function is created with its first version in one transaction; 0 would
        // only show for a row written by something else.
        latest_version: r.get::<_, Option<u32>>(3)?.unwrap_or(0),
        live_version: r.get(4)?,
        scale: ScaleOverride {
            min_instances: r.get(5)?,
            max_instances: r.get(6)?,
        },
    })
}

fn function_tx(tx: &Transaction<'_>, name: &str) -> Result<Option<FunctionRow>> {
    let sql = format!("{FUNCTION_SELECT} WHERE f.name = ?1");
    Ok(tx.query_row(&sql, [name], function_row).optional()?)
}

fn require_function(tx: &Transaction<'_>, name: &str) -> Result<()> {
    let exists: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM functions WHERE name = ?1)",
        [name],
        |r| r.get(0),
    )?;
    if exists {
        Ok(())
    } else {
        Err(Error::NotFound(format!("function `{name}` not found")))
    }
}

fn touch_function(tx: &Transaction<'_>, name: &str, now: &str) -> Result<()> {
    tx.execute(
        "UPDATE functions SET updated_at = ?2 WHERE name = ?1",
        params![name, now],
    )?;
    Ok(())
}

const VERSION_SELECT: &str = "SELECT v.function, v.version, v.digest, v.size, v.config_json,
     v.created_at, f.sandbox_id, f.min_instances, f.max_instances
     FROM versions v JOIN functions f ON f.name = v.function";

/// A version row before its config JSON is decoded (decoding errors are not SQL errors).
struct RawVersion {
    function: String,
    version: u32,
    digest: String,
    size: u64,
    config_json: String,
    created_at: String,
    sandbox_id: u32,
    scale: ScaleOverride,
}

impl RawVersion {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawVersion> {
        Ok(RawVersion {
            function: r.get(0)?,
            version: r.get(1)?,
            digest: r.get(2)?,
            size: r.get(3)?,
            config_json: r.get(4)?,
            created_at: r.get(5)?,
            sandbox_id: r.get(6)?,
            scale: ScaleOverride {
                min_instances: r.get(7)?,
                max_instances: r.get(8)?,
            },
        })
    }

    fn decode(self) -> Result<VersionRow> {
        let mut config: FunctionConfig =
            serde_json::from_str(&self.config_json).map_err(|source| Error::Corrupt {
                what: format!("config of `{}` version {}", self.function, self.version),
                source,
            })?;
        // Versions are immutable; the operator's scaling applies on top of each.
        self.scale.apply(&mut config.concurrency);
        Ok(VersionRow {
            function: self.function,
            version: self.version,
            digest: self.digest,
            size: self.size,
            config,
            created_at: self.created_at,
            sandbox_id: self.sandbox_id,
        })
    }
}

pub(crate) fn version_tx(
    tx: &Transaction<'_>,
    name: &str,
    version: u32,
) -> Result<Option<VersionRow>> {
    let sql = format!("{VERSION_SELECT} WHERE v.function = ?1 AND v.version = ?2");
    let raw = tx
        .query_row(&sql, params![name, version], RawVersion::from_row)
        .optional()?;
    raw.map(RawVersion::decode).transpose()
}

pub(crate) fn resolve_tx(
    tx: &Transaction<'_>,
    name: &str,
    target: &Target,
) -> Result<Option<VersionRow>> {
    match target {
        Target::Version(v) => version_tx(tx, name, *v),
        Target::Alias(alias) => match alias_version(tx, name, alias)? {
            Some(v) => version_tx(tx, name, v),
            None => Ok(None),
        },
    }
}

/// Every function with its `live` version and aliased versions, in one snapshot (two
/// queries, not one per function, so the maintainer's tick stays cheap).
pub(crate) fn aliased_versions_tx(tx: &Transaction<'_>) -> Result<Vec<AliasedVersions>> {
    let mut out: Vec<AliasedVersions> = {
        let mut stmt = tx.prepare(
            "SELECT f.name,
               (SELECT a.version FROM aliases a WHERE a.function = f.name AND a.name = ?1)
             FROM functions f ORDER BY f.name",
        )?;
        let rows = stmt.query_map([LIVE_ALIAS], |r| {
            Ok(AliasedVersions {
                function: r.get(0)?,
                live: r.get(1)?,
                aliased: Vec::new(),
            })
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut stmt =
        tx.prepare("SELECT DISTINCT function, version FROM aliases ORDER BY function, version")?;
    let pairs = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (function, version) in pairs {
        // Both lists are sorted by name, and every alias has its function (foreign key).
        if let Ok(i) = out.binary_search_by(|f| f.function.as_str().cmp(&function)) {
            out[i].aliased.push(version);
        }
    }
    Ok(out)
}

fn alias_version(tx: &Transaction<'_>, name: &str, alias: &str) -> Result<Option<u32>> {
    Ok(tx
        .query_row(
            "SELECT version FROM aliases WHERE function = ?1 AND name = ?2",
            params![name, alias],
            |r| r.get(0),
        )
        .optional()?)
}

/// Creates or moves an alias; true when something changed.
fn upsert_alias(
    tx: &Transaction<'_>,
    name: &str,
    alias: &str,
    version: u32,
    now: &str,
) -> Result<bool> {
    let n = tx.execute(
        "INSERT INTO aliases (function, name, version, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (function, name) DO UPDATE
           SET version = excluded.version, updated_at = excluded.updated_at
           WHERE aliases.version <> excluded.version",
        params![name, alias, version, now],
    )?;
    Ok(n > 0)
}

fn auth_to_str(auth: AuthKind) -> Result<String> {
    // Stored as its serde name (`api_key`) so the column reads like the manifest.
    match serde_json::to_value(auth) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        Ok(other) => Err(Error::Invalid(format!("unsupported auth kind {other}"))),
        Err(e) => Err(Error::EncodeConfig(e)),
    }
}

/// The checks every stored route's host and upstreams pass, whoever made it.
fn validate_route_target(host: &str, upstream: &[String]) -> std::result::Result<(), String> {
    if !host.is_empty() && nimbus_core::routes::validate_host(host)? != host {
        return Err(format!("host `{host}` must be lower-case"));
    }
    if !upstream.is_empty() {
        nimbus_core::route_options::parse_upstreams(upstream)?;
    }
    Ok(())
}

fn insert_route(
    tx: &Transaction<'_>,
    route: &RouteEntry,
    source: RouteSource,
    now: &str,
) -> Result<()> {
    // No function is NULL, so the foreign keys leave a function-less route alone.
    let function = (!route.function.is_empty()).then_some(route.function.as_str());
    let alias = function.map(|_| route.alias.as_str());
    tx.execute(
        "INSERT INTO routes
           (host, method, path, function, alias, auth, source, created_at, options, upstream)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            route.host,
            route.method,
            route.path,
            function,
            alias,
            auth_to_str(route.auth)?,
            source.as_str(),
            now,
            serde_json::to_string(&route.options).map_err(Error::EncodeConfig)?,
            serde_json::to_string(&route.upstream).map_err(Error::EncodeConfig)?,
        ],
    )?;
    Ok(())
}

fn routes_tx<P: rusqlite::Params>(
    tx: &Transaction<'_>,
    filter: &str,
    params: P,
) -> Result<Vec<RouteEntry>> {
    let sql = format!(
        "SELECT method, path, COALESCE(function, ''), COALESCE(alias, ''), auth, options, host,
                upstream
         FROM routes {filter} ORDER BY path, method, host"
    );
    let mut stmt = tx.prepare(&sql)?;
    let raws = stmt
        .query_map(params, |r| {
            Ok((
                RouteEntry {
                    method: r.get(0)?,
                    path: r.get(1)?,
                    function: r.get(2)?,
                    alias: r.get(3)?,
                    host: r.get(6)?,
                    upstream: Vec::new(),
                    auth: AuthKind::None,
                    options: Default::default(),
                },
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(7)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    raws.into_iter()
        .map(|(mut entry, auth, options, upstream)| {
            entry.upstream = serde_json::from_str(&upstream).map_err(|source| Error::Corrupt {
                what: format!("upstreams of route `{}`", entry.route_key()),
                source,
            })?;
            entry.options = serde_json::from_str(&options).map_err(|source| Error::Corrupt {
                what: format!("options of route `{}`", entry.route_key()),
                source,
            })?;
            entry.auth =
                serde_json::from_value(serde_json::Value::String(auth)).map_err(|source| {
                    Error::Corrupt {
                        what: format!("auth of route `{}`", entry.route_key()),
                        source,
                    }
                })?;
            Ok(entry)
        })
        .collect()
}

#[cfg(test)]
mod tests;
