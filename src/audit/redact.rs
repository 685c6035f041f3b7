//! Removes secrets from request bodies before the audit API shows them:
//! passwords, secrets, credential blobs and anything named like a token.

use serde_json::Value;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "***";

/// Whether a JSON key names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    matches!(
        k.as_str(),
        "password" | "original_password" | "secret" | "blob"
    ) || k.contains("token")
        || k.contains("password")
        || k.ends_with("_secret")
}

/// Replaces every secret value, at any depth, with `***`.
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if is_secret_key(key) {
                    *v = Value::String(REDACTED.into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let mut v = json!({
            "user": {"name": "alice", "password": "s3cret", "options": {"x": 1}},
            "original_password": "old",
            "credential": {"blob": "{\"access\":\"a\",\"secret\":\"b\"}", "type": "ec2"},
            "list": [{"secret": "x", "keep": "y"}],
            "X-Auth-Token": "tok",
            "access_token_id": "t2",
            "application_credential_secret": "acs"
        });
        redact(&mut v);
        assert_eq!(
            v,
            json!({
                "user": {"name": "alice", "password": "***", "options": {"x": 1}},
                "original_password": "***",
                "credential": {"blob": "***", "type": "ec2"},
                "list": [{"secret": "***", "keep": "y"}],
                "X-Auth-Token": "***",
                "access_token_id": "***",
                "application_credential_secret": "***"
            })
        );
    }
}
