//! Bound service-account tokens as kube-apiserver issues and checks them:
//! `POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token` (TokenRequest,
//! `authentication.k8s.io/v1`) returns a JWT signed with the cluster's
//! service-account key (ES256 here; kube-apiserver signs with whatever
//! `--service-account-signing-key-file` holds), a bearer JWT authenticates as
//! `system:serviceaccount:NS:NAME`, and `POST /apis/authentication.k8s.io/v1/tokenreviews`
//! answers whether a token is valid for the audiences asked for
//! (reference/kubernetes-api/authentication-resources/token-request-v1,
//! token-review-v1; reference/access-authn-authz/authentication, "Service account tokens").
//!
//! The claims are those of a real projected token: `iss`, `sub`, `aud`, `exp`,
//! `iat`, `nbf`, `jti` and the private `kubernetes.io` claim with the namespace and
//! the service account's name and uid. A token is valid while its account exists
//! with the uid it names; expiry and not-before are checked with kube-apiserver's
//! one-minute leeway.
use std::collections::BTreeMap;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine;
use serde_json::{Value, json};

use crate::Shared;
use crate::api::ApiError;
use crate::authn::UserInfo;

/// kube-apiserver's clock-skew allowance for `exp` and `nbf` (pkg/serviceaccount/claims.go).
const LEEWAY: i64 = 60;
/// The shortest token TokenRequest grants (kube-apiserver's validation).
const MIN_EXPIRATION: i64 = 600;
/// What TokenRequest grants when `expirationSeconds` is not given.
const DEFAULT_EXPIRATION: i64 = 3600;
pub const CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn unb64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

/// The service-account signing key (`--service-account-signing-key-file`).
pub struct TokenSigner {
    key: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    kid: String,
}

impl TokenSigner {
    pub fn generate() -> Self {
        let doc = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("keygen");
        let pkcs8 = doc.to_pkcs8v1().expect("pkcs8").as_ref().to_vec();
        Self::from_pkcs8(&pkcs8)
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Self {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .expect("service-account key");
        // kube-apiserver's key id: a digest of the public key, so that verifiers
        // can pick the key from the JWKS.
        let kid = b64url(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key().as_ref())
                .as_ref(),
        );
        Self {
            key,
            pkcs8: pkcs8.to_vec(),
            kid,
        }
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as a JWK (what `/openid/v1/jwks` serves).
    pub fn jwk(&self) -> Value {
        let p = self.key.public_key().as_ref();
        json!({"use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
               "x": b64url(&p[1..33]), "y": b64url(&p[33..65])})
    }

    fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = self.key.sign(&rng, input.as_bytes()).expect("sign");
        format!("{input}.{}", b64url(sig.as_ref()))
    }

    /// The claims of a JWT this key signed; `None` when it is not a JWT at all
    /// (another authenticator's token), `Err` when it is one but not ours.
    fn verify(&self, token: &str) -> Option<Result<Value, String>> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let header: Value = serde_json::from_slice(&unb64url(h)?).ok()?;
        let claims: Value = serde_json::from_slice(&unb64url(c)?).ok()?;
        if !header.is_object() || !claims.is_object() {
            return None;
        }
        let Some(sig) = unb64url(s) else {
            return Some(Err("malformed signature".into()));
        };
        if header["alg"] != "ES256" {
            return Some(Err(format!(
                "unexpected signing algorithm {}",
                header["alg"]
            )));
        }
        let public =
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref());
        let signed = &token[..h.len() + 1 + c.len()];
        if public.verify(signed.as_bytes(), &sig).is_err() {
            return Some(Err(
                "square/go-jose: error in cryptographic primitive".into()
            ));
        }
        Some(Ok(claims))
    }
}

/// A JWT ID in the UUID form kube-apiserver uses.
fn jti() -> String {
    let h = crate::hex(&crate::pki::random_bytes::<16>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Mints a token for an existing service account (`audiences` empty = the
/// API server's own, `--api-audiences`).
pub fn mint(
    sh: &Shared,
    ns: &str,
    name: &str,
    audiences: &[String],
    expiration_seconds: i64,
) -> Option<(String, i64)> {
    let sa = sh.store.get(("", "serviceaccounts"), ns, name)?;
    let aud = if audiences.is_empty() {
        sh.opts.api_audiences.clone()
    } else {
        audiences.to_vec()
    };
    let now = sh.now();
    let exp = now + expiration_seconds;
    let claims = json!({
        "aud": aud, "exp": exp, "iat": now, "nbf": now, "iss": sh.opts.service_account_issuer,
        "jti": jti(),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": name, "uid": sa["metadata"]["uid"]}},
        "sub": format!("system:serviceaccount:{ns}:{name}"),
    });
    Some((sh.sa_signer.sign(&claims), exp))
}

/// `POST .../serviceaccounts/{name}/token`, authorized as `create serviceaccounts/token`.
pub fn token_request(
    sh: &Shared,
    ns: &str,
    name: &str,
    body: &Value,
) -> Result<(u16, Value), ApiError> {
    let spec = &body["spec"];
    let exp = match &spec["expirationSeconds"] {
        Value::Null => DEFAULT_EXPIRATION,
        v => v.as_i64().unwrap_or(-1),
    };
    if exp < MIN_EXPIRATION {
        return Err(ApiError::invalid(
            "TokenRequest",
            "authentication.k8s.io",
            name,
            "spec.expirationSeconds",
            &exp.to_string(),
            "may not specify a duration less than 10 minutes",
        ));
    }
    if exp > 1 << 32 {
        return Err(ApiError::invalid(
            "TokenRequest",
            "authentication.k8s.io",
            name,
            "spec.expirationSeconds",
            &exp.to_string(),
            "may not specify a duration larger than 2^32 seconds",
        ));
    }
    if !spec["boundObjectRef"].is_null() {
        // Binding to a Pod or Secret needs objects this server does not model;
        // say so rather than hand out a token that is not bound.
        return Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "TokenRequest.authentication.k8s.io \"{name}\" is invalid: spec.boundObjectRef: Unsupported value: the test cluster does not bind tokens to objects"
            ),
        ));
    }
    let audiences = strings(&spec["audiences"]);
    let (token, exp_at) = mint(sh, ns, name, &audiences, exp).ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            format!("serviceaccounts \"{name}\" not found"),
        )
        .with_details(json!({"name": name, "kind": "serviceaccounts"}))
    })?;
    let aud = if audiences.is_empty() {
        sh.opts.api_audiences.clone()
    } else {
        audiences
    };
    Ok((
        201,
        json!({
            "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": crate::store::rfc3339(sh.now())},
            "spec": {"audiences": aud, "expirationSeconds": exp, "boundObjectRef": Value::Null},
            "status": {"token": token, "expirationTimestamp": crate::store::rfc3339(exp_at)},
        }),
    ))
}

/// What the service-account token authenticator says about a bearer token.
pub enum Verdict {
    /// Not a JWT: another authenticator's business.
    NotMine,
    Rejected(String),
    /// The user, and the audiences of the request the token is valid for.
    User(UserInfo, Vec<String>),
}

/// Checks a JWT for the `audiences` a request (or a TokenReview) targets.
pub fn check(sh: &Shared, token: &str, audiences: &[String]) -> Verdict {
    let claims = match sh.sa_signer.verify(token) {
        None => return Verdict::NotMine,
        Some(Err(e)) => return Verdict::Rejected(e),
        Some(Ok(c)) => c,
    };
    if claims["iss"] != sh.opts.service_account_issuer.as_str() {
        // kube-apiserver hands a JWT of another issuer to the next authenticator.
        return Verdict::NotMine;
    }
    let now = sh.now();
    let (Some(exp), Some(nbf)) = (claims["exp"].as_i64(), claims["nbf"].as_i64()) else {
        return Verdict::Rejected("service account token is missing exp or nbf".into());
    };
    if now > exp + LEEWAY {
        return Verdict::Rejected("service account token has expired".into());
    }
    if now + LEEWAY < nbf {
        return Verdict::Rejected("service account token is not valid yet".into());
    }
    let token_aud = match &claims["aud"] {
        Value::String(s) => vec![s.clone()],
        v => strings(v),
    };
    let matched: Vec<String> = audiences
        .iter()
        .filter(|a| token_aud.contains(a))
        .cloned()
        .collect();
    if matched.is_empty() {
        return Verdict::Rejected(format!(
            "token audiences {token_aud:?} is invalid for the target audiences {audiences:?}"
        ));
    }
    let k = &claims["kubernetes.io"];
    let (Some(ns), Some(name), Some(uid)) = (
        k["namespace"].as_str(),
        k["serviceaccount"]["name"].as_str(),
        k["serviceaccount"]["uid"].as_str(),
    ) else {
        return Verdict::Rejected("service account token has no kubernetes.io claim".into());
    };
    let Some(sa) = sh.store.get(("", "serviceaccounts"), ns, name) else {
        return Verdict::Rejected(format!("serviceaccounts \"{name}\" not found"));
    };
    let have = sa["metadata"]["uid"].as_str().unwrap_or_default();
    if have != uid {
        return Verdict::Rejected(format!(
            "service account UID ({have}) does not match claim ({uid})"
        ));
    }
    let mut extra = BTreeMap::new();
    if let Some(j) = claims["jti"].as_str() {
        extra.insert(CREDENTIAL_ID.to_string(), vec![format!("JTI={j}")]);
    }
    Verdict::User(
        UserInfo {
            username: format!("system:serviceaccount:{ns}:{name}"),
            uid: uid.to_string(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            extra,
        },
        matched,
    )
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: the token authenticators
/// of the API server asked about one token. Tokens of authenticators that know
/// nothing of audiences (static, bootstrap, legacy Secret tokens) are valid only
/// for the API server's own audiences, as kube-apiserver wraps them.
pub fn token_review(sh: &Shared, mut req: Value) -> Result<(u16, Value), ApiError> {
    let token = req["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if token.is_empty() {
        return Err(ApiError::invalid(
            "TokenReview",
            "authentication.k8s.io",
            "",
            "spec.token",
            "",
            "Required value",
        ));
    }
    let asked = strings(&req["spec"]["audiences"]);
    let audiences = if asked.is_empty() {
        sh.opts.api_audiences.clone()
    } else {
        asked
    };
    let status = match check(sh, &token, &audiences) {
        Verdict::User(u, aud) => json!({"authenticated": true, "user": u, "audiences": aud}),
        Verdict::Rejected(e) => json!({"authenticated": false, "user": {},
                                        "error": format!("[invalid bearer token, {e}]")}),
        Verdict::NotMine => {
            let api_aud: Vec<String> = audiences
                .iter()
                .filter(|a| sh.opts.api_audiences.contains(a))
                .cloned()
                .collect();
            match crate::authn::other_token_user(sh, &token) {
                Some(u) if !api_aud.is_empty() => {
                    json!({"authenticated": true, "user": u, "audiences": api_aud})
                }
                Some(_) => json!({"authenticated": false, "user": {},
                    "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {audiences:?}]", sh.opts.api_audiences)}),
                None => json!({"authenticated": false, "user": {},
                                "error": "[invalid bearer token, token lookup failed]"}),
            }
        }
    };
    req["apiVersion"] = json!("authentication.k8s.io/v1");
    req["kind"] = json!("TokenReview");
    req["metadata"] = json!({"creationTimestamp": Value::Null});
    req["status"] = status;
    Ok((201, req))
}
