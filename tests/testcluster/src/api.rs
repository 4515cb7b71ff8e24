//! The HTTP API: routing, authentication and authorization of every request,
//! API machinery semantics (resourceVersion, 409, AlreadyExists, NotFound,
//! selectors, generateName, watch), and `Status` bodies like kube-apiserver's.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use serde_json::{Value, json};

use crate::Shared;
use crate::authn::{UserInfo, authenticate};
use crate::faults::FaultAction;
use crate::rbac::{self, Attrs};
use crate::resources::{self, Resource};
use crate::store::{UpdateError, rfc3339};

pub type Body = BoxBody<Bytes, std::io::Error>;
const MAX_BODY: usize = 3 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    pub(crate) fn with_details(mut self, d: Value) -> Self {
        self.details = Some(d);
        self
    }
    pub fn status_body(&self) -> Value {
        let mut v = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": self.message, "reason": self.reason, "code": self.code});
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", m)
    }
    pub fn not_found(r: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        )
        .with_details(json!({"name": name, "group": r.group, "kind": r.plural}))
    }
    pub fn already_exists(r: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", r.qualified()),
        )
        .with_details(json!({"name": name, "group": r.group, "kind": r.plural}))
    }
    pub fn conflict(r: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                r.qualified()
            ),
        )
        .with_details(json!({"name": name, "group": r.group, "kind": r.plural}))
    }
    pub fn invalid(
        kind: &str,
        group: &str,
        name: &str,
        field: &str,
        value: &str,
        detail: &str,
    ) -> Self {
        let cause = if detail == "Required value" {
            format!("{field}: Required value")
        } else if detail.starts_with("updates may not") {
            format!("{field}: Forbidden: {detail}")
        } else {
            format!("{field}: Invalid value: {value}: {detail}")
        };
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        Self::new(422, "Invalid", format!("{qualified} \"{name}\" is invalid: {cause}")).with_details(json!({
            "name": name, "group": group, "kind": kind,
            "causes": [{"reason": "FieldValueInvalid", "message": cause.split_once(": ").map(|x| x.1).unwrap_or(&cause), "field": field}]
        }))
    }
    pub fn forbidden_named(qualified: &str, name: &str, why: &str) -> Self {
        Self::new(
            403,
            "Forbidden",
            format!("{qualified} \"{name}\" is forbidden: {why}"),
        )
    }
}

fn respond(code: u16, v: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(serde_json::to_vec(v).expect("json")))
        .map_err(|e| match e {})
        .boxed();
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body)
        .expect("response")
}

fn error(e: &ApiError) -> Response<Body> {
    respond(e.code, &e.status_body())
}

type Query = HashMap<String, String>;

/// Entry point for every request on a connection. `peer` is the client
/// certificate the TLS handshake saw, if any.
pub async fn handle(
    sh: Arc<Shared>,
    req: Request<Incoming>,
    peer: Option<Arc<Vec<u8>>>,
) -> Result<Response<Body>, std::io::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: Query = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let latency = sh.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(action) = sh.faults.check(method.as_str(), &path) {
        match action {
            FaultAction::Status(code) => {
                return Ok(error(&ApiError::new(
                    code,
                    "InternalError",
                    format!("Internal error occurred: injected fault ({code})"),
                )));
            }
            FaultAction::TooManyRequests { retry_after } => {
                let mut r = error(&ApiError::new(
                    429,
                    "TooManyRequests",
                    "the server has received too many requests and has asked us to try again later",
                ));
                r.headers_mut().insert(
                    "retry-after",
                    retry_after.to_string().parse().expect("header"),
                );
                return Ok(r);
            }
            FaultAction::Hang => {
                std::future::pending::<()>().await;
            }
            FaultAction::Drop => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "injected connection drop",
                ));
            }
            FaultAction::Delay(d) => tokio::time::sleep(d).await,
        }
    }
    let headers = req.headers().clone();
    let header = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let accept = header("accept").unwrap_or_default();
    let content_type = header("content-type").unwrap_or_default();
    let user = authenticate(
        &sh,
        peer.as_deref().map(|v| v.as_slice()),
        header("authorization").as_deref(),
    );
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(error(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                "request entity too large",
            )));
        }
    };
    let Some(user) = user else {
        return Ok(error(&ApiError::unauthorized()));
    };
    let body =
        if content_type.starts_with("application/vnd.kubernetes.protobuf") && !body.is_empty() {
            match crate::protobuf::to_json(&body) {
                Ok(v) => Bytes::from(serde_json::to_vec(&v).expect("json")),
                Err(m) => return Ok(error(&ApiError::new(415, "UnsupportedMediaType", m))),
            }
        } else {
            body
        };
    let ctx = Ctx {
        sh: &sh,
        user: &user,
        query: &query,
        accept: &accept,
        content_type: &content_type,
    };
    Ok(match route(&ctx, &method, &path, &body).await {
        Ok(r) => r,
        Err(e) => error(&e),
    })
}

struct Ctx<'a> {
    sh: &'a Arc<Shared>,
    user: &'a UserInfo,
    query: &'a Query,
    accept: &'a str,
    content_type: &'a str,
}

impl Ctx<'_> {
    /// Asks the authorizer chain (crate::authz), as kube-apiserver's
    /// `WithAuthorization` filter does: Allow passes; any other decision after an
    /// authorizer failed is a 500; Deny or no opinion is a 403 carrying the reason.
    async fn authorize(&self, a: &Attrs, qualified: &str) -> Result<(), ApiError> {
        let out = crate::authz::authorize(self.sh, self.user, a).await;
        let reason = match out.decision {
            crate::authz::Decision::Allow(_) => return Ok(()),
            crate::authz::Decision::Deny(r) | crate::authz::Decision::NoOpinion(r) => r,
        };
        if !out.errors.is_empty() {
            return Err(ApiError::new(
                500,
                "InternalError",
                format!("Internal error occurred: {}", out.errors.join(", ")),
            ));
        }
        let mut msg = rbac::forbidden_message(self.user, a, qualified);
        if !reason.is_empty() {
            msg = format!("{msg}: {reason}");
        }
        let mut e = ApiError::new(403, "Forbidden", msg);
        if a.path.is_none() {
            e = e.with_details(json!({"name": a.name, "group": a.group, "kind": a.resource}));
        }
        Err(e)
    }
}

struct ResReq {
    res: &'static Resource,
    ns: String,
    name: String,
    sub: String,
}

fn parse_resource_path(path: &str) -> Option<ResReq> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    if rest.is_empty() {
        return None;
    }
    if rest[0] == "namespaces"
        && rest.len() >= 3
        && let Some(r) = resources::find(group, version, rest[2]).filter(|r| r.namespaced)
    {
        if rest.len() > 5 {
            return None;
        }
        return Some(ResReq {
            res: r,
            ns: rest[1].to_string(),
            name: rest.get(3).unwrap_or(&"").to_string(),
            sub: rest.get(4).unwrap_or(&"").to_string(),
        });
    }
    let r = resources::find(group, version, rest[0])?;
    if rest.len() > 3 {
        return None;
    }
    let name = rest.get(1).unwrap_or(&"").to_string();
    // A namespace's own attributes carry its name as the namespace.
    let ns = if r.plural == "namespaces" {
        name.clone()
    } else {
        String::new()
    };
    Some(ResReq {
        res: r,
        ns,
        name,
        sub: rest.get(2).unwrap_or(&"").to_string(),
    })
}

fn discovery(path: &str) -> Option<Option<Value>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    Some(match segs.as_slice() {
        ["version"] => Some(resources::version()),
        ["api"] => Some(resources::api_versions()),
        ["api", "v1"] => resources::resource_list("", "v1"),
        ["apis"] => Some(resources::api_group_list()),
        ["apis", g] => resources::api_group(g),
        ["apis", g, v] => resources::resource_list(g, v),
        ["healthz"] | ["livez"] | ["readyz"] => Some(Value::String("ok".into())),
        ["openapi", "v3"] => Some(resources::openapi_v3_index()),
        ["openapi", "v3", rest @ ..] => resources::openapi_v3_doc(&rest.join("/")),
        ["openapi", ..] => None,
        _ => return None,
    })
}

async fn route(
    cx: &Ctx<'_>,
    method: &Method,
    path: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    if let Some(doc) = discovery(path) {
        let a = Attrs {
            verb: method.as_str().to_ascii_lowercase(),
            path: Some(path.to_string()),
            ..Default::default()
        };
        cx.authorize(&a, "").await?;
        return match doc {
            Some(Value::String(s)) => Ok(Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed())
                .expect("response")),
            Some(v) => Ok(respond(200, &v)),
            None => Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        };
    }
    let Some(rq) = parse_resource_path(path) else {
        let a = Attrs {
            verb: method.as_str().to_ascii_lowercase(),
            path: Some(path.to_string()),
            ..Default::default()
        };
        cx.authorize(&a, "").await?;
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    if !rq.sub.is_empty() && !rq.res.subresources.contains(&rq.sub.as_str()) {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let watching = matches!(
        cx.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    let verb = match (method, rq.name.is_empty()) {
        (&Method::GET, true) if watching => "watch",
        (&Method::GET, true) => "list",
        (&Method::GET, false) => "get",
        (&Method::POST, true) => "create",
        // TokenRequest: a create on a named object's subresource.
        (&Method::POST, false) if rq.sub == "token" => "create",
        (&Method::PUT, false) => "update",
        (&Method::PATCH, false) => "patch",
        (&Method::DELETE, false) => "delete",
        (&Method::DELETE, true) => "deletecollection",
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource".to_string(),
            ));
        }
    };
    if !rq.res.verbs.contains(&verb) {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let attrs = Attrs {
        verb: verb.into(),
        group: rq.res.group.into(),
        resource: rq.res.plural.into(),
        subresource: rq.sub.clone(),
        namespace: rq.ns.clone(),
        name: rq.name.clone(),
        version: rq.res.version.into(),
        path: None,
    };
    cx.authorize(&attrs, &rq.res.qualified()).await?;
    let store_ns = if rq.res.namespaced {
        rq.ns.as_str()
    } else {
        ""
    };
    if rq.res.namespaced && rq.ns.is_empty() && !rq.name.is_empty() {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    match verb {
        "get" => {
            let obj = cx
                .sh
                .store
                .get(rq.res.key(), store_ns, &rq.name)
                .ok_or_else(|| ApiError::not_found(rq.res, &rq.name))?;
            if wants_table(cx.accept) {
                return Ok(respond(
                    200,
                    &crate::table::table(rq.res, &[obj], cx.sh.store.current_rv()),
                ));
            }
            Ok(respond(200, &obj))
        }
        "list" => {
            let ns = (!rq.ns.is_empty()).then_some(rq.ns.as_str());
            let (items, rv) = cx.sh.store.list(rq.res.key(), ns);
            let items = filter(items, cx.query)?;
            if wants_table(cx.accept) {
                return Ok(respond(200, &crate::table::table(rq.res, &items, rv)));
            }
            Ok(respond(200, &list_doc(rq.res, items, rv)))
        }
        "watch" => watch(cx, rq.res, (!rq.ns.is_empty()).then(|| rq.ns.clone())),
        "create" if rq.sub == "token" => {
            crate::tokens::token_request(cx.sh, &rq.ns, &rq.name, &parse_body(body)?)
                .map(|(code, v)| respond(code, &v))
        }
        "create" => create(cx, &rq, body).map(|(code, v)| respond(code, &v)),
        "update" => {
            let new: Value = parse_body(body)?;
            update(cx, &rq, new).map(|v| respond(200, &v))
        }
        "patch" => patch(cx, &rq, body)
            .await
            .map(|(code, v)| respond(code, &v)),
        "delete" => {
            let obj = cx
                .sh
                .store
                .delete(rq.res.key(), store_ns, &rq.name)
                .ok_or_else(|| ApiError::not_found(rq.res, &rq.name))?;
            if rq.res.plural == "namespaces" {
                delete_namespace_contents(cx.sh, &rq.name);
            }
            // kube-apiserver answers a Secret's deletion with a Status, never
            // the object (its registry does not set ReturnDeletedObject), so
            // `delete` on secrets is not a way to read one.
            if rq.res.plural == "secrets" {
                return Ok(respond(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                            "details": {"name": rq.name, "kind": rq.res.plural, "uid": obj["metadata"]["uid"]}}),
                ));
            }
            Ok(respond(200, &obj))
        }
        "deletecollection" => {
            let ns = (!rq.ns.is_empty()).then_some(rq.ns.as_str());
            let (items, _) = cx.sh.store.list(rq.res.key(), ns);
            let items = filter(items, cx.query)?;
            let mut gone = Vec::new();
            for i in items {
                let n = i["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if let Some(g) = cx.sh.store.delete(
                    rq.res.key(),
                    &n,
                    i["metadata"]["name"].as_str().unwrap_or_default(),
                ) {
                    gone.push(g);
                }
            }
            let rv = cx.sh.store.current_rv();
            Ok(respond(200, &list_doc(rq.res, gone, rv)))
        }
        _ => unreachable!("verbs are matched above"),
    }
}

fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    Ok(v)
}

fn list_doc(r: &Resource, items: Vec<Value>, rv: u64) -> Value {
    // Like kube-apiserver, list items carry no apiVersion/kind of their own.
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut i| {
            if let Some(o) = i.as_object_mut() {
                o.remove("apiVersion");
                o.remove("kind");
            }
            i
        })
        .collect();
    json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}

// ---- selectors ----

#[derive(Debug)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

fn parse_selector(s: &str) -> Result<Vec<Req>, ApiError> {
    let bad = |m: &str| ApiError::bad_request(format!("unable to parse requirement: {m}"));
    let mut reqs = Vec::new();
    for part in split_top(s) {
        let p = part.trim();
        let set = |rest: &str| -> Result<Vec<String>, ApiError> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| bad(p))?;
            Ok(inner.split(',').map(|x| x.trim().to_string()).collect())
        };
        if let Some(k) = p.strip_prefix('!') {
            reqs.push(Req::NotExists(k.trim().into()));
        } else if let Some((k, v)) = p.split_once("!=") {
            reqs.push(Req::Ne(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
            reqs.push(Req::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, rest)) = p.split_once(" notin ") {
            reqs.push(Req::NotIn(k.trim().into(), set(rest)?));
        } else if let Some((k, rest)) = p.split_once(" in ") {
            reqs.push(Req::In(k.trim().into(), set(rest)?));
        } else if !p.is_empty() && !p.contains(' ') {
            reqs.push(Req::Exists(p.into()));
        } else {
            return Err(bad(p));
        }
    }
    Ok(reqs)
}

fn matches(reqs: &[Req], get: impl Fn(&str) -> Option<String>) -> bool {
    reqs.iter().all(|r| match r {
        Req::Eq(k, v) => get(k).as_deref() == Some(v),
        Req::Ne(k, v) => get(k).as_deref() != Some(v),
        Req::Exists(k) => get(k).is_some(),
        Req::NotExists(k) => get(k).is_none(),
        Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
        Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
    })
}

struct Selectors {
    labels: Vec<Req>,
    fields: Vec<Req>,
}

impl Selectors {
    fn from(q: &Query) -> Result<Self, ApiError> {
        let labels = q
            .get("labelSelector")
            .map(|s| parse_selector(s))
            .transpose()?
            .unwrap_or_default();
        let fields = q
            .get("fieldSelector")
            .map(|s| parse_selector(s))
            .transpose()?
            .unwrap_or_default();
        Ok(Self { labels, fields })
    }
    fn accept(&self, obj: &Value) -> bool {
        matches(&self.labels, |k| {
            obj["metadata"]["labels"][k].as_str().map(str::to_string)
        }) && matches(&self.fields, |path| {
            let mut v = obj;
            for seg in path.split('.') {
                v = &v[seg];
            }
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        })
    }
}

fn filter(items: Vec<Value>, q: &Query) -> Result<Vec<Value>, ApiError> {
    let s = Selectors::from(q)?;
    Ok(items.into_iter().filter(|i| s.accept(i)).collect())
}

// ---- watch ----

fn watch(
    cx: &Ctx<'_>,
    r: &'static Resource,
    ns: Option<String>,
) -> Result<Response<Body>, ApiError> {
    let sel = Selectors::from(cx.query)?;
    let store = cx.sh.store.clone();
    let timeout = cx
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let send_initial = cx
        .query
        .get("sendInitialEvents")
        .is_some_and(|v| v == "true");
    let start_rv: Option<u64> = cx
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let mut shutdown = cx.sh.shutdown.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
    let line = |t: &str, o: &Value| {
        let mut b = serde_json::to_vec(&json!({"type": t, "object": o})).expect("json");
        b.push(b'\n');
        Ok(Frame::data(Bytes::from(b)))
    };
    tokio::spawn(async move {
        let mut notify = store.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut last = match start_rv {
            Some(rv) if !send_initial => rv,
            _ => {
                let (items, rv) = store.list(r.key(), ns.as_deref());
                for i in items.iter().filter(|i| sel.accept(i)) {
                    if tx.send(line("ADDED", i)).await.is_err() {
                        return;
                    }
                }
                if send_initial {
                    let bm = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
                    if tx.send(line("BOOKMARK", &bm)).await.is_err() {
                        return;
                    }
                }
                rv
            }
        };
        loop {
            match store.events_since(r.key(), ns.as_deref(), last) {
                None => {
                    let e =
                        ApiError::new(410, "Expired", format!("too old resource version: {last}"));
                    let _ = tx.send(line("ERROR", &e.status_body())).await;
                    return;
                }
                Some((events, cur)) => {
                    for e in events.iter().filter(|e| sel.accept(&e.object)) {
                        if tx.send(line(e.kind, &e.object)).await.is_err() {
                            return;
                        }
                    }
                    // Every event up to `cur` was in that answer.
                    last = cur;
                }
            }
            tokio::select! {
                c = notify.changed() => if c.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok(Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response"))
}

// ---- writes ----

fn validate_name(r: &Resource, name: &str) -> Result<(), ApiError> {
    let kind = r.kind;
    let bad = |msg: &str| {
        ApiError::invalid(
            kind,
            r.group,
            name,
            "metadata.name",
            &format!("\"{name}\""),
            msg,
        )
    };
    if r.group == "rbac.authorization.k8s.io" {
        if name == "." || name == ".." || name.contains('/') || name.contains('%') {
            return Err(bad(
                "may not contain '/' or '%', and may not be '.' or '..'",
            ));
        }
        return Ok(());
    }
    let label_only = r.plural == "namespaces";
    let max = if label_only { 63 } else { 253 };
    let ok_chars = name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (!label_only && b == b'.')
    });
    let ends_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if name.len() > max || !ok_chars || !ends_ok {
        return Err(bad(&format!(
            "a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-'{}, and must start and end with an alphanumeric character",
            if label_only { "label" } else { "subdomain" },
            if label_only { "" } else { " or '.'" }
        )));
    }
    Ok(())
}

fn generate_suffix() -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    crate::pki::random_bytes::<5>()
        .iter()
        .map(|b| ALPHA[*b as usize % ALPHA.len()] as char)
        .collect()
}

fn create(cx: &Ctx<'_>, rq: &ResReq, body: &Bytes) -> Result<(u16, Value), ApiError> {
    let mut obj = parse_body(body)?;
    match rq.res.plural {
        "tokenreviews" => return crate::tokens::token_review(cx.sh, obj),
        "selfsubjectreviews" => {
            let mut ui = json!({"username": cx.user.username, "groups": cx.user.groups});
            if !cx.user.uid.is_empty() {
                ui["uid"] = json!(cx.user.uid);
            }
            if !cx.user.extra.is_empty() {
                ui["extra"] = json!(cx.user.extra);
            }
            return Ok((
                201,
                json!({"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                                   "metadata": {"creationTimestamp": Value::Null}, "status": {"userInfo": ui}}),
            ));
        }
        "selfsubjectaccessreviews" => return Ok((201, access_review(cx, obj))),
        _ => {}
    }
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    let body_ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if rq.res.namespaced && !body_ns.is_empty() && body_ns != rq.ns {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if !rq.res.namespaced
        && let Some(m) = obj["metadata"].as_object_mut()
    {
        m.remove("namespace");
    }
    let name = match obj["metadata"]["name"].as_str().filter(|n| !n.is_empty()) {
        Some(n) => n.to_string(),
        None => match obj["metadata"]["generateName"].as_str() {
            Some(p) if !p.is_empty() => format!("{p}{}", generate_suffix()),
            _ => {
                return Err(ApiError::invalid(
                    rq.res.kind,
                    rq.res.group,
                    "",
                    "metadata.name",
                    "",
                    "Required value",
                ));
            }
        },
    };
    obj["metadata"]["name"] = json!(name);
    validate_name(rq.res, &name)?;
    if rq.res.namespaced && cx.sh.store.get(("", "namespaces"), "", &rq.ns).is_none() {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("namespaces \"{}\" not found", rq.ns),
        )
        .with_details(json!({"name": rq.ns, "kind": "namespaces"})));
    }
    obj["apiVersion"] = json!(rq.res.api_version());
    obj["kind"] = json!(rq.res.kind);
    admit(cx, rq, None, &mut obj)?;
    if cx.query.contains_key("dryRun") {
        // A dry run goes through storage too: a name that exists is a 409.
        let store_ns = if rq.res.namespaced {
            rq.ns.as_str()
        } else {
            ""
        };
        if cx.sh.store.get(rq.res.key(), store_ns, &name).is_some() {
            return Err(ApiError::already_exists(rq.res, &name));
        }
        return Ok((201, obj));
    }
    let store_ns = if rq.res.namespaced {
        rq.ns.as_str()
    } else {
        ""
    };
    let created = cx
        .sh
        .store
        .create(rq.res.key(), store_ns, obj)
        .map_err(|_| ApiError::already_exists(rq.res, &name))?;
    if rq.res.plural == "namespaces" {
        crate::bootstrap::publish_root_ca(&cx.sh.store, &name, &cx.sh.serving_ca.cert_pem);
    }
    Ok((201, created))
}

/// Admission for creates (`old` = None) and updates.
fn admit(cx: &Ctx<'_>, rq: &ResReq, old: Option<&Value>, obj: &mut Value) -> Result<(), ApiError> {
    match rq.res.plural {
        "certificatesigningrequests" if old.is_none() => {
            crate::csr::admit_create(obj, cx.user, *cx.sh.signer_mode.lock().unwrap())?
        }
        "secrets" => {
            if obj["type"].is_null() {
                obj["type"] = json!("Opaque");
            }
            if let Some(old) = old
                && old["type"] != obj["type"]
            {
                return Err(ApiError::invalid(
                    "Secret",
                    "",
                    &rq.name,
                    "type",
                    &obj["type"].to_string(),
                    "field is immutable",
                ));
            }
            if let Some(sd) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
                && let Some(m) = sd.as_object()
            {
                for (k, v) in m {
                    let enc = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default());
                    obj["data"][k] = json!(enc);
                }
            }
        }
        "rolebindings" | "clusterrolebindings" => {
            let rr = &obj["roleRef"];
            let (kind, name) = (
                rr["kind"].as_str().unwrap_or_default(),
                rr["name"].as_str().unwrap_or_default(),
            );
            if name.is_empty()
                || !matches!(kind, "Role" | "ClusterRole")
                || (rq.res.plural == "clusterrolebindings" && kind != "ClusterRole")
            {
                return Err(ApiError::invalid(
                    rq.res.kind,
                    rq.res.group,
                    obj["metadata"]["name"].as_str().unwrap_or_default(),
                    "roleRef.kind",
                    &format!("\"{kind}\""),
                    "supported values: \"Role\", \"ClusterRole\"",
                ));
            }
            if let Some(old) = old
                && old["roleRef"] != obj["roleRef"]
            {
                return Err(ApiError::invalid(
                    rq.res.kind,
                    rq.res.group,
                    &rq.name,
                    "roleRef",
                    &obj["roleRef"].to_string(),
                    "cannot change roleRef",
                ));
            }
            let ns = if rq.res.plural == "rolebindings" {
                rq.ns.as_str()
            } else {
                ""
            };
            if !rbac::may_bind(&cx.sh.store, cx.user, ns, kind, name) {
                return Err(ApiError::forbidden_named(
                    &rq.res.qualified(),
                    obj["metadata"]["name"].as_str().unwrap_or_default(),
                    &format!(
                        "user \"{}\" (groups={:?}) is attempting to grant RBAC permissions not currently held (no \"bind\" on {kind} \"{name}\")",
                        cx.user.username, cx.user.groups
                    ),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

fn update(cx: &Ctx<'_>, rq: &ResReq, mut new: Value) -> Result<Value, ApiError> {
    let body_name = new["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if body_name != rq.name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({})",
            rq.name
        )));
    }
    new["apiVersion"] = json!(rq.res.api_version());
    new["kind"] = json!(rq.res.kind);
    let expect = new["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    let store_ns = if rq.res.namespaced {
        rq.ns.as_str()
    } else {
        ""
    };
    let r = cx.sh.store.update(rq.res.key(), store_ns, &rq.name, expect.as_deref(), |old| {
        if rq.res.plural == "certificatesigningrequests" {
            return match rq.sub.as_str() {
                "approval" => {
                    let signer = old["spec"]["signerName"].as_str().unwrap_or_default();
                    let domain_wild = signer.split_once('/').map(|(d, _)| format!("{d}/*")).unwrap_or_default();
                    let approve = |name: &str| {
                        rbac::authorize(&cx.sh.store, cx.user, &Attrs {
                            verb: "approve".into(),
                            group: "certificates.k8s.io".into(),
                            resource: "signers".into(),
                            name: name.into(),
                            ..Default::default()
                        })
                    };
                    if !approve(signer) && !approve(&domain_wild) {
                        return Err(ApiError::forbidden_named(
                            "certificatesigningrequests.certificates.k8s.io",
                            &rq.name,
                            &format!("user not permitted to approve requests with signerName \"{signer}\""),
                        ));
                    }
                    crate::csr::update_approval(old, &new)
                }
                "status" => crate::csr::update_status(old, &new),
                _ => Ok(crate::csr::update_main(old, &new)),
            };
        }
        // An update that names a uid is conditional on it (kube-apiserver takes
        // the body's uid as a precondition): replacing a different object than
        // the writer means is a 409.
        if let (Some(want), Some(have)) = (
            new["metadata"]["uid"].as_str().filter(|u| !u.is_empty()),
            old["metadata"]["uid"].as_str(),
        ) && want != have
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": Precondition failed: UID in precondition: {want}, UID in object meta: {have}",
                    rq.res.qualified(),
                    rq.name
                ),
            )
            .with_details(json!({"name": rq.name, "group": rq.res.group, "kind": rq.res.plural})));
        }
        let mut n = new.clone();
        admit(cx, rq, Some(old), &mut n)?;
        Ok(n)
    });
    r.map_err(|e| match e {
        UpdateError::NotFound => ApiError::not_found(rq.res, &rq.name),
        UpdateError::Conflict => ApiError::conflict(rq.res, &rq.name),
        UpdateError::Invalid(e) => e,
    })
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn json_patch(target: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| ApiError::bad_request("json patch must be an array"))?;
    for op in ops {
        let path = op["path"].as_str().unwrap_or_default();
        let (parent, last) = path
            .rsplit_once('/')
            .ok_or_else(|| ApiError::bad_request(format!("bad patch path {path:?}")))?;
        let last = last.replace("~1", "/").replace("~0", "~");
        let p = target.pointer_mut(parent).ok_or_else(|| {
            ApiError::new(422, "Invalid", format!("doc is missing path: {parent}"))
        })?;
        match op["op"].as_str() {
            Some("add") | Some("replace") => match p {
                Value::Object(m) => {
                    m.insert(last, op["value"].clone());
                }
                Value::Array(a) if last == "-" => a.push(op["value"].clone()),
                Value::Array(a) => {
                    let i: usize = last
                        .parse()
                        .map_err(|_| ApiError::bad_request("bad array index"))?;
                    if op["op"] == "add" {
                        a.insert(i.min(a.len()), op["value"].clone())
                    } else if i < a.len() {
                        a[i] = op["value"].clone()
                    }
                }
                _ => return Err(ApiError::bad_request("patch target is not a container")),
            },
            Some("remove") => match p {
                Value::Object(m) => {
                    m.remove(&last);
                }
                Value::Array(a) => {
                    let i: usize = last
                        .parse()
                        .map_err(|_| ApiError::bad_request("bad array index"))?;
                    if i < a.len() {
                        a.remove(i);
                    }
                }
                _ => {}
            },
            Some("test") => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("testing value {path} failed"),
                    ));
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unsupported patch op {other:?}"
                )));
            }
        }
    }
    Ok(())
}

async fn patch(cx: &Ctx<'_>, rq: &ResReq, body: &Bytes) -> Result<(u16, Value), ApiError> {
    let ct = cx.content_type.split(';').next().unwrap_or_default().trim();
    let store_ns = if rq.res.namespaced {
        rq.ns.as_str()
    } else {
        ""
    };
    let current = cx.sh.store.get(rq.res.key(), store_ns, &rq.name);
    let p: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let Some(mut cur) = current else {
        if ct == "application/apply-patch+yaml" {
            // Server-side apply creates what does not exist, which kube-apiserver
            // authorizes as a create as well as a patch.
            cx.authorize(
                &Attrs {
                    verb: "create".into(),
                    group: rq.res.group.into(),
                    resource: rq.res.plural.into(),
                    namespace: rq.ns.clone(),
                    name: rq.name.clone(),
                    ..Default::default()
                },
                &rq.res.qualified(),
            )
            .await?;
            return create(
                cx,
                &ResReq {
                    res: rq.res,
                    ns: rq.ns.clone(),
                    name: String::new(),
                    sub: String::new(),
                },
                body,
            );
        }
        return Err(ApiError::not_found(rq.res, &rq.name));
    };
    let explicit_rv = p["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    match ct {
        "application/json-patch+json" => json_patch(&mut cur, &p)?,
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/apply-patch+yaml" => merge_patch(&mut cur, &p),
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                ),
            ));
        }
    }
    // A patch applies to the latest version unless it names one itself.
    match explicit_rv {
        Some(rv) => cur["metadata"]["resourceVersion"] = json!(rv),
        None => {
            if let Some(m) = cur["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
        }
    }
    update(cx, rq, cur).map(|v| (200, v))
}

fn access_review(cx: &Ctx<'_>, mut req: Value) -> Value {
    let spec = &req["spec"];
    let allowed = if let Some(ra) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        let s = |k: &str| ra[k].as_str().unwrap_or_default().to_string();
        rbac::evaluate(
            &cx.sh.store,
            cx.user,
            &Attrs {
                verb: s("verb"),
                group: s("group"),
                resource: s("resource"),
                subresource: s("subresource"),
                namespace: s("namespace"),
                name: s("name"),
                version: s("version"),
                path: None,
            },
        )
    } else if let Some(nr) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
        rbac::evaluate(
            &cx.sh.store,
            cx.user,
            &Attrs {
                verb: nr["verb"].as_str().unwrap_or_default().into(),
                path: Some(nr["path"].as_str().unwrap_or_default().into()),
                ..Default::default()
            },
        )
    } else {
        false
    };
    req["apiVersion"] = json!("authorization.k8s.io/v1");
    req["kind"] = json!("SelfSubjectAccessReview");
    req["metadata"] = json!({"creationTimestamp": Value::Null});
    req["status"] = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed"})
    } else {
        json!({"allowed": false})
    };
    req
}

fn delete_namespace_contents(sh: &Shared, ns: &str) {
    for r in resources::RESOURCES.iter().filter(|r| r.namespaced) {
        let (items, _) = sh.store.list(r.key(), Some(ns));
        for i in items {
            sh.store.delete(
                r.key(),
                ns,
                i["metadata"]["name"].as_str().unwrap_or_default(),
            );
        }
    }
}

pub fn now_rfc3339() -> String {
    rfc3339(crate::pki::now())
}
