//! Writing a single-file fetch straight to its output while the chunks arrive.
//!
//! Without this, a fetch would write every chunk twice in sequence: into the store
//! as it arrives, then again into the output, read back and hashed once more, after
//! the last chunk. Here each verified chunk also goes to its offset in
//! `<out>.servant-part`, so completion is an fsync and a rename.
//!
//! Two ways use it. For a fetch the store links (see [`crate::linked`]) the part file
//! is the only copy: the store records which chunks in it are verified, and a part
//! file found after a restart is reopened ([`PartFile::reopen`]) and re-hashed chunk
//! by chunk (`linked::scan`). For
//! a fetch that also keeps blocks (content partly in the store already, or shared
//! meanwhile) the store is the record of what is verified: a resumed fetch starts a
//! new part file and copies the chunks the store holds into it.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use crate::store::{io_err, remove_any, sync_dir, with_suffix, StoreError, PART_SUFFIX};

/// Refuses an existing `out` unless `overwrite`, and a directory at `out` always (a
/// file cannot replace it with a rename).
pub fn check_output(out: &Path, overwrite: bool) -> Result<(), StoreError> {
    match std::fs::symlink_metadata(out) {
        Ok(meta) if meta.is_dir() || !overwrite => {
            Err(StoreError::AlreadyExists(out.to_path_buf()))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("checking output {}", out.display()), e)),
    }
}

/// An output file being filled chunk by chunk.
#[derive(Debug)]
pub struct PartFile {
    file: File,
    part: PathBuf,
    out: PathBuf,
}

impl PartFile {
    /// Starts `<out>.servant-part`, sized to `size` bytes. Refuses an existing `out`
    /// unless `overwrite`, before any byte is fetched, and refuses to replace a
    /// directory with a file.
    pub fn create(out: &Path, size: u64, overwrite: bool) -> Result<Self, StoreError> {
        check_output(out, overwrite)?;
        let part = with_suffix(out, PART_SUFFIX);
        remove_any(&part).map_err(|e| io_err(format!("removing stale {}", part.display()), e))?;
        Self::open(out, part, size, true)
    }

    /// Opens the `<out>.servant-part` an interrupted fetch left, keeping its bytes
    /// (the caller re-hashes them), or starts an empty one if there is none. The
    /// output itself is checked as by [`PartFile::create`].
    pub fn reopen(out: &Path, size: u64, overwrite: bool) -> Result<Self, StoreError> {
        let part = with_suffix(out, PART_SUFFIX);
        match std::fs::symlink_metadata(&part) {
            Ok(meta) if meta.is_file() => {}
            _ => return Self::create(out, size, overwrite),
        }
        check_output(out, overwrite)?;
        Self::open(out, part, size, false)
    }

    /// Opens `part` (creating it, or an existing one) read-write, sized to `size`.
    /// Readable too: a linked fetch serves the chunks it has from here.
    fn open(out: &Path, part: PathBuf, size: u64, create: bool) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(&part)
            .map_err(|e| {
                let what = if create { "creating" } else { "opening" };
                io_err(format!("{what} {}", part.display()), e)
            })?;
        file.set_len(size)
            .map_err(|e| io_err(format!("sizing {}", part.display()), e))?;
        Ok(PartFile {
            file,
            part,
            out: out.to_path_buf(),
        })
    }

    /// Reads `len` bytes at `offset`: a chunk written earlier, or zeros where none was.
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = crate::chunk_pool::take(len);
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Where the file is while it fills.
    pub fn part_path(&self) -> &Path {
        &self.part
    }

    /// Writes a verified chunk at its offset.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| io_err(format!("writing {}", self.part.display()), e))
    }

    /// Makes the file durable and moves it to its output path.
    pub fn finish(&self) -> Result<PathBuf, StoreError> {
        self.file
            .sync_data()
            .map_err(|e| io_err(format!("syncing {}", self.part.display()), e))?;
        std::fs::rename(&self.part, &self.out).map_err(|e| {
            io_err(
                format!("renaming {} to {}", self.part.display(), self.out.display()),
                e,
            )
        })?;
        if let Some(parent) = self.out.parent() {
            sync_dir(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            });
        }
        tracing::info!(out = %self.out.display(), "wrote fetched content");
        Ok(self.out.clone())
    }

    /// Removes the part file: the store keeps the verified chunks for a resume.
    pub fn abandon(&self) {
        if let Err(e) = remove_any(&self.part) {
            tracing::warn!(path = %self.part.display(), error = %e, "could not remove partial output");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_land_at_their_offsets_and_finish_renames() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.bin");
        let part = PartFile::create(&out, 6, false).unwrap();
        part.write_at(3, b"def").unwrap();
        part.write_at(0, b"abc").unwrap();
        assert!(!out.exists());
        part.finish().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"abcdef");
        assert!(!with_suffix(&out, PART_SUFFIX).exists());
    }

    #[test]
    fn an_existing_output_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("taken");
        std::fs::write(&out, b"keep me").unwrap();
        assert!(matches!(
            PartFile::create(&out, 3, false),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(
            PartFile::create(dir.path(), 3, true),
            Err(StoreError::AlreadyExists(_))
        ));
        let part = PartFile::create(&out, 3, true).unwrap();
        part.write_at(0, b"new").unwrap();
        part.finish().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
    }

    #[test]
    fn abandon_leaves_no_part_file_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x");
        let stale = with_suffix(&out, PART_SUFFIX);
        std::fs::write(&stale, b"half-written garbage").unwrap();
        let part = PartFile::create(&out, 4, false).unwrap();
        assert_eq!(std::fs::metadata(&stale).unwrap().len(), 4);
        part.abandon();
        assert!(!stale.exists());
        assert!(!out.exists());
    }
}
