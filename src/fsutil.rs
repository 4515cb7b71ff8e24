//! Files that hold keys: written to a temporary file in the same directory with
//! mode 0600 from the start, synced, then renamed over the target, so a reader
//! sees the old file or the new one, never a partial one or a readable key.
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

pub const PRIVATE_MODE: u32 = 0o600;
pub const PUBLIC_MODE: u32 = 0o644;

pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, bytes, PRIVATE_MODE)
}

pub fn write_public_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, bytes, PUBLIC_MODE)
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            format!("{} is a directory", path.display()),
        ));
    }
    let dir = parent_of(path);
    // tempfile creates with O_EXCL and mode 0600; the mode is set again explicitly
    // so a permissive umask or a future tempfile default cannot widen it.
    let mut tmp = tempfile::Builder::new()
        .prefix(".rotator-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(Permissions::from_mode(PRIVATE_MODE))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    if mode != PRIVATE_MODE {
        tmp.as_file()
            .set_permissions(Permissions::from_mode(mode))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable only once the directory entry is.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Fails early, before any key exists, when `path` could not be written:
/// its directory is missing or not writable, or it names a directory.
pub fn check_writable_target(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            format!("{} is a directory", path.display()),
        ));
    }
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
    if path.exists() {
        OpenOptions::new().append(true).open(path)?;
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
