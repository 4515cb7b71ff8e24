//! Leader election through a `coordination.k8s.io/v1` Lease, so that of several
//! daemons only one runs the jobs. Acquire, renew, or take over an expired lease,
//! always with the resourceVersion read, so two candidates never both win.
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::{Backoff, Cluster, ClusterError, is_not_found, retry};

fn micro_time(unix_micros: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_micros(unix_micros.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// A MicroTime in Unix microseconds: a lease is compared to the microsecond it
/// was renewed, not the second (a standby would take over up to 1 s early).
fn parse_time(v: &serde_json::Value) -> Option<i64> {
    humantime::parse_rfc3339_weak(v.as_str()?)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_micros() as i64)
}

impl Cluster {
    /// One election round at `now_micros` (Unix microseconds): returns whether
    /// `identity` holds the lease afterwards.
    pub async fn try_lease(
        &self,
        ns: &str,
        name: &str,
        identity: &str,
        duration: Duration,
        now_micros: i64,
    ) -> Result<bool, ClusterError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        let pp = PostParams::default();
        let current = retry(
            &format!("reading Lease {ns}/{name}"),
            Backoff::default(),
            || async {
                match api.get(name).await {
                    Ok(l) => Ok(Some(l)),
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            },
        )
        .await?;
        let stamp = micro_time(now_micros);
        let secs = duration.as_secs().max(1) as i64;
        let Some(cur) = current else {
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/managed-by": "rotator"}},
                "spec": {"holderIdentity": identity, "leaseDurationSeconds": secs, "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}
            }))
            .map_err(|e| ClusterError::Invalid(e.to_string()))?;
            return match api.create(&pp, &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false), // another candidate was first
                Err(e) => Err(super::describe(&format!("creating Lease {ns}/{name}"), e)),
            };
        };
        let spec = serde_json::to_value(&cur.spec).unwrap_or_default();
        let holder = spec["holderIdentity"].as_str().unwrap_or_default();
        let renewed = parse_time(&spec["renewTime"]).unwrap_or(0);
        let held_for = spec["leaseDurationSeconds"].as_i64().unwrap_or(secs);
        let mine = holder == identity;
        if !mine && !holder.is_empty() && renewed + held_for * 1_000_000 > now_micros {
            return Ok(false);
        }
        let mut next =
            serde_json::to_value(&cur).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        next["spec"]["holderIdentity"] = json!(identity);
        next["spec"]["leaseDurationSeconds"] = json!(secs);
        next["spec"]["renewTime"] = json!(stamp);
        if !mine {
            next["spec"]["acquireTime"] = json!(stamp);
            next["spec"]["leaseTransitions"] =
                json!(spec["leaseTransitions"].as_i64().unwrap_or(0) + 1);
        }
        let next: Lease =
            serde_json::from_value(next).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        match api.replace(name, &pp, &next).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false), // someone else renewed or took it first
            Err(e) => Err(super::describe(&format!("updating Lease {ns}/{name}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_times_keep_their_microseconds() {
        let t = 1_796_148_000_900_001; // 2026-12-01T18:00:00.900001Z
        assert_eq!(micro_time(t), "2026-12-01T18:00:00.900001Z");
        assert_eq!(parse_time(&json!(micro_time(t))), Some(t));
        // What the API server writes for a MicroTime, and a plain second.
        assert_eq!(
            parse_time(&json!("2026-12-01T18:00:00.900000Z")),
            Some(t - 1)
        );
        assert_eq!(
            parse_time(&json!("2026-12-01T18:00:00Z")),
            Some(t - 900_001)
        );
    }
}
