//! API keys: created with their hash, listed, revoked, and read whole for the
//! gateway's snapshot. Secrets never reach this module; only their SHA-256.

use nimbus_core::api::ApiKeyInfo;
use nimbus_core::keys::{KeyEntry, Rate};
use rusqlite::{OptionalExtension, params};

use crate::{Error, Result, Store};

fn rate_to_text(rate: &Option<Rate>) -> Result<Option<String>> {
    rate.as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(Error::EncodeConfig)
}

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
    })
}

const COLUMNS: &str =
    "id, name, key_sha256, scopes, rate, created_at_ms, expires_at_ms, revoked_at_ms";

impl Store {
    /// Stores a new key. A name already used (even by a revoked key) is a conflict.
    pub fn create_key(&self, info: &ApiKeyInfo, hash: &[u8; 32]) -> Result<()> {
        let scopes = serde_json::to_string(&info.scopes).map_err(Error::EncodeConfig)?;
        let rate = rate_to_text(&info.rate)?;
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
                                       expires_at_ms, revoked_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)",
                params![
                    info.id,
                    info.name,
                    &hash[..],
                    scopes,
                    rate,
                    info.created_at_ms,
                    info.expires_at_ms
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
                    let info = ApiKeyInfo {
                        id: k.id,
                        name: k.name,
                        scopes,
                        rate,
                        created_at_ms: k.created,
                        expires_at_ms: k.expires,
                        revoked_at_ms: k.revoked,
                    };
                    Ok((info, k.hash))
                })
                .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, id: &str) -> ApiKeyInfo {
        ApiKeyInfo {
            id: id.into(),
            name: name.into(),
            scopes: vec!["invoke:hello".into()],
            rate: Some(nimbus_core::keys::parse_rate("5/s:10").expect("rate")),
            created_at_ms: 1,
            expires_at_ms: Some(99),
            revoked_at_ms: None,
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
        assert!(
            store
                .create_key(&info("ci", "cccccccccccc"), &[9; 32])
                .is_err()
        );
    }
}
