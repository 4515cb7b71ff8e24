//! kubectl's typed clients send request bodies as Kubernetes protobuf
//! (`application/vnd.kubernetes.protobuf`: "k8s\0" + runtime.Unknown). This
//! decodes those bodies into the JSON the rest of the server works on, for the
//! kinds kubectl sends; field numbers are from k8s.io/api's generated.proto.
//! Responses are always JSON, which kubectl accepts.
use base64::Engine;
use serde_json::{Map, Value, json};

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Bytes,
    Int,
    Bool,
    Time,
    Msg(&'static [F]),
    MapStr,
    MapBytes,
    MapExtra,
}

struct F(u32, &'static str, Ty, bool);

use Ty::*;

const OWNER_REF: &[F] = &[
    F(5, "apiVersion", Str, false),
    F(1, "kind", Str, false),
    F(3, "name", Str, false),
    F(4, "uid", Str, false),
    F(6, "controller", Bool, false),
    F(7, "blockOwnerDeletion", Bool, false),
];
const META: &[F] = &[
    F(1, "name", Str, false),
    F(2, "generateName", Str, false),
    F(3, "namespace", Str, false),
    F(5, "uid", Str, false),
    F(6, "resourceVersion", Str, false),
    F(7, "generation", Int, false),
    F(8, "creationTimestamp", Time, false),
    F(9, "deletionTimestamp", Time, false),
    F(11, "labels", MapStr, false),
    F(12, "annotations", MapStr, false),
    F(13, "ownerReferences", Msg(OWNER_REF), true),
    F(14, "finalizers", Str, true),
];
const NS_SPEC: &[F] = &[F(1, "finalizers", Str, true)];
const NS_STATUS: &[F] = &[F(1, "phase", Str, false)];
const NAMESPACE: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "spec", Msg(NS_SPEC), false),
    F(3, "status", Msg(NS_STATUS), false),
];
const SUBJECT: &[F] = &[
    F(1, "kind", Str, false),
    F(2, "apiGroup", Str, false),
    F(3, "name", Str, false),
    F(4, "namespace", Str, false),
];
const ROLE_REF: &[F] = &[
    F(1, "apiGroup", Str, false),
    F(2, "kind", Str, false),
    F(3, "name", Str, false),
];
const BINDING: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "subjects", Msg(SUBJECT), true),
    F(3, "roleRef", Msg(ROLE_REF), false),
];
const RULE: &[F] = &[
    F(1, "verbs", Str, true),
    F(2, "apiGroups", Str, true),
    F(3, "resources", Str, true),
    F(4, "resourceNames", Str, true),
    F(5, "nonResourceURLs", Str, true),
];
const ROLE: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "rules", Msg(RULE), true),
];
const USER_INFO: &[F] = &[
    F(1, "username", Str, false),
    F(2, "uid", Str, false),
    F(3, "groups", Str, true),
    F(4, "extra", MapExtra, false),
];
const SSR_STATUS: &[F] = &[F(1, "userInfo", Msg(USER_INFO), false)];
const SSR: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "status", Msg(SSR_STATUS), false),
];
const RES_ATTRS: &[F] = &[
    F(1, "namespace", Str, false),
    F(2, "verb", Str, false),
    F(3, "group", Str, false),
    F(4, "version", Str, false),
    F(5, "resource", Str, false),
    F(6, "subresource", Str, false),
    F(7, "name", Str, false),
];
const NONRES_ATTRS: &[F] = &[F(1, "path", Str, false), F(2, "verb", Str, false)];
const SSAR_SPEC: &[F] = &[
    F(1, "resourceAttributes", Msg(RES_ATTRS), false),
    F(2, "nonResourceAttributes", Msg(NONRES_ATTRS), false),
];
const SSAR: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "spec", Msg(SSAR_SPEC), false),
];
const CSR_SPEC: &[F] = &[
    F(1, "request", Bytes, false),
    F(7, "signerName", Str, false),
    F(8, "expirationSeconds", Int, false),
    F(5, "usages", Str, true),
    F(2, "username", Str, false),
    F(3, "uid", Str, false),
    F(4, "groups", Str, true),
    F(6, "extra", MapExtra, false),
];
const CSR_COND: &[F] = &[
    F(1, "type", Str, false),
    F(6, "status", Str, false),
    F(2, "reason", Str, false),
    F(3, "message", Str, false),
    F(4, "lastUpdateTime", Time, false),
    F(5, "lastTransitionTime", Time, false),
];
const CSR_STATUS: &[F] = &[
    F(1, "conditions", Msg(CSR_COND), true),
    F(2, "certificate", Bytes, false),
];
const CSR: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "spec", Msg(CSR_SPEC), false),
    F(3, "status", Msg(CSR_STATUS), false),
];
const SECRET: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "data", MapBytes, false),
    F(3, "type", Str, false),
    F(4, "stringData", MapStr, false),
    F(5, "immutable", Bool, false),
];
const CONFIGMAP: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "data", MapStr, false),
    F(3, "binaryData", MapBytes, false),
    F(4, "immutable", Bool, false),
];

const OBJECT_REF: &[F] = &[
    F(1, "kind", Str, false),
    F(2, "namespace", Str, false),
    F(3, "name", Str, false),
    F(4, "uid", Str, false),
    F(5, "apiVersion", Str, false),
    F(6, "resourceVersion", Str, false),
    F(7, "fieldPath", Str, false),
];
const LOCAL_REF: &[F] = &[F(1, "name", Str, false)];
const SERVICE_ACCOUNT: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "secrets", Msg(OBJECT_REF), true),
    F(3, "imagePullSecrets", Msg(LOCAL_REF), true),
    F(4, "automountServiceAccountToken", Bool, false),
];
const BOUND_REF: &[F] = &[
    F(1, "kind", Str, false),
    F(2, "apiVersion", Str, false),
    F(3, "name", Str, false),
    F(4, "uid", Str, false),
];
const TOKEN_REQUEST_SPEC: &[F] = &[
    F(1, "audiences", Str, true),
    F(4, "expirationSeconds", Int, false),
    F(3, "boundObjectRef", Msg(BOUND_REF), false),
];
const TOKEN_REQUEST: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "spec", Msg(TOKEN_REQUEST_SPEC), false),
];
const TOKEN_REVIEW_SPEC: &[F] = &[F(1, "token", Str, false), F(2, "audiences", Str, true)];
const TOKEN_REVIEW: &[F] = &[
    F(1, "metadata", Msg(META), false),
    F(2, "spec", Msg(TOKEN_REVIEW_SPEC), false),
];

fn schema(kind: &str) -> Option<&'static [F]> {
    Some(match kind {
        "Namespace" => NAMESPACE,
        "RoleBinding" | "ClusterRoleBinding" => BINDING,
        "Role" | "ClusterRole" => ROLE,
        "SelfSubjectReview" => SSR,
        "SelfSubjectAccessReview" => SSAR,
        "CertificateSigningRequest" => CSR,
        "Secret" => SECRET,
        "ConfigMap" => CONFIGMAP,
        "ServiceAccount" => SERVICE_ACCOUNT,
        "TokenRequest" => TOKEN_REQUEST,
        "TokenReview" => TOKEN_REVIEW,
        _ => return None,
    })
}

struct Reader<'a>(&'a [u8]);

/// A field number with its varint value or its length-delimited bytes.
type Field<'a> = (u32, Result<u64, &'a [u8]>);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    /// Next field: (number, varint value or length-delimited bytes).
    fn field(&mut self) -> Option<Option<Field<'a>>> {
        if self.0.is_empty() {
            return Some(None);
        }
        let key = self.varint()?;
        let (num, wire) = ((key >> 3) as u32, key & 7);
        let v = match wire {
            0 => Ok(self.varint()?),
            1 => Ok(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?)),
            2 => {
                let n = self.varint()? as usize;
                Err(self.bytes(n)?)
            }
            5 => Ok(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?) as u64),
            _ => return None,
        };
        Some(Some((num, v)))
    }
}

fn decode_msg(buf: &[u8], fields: &[F]) -> Option<Value> {
    let mut out = Map::new();
    let mut r = Reader(buf);
    while let Some((num, v)) = r.field()? {
        let Some(f) = fields.iter().find(|f| f.0 == num) else {
            continue;
        };
        let val = match (f.2, v) {
            (Str, Err(b)) => Value::String(String::from_utf8(b.to_vec()).ok()?),
            (Bytes, Err(b)) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
            (Int, Ok(n)) => json!(n as i64),
            (Bool, Ok(n)) => json!(n != 0),
            (Time, Err(b)) => {
                let t = decode_msg(b, &[F(1, "s", Int, false)])?;
                json!(crate::store::rfc3339(t["s"].as_i64().unwrap_or(0)))
            }
            (Msg(s), Err(b)) => decode_msg(b, s)?,
            (MapStr | MapBytes | MapExtra, Err(b)) => {
                let vt = match f.2 {
                    MapStr => Str,
                    MapBytes => Bytes,
                    _ => Msg(&[F(1, "items", Str, true)]),
                };
                let e = decode_msg(b, &[F(1, "k", Str, false), F(2, "v", vt, false)])?;
                let k = e["k"].as_str().unwrap_or_default().to_string();
                let v = match f.2 {
                    MapExtra => e["v"]["items"].clone(),
                    _ => e.get("v").cloned().unwrap_or(json!("")),
                };
                let m = out.entry(f.1).or_insert_with(|| json!({}));
                m[k] = v;
                continue;
            }
            _ => return None,
        };
        // Go's JSON omits empty scalars (omitempty); protobuf carries them explicitly.
        if !f.3 && matches!(&val, Value::String(s) if s.is_empty())
            || val == json!(0)
            || val == json!(false)
        {
            continue;
        }
        if f.3 {
            out.entry(f.1)
                .or_insert_with(|| json!([]))
                .as_array_mut()?
                .push(val);
        } else {
            out.insert(f.1.to_string(), val);
        }
    }
    Some(Value::Object(out))
}

/// Decodes a protobuf request body into JSON; `Err` explains what was not understood.
pub fn to_json(body: &[u8]) -> Result<Value, String> {
    let inner = body
        .strip_prefix(b"k8s\0")
        .ok_or("missing the k8s protobuf magic prefix")?;
    let env = decode_msg(
        inner,
        &[
            F(
                1,
                "typeMeta",
                Msg(&[F(1, "apiVersion", Str, false), F(2, "kind", Str, false)]),
                false,
            ),
            F(2, "raw", Bytes, false),
        ],
    )
    .ok_or("malformed runtime.Unknown envelope")?;
    let kind = env["typeMeta"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api_version = env["typeMeta"]["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let s = schema(&kind).ok_or_else(|| {
        format!("protobuf bodies of kind {kind:?} are not supported by this test server")
    })?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(env["raw"].as_str().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let mut v = decode_msg(&raw, s).ok_or_else(|| format!("malformed {kind} protobuf"))?;
    v["kind"] = json!(kind);
    v["apiVersion"] = json!(api_version);
    if v["metadata"].is_null() {
        v["metadata"] = json!({});
    }
    Ok(v)
}
