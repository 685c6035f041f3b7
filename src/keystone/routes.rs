//! The Keystone v3 route table: which writes are identity data worth replicating,
//! to which route class and resource kind they belong, and which are never ops
//! (token flows and the site-local delegations only their owner may create).

use std::fmt;
use std::str::FromStr;

/// A family of routes the operator turns replication on or off for (`--replicate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteClass {
    Identity,
    Resource,
    Assignment,
    Credentials,
    Policy,
    Limits,
    Federation,
    Catalog,
}

impl RouteClass {
    pub const ALL: [RouteClass; 8] = [
        RouteClass::Identity,
        RouteClass::Resource,
        RouteClass::Assignment,
        RouteClass::Credentials,
        RouteClass::Policy,
        RouteClass::Limits,
        RouteClass::Federation,
        RouteClass::Catalog,
    ];

    /// Every class but catalog: each site has its own endpoint URLs.
    pub fn default_set() -> Vec<RouteClass> {
        Self::ALL
            .into_iter()
            .filter(|c| *c != RouteClass::Catalog)
            .collect()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Identity => "identity",
            RouteClass::Resource => "resource",
            RouteClass::Assignment => "assignment",
            RouteClass::Credentials => "credentials",
            RouteClass::Policy => "policy",
            RouteClass::Limits => "limits",
            RouteClass::Federation => "federation",
            RouteClass::Catalog => "catalog",
        }
    }
}

impl fmt::Display for RouteClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RouteClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|c| c.as_str()).collect();
                format!(
                    "unknown route class '{s}' (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// How a write on a route creates its resource, which tells capture where the
/// central ID of the new resource is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creates {
    /// Nothing is created (update, delete, association).
    No,
    /// POST to a collection: Keystone generates the ID and returns it in the body.
    InBody,
    /// PUT to a member URL: the ID is the last path segment.
    FromUrl,
}

/// One row of the route table.
#[derive(Debug)]
struct Route {
    /// Path segments after `/v3`; `*` matches any one segment.
    pattern: &'static [&'static str],
    /// Methods that are replicable writes on this route.
    methods: &'static [&'static str],
    class: RouteClass,
    kind: &'static str,
    creates: Creates,
}

/// The outcome of classifying a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// A write that changes identity data of a replicable class.
    Replicable(RouteMatch),
    /// A request that is never an op: reads, token flows, site-local resources,
    /// routes the table does not know.
    NotReplicated(Reason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    pub class: RouteClass,
    pub kind: &'static str,
    pub creates: Creates,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Read,
    /// Token issue, revocation, federation logins, OAuth flows, EC2/S3 token checks.
    TokenFlow,
    /// Application credentials, access rules and trusts: only their owner may create them.
    SiteLocal,
    /// A write on a path the table does not know.
    UnknownRoute,
}

const POST: &[&str] = &["POST"];
const MEMBER: &[&str] = &["PATCH", "DELETE"];
const PUT_DELETE: &[&str] = &["PUT", "DELETE"];
const CONFIG: &[&str] = &["PUT", "PATCH", "DELETE"];

macro_rules! route {
    ($class:ident, $kind:literal, $creates:ident, $methods:expr, [$($seg:literal),*]) => {
        Route {
            pattern: &[$($seg),*],
            methods: $methods,
            class: RouteClass::$class,
            kind: $kind,
            creates: Creates::$creates,
        }
    };
}

/// Keystone v3 writes by route (checked against keystone 30.0.0). Order matters
/// only where two patterns could match the same path; none do today.
static ROUTES: &[Route] = &[
    // identity
    route!(Identity, "user", InBody, POST, ["users"]),
    route!(Identity, "user", No, MEMBER, ["users", "*"]),
    route!(
        Identity,
        "user_password",
        No,
        POST,
        ["users", "*", "password"]
    ),
    route!(Identity, "group", InBody, POST, ["groups"]),
    route!(Identity, "group", No, MEMBER, ["groups", "*"]),
    route!(
        Identity,
        "group_membership",
        No,
        PUT_DELETE,
        ["groups", "*", "users", "*"]
    ),
    // resource
    route!(Resource, "domain", InBody, POST, ["domains"]),
    route!(Resource, "domain", No, MEMBER, ["domains", "*"]),
    route!(
        Resource,
        "domain_config",
        No,
        CONFIG,
        ["domains", "*", "config"]
    ),
    route!(
        Resource,
        "domain_config",
        No,
        CONFIG,
        ["domains", "*", "config", "*"]
    ),
    route!(
        Resource,
        "domain_config",
        No,
        CONFIG,
        ["domains", "*", "config", "*", "*"]
    ),
    route!(Resource, "project", InBody, POST, ["projects"]),
    route!(Resource, "project", No, MEMBER, ["projects", "*"]),
    route!(
        Resource,
        "project_tag",
        No,
        PUT_DELETE,
        ["projects", "*", "tags"]
    ),
    route!(
        Resource,
        "project_tag",
        No,
        PUT_DELETE,
        ["projects", "*", "tags", "*"]
    ),
    // assignment
    route!(Assignment, "role", InBody, POST, ["roles"]),
    route!(Assignment, "role", No, MEMBER, ["roles", "*"]),
    route!(
        Assignment,
        "implied_role",
        No,
        PUT_DELETE,
        ["roles", "*", "implies", "*"]
    ),
    route!(
        Assignment,
        "grant",
        No,
        PUT_DELETE,
        ["projects", "*", "users", "*", "roles", "*"]
    ),
    route!(
        Assignment,
        "grant",
        No,
        PUT_DELETE,
        ["projects", "*", "groups", "*", "roles", "*"]
    ),
    route!(
        Assignment,
        "grant",
        No,
        PUT_DELETE,
        ["domains", "*", "users", "*", "roles", "*"]
    ),
    route!(
        Assignment,
        "grant",
        No,
        PUT_DELETE,
        ["domains", "*", "groups", "*", "roles", "*"]
    ),
    route!(
        Assignment,
        "grant",
        No,
        PUT_DELETE,
        ["system", "users", "*", "roles", "*"]
    ),
    route!(
        Assignment,
        "grant",
        No,
        PUT_DELETE,
        ["system", "groups", "*", "roles", "*"]
    ),
    route!(
        Assignment,
        "inherited_grant",
        No,
        PUT_DELETE,
        [
            "OS-INHERIT",
            "domains",
            "*",
            "users",
            "*",
            "roles",
            "*",
            "inherited_to_projects"
        ]
    ),
    route!(
        Assignment,
        "inherited_grant",
        No,
        PUT_DELETE,
        [
            "OS-INHERIT",
            "domains",
            "*",
            "groups",
            "*",
            "roles",
            "*",
            "inherited_to_projects"
        ]
    ),
    route!(
        Assignment,
        "inherited_grant",
        No,
        PUT_DELETE,
        [
            "OS-INHERIT",
            "projects",
            "*",
            "users",
            "*",
            "roles",
            "*",
            "inherited_to_projects"
        ]
    ),
    route!(
        Assignment,
        "inherited_grant",
        No,
        PUT_DELETE,
        [
            "OS-INHERIT",
            "projects",
            "*",
            "groups",
            "*",
            "roles",
            "*",
            "inherited_to_projects"
        ]
    ),
    // credentials
    route!(Credentials, "credential", InBody, POST, ["credentials"]),
    route!(Credentials, "credential", No, MEMBER, ["credentials", "*"]),
    route!(
        Credentials,
        "ec2_credential",
        InBody,
        POST,
        ["users", "*", "credentials", "OS-EC2"]
    ),
    route!(
        Credentials,
        "ec2_credential",
        No,
        &["DELETE"],
        ["users", "*", "credentials", "OS-EC2", "*"]
    ),
    // policy
    route!(Policy, "policy", InBody, POST, ["policies"]),
    route!(Policy, "policy", No, MEMBER, ["policies", "*"]),
    route!(
        Policy,
        "endpoint_policy",
        No,
        PUT_DELETE,
        ["policies", "*", "OS-ENDPOINT-POLICY", "endpoints", "*"]
    ),
    route!(
        Policy,
        "endpoint_policy",
        No,
        PUT_DELETE,
        ["policies", "*", "OS-ENDPOINT-POLICY", "services", "*"]
    ),
    route!(
        Policy,
        "endpoint_policy",
        No,
        PUT_DELETE,
        [
            "policies",
            "*",
            "OS-ENDPOINT-POLICY",
            "services",
            "*",
            "regions",
            "*"
        ]
    ),
    // limits
    route!(
        Limits,
        "registered_limit",
        InBody,
        POST,
        ["registered_limits"]
    ),
    route!(
        Limits,
        "registered_limit",
        No,
        MEMBER,
        ["registered_limits", "*"]
    ),
    route!(Limits, "limit", InBody, POST, ["limits"]),
    route!(Limits, "limit", No, MEMBER, ["limits", "*"]),
    // federation
    route!(
        Federation,
        "identity_provider",
        FromUrl,
        &["PUT"],
        ["OS-FEDERATION", "identity_providers", "*"]
    ),
    route!(
        Federation,
        "identity_provider",
        No,
        MEMBER,
        ["OS-FEDERATION", "identity_providers", "*"]
    ),
    route!(
        Federation,
        "federation_protocol",
        FromUrl,
        &["PUT"],
        ["OS-FEDERATION", "identity_providers", "*", "protocols", "*"]
    ),
    route!(
        Federation,
        "federation_protocol",
        No,
        MEMBER,
        ["OS-FEDERATION", "identity_providers", "*", "protocols", "*"]
    ),
    route!(
        Federation,
        "mapping",
        FromUrl,
        &["PUT"],
        ["OS-FEDERATION", "mappings", "*"]
    ),
    route!(
        Federation,
        "mapping",
        No,
        MEMBER,
        ["OS-FEDERATION", "mappings", "*"]
    ),
    route!(
        Federation,
        "service_provider",
        FromUrl,
        &["PUT"],
        ["OS-FEDERATION", "service_providers", "*"]
    ),
    route!(
        Federation,
        "service_provider",
        No,
        MEMBER,
        ["OS-FEDERATION", "service_providers", "*"]
    ),
    // catalog
    route!(Catalog, "region", InBody, POST, ["regions"]),
    route!(Catalog, "region", FromUrl, &["PUT"], ["regions", "*"]),
    route!(Catalog, "region", No, MEMBER, ["regions", "*"]),
    route!(Catalog, "service", InBody, POST, ["services"]),
    route!(Catalog, "service", No, MEMBER, ["services", "*"]),
    route!(Catalog, "endpoint", InBody, POST, ["endpoints"]),
    route!(Catalog, "endpoint", No, MEMBER, ["endpoints", "*"]),
    route!(
        Catalog,
        "endpoint_group",
        InBody,
        POST,
        ["OS-EP-FILTER", "endpoint_groups"]
    ),
    route!(
        Catalog,
        "endpoint_group",
        No,
        MEMBER,
        ["OS-EP-FILTER", "endpoint_groups", "*"]
    ),
    route!(
        Catalog,
        "project_endpoint",
        No,
        PUT_DELETE,
        ["OS-EP-FILTER", "projects", "*", "endpoints", "*"]
    ),
    route!(
        Catalog,
        "endpoint_group_project",
        No,
        PUT_DELETE,
        ["OS-EP-FILTER", "endpoint_groups", "*", "projects", "*"]
    ),
];

/// Every resource kind the table knows, for validating audit filters.
pub fn known_kinds() -> Vec<&'static str> {
    let mut kinds: Vec<_> = ROUTES.iter().map(|r| r.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds
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
    ROUTES
        .iter()
        .find(|r| r.methods.contains(&method) && matches_pattern(r.pattern, rest))
        .map(|r| {
            Classification::Replicable(RouteMatch {
                class: r.class,
                kind: r.kind,
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
    ROUTES
        .iter()
        .find(|r| r.methods.contains(&method) && matches_pattern(r.pattern, rest))
        .map(|r| {
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
