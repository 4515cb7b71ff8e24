//! The object store: every object as JSON, one resourceVersion counter for the
//! whole cluster (like etcd's revision), and an event history that watches read.
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// `(group, plural)` — the resource an object belongs to.
pub type ResKey = (&'static str, &'static str);

#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub kind: &'static str, // ADDED, MODIFIED, DELETED
    pub res: ResKey,
    pub namespace: String,
    pub object: Value,
}

#[derive(Debug, Default)]
pub struct Data {
    pub objects: BTreeMap<(ResKey, String, String), Value>,
    pub rv: u64,
    pub history: VecDeque<Event>,
}

const HISTORY: usize = 20_000;

#[derive(Clone)]
pub struct Store {
    pub data: Arc<Mutex<Data>>,
    notify: Arc<tokio::sync::watch::Sender<u64>>,
    /// Every authorization decision the RBAC authorizer made for a request by a
    /// user who is not a superuser (`system:masters` requests are not asked).
    pub authz: Arc<Mutex<Vec<crate::rbac::Decision>>>,
}

pub fn rfc3339(unix: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).unwrap();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let fmt = time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(s, &fmt)
        .ok()
        .map(|t| t.unix_timestamp())
}

fn uid() -> String {
    let b = crate::pki::random_bytes::<16>();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Default for Store {
    fn default() -> Self {
        Self::new(Data::default())
    }
}

impl Store {
    pub fn new(data: Data) -> Self {
        let rv = data.rv;
        let (tx, _) = tokio::sync::watch::channel(rv);
        Self {
            data: Arc::new(Mutex::new(data)),
            notify: Arc::new(tx),
            authz: Arc::default(),
        }
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, res: ResKey, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(res, ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn list(&self, res: ResKey, ns: Option<&str>) -> (Vec<Value>, u64) {
        let d = self.lock();
        let items = d
            .objects
            .iter()
            .filter(|((r, n, _), _)| *r == res && ns.is_none_or(|x| x == n))
            .map(|(_, v)| v.clone())
            .collect();
        (items, d.rv)
    }

    fn record(&self, d: &mut Data, kind: &'static str, res: ResKey, ns: &str, object: Value) {
        d.history.push_back(Event {
            rv: d.rv,
            kind,
            res,
            namespace: ns.to_string(),
            object,
        });
        while d.history.len() > HISTORY {
            d.history.pop_front();
        }
        let _ = self.notify.send(d.rv);
    }

    /// Inserts a new object, filling uid, resourceVersion and creationTimestamp.
    /// `Err(existing)` when the name is taken.
    pub fn create(&self, res: ResKey, ns: &str, mut obj: Value) -> Result<Value, Value> {
        let mut d = self.lock();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let key = (res, ns.to_string(), name);
        if let Some(existing) = d.objects.get(&key) {
            return Err(existing.clone());
        }
        d.rv += 1;
        let m = obj["metadata"].as_object_mut().expect("metadata object");
        m.insert("uid".into(), json!(uid()));
        m.insert("resourceVersion".into(), json!(d.rv.to_string()));
        m.insert(
            "creationTimestamp".into(),
            json!(rfc3339(crate::pki::now())),
        );
        m.remove("deletionTimestamp");
        if !ns.is_empty() {
            m.insert("namespace".into(), json!(ns));
        }
        d.objects.insert(key, obj.clone());
        self.record(&mut d, "ADDED", res, ns, obj.clone());
        Ok(obj)
    }

    /// Replaces an object with `f(current)`. `expect_rv`: optimistic concurrency.
    /// `f` runs without the store lock held (admission may read the store, as RBAC
    /// checks do); the write then happens only if nothing changed meanwhile, and
    /// otherwise an unconditional update is retried, a conditional one is a conflict,
    /// as kube-apiserver's GuaranteedUpdate does.
    pub fn update(
        &self,
        res: ResKey,
        ns: &str,
        name: &str,
        expect_rv: Option<&str>,
        f: impl Fn(&Value) -> Result<Value, crate::api::ApiError>,
    ) -> Result<Value, UpdateError> {
        let key = (res, ns.to_string(), name.to_string());
        loop {
            let Some(cur) = self.lock().objects.get(&key).cloned() else {
                return Err(UpdateError::NotFound);
            };
            let cur_rv = cur["metadata"]["resourceVersion"].clone();
            if let Some(rv) = expect_rv.filter(|r| !r.is_empty())
                && cur_rv.as_str() != Some(rv)
            {
                return Err(UpdateError::Conflict);
            }
            let mut new = f(&cur).map_err(UpdateError::Invalid)?;
            // Server-owned metadata survives any update.
            for k in ["uid", "creationTimestamp", "name", "namespace"] {
                if let Some(v) = cur["metadata"].get(k) {
                    new["metadata"][k] = v.clone();
                }
            }
            new["metadata"]["resourceVersion"] = cur_rv.clone();
            if new == cur {
                return Ok(cur); // a no-op update does not bump the resourceVersion
            }
            let mut d = self.lock();
            match d.objects.get(&key) {
                None => return Err(UpdateError::NotFound),
                Some(now) if now["metadata"]["resourceVersion"] != cur_rv => {
                    if expect_rv.is_some_and(|r| !r.is_empty()) {
                        return Err(UpdateError::Conflict);
                    }
                    continue;
                }
                Some(_) => {}
            }
            d.rv += 1;
            new["metadata"]["resourceVersion"] = json!(d.rv.to_string());
            d.objects.insert(key, new.clone());
            self.record(&mut d, "MODIFIED", res, ns, new.clone());
            return Ok(new);
        }
    }

    pub fn delete(&self, res: ResKey, ns: &str, name: &str) -> Option<Value> {
        let mut d = self.lock();
        let obj = d.objects.remove(&(res, ns.to_string(), name.to_string()))?;
        d.rv += 1;
        let mut gone = obj.clone();
        gone["metadata"]["resourceVersion"] = json!(d.rv.to_string());
        self.record(&mut d, "DELETED", res, ns, gone.clone());
        Some(gone)
    }

    /// Events after `rv` for a resource, or `None` if history no longer reaches back that far.
    pub fn events_since(
        &self,
        res: ResKey,
        ns: Option<&str>,
        rv: u64,
    ) -> Option<(Vec<Event>, u64)> {
        let d = self.lock();
        if let Some(first) = d.history.front()
            && rv + 1 < first.rv
        {
            return None;
        }
        // History is in resourceVersion order: start at the first newer event.
        let start = d.history.partition_point(|e| e.rv <= rv);
        let ev = d
            .history
            .range(start..)
            .filter(|e| e.res == res && ns.is_none_or(|n| n == e.namespace))
            .cloned()
            .collect();
        Some((ev, d.rv))
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }
}

#[derive(Debug)]
pub enum UpdateError {
    NotFound,
    Conflict,
    Invalid(crate::api::ApiError),
}
