//! Secrets: a type that never prints its value, and reading one from a file.

use std::path::Path;

/// A token, password or key: never printed (`Debug` and `Display` show `***`),
/// compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the inputs differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(candidate).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A secret given as a value or as a file (`--x-file`: its content, trailing
/// whitespace trimmed). Errors name the option and the path, never the content.
pub fn read_secret(
    value: Option<String>,
    file: Option<&Path>,
    flag: &str,
) -> Result<Option<String>, String> {
    let Some(path) = file else {
        return Ok(value);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))?;
    let text = text.trim_end();
    if text.is_empty() {
        return Err(format!("{flag}: {} is empty", path.display()));
    }
    Ok(Some(text.to_string()))
}
