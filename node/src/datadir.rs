//! The data directory: its format version, its lock, and atomic file writes.
//!
//! Everything a node must not lose lives here. Files are replaced atomically (a
//! temporary file, fsync, rename, fsync of the directory) so that a crash at any
//! instant leaves either the old file or the new one, never half of each.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// The data-dir format this build reads and writes. Bump it when a file's layout
/// changes in a way older builds would misread.
pub const FORMAT_VERSION: u32 = 1;

const FORMAT_FILE: &str = "FORMAT";
const FORMAT_PREFIX: &str = "servant-data-format ";
const LOCK_FILE: &str = "lock";

/// Why the data dir cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// The directory or one of its files could not be read or written.
    #[error("data dir {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the lock: two nodes on one data dir would corrupt it.
    #[error("data dir {path} is in use by another servant process (its lock is held)")]
    Locked {
        /// The data dir.
        path: PathBuf,
    },
    /// The format file says a format this build does not know.
    #[error("data dir {path} has format `{found}`, this build reads format {FORMAT_VERSION}; use a matching servant version or another --data-dir")]
    Format {
        /// The data dir.
        path: PathBuf,
        /// What the format file holds.
        found: String,
    },
}

/// An open, locked data directory. The lock is released when this is dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Held for its lock only: dropping the file releases it.
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed (mode 0700), takes its lock and checks or
    /// writes its format version.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        let io_err = |source| DataDirError::Io {
            path: path.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_err)?;
        let lock_path = path.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| DataDirError::Io {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::Locked {
                    path: path.to_path_buf(),
                })
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(DataDirError::Io {
                    path: lock_path,
                    source,
                })
            }
        }
        let format_path = path.join(FORMAT_FILE);
        match fs::read_to_string(&format_path) {
            Ok(text) => {
                let found = text.trim().to_string();
                let version = found
                    .strip_prefix(FORMAT_PREFIX)
                    .and_then(|v| v.parse::<u32>().ok());
                if version != Some(FORMAT_VERSION) {
                    return Err(DataDirError::Format {
                        path: path.to_path_buf(),
                        found,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(
                    &format_path,
                    format!("{FORMAT_PREFIX}{FORMAT_VERSION}\n").as_bytes(),
                    0o644,
                )
                .map_err(|source| DataDirError::Io {
                    path: format_path,
                    source,
                })?;
            }
            Err(source) => {
                return Err(DataDirError::Io {
                    path: format_path,
                    source,
                })
            }
        }
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Peers seen before, dialed at the next start.
    pub fn known_peers_path(&self) -> PathBuf {
        self.path.join("known-peers.json")
    }

    /// Bans added at runtime.
    pub fn bans_path(&self) -> PathBuf {
        self.path.join("bans.json")
    }

    /// The generated API token, when none is configured.
    pub fn api_token_path(&self) -> PathBuf {
        self.path.join("api.token")
    }
}

/// Replaces `path` with `bytes` atomically and durably, with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_checks_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let data = DataDir::open(&path).unwrap();
        assert_eq!(
            fs::read_to_string(path.join(FORMAT_FILE)).unwrap(),
            "servant-data-format 1\n"
        );
        assert!(matches!(
            DataDir::open(&path),
            Err(DataDirError::Locked { .. })
        ));
        drop(data);
        DataDir::open(&path).unwrap();
    }

    #[test]
    fn refuses_unknown_format() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FORMAT_FILE), "servant-data-format 99\n").unwrap();
        let err = DataDir::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("99"), "{err}");
        fs::write(dir.path().join(FORMAT_FILE), "garbage").unwrap();
        assert!(matches!(
            DataDir::open(dir.path()),
            Err(DataDirError::Format { .. })
        ));
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
    }
}
