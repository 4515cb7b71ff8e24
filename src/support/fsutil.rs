//! Files that hold keys: written to a temporary file in the same directory with
//! mode 0600 from the start, synced, then renamed over the target, so a reader
//! sees the old file or the new one, never a partial one or a readable key.
//!
//! The temporary file has no name while it is written (`O_TMPFILE`); it is
//! linked in as `.rotator-*.tmp` only once complete, for the instant before the
//! rename. Its writer holds an exclusive `flock` on it from before it has a
//! name, so a `.rotator-*.tmp` that can be locked is an orphan (its writer was
//! killed): every write removes the orphans in its directory first. Where
//! `O_TMPFILE` is not supported the file is named from the start (and locked
//! at once).
//!
//! Only regular files are ever read or replaced: an existing FIFO, device node,
//! socket or directory at a path is refused before it is opened, so a FIFO
//! cannot block a writer and `--out /dev/null` as root cannot replace the device.
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Mode, OFlags};

pub const PRIVATE_MODE: u32 = 0o600;
pub const PUBLIC_MODE: u32 = 0o644;

/// What temporary files are called: `.rotator-<random>.tmp`.
const TMP_PREFIX: &str = ".rotator-";
const TMP_SUFFIX: &str = ".tmp";

pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, bytes, PRIVATE_MODE)
}

pub fn write_public_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, bytes, PUBLIC_MODE)
}

/// Creates `path` (0600, complete and synced) only if nothing is there: the
/// content is linked in under its name, which never replaces a file, so when
/// several processes (two replicas on one shared volume) create the same key
/// at once exactly one wins and the others read its key. False when something
/// was there already (left untouched).
pub fn create_private_new(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let mut tmp = PrivateTmp::new_in(parent_of(path))?;
    fill(&mut tmp.tmp.file, bytes, PRIVATE_MODE)?;
    match tmp.persist_new(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn kind_of(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

fn not_regular(path: &Path, t: fs::FileType) -> io::Error {
    let kind = if t.is_dir() {
        io::ErrorKind::IsADirectory
    } else {
        io::ErrorKind::InvalidInput
    };
    io::Error::new(
        kind,
        format!(
            "{} is {}; rotator reads and replaces regular files only",
            path.display(),
            kind_of(t)
        ),
    )
}

/// Refuses an existing `path` that is not a regular file or a symlink (which a
/// rename replaces, never following it). Nothing is opened.
pub fn check_replaceable(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            format!("{} is a directory", path.display()),
        ));
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() || m.file_type().is_symlink() => Ok(()),
        Ok(m) => Err(not_regular(path, m.file_type())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens `path` for reading only if it is a regular file (following symlinks),
/// never blocking on a FIFO. None when it does not exist.
fn open_regular(path: &Path) -> io::Result<Option<File>> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(m) => return Err(not_regular(path, m.file_type())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    // Swapped for a FIFO since? O_NONBLOCK opens it at once, and fstat tells.
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(not_regular(path, m.file_type()));
    }
    Ok(Some(f))
}

/// The content of `path` if it exists, refusing anything but a regular file.
pub fn read_regular(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let Some(mut f) = open_regular(path)? else {
        return Ok(None);
    };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(Some(buf))
}

/// [`read_regular`] as UTF-8 text.
pub fn read_regular_string(path: &Path) -> io::Result<Option<String>> {
    match read_regular(path)? {
        None => Ok(None),
        Some(b) => String::from_utf8(b)
            .map(Some)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text")),
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    check_replaceable(path)?;
    let dir = parent_of(path);
    remove_orphans(dir);
    let tmp = match unnamed_in(dir) {
        Some(mut f) => {
            fill(&mut f, bytes, mode)?;
            let named = link_in(&f, dir)?;
            Tmp {
                file: f,
                path: named,
            }
        }
        None => {
            // tempfile creates with O_EXCL and mode 0600; locked at once, so a
            // cleaner can only remove it in the instant before (the rename then
            // fails and the write is reported failed, never half-done).
            let (f, p) = tempfile::Builder::new()
                .prefix(TMP_PREFIX)
                .suffix(TMP_SUFFIX)
                .tempfile_in(dir)?
                .keep()
                .map_err(|e| e.error)?;
            let mut t = Tmp { file: f, path: p };
            t.file.try_lock().map_err(io::Error::other)?;
            fill(&mut t.file, bytes, mode)?;
            t
        }
    };
    fs::rename(&tmp.path, path)?;
    tmp.disarm();
    // The rename is durable only once the directory entry is.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// An empty, locked 0600 temporary file in a directory, with a name, for a
/// writer that must be given a path (SQLite's `VACUUM INTO`). Removed on drop
/// unless [`PrivateTmp::persist_new`] linked it in; while it exists its lock
/// keeps orphan sweeps off it, and once its writer dies a sweep removes it.
pub struct PrivateTmp {
    tmp: Tmp,
}

impl PrivateTmp {
    pub fn new_in(dir: &Path) -> io::Result<Self> {
        remove_orphans(dir);
        let (f, p) = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .suffix(TMP_SUFFIX)
            .tempfile_in(dir)?
            .keep()
            .map_err(|e| e.error)?;
        let t = Tmp { file: f, path: p };
        t.file.try_lock().map_err(io::Error::other)?;
        t.file
            .set_permissions(Permissions::from_mode(PRIVATE_MODE))?;
        Ok(Self { tmp: t })
    }

    pub fn path(&self) -> &Path {
        &self.tmp.path
    }

    /// Syncs the file and gives it the name `path`, which must not exist (an
    /// existing file is never replaced: `AlreadyExists`).
    pub fn persist_new(self, path: &Path) -> io::Result<()> {
        // Sync through a fresh handle: the writer may have replaced the content
        // through its own descriptor; the inode is the same.
        File::open(&self.tmp.path)?.sync_all()?;
        fs::hard_link(&self.tmp.path, path)?;
        // The temporary name goes with `self`; the content stays under `path`.
        drop(self);
        if let Ok(d) = File::open(parent_of(path)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// A named temporary file we hold locked; removed on drop unless renamed.
struct Tmp {
    file: File,
    path: PathBuf,
}

impl Tmp {
    fn disarm(mut self) {
        self.path = PathBuf::new();
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
        // The file (and its lock) closes after the name is gone.
    }
}

/// The mode is set again explicitly so a permissive umask or a future default
/// cannot widen it; a public mode only once the content is complete.
fn fill(f: &mut File, bytes: &[u8], mode: u32) -> io::Result<()> {
    f.set_permissions(Permissions::from_mode(PRIVATE_MODE))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if mode != PRIVATE_MODE {
        f.set_permissions(Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// An unnamed 0600 file in `dir`, locked; None where `O_TMPFILE` is not supported.
fn unnamed_in(dir: &Path) -> Option<File> {
    let fd = rustix::fs::openat(
        rustix::fs::CWD,
        dir,
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(PRIVATE_MODE),
    )
    .ok()?;
    let f = File::from(fd);
    f.try_lock().ok()?;
    Some(f)
}

/// Gives the complete, locked unnamed file a temporary name in `dir`.
fn link_in(f: &File, dir: &Path) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
    for _ in 0..8 {
        let name = dir.join(format!(
            "{TMP_PREFIX}{:016x}{TMP_SUFFIX}",
            u64::from_le_bytes(
                crate::pki::sha256(
                    format!("{:?}{}", Instant::now(), std::process::id()).as_bytes()
                )[..8]
                    .try_into()
                    .expect("8 bytes")
            )
        ));
        match rustix::fs::linkat(
            rustix::fs::CWD,
            proc_path.as_str(),
            rustix::fs::CWD,
            &name,
            AtFlags::SYMLINK_FOLLOW,
        ) {
            Ok(()) => return Ok(name),
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("cannot find a free temporary name in {}", dir.display()),
    ))
}

/// How often one process sweeps one directory for orphans.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Removes `.rotator-*.tmp` files in `dir` whose writer is gone: ours (same
/// owner, regular, mode 0600) and not locked. Best effort: an error is skipped.
pub fn remove_orphans(dir: &Path) {
    static SWEPT: Mutex<Option<HashMap<PathBuf, Instant>>> = Mutex::new(None);
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|p| p.into_inner());
        let map = swept.get_or_insert_with(HashMap::new);
        if map.get(dir).is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
            return;
        }
        map.insert(dir.to_path_buf(), Instant::now());
    }
    let _ = remove_orphans_now(dir);
}

/// [`remove_orphans`] without the rate limit; the number removed.
pub fn remove_orphans_now(dir: &Path) -> io::Result<usize> {
    let me = rustix::process::geteuid().as_raw();
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let probe = name.starts_with(".rotator-probe-");
        if !(name.starts_with(TMP_PREFIX) && (name.ends_with(TMP_SUFFIX) || probe)) {
            continue;
        }
        let p = entry.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if !m.is_file() || m.uid() != me || (!probe && m.mode() & 0o777 != PRIVATE_MODE) {
            continue;
        }
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags((OFlags::NONBLOCK | OFlags::NOFOLLOW).bits() as i32)
            .open(&p)
        else {
            continue;
        };
        // Locked: a writer is at work (in this process or another).
        if f.try_lock().is_ok() && fs::remove_file(&p).is_ok() {
            tracing::info!(file = %p.display(), "removed a temporary file left by a killed writer");
            removed += 1;
        }
    }
    Ok(removed)
}

/// Fails early, before any key exists, when `path` could not be written:
/// its directory is missing or not writable, or it names a directory, a FIFO,
/// a device or anything else that is not a regular file.
pub fn check_writable_target(path: &Path) -> io::Result<()> {
    check_replaceable(path)?;
    let dir = parent_of(path);
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        ));
    }
    let probe = tempfile::Builder::new()
        .prefix(".rotator-probe-")
        .tempfile_in(dir)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create files in {}: {}", dir.display(), e.kind()),
            )
        })?;
    drop(probe);
    // An existing regular file must be writable; a symlink is replaced, not followed.
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        OpenOptions::new()
            .append(true)
            .custom_flags(OFlags::NONBLOCK.bits() as i32)
            .open(path)?;
    }
    Ok(())
}

/// Creates a directory (and parents) that only its owner can enter.
pub fn ensure_private_dir(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Like [`ensure_private_dir`] for a directory rotator owns outright (the data
/// directory, the CA directory): one that exists with any group or other bit is
/// repaired to 0700. Returns the mode it had when it was repaired.
pub fn ensure_private_dir_repaired(path: &Path) -> io::Result<Option<u32>> {
    ensure_private_dir(path)?;
    restrict_to_owner(path, 0o700)
}

/// Takes group and other bits off a file rotator owns (the database and its
/// -wal and -shm files): `mode` when it had any. Returns the mode it had when
/// it was repaired; a missing file is not an error.
pub fn restrict_to_owner(path: &Path, mode: u32) -> io::Result<Option<u32>> {
    let old = match fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if old & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{} has mode {old:03o} and cannot be made {mode:03o}: {e}",
                path.display()
            ),
        )
    })?;
    Ok(Some(old))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_replace_atomically() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_private_atomic(&p, b"one").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_private_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != "k")
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary files left behind: {leftovers:?}"
        );
    }

    #[test]
    fn a_new_private_file_never_replaces_one_that_is_there() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        assert!(create_private_new(&p, b"first").unwrap());
        assert!(!create_private_new(&p, b"second").unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["k"], "temporary files left behind");
    }

    #[test]
    fn an_existing_world_readable_file_becomes_0600() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        fs::write(&p, b"old").unwrap();
        fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        write_private_atomic(&p, b"new").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    fn mkfifo(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    #[test]
    fn a_fifo_is_refused_at_once_and_left_alone() {
        use std::os::unix::fs::FileTypeExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fifo");
        mkfifo(&p);
        // Each of these would block forever (or replace the FIFO) if it opened it.
        let e = check_writable_target(&p).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        let e = write_private_atomic(&p, b"key").unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        let e = read_regular(&p).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_fifo());
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "nothing written"
        );
    }

    #[test]
    fn a_character_device_is_refused_without_being_opened() {
        use std::os::unix::fs::FileTypeExt;
        // Only checked, never written: as root a write would replace the device.
        let null = Path::new("/dev/null");
        let e = check_writable_target(null).unwrap_err();
        assert!(e.to_string().contains("is a character device"), "{e}");
        assert!(check_replaceable(null).is_err());
        assert!(read_regular(null).is_err());
        assert!(
            fs::symlink_metadata(null)
                .unwrap()
                .file_type()
                .is_char_device()
        );
    }

    #[test]
    fn orphaned_temporary_files_are_removed_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let orphan = d.path().join(".rotator-0123456789abcdef.tmp");
        fs::write(&orphan, b"a key from a killed writer").unwrap();
        fs::set_permissions(&orphan, Permissions::from_mode(0o600)).unwrap();
        let live = d.path().join(".rotator-fedcba9876543210.tmp");
        fs::write(&live, b"being written").unwrap();
        fs::set_permissions(&live, Permissions::from_mode(0o600)).unwrap();
        let held = File::open(&live).unwrap();
        held.lock().unwrap();
        let other = d.path().join(".rotator-someone-elses.tmp");
        fs::write(&other, b"not 0600: not ours").unwrap();
        fs::set_permissions(&other, Permissions::from_mode(0o644)).unwrap();
        write_private_atomic(&d.path().join("k"), b"new").unwrap();
        assert!(!orphan.exists(), "the orphan is removed by the next write");
        assert!(live.exists(), "a file its writer still holds is kept");
        assert!(other.exists());
        drop(held);
        assert_eq!(remove_orphans_now(d.path()).unwrap(), 1);
        assert!(!live.exists());
    }

    #[test]
    fn a_group_or_world_accessible_private_dir_is_repaired() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        assert_eq!(ensure_private_dir_repaired(&p).unwrap(), None);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&p, Permissions::from_mode(0o755)).unwrap();
        assert_eq!(ensure_private_dir_repaired(&p).unwrap(), Some(0o755));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = p.join("db");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(restrict_to_owner(&f, 0o600).unwrap(), Some(0o644));
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(restrict_to_owner(&f, 0o600).unwrap(), None);
        assert_eq!(restrict_to_owner(&p.join("missing"), 0o600).unwrap(), None);
    }

    #[test]
    fn unwritable_targets_fail_the_preflight() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_writable_target(&d.path().join("missing-dir/k")).is_err());
        assert!(check_writable_target(d.path()).is_err());
        assert!(check_writable_target(&d.path().join("ok")).is_ok());
        assert!(
            !d.path().join("ok").exists(),
            "the preflight must not create the file"
        );
    }
}
