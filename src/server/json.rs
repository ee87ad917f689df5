//! Request bodies as JSON, with one rule more than `serde_json` keeps: an object may not
//! name a key twice. `serde_json` keeps the last value and drops the others without a
//! word, so `{"archetype_id": "a", "archetype_id": "b"}` would write `b` and
//! `{"userName": "x", "userName": "y"}` would provision `y`; which one the sender meant
//! is not ours to guess, and both protocols refuse the body instead.

use serde::Deserializer;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Parse a request body as one JSON value, refusing an object that repeats a key. The
/// error is the client's message: what is wrong and where, as `serde_json` says it.
pub(crate) fn request_body(bytes: &[u8]) -> Result<Value, String> {
    from_slice(bytes).map_err(|e| match e.classify() {
        // Only the repeated key is a data error here; the rest is the text itself.
        serde_json::error::Category::Data => format!("request body: {e}"),
        _ => format!("request body is not valid JSON: {e}"),
    })
}

fn from_slice(bytes: &[u8]) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Builds a [`Value`] as `serde_json` does, checking each object's keys.
#[derive(Clone, Copy)]
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text has no NaN or infinity, so this is always a number.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element_seed(Strict)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "the key {key:?} is given twice in one object; give it once"
                )));
            }
            let v = map.next_value_seed(Strict)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_same_values_as_serde_json() {
        let text = r#"{"a": [1, -2, 3.5, 18446744073709551615, true, null, "é\n"],
            "b": {"c": {}, "d": []}, "e": 1e300}"#;
        assert_eq!(
            from_slice(text.as_bytes()).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
        assert_eq!(from_slice(b" 7 ").unwrap(), json!(7));
    }

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        for (text, key) in [
            (
                r#"{"archetype_id": "a", "archetype_id": "b"}"#,
                "archetype_id",
            ),
            (r#"{"emails": [{"value": "x", "value": "y"}]}"#, "value"),
            (
                r#"{"name": {"givenName": "B", "familyName": "J", "givenName": "C"}}"#,
                "givenName",
            ),
        ] {
            let e = request_body(text.as_bytes()).unwrap_err();
            assert!(
                e.starts_with(&format!("request body: the key {key:?} is given twice")),
                "{text}: {e}"
            );
            assert!(e.contains("line 1 column"), "{e}");
        }
        // Keys differing in case are different keys to JSON; the protocols decide.
        assert!(from_slice(br#"{"userName": "a", "username": "b"}"#).is_ok());
    }

    #[test]
    fn what_serde_json_refuses_is_still_refused() {
        for text in ["", "{", "[1,]", "{\"a\":1} x", "NaN", "{\"a\":1,}"] {
            let e = request_body(text.as_bytes()).unwrap_err();
            assert!(e.starts_with("request body is not valid JSON: "), "{e}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(
            from_slice(deep.as_bytes()).is_err(),
            "the depth limit holds"
        );
    }
}
