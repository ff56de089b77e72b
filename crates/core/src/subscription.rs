//! Subscriptions as users write them (`[[events]]` in `nimbus.toml`, `nimbus
//! subscribe`): one validated shape with its defaults and bounds, shared by the
//! manifest check at parse time, the control API and the broker. No I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::filter::Filter;

pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const MAX_MAX_ATTEMPTS: u32 = 100;
pub const DEFAULT_MAX_AGE_MS: i64 = 24 * 3_600_000;
/// Retries never outlive the default topic retention by much: past it the event is gone.
pub const MAX_MAX_AGE_MS: i64 = 14 * 86_400_000;
pub const MAX_BATCH: u32 = 1_000;

/// A validated subscription definition (without its runtime state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionSpec {
    pub name: String,
    pub topic: String,
    pub function: String,
    pub alias: String,
    /// The pattern as given (`{}` matches everything); compiles (checked here).
    pub filter: Value,
    pub batch: u32,
    pub max_attempts: u32,
    pub max_age_ms: i64,
    pub dead_letter: Option<String>,
    pub ordered: bool,
}

/// The fields of `[[events]]` and of `POST /v1/subscriptions` alike.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    #[serde(default)]
    pub name: Option<String>,
    pub topic: String,
    /// Only in the API: a manifest's subscriptions belong to its function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// `6h`, `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered: Option<bool>,
}

/// A problem with one field: `(field, message)`.
pub type FieldError = (String, String);

impl RawSubscription {
    /// Validates against the function it delivers to; `default_name` is used when
    /// `name` is absent.
    pub fn validate(
        self,
        function: &str,
        default_name: &str,
    ) -> Result<SubscriptionSpec, FieldError> {
        let bad = |f: &str, m: String| (f.to_string(), m);
        crate::manifest::validate_name(&self.topic).map_err(|m| bad("topic", m))?;
        let name = self.name.unwrap_or_else(|| default_name.to_string());
        crate::manifest::validate_name(&name).map_err(|m| bad("name", m))?;
        let alias = self.alias.unwrap_or_else(|| "live".into());
        if alias.is_empty() || alias.len() > 64 {
            return Err(bad("alias", "must be 1-64 characters".into()));
        }
        let filter = self
            .filter
            .unwrap_or_else(|| Value::Object(Default::default()));
        Filter::compile(&filter).map_err(|e| bad("filter", e.to_string()))?;
        let batch = self.batch.unwrap_or(1);
        if !(1..=MAX_BATCH).contains(&batch) {
            return Err(bad("batch", format!("must be between 1 and {MAX_BATCH}")));
        }
        let max_attempts = self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !(1..=MAX_MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(bad(
                "max_attempts",
                format!("must be between 1 and {MAX_MAX_ATTEMPTS}"),
            ));
        }
        let max_age_ms = match &self.max_age {
            None => DEFAULT_MAX_AGE_MS,
            Some(t) => {
                let d = crate::duration::parse_duration(t).map_err(|m| bad("max_age", m))?;
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            }
        };
        if !(1_000..=MAX_MAX_AGE_MS).contains(&max_age_ms) {
            return Err(bad("max_age", "must be between 1s and 14d".into()));
        }
        if let Some(d) = &self.dead_letter {
            crate::manifest::validate_name(d).map_err(|m| bad("dead_letter", m))?;
            if *d == self.topic {
                return Err(bad(
                    "dead_letter",
                    "must not be the subscribed topic (failures would loop)".into(),
                ));
            }
        }
        Ok(SubscriptionSpec {
            name,
            topic: self.topic,
            function: function.to_string(),
            alias,
            filter,
            batch,
            max_attempts,
            max_age_ms,
            dead_letter: self.dead_letter,
            ordered: self.ordered.unwrap_or(false),
        })
    }
}

/// The `[[events]]` entries of a manifest, validated; field names in errors are
/// `events[i].field`. Default names are `<function>-<topic>`, which two entries for
/// one topic cannot share.
pub fn from_manifest(
    function: &str,
    entries: &[Value],
) -> Result<Vec<SubscriptionSpec>, FieldError> {
    let mut out: Vec<SubscriptionSpec> = Vec::with_capacity(entries.len());
    for (i, v) in entries.iter().enumerate() {
        let field = |f: &str| format!("events[{i}].{f}");
        let raw: RawSubscription = serde_json::from_value(v.clone())
            .map_err(|e| (format!("events[{i}]"), e.to_string()))?;
        if raw.function.is_some() {
            return Err((
                field("function"),
                "a manifest's subscriptions deliver to its own function".into(),
            ));
        }
        let default_name = format!("{function}-{}", raw.topic);
        let spec = raw
            .validate(function, &default_name)
            .map_err(|(f, m)| (field(&f), m))?;
        if out.iter().any(|o| o.name == spec.name) {
            return Err((
                field("name"),
                format!(
                    "two subscriptions are named `{}`; give each a distinct `name`",
                    spec.name
                ),
            ));
        }
        out.push(spec);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn manifest_entries_get_defaults_and_errors_name_the_field() {
        let subs = from_manifest(
            "billing",
            &[json!({"topic": "orders", "filter": {"type": ["order.created"]}, "batch": 10})],
        )
        .expect("valid");
        assert_eq!(subs[0].name, "billing-orders");
        assert_eq!(subs[0].alias, "live");
        assert_eq!(subs[0].max_attempts, DEFAULT_MAX_ATTEMPTS);
        for (entry, field) in [
            (
                json!({"topic": "orders", "filter": {"type": "x"}}),
                "events[0].filter",
            ),
            (json!({"topic": "orders", "batch": 0}), "events[0].batch"),
            (
                json!({"topic": "orders", "max_age": "soon"}),
                "events[0].max_age",
            ),
            (
                json!({"topic": "orders", "dead_letter": "orders"}),
                "events[0].dead_letter",
            ),
            (json!({"topic": "Bad"}), "events[0].topic"),
            (json!({"topic": "orders", "bogus": 1}), "events[0]"),
        ] {
            match from_manifest("billing", std::slice::from_ref(&entry)) {
                Err((f, m)) => assert_eq!(f, field, "{entry}: {m}"),
                Ok(_) => panic!("{entry} accepted"),
            }
        }
        let two = [json!({"topic": "orders"}), json!({"topic": "orders"})];
        assert_eq!(
            from_manifest("billing", &two).map_err(|e| e.0),
            Err("events[1].name".to_string())
        );
    }
}
