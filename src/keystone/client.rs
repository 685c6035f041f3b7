//! A Keystone v3 client that authenticates with the gateway's own service
//! credentials (OpenStack `OS_*` conventions), caches the token until shortly
//! before it expires, and re-authenticates once on a 401. Edges apply ops with
//! it; central uses it to learn the natural keys of entities it has not seen.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::Instrument;

use bytes::Bytes;
use reqwest::{Method, Url};
use serde_json::{json, Value};
use tracing::{debug, info};

use super::model::NaturalKey;
use crate::core::Secret;

/// A domain named by name or by ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainSel {
    Name(String),
    Id(String),
}

impl DomainSel {
    fn json(&self) -> Value {
        match self {
            DomainSel::Name(n) => json!({"name": n}),
            DomainSel::Id(i) => json!({"id": i}),
        }
    }
}

/// Service credentials.
#[derive(Debug, Clone)]
pub enum Credentials {
    Password {
        username: String,
        password: Secret,
        user_domain: DomainSel,
        /// `None` asks for a system-scoped token (`OS_SYSTEM_SCOPE=all`).
        project: Option<(String, DomainSel)>,
    },
    ApplicationCredential {
        id: String,
        secret: Secret,
    },
}

impl Credentials {
    /// Reads `OS_*` variables; `Ok(None)` when none are set. `OS_PASSWORD` and
    /// `OS_APPLICATION_CREDENTIAL_SECRET` may instead name a file in
    /// `OS_PASSWORD_FILE` and `OS_APPLICATION_CREDENTIAL_SECRET_FILE`.
    pub fn from_env() -> Result<Option<Credentials>, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut from_files = std::collections::HashMap::new();
        for key in ["OS_PASSWORD", "OS_APPLICATION_CREDENTIAL_SECRET"] {
            let file = var(&format!("{key}_FILE")).map(std::path::PathBuf::from);
            if let Some(v) =
                crate::core::read_secret(None, file.as_deref(), &format!("{key}_FILE"))?
            {
                from_files.insert(key, v);
            }
        }
        Self::from_lookup(|k| var(k).or_else(|| from_files.get(k).cloned()))
    }

    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Credentials>, String> {
        if let Some(id) = get("OS_APPLICATION_CREDENTIAL_ID") {
            let secret = get("OS_APPLICATION_CREDENTIAL_SECRET").ok_or(
                "OS_APPLICATION_CREDENTIAL_ID is set but OS_APPLICATION_CREDENTIAL_SECRET is not",
            )?;
            return Ok(Some(Credentials::ApplicationCredential {
                id,
                secret: Secret::new(secret),
            }));
        }
        let Some(username) = get("OS_USERNAME") else {
            return Ok(None);
        };
        let password = get("OS_PASSWORD").ok_or("OS_USERNAME is set but OS_PASSWORD is not")?;
        let domain = |name: &str, id: &str| match (get(name), get(id)) {
            (_, Some(id)) => DomainSel::Id(id),
            (Some(name), None) => DomainSel::Name(name),
            (None, None) => DomainSel::Id("default".into()),
        };
        let user_domain = domain("OS_USER_DOMAIN_NAME", "OS_USER_DOMAIN_ID");
        let project = match (get("OS_PROJECT_NAME"), get("OS_SYSTEM_SCOPE")) {
            (Some(p), _) => Some((p, domain("OS_PROJECT_DOMAIN_NAME", "OS_PROJECT_DOMAIN_ID"))),
            (None, Some(_)) => None,
            (None, None) => {
                return Err(
                    "OS_PROJECT_NAME (or OS_SYSTEM_SCOPE=all) is required with OS_USERNAME".into(),
                )
            }
        };
        Ok(Some(Credentials::Password {
            username,
            password: Secret::new(password),
            user_domain,
            project,
        }))
    }

    fn auth_body(&self) -> Value {
        match self {
            Credentials::ApplicationCredential { id, secret } => json!({"auth": {"identity": {
                "methods": ["application_credential"],
                "application_credential": {"id": id, "secret": secret.expose()}
            }}}),
            Credentials::Password {
                username,
                password,
                user_domain,
                project,
            } => {
                let scope = match project {
                    Some((name, domain)) => {
                        json!({"project": {"name": name, "domain": domain.json()}})
                    }
                    None => json!({"system": {"all": true}}),
                };
                json!({"auth": {
                    "identity": {"methods": ["password"], "password": {"user": {
                        "name": username, "domain": user_domain.json(), "password": password.expose()
                    }}},
                    "scope": scope
                }})
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Keystone could not be reached: nothing was sent, worth retrying.
    #[error("identity service unreachable: {0}")]
    Unreachable(String),
    /// The request was sent but no whole answer came back (a timeout, a broken
    /// connection): it may still reach Keystone, or have reached it.
    #[error("no answer from the identity service: {0}")]
    InDoubt(String),
    /// Authentication with the service credentials was refused.
    #[error("service credentials refused by the identity service (HTTP {status}): {message}")]
    AuthRefused { status: u16, message: String },
    #[error("bad request URL: {0}")]
    BadUrl(String),
    /// An answer that is not what was asked for (a read answered with
    /// another shape, or refused for another reason than absence).
    #[error("the identity service's answer could not be read: {0}")]
    Unreadable(String),
}

impl ClientError {
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable(_) | ClientError::InDoubt(_) | ClientError::Unreadable(_) => {
                true
            }
            ClientError::AuthRefused { status, .. } => *status >= 500 || *status == 429,
            ClientError::BadUrl(_) => false,
        }
    }
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Keystone's error message, when the body has one.
    pub fn message(&self) -> String {
        self.json()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(300)
                    .collect()
            })
    }
}

struct CachedToken {
    token: Secret,
    /// Refresh at this time (a minute before Keystone's expiry).
    refresh_at: SystemTime,
    identity: Identity,
}

/// Who the service credentials are, as the token says: what the client needs
/// at its site to act at all (a resync never deletes it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// Empty when the token names no user.
    pub user_id: String,
    /// The user's domain and the scope's (a project's domain, or a domain).
    pub domain_ids: Vec<String>,
    pub project_id: Option<String>,
    /// The roles the token carries (implied ones included).
    pub role_ids: Vec<String>,
}

impl Identity {
    /// Reads the identity from a token's body.
    pub fn from_token(body: &Value) -> Identity {
        let t = &body["token"];
        let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let mut domain_ids: Vec<String> = [
            &t["user"]["domain"]["id"],
            &t["project"]["domain"]["id"],
            &t["domain"]["id"],
        ]
        .into_iter()
        .filter_map(text)
        .collect();
        domain_ids.dedup();
        Identity {
            user_id: text(&t["user"]["id"]).unwrap_or_default(),
            domain_ids,
            project_id: text(&t["project"]["id"]),
            role_ids: t["roles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| text(&r["id"]))
                .collect(),
        }
    }
}

pub struct KeystoneClient {
    http: reqwest::Client,
    base: String,
    creds: Credentials,
    token: tokio::sync::Mutex<Option<CachedToken>>,
    auths: Mutex<u64>,
}

impl KeystoneClient {
    /// A client of the Keystone at `base`; `ca` (`--upstream-ca`): trust
    /// only the CA certificates in that file for https.
    pub fn new(
        base: &Url,
        creds: Credentials,
        timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> anyhow::Result<KeystoneClient> {
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca {
            http = http.use_preconfigured_tls(crate::tls::client_trusting(ca, "--upstream-ca")?);
        }
        let http = http.build()?;
        Ok(KeystoneClient {
            http,
            base: base.as_str().trim_end_matches('/').to_string(),
            creds,
            token: tokio::sync::Mutex::new(None),
            auths: Mutex::new(0),
        })
    }

    /// How many times the client authenticated (for tests and metrics).
    pub fn auth_count(&self) -> u64 {
        *self.auths.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn token(&self, force: bool) -> Result<Secret, ClientError> {
        let mut cached = self.token.lock().await;
        if let Some(c) = cached.as_ref() {
            if !force && SystemTime::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let url = format!("{}/v3/auth/tokens", self.base);
        let resp = self
            .http
            .post(&url)
            .json(&self.creds.auth_body())
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let token = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable(e.without_url().to_string()))?;
        let reply = Reply { status, body };
        let (true, Some(token)) = (reply.is_success(), token) else {
            return Err(ClientError::AuthRefused {
                status,
                message: reply.message(),
            });
        };
        let json = reply.json().unwrap_or(Value::Null);
        let expires = json["token"]["expires_at"]
            .as_str()
            .and_then(parse_rfc3339)
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
        let refresh_at = expires
            .checked_sub(Duration::from_secs(60))
            .unwrap_or(expires);
        *self.auths.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        debug!("authenticated to the identity service");
        let token = Secret::new(token);
        *cached = Some(CachedToken {
            token: token.clone(),
            refresh_at,
            identity: Identity::from_token(&json),
        });
        Ok(token)
    }

    /// Who the service credentials are (authenticating first if need be).
    pub async fn identity(&self) -> Result<Identity, ClientError> {
        self.token(false).await?;
        Ok(self
            .token
            .lock()
            .await
            .as_ref()
            .map(|c| c.identity.clone())
            .unwrap_or_default())
    }

    /// Whether this site answers besides a write it fails on: a new token
    /// (the service's credentials checked now, not a cached token) and a
    /// read of the service's own user. A server error to a write while both
    /// succeed is that write's.
    pub async fn answers(&self) -> bool {
        if self.token(true).await.is_err() {
            return false;
        }
        let me = match self.identity().await {
            Ok(me) if !me.user_id.is_empty() => me,
            _ => return false,
        };
        let path = format!("/v3/users/{}", me.user_id);
        matches!(self.send(Method::GET, &path, None).await, Ok(r) if r.is_success())
    }

    /// Sends a request with the service token; a 401 re-authenticates once.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        let url = format!("{}{path}", self.base);
        Url::parse(&url).map_err(|e| ClientError::BadUrl(e.to_string()))?;
        let span = tracing::info_span!(
            "keystone",
            http.request.method = %method,
            url.path = path.split('?').next().unwrap_or_default(),
            http.response.status_code = tracing::field::Empty,
        );
        let traceparent = crate::telemetry::traceparent(&span);
        let mut force = false;
        loop {
            let token = self.token(force).await?;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("x-auth-token", token.expose());
            if let Some(tp) = &traceparent {
                req = req.header("traceparent", tp);
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            let resp = req.send().instrument(span.clone()).await.map_err(|e| {
                let connect = e.is_connect();
                let text = e.without_url().to_string();
                if connect {
                    ClientError::Unreachable(text)
                } else {
                    ClientError::InDoubt(text)
                }
            })?;
            span.record("http.response.status_code", resp.status().as_u16());
            let status = resp.status().as_u16();
            let body = resp
                .bytes()
                .await
                .map_err(|e| ClientError::InDoubt(e.without_url().to_string()))?;
            if status == 401 && !force {
                info!("service token refused; authenticating again");
                force = true;
                continue;
            }
            return Ok(Reply { status, body });
        }
    }

    /// The ID of the entity of a collection whose natural key (by `rule`)
    /// is `name` (in `domain_id`; for a rule that allows a global entity,
    /// `None` means a global one). `what` names it in errors.
    pub async fn find_by_key(
        &self,
        collection: &str,
        rule: NaturalKey,
        what: &str,
        name: &str,
        domain_id: Option<&str>,
    ) -> Result<Option<String>, ClientError> {
        match rule {
            NaturalKey::None => return Ok(None),
            NaturalKey::TypeAndName => return self.find_service(collection, what, name).await,
            _ => {}
        }
        let mut path = format!("/v3/{collection}?name={}", encode(name));
        if let Some(d) = domain_id.filter(|_| rule != NaturalKey::Name) {
            path.push_str(&format!("&domain_id={}", encode(d)));
        }
        let reply = self.send(Method::GET, &path, None).await?;
        if !reply.is_success() {
            if reply.status >= 500 || reply.status == 429 {
                return Err(ClientError::Unreachable(format!(
                    "HTTP {} looking up a {what}",
                    reply.status
                )));
            }
            return Ok(None);
        }
        let json = reply.json().unwrap_or(Value::Null);
        let found = json[collection].as_array().into_iter().flatten().find(|e| {
            e["name"].as_str() == Some(name)
                && (rule == NaturalKey::Name
                    || match domain_id {
                        Some(d) => e["domain_id"].as_str() == Some(d),
                        None => {
                            rule != NaturalKey::NameGlobalOrInDomain || e["domain_id"].is_null()
                        }
                    })
        });
        Ok(found.and_then(|e| e["id"].as_str()).map(str::to_string))
    }

    /// The entity at a member URL (under `member` in the answer), `None`
    /// when it does not exist. `what` names it in errors.
    pub async fn get_member(
        &self,
        path: &str,
        member: &str,
        what: &str,
    ) -> Result<Option<Value>, ClientError> {
        let reply = self.send(Method::GET, path, None).await?;
        if reply.status >= 500 || reply.status == 429 {
            return Err(ClientError::Unreachable(format!(
                "HTTP {} reading a {what}",
                reply.status
            )));
        }
        Ok(reply
            .is_success()
            .then(|| reply.json().map(|v| v[member].clone()))
            .flatten())
    }

    /// `get_member`, where a wrong answer must not pass for an absent entity:
    /// absent only when Keystone answers 404; any other refusal (a 403), or
    /// an answer without the entity, is an error.
    pub async fn get_member_strict(
        &self,
        path: &str,
        member: &str,
        what: &str,
    ) -> Result<Option<Value>, ClientError> {
        let reply = self.send(Method::GET, path, None).await?;
        if reply.status == 404 {
            return Ok(None);
        }
        if !reply.is_success() {
            return Err(ClientError::Unreadable(format!(
                "HTTP {} reading a {what}",
                reply.status
            )));
        }
        match reply.json().map(|v| v[member].clone()) {
            Some(entity) if entity.is_object() => Ok(Some(entity)),
            _ => Err(ClientError::Unreadable(format!(
                "HTTP {} reading a {what}, but the answer holds no {what}",
                reply.status
            ))),
        }
    }
}

impl KeystoneClient {
    /// The entity of this `<type>/<name>` natural key (a service, as
    /// `kind::service_key` makes it) when exactly one has it.
    async fn find_service(
        &self,
        collection: &str,
        what: &str,
        key: &str,
    ) -> Result<Option<String>, ClientError> {
        let Some((kind, name)) = key.split_once('/') else {
            return Ok(None);
        };
        let reply = self
            .send(
                Method::GET,
                &format!("/v3/{collection}?type={}", encode(kind)),
                None,
            )
            .await?;
        if !reply.is_success() {
            if reply.status >= 500 || reply.status == 429 {
                return Err(ClientError::Unreachable(format!(
                    "HTTP {} looking up a {what}",
                    reply.status
                )));
            }
            return Ok(None);
        }
        let json = reply.json().unwrap_or(Value::Null);
        let mut found = json[collection]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["type"] == kind && s["name"].as_str().unwrap_or("") == name)
            .filter_map(|s| s["id"].as_str().map(str::to_string));
        match (found.next(), found.next()) {
            (Some(id), None) => Ok(Some(id)),
            _ => Ok(None),
        }
    }
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses Keystone's `expires_at` (`2026-11-24T17:40:00.000000Z`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.trim_end_matches('Z');
    let time = time.split(['+', '-']).next()?;
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss = t.next()?.split('.').next()?.parse::<i64>().ok()?;
    // Days from civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keystone_expiry() {
        let t = parse_rfc3339("2026-11-24T17:40:00.000000Z").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 1795542000);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert!(parse_rfc3339("garbage").is_none());
    }

    #[test]
    fn credentials_from_os_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(Credentials::from_lookup(env(&[])).unwrap().is_none());
        let c = Credentials::from_lookup(env(&[
            ("OS_USERNAME", "admin"),
            ("OS_PASSWORD", "pw"),
            ("OS_PROJECT_NAME", "admin"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_DOMAIN_ID", "default"),
        ]))
        .unwrap()
        .unwrap();
        let body = c.auth_body();
        assert_eq!(
            body["auth"]["identity"]["password"]["user"]["domain"]["name"],
            "Default"
        );
        assert_eq!(body["auth"]["scope"]["project"]["domain"]["id"], "default");
        assert!(
            !format!("{c:?}").contains("pw\""),
            "Debug redacts the password"
        );
        let c = Credentials::from_lookup(env(&[
            ("OS_APPLICATION_CREDENTIAL_ID", "ac"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "s"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            c.auth_body()["auth"]["identity"]["methods"][0],
            "application_credential"
        );
        assert!(Credentials::from_lookup(env(&[("OS_USERNAME", "a")])).is_err());
        assert!(
            Credentials::from_lookup(env(&[("OS_USERNAME", "a"), ("OS_PASSWORD", "p")])).is_err()
        );
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
