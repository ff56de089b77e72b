//! The one check a function's result passes before anyone is told it succeeded.
//!
//! Every reader of a result (the control API's envelope, the gateway's proxy-response
//! mapping, the broker's batch failures, the CLI) parses it with serde_json, whose
//! recursion limit is 128 and which refuses invalid UTF-8. A result that passed a
//! laxer check here used to fail there and turn into `null` behind a 200. So the
//! worker checks once, with the same rules and a lower depth limit that leaves room
//! for the envelopes results travel in.

use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Deepest nesting of arrays and objects a result may have (`[[1]]` is 2). The
/// envelopes results travel in add a few levels, and serde_json stops at 128.
pub const MAX_RESULT_DEPTH: usize = 100;

/// Why a result cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidResult {
    #[error("invalid UTF-8 at byte {at}")]
    DecodeUtf8 { at: usize },
    #[error("nested deeper than {limit} levels of arrays and objects")]
    Nesting { limit: usize },
    #[error("not JSON: {0}")]
    ParseJson(String),
}

/// Checks that `bytes` is one UTF-8 JSON value nested at most [`MAX_RESULT_DEPTH`] deep.
pub fn check_result(bytes: &[u8]) -> Result<(), InvalidResult> {
    check_depth(bytes, MAX_RESULT_DEPTH)
}

fn check_depth(bytes: &[u8], limit: usize) -> Result<(), InvalidResult> {
    let text = std::str::from_utf8(bytes).map_err(|e| InvalidResult::DecodeUtf8 {
        at: e.valid_up_to(),
    })?;
    let too_deep = Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = Depth {
        left: limit,
        too_deep: &too_deep,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match parsed {
        Ok(()) => Ok(()),
        Err(_) if too_deep.get() => Err(InvalidResult::Nesting { limit }),
        Err(e) => Err(InvalidResult::ParseJson(e.to_string())),
    }
}

/// Walks a value without building it, refusing to enter a container once `left` is 0.
#[derive(Clone, Copy)]
struct Depth<'a> {
    left: usize,
    too_deep: &'a Cell<bool>,
}

impl Depth<'_> {
    fn enter<E: serde::de::Error>(self) -> Result<Self, E> {
        if self.left == 0 {
            self.too_deep.set(true);
            return Err(E::custom("nested too deep"));
        }
        Ok(Depth {
            left: self.left - 1,
            ..self
        })
    }
}

impl<'de> DeserializeSeed<'de> for Depth<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Depth<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.enter()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.enter()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize, open: &str, close: &str) -> String {
        format!("{}1{}", open.repeat(depth), close.repeat(depth))
    }

    #[test]
    fn accepts_json_up_to_the_depth_limit() {
        for ok in [
            "null",
            " 1 ",
            "\"s\\u00e9\"",
            "{\"a\":[1,{\"b\":null}]}",
            "[]",
        ] {
            assert_eq!(check_result(ok.as_bytes()), Ok(()), "{ok}");
        }
        let deepest = nested(MAX_RESULT_DEPTH, "[", "]");
        assert_eq!(check_result(deepest.as_bytes()), Ok(()));
        let objects = nested(MAX_RESULT_DEPTH, "{\"k\":", "}");
        assert_eq!(check_result(objects.as_bytes()), Ok(()));
    }

    #[test]
    fn refuses_one_level_past_the_limit_and_far_past_serde_json_s() {
        for depth in [MAX_RESULT_DEPTH + 1, 128, 100_000] {
            let deep = nested(depth, "[", "]");
            assert_eq!(
                check_result(deep.as_bytes()),
                Err(InvalidResult::Nesting {
                    limit: MAX_RESULT_DEPTH
                }),
                "{depth}"
            );
        }
        let mixed = nested(MAX_RESULT_DEPTH + 1, "{\"k\":[", "]}");
        assert!(matches!(
            check_result(mixed.as_bytes()),
            Err(InvalidResult::Nesting { .. })
        ));
    }

    #[test]
    fn names_the_byte_of_invalid_utf8() {
        assert_eq!(
            check_result(b"{\"a\":\"\xff\"}"),
            Err(InvalidResult::DecodeUtf8 { at: 6 })
        );
        // Inside a key, and a truncated sequence at the end.
        assert_eq!(
            check_result(b"{\"\xc3\":1}"),
            Err(InvalidResult::DecodeUtf8 { at: 2 })
        );
        assert_eq!(
            check_result(b"\"ab\xe2\x82"),
            Err(InvalidResult::DecodeUtf8 { at: 3 })
        );
    }

    #[test]
    fn refuses_what_is_not_one_json_value() {
        for bad in ["", "{not json", "1 2", "[1,]", "\"\\ud800\"", "NaN"] {
            let err = check_result(bad.as_bytes()).expect_err(bad);
            assert!(matches!(err, InvalidResult::ParseJson(_)), "{bad}: {err:?}");
        }
        assert!(
            InvalidResult::ParseJson("x".into())
                .to_string()
                .starts_with("not JSON")
        );
    }
}
