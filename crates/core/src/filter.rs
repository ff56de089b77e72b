//! Subscription filters: EventBridge-style patterns written as JSON, matched against a
//! CloudEvent in its structured JSON form.
//!
//! A pattern is an object whose keys name event fields: CloudEvents attributes at the
//! top (`type`, `source`, `subject`, extensions) and `data` for the payload, nested as
//! deep as the data is. Each leaf is a list of alternatives; the field matches when
//! any alternative does, and the event matches when every field of the pattern does.
//! An alternative is a literal (exact match on a string, number, bool or null) or one
//! of `{"prefix": s}`, `{"suffix": s}`, `{"anything-but": literal | [literals] |
//! {"prefix": s} | {"suffix": s}}`, `{"numeric": [op, n]}` or `[op, n, op, n]` with
//! `op` one of `<`, `<=`, `=`, `>=`, `>`, and `{"exists": bool}`. When the event's
//! field is an array, it matches when any element does (as in EventBridge).
//!
//! Patterns are compiled once (at subscribe) so that a bad one is refused with the
//! path of the offending part, and matching never fails.

use serde_json::Value;

/// Bounds that keep one pattern cheap to match on every event.
const MAX_DEPTH: usize = 8;
const MAX_ALTERNATIVES: usize = 256;
const MAX_TEXT: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    fields: Vec<(String, Node)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Nested(Filter),
    AnyOf(Vec<Alt>),
}

#[derive(Debug, Clone, PartialEq)]
enum Alt {
    Exact(Value),
    Prefix(String),
    Suffix(String),
    Not(Box<Not>),
    Numeric(Vec<(Op, f64)>),
    Exists(bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Not {
    Values(Vec<Value>),
    Prefix(String),
    Suffix(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
}

/// A pattern that cannot be compiled: where (`data.amount[0]`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {path}: {message}")]
pub struct FilterError {
    pub path: String,
    pub message: String,
}

fn fail<T>(path: &str, message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError {
        path: if path.is_empty() {
            "(top)".into()
        } else {
            path.into()
        },
        message: message.into(),
    })
}

impl Filter {
    /// Compiles a pattern; `{}` matches every event.
    pub fn compile(pattern: &Value) -> Result<Filter, FilterError> {
        compile_object(pattern, "", 0)
    }

    pub fn matches(&self, event: &Value) -> bool {
        self.fields.iter().all(|(key, node)| {
            let field = event.get(key);
            match node {
                Node::Nested(inner) => match field {
                    Some(obj @ Value::Object(_)) => inner.matches(obj),
                    Some(Value::Array(items)) => items.iter().any(|i| inner.matches(i)),
                    _ => false,
                },
                Node::AnyOf(alts) => alts.iter().any(|a| a.matches(field)),
            }
        })
    }
}

fn compile_object(v: &Value, path: &str, depth: usize) -> Result<Filter, FilterError> {
    let Value::Object(map) = v else {
        return fail(path, "must be an object of field names");
    };
    if depth > MAX_DEPTH {
        return fail(path, format!("nests deeper than {MAX_DEPTH} levels"));
    }
    let mut fields = Vec::with_capacity(map.len());
    for (key, value) in map {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let node = match value {
            Value::Object(_) => Node::Nested(compile_object(value, &here, depth + 1)?),
            Value::Array(alts) => {
                if alts.is_empty() {
                    return fail(
                        &here,
                        "an empty list matches nothing; give at least one value",
                    );
                }
                if alts.len() > MAX_ALTERNATIVES {
                    return fail(&here, format!("at most {MAX_ALTERNATIVES} alternatives"));
                }
                let compiled = alts
                    .iter()
                    .enumerate()
                    .map(|(i, a)| compile_alt(a, &format!("{here}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                Node::AnyOf(compiled)
            }
            _ => {
                return fail(
                    &here,
                    "must be a list of alternatives (e.g. [\"order.created\"]) or an object",
                );
            }
        };
        fields.push((key.clone(), node));
    }
    Ok(Filter { fields })
}

fn text(v: &Value, path: &str, what: &str) -> Result<String, FilterError> {
    match v {
        Value::String(s) if s.len() <= MAX_TEXT => Ok(s.clone()),
        Value::String(_) => fail(path, format!("{what} is longer than {MAX_TEXT} bytes")),
        _ => fail(path, format!("{what} takes a string")),
    }
}

fn literal(v: &Value, path: &str) -> Result<Value, FilterError> {
    match v {
        Value::String(s) if s.len() > MAX_TEXT => {
            fail(path, format!("is longer than {MAX_TEXT} bytes"))
        }
        Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null => Ok(v.clone()),
        _ => fail(path, "must be a string, number, bool or null"),
    }
}

fn compile_alt(v: &Value, path: &str) -> Result<Alt, FilterError> {
    let Value::Object(op) = v else {
        return literal(v, path).map(Alt::Exact);
    };
    if op.len() != 1 {
        return fail(
            path,
            "an operator object has exactly one key: prefix, suffix, anything-but, numeric or exists",
        );
    }
    let (name, arg) = op
        .iter()
        .next()
        .map(|(k, v)| (k.as_str(), v))
        .unwrap_or(("", v));
    match name {
        "prefix" => Ok(Alt::Prefix(text(arg, path, "prefix")?)),
        "suffix" => Ok(Alt::Suffix(text(arg, path, "suffix")?)),
        "exists" => match arg {
            Value::Bool(b) => Ok(Alt::Exists(*b)),
            _ => fail(path, "exists takes true or false"),
        },
        "anything-but" => {
            let not = match arg {
                Value::Array(list) if !list.is_empty() && list.len() <= MAX_ALTERNATIVES => {
                    Not::Values(
                        list.iter()
                            .map(|l| literal(l, path))
                            .collect::<Result<_, _>>()?,
                    )
                }
                Value::Array(_) => {
                    return fail(path, "anything-but takes 1 to 256 values");
                }
                Value::Object(inner) if inner.len() == 1 => {
                    match inner.iter().next().map(|(k, v)| (k.as_str(), v)) {
                        Some(("prefix", p)) => Not::Prefix(text(p, path, "prefix")?),
                        Some(("suffix", s)) => Not::Suffix(text(s, path, "suffix")?),
                        _ => return fail(path, "anything-but takes values, {prefix} or {suffix}"),
                    }
                }
                other => Not::Values(vec![literal(other, path)?]),
            };
            Ok(Alt::Not(Box::new(not)))
        }
        "numeric" => {
            let Value::Array(parts) = arg else {
                return fail(path, "numeric takes [op, n] or [op, n, op, n]");
            };
            if parts.len() != 2 && parts.len() != 4 {
                return fail(path, "numeric takes [op, n] or [op, n, op, n]");
            }
            let mut conds = Vec::new();
            for pair in parts.chunks(2) {
                let op = match pair[0].as_str() {
                    Some("<") => Op::Lt,
                    Some("<=") => Op::Le,
                    Some("=") => Op::Eq,
                    Some(">=") => Op::Ge,
                    Some(">") => Op::Gt,
                    _ => return fail(path, "numeric operators are <, <=, =, >=, >"),
                };
                let Some(n) = pair[1].as_f64().filter(|n| n.is_finite()) else {
                    return fail(path, "numeric bounds must be numbers");
                };
                conds.push((op, n));
            }
            Ok(Alt::Numeric(conds))
        }
        other => fail(
            path,
            format!(
                "unknown operator `{other}`; allowed: prefix, suffix, anything-but, numeric, exists"
            ),
        ),
    }
}

impl Alt {
    fn matches(&self, field: Option<&Value>) -> bool {
        if let Alt::Exists(want) = self {
            let present = !matches!(field, None | Some(Value::Null));
            return present == *want;
        }
        let Some(v) = field else {
            return false;
        };
        if let Value::Array(items) = v {
            // anything-but over an array: no element may be excluded.
            if let Alt::Not(_) = self {
                return !items.is_empty() && items.iter().all(|i| self.matches_one(i));
            }
            return items.iter().any(|i| self.matches_one(i));
        }
        self.matches_one(v)
    }

    fn matches_one(&self, v: &Value) -> bool {
        match self {
            Alt::Exact(want) => literal_eq(want, v),
            Alt::Prefix(p) => v.as_str().is_some_and(|s| s.starts_with(p.as_str())),
            Alt::Suffix(p) => v.as_str().is_some_and(|s| s.ends_with(p.as_str())),
            Alt::Not(not) => match &**not {
                Not::Values(list) => !list.iter().any(|w| literal_eq(w, v)),
                Not::Prefix(p) => v.as_str().is_some_and(|s| !s.starts_with(p.as_str())),
                Not::Suffix(p) => v.as_str().is_some_and(|s| !s.ends_with(p.as_str())),
            },
            Alt::Numeric(conds) => v.as_f64().is_some_and(|n| {
                conds.iter().all(|(op, b)| match op {
                    Op::Lt => n < *b,
                    Op::Le => n <= *b,
                    Op::Eq => n == *b,
                    Op::Ge => n >= *b,
                    Op::Gt => n > *b,
                })
            }),
            Alt::Exists(_) => true,
        }
    }
}

/// Literal equality; numbers compare by value (`5` equals `5.0`).
fn literal_eq(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => want == got,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Value {
        json!({
            "specversion": "1.0", "id": "1", "source": "shop/eu", "type": "order.created",
            "subject": "orders/42",
            "data": {"amount": 120.5, "country": "FR", "tags": ["vip", "new"],
                     "customer": {"tier": "gold"}, "note": null}
        })
    }

    fn m(pattern: Value) -> bool {
        Filter::compile(&pattern)
            .expect("compiles")
            .matches(&event())
    }

    #[test]
    fn each_operator_matches_and_mismatches() {
        assert!(m(json!({})));
        assert!(m(json!({"type": ["order.created", "order.paid"]})));
        assert!(!m(json!({"type": ["order.paid"]})));
        assert!(m(json!({"source": [{"prefix": "shop/"}]})));
        assert!(!m(json!({"source": [{"prefix": "bank/"}]})));
        assert!(m(json!({"subject": [{"suffix": "/42"}]})));
        assert!(m(
            json!({"data": {"country": [{"anything-but": ["DE", "AT"]}]}})
        ));
        assert!(!m(json!({"data": {"country": [{"anything-but": "FR"}]}})));
        assert!(m(
            json!({"data": {"country": [{"anything-but": {"prefix": "D"}}]}})
        ));
        assert!(m(
            json!({"data": {"amount": [{"numeric": [">", 100, "<=", 200]}]}})
        ));
        assert!(!m(json!({"data": {"amount": [{"numeric": ["<", 100]}]}})));
        assert!(m(json!({"data": {"amount": [120.5]}})));
        assert!(m(json!({"data": {"customer": {"tier": ["gold"]}}})));
        assert!(m(json!({"data": {"missing": [{"exists": false}]}})));
        assert!(
            m(json!({"data": {"note": [{"exists": false}]}})),
            "null is absent"
        );
        assert!(!m(json!({"data": {"amount": [{"exists": false}]}})));
        assert!(
            m(json!({"data": {"tags": ["vip"]}})),
            "any element of an array"
        );
        assert!(!m(json!({"data": {"tags": [{"anything-but": ["vip"]}]}})));
        assert!(
            !m(json!({"data": {"customer": ["gold"]}})),
            "an object is not a literal"
        );
        assert!(
            !m(json!({"data": {"country": {"x": ["y"]}}})),
            "a string is not an object"
        );
        assert!(m(
            json!({"type": ["order.created"], "data": {"country": ["FR"], "amount": [{"numeric": [">=", 1]}]}})
        ));
        assert!(!m(
            json!({"type": ["order.created"], "data": {"country": ["DE"]}})
        ));
    }

    #[test]
    fn bad_patterns_name_the_offending_part() {
        let path = |p: Value| Filter::compile(&p).err().map(|e| e.path);
        assert_eq!(path(json!([])).as_deref(), Some("(top)"));
        assert_eq!(path(json!({"type": "x"})).as_deref(), Some("type"));
        assert_eq!(path(json!({"type": []})).as_deref(), Some("type"));
        assert_eq!(
            path(json!({"data": {"a": [{"wat": 1}]}})).as_deref(),
            Some("data.a[0]")
        );
        assert_eq!(
            path(json!({"a": [{"numeric": [">", "x"]}]})).as_deref(),
            Some("a[0]")
        );
        assert_eq!(
            path(json!({"a": [{"numeric": ["!", 1]}]})).as_deref(),
            Some("a[0]")
        );
        assert_eq!(path(json!({"a": [{"prefix": 1}]})).as_deref(), Some("a[0]"));
        assert_eq!(
            path(json!({"a": [{"exists": "yes"}]})).as_deref(),
            Some("a[0]")
        );
        assert_eq!(path(json!({"a": [[1]]})).as_deref(), Some("a[0]"));
        assert_eq!(
            path(json!({"a": [{"prefix": "x", "suffix": "y"}]})).as_deref(),
            Some("a[0]")
        );
        let deep = (0..12).fold(json!(["x"]), |acc, _| json!({ "d": acc }));
        assert!(Filter::compile(&deep).is_err());
    }

    proptest::proptest! {
        // Matching is total: any compiled pattern gives an answer for any event.
        #[test]
        fn matching_never_panics(
            key in "[a-z]{1,3}",
            s in ".{0,8}",
            n in proptest::num::f64::NORMAL,
            pick in 0usize..6,
        ) {
            let alt = match pick {
                0 => json!(s),
                1 => json!({"prefix": s}),
                2 => json!({"suffix": s}),
                3 => json!({"anything-but": [s]}),
                4 => json!({"numeric": [">", n]}),
                _ => json!({"exists": true}),
            };
            let f = Filter::compile(&json!({ key.clone(): [alt], "data": { key.clone(): [n] } }))
                .expect("compiles");
            for ev in [json!({}), json!({ key.clone(): s }), json!({ key.clone(): [n, s] }),
                       json!({"data": { key: n }}), json!({"data": [1, {"x": 1}]})] {
                let _ = f.matches(&ev);
            }
        }
    }
}
