//! Route classification: which writes are identity data worth replicating, to
//! which route class and resource kind they belong (the catalogue's routes,
//! `kinds/`), and which are never ops (token flows and the site-local
//! delegations only their owner may create).

use super::kinds::ALL;
pub use super::model::{Classification, Creates, Reason, Route, RouteClass, RouteMatch};

/// Every resource kind the table knows, for validating audit filters.
pub fn known_kinds() -> Vec<&'static str> {
    super::kinds::replicated()
}

/// The kind and route a write matches, if any.
fn matching(method: &str, rest: &[&str]) -> Option<(&'static super::kind::Kind, &'static Route)> {
    ALL.iter().find_map(|k| {
        k.routes
            .iter()
            .find(|r| r.methods.contains(&method) && matches_pattern(r.pattern, rest))
            .map(|r| (*k, r))
    })
}

fn is_write(method: &str) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH" | "DELETE")
}

/// Classifies a request by method and path (the path without its query).
pub fn classify(method: &str, path: &str) -> Classification {
    if !is_write(method) {
        return Classification::NotReplicated(Reason::Read);
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some((&"v3", rest)) = segments.split_first() else {
        return Classification::NotReplicated(Reason::UnknownRoute);
    };
    if let Some(reason) = never_replicated(rest) {
        return Classification::NotReplicated(reason);
    }
    matching(method, rest)
        .map(|(k, r)| {
            Classification::Replicable(RouteMatch {
                class: k.class,
                kind: k.name,
                creates: r.creates,
            })
        })
        .unwrap_or(Classification::NotReplicated(Reason::UnknownRoute))
}

/// The values of the `*` segments of the replicable route a write matches (the
/// IDs and names its path addresses), in path order; empty when none matches.
pub fn path_params<'a>(method: &str, path: &'a str) -> Vec<&'a str> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some((&"v3", rest)) = segments.split_first() else {
        return Vec::new();
    };
    matching(method, rest)
        .map(|(_, r)| {
            r.pattern
                .iter()
                .zip(rest)
                .filter(|(p, _)| **p == "*")
                .map(|(_, s)| *s)
                .collect()
        })
        .unwrap_or_default()
}

fn matches_pattern(pattern: &[&str], segments: &[&str]) -> bool {
    pattern.len() == segments.len()
        && pattern
            .iter()
            .zip(segments)
            .all(|(p, s)| *p == "*" || p == s)
}

/// Routes that are never ops, whatever the method.
fn never_replicated(rest: &[&str]) -> Option<Reason> {
    match rest {
        ["auth", ..] | ["ec2tokens"] | ["s3tokens"] | ["OS-OAUTH1", ..] | ["OS-OAUTH2", ..] => {
            Some(Reason::TokenFlow)
        }
        ["OS-FEDERATION", "identity_providers", _, "protocols", _, "auth"] => {
            Some(Reason::TokenFlow)
        }
        ["OS-FEDERATION", "saml2", ..] => Some(Reason::TokenFlow),
        ["users", _, "application_credentials", ..]
        | ["users", _, "access_rules", ..]
        | ["OS-TRUST", ..] => Some(Reason::SiteLocal),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(method: &str, path: &str) -> Option<(RouteClass, &'static str, Creates)> {
        match classify(method, path) {
            Classification::Replicable(m) => Some((m.class, m.kind, m.creates)),
            Classification::NotReplicated(_) => None,
        }
    }

    #[test]
    fn classifies_every_class() {
        use RouteClass::*;
        let id = "0123456789abcdef0123456789abcdef";
        let cases = [
            (
                "POST",
                "/v3/users".to_string(),
                Identity,
                "user",
                Creates::InBody,
            ),
            (
                "PATCH",
                format!("/v3/users/{id}"),
                Identity,
                "user",
                Creates::No,
            ),
            (
                "POST",
                format!("/v3/users/{id}/password"),
                Identity,
                "user_password",
                Creates::No,
            ),
            (
                "PUT",
                format!("/v3/groups/{id}/users/{id}"),
                Identity,
                "group_membership",
                Creates::No,
            ),
            (
                "POST",
                "/v3/domains".into(),
                Resource,
                "domain",
                Creates::InBody,
            ),
            (
                "PATCH",
                format!("/v3/domains/{id}/config/ldap/url"),
                Resource,
                "domain_config",
                Creates::No,
            ),
            (
                "DELETE",
                format!("/v3/projects/{id}"),
                Resource,
                "project",
                Creates::No,
            ),
            (
                "PUT",
                format!("/v3/projects/{id}/tags/blue"),
                Resource,
                "project_tag",
                Creates::No,
            ),
            (
                "PUT",
                format!("/v3/roles/{id}/implies/{id}"),
                Assignment,
                "implied_role",
                Creates::No,
            ),
            (
                "PUT",
                format!("/v3/system/users/{id}/roles/{id}"),
                Assignment,
                "grant",
                Creates::No,
            ),
            (
                "PUT",
                format!("/v3/OS-INHERIT/domains/{id}/groups/{id}/roles/{id}/inherited_to_projects"),
                Assignment,
                "inherited_grant",
                Creates::No,
            ),
            (
                "POST",
                format!("/v3/users/{id}/credentials/OS-EC2"),
                Credentials,
                "ec2_credential",
                Creates::InBody,
            ),
            (
                "PUT",
                format!("/v3/policies/{id}/OS-ENDPOINT-POLICY/services/{id}/regions/r1"),
                Policy,
                "endpoint_policy",
                Creates::No,
            ),
            (
                "POST",
                "/v3/registered_limits".into(),
                Limits,
                "registered_limit",
                Creates::InBody,
            ),
            (
                "PUT",
                "/v3/OS-FEDERATION/identity_providers/idp1".into(),
                Federation,
                "identity_provider",
                Creates::FromUrl,
            ),
            (
                "PATCH",
                "/v3/OS-FEDERATION/mappings/m1".into(),
                Federation,
                "mapping",
                Creates::No,
            ),
            (
                "PUT",
                "/v3/regions/RegionTwo".into(),
                Catalog,
                "region",
                Creates::FromUrl,
            ),
            (
                "POST",
                "/v3/OS-EP-FILTER/endpoint_groups".into(),
                Catalog,
                "endpoint_group",
                Creates::InBody,
            ),
        ];
        for (method, path, class, kind, creates) in cases {
            assert_eq!(
                kind_of(method, &path),
                Some((class, kind, creates)),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn token_flows_and_site_local_routes_are_never_ops() {
        let id = "0123456789abcdef0123456789abcdef";
        let cases = [
            ("POST", "/v3/auth/tokens".to_string(), Reason::TokenFlow),
            ("DELETE", "/v3/auth/tokens".into(), Reason::TokenFlow),
            ("POST", "/v3/ec2tokens".into(), Reason::TokenFlow),
            ("POST", "/v3/s3tokens".into(), Reason::TokenFlow),
            (
                "POST",
                "/v3/OS-OAUTH1/request_token".into(),
                Reason::TokenFlow,
            ),
            ("POST", "/v3/OS-OAUTH2/token".into(), Reason::TokenFlow),
            (
                "POST",
                "/v3/OS-FEDERATION/identity_providers/i/protocols/saml2/auth".into(),
                Reason::TokenFlow,
            ),
            (
                "POST",
                format!("/v3/users/{id}/application_credentials"),
                Reason::SiteLocal,
            ),
            (
                "DELETE",
                format!("/v3/users/{id}/application_credentials/{id}"),
                Reason::SiteLocal,
            ),
            ("POST", "/v3/OS-TRUST/trusts".into(), Reason::SiteLocal),
            ("GET", "/v3/users".into(), Reason::Read),
            ("HEAD", format!("/v3/projects/{id}"), Reason::Read),
            ("POST", "/v3/nonsense".into(), Reason::UnknownRoute),
            ("POST", "/v2.0/tenants".into(), Reason::UnknownRoute),
            ("DELETE", "/v3/users".into(), Reason::UnknownRoute),
        ];
        for (method, path, reason) in cases {
            assert_eq!(
                classify(method, &path),
                Classification::NotReplicated(reason),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn trailing_and_double_slashes_do_not_hide_a_write() {
        assert!(kind_of("POST", "/v3/projects/").is_some());
        assert!(kind_of("POST", "//v3//projects").is_some());
    }

    #[test]
    fn route_class_parses_and_defaults_exclude_catalog() {
        assert_eq!("policy".parse::<RouteClass>(), Ok(RouteClass::Policy));
        assert!("nope"
            .parse::<RouteClass>()
            .unwrap_err()
            .contains("identity"));
        assert!(!RouteClass::default_set().contains(&RouteClass::Catalog));
        assert_eq!(RouteClass::default_set().len(), 7);
    }
}
