//! When a credential is due for renewal, and the daemon's rotate and reconcile
//! passes.
use std::sync::Arc;

use futures_util::StreamExt as _;
use tracing::{info, warn};

use crate::app::App;
use crate::config::RenewWindow;
use crate::store::credentials::Credential;

/// The instant a credential should be renewed: the start of its renewal window
/// (the last `fraction` of its real lifetime, read from the certificate, or a
/// fixed time before notAfter), plus a deterministic per-credential jitter
/// within the first `jitter` of the window, so a fleet issued together does
/// not renew in the same second, and a restart does not reshuffle it.
pub fn renew_at(c: &Credential, window: RenewWindow, jitter: f64) -> i64 {
    let lifetime = (c.not_after - c.not_before).max(1);
    let w = match window {
        RenewWindow::Fraction(f) => (lifetime as f64 * f) as i64,
        RenewWindow::Before(d) => d.as_secs() as i64,
    }
    .clamp(1, lifetime);
    let h = crate::pki::sha256(c.id.as_bytes());
    let unit = u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    c.not_after - w + (unit * jitter * w as f64) as i64
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PassReport {
    pub due: usize,
    pub renewed: usize,
    pub failed: usize,
}

/// The widest renewal window of any credential whose lifetime is at most
/// `longest`: nothing is due before `notAfter` minus this.
fn widest_window(window: RenewWindow, longest: i64) -> i64 {
    match window {
        RenewWindow::Before(d) => d.as_secs() as i64,
        RenewWindow::Fraction(f) => ((longest as f64 * f).ceil() as i64).max(1),
    }
}

/// Current credentials of active users the daemon delivers for (users who
/// hold their own keys renew themselves) that may be due by `now`. A credential
/// is due no earlier than `notAfter - window`, and the window is at most
/// `renew_before`, or `fraction` of the longest current lifetime; so only rows
/// with `notAfter` under that horizon are read, through the (state, not_after)
/// index, instead of every credential with its certificate.
async fn candidates(app: &App, now: i64) -> Result<Vec<Credential>, crate::store::StoreError> {
    let window = app.settings.rotation.window;
    let longest = match window {
        RenewWindow::Before(_) => 0,
        RenewWindow::Fraction(_) => {
            let (longest,): (i64,) = sqlx::query_as(
                "SELECT COALESCE(MAX(not_after - not_before), 0) FROM credentials WHERE state = 'current'",
            )
            .fetch_one(app.store.pool())
            .await?;
            longest
        }
    };
    let widest = widest_window(window, longest);
    Ok(sqlx::query_as(
        "SELECT c.* FROM credentials c JOIN users u ON u.name = c.user_name
         WHERE c.state = 'current' AND c.not_after <= $1 AND u.state = 'active' AND u.delivery != 'client'
         ORDER BY c.not_after",
    )
    .bind(now.saturating_add(widest))
    .fetch_all(app.store.pool())
    .await?)
}

/// Reissues every credential inside its renewal window, `rotation.concurrency`
/// at a time, delivering each new kubeconfig to the delivery directory before
/// the old credential is superseded. Safe to run twice: a credential renewed by
/// the first run is no longer due for the second.
pub async fn rotate_pass(app: &Arc<App>) -> Result<PassReport, crate::store::StoreError> {
    let now = app.clock.now();
    let s = &app.settings.rotation;
    let due: Vec<Credential> = candidates(app, now)
        .await?
        .into_iter()
        .filter(|c| renew_at(c, s.window, s.jitter) <= now)
        .collect();
    if due.is_empty() {
        return Ok(PassReport::default());
    }
    if let Err(e) = crate::support::fsutil::ensure_private_dir(&s.delivery_dir) {
        warn!(dir = %s.delivery_dir.display(), error = %e, "cannot create the delivery directory");
    }
    let results: Vec<bool> = futures_util::stream::iter(due.iter().cloned())
        .map(|c| {
            let app = app.clone();
            async move {
                let mut sink = match sink_for(&app, &c.user_name).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(user = %c.user_name, error = %e, "no usable delivery target");
                        return false;
                    }
                };
                match app
                    .issuer()
                    .rotate_replacing(&c.user_name, Some(&c.id), sink.as_mut(), "daemon")
                    .await
                {
                    Ok(i) => {
                        info!(user = %c.user_name, credential = %i.credential.id, serial = %i.credential.serial, "renewed");
                        true
                    }
                    Err(e) => {
                        warn!(user = %c.user_name, credential = %c.id, error = %e, "renewal failed; retried on the next pass");
                        false
                    }
                }
            }
        })
        .buffer_unordered(s.concurrency)
        .collect()
        .await;
    let renewed = results.iter().filter(|r| **r).count();
    Ok(PassReport {
        due: due.len(),
        renewed,
        failed: due.len() - renewed,
    })
}

/// The user's delivery target as a sink.
async fn sink_for(app: &App, user: &str) -> Result<Box<dyn crate::delivery::Sink>, String> {
    let target = {
        let mut conn = app.store.conn().await.map_err(|e| e.to_string())?;
        crate::store::users::delivery(&mut conn, user)
            .await
            .map_err(|e| e.to_string())?
    };
    Ok(match crate::delivery::Target::parse(&target)? {
        crate::delivery::Target::Directory => Box::new(crate::delivery::FileSink {
            path: app
                .settings
                .rotation
                .delivery_dir
                .join(format!("{user}.kubeconfig")),
        }),
        crate::delivery::Target::Client => {
            return Err("the user holds their own key and renews through the API".into());
        }
        crate::delivery::Target::Secret { namespace, name } => {
            Box::new(crate::delivery::SecretSink {
                cluster: app
                    .cluster
                    .clone()
                    .ok_or("Secret delivery needs the kubernetes signer")?,
                store: app.store.clone(),
                namespace,
                name,
                user: user.into(),
            })
        }
        crate::delivery::Target::Vault { mount, path } => {
            Box::new(crate::vault::kv::VaultSink::new(
                app.vault
                    .clone()
                    .ok_or("Vault delivery needs [vault] (vault.address) in the configuration")?,
                &mount,
                &path,
                user,
            ))
        }
    })
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileReport {
    pub users: usize,
    /// Users whose bindings had drifted and were repaired.
    pub repaired: Vec<String>,
    /// rotator CSR objects with no issuance in flight, deleted.
    pub stray_csrs: usize,
    pub failed: usize,
}

/// Makes the cluster's rotator-managed RoleBindings match the database again
/// (a binding edited or deleted by hand, a subject added), auditing each repair,
/// and deletes CSR objects no issuance is waiting for.
pub async fn reconcile_pass(app: &App) -> Result<ReconcileReport, crate::store::StoreError> {
    let Some(cluster) = &app.cluster else {
        return Ok(ReconcileReport::default());
    };
    let mut report = ReconcileReport::default();
    let users = crate::store::users::list(&app.store, true).await?;
    for u in &users {
        report.users += 1;
        let now = app.clock.now();
        match crate::flows::bindings::sync_user(
            &app.store,
            cluster,
            app.settings.rotation.grace_period,
            now,
            &u.spec.name,
            "daemon:reconcile",
            crate::flows::bindings::Sweep::Everywhere,
        )
        .await
        {
            Ok(r) => {
                app.metrics.unbindable.report(&u.spec.name, Vec::new());
                if !r.is_empty() {
                    warn!(user = %u.spec.name, changes = ?r, "RoleBinding drift repaired");
                    report.repaired.push(u.spec.name.clone());
                }
            }
            // A namespace that is gone: logged once per change, not once per
            // pass; `doctor` lists it.
            Err(e) if crate::flows::bindings::missing_only(&e).is_some() => {
                let missing = crate::flows::bindings::missing_only(&e).unwrap_or_default();
                app.metrics.unbindable.report(&u.spec.name, missing);
            }
            Err(e) => {
                warn!(user = %u.spec.name, error = %e, "reconcile failed for this user");
                report.failed += 1;
            }
        }
    }
    // CSRs first, then the journal: an attempt journals itself before it creates
    // its CSR, so a CSR listed here whose attempt is open is in `open`.
    match cluster.managed_csrs(None).await {
        Ok(names) => {
            let stray = crate::flows::issue::stray_csrs(&app.store, names, None).await?;
            for n in &stray {
                if cluster.delete_csr(n).await.is_ok() {
                    report.stray_csrs += 1;
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot list rotator's CSRs");
            report.failed += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_due_lies_beyond_the_horizon_the_query_reads() {
        // For any credential and window: due now => notAfter <= now + widest window.
        let now = 1_800_000_000;
        for (i, lifetime) in [1i64, 59, 600, 3_600, 86_400, 7 * 86_400]
            .into_iter()
            .enumerate()
        {
            for window in [
                RenewWindow::Fraction(1.0 / 3.0),
                RenewWindow::Fraction(0.9),
                RenewWindow::Fraction(0.01),
                RenewWindow::Before(std::time::Duration::from_secs(1)),
                RenewWindow::Before(std::time::Duration::from_secs(7_200)),
                RenewWindow::Before(std::time::Duration::from_secs(30 * 86_400)),
            ] {
                for jitter in [0.0, 0.1, 0.5] {
                    for left in (-10..=lifetime + 10).step_by((lifetime as usize / 97).max(1)) {
                        let na = now + left;
                        let c = cred(&format!("c{i}-{left}"), na - lifetime, na);
                        if renew_at(&c, window, jitter) <= now {
                            assert!(
                                na <= now + widest_window(window, lifetime),
                                "{window:?} jitter {jitter}: due with {left}s left of {lifetime}s"
                            );
                        }
                    }
                }
            }
        }
    }

    fn cred(id: &str, nb: i64, na: i64) -> Credential {
        Credential {
            id: id.into(),
            user_name: "u".into(),
            generation: 1,
            serial: String::new(),
            fingerprint: String::new(),
            not_before: nb,
            not_after: na,
            state: "current".into(),
            signer: "local-ca".into(),
            csr_name: None,
            key_type: "ecdsa-p256".into(),
            certificate: String::new(),
            state_reason: None,
            state_at: 0,
            created_at: 0,
            access_removed_at: None,
            spki_sha256: None,
            renewed_from: None,
            generation_group: None,
        }
    }

    #[test]
    fn the_window_is_the_last_third_with_bounded_deterministic_jitter() {
        let c = cred("a", 0, 3000);
        assert_eq!(renew_at(&c, RenewWindow::Fraction(1.0 / 3.0), 0.0), 2000);
        let mut seen = Vec::new();
        for i in 0..200 {
            let c = cred(&format!("id{i}"), 0, 3000);
            let t = renew_at(&c, RenewWindow::Fraction(1.0 / 3.0), 0.1);
            assert!((2000..=2100).contains(&t), "{t}");
            assert_eq!(
                t,
                renew_at(&c, RenewWindow::Fraction(1.0 / 3.0), 0.1),
                "deterministic"
            );
            seen.push(t);
        }
        seen.sort();
        seen.dedup();
        assert!(
            seen.len() > 50,
            "a fleet issued together spreads out: {} distinct instants",
            seen.len()
        );
        let c = cred("b", 0, 86400);
        assert_eq!(
            renew_at(
                &c,
                RenewWindow::Before(std::time::Duration::from_secs(3600)),
                0.0
            ),
            82800
        );
        // A fixed window longer than the lifetime means "renew at once".
        assert_eq!(
            renew_at(
                &cred("c", 0, 600),
                RenewWindow::Before(std::time::Duration::from_secs(3600)),
                0.0
            ),
            0
        );
    }
}
