//! A generation stored but not yet made current, overtaken by a newer one
//! another process made current meanwhile (a leader paused mid-pass, then
//! resumed or restarted), is abandoned: never made current over the newer one.
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rotator::delivery::FileSink;
use rotator::flows::issue::{FaultPoint, Faults, IssueError};

use crate::common::*;
use crate::engines;

/// Once armed, holds the next issuance that has stored its credential (and
/// not delivered it) until the test says whether it resumes or dies there.
#[derive(Default)]
struct Pause {
    armed: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<bool>)>>,
}

impl Pause {
    /// Returns: a receiver told when an issuance is held, and a sender for
    /// what it does next (true: resume, false: die there).
    fn arm(&self) -> (mpsc::Receiver<()>, mpsc::Sender<bool>) {
        let (held_tx, held_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        *self.armed.lock().unwrap() = Some((held_tx, go_rx));
        (held_rx, go_tx)
    }
}

impl Faults for Pause {
    fn hit(&self, p: FaultPoint) -> Result<(), IssueError> {
        if p != FaultPoint::AfterStore {
            return Ok(());
        }
        let Some((held, go)) = self.armed.lock().unwrap().take() else {
            return Ok(());
        };
        held.send(()).unwrap();
        // The runtime keeps its workers while this one waits.
        if tokio::task::block_in_place(|| go.recv().unwrap()) {
            Ok(())
        } else {
            Err(IssueError::Injected(p))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// The paused attempt goes on to deliver and activate.
    Resumes,
    /// It dies there; the next attempt for the user recovers it.
    Dies,
}

async fn rows(app: &rotator::app::App, sql: &'static str) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(sql)
        .fetch_all(app.store.pool())
        .await
        .unwrap()
}

async fn overtaken(then: Then) {
    let dir = tempfile::tempdir().unwrap();
    let pause = Arc::new(Pause::default());
    let app = Arc::new(app(dir.path(), "", pause.clone()).await);
    let out = dir.path().join("alice.kubeconfig");
    let sink = || FileSink { path: out.clone() };
    app.issuer()
        .add_user(spec("alice"), &mut sink(), "t")
        .await
        .unwrap();

    // Generation 2 is stored, then its process stalls before delivering it.
    let (held, go) = pause.arm();
    let (a, mut s) = (app.clone(), sink());
    let paused = tokio::spawn(async move { a.issuer().rotate("alice", &mut s, "paused").await });
    tokio::task::spawn_blocking(move || held.recv().unwrap())
        .await
        .unwrap();
    // Meanwhile another pass makes generation 3 current.
    let newer = app
        .issuer()
        .rotate("alice", &mut sink(), "other")
        .await
        .unwrap();
    assert_eq!(newer.credential.generation, 3);
    let old_id: String = {
        let (id,): (String,) = sqlx::query_as("SELECT id FROM credentials WHERE generation = 2")
            .fetch_one(app.store.pool())
            .await
            .unwrap();
        id
    };

    go.send(then == Then::Resumes).unwrap();
    let resumed = paused.await.unwrap();
    let current_serial = match then {
        Then::Resumes => {
            match resumed {
                Err(IssueError::Overtaken {
                    generation: 2,
                    newer: 3,
                    ..
                }) => {}
                other => panic!("generation 2 must be refused: {other:?}"),
            }
            newer.credential.serial.clone()
        }
        Then::Dies => {
            assert!(
                matches!(resumed, Err(IssueError::Injected(_))),
                "{resumed:?}"
            );
            // The next pass finds generation 2 stored and undelivered, its
            // process gone: it abandons it and rotates from generation 3.
            let next = app
                .issuer()
                .rotate("alice", &mut sink(), "next")
                .await
                .unwrap();
            assert_eq!(next.credential.generation, 4);
            assert_eq!(next.superseded, vec![newer.credential.serial.clone()]);
            next.credential.serial
        }
    };

    let states = rows(
        &app,
        "SELECT CAST(generation AS TEXT), state, state_reason FROM credentials ORDER BY generation",
    )
    .await;
    let current: Vec<_> = states.iter().filter(|r| r.1 == "current").collect();
    assert_eq!(current.len(), 1, "{states:?}");
    let want_current = if then == Then::Resumes { "3" } else { "4" };
    assert_eq!(current[0].0, want_current, "{then:?}: {states:?}");
    let two = &states[1];
    assert_eq!(two.1, "failed", "{then:?}: {states:?}");
    assert!(
        two.2
            .as_deref()
            .is_some_and(|r| r.contains("roll alice back")),
        "{then:?}: {two:?}"
    );
    // Generation 3 was superseded only by what came after it, never by 2.
    if then == Then::Dies {
        assert!(
            states[2].2.as_deref().unwrap().contains(&current_serial),
            "{states:?}"
        );
    }
    let journal = rows(
        &app,
        "SELECT CAST(generation AS TEXT), step, error FROM issuances WHERE generation = 2",
    )
    .await;
    assert_eq!(journal[0].1, "abandoned", "{journal:?}");
    assert!(
        journal[0].2.as_deref().unwrap().contains("generation 3"),
        "{journal:?}"
    );
    // Audited, with why; and generation 2 was never activated.
    let events = rows(
        &app,
        "SELECT action, subject, detail FROM audit_events ORDER BY seq",
    )
    .await;
    let about_two: Vec<_> = events
        .iter()
        .filter(|e| e.2.as_deref().unwrap().contains(&old_id))
        .collect();
    assert!(
        about_two.iter().any(|e| e.0 == "issuance.abandon"
            && e.2.as_deref().unwrap().contains("roll alice back")
            && e.2.as_deref().unwrap().contains("\"newer_generation\":3")),
        "{about_two:?}"
    );
    assert!(
        !about_two.iter().any(|e| e.0 == "credential.activate"),
        "{about_two:?}"
    );
    // The user's kubeconfig holds the current credential, not generation 2's.
    let (_, _, cert, _) = kubeconfig_parts(&out);
    let delivered = rotator::pki::parse_cert_pem(&cert, "kubeconfig").unwrap();
    assert_eq!(delivered.serial, current_serial);
}

engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_attempt_resumed_after_a_newer_generation_is_abandoned_not_activated() {
        overtaken(Then::Resumes).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_attempt_recovered_after_a_newer_generation_is_abandoned_not_activated() {
        overtaken(Then::Dies).await;
    }
}
