//! API keys: created with their hash, listed, revoked, and read whole for the
//! gateway's snapshot. Secrets never reach this module; only their SHA-256.

use nimbus_core::api::{ApiKeyInfo, KeyStatus};
use nimbus_core::keys::{KeyEntry, Quota};
use rusqlite::{OptionalExtension, params};

use crate::{Error, Result, Store};

fn to_text<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>> {
    v.as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(Error::EncodeConfig)
}

/// Requests a key spent in one quota period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: String,
    pub period_start_ms: i64,
    pub count: u64,
}

/// Counters of periods older than this are deleted when new counts are written.
const USAGE_KEPT_MS: i64 = 62 * 86_400_000;

fn decode<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|source| Error::Corrupt {
        what: what.to_string(),
        source,
    })
}

type Row = (ApiKeyInfo, Vec<u8>);

/// One `api_keys` row as SQLite returns it, before its JSON columns are decoded.
struct RawKey {
    id: String,
    name: String,
    hash: Vec<u8>,
    scopes: String,
    rate: Option<String>,
    quota: Option<String>,
    created: i64,
    expires: Option<i64>,
    revoked: Option<i64>,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawKey> {
    Ok(RawKey {
        id: r.get(0)?,
        name: r.get(1)?,
        hash: r.get(2)?,
        scopes: r.get(3)?,
        rate: r.get(4)?,
        created: r.get(5)?,
        expires: r.get(6)?,
        revoked: r.get(7)?,
        quota: r.get(8)?,
    })
}

const COLUMNS: &str =
    "id, name, key_sha256, scopes, rate, created_at_ms, expires_at_ms, revoked_at_ms, quota";

impl Store {
    /// Stores a new key. A name already used (even by a revoked key) is a conflict.
    pub fn create_key(&self, info: &ApiKeyInfo, hash: &[u8; 32]) -> Result<()> {
        let scopes = serde_json::to_string(&info.scopes).map_err(Error::EncodeConfig)?;
        let rate = to_text(&info.rate)?;
        let quota = to_text(&info.quota)?;
        self.write(|tx| {
            let taken: Option<String> = tx
                .query_row(
                    "SELECT id FROM api_keys WHERE name = ?1",
                    [&info.name],
                    |r| r.get(0),
                )
                .optional()?;
            if taken.is_some() {
                return Err(Error::Conflict(format!(
                    "an API key named `{}` already exists",
                    info.name
                )));
            }
            tx.execute(
                "INSERT INTO api_keys (id, name, key_sha256, scopes, rate, created_at_ms,
                                       expires_at_ms, revoked_at_ms, quota)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8)",
                params![
                    info.id,
                    info.name,
                    &hash[..],
                    scopes,
                    rate,
                    info.created_at_ms,
                    info.expires_at_ms,
                    quota
                ],
            )?;
            Ok(((), true))
        })
    }

    /// Every key, revoked ones included, by name.
    pub fn keys(&self) -> Result<Vec<ApiKeyInfo>> {
        Ok(self.key_rows(false)?.into_iter().map(|(i, _)| i).collect())
    }

    /// What the gateway authenticates against: keys not revoked, with their hashes.
    pub fn live_keys(&self) -> Result<Vec<KeyEntry>> {
        Ok(self
            .key_rows(true)?
            .into_iter()
            .map(|(i, hash)| KeyEntry {
                id: i.id,
                name: i.name,
                hash,
                scopes: i.scopes,
                rate: i.rate,
                quota: i.quota,
                expires_at_ms: i.expires_at_ms,
            })
            .collect())
    }

    fn key_rows(&self, live_only: bool) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM api_keys {} ORDER BY name",
            if live_only {
                "WHERE revoked_at_ms IS NULL"
            } else {
                ""
            }
        );
        // One clock reading for the whole answer: statuses and quota periods agree.
        let now = nimbus_core::now_ms();
        self.read(|tx| {
            let mut stmt = tx.prepare(&sql)?;
            let raw = stmt
                .query_map([], row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            raw.into_iter()
                .map(|k| {
                    let scopes = decode(&format!("scopes of key {}", k.name), &k.scopes)?;
                    let rate = k
                        .rate
                        .map(|r| decode(&format!("rate of key {}", k.name), &r))
                        .transpose()?;
                    let quota: Option<Quota> = k
                        .quota
                        .map(|q| decode(&format!("quota of key {}", k.name), &q))
                        .transpose()?;
                    let quota_used = match &quota {
                        Some(q) => Some(usage_tx(tx, &k.id, q.period(now).0)?),
                        None => None,
                    };
                    let info = ApiKeyInfo {
                        id: k.id,
                        name: k.name,
                        scopes,
                        rate,
                        quota,
                        quota_used,
                        created_at_ms: k.created,
                        expires_at_ms: k.expires,
                        revoked_at_ms: k.revoked,
                        status: KeyStatus::at(k.revoked, k.expires, now),
                    };
                    Ok((info, k.hash))
                })
                .collect()
        })
    }

    /// Writes the gateway's quota counters (absolute counts; a lower count never
    /// replaces a higher one, so a late write cannot hand back spent requests).
    /// Not a change: key snapshots need not be rebuilt for it.
    pub fn record_key_usage(&self, usage: &[KeyUsage], now_ms: i64) -> Result<()> {
        if usage.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO key_usage (key_id, period_start_ms, count)
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = ?1)
                 ON CONFLICT (key_id, period_start_ms)
                 DO UPDATE SET count = max(count, excluded.count)",
            )?;
            for u in usage {
                stmt.execute(params![
                    u.key_id,
                    u.period_start_ms,
                    i64::try_from(u.count).unwrap_or(i64::MAX)
                ])?;
            }
            tx.execute(
                "DELETE FROM key_usage WHERE period_start_ms < ?1",
                [now_ms - USAGE_KEPT_MS],
            )?;
            Ok(((), false))
        })
    }

    /// Every key's counters for the periods holding `now_ms`: what the gateway starts
    /// from after a restart.
    pub fn current_key_usage(&self, now_ms: i64) -> Result<Vec<KeyUsage>> {
        let keys = self.live_keys()?;
        self.read(|tx| {
            let mut out = Vec::new();
            for k in keys {
                let Some(q) = k.quota else { continue };
                let start = q.period(now_ms).0;
                let count = usage_tx(tx, &k.id, start)?;
                if count > 0 {
                    out.push(KeyUsage {
                        key_id: k.id,
                        period_start_ms: start,
                        count,
                    });
                }
            }
            Ok(out)
        })
    }

    /// Revokes a key by name; revoking a revoked key is not an error (idempotent) and
    /// keeps its first revocation time.
    pub fn revoke_key(&self, name: &str, now_ms: i64) -> Result<ApiKeyInfo> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE api_keys SET revoked_at_ms = ?2
                 WHERE name = ?1 AND revoked_at_ms IS NULL",
                params![name, now_ms],
            )?;
            let exists: Option<i64> = tx
                .query_row("SELECT 1 FROM api_keys WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_none() {
                return Err(Error::NotFound(format!("API key `{name}` not found")));
            }
            Ok(((), n > 0))
        })?;
        self.keys()?
            .into_iter()
            .find(|k| k.name == name)
            .ok_or_else(|| Error::NotFound(format!("API key `{name}` not found")))
    }
}

fn usage_tx(tx: &rusqlite::Transaction<'_>, key_id: &str, start: i64) -> Result<u64> {
    let n: Option<i64> = tx
        .query_row(
            "SELECT count FROM key_usage WHERE key_id = ?1 AND period_start_ms = ?2",
            params![key_id, start],
            |r| r.get(0),
        )
        .optional()?;
    Ok(n.map(|n| n.max(0) as u64).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, id: &str) -> ApiKeyInfo {
        ApiKeyInfo {
            id: id.into(),
            name: name.into(),
            scopes: vec!["invoke:hello".into()],
            rate: Some(nimbus_core::keys::parse_rate("5/s:10").expect("rate")),
            quota: Some(nimbus_core::keys::parse_quota("100/day").expect("quota")),
            quota_used: None,
            created_at_ms: 1,
            expires_at_ms: Some(99),
            revoked_at_ms: None,
            status: KeyStatus::Active,
        }
    }

    #[test]
    fn keys_round_trip_conflict_and_revoke() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&dir.path().join("s.db")).expect("open");
        let before = *store.subscribe().borrow();
        store
            .create_key(&info("ci", "aaaaaaaaaaaa"), &[7; 32])
            .expect("create");
        assert_ne!(*store.subscribe().borrow(), before, "a new key is a change");
        let e = store.create_key(&info("ci", "bbbbbbbbbbbb"), &[8; 32]);
        assert!(matches!(e, Err(Error::Conflict(_))), "{e:?}");
        let live = store.live_keys().expect("live");
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].hash, vec![7; 32]);
        assert_eq!(live[0].rate.map(|r| r.burst), Some(10));
        let k = store.revoke_key("ci", 50).expect("revoke");
        assert_eq!(k.revoked_at_ms, Some(50));
        assert_eq!(
            store.revoke_key("ci", 60).expect("again").revoked_at_ms,
            Some(50)
        );
        assert!(store.live_keys().expect("live").is_empty());
        assert_eq!(store.keys().expect("all").len(), 1);
        assert!(matches!(
            store.revoke_key("nope", 1),
            Err(Error::NotFound(_))
        ));
        // A revoked key's name stays taken.
        assert!(store.keys().expect("all")[0].quota.is_some());
        assert!(
            store
                .create_key(&info("ci", "cccccccccccc"), &[9; 32])
                .is_err()
        );
    }

    #[test]
    fn listed_keys_say_whether_they_are_expired() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&dir.path().join("s.db")).expect("open");
        // `info` expires at 99 ms after the epoch: long past.
        store
            .create_key(&info("old", "aaaaaaaaaaaa"), &[7; 32])
            .expect("create");
        let mut fresh = info("fresh", "bbbbbbbbbbbb");
        fresh.expires_at_ms = Some(nimbus_core::now_ms() + 3_600_000);
        store.create_key(&fresh, &[8; 32]).expect("create");
        let mut forever = info("forever", "cccccccccccc");
        forever.expires_at_ms = None;
        store.create_key(&forever, &[9; 32]).expect("create");
        let status = |name: &str| {
            store
                .keys()
                .expect("keys")
                .into_iter()
                .find(|k| k.name == name)
                .map(|k| k.status)
        };
        assert_eq!(status("old"), Some(KeyStatus::Expired));
        assert_eq!(status("fresh"), Some(KeyStatus::Active));
        assert_eq!(status("forever"), Some(KeyStatus::Active));
        store.revoke_key("old", 100).expect("revoke");
        assert_eq!(status("old"), Some(KeyStatus::Revoked));
    }

    #[test]
    fn quota_usage_is_written_monotonically_and_read_for_the_current_period() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&dir.path().join("s.db")).expect("open");
        store
            .create_key(&info("ci", "aaaaaaaaaaaa"), &[7; 32])
            .expect("create");
        let now = 1_796_158_624_000;
        let start = nimbus_core::keys::parse_quota("1/day")
            .expect("q")
            .period(now)
            .0;
        let before = *store.subscribe().borrow();
        let u = |count| KeyUsage {
            key_id: "aaaaaaaaaaaa".into(),
            period_start_ms: start,
            count,
        };
        store.record_key_usage(&[u(5)], now).expect("write");
        store.record_key_usage(&[u(3)], now).expect("late write");
        assert_eq!(store.current_key_usage(now).expect("read"), vec![u(5)]);
        assert_eq!(*store.subscribe().borrow(), before, "usage is not a change");
        // The next day starts from nothing; a deleted key's counts are not kept.
        assert!(
            store
                .current_key_usage(now + 86_400_000)
                .expect("read")
                .is_empty()
        );
        let ghost = KeyUsage {
            key_id: "bbbbbbbbbbbb".into(),
            ..u(1)
        };
        store.record_key_usage(&[ghost], now).expect("ghost");
        assert_eq!(store.current_key_usage(now).expect("read").len(), 1);
    }
}
