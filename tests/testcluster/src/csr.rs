//! CertificateSigningRequests: validation and admission as kube-apiserver does
//! them, and the kube-controller-manager controllers rotator depends on:
//! csrsigning (for kubernetes.io/kube-apiserver-client), csrcleaner, tokencleaner.
use base64::Engine;
use serde_json::{Value, json};

use crate::Shared;
use crate::api::ApiError;
use crate::authn::UserInfo;
use crate::store::{parse_rfc3339, rfc3339};

pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
const KNOWN_USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];
/// kube-controller-manager's csrsigning backdate for clock skew.
const BACKDATE: i64 = 300;

/// How the cluster's signer (and, for `Deny`, an approver policy) behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignerMode {
    Sign,
    /// Approved CSRs are never signed (a stuck or missing controller).
    Never,
    /// Approved CSRs get a `Failed` condition instead of a certificate.
    Fail,
    /// A policy approver denies every new CSR for the client signer.
    Deny,
}

fn invalid(name: &str, field: &str, value: &str, detail: &str) -> ApiError {
    ApiError::invalid(
        "CertificateSigningRequest",
        "certificates.k8s.io",
        name,
        field,
        value,
        detail,
    )
}

pub struct ParsedRequest {
    pub der: Vec<u8>,
    pub organizations: Vec<String>,
}

pub fn parse_request(spec: &Value) -> Result<ParsedRequest, String> {
    let b64 = spec["request"].as_str().ok_or("Required value")?;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("not base64: {e}"))?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|_| "PEM block type must be CERTIFICATE REQUEST".to_string())?;
    if p.label != "CERTIFICATE REQUEST" {
        return Err("PEM block type must be CERTIFICATE REQUEST".into());
    }
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&p.contents)
            .map_err(|e| format!("asn1: structure error: {e}"))?;
    csr.verify_signature()
        .map_err(|_| "x509: ECDSA verification failure".to_string())?;
    let orgs = csr
        .certification_request_info
        .subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Ok(ParsedRequest {
        der: p.contents.clone(),
        organizations: orgs,
    })
}

use x509_parser::prelude::FromDer;

/// Validation and admission for a new CSR; fills the requester fields.
pub fn admit_create(obj: &mut Value, user: &UserInfo, mode: SignerMode) -> Result<(), ApiError> {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let spec = obj["spec"].clone();
    let parsed = parse_request(&spec).map_err(|d| invalid(&name, "spec.request", "<bytes>", &d))?;
    let signer = spec["signerName"].as_str().unwrap_or_default();
    if signer.is_empty() {
        return Err(invalid(&name, "spec.signerName", "", "Required value"));
    }
    if signer
        .split_once('/')
        .is_none_or(|(d, p)| d.is_empty() || p.is_empty() || !d.contains('.'))
    {
        return Err(invalid(
            &name,
            "spec.signerName",
            signer,
            "must be a fully qualified domain and path of the form 'example.com/signer-name'",
        ));
    }
    let usages: Vec<String> = spec["usages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_string))
        .collect();
    for (i, u) in usages.iter().enumerate() {
        if !KNOWN_USAGES.contains(&u.as_str()) {
            return Err(invalid(
                &name,
                &format!("spec.usages[{i}]"),
                u,
                &format!("supported values: \"{}\"", KNOWN_USAGES.join("\", \"")),
            ));
        }
        if usages[..i].contains(u) {
            return Err(invalid(
                &name,
                &format!("spec.usages[{i}]"),
                u,
                "Duplicate value",
            ));
        }
    }
    if let Some(exp) = spec.get("expirationSeconds").filter(|v| !v.is_null()) {
        let n = exp.as_i64().unwrap_or(0);
        if n < 600 {
            return Err(invalid(
                &name,
                "spec.expirationSeconds",
                &n.to_string(),
                "may not specify a duration less than 600 seconds",
            ));
        }
    }
    // CertificateSubjectRestriction admission plugin.
    if signer == CLIENT_SIGNER && parsed.organizations.iter().any(|o| o == "system:masters") {
        return Err(ApiError::forbidden_named(
            "certificatesigningrequests.certificates.k8s.io",
            &name,
            "use of kubernetes.io/kube-apiserver-client signer with system:masters group is not allowed",
        ));
    }
    let s = obj["spec"]
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("spec must be an object"))?;
    s.insert("username".into(), json!(user.username));
    s.insert("groups".into(), json!(user.groups));
    s.remove("uid");
    s.remove("extra");
    if user.uid.is_empty() {
    } else {
        s.insert("uid".into(), json!(user.uid));
    }
    // A denying approver policy decides at once, so the outcome never races rotator's approval.
    obj["status"] = if mode == SignerMode::Deny && signer == CLIENT_SIGNER {
        json!({"conditions": [condition("Denied", "PolicyDenied", "denied by the test cluster's approver policy")]})
    } else {
        json!({})
    };
    Ok(())
}

fn cond_types(v: &Value) -> Vec<String> {
    v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["type"].as_str().map(str::to_string))
        .collect()
}

/// Shared condition rules for `/approval` and `/status` updates.
fn check_conditions(name: &str, old: &Value, new: &Value) -> Result<Vec<Value>, ApiError> {
    let mut conds: Vec<Value> = new["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let types: Vec<String> = cond_types(new);
    for t in cond_types(old) {
        if !types.contains(&t) {
            return Err(invalid(
                name,
                "status.conditions",
                "",
                &format!("updates may not remove a condition of type \"{t}\""),
            ));
        }
    }
    let has = |t: &str| {
        conds
            .iter()
            .any(|c| c["type"] == t && c["status"] == "True")
    };
    if has("Approved") && has("Denied") {
        return Err(invalid(
            name,
            "status.conditions",
            "Denied",
            "Approved and Denied conditions are mutually exclusive",
        ));
    }
    for (i, c) in conds.iter_mut().enumerate() {
        let t = c["type"].as_str().unwrap_or_default().to_string();
        if t.is_empty() {
            return Err(invalid(
                name,
                &format!("status.conditions[{i}].type"),
                "",
                "Required value",
            ));
        }
        if types.iter().filter(|x| **x == t).count() > 1
            && ["Approved", "Denied", "Failed"].contains(&t.as_str())
        {
            return Err(invalid(
                name,
                &format!("status.conditions[{i}].type"),
                &t,
                "Duplicate value",
            ));
        }
        if !matches!(c["status"].as_str(), Some("True" | "False" | "Unknown")) {
            if c["status"].is_null() {
                c["status"] = json!("True");
            } else {
                return Err(invalid(
                    name,
                    &format!("status.conditions[{i}].status"),
                    &c["status"].to_string(),
                    "supported values: \"False\", \"True\", \"Unknown\"",
                ));
            }
        }
        let now = rfc3339(crate::pki::now());
        if c["lastUpdateTime"].is_null() {
            c["lastUpdateTime"] = json!(now);
        }
        if c["lastTransitionTime"].is_null() {
            c["lastTransitionTime"] = json!(now);
        }
    }
    Ok(conds)
}

/// PUT on the main resource: only metadata may change.
pub fn update_main(old: &Value, new: &Value) -> Value {
    let mut out = old.clone();
    out["metadata"] = new["metadata"].clone();
    out
}

pub fn update_approval(old: &Value, new: &Value) -> Result<Value, ApiError> {
    let name = old["metadata"]["name"].as_str().unwrap_or_default();
    let conds = check_conditions(name, old, new)?;
    let mut out = old.clone();
    out["metadata"] = new["metadata"].clone();
    out["status"]["conditions"] = json!(conds);
    Ok(out)
}

pub fn update_status(old: &Value, new: &Value) -> Result<Value, ApiError> {
    let name = old["metadata"]["name"].as_str().unwrap_or_default();
    let conds = check_conditions(name, old, new)?;
    let old_cert = &old["status"]["certificate"];
    let new_cert = &new["status"]["certificate"];
    if !old_cert.is_null() && old_cert != new_cert {
        return Err(invalid(
            name,
            "status.certificate",
            "",
            "updates may not modify existing certificate content",
        ));
    }
    let mut out = old.clone();
    out["metadata"] = new["metadata"].clone();
    out["status"]["conditions"] = json!(conds);
    if !new_cert.is_null() {
        out["status"]["certificate"] = new_cert.clone();
    }
    Ok(out)
}

fn condition(t: &str, reason: &str, message: &str) -> Value {
    let now = rfc3339(crate::pki::now());
    json!({"type": t, "status": "True", "reason": reason, "message": message, "lastUpdateTime": now, "lastTransitionTime": now})
}

fn is(v: &Value, t: &str) -> bool {
    v["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == "True"))
}

/// One pass of the csrsigning controller (and of the `Deny` approver policy).
/// Returns how many CSRs it changed.
pub fn signing_pass(sh: &Shared) -> usize {
    let res = ("certificates.k8s.io", "certificatesigningrequests");
    let (mut items, _) = sh.store.list(res, None);
    // First come, first served, as the controller's work queue does: oldest change first.
    items.sort_by_key(|c| {
        c["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0)
    });
    let mode = *sh.signer_mode.lock().unwrap();
    let mut changed = 0;
    for csr in items {
        if csr["spec"]["signerName"] != CLIENT_SIGNER
            || !csr["status"]["certificate"].is_null()
            || is(&csr, "Failed")
            || is(&csr, "Denied")
        {
            continue;
        }
        let name = csr["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let approved = is(&csr, "Approved");
        let add = |c: Value| {
            sh.store.update(res, "", &name, None, |cur| {
                let mut n = cur.clone();
                let mut conds = n["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                conds.push(c.clone());
                n["status"]["conditions"] = json!(conds);
                Ok(n)
            })
        };
        match (mode, approved) {
            (SignerMode::Deny, false) => {
                let _ = add(condition(
                    "Denied",
                    "PolicyDenied",
                    "denied by the test cluster's approver policy",
                ));
                changed += 1;
            }
            (SignerMode::Fail, true) => {
                let _ = add(condition(
                    "Failed",
                    "SignerFailure",
                    "the test cluster's signer is set to fail",
                ));
                changed += 1;
            }
            (SignerMode::Sign, true) | (SignerMode::Deny, true) => {
                if !sh.take_signing_token() {
                    continue;
                }
                match sign(sh, &csr) {
                    Ok(cert_pem) => {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(cert_pem);
                        let _ = sh.store.update(res, "", &name, None, |cur| {
                            let mut n = cur.clone();
                            n["status"]["certificate"] = json!(b64);
                            Ok(n)
                        });
                    }
                    Err(msg) => {
                        let _ = add(condition("Failed", "SignerValidationFailure", &msg));
                    }
                }
                changed += 1;
            }
            _ => {}
        }
    }
    changed
}

fn sign(sh: &Shared, csr: &Value) -> Result<String, String> {
    let usages: Vec<String> = csr["spec"]["usages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_string))
        .collect();
    if !usages.iter().any(|u| u == "client auth") {
        return Err("invalid usage for client certificate: missing \"client auth\"".into());
    }
    if let Some(bad) = usages
        .iter()
        .find(|u| !["client auth", "digital signature", "key encipherment"].contains(&u.as_str()))
    {
        return Err(format!("invalid usage for client certificate: {bad}"));
    }
    let parsed = parse_request(&csr["spec"]).map_err(|e| format!("unable to parse csr: {e}"))?;
    let max = sh.opts.max_signing_duration.as_secs() as i64;
    let asked = if sh.opts.drop_expiration_seconds {
        max
    } else {
        csr["spec"]["expirationSeconds"].as_i64().unwrap_or(max)
    };
    let d = asked.min(max);
    // The controllers' clock, so tests that move time move the signer too.
    let now = sh.now();
    // Observed on a real controller: under 8h the backdate extends the lifetime;
    // from 8h on it is taken off notAfter instead.
    let not_before = now - BACKDATE;
    let mut not_after = if d >= 8 * 3600 {
        now - BACKDATE + d
    } else {
        now + d
    };
    not_after = not_after.min(sh.client_ca.not_after);
    sh.client_ca
        .sign_client(&parsed.der, &usages, not_before, not_after)
}

/// csrcleaner and tokencleaner; ages use the controllers' clock (`Shared::now`).
pub fn cleaner_pass(sh: &Shared) -> usize {
    let now = sh.now();
    let mut removed = 0;
    let res = ("certificates.k8s.io", "certificatesigningrequests");
    let (items, _) = sh.store.list(res, None);
    for csr in items {
        let name = csr["metadata"]["name"].as_str().unwrap_or_default();
        let created = csr["metadata"]["creationTimestamp"]
            .as_str()
            .and_then(parse_rfc3339)
            .unwrap_or(now);
        let age = now - created;
        let decided = is(&csr, "Approved") || is(&csr, "Denied") || is(&csr, "Failed");
        let cert_expired = csr["status"]["certificate"]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|pem| {
                let (_, p) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
                let (_, c) = x509_parser::parse_x509_certificate(&p.contents).ok()?;
                Some(c.validity().not_after.timestamp() <= now)
            })
            .unwrap_or(false);
        let stale = if decided {
            age >= sh.opts.csr_decided_ttl.as_secs() as i64
        } else {
            age >= sh.opts.csr_pending_ttl.as_secs() as i64
        };
        if stale || cert_expired {
            sh.store.delete(res, "", name);
            removed += 1;
        }
    }
    if sh.opts.token_cleaner {
        let (secrets, _) = sh.store.list(("", "secrets"), Some("kube-system"));
        for s in secrets {
            if s["type"] != "bootstrap.kubernetes.io/token" {
                continue;
            }
            let exp = s["data"]["expiration"]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| parse_rfc3339(&t));
            if exp.is_some_and(|e| e <= now) {
                sh.store.delete(
                    ("", "secrets"),
                    "kube-system",
                    s["metadata"]["name"].as_str().unwrap_or_default(),
                );
                removed += 1;
            }
        }
    }
    removed
}
