//! The node's identity: an ed25519 key kept in a file, created once and reused.
//!
//! The file holds the key in libp2p's protobuf encoding, the same format go-libp2p
//! and js-libp2p use, so keys move between implementations. It is never replaced
//! behind the operator's back: a file that cannot be read or decoded stops startup.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use libp2p::identity::Keypair;

use crate::datadir::write_atomic;

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The key file exists but could not be read.
    #[error("cannot read identity key {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The key file does not hold a key. It is left in place: move it away yourself
    /// if you mean to start with a new identity (a new PeerId).
    #[error("identity key {path} is corrupt ({reason}); it was left untouched: restore it, or move it away to start with a new PeerId")]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configured key file that does not exist (only the default one is created).
    #[error(
        "identity key {path} does not exist; create one with `servant key generate --out {path}`"
    )]
    Missing {
        /// The key file.
        path: PathBuf,
    },
    /// The key file could not be written.
    #[error("cannot write identity key {path}: {source}")]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `key generate` would overwrite an existing key.
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

/// Loads the key at `path`; creates it first when it is missing and `create` is set.
pub fn load_or_create(path: &Path, create: bool) -> Result<Keypair, IdentityError> {
    match fs::read(path) {
        Ok(bytes) => {
            warn_if_readable_by_others(path);
            decode(path, &bytes)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            let keypair = Keypair::generate_ed25519();
            write_key(path, &keypair)?;
            tracing::info!(path = %path.display(), peer_id = %keypair.public().to_peer_id(), "created a new identity");
            Ok(keypair)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(IdentityError::Missing {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(IdentityError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads an existing key.
pub fn load(path: &Path) -> Result<Keypair, IdentityError> {
    load_or_create(path, false)
}

/// Generates a new key into `path`, which must not exist yet.
pub fn generate(path: &Path) -> Result<Keypair, IdentityError> {
    if path.exists() {
        return Err(IdentityError::Exists {
            path: path.to_path_buf(),
        });
    }
    let keypair = Keypair::generate_ed25519();
    write_key(path, &keypair)?;
    Ok(keypair)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    Keypair::from_protobuf_encoding(bytes).map_err(|e| IdentityError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_key(path: &Path, keypair: &Keypair) -> Result<(), IdentityError> {
    let write_err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| write_err(io::Error::other(e.to_string())))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(write_err)?;
    }
    write_atomic(path, &bytes, 0o600).map_err(write_err)
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "identity key is readable by other users; chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let first = load_or_create(&path, true).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let second = load_or_create(&path, true).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
    }

    #[test]
    fn corrupt_key_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        fs::write(&path, b"not a key").unwrap();
        let err = load_or_create(&path, true).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"not a key", "left untouched");
        fs::write(&path, b"").unwrap();
        assert!(matches!(
            load_or_create(&path, true),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    #[test]
    fn configured_key_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mounted.key");
        assert!(matches!(load(&path), Err(IdentityError::Missing { .. })));
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = generate(&path).unwrap();
        assert!(matches!(generate(&path), Err(IdentityError::Exists { .. })));
        assert_eq!(
            load(&path).unwrap().public().to_peer_id(),
            key.public().to_peer_id()
        );
    }
}
