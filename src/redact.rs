//! Removes secrets from request bodies before the audit API shows them:
//! passwords, secrets, credential blobs and anything named like a token; and
//! from URLs before logs show them.

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

/// The string values a body carries under secret keys (to scrub them from free
/// text, such as a Keystone error that echoes a refused password).
pub fn secret_values(value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_secrets(value, &mut out);
    out
}

fn collect_secrets(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) if is_secret_key(key) && !s.is_empty() => out.push(s.clone()),
                    _ => collect_secrets(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_secrets(v, out)),
        _ => {}
    }
}

/// Replaces every occurrence of a secret in free text with `***`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}

/// A path with its query: the values of secret-named parameters replaced.
pub fn redact_query(path: &str) -> String {
    let Some((p, q)) = path.split_once('?') else {
        return path.to_string();
    };
    let params: Vec<String> = q
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if is_secret_key(k) => format!("{k}={REDACTED}"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{p}?{}", params.join("&"))
}

/// A URL for logs: without credentials.
pub fn url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_scrubbed_from_text_and_queries() {
        let body = json!({"user": {"name": "bob", "password": "hunter22", "options": {"x": [{"secret": "s9"}]}}});
        let mut secrets = secret_values(&body);
        secrets.sort();
        assert_eq!(secrets, ["hunter22", "s9"]);
        assert_eq!(
            scrub(
                "Invalid input for field 'password': 'hunter22' is too short",
                &secrets
            ),
            "Invalid input for field 'password': '***' is too short"
        );
        assert_eq!(
            redact_query("/v3/users?name=a&password=p&access_token=t"),
            "/v3/users?name=a&password=***&access_token=***"
        );
        assert_eq!(redact_query("/v3/users"), "/v3/users");
    }

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
