//! Sealing (AEAD, AES-256-GCM from aws-lc-rs) for the one private key rotator
//! ever keeps: a credential stored but not yet delivered, so a failed delivery
//! can be retried with the same credential instead of losing it. The sealing
//! key lives in its own file (0600), never in the database; the credential id
//! is the associated data, so a sealed blob cannot be moved to another row.
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use zeroize::Zeroizing;

use super::PkiError;

const VERSION: &str = "v1";

pub struct SealingKey {
    key: RandomizedNonceKey,
    /// First bytes of SHA-256 of the key: names which key sealed a blob.
    id: String,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn err(reason: impl ToString) -> PkiError {
    PkiError::Seal(reason.to_string())
}

/// Why [`read_private`] failed.
#[derive(Debug)]
pub enum ReadPrivate {
    Io(std::io::Error),
    /// The file is readable by group or others.
    Mode(PkiError),
}

/// Reads a private key file, refusing one that group or others may access (any
/// of the 077 bits), as ssh refuses a readable identity. The mode is taken from
/// the opened file, so it is the mode of what is read.
///
/// One exception, the shape kubelet gives a Secret volume's files when the pod
/// sets `fsGroup` (kubernetes#57923 ignores `defaultMode: 0400` then): owned by
/// root, group-readable only (at most 0440), and the group is this process's own
/// (non-root) group, which the pod gave it alone.
pub fn read_private(path: &Path, what: &'static str) -> Result<Zeroizing<String>, ReadPrivate> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut f = std::fs::File::open(path).map_err(ReadPrivate::Io)?;
    let meta = f.metadata().map_err(ReadPrivate::Io)?;
    let mode = meta.permissions().mode() & 0o777;
    let secret_volume = mode & 0o037 == 0
        && meta.uid() == 0
        && effective_ids().is_some_and(|(uid, gid)| uid != 0 && gid != 0 && gid == meta.gid());
    if mode & 0o077 != 0 && !secret_volume {
        return Err(ReadPrivate::Mode(PkiError::KeyFileMode {
            what,
            path: path.display().to_string(),
            mode,
        }));
    }
    let mut text = Zeroizing::new(String::new());
    f.read_to_string(&mut text).map_err(ReadPrivate::Io)?;
    Ok(text)
}

/// The process's effective uid and gid, from /proc/self/status (its `Uid:` and
/// `Gid:` lines list real, effective, saved and filesystem ids).
fn effective_ids() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

impl SealingKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PkiError> {
        if bytes.len() != 32 {
            return Err(err(format!("the key is {} bytes, not 32", bytes.len())));
        }
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes).map_err(|_| err("bad key"))?;
        let id = super::hex(&super::sha256(bytes)[..4]);
        Ok(Self { key, id })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key from its text (base64 of 32 bytes) held in memory: a `vault:`
    /// reference. `origin` names it in errors.
    pub fn from_base64(text: &str, origin: &str) -> Result<Self, PkiError> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| err(format!("{origin} is not base64: {e}")))?,
        );
        Self::from_bytes(&bytes).map_err(|e| err(format!("{origin}: {e}")))
    }

    /// Reads the key file (base64 of 32 bytes); with `create`, makes one (0600)
    /// when it does not exist, and reads the one another process made at the
    /// same moment instead of replacing it.
    pub fn load(path: &Path, create: bool) -> Result<Self, PkiError> {
        let shown = path.display();
        match read_private(path, "sealing key file") {
            Ok(text) => {
                let bytes = Zeroizing::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(text.trim())
                        .map_err(|e| err(format!("{shown} is not base64: {e}")))?,
                );
                Self::from_bytes(&bytes).map_err(|e| err(format!("{shown}: {e}")))
            }
            Err(ReadPrivate::Mode(e)) => Err(e),
            Err(ReadPrivate::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let bytes = Zeroizing::new(super::random_bytes::<32>());
                let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*bytes));
                // Linked in without replacing: of replicas that start at once
                // on one shared volume, one makes the key and the others read it.
                let created = crate::support::fsutil::create_private_new(path, text.as_bytes())
                    .map_err(|e| err(format!("cannot create {shown}: {e}")))?;
                if !created {
                    return Self::load(path, false);
                }
                Self::from_bytes(&*bytes)
            }
            Err(ReadPrivate::Io(e)) => Err(err(format!("cannot read {shown}: {e}"))),
        }
    }

    /// `v1.<key id>.<base64(nonce | ciphertext | tag)>`.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<String, PkiError> {
        let mut buf = Zeroizing::new(plaintext.to_vec());
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(aad.as_bytes()), &mut *buf)
            .map_err(|_| err("sealing failed"))?;
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&buf);
        Ok(format!(
            "{VERSION}.{}.{}",
            self.id,
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    pub fn open(&self, aad: &str, sealed: &str) -> Result<Zeroizing<Vec<u8>>, PkiError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some(VERSION), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(err("not a sealed value rotator wrote"));
        };
        if id != self.id {
            return Err(err(format!(
                "sealed with key {id}, but the configured sealing key is {}; restore the key file it was sealed with",
                self.id
            )));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| err(format!("damaged sealed value: {e}")))?;
        if raw.len() < NONCE_LEN {
            return Err(err("damaged sealed value: too short"));
        }
        let (n, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).map_err(|_| err("bad nonce"))?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| err("the sealed value does not open with this key for this credential"))?
            .to_vec();
        Ok(Zeroizing::new(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_refuses_tampering_other_rows_and_other_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("seal.key");
        let k = SealingKey::load(&p, true).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = SealingKey::load(&p, false).unwrap();
        assert_eq!(k.id(), again.id());
        let s = k
            .seal("cred-1", b"-----BEGIN PRIVATE KEY-----secret")
            .unwrap();
        assert!(!s.contains("PRIVATE") && !s.contains("secret"));
        assert_eq!(
            &*again.open("cred-1", &s).unwrap(),
            b"-----BEGIN PRIVATE KEY-----secret"
        );
        assert!(k.open("cred-2", &s).is_err(), "bound to its row");
        let mut t = s.clone().into_bytes();
        let last = t.len() - 3;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        assert!(
            k.open("cred-1", &String::from_utf8(t).unwrap()).is_err(),
            "tampering is detected"
        );
        let other = SealingKey::from_bytes(&[7u8; 32]).unwrap();
        assert!(
            other
                .open("cred-1", &s)
                .unwrap_err()
                .to_string()
                .contains("sealed with key")
        );
        let file = std::fs::read_to_string(&p).unwrap();
        let debug = format!("{k:?}");
        assert!(
            !debug.contains(file.trim()) && debug.contains(k.id()),
            "Debug shows only the key id: {debug}"
        );
        assert!(SealingKey::load(&d.path().join("missing"), false).is_err());
    }

    #[test]
    fn a_key_file_group_or_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("seal.key");
        SealingKey::load(&p, true).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = SealingKey::load(&p, true).unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, PkiError::KeyFileMode { .. }), "{m}");
            assert!(
                m.contains(&format!("mode {mode:o}"))
                    && m.contains(&format!("chmod 600 {}", p.display())),
                "{m}"
            );
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        SealingKey::load(&p, false).expect("owner-only read is fine");
    }
}
