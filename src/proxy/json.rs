//! A replicated write's body must mean to the gateway exactly what it means to
//! Keystone: UTF-8 JSON (no `NaN` or `Infinity`, which Python reads and JSON does
//! not allow) with no key given twice at any depth (Python keeps the last, other
//! readers the first). Anything else is refused before it is forwarded, so the
//! op log never records a write differently from how Keystone applied it.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};

/// Checks a body; the error names the problem, never a value.
pub fn check_exact(body: &[u8]) -> Result<(), String> {
    if std::str::from_utf8(body).is_err() {
        return Err("the body is not UTF-8".into());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    NoDuplicates
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => e.to_string(),
            _ => format!(
                "the body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        })
}

struct NoDuplicates;

impl<'de> DeserializeSeed<'de> for NoDuplicates {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Walk)
    }
}

struct Walk;

impl<'de> Visitor<'de> for Walk {
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
        while seq.next_element_seed(NoDuplicates)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                let shown: String = key.chars().take(64).collect();
                return Err(A::Error::custom(format!(
                    "the key '{shown}' is given twice"
                )));
            }
            map.next_value_seed(NoDuplicates)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_read_the_same_everywhere_passes() {
        assert!(
            check_exact(br#"{"user": {"name": "a", "enabled": true, "n": [1, 2.5, null]}}"#)
                .is_ok()
        );
        let dup = check_exact(br#"{"user": {"name": "a", "password": "x", "name": "b"}}"#);
        assert!(dup.unwrap_err().contains("'name' is given twice"));
        assert!(check_exact(br#"{"a": NaN}"#)
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(check_exact(br#"{"a": Infinity}"#).is_err());
        assert!(check_exact(b"{\"a\": \"\xff\"}")
            .unwrap_err()
            .contains("UTF-8"));
        assert!(check_exact(br#"{"a": 1} trailing"#).is_err());
        let secret = check_exact(br#"{"password": "hunter22", "password": "x"}"#).unwrap_err();
        assert!(!secret.contains("hunter22"));
    }
}
