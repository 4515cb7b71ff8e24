//! The authorizer chain of structured authorization configuration
//! (`--authorization-config`, reference/access-authn-authz/authorization and
//! .../webhook): authorizers asked in order, the first Allow or Deny ends the
//! chain, "no opinion" asks the next. A Webhook authorizer sends
//! `authorization.k8s.io/v1` SubjectAccessReviews over HTTPS with a
//! kubeconfig-style connection (server CA, client certificate), only for
//! requests its `matchConditions` select, caches answers for `authorizedTTL` /
//! `unauthorizedTTL` keyed by the review's spec (as kube-apiserver does), retries
//! 5xx/429 answers with kube-apiserver's backoff, and on failure answers by its
//! `failurePolicy`.
//!
//! As in kube-apiserver, `system:masters` is allowed before the chain is asked,
//! and an authorizer's failure is an error of the whole decision: a request the
//! chain does not allow, after a webhook failed, gets a 500 (the
//! `WithAuthorization` filter answers `InternalError` when the decision is not
//! Allow and an error came back), not a 403.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};

use crate::Shared;
use crate::authn::UserInfo;
use crate::rbac::{self, Attrs};

/// What a webhook's failure (unreachable, timeout, bad answer) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// The next authorizer decides (the error is still reported).
    NoOpinion,
    /// The request is refused.
    Deny,
}

/// One `authorizers[]` entry of an AuthorizationConfiguration.
// A handful per cluster, built once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Authorizer {
    Webhook(WebhookConfig),
    Rbac,
}

/// `authorizers[].webhook` plus its `connectionInfo` (the kubeconfig's server,
/// `certificate-authority-data`, `client-certificate-data`/`client-key-data`).
#[derive(Clone)]
pub struct WebhookConfig {
    pub name: String,
    /// `https://host:port/path`: the kubeconfig cluster's `server`, to which the
    /// review is POSTed.
    pub url: String,
    /// PEM CA bundle verifying the webhook's serving certificate.
    pub ca_pem: String,
    /// The API server's client certificate and key (PEM), if the webhook wants one.
    pub client_cert: Option<(String, String)>,
    pub timeout: Duration,
    pub authorized_ttl: Duration,
    pub unauthorized_ttl: Duration,
    pub failure_policy: FailurePolicy,
    /// CEL expressions, all of which must be true for the webhook to be asked.
    pub match_conditions: Vec<String>,
    /// Attempts for an answer that kube-apiserver retries (5xx, 429): its
    /// default backoff is 5 steps from 500 ms, factor 1.5.
    pub retry_steps: u32,
    pub retry_initial: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    // The client key stays out of test logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("client_cert", &self.client_cert.is_some())
            .field("timeout", &self.timeout)
            .field("authorized_ttl", &self.authorized_ttl)
            .field("unauthorized_ttl", &self.unauthorized_ttl)
            .field("failure_policy", &self.failure_policy)
            .field("match_conditions", &self.match_conditions)
            .finish_non_exhaustive()
    }
}

impl WebhookConfig {
    /// Defaults: timeout 3s, authorizedTTL 5m, unauthorizedTTL 30s (the API
    /// defaults), failurePolicy NoOpinion, no match conditions, kube's retry backoff.
    pub fn new(name: &str, url: &str, ca_pem: &str) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            ca_pem: ca_pem.into(),
            client_cert: None,
            timeout: Duration::from_secs(3),
            authorized_ttl: Duration::from_secs(300),
            unauthorized_ttl: Duration::from_secs(30),
            failure_policy: FailurePolicy::NoOpinion,
            match_conditions: Vec::new(),
            retry_steps: 5,
            retry_initial: Duration::from_millis(500),
        }
    }
    pub fn client_cert(mut self, cert_pem: &str, key_pem: &str) -> Self {
        self.client_cert = Some((cert_pem.into(), key_pem.into()));
        self
    }
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    /// Zero: answers are not cached.
    pub fn authorized_ttl(mut self, d: Duration) -> Self {
        self.authorized_ttl = d;
        self
    }
    pub fn unauthorized_ttl(mut self, d: Duration) -> Self {
        self.unauthorized_ttl = d;
        self
    }
    pub fn failure_policy(mut self, p: FailurePolicy) -> Self {
        self.failure_policy = p;
        self
    }
    pub fn match_condition(mut self, expression: &str) -> Self {
        self.match_conditions.push(expression.into());
        self
    }
    pub fn retry(mut self, steps: u32, initial: Duration) -> Self {
        self.retry_steps = steps.max(1);
        self.retry_initial = initial;
        self
    }
}

// ---- matchConditions: the CEL forms the test server understands ----

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    /// `request.groups.exists(g, g.startsWith('P'))`
    GroupPrefix(String),
    /// `'G' in request.groups`, `request.groups.exists(g, g == 'G')`
    InGroups(String),
    /// `request.user == 'U'`
    UserIs(String),
    /// `request.user.startsWith('P')`
    UserPrefix(String),
    Not(Box<Cond>),
}

fn literal(s: &str) -> Option<String> {
    let s = s.trim();
    let q = s.chars().next()?;
    if (q != '\'' && q != '"') || s.len() < 2 || !s.ends_with(q) {
        return None;
    }
    let inner = &s[1..s.len() - 1];
    (!inner.contains(q) && !inner.contains('\\')).then(|| inner.to_string())
}

fn strip_parens(s: &str) -> &str {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        // Only when the parentheses enclose the whole expression.
        let mut depth = 0;
        for c in inner.chars() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => return s,
                ')' => depth -= 1,
                _ => {}
            }
        }
        return strip_parens(inner);
    }
    s
}

fn parse_cond(expr: &str) -> Option<Cond> {
    let e = strip_parens(expr);
    if let Some(rest) = e.strip_prefix('!') {
        return Some(Cond::Not(Box::new(parse_cond(rest)?)));
    }
    if let Some(body) = e
        .strip_prefix("request.groups.exists(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (var, pred) = body.split_once(',')?;
        let (var, pred) = (var.trim(), pred.trim());
        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let rest = pred.strip_prefix(var)?;
        if let Some(arg) = rest
            .strip_prefix(".startsWith(")
            .and_then(|r| r.strip_suffix(')'))
        {
            return literal(arg).map(Cond::GroupPrefix);
        }
        if let Some(arg) = rest.trim_start().strip_prefix("==") {
            return literal(arg).map(Cond::InGroups);
        }
        return None;
    }
    if let Some((lhs, rhs)) = e.split_once(" in ")
        && rhs.trim() == "request.groups"
    {
        return literal(lhs).map(Cond::InGroups);
    }
    if let Some(arg) = e
        .strip_prefix("request.user.startsWith(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return literal(arg).map(Cond::UserPrefix);
    }
    if let Some(arg) = e.strip_prefix("request.user").map(str::trim_start)
        && let Some(arg) = arg.strip_prefix("==")
    {
        return literal(arg).map(Cond::UserIs);
    }
    None
}

impl Cond {
    fn eval(&self, u: &UserInfo) -> bool {
        match self {
            Cond::GroupPrefix(p) => u.groups.iter().any(|g| g.starts_with(p.as_str())),
            Cond::InGroups(g) => u.groups.iter().any(|x| x == g),
            Cond::UserIs(n) => u.username == *n,
            Cond::UserPrefix(p) => u.username.starts_with(p.as_str()),
            Cond::Not(c) => !c.eval(u),
        }
    }
}

// ---- the chain ----

/// One authorizer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(String),
    Deny(String),
    NoOpinion(String),
}

/// The chain's answer: the decision, with the reason(s), and the errors of
/// authorizers that failed on the way.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub decision: Decision,
    pub errors: Vec<String>,
}

pub(crate) enum Entry {
    Webhook(Box<Webhook>),
    Rbac,
}

pub(crate) struct Webhook {
    cfg: WebhookConfig,
    conditions: Vec<Cond>,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    authority: String,
    path: String,
    cache: Mutex<HashMap<String, (Decision, Instant)>>,
}

fn invalid(m: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, m)
}

/// Checks an authorizer list at start, as kube-apiserver validates
/// `--authorization-config`: an unknown matchCondition is a start-up error.
pub(crate) fn build(authorizers: &[Authorizer]) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut names = Vec::new();
    for a in authorizers {
        match a {
            Authorizer::Rbac => out.push(Entry::Rbac),
            Authorizer::Webhook(cfg) => {
                if names.contains(&cfg.name) {
                    return Err(invalid(format!(
                        "authorizers[].name: Duplicate value: {:?}",
                        cfg.name
                    )));
                }
                names.push(cfg.name.clone());
                out.push(Entry::Webhook(Box::new(Webhook::new(cfg.clone())?)));
            }
        }
    }
    Ok(out)
}

impl Webhook {
    fn new(cfg: WebhookConfig) -> std::io::Result<Self> {
        let mut conditions = Vec::new();
        for (i, e) in cfg.match_conditions.iter().enumerate() {
            conditions.push(parse_cond(e).ok_or_else(|| {
                invalid(format!(
                    "authorizers[{}].webhook.matchConditions[{i}].expression: Invalid value: {e:?}: the test cluster understands request.groups.exists(g, g.startsWith('P')), request.groups.exists(g, g == 'G'), 'G' in request.groups, request.user == 'U', request.user.startsWith('P'), and their negation with !",
                    cfg.name
                ))
            })?);
        }
        if cfg.timeout.is_zero() || cfg.timeout > Duration::from_secs(30) {
            return Err(invalid(format!(
                "authorizers[{}].webhook.timeout: Invalid value: {:?}: must be > 0s and <= 30s",
                cfg.name, cfg.timeout
            )));
        }
        let rest = cfg
            .url
            .strip_prefix("https://")
            .ok_or_else(|| invalid(format!("webhook {:?}: server must be https://", cfg.url)))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let host = authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| invalid(format!("webhook host {host:?}: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(cfg.ca_pem.as_bytes()) {
            roots
                .add(c.map_err(std::io::Error::other)?)
                .map_err(std::io::Error::other)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots);
        let mut tls = match &cfg.client_cert {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(std::io::Error::other)?;
                let key =
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(std::io::Error::other)?;
                b.with_client_auth_cert(chain, key)
                    .map_err(std::io::Error::other)?
            }
            None => b.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            authority: authority.to_string(),
            path: path.to_string(),
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            conditions,
            cfg,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// `spec` of the SubjectAccessReview kube-apiserver's webhook authorizer
    /// sends (empty fields left out, as Go's `omitempty` does).
    fn spec(user: &UserInfo, a: &Attrs) -> Value {
        let mut spec = serde_json::Map::new();
        let put = |m: &mut serde_json::Map<String, Value>, k: &str, v: &str| {
            if !v.is_empty() {
                m.insert(k.into(), json!(v));
            }
        };
        if let Some(path) = &a.path {
            spec.insert(
                "nonResourceAttributes".into(),
                json!({"path": path, "verb": a.verb}),
            );
        } else {
            let mut ra = serde_json::Map::new();
            put(&mut ra, "namespace", &a.namespace);
            put(&mut ra, "verb", &a.verb);
            put(&mut ra, "group", &a.group);
            put(&mut ra, "version", &a.version);
            put(&mut ra, "resource", &a.resource);
            put(&mut ra, "subresource", &a.subresource);
            put(&mut ra, "name", &a.name);
            spec.insert("resourceAttributes".into(), Value::Object(ra));
        }
        put(&mut spec, "user", &user.username);
        if !user.groups.is_empty() {
            spec.insert("groups".into(), json!(user.groups));
        }
        if !user.extra.is_empty() {
            spec.insert("extra".into(), json!(user.extra));
        }
        put(&mut spec, "uid", &user.uid);
        Value::Object(spec)
    }

    async fn decide(&self, user: &UserInfo, a: &Attrs) -> Result<Decision, String> {
        if !self.conditions.iter().all(|c| c.eval(user)) {
            return Ok(Decision::NoOpinion(String::new()));
        }
        let spec = Self::spec(user, a);
        let key = spec.to_string();
        let now = Instant::now();
        if let Some((d, until)) = self.cache.lock().unwrap().get(&key).cloned()
            && until > now
        {
            return Ok(d);
        }
        let body = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                          "metadata": {"creationTimestamp": Value::Null}, "spec": spec,
                          "status": {"allowed": false}});
        let mut delay = self.cfg.retry_initial;
        let mut attempt = 1;
        let status = loop {
            match tokio::time::timeout(self.cfg.timeout, self.post(&body)).await {
                Err(_) => {
                    return Err(format!(
                        "Post \"{}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
                        self.cfg.url
                    ));
                }
                Ok(Err(e)) => return Err(format!("Post \"{}\": {e}", self.cfg.url)),
                Ok(Ok((code, text))) => {
                    let retry = code >= 500 || code == 429;
                    if retry && attempt < self.cfg.retry_steps {
                        attempt += 1;
                        tokio::time::sleep(delay).await;
                        delay = delay.mul_f64(1.5);
                        continue;
                    }
                    if code != 200 {
                        return Err(format!(
                            "the server responded with the status code {code} but did not return more information (post subjectaccessreviews.authorization.k8s.io)"
                        ));
                    }
                    let v: Value = serde_json::from_slice(&text)
                        .map_err(|e| format!("decoding the webhook's answer: {e}"))?;
                    if v["apiVersion"] != "authorization.k8s.io/v1"
                        || v["kind"] != "SubjectAccessReview"
                    {
                        return Err(format!(
                            "the webhook answered {}/{}, not authorization.k8s.io/v1 SubjectAccessReview",
                            v["apiVersion"], v["kind"]
                        ));
                    }
                    break v["status"].clone();
                }
            }
        };
        let reason = status["reason"].as_str().unwrap_or_default().to_string();
        let (allowed, denied) = (status["allowed"] == true, status["denied"] == true);
        let d = if denied {
            Decision::Deny(reason)
        } else if allowed {
            Decision::Allow(reason)
        } else {
            Decision::NoOpinion(reason)
        };
        let ttl = if allowed && !denied {
            self.cfg.authorized_ttl
        } else {
            self.cfg.unauthorized_ttl
        };
        if !ttl.is_zero() {
            self.cache
                .lock()
                .unwrap()
                .insert(key, (d.clone(), now + ttl));
        }
        if allowed && denied {
            return Err(
                "webhook subject access review returned both allow and deny response".into(),
            );
        }
        Ok(d)
    }

    async fn post(&self, body: &Value) -> Result<(u16, Bytes), String> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("dial tcp {}: {e}", self.authority))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::post(&self.path)
            .header("host", &self.authority)
            .header("content-type", "application/json")
            .header("accept", "application/json, */*")
            .header(
                "user-agent",
                "kube-apiserver/v1.32.0 (linux/amd64) kubernetes/testcluster",
            )
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        let b = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((code, b))
    }
}

/// Asks the chain about a request.
pub async fn authorize(sh: &Shared, user: &UserInfo, a: &Attrs) -> Outcome {
    // kube-apiserver's privileged-group authorizer comes before the configured chain.
    if rbac::is_superuser(user) {
        return Outcome {
            decision: Decision::Allow(String::new()),
            errors: Vec::new(),
        };
    }
    let (mut reasons, mut errors) = (Vec::new(), Vec::new());
    for e in &sh.authorizers {
        let d = match e {
            Entry::Rbac => {
                if rbac::authorize(&sh.store, user, a) {
                    Decision::Allow(String::new())
                } else {
                    Decision::NoOpinion(String::new())
                }
            }
            Entry::Webhook(w) => match w.decide(user, a).await {
                Ok(d) => d,
                Err(err) => {
                    errors.push(err);
                    match w.cfg.failure_policy {
                        FailurePolicy::NoOpinion => Decision::NoOpinion(String::new()),
                        FailurePolicy::Deny => Decision::Deny(String::new()),
                    }
                }
            },
        };
        match d {
            Decision::NoOpinion(r) => {
                if !r.is_empty() {
                    reasons.push(r);
                }
            }
            other => {
                return Outcome {
                    decision: other,
                    errors,
                };
            }
        }
    }
    Outcome {
        decision: Decision::NoOpinion(reasons.join("\n")),
        errors,
    }
}
