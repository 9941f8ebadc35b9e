//! Shared secrets (the swarm token, API keys, data-channel keys): made from the OS's random
//! source, read from files an operator wrote, kept in a state dir, and compared in constant
//! time so that a remote client cannot guess one byte at a time from response timings.

use std::io::Write;
use std::path::Path;

use crate::IoError;

pub use protocol::secret::{random_hex, same_secret};

/// Whether `presented` equals any of `keys` (each compared in constant time, all of them).
pub fn any_secret(keys: &[String], presented: &str) -> bool {
    keys.iter()
        .fold(false, |found, k| same_secret(k, presented) | found)
}

/// HMAC-SHA256 of `label`, a zero byte and `data` under `secret`, as hex: lets a holder of the
/// secret (a node with the swarm token) check that `data` (the swarm's CA certificate) comes
/// from another holder. The label says what the tag vouches for, so a tag made for one
/// purpose is never accepted for another.
pub fn tag(secret: &str, label: &str, data: &[u8]) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
    m.update(label.as_bytes());
    m.update(&[0]);
    m.update(data);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `tag_hex` is [`tag`] of `label` and `data` under `secret` (compared in constant
/// time).
pub fn is_tag(secret: &str, label: &str, data: &[u8], tag_hex: &str) -> bool {
    same_secret(&tag(secret, label, data), tag_hex.trim())
}

/// The secret in `path`: its first non-empty line, trimmed. An empty file is an error.
pub fn read_secret_file(path: &Path) -> Result<String, IoError> {
    read_secrets_file(path)?
        .into_iter()
        .next()
        .ok_or_else(|| empty(path))
}

/// The secrets in `path`, one per line; blank lines and `#` comments are skipped. A file with
/// none is an error (an operator who names a key file means to set keys).
pub fn read_secrets_file(path: &Path) -> Result<Vec<String>, IoError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| IoError::new(format!("reading {}", path.display()), e))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Err(empty(path));
    }
    Ok(keys)
}

fn empty(path: &Path) -> IoError {
    IoError::new(
        format!("reading {}", path.display()),
        std::io::Error::new(std::io::ErrorKind::InvalidData, "the file holds no secret"),
    )
}

/// The secret kept in `path`, made (32 random bytes, hex) and stored on first use, readable
/// by its owner only. Returns it and whether it was made now. Written to a temporary file
/// first, then renamed: a crash never leaves half a secret.
pub fn load_or_create_secret(path: &Path) -> Result<(String, bool), IoError> {
    if path.exists() {
        return Ok((read_secret_file(path)?, false));
    }
    let secret = random_hex(32);
    write_private(path, &format!("{secret}\n"))?;
    Ok((secret, true))
}

/// Write `text` to `path` readable by its owner only (a key, a token): to a temporary file
/// first, then renamed, so a crash never leaves half of it. Creates the directory.
pub fn write_private(path: &Path, text: &str) -> Result<(), IoError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| IoError::new(format!("creating {}", dir.display()), e))?;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| IoError::new(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_made_once_kept_private_and_compared_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/token");
        let (made, fresh) = load_or_create_secret(&path).unwrap();
        assert!(fresh);
        assert_eq!(made.len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_secret(&path).unwrap(), (made.clone(), false));
        assert_ne!(random_hex(32), made);

        assert!(same_secret(&made, &made.clone()));
        assert!(!same_secret(&made, &made[..63]));
        assert!(!same_secret("abc", "abd"));
        let keys = vec!["k1".to_owned(), "k2".to_owned()];
        assert!(any_secret(&keys, "k2"));
        assert!(!any_secret(&keys, "k3"));
        assert!(!any_secret(&[], ""));
        let t = tag("token", "ca", b"pem");
        assert!(is_tag("token", "ca", b"pem", &t));
        assert!(!is_tag("other", "ca", b"pem", &t));
        assert!(!is_tag("token", "ca", b"pen", &t));
        assert!(
            !is_tag("token", "other use", b"pem", &t),
            "a label of its own"
        );
        // The label and the data do not run into each other.
        assert_ne!(tag("token", "ab", b"c"), tag("token", "a", b"bc"));

        let file = dir.path().join("keys");
        std::fs::write(&file, "# ops keys\n\n  alpha  \nbeta\n").unwrap();
        assert_eq!(read_secrets_file(&file).unwrap(), ["alpha", "beta"]);
        assert_eq!(read_secret_file(&file).unwrap(), "alpha");
        std::fs::write(&file, "# nothing\n\n").unwrap();
        let e = read_secret_file(&file).unwrap_err().to_string();
        assert!(e.contains("holds no secret"), "{e}");
    }
}
