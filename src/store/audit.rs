//! The audit log: a keyed hash chain plus a head checkpoint kept outside the
//! database.
//!
//! Events are appended only inside the transaction of the change they record.
//! Each event's `hash` covers its content and the previous event's `hash`:
//! - keyed events (`keyed = 1`, every event rotator 0008+ writes) carry
//!   HMAC-SHA256 under the audit key (`audit.key_file`, 0600, never in the database),
//!   so an edited chain cannot be re-hashed by someone without the key;
//! - unkeyed events (`keyed = 0`) are the plain SHA-256 chain older databases have.
//!   They still verify, and once keyed events exist they are protected too: the
//!   first keyed event's MAC covers the last unkeyed hash. An unkeyed event after
//!   a keyed one, or at or after the checkpoint's `keyed_from`, is a break.
//!
//! The checkpoint (`audit.checkpoint_file`) holds the last seq and hash, MACed, and
//! is written after each commit that appended events (under a lock, never going
//! back to an older seq). It is what makes truncation, deletion of every event and
//! re-hashing visible: none of them can match it. It is created once, with the key
//! or at a fresh database's first start (`first_start`); a writer never recreates
//! a missing one, so its loss stays visible until an operator runs
//! `rotator audit reset-checkpoint`.
//!
//! Client-supplied text never makes a large row: `append` cuts the actor, subject
//! and every string in `detail` to [`MAX_TEXT`] bytes (marked with the original
//! length) and the whole detail to [`MAX_DETAIL`] bytes.
use std::borrow::Cow;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::hmac;
use base64::Engine;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;
use zeroize::Zeroizing;

use super::{Store, StoreError, Tx};
use crate::pki::{hex, sha256};

mod first_start;
pub(crate) use first_start::LogState;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest actor, subject or string inside `detail` an event keeps, in bytes.
pub const MAX_TEXT: usize = 256;
/// Most items of one array or object inside `detail` an event keeps.
pub const MAX_ITEMS: usize = 64;
/// Longest serialized `detail` an event keeps, in bytes.
pub const MAX_DETAIL: usize = 8192;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AuditEvent {
    pub seq: i64,
    pub time: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    /// The JSON object as stored (a string, exactly what the hash covers).
    pub detail: String,
    pub prev_hash: String,
    /// SHA-256 (unkeyed) or HMAC-SHA256 (keyed) of the event, hex.
    pub hash: String,
    /// Whether `hash` is an HMAC under the audit key.
    pub keyed: bool,
}

/// By hand: `keyed` is an integer column on both engines (0/1).
impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for AuditEvent {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            seq: row.try_get("seq")?,
            time: row.try_get("time")?,
            actor: row.try_get("actor")?,
            action: row.try_get("action")?,
            subject: row.try_get("subject")?,
            detail: row.try_get("detail")?,
            prev_hash: row.try_get("prev_hash")?,
            hash: row.try_get("hash")?,
            keyed: row.try_get::<i64, _>("keyed")? != 0,
        })
    }
}

/// A JSON array of scalars has exactly one serialization: unambiguous framing.
#[allow(clippy::too_many_arguments)]
fn canonical(
    tag: Option<&str>,
    seq: i64,
    time: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
    prev_hash: &str,
) -> Vec<u8> {
    match tag {
        None => serde_json::to_vec(&(seq, time, actor, action, subject, detail, prev_hash)),
        Some(t) => serde_json::to_vec(&(t, seq, time, actor, action, subject, detail, prev_hash)),
    }
    .expect("serializable")
}

/// The domain tag of keyed events, so a MAC of an event is never a MAC of anything else.
const EVENT_TAG: &str = "rotator-audit-event-v1";
const HEAD_TAG: &str = "rotator-audit-head-v1";

/// The audit key and where the head checkpoint lives. Loaded once per process.
pub struct Keyring {
    key: hmac::Key,
    key_file: PathBuf,
    checkpoint: PathBuf,
    /// The newest head a commit of this process made (what the next checkpoint
    /// write of this process writes), and the ticket of the last commit that
    /// published one.
    newest: std::sync::Mutex<(Option<Head>, u64)>,
    /// This process's turn to write the checkpoint, with the ticket of the last
    /// commit its writes covered. Commits that arrive while a write runs are
    /// covered by the next one (group commit): one write for all of them.
    /// Tickets, not seqs, say what is covered: seqs can go back while the
    /// process runs (the log's last events deleted, `audit reset-checkpoint`
    /// from another process), and a commit covered "by seq" would then return
    /// with the checkpoint behind it.
    written: tokio::sync::Mutex<u64>,
    /// Checkpoint writes of this process that failed, and the commit the
    /// checkpoint is behind since the last of them (until a write covers it).
    trouble: std::sync::Mutex<CheckpointHealth>,
    /// Checkpoint writes [`cover`] started and that have not ended: what
    /// [`Keyring::settle`] waits for before the process ends.
    pending: tokio::sync::watch::Sender<usize>,
}

/// This process's checkpoint writes: what `/readyz`, `/metrics` and the log
/// say when one failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointHealth {
    /// Attempts to move the checkpoint forward that failed (a commit's, or a retry).
    pub failures: u64,
    /// Set while the checkpoint is behind a commit of this process.
    pub behind: Option<Behind>,
}

/// The checkpoint is behind a commit of this process: its write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    /// The newest event this process committed that the checkpoint does not cover.
    pub seq: i64,
    /// When the first write that left it behind failed (Unix seconds).
    pub since: i64,
    /// Why the last attempt failed (with its fix).
    pub error: String,
    /// The publish ticket that write was for: a write covering it clears this.
    ticket: u64,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("key", &"...")
            .field("key_file", &self.key_file)
            .field("checkpoint", &self.checkpoint)
            .finish()
    }
}

fn key_err(path: &Path, reason: impl std::fmt::Display, fix: impl Into<String>) -> StoreError {
    StoreError::AuditKey {
        path: path.display().to_string(),
        reason: reason.to_string(),
        fix: fix.into(),
    }
}

/// The last event a checkpoint vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: String,
}

impl Head {
    /// The head of an empty log.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.into(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CheckpointFile {
    version: u32,
    seq: i64,
    hash: String,
    /// Events from this seq on must be keyed.
    keyed_from: i64,
    mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub keyed_from: i64,
}

/// What reading the checkpoint found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointState {
    Missing,
    /// Present but unreadable, or its MAC does not hold.
    Invalid(String),
    Valid(Checkpoint),
}

impl Keyring {
    /// Loads the audit key; on a database's first start (see [`first_start`])
    /// creates it (0600) and the first checkpoint. `default_path`: the key
    /// is rotator's own `DATA_DIR/audit.key`, not a configured one.
    pub async fn open(
        key_file: &Path,
        checkpoint: &Path,
        default_path: bool,
        store: &Store,
    ) -> Result<Arc<Self>, StoreError> {
        first_start::open(key_file, checkpoint, default_path, store)
            .await
            .map(Arc::new)
    }

    fn from_bytes(bytes: &[u8], key_file: &Path, checkpoint: &Path) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
            key_file: key_file.to_path_buf(),
            checkpoint: checkpoint.to_path_buf(),
            newest: std::sync::Mutex::new((None, 0)),
            written: tokio::sync::Mutex::new(0),
            trouble: Default::default(),
            pending: tokio::sync::watch::channel(0).0,
        }
    }

    /// How long a process that is ending waits for its checkpoint writes.
    pub const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

    /// Waits, at most `limit`, until every checkpoint write a commit of this
    /// process started has ended (done or failed), also those of commits whose
    /// callers were dropped: what a process does before its runtime stops (it
    /// would drop them). False when some were still running at `limit`.
    pub async fn settle(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.pending.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// This process's checkpoint writes: failures so far, and whether the
    /// checkpoint is behind one of its commits now.
    pub fn checkpoint_health(&self) -> CheckpointHealth {
        self.trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn write_failed(&self, seq: i64, ticket: u64, e: &StoreError) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut t = self.trouble.lock().unwrap_or_else(|e| e.into_inner());
        t.failures += 1;
        let since = t.behind.as_ref().map_or(now, |b| b.since);
        t.behind = Some(Behind {
            seq,
            since,
            error: e.to_string(),
            ticket,
        });
    }

    /// A write covered every head published up to `ticket`.
    fn covered(&self, ticket: u64) {
        let mut t = self.trouble.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = t.behind.take_if(|b| b.ticket <= ticket) {
            tracing::info!(
                checkpoint = %self.checkpoint.display(),
                seq = b.seq,
                "audit checkpoint up to date again"
            );
        }
    }

    /// Whether rotator can write the checkpoint here: the lock file opens for
    /// writing, and a file can be made beside the checkpoint (what its atomic
    /// replacement needs). Blocking; writes nothing that stays.
    pub fn probe_writable(&self) -> Result<(), String> {
        let mut lock = self.checkpoint.clone().into_os_string();
        lock.push(".lock");
        let lock = PathBuf::from(lock);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock)
            .map_err(|e| {
                format!(
                    "cannot open its lock file {}: {e}; fix: make it a regular file rotator may write (remove whatever is at that path: rotator makes it again)",
                    lock.display()
                )
            })?;
        let dir = match self.checkpoint.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        tempfile::Builder::new()
            .prefix(".rotator-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| {
                format!(
                    "cannot make a file in {} to replace it atomically: {e}; fix: make that directory writable by rotator (and free some space)",
                    dir.display()
                )
            })?;
        match std::fs::symlink_metadata(&self.checkpoint) {
            Ok(m) if !m.is_file() => Err(format!(
                "{} is not a regular file; fix: move it away and run `rotator audit reset-checkpoint`",
                self.checkpoint.display()
            )),
            _ => Ok(()),
        }
    }

    pub fn checkpoint_path(&self) -> &Path {
        &self.checkpoint
    }

    pub fn key_path(&self) -> &Path {
        &self.key_file
    }

    fn mac(&self, bytes: &[u8]) -> String {
        hex(hmac::sign(&self.key, bytes).as_ref())
    }

    fn mac_matches(&self, bytes: &[u8], expected_hex: &str) -> bool {
        let Some(tag) = unhex(expected_hex) else {
            return false;
        };
        hmac::verify(&self.key, bytes, &tag).is_ok()
    }

    fn head_mac(&self, seq: i64, hash: &str, keyed_from: i64) -> Vec<u8> {
        serde_json::to_vec(&(HEAD_TAG, seq, hash, keyed_from)).expect("serializable")
    }

    /// Reads and authenticates the checkpoint. Blocking (small file).
    pub fn read_checkpoint(&self) -> CheckpointState {
        let text = match std::fs::read_to_string(&self.checkpoint) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return CheckpointState::Missing,
            Err(e) => return CheckpointState::Invalid(format!("cannot read it: {e}")),
        };
        let f: CheckpointFile = match serde_json::from_str(text.trim()) {
            Ok(f) => f,
            Err(e) => return CheckpointState::Invalid(format!("it is not a checkpoint: {e}")),
        };
        if f.version != 1 {
            return CheckpointState::Invalid(format!("unknown version {}", f.version));
        }
        if !self.mac_matches(&self.head_mac(f.seq, &f.hash, f.keyed_from), &f.mac) {
            return CheckpointState::Invalid(
                "its MAC does not hold under the audit key: it was edited or made with another key"
                    .into(),
            );
        }
        CheckpointState::Valid(Checkpoint {
            seq: f.seq,
            hash: f.hash,
            keyed_from: f.keyed_from,
        })
    }

    /// Writes the checkpoint atomically (0600). `keyed_from: None` keeps the existing one.
    fn write_checkpoint(&self, head: &Head, keyed_from: Option<i64>) -> Result<(), StoreError> {
        let keyed_from = match (keyed_from, self.read_checkpoint()) {
            (Some(k), _) => k,
            (None, CheckpointState::Valid(c)) => c.keyed_from,
            (None, _) => head.seq + 1,
        };
        let f = CheckpointFile {
            version: 1,
            seq: head.seq,
            hash: head.hash.clone(),
            keyed_from,
            mac: self.mac(&self.head_mac(head.seq, &head.hash, keyed_from)),
        };
        let mut text = serde_json::to_string(&f).expect("serializable");
        text.push('\n');
        crate::support::fsutil::write_private_atomic(&self.checkpoint, text.as_bytes()).map_err(
            |e| {
                key_err(
                    &self.checkpoint,
                    format!("cannot write the audit checkpoint: {e}"),
                    "make the checkpoint's directory writable by rotator",
                )
            },
        )
    }

    fn lock(&self) -> Result<std::fs::File, StoreError> {
        lock_file(&self.checkpoint)
    }

    /// Writes a checkpoint at `head` whatever is there now (`audit reset-checkpoint`).
    pub fn reset(&self, head: &Head, keyed_from: i64) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        self.write_checkpoint(head, Some(keyed_from))
    }
}

/// After a commit that appended events and published its head as ticket
/// `mine` ([`Keyring::publish`]): returns once the checkpoint is at that head
/// or beyond. The commits of one process take turns; the one whose turn
/// it is writes the newest head any of them committed, so commits that queued
/// behind a write find themselves covered and write nothing. Each write is
/// [`move_checkpoint`]'s: forward only, under the cross-process lock. A
/// failure is counted and kept in [`Keyring::checkpoint_health`] until a
/// later write (the next commit's, or [`catch_up`]) covers it.
pub(crate) async fn advance_checkpoint(
    ring: Arc<Keyring>,
    mine: u64,
    pool: sqlx::AnyPool,
) -> Result<(), StoreError> {
    let written = ring.written.lock().await;
    advance_locked(ring.clone(), written, mine, pool).await
}

/// [`advance_checkpoint`] once this process's turn to write is held.
async fn advance_locked(
    ring: Arc<Keyring>,
    mut written: tokio::sync::MutexGuard<'_, u64>,
    mine: u64,
    pool: sqlx::AnyPool,
) -> Result<(), StoreError> {
    if *written >= mine {
        return Ok(()); // a write since this commit was published covered it
    }
    let (target, upto) = {
        let n = ring.newest.lock().unwrap_or_else(|e| e.into_inner());
        (n.0.clone(), n.1)
    };
    let target = target.ok_or_else(|| StoreError::Invalid("no audit head published".into()))?;
    let seq = target.seq;
    match move_checkpoint(ring.clone(), target, pool).await {
        Ok(()) => {
            // The checkpoint is at `target` or beyond (another process's newer
            // one), which is at or after every head published up to ticket `upto`.
            *written = (*written).max(upto);
            ring.covered(upto);
            Ok(())
        }
        Err(e) => {
            ring.write_failed(seq, upto, &e);
            Err(e)
        }
    }
}

/// What `store::commit` runs once a commit that appended events published
/// `mine`: [`advance_checkpoint`] in a task of its own, so the checkpoint
/// still covers the commit when the caller's future is dropped between the
/// COMMIT and this write (a daemon job cut off at its stop grace). Returns
/// when the write is done; a failure is logged and counted, never returned:
/// the change is committed, and an error would tell the caller it was not.
pub(crate) async fn cover(ring: Arc<Keyring>, mine: u64, pool: sqlx::AnyPool) {
    let pending = Pending::start(ring.clone());
    let task = tokio::spawn({
        let (ring, pool) = (ring.clone(), pool.clone());
        async move {
            let _pending = pending; // ends with the task, also when it is dropped
            advance_logged(ring, mine, pool).await
        }
    });
    match task.await {
        Ok(()) => {}
        // The runtime is shutting down and dropped the task before it ran:
        // write from here while this future is still polled.
        Err(e) if e.is_cancelled() => advance_logged(ring, mine, pool).await,
        Err(e) => tracing::error!(error = %e, "audit checkpoint write panicked"),
    }
}

/// One checkpoint write [`cover`] started, counted in `Keyring::pending`
/// until dropped.
struct Pending(Arc<Keyring>);

impl Pending {
    fn start(ring: Arc<Keyring>) -> Self {
        ring.pending.send_modify(|n| *n += 1);
        Self(ring)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn advance_logged(ring: Arc<Keyring>, mine: u64, pool: sqlx::AnyPool) {
    if let Err(e) = advance_checkpoint(ring.clone(), mine, pool).await {
        tracing::error!(
            checkpoint = %ring.checkpoint.display(),
            error = %e,
            "audit checkpoint not updated: the change is committed and audited, but `rotator audit verify` reports checkpoint_old until a later write covers it (the next commit of any rotator process, or the daemon's next /readyz or /metrics scrape); counted in rotator_audit_checkpoint_write_failures_total"
        );
    }
}

/// How long a probe's retry of a failed checkpoint write may take.
const CATCH_UP_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Retries the checkpoint write when one of this process's failed (what the
/// daemon's `/readyz` and `/metrics` do, so a daemon that commits nothing for
/// a while still heals once the cause is fixed), then says how it stands.
/// `None` without an audit key.
pub async fn catch_up(store: &Store) -> Option<CheckpointHealth> {
    let ring = store.audit.clone()?;
    // Not behind a write that is running (it records its own outcome), and not
    // longer than a probe may take: a checkpoint on a hung file system must not
    // hang /readyz too, which would take every replica out at once.
    if ring.checkpoint_health().behind.is_some()
        && let Ok(written) = ring.written.try_lock()
    {
        let ticket = ring.newest.lock().unwrap_or_else(|e| e.into_inner()).1;
        // A failure is recorded in the health it returns.
        let retry = advance_locked(ring.clone(), written, ticket, store.pool().clone());
        let _ = tokio::time::timeout(CATCH_UP_LIMIT, retry).await;
    }
    Some(ring.checkpoint_health())
}

impl Keyring {
    /// Publishes a committed head; returns its ticket. `in_order`: commits
    /// publish in commit order (SQLite, before the writer turn is released),
    /// so the last one is the newest even when seqs went back; otherwise
    /// (PostgreSQL, after its commit) the highest seq is.
    pub(crate) fn publish(&self, head: Head, in_order: bool) -> u64 {
        let mut n = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if in_order || n.0.as_ref().is_none_or(|h| h.seq < head.seq) {
            n.0 = Some(head);
        }
        n.1 += 1;
        n.1
    }
}

/// Moves the checkpoint forward to `head`, never back (another process may have
/// written a newer one: compared under the lock), only while the log still
/// holds the event the checkpoint recorded (so events deleted at the end and
/// then written anew are not papered over), and never recreates a missing or
/// replaces an invalid one (that would hide the damage).
async fn move_checkpoint(
    ring: Arc<Keyring>,
    head: Head,
    pool: sqlx::AnyPool,
) -> Result<(), StoreError> {
    let r = ring.clone();
    let (lock, state) = tokio::task::spawn_blocking(move || {
        let l = r.lock()?;
        Ok::<_, StoreError>((l, r.read_checkpoint()))
    })
    .await
    .map_err(|e| StoreError::Invalid(e.to_string()))??;
    let c = match state {
        CheckpointState::Valid(c) if c.seq >= head.seq => return Ok(()),
        CheckpointState::Valid(c) => c,
        CheckpointState::Missing => {
            return Err(key_err(
                &ring.checkpoint,
                "the audit checkpoint is missing, so it was not moved forward",
                "run `rotator audit verify` to see what else is missing, then `rotator audit reset-checkpoint`",
            ));
        }
        CheckpointState::Invalid(why) => {
            return Err(key_err(
                &ring.checkpoint,
                format!("the audit checkpoint is invalid ({why}), so it was not moved forward"),
                "run `rotator audit verify`, then `rotator audit reset-checkpoint`",
            ));
        }
    };
    if c.seq > 0 {
        let found: Option<(String,)> =
            sqlx::query_as("SELECT hash FROM audit_events WHERE seq = $1")
                .bind(c.seq)
                .fetch_optional(&pool)
                .await?;
        if found.as_ref().map(|(h,)| h) != Some(&c.hash) {
            return Err(key_err(
                &ring.checkpoint,
                format!(
                    "the log no longer holds event {} as the checkpoint recorded it (events were deleted or replaced), so the checkpoint was not moved forward",
                    c.seq
                ),
                "run `rotator audit verify`",
            ));
        }
    }
    tokio::task::spawn_blocking(move || {
        let _lock = lock;
        ring.write_checkpoint(&head, Some(c.keyed_from))
    })
    .await
    .map_err(|e| StoreError::Invalid(e.to_string()))?
}

/// Serializes checkpoint writers (and key creation) across processes: an
/// exclusive lock on `CHECKPOINT.lock`; the checkpoint itself is replaced by
/// rename, so it cannot carry the lock.
fn lock_file(checkpoint: &Path) -> Result<std::fs::File, StoreError> {
    let mut p = checkpoint.to_path_buf().into_os_string();
    p.push(".lock");
    let p = PathBuf::from(p);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&p)
        .map_err(|e| {
            key_err(
                &p,
                e,
                format!(
                    "make the checkpoint's directory writable by rotator, and {} a regular file (remove anything else at that path: rotator makes it again)",
                    p.display()
                ),
            )
        })?;
    f.lock()
        .map_err(|e| key_err(&p, e, "make the checkpoint's directory writable by rotator"))?;
    Ok(f)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `None` when the file does not exist. Refuses a key readable by group or others.
fn read_key(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
    // Looked at before opening, so a FIFO at the path cannot hang the open.
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(key_err(path, e, "check audit.key_file")),
    };
    if !meta.is_file() {
        return Err(key_err(
            path,
            "it is not a regular file",
            "point audit.key_file at the 0600 file rotator created",
        ));
    }
    // The sealing key's rule: 0600, or the shape kubelet gives a Secret volume's
    // file under fsGroup (root-owned, at most 0440, this process's own group), so
    // replicas that share one key can mount it from a Secret.
    let text = crate::pki::read_private(path, "audit key").map_err(|e| match e {
        crate::pki::ReadPrivate::Mode(_) => {
            let mode = meta.permissions().mode() & 0o777;
            key_err(
                path,
                format!("it is readable or writable by group or others (mode {mode:04o})"),
                format!("chmod 600 {}", path.display()),
            )
        }
        crate::pki::ReadPrivate::Io(e) => key_err(path, e, "check audit.key_file"),
    })?;
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| {
                key_err(
                    path,
                    "it is not base64",
                    "point audit.key_file at the file rotator created (base64 of 32 bytes)",
                )
            })?,
    );
    if bytes.len() != 32 {
        return Err(key_err(
            path,
            format!("the key is {} bytes, not 32", bytes.len()),
            "point audit.key_file at the file rotator created (base64 of 32 bytes)",
        ));
    }
    Ok(Some(bytes))
}

async fn head(conn: &mut super::Conn) -> Result<Head, StoreError> {
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match last {
        Some((seq, hash)) => Head { seq, hash },
        None => Head::genesis(),
    })
}

/// Cuts `s` to [`MAX_TEXT`] bytes on a char boundary, marking the cut with the
/// original length.
pub fn cap_text(s: &str) -> Cow<'_, str> {
    if s.len() <= MAX_TEXT {
        return Cow::Borrowed(s);
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…[cut: {} bytes]", &s[..end], s.len()))
}

/// Bounds every string, array and object inside `v`, then the whole.
pub fn cap_detail(v: Value) -> Value {
    fn walk(v: Value) -> Value {
        match v {
            Value::String(s) => Value::String(cap_text(&s).into_owned()),
            Value::Array(a) => {
                let n = a.len();
                let mut out: Vec<Value> = a.into_iter().take(MAX_ITEMS).map(walk).collect();
                if n > MAX_ITEMS {
                    out.push(Value::String(format!("…[cut: {n} items]")));
                }
                Value::Array(out)
            }
            Value::Object(o) => {
                let n = o.len();
                let mut out: serde_json::Map<String, Value> = o
                    .into_iter()
                    .take(MAX_ITEMS)
                    .map(|(k, v)| (cap_text(&k).into_owned(), walk(v)))
                    .collect();
                if n > MAX_ITEMS {
                    out.insert("…cut".into(), Value::String(format!("{n} keys")));
                }
                Value::Object(out)
            }
            other => other,
        }
    }
    let v = walk(v);
    let len = v.to_string().len();
    if len > MAX_DETAIL {
        serde_json::json!({"cut": format!("detail of {len} bytes")})
    } else {
        v
    }
}

/// Appends one event, keyed. Call only inside the transaction that makes the
/// change; `store::commit` then moves the checkpoint forward.
pub async fn append(
    tx: &mut Tx,
    time: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: Value,
) -> Result<i64, StoreError> {
    let ring = tx.audit.clone().ok_or_else(|| {
        StoreError::Invalid("the audit key is not loaded: this store cannot append events".into())
    })?;
    let Head {
        seq: last,
        hash: prev_hash,
    } = head(&mut *tx).await?;
    let seq = last + 1;
    let actor = cap_text(actor);
    let action = cap_text(action);
    let subject = cap_text(subject);
    let detail = cap_detail(detail).to_string();
    let hash = ring.mac(&canonical(
        Some(EVENT_TAG),
        seq,
        time,
        &actor,
        &action,
        &subject,
        &detail,
        &prev_hash,
    ));
    sqlx::query("INSERT INTO audit_events (seq, time, actor, action, subject, detail, prev_hash, hash, keyed) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1)")
        .bind(seq)
        .bind(time)
        .bind(&*actor)
        .bind(&*action)
        .bind(&*subject)
        .bind(&detail)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut **tx)
        .await?;
    tx.appended = Some(Head { seq, hash });
    Ok(seq)
}

pub async fn list(
    store: &Store,
    subject: Option<&str>,
    limit: i64,
) -> Result<Vec<AuditEvent>, StoreError> {
    // Newest `limit` events, returned oldest first.
    let mut rows: Vec<AuditEvent> = match subject {
        Some(s) => sqlx::query_as(
            "SELECT * FROM audit_events WHERE subject = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(s)
        .bind(limit),
        None => sqlx::query_as("SELECT * FROM audit_events ORDER BY seq DESC LIMIT $1").bind(limit),
    }
    .fetch_all(store.pool())
    .await?;
    rows.reverse();
    Ok(rows)
}

/// Rows per query of [`stream`].
const BATCH: i64 = 1000;

/// Events from `from` on, oldest first, a batch of [`BATCH`] rows at a time (never
/// the whole table). Keyset pages rather than one long `fetch`: no read
/// transaction stays open for the whole log (which would keep SQLite from
/// checkpointing its WAL while a daemon writes, and trips sqlx's slow-statement
/// warning), and the log is append-only, so pages cannot miss or repeat a row.
pub fn stream(store: &Store, from: i64) -> BoxStream<'_, Result<AuditEvent, StoreError>> {
    futures_util::stream::try_unfold(from, move |next| async move {
        let batch: Vec<AuditEvent> =
            sqlx::query_as("SELECT * FROM audit_events WHERE seq >= $1 ORDER BY seq LIMIT $2")
                .bind(next)
                .bind(BATCH)
                .fetch_all(store.pool())
                .await?;
        let Some(last) = batch.last().map(|e| e.seq) else {
            return Ok::<_, StoreError>(None);
        };
        Ok(Some((
            futures_util::stream::iter(batch.into_iter().map(Ok::<_, StoreError>)),
            last + 1,
        )))
    })
    .try_flatten()
    .boxed()
}

/// What kind of damage a break is; stable names for scripts (`--output json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// A gap in the sequence: events in the middle were deleted.
    Gap,
    /// An event's prev_hash is not the previous event's hash.
    Relinked,
    /// An event's content does not match its hash or MAC.
    Altered,
    /// The chain was recomputed: an unkeyed event where only keyed ones may be, or
    /// an event whose hash differs from the one the checkpoint vouches for.
    Rehashed,
    /// The last events were deleted: the log ends before the checkpoint.
    Truncated,
    /// Every event was deleted.
    Emptied,
    /// A keyed event differs from the one the checkpoint recorded at its seq:
    /// events were deleted at the end and others written in their place.
    Replaced,
    /// The checkpoint is missing though the audit key exists.
    CheckpointMissing,
    /// The checkpoint is unreadable or its MAC does not hold.
    CheckpointInvalid,
    /// The checkpoint is older than the log (an old copy put back, or a writer
    /// died between its commit and the checkpoint).
    CheckpointOld,
}

impl BreakKind {
    /// The name `audit verify` and `doctor` print (as in `--output json`).
    pub fn name(self) -> &'static str {
        match self {
            BreakKind::Gap => "gap",
            BreakKind::Relinked => "relinked",
            BreakKind::Altered => "altered",
            BreakKind::Rehashed => "rehashed",
            BreakKind::Truncated => "truncated",
            BreakKind::Emptied => "emptied",
            BreakKind::Replaced => "replaced",
            BreakKind::CheckpointMissing => "checkpoint_missing",
            BreakKind::CheckpointInvalid => "checkpoint_invalid",
            BreakKind::CheckpointOld => "checkpoint_old",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Break {
    pub seq: i64,
    pub kind: BreakKind,
    pub reason: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub events: i64,
    /// How many of them are keyed (HMAC); the rest are older unkeyed events.
    pub keyed: i64,
    pub head: String,
    /// The seq the checkpoint vouches for, when it is there and valid.
    pub checkpoint: Option<i64>,
    pub first_break: Option<Break>,
}

async fn read_checkpoint(ring: &Arc<Keyring>) -> Result<CheckpointState, StoreError> {
    let r = ring.clone();
    tokio::task::spawn_blocking(move || r.read_checkpoint())
        .await
        .map_err(|e| StoreError::Invalid(e.to_string()))
}

fn ring_of(store: &Store) -> Result<Arc<Keyring>, StoreError> {
    store.audit.clone().ok_or_else(|| {
        StoreError::Invalid("the audit key is not loaded: cannot verify the audit log".into())
    })
}

/// Streams the log (never loads the table), recomputes every hash and MAC, and
/// checks the end against the checkpoint. Names the first break.
pub async fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    let ring = ring_of(store)?;
    // Read the checkpoint before the rows: everything it vouches for was committed
    // before the read snapshot starts, so a concurrent commit cannot look like a
    // truncation.
    let checkpoint = read_checkpoint(&ring).await?;
    verify_against(store, ring, checkpoint, false).await
}

/// Reads the head checkpoint now (before taking a copy of the log).
pub async fn checkpoint_now(store: &Store) -> Result<CheckpointState, StoreError> {
    read_checkpoint(&ring_of(store)?).await
}

/// Verifies a copy of the log (a backup, `database copy`'s target) made after
/// `checkpoint` was read from the live one: every event the checkpoint vouches
/// for must be there as recorded, and the copy may go past it (commits whose
/// checkpoint write came after the read). Every hash and MAC is checked as usual.
pub async fn verify_snapshot(
    store: &Store,
    checkpoint: CheckpointState,
) -> Result<VerifyReport, StoreError> {
    let ring = ring_of(store)?;
    verify_against(store, ring, checkpoint, true).await
}

async fn verify_against(
    store: &Store,
    ring: Arc<Keyring>,
    checkpoint: CheckpointState,
    snapshot: bool,
) -> Result<VerifyReport, StoreError> {
    let cp = match &checkpoint {
        CheckpointState::Valid(c) => Some(c.clone()),
        _ => None,
    };
    let mut prev = GENESIS.to_string();
    let mut events = 0i64;
    let mut keyed = 0i64;
    let mut seen_keyed = false;
    let mut rows = stream(store, 1);
    let report = |events, keyed, head: &str, b: Option<Break>| VerifyReport {
        events,
        keyed,
        head: head.to_string(),
        checkpoint: cp.as_ref().map(|c| c.seq),
        first_break: b,
    };
    while let Some(e) = rows.try_next().await? {
        let expected_seq = events + 1;
        let brk = |seq, kind, reason: String| Some(Break { seq, kind, reason });
        let b = if e.seq != expected_seq {
            brk(
                e.seq,
                BreakKind::Gap,
                format!(
                    "sequence jumps from {} to {}: events are missing",
                    expected_seq - 1,
                    e.seq
                ),
            )
        } else if e.prev_hash != prev {
            brk(
                e.seq,
                BreakKind::Relinked,
                "prev_hash does not match the previous event's hash".into(),
            )
        } else if !e.keyed && (seen_keyed || cp.as_ref().is_some_and(|c| e.seq >= c.keyed_from)) {
            brk(
                e.seq,
                BreakKind::Rehashed,
                "the event is unkeyed where the log is keyed: the chain was re-hashed without the key".into(),
            )
        } else if !content_holds(&ring, &e) {
            brk(
                e.seq,
                BreakKind::Altered,
                format!(
                    "the event's content does not match its {}: it was altered",
                    if e.keyed { "MAC" } else { "hash" }
                ),
            )
        } else if cp
            .as_ref()
            .is_some_and(|c| c.seq == e.seq && c.hash != e.hash)
        {
            if e.keyed {
                brk(
                    e.seq,
                    BreakKind::Replaced,
                    "the event is not the one the checkpoint recorded at this seq: events from here on were deleted and others written in their place".into(),
                )
            } else {
                brk(
                    e.seq,
                    BreakKind::Rehashed,
                    "the event's hash differs from the one the checkpoint recorded: the chain was recomputed".into(),
                )
            }
        } else {
            None
        };
        if b.is_some() {
            return Ok(report(events, keyed, &prev, b));
        }
        events += 1;
        if e.keyed {
            keyed += 1;
            seen_keyed = true;
        }
        prev = e.hash;
    }
    drop(rows);
    let last = events;
    let shown = ring.checkpoint_path().display().to_string();
    let b = match checkpoint {
        CheckpointState::Missing => Some(Break {
            seq: last + 1,
            kind: BreakKind::CheckpointMissing,
            reason: format!(
                "the head checkpoint {shown} is missing though the audit key exists: it was deleted, so the end of the log cannot be checked"
            ),
        }),
        CheckpointState::Invalid(why) => Some(Break {
            seq: last + 1,
            kind: BreakKind::CheckpointInvalid,
            reason: format!("the head checkpoint {shown} is not valid: {why}"),
        }),
        CheckpointState::Valid(c) if c.seq > last && last == 0 => Some(Break {
            seq: 1,
            kind: BreakKind::Emptied,
            reason: format!(
                "the log is empty but the checkpoint records {} events: every event was deleted",
                c.seq
            ),
        }),
        CheckpointState::Valid(c) if c.seq > last => Some(Break {
            seq: last + 1,
            kind: BreakKind::Truncated,
            reason: format!(
                "the log ends at event {last} but the checkpoint records events up to {}: the last {} were deleted",
                c.seq,
                c.seq - last
            ),
        }),
        CheckpointState::Valid(c) if c.seq < last && snapshot => None,
        CheckpointState::Valid(c) if c.seq < last => {
            // A commit may have landed between our checkpoint read and the rows:
            // look again before calling it old.
            match read_checkpoint(&ring).await? {
                CheckpointState::Valid(now) if now.seq >= last => None,
                _ => Some(Break {
                    seq: c.seq + 1,
                    kind: BreakKind::CheckpointOld,
                    reason: format!(
                        "the checkpoint {shown} records events up to {} but the log goes to {last}: an older checkpoint was put back, a rotator process died (or its commit was cut off) between a commit and its checkpoint write, or that write failed (the process logged `audit checkpoint not updated`, counts it in rotator_audit_checkpoint_write_failures_total and shows it in /readyz); once the cause is fixed, the next change any rotator process commits moves the checkpoint forward",
                        c.seq
                    ),
                }),
            }
        }
        CheckpointState::Valid(_) => None,
    };
    Ok(report(events, keyed, &prev, b))
}

fn content_holds(ring: &Keyring, e: &AuditEvent) -> bool {
    if e.keyed {
        ring.mac_matches(
            &canonical(
                Some(EVENT_TAG),
                e.seq,
                e.time,
                &e.actor,
                &e.action,
                &e.subject,
                &e.detail,
                &e.prev_hash,
            ),
            &e.hash,
        )
    } else {
        hex(&sha256(&canonical(
            None,
            e.seq,
            e.time,
            &e.actor,
            &e.action,
            &e.subject,
            &e.detail,
            &e.prev_hash,
        ))) == e.hash
    }
}

/// `audit reset-checkpoint`: after an operator has looked at a break the
/// checkpoint names, vouch for the log as it is now. Refuses while any event
/// itself is broken. Records the reset as an event first.
pub async fn reset_checkpoint(
    store: &Store,
    time: i64,
    actor: &str,
) -> Result<(CheckpointState, Head), StoreError> {
    let ring = ring_of(store)?;
    let before = read_checkpoint(&ring).await?;
    let r = verify(store).await?;
    if let Some(b) = r.first_break.as_ref().filter(|b| {
        matches!(
            b.kind,
            BreakKind::Gap | BreakKind::Relinked | BreakKind::Altered | BreakKind::Rehashed
        )
    }) {
        return Err(StoreError::Invalid(format!(
            "event {} is broken ({}: {}); a checkpoint cannot vouch for it",
            b.seq,
            b.kind.name(),
            b.reason
        )));
    }
    let previous = match &before {
        CheckpointState::Missing => serde_json::json!("missing"),
        CheckpointState::Invalid(why) => serde_json::json!(format!("invalid: {why}")),
        CheckpointState::Valid(c) => serde_json::json!({"seq": c.seq}),
    };
    let keyed_from = match &before {
        CheckpointState::Valid(c) => c.keyed_from,
        _ => {
            let (first,): (Option<i64>,) =
                sqlx::query_as("SELECT MIN(seq) FROM audit_events WHERE keyed = 1")
                    .fetch_one(store.pool())
                    .await?;
            first.unwrap_or(r.events + 1)
        }
    };
    let mut tx = store.begin().await?;
    append(
        &mut tx,
        time,
        actor,
        "audit.checkpoint_reset",
        "rotator",
        serde_json::json!({"previous": previous, "events": r.events}),
    )
    .await?;
    // Committed without moving the checkpoint (it may be missing); reset below.
    let head = tx.appended.take().expect("just appended");
    super::commit(tx).await?;
    let (r2, h) = (ring.clone(), head.clone());
    tokio::task::spawn_blocking(move || r2.reset(&h, keyed_from))
        .await
        .map_err(|e| StoreError::Invalid(e.to_string()))??;
    Ok((before, head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn break_names_match_the_json() {
        for k in [
            BreakKind::Gap,
            BreakKind::Relinked,
            BreakKind::Altered,
            BreakKind::Rehashed,
            BreakKind::Truncated,
            BreakKind::Emptied,
            BreakKind::Replaced,
            BreakKind::CheckpointMissing,
            BreakKind::CheckpointInvalid,
            BreakKind::CheckpointOld,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_and_marked() {
        let s = "é".repeat(30_000); // 60,000 bytes, two per char
        let c = cap_text(&s);
        assert!(c.len() < MAX_TEXT + 40, "{}", c.len());
        assert!(c.ends_with("…[cut: 60000 bytes]"), "{c}");
        assert_eq!(cap_text("short"), "short");
    }

    #[test]
    fn detail_is_bounded_whatever_its_shape() {
        let big = "x".repeat(60_000);
        let v = cap_detail(serde_json::json!({"path": big, "list": vec!["y".repeat(300); 1000]}));
        assert!(v.to_string().len() <= MAX_DETAIL, "{}", v.to_string().len());
        let v = cap_detail(serde_json::json!({"path": big}));
        assert!(v["path"].as_str().unwrap().contains("[cut: 60000 bytes]"));
    }
}
