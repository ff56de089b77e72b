//! API keys: their wire format, how they are hashed and checked, their scopes and
//! rate limits, and the snapshot of live keys the gateway authenticates against.
//!
//! A key reads `nmb_<id>_<secret>`: `id` (12 hex digits) is public and finds the
//! stored record; `secret` (64 hex digits, 256 random bits) is shown once at creation.
//! Only SHA-256 of the whole key is stored, and a presented key is compared with the
//! stored hash in constant time (`subtle`), so neither the database nor response times
//! give a key away. No I/O here.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "nmb_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// What a scope may grant. `invoke:F` calls function F through the gateway (and the
/// upstream routes F's manifest declares), `invoke:*` every route including upstream
/// routes no function owns (`route add --upstream`), `publish:T` publishes to topic T,
/// `connections` pushes to WebSocket connections, `metrics` reads `/metrics`.
pub const ACTIONS: &[&str] = &["invoke", "publish", "connections", "metrics"];

/// Scopes that are an action alone, with no resource.
const BARE: &[&str] = &["connections", "metrics"];

/// A freshly made key: the full text (shown once) and what is stored.
pub struct NewKey {
    pub id: String,
    pub key: String,
    pub hash: [u8; 32],
}

fn random_hex(n: usize) -> String {
    let mut out = String::with_capacity(n + 32);
    while out.len() < n {
        out.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    out.truncate(n);
    out
}

/// Makes a key from the operating system's randomness (through `uuid`'s v4
/// generator, which reads getrandom).
pub fn generate() -> NewKey {
    // v4 UUIDs carry 122 random bits in 128: pick only the random nibbles.
    let id = random_hex(ID_HEX);
    let mut secret = String::with_capacity(SECRET_HEX);
    while secret.len() < SECRET_HEX {
        let b = uuid::Uuid::new_v4().into_bytes();
        // Bytes 0..6 and 10..16 are fully random in a v4 UUID.
        for byte in b[..6].iter().chain(&b[10..]) {
            secret.push_str(&format!("{byte:02x}"));
        }
    }
    secret.truncate(SECRET_HEX);
    let key = format!("{PREFIX}{id}_{secret}");
    let hash = hash(&key);
    NewKey { id, key, hash }
}

/// The public id inside a key, if the text has a key's shape.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, ID_HEX) && hex(secret, SECRET_HEX)).then_some(id)
}

pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time comparison of a presented key with a stored hash.
pub fn verify(key: &str, stored: &[u8]) -> bool {
    stored.len() == 32 && bool::from(hash(key)[..].ct_eq(stored))
}

/// `action:resource` with resource a name or `*`, or `connections` or `metrics`.
pub fn validate_scope(scope: &str) -> Result<(), String> {
    if BARE.contains(&scope) {
        return Ok(());
    }
    let Some((action, resource)) = scope.split_once(':') else {
        return Err(format!(
            "scope `{scope}` is not `action:name` (e.g. invoke:hello, publish:orders, invoke:*)"
        ));
    };
    if !ACTIONS.contains(&action) || BARE.contains(&action) {
        return Err(format!(
            "scope `{scope}`: unknown action `{action}`; allowed: invoke, publish (and the scopes `connections`, `metrics`)"
        ));
    }
    if resource != "*" {
        crate::manifest::validate_name(resource).map_err(|e| format!("scope `{scope}`: {e}"))?;
    }
    Ok(())
}

/// Whether `scopes` grant `action` on `resource`.
pub fn allows(scopes: &[String], action: &str, resource: &str) -> bool {
    scopes.iter().any(|s| {
        if BARE.contains(&s.as_str()) {
            return action == s;
        }
        match s.split_once(':') {
            Some((a, r)) => a == action && (r == "*" || r == resource),
            None => false,
        }
    })
}

/// A token bucket: `requests` per `per` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rate {
    pub requests: u32,
    pub per: RatePeriod,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatePeriod {
    Second,
    Minute,
    Hour,
}

impl RatePeriod {
    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            RatePeriod::Second => 1,
            RatePeriod::Minute => 60,
            RatePeriod::Hour => 3600,
        })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.per {
            RatePeriod::Second => "s",
            RatePeriod::Minute => "m",
            RatePeriod::Hour => "h",
        };
        write!(f, "{}/{p}", self.requests)?;
        if self.burst != self.requests {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

/// `50/s`, `600/m`, `1000/h`, optionally `:burst` (`10/s:20`). The burst defaults to
/// the per-period count.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || {
        format!("rate `{text}` is not N/s, N/m or N/h (optionally :BURST), e.g. 50/s or 10/s:20")
    };
    let (main, burst) = match text.split_once(':') {
        Some((m, b)) => (m, Some(b)),
        None => (text, None),
    };
    let (n, per) = main.split_once('/').ok_or_else(bad)?;
    let requests: u32 = n.trim().parse().map_err(|_| bad())?;
    let per = match per.trim() {
        "s" | "sec" | "second" => RatePeriod::Second,
        "m" | "min" | "minute" => RatePeriod::Minute,
        "h" | "hour" => RatePeriod::Hour,
        _ => return Err(bad()),
    };
    let burst = match burst {
        Some(b) => b.trim().parse().map_err(|_| bad())?,
        None => requests,
    };
    if requests == 0 || burst == 0 {
        return Err(format!("rate `{text}`: counts must be at least 1"));
    }
    Ok(Rate {
        requests,
        per,
        burst,
    })
}

/// A budget of requests per calendar period (UTC), e.g. `10000/day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Quota {
    pub requests: u64,
    pub per: QuotaPeriod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    Day,
    Month,
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.per {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        };
        write!(f, "{}/{p}", self.requests)
    }
}

impl Quota {
    /// The period holding `now_ms`, as `[start, end)` in Unix milliseconds. Periods are
    /// calendar days and months in UTC, so "10000/day" means the same to every
    /// operator and resets at a time they can predict.
    pub fn period(&self, now_ms: i64) -> (i64, i64) {
        use chrono::{Datelike, TimeZone, Utc};
        const DAY: i64 = 86_400_000;
        match self.per {
            QuotaPeriod::Day => {
                let start = now_ms.div_euclid(DAY) * DAY;
                (start, start + DAY)
            }
            QuotaPeriod::Month => {
                let Some(now) = Utc.timestamp_millis_opt(now_ms).single() else {
                    return (now_ms, now_ms + 31 * DAY);
                };
                let (y, m) = (now.year(), now.month());
                let first = |y: i32, m: u32| {
                    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                        .single()
                        .map(|t| t.timestamp_millis())
                };
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                match (first(y, m), first(ny, nm)) {
                    (Some(a), Some(b)) => (a, b),
                    _ => (now_ms, now_ms + 31 * DAY),
                }
            }
        }
    }
}

/// `10000/day` (or `/d`), `250000/month` (or `/mo`).
pub fn parse_quota(text: &str) -> Result<Quota, String> {
    let bad = || format!("quota `{text}` is not N/day or N/month, e.g. 10000/day");
    let (n, per) = text.split_once('/').ok_or_else(bad)?;
    let requests: u64 = n.trim().parse().map_err(|_| bad())?;
    let per = match per.trim() {
        "d" | "day" => QuotaPeriod::Day,
        "mo" | "month" => QuotaPeriod::Month,
        _ => return Err(bad()),
    };
    if requests == 0 {
        return Err(format!("quota `{text}`: the count must be at least 1"));
    }
    Ok(Quota { requests, per })
}

/// A live key as the gateway sees it (revoked keys are not in the snapshot).
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub id: String,
    pub name: String,
    pub hash: Vec<u8>,
    pub scopes: Vec<String>,
    pub rate: Option<Rate>,
    pub quota: Option<Quota>,
    pub expires_at_ms: Option<i64>,
}

/// Why a presented key was refused. Callers answer every variant with the same 401:
/// the distinction is for logs and metrics only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    Malformed,
    Unknown,
    Expired,
}

/// The live keys, by id; rebuilt from the store on every change and swapped whole.
#[derive(Debug, Default)]
pub struct KeySet {
    by_id: HashMap<String, KeyEntry>,
}

impl KeySet {
    pub fn new(entries: impl IntoIterator<Item = KeyEntry>) -> KeySet {
        KeySet {
            by_id: entries.into_iter().map(|e| (e.id.clone(), e)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The key's entry if `presented` is a live key at `now_ms`.
    pub fn authenticate(&self, presented: &str, now_ms: i64) -> Result<&KeyEntry, KeyRefusal> {
        let id = key_id(presented).ok_or(KeyRefusal::Malformed)?;
        let entry = self.by_id.get(id).ok_or(KeyRefusal::Unknown)?;
        if !verify(presented, &entry.hash) {
            return Err(KeyRefusal::Unknown);
        }
        if entry.expires_at_ms.is_some_and(|t| t <= now_ms) {
            return Err(KeyRefusal::Expired);
        }
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_verify_and_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a.key, b.key);
        assert_eq!(key_id(&a.key), Some(a.id.as_str()));
        assert!(verify(&a.key, &a.hash));
        assert!(!verify(&b.key, &a.hash));
        assert!(!verify(&a.key, &a.hash[..31]));
        assert_eq!(a.key.len(), PREFIX.len() + ID_HEX + 1 + SECRET_HEX);
    }

    #[test]
    fn malformed_keys_have_no_id() {
        for bad in [
            "",
            "nmb_",
            "nmb_abc_def",
            "xyz_0123456789ab_00",
            "nmb_0123456789ab",
        ] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
        let k = generate().key;
        assert_eq!(key_id(&format!("{k}0")), None);
        assert_eq!(key_id(&k.replace('_', "-")), None);
    }

    #[test]
    fn keysets_refuse_unknown_forged_and_expired_keys() {
        let k = generate();
        let entry = |expires| KeyEntry {
            id: k.id.clone(),
            name: "ci".into(),
            hash: k.hash.to_vec(),
            scopes: vec!["invoke:hello".into()],
            rate: None,
            quota: None,
            expires_at_ms: expires,
        };
        let set = KeySet::new([entry(Some(2_000))]);
        assert_eq!(
            set.authenticate(&k.key, 1_000).map(|e| e.name.as_str()),
            Ok("ci")
        );
        assert_eq!(
            set.authenticate(&k.key, 2_000).err(),
            Some(KeyRefusal::Expired)
        );
        // Same id, another secret: a forgery that knows the public id.
        let forged = format!("{PREFIX}{}_{}", k.id, "0".repeat(SECRET_HEX));
        assert_eq!(
            set.authenticate(&forged, 0).err(),
            Some(KeyRefusal::Unknown)
        );
        assert_eq!(
            set.authenticate(&generate().key, 0).err(),
            Some(KeyRefusal::Unknown)
        );
        assert_eq!(
            set.authenticate("Bearer x", 0).err(),
            Some(KeyRefusal::Malformed)
        );
        assert!(
            KeySet::new([entry(None)])
                .authenticate(&k.key, i64::MAX)
                .is_ok()
        );
    }

    #[test]
    fn quotas_parse_and_their_periods_are_utc_calendar_days_and_months() {
        let q = parse_quota("10000/day").expect("day");
        assert_eq!(q.to_string(), "10000/day");
        assert_eq!(parse_quota("5/mo").expect("mo").per, QuotaPeriod::Month);
        for bad in ["", "10", "0/day", "x/day", "10/week", "-1/day"] {
            assert!(parse_quota(bad).is_err(), "{bad}");
        }
        // 2026-12-01T20:57:04Z
        let now = 1_796_158_624_000;
        let (a, b) = q.period(now);
        assert_eq!((a % 86_400_000, b - a), (0, 86_400_000));
        assert!(a <= now && now < b);
        // December 2026 starts 2026-12-01T00:00Z and has 31 days.
        let (a, b) = parse_quota("1/month").expect("m").period(now);
        assert_eq!(a, 1_796_083_200_000);
        assert_eq!(b - a, 31 * 86_400_000);
        let feb = parse_quota("1/month").expect("m").period(1_802_217_600_000);
        assert_eq!(
            feb,
            (1_801_440_000_000, 1_803_859_200_000),
            "2027-02 has 28 days"
        );
    }

    #[test]
    fn scopes_match_action_and_resource() {
        let s: Vec<String> = vec!["invoke:hello".into(), "publish:*".into()];
        assert!(allows(&s, "invoke", "hello"));
        assert!(!allows(&s, "invoke", "hello2"));
        assert!(allows(&s, "publish", "orders"));
        assert!(!allows(&s, "connections", "x"));
        assert!(allows(&["connections".to_string()], "connections", "x"));
        assert!(allows(&["metrics".to_string()], "metrics", ""));
        assert!(!allows(&["metrics".to_string()], "connections", ""));
        assert!(!allows(&["connections".to_string()], "metrics", ""));
        assert!(!allows(&["invoke:*".to_string()], "metrics", ""));
        assert!(validate_scope("metrics").is_ok());
        assert!(validate_scope("metrics:x").is_err());
        assert!(validate_scope("invoke:hello").is_ok());
        assert!(validate_scope("invoke:*").is_ok());
        assert!(validate_scope("connections").is_ok());
        assert!(validate_scope("admin:x").is_err());
        assert!(validate_scope("invoke").is_err());
        assert!(validate_scope("invoke:Bad Name").is_err());
    }

    #[test]
    fn rates_parse() {
        let r = parse_rate("50/s").expect("rate");
        assert_eq!((r.requests, r.per, r.burst), (50, RatePeriod::Second, 50));
        let r = parse_rate("10/s:20").expect("rate");
        assert_eq!(r.burst, 20);
        assert_eq!(r.to_string(), "10/s burst 20");
        assert_eq!(parse_rate("600/m").expect("rate").per, RatePeriod::Minute);
        for bad in ["", "50", "0/s", "5/d", "x/s", "5/s:0", "5/s:x"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
