//! Refusals of requests that never proved an identity (no valid token secret,
//! no known client certificate) are counted, not written one audit row each:
//! anyone can send them, so a row each would let anyone grow the log. The
//! counts go to `rotator_api_refusals_total{code}` at once and to the audit log
//! as one `api.refusals` summary a minute (and when the listener stops).
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;

use serde_json::json;

use crate::app::App;
use crate::store::{StoreError, audit};

/// Distinct addresses remembered in one window; past it they are only counted as "more".
const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug, Default)]
struct Window {
    since: i64,
    total: u64,
    by_code: BTreeMap<String, u64>,
    addresses: HashSet<IpAddr>,
    addresses_overflow: bool,
}

#[derive(Debug, Default)]
pub struct Refusals {
    window: Mutex<Window>,
}

impl Refusals {
    /// Counts one refusal. `code` is one of the API's own stable codes, never client text.
    pub fn count(&self, app: &App, code: &str, ip: IpAddr) {
        app.metrics.api_refusal(code);
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.total == 0 {
            w.since = app.clock.now();
        }
        w.total += 1;
        *w.by_code.entry(code.to_string()).or_default() += 1;
        if w.addresses.len() < MAX_ADDRESSES {
            w.addresses.insert(ip);
        } else if !w.addresses.contains(&ip) {
            w.addresses_overflow = true;
        }
    }

    /// Writes the window's summary as one `api.refusals` event and starts a new
    /// window; nothing when nothing was refused.
    pub async fn flush(&self, app: &App) -> Result<u64, StoreError> {
        let w = std::mem::take(&mut *self.window.lock().unwrap_or_else(|e| e.into_inner()));
        if w.total == 0 {
            return Ok(0);
        }
        let now = app.clock.now();
        let detail = json!({
            "since": w.since,
            "until": now,
            "total": w.total,
            "by_code": w.by_code,
            "addresses": w.addresses.len(),
            "addresses_capped": w.addresses_overflow,
        });
        let written = async {
            let mut tx = app.store.begin().await?;
            audit::append(&mut tx, now, "api", "api.refusals", "-", detail).await?;
            crate::store::commit(tx).await
        }
        .await;
        if let Err(e) = written {
            // Keep the counts for the next try rather than lose them.
            let mut cur = self.window.lock().unwrap_or_else(|e| e.into_inner());
            cur.total += w.total;
            cur.since = if cur.since == 0 {
                w.since
            } else {
                cur.since.min(w.since)
            };
            for (k, v) in w.by_code {
                *cur.by_code.entry(k).or_default() += v;
            }
            for ip in w.addresses {
                if cur.addresses.len() < MAX_ADDRESSES {
                    cur.addresses.insert(ip);
                }
            }
            return Err(e);
        }
        Ok(w.total)
    }
}
