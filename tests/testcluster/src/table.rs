//! `meta.k8s.io/v1` Table responses, which kubectl asks for on `get`: the
//! server decides the columns, as kube-apiserver's printers do.
use serde_json::{Value, json};

use crate::resources::Resource;
use crate::store::parse_rfc3339;

/// Kubernetes' `duration.HumanDuration`.
pub fn human(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => {
            let (m, r) = (s / 60, s % 60);
            if r == 0 {
                format!("{m}m")
            } else {
                format!("{m}m{r}s")
            }
        }
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => {
            let (h, m) = (s / 3600, (s % 3600) / 60);
            if m == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{m}m")
            }
        }
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => {
            let (d, h) = (s / 86400, (s % 86400) / 3600);
            if h == 0 {
                format!("{d}d")
            } else {
                format!("{d}d{h}h")
            }
        }
        s if s < 2 * 365 * 86400 => format!("{}d", s / 86400),
        s => format!("{}y", s / (365 * 86400)),
    }
}

fn age(o: &Value) -> String {
    o["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(parse_rfc3339)
        .map(|t| human(crate::pki::now() - t))
        .unwrap_or_else(|| "<unknown>".into())
}

fn col(name: &str, ty: &str) -> Value {
    json!({"name": name, "type": ty, "format": if name == "Name" { "name" } else { "" }, "description": name, "priority": 0})
}

fn csr_condition(o: &Value) -> String {
    let mut parts: Vec<String> = o["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "True")
        .filter_map(|c| c["type"].as_str().map(str::to_string))
        .collect();
    if !o["status"]["certificate"].is_null() {
        parts.push("Issued".into());
    }
    if parts.is_empty() {
        "Pending".into()
    } else {
        parts.join(",")
    }
}

type Cells = Box<dyn Fn(&Value) -> Vec<Value>>;

pub fn table(r: &Resource, items: &[Value], rv: u64) -> Value {
    let name = |o: &Value| json!(o["metadata"]["name"]);
    let (cols, cells): (Vec<Value>, Cells) = match r.plural {
        "certificatesigningrequests" => (
            vec![
                col("Name", "string"),
                col("Age", "date"),
                col("SignerName", "string"),
                col("Requestor", "string"),
                col("RequestedDuration", "string"),
                col("Condition", "string"),
            ],
            Box::new(move |o| {
                let dur = o["spec"]["expirationSeconds"]
                    .as_i64()
                    .map(human)
                    .unwrap_or_else(|| "<none>".into());
                vec![
                    name(o),
                    json!(age(o)),
                    o["spec"]["signerName"].clone(),
                    o["spec"]["username"].clone(),
                    json!(dur),
                    json!(csr_condition(o)),
                ]
            }),
        ),
        "secrets" => (
            vec![
                col("Name", "string"),
                col("Type", "string"),
                col("Data", "string"),
                col("Age", "string"),
            ],
            Box::new(move |o| {
                let n = o["data"].as_object().map(|m| m.len()).unwrap_or(0);
                vec![name(o), o["type"].clone(), json!(n), json!(age(o))]
            }),
        ),
        "namespaces" => (
            vec![
                col("Name", "string"),
                col("Status", "string"),
                col("Age", "string"),
            ],
            Box::new(move |o| {
                vec![
                    name(o),
                    json!(o["status"]["phase"].as_str().unwrap_or("Active")),
                    json!(age(o)),
                ]
            }),
        ),
        "rolebindings" | "clusterrolebindings" => (
            vec![
                col("Name", "string"),
                col("Role", "string"),
                col("Age", "string"),
            ],
            Box::new(move |o| {
                vec![
                    name(o),
                    json!(format!(
                        "{}/{}",
                        o["roleRef"]["kind"].as_str().unwrap_or(""),
                        o["roleRef"]["name"].as_str().unwrap_or("")
                    )),
                    json!(age(o)),
                ]
            }),
        ),
        "pods" => (
            vec![
                col("Name", "string"),
                col("Ready", "string"),
                col("Status", "string"),
                col("Restarts", "string"),
                col("Age", "string"),
            ],
            Box::new(move |o| {
                vec![
                    name(o),
                    json!("0/0"),
                    json!(o["status"]["phase"].as_str().unwrap_or("Pending")),
                    json!("0"),
                    json!(age(o)),
                ]
            }),
        ),
        _ => (
            vec![col("Name", "string"), col("Age", "string")],
            Box::new(move |o| vec![name(o), json!(age(o))]),
        ),
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({"cells": cells(o), "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": cols, "rows": rows})
}
