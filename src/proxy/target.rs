//! Normalises a write's request target once, so that the classifier and the
//! upstream see the same request: escapes of unreserved characters are decoded,
//! dot segments resolved and duplicate slashes collapsed. What Keystone would
//! route differently from how it reads here (an encoded `/`, a `\`, a NUL, bytes
//! that are not UTF-8, a broken escape) is refused before anything is forwarded.

/// Why a request target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the path contains an encoded '/' (%2F)")]
    EncodedSlash,
    #[error("the path contains a '\\'")]
    Backslash,
    #[error("the path contains a NUL byte")]
    Nul,
    #[error("the path does not decode to UTF-8")]
    NotUtf8,
    #[error("the path contains a malformed percent escape")]
    BadEscape,
    #[error("the method is not in upper case")]
    LowerCaseMethod,
}

/// Request headers an upstream server, WSGI stack or framework may use to route
/// a request, or re-read its method or path, differently from the request line
/// the gateway classified (gunicorn takes `SCRIPT_NAME` from a trusted peer and
/// strips it from the path; frameworks honour method overrides and original-URL
/// headers). Names are compared lower case, with `_` read as `-`.
const REROUTING_HEADERS: [&str; 17] = [
    "script-name",
    "path-info",
    "request-uri",
    "request-method",
    "query-string",
    "x-original-url",
    "x-original-uri",
    "x-original-path",
    "x-original-method",
    "x-rewrite-url",
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-forwarded-uri",
    "x-envoy-original-path",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The first header that could make the upstream route the request otherwise
/// than the gateway read it: one of `REROUTING_HEADERS`, or any name with an
/// `_` (a WSGI stack reads `X_Auth_Token` and `X-Auth-Token` as one variable).
pub fn rerouting_header(headers: &axum::http::HeaderMap) -> Option<String> {
    headers.keys().find_map(|name| {
        // A name with an `_` is refused as such; any other reads as it is.
        let name = name.as_str();
        (name.contains('_') || REROUTING_HEADERS.contains(&name)).then(|| name.to_string())
    })
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Refuses a method Keystone might read differently (`post` for `POST`).
pub fn check_method(method: &str) -> Result<(), TargetError> {
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(TargetError::LowerCaseMethod);
    }
    Ok(())
}

/// The normalised path of a write: escapes of unreserved characters decoded
/// (others kept, in upper-case hex), `.` and `..` segments resolved, empty
/// segments dropped; a trailing slash is kept.
pub fn normalise_path(raw: &str) -> Result<String, TargetError> {
    let bytes = raw.as_bytes();
    let mut kept = Vec::with_capacity(bytes.len());
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(TargetError::BadEscape);
            };
            let v = h * 16 + l;
            match v {
                b'/' => return Err(TargetError::EncodedSlash),
                b'\\' => return Err(TargetError::Backslash),
                0 => return Err(TargetError::Nul),
                v if unreserved(v) => kept.push(v),
                v => kept.extend_from_slice(format!("%{v:02X}").as_bytes()),
            }
            decoded.push(v);
            i += 3;
            continue;
        }
        match b {
            b'\\' => return Err(TargetError::Backslash),
            0 => return Err(TargetError::Nul),
            _ => {}
        }
        kept.push(b);
        decoded.push(b);
        i += 1;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(TargetError::NotUtf8);
    }
    let kept = String::from_utf8(kept).map_err(|_| TargetError::NotUtf8)?;
    let mut segments: Vec<&str> = Vec::new();
    for seg in kept.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(kept.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    let trailing = kept.ends_with('/') || kept.ends_with("/.") || kept.ends_with("/..");
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystone::{classify, Classification};
    use proptest::prelude::*;

    #[test]
    fn encodings_that_hid_writes_are_decoded_or_refused() {
        assert_eq!(normalise_path("/v3/%70rojects").unwrap(), "/v3/projects");
        assert_eq!(normalise_path("/%76%33/projects").unwrap(), "/v3/projects");
        assert_eq!(normalise_path("/v3//projects/").unwrap(), "/v3/projects/");
        assert_eq!(
            normalise_path("/v3/x/%2e%2e/projects").unwrap(),
            "/v3/projects"
        );
        assert_eq!(
            normalise_path("/v3/./projects/../users").unwrap(),
            "/v3/users"
        );
        assert_eq!(normalise_path("/").unwrap(), "/");
        assert_eq!(normalise_path("/../..").unwrap(), "/");
        assert_eq!(
            normalise_path("/v3/projects/p/tags/a%20b%c3%a9").unwrap(),
            "/v3/projects/p/tags/a%20b%C3%A9"
        );
        assert_eq!(
            normalise_path("/v3/projects%2Fabc"),
            Err(TargetError::EncodedSlash)
        );
        assert_eq!(
            normalise_path("/v3/projects%2fabc"),
            Err(TargetError::EncodedSlash)
        );
        assert_eq!(normalise_path("/v3\\projects"), Err(TargetError::Backslash));
        assert_eq!(
            normalise_path("/v3/%5cprojects"),
            Err(TargetError::Backslash)
        );
        assert_eq!(normalise_path("/v3/%00"), Err(TargetError::Nul));
        assert_eq!(normalise_path("/v3/%ff"), Err(TargetError::NotUtf8));
        assert_eq!(normalise_path("/v3/%zz"), Err(TargetError::BadEscape));
        assert_eq!(normalise_path("/v3/%4"), Err(TargetError::BadEscape));
        assert_eq!(check_method("post"), Err(TargetError::LowerCaseMethod));
        assert_eq!(check_method("Post"), Err(TargetError::LowerCaseMethod));
        assert!(check_method("POST").is_ok());
    }

    /// How the upstream routes: every escape decoded, then segments.
    fn upstream_view(raw: &str) -> Option<String> {
        let bytes = raw.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let v = hex(*bytes.get(i + 1)?)? * 16 + hex(*bytes.get(i + 2)?)?;
                out.push(v);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        let s = String::from_utf8(out).ok()?;
        let mut segs: Vec<&str> = Vec::new();
        for seg in s.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    segs.pop();
                }
                x => segs.push(x),
            }
        }
        Some(format!("/{}", segs.join("/")))
    }

    fn replicable(method: &str, path: &str) -> bool {
        matches!(classify(method, path), Classification::Replicable(_))
    }

    /// Paths from the route table (and near misses), IDs filled in.
    fn route_path() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("/v3/projects".to_string()),
            Just("/v3/projects/0123456789abcdef0123456789abcdef".to_string()),
            Just("/v3/users/0123456789abcdef0123456789abcdef/password".to_string()),
            Just("/v3/groups/g1/users/u1".to_string()),
            Just("/v3/projects/p1/users/u1/roles/r1".to_string()),
            Just("/v3/OS-INHERIT/domains/d1/groups/g1/roles/r1/inherited_to_projects".to_string()),
            Just("/v3/roles/r1/implies/r2".to_string()),
            Just("/v3/OS-FEDERATION/identity_providers/idp1".to_string()),
            Just("/v3/domains/d1/config/ldap/url".to_string()),
            Just("/v3/auth/tokens".to_string()),
            Just("/v3/users/u1/application_credentials".to_string()),
            Just("/v3/projectsx".to_string()),
            Just("/v2.0/projects".to_string()),
        ]
    }

    /// The same path with random escapes, dot segments and doubled slashes.
    fn disguised() -> impl Strategy<Value = String> {
        (route_path(), prop::collection::vec(0u8..8, 0..64)).prop_map(|(path, dice)| {
            let mut out = String::new();
            for (i, c) in path.chars().enumerate() {
                match dice.get(i).copied().unwrap_or(0) {
                    1 => out.push_str(&format!("%{:02X}", c as u32)),
                    2 => out.push_str(&format!("%{:02x}", c as u32)),
                    3 if c == '/' => out.push_str("//"),
                    4 if c == '/' => out.push_str("/./"),
                    5 if c == '/' => out.push_str("/x/../"),
                    _ => out.push(c),
                }
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn classified_as_a_write_iff_the_upstream_routes_a_write(raw in disguised()) {
            for method in ["POST", "PUT", "PATCH", "DELETE"] {
                match normalise_path(&raw) {
                    Ok(norm) => {
                        let upstream = upstream_view(&raw).expect("a normalised path decodes");
                        prop_assert_eq!(
                            replicable(method, &norm),
                            replicable(method, &upstream),
                            "{} {} normalised to {}", method, raw, norm
                        );
                        // Idempotent: forwarding it changes nothing.
                        let again = normalise_path(&norm);
                        prop_assert_eq!(again.as_deref(), Ok(norm.as_str()));
                    }
                    // Refused only for what the upstream would read another way.
                    Err(e) => prop_assert!(
                        matches!(e, TargetError::EncodedSlash),
                        "{} refused: {:?}", raw, e
                    ),
                }
            }
        }
    }
}
