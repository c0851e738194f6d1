//! Fetched files kept only at their output path, not copied into the store.
//!
//! A fetch of a single file to a path used to write every verified chunk twice: once
//! as a block in the store (for serving and for resume) and once into the output.
//! For content the store holds no block of, the store instead *links* the output:
//! chunks go only to `<out>.servant-part`, the store records which of them are
//! verified, and completion renames the part file onto `out`. The node serves the
//! content from that file afterwards, like IPFS's filestore, and counts its bytes
//! against the quota like any fetched content.
//!
//! The output belongs to the user, who may edit, move or delete it at any time, so
//! every chunk read from it is hashed again before it is served or exported; a chunk
//! that no longer matches is reported missing and the content marked incomplete.
//! Eviction forgets a linked content (the node stops providing it) and never deletes
//! the user's file; only an unfinished part file, which is the node's own, is removed.
//!
//! Which chunks of a part file are verified is kept in memory only: after a restart
//! the part file is hashed chunk by chunk ([`scan`]) when the fetch resumes, so a chunk
//! half-written when the node was killed is simply fetched again.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use servant_protocol::manifest::{ChunkRef, Hash, Manifest};

use crate::{
    part_file::PartFile,
    store::{io_err, with_suffix, StoreError, PART_SUFFIX},
};

/// The store's record of one linked content.
#[derive(Debug)]
pub(crate) struct Linked {
    /// Where the finished file is; until then it fills at `<out>.servant-part`.
    pub out: PathBuf,
    /// Per chunk of the manifest: its bytes are in the file and were verified.
    pub have: Vec<bool>,
    /// The part file while the fetch can write to it; `None` once complete, and after
    /// a restart until the fetch resumes.
    pub part: Option<Arc<PartFile>>,
}

impl Linked {
    /// A fresh record: nothing verified yet.
    pub fn new(out: PathBuf, chunks: usize, part: Option<Arc<PartFile>>) -> Self {
        Linked {
            out,
            have: vec![false; chunks],
            part,
        }
    }

    /// Bytes of the verified chunks: what this content occupies on disk for the quota.
    pub fn bytes(&self, manifest: &Manifest) -> u64 {
        manifest
            .chunks()
            .zip(&self.have)
            .filter(|(_, have)| **have)
            .map(|(c, _)| u64::from(c.len))
            .sum()
    }

    /// Whether chunk `index` is verified.
    pub fn has(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.have.get(i))
            .copied()
            .unwrap_or(false)
    }

    /// Records chunk `index` as verified or not; returns whether that changed it.
    pub fn set(&mut self, index: u64, have: bool) -> bool {
        match usize::try_from(index)
            .ok()
            .and_then(|i| self.have.get_mut(i))
        {
            Some(slot) if *slot != have => {
                *slot = have;
                true
            }
            _ => false,
        }
    }

    /// The unfinished file: `<out>.servant-part`.
    pub fn part_path(&self) -> PathBuf {
        with_suffix(&self.out, PART_SUFFIX)
    }
}

/// Reads chunk `chunk` from `file` and returns it only if it still hashes to the
/// manifest's hash: `None` if it does not, or the file is shorter than the chunk.
pub(crate) fn read_verified(file: &File, chunk: &ChunkRef) -> io::Result<Option<Vec<u8>>> {
    let mut buf = crate::chunk_pool::take(chunk.len as usize);
    match file.read_exact_at(&mut buf, chunk.offset) {
        Ok(()) => Ok((Hash::of(&buf) == chunk.hash).then_some(buf)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens a linked content's file for reading, only if it is a regular file: the path
/// is the user's, and a FIFO put there would otherwise block a reader for ever.
pub(crate) fn open_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "not a regular file any more",
        ));
    }
    Ok(file)
}

/// Reads every chunk of `manifest` back from `file` (at `path`, for errors) and
/// hashes it, handing each verified chunk to `sink` in order. Stops at the first
/// chunk that does not match and returns its index; `None` when all do.
pub(crate) fn read_back(
    file: &File,
    path: &Path,
    manifest: &Manifest,
    mut sink: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<Option<u64>, StoreError> {
    for (index, chunk) in manifest.chunks().enumerate() {
        let index = index as u64;
        match read_verified(file, &chunk) {
            Ok(Some(data)) => {
                let sunk = sink(&data);
                crate::chunk_pool::give(data);
                sunk?;
            }
            Ok(None) => return Ok(Some(index)),
            Err(e) => {
                return Err(io_err(
                    format!("reading chunk {index} from {}", path.display()),
                    e,
                ))
            }
        }
    }
    Ok(None)
}

/// Which chunks of a part file left by an interrupted fetch hold their verified
/// bytes. Reads and hashes the whole file once.
pub(crate) fn scan(part: &PartFile, manifest: &Manifest) -> io::Result<Vec<bool>> {
    let mut have = Vec::with_capacity(manifest.chunk_count());
    for chunk in manifest.chunks() {
        let data = part.read_at(chunk.offset, chunk.len as usize)?;
        have.push(Hash::of(&data) == chunk.hash);
        crate::chunk_pool::give(data);
    }
    Ok(have)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn have_bits_and_bytes() {
        let mut l = Linked::new(PathBuf::from("/x/out"), 3, None);
        assert!(!l.has(1));
        assert!(l.set(1, true));
        assert!(!l.set(1, true));
        assert!(l.has(1));
        assert!(!l.set(7, true), "an index past the end changes nothing");
        assert!(!l.has(u64::MAX));
        assert_eq!(l.part_path(), PathBuf::from("/x/out.servant-part"));
    }
}
