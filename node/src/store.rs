//! The content store: the chunks, manifests and bookkeeping of everything this node
//! shares or fetches.
//!
//! Sharing imports content into the store, fetching writes verified chunks into it,
//! serving reads chunks out of it, and a finished fetch is exported (assembled) to the
//! path the user asked for. The API is synchronous: the node calls it through
//! `spawn_blocking`, so a slow disk never stalls the event loop.
//!
//! # Layout
//!
//! Everything lives under one directory, normally `<data_dir>/store/`:
//!
//! - `blocks/<first 2 hex>/<64 hex>`: one file per distinct chunk, named by its BLAKE3
//!   hash, so identical chunks (within one content or across contents) are stored once.
//!   A block is written to `tmp/`, synced, then renamed into place: a block file that
//!   exists under its final name is always whole, whatever instant a crash (even
//!   SIGKILL or a power cut) happened at.
//! - `manifests/<content id hex>`: the manifest's exact bytes, whose hash is the id.
//! - `index.json`: per content, whether this node shares it (pinned), whether its fetch
//!   finished (complete), and when it was last used. Replaced atomically (temp file,
//!   fsync, rename, fsync of the directory).
//! - `tmp/`: files being written; anything left there is removed on open.
//!
//! The index is a cache of state, not the source of truth: on open, manifests missing
//! from it are picked up as incomplete, entries without a manifest are dropped, a
//! corrupt index is set aside as `index.json.corrupt` and rebuilt, and which blocks
//! exist is learned by listing `blocks/`.
//!
//! An export of content to `out` is built at `<out>.servant-part` and renamed onto
//! `out`, so the output path only ever holds a whole, verified file or directory.
//!
//! A single file fetched to a path is usually not held as blocks at all: the store
//! *links* it ([`Store::link`], see [`crate::linked`]), keeping its chunks only in the
//! output file, re-hashed whenever they are read. The index records the link.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{linked::Linked, part_file::PartFile};
use serde::{Deserialize, Serialize};
use servant_protocol::manifest::{
    ContentId, Entry, Hash, Kind, Manifest, ManifestError, MANIFEST_VERSION, MAX_CHUNK_SIZE,
    MAX_ENTRIES, MIN_CHUNK_SIZE,
};

const BLOCKS_DIR: &str = "blocks";
const MANIFESTS_DIR: &str = "manifests";
const TMP_DIR: &str = "tmp";
const INDEX_FILE: &str = "index.json";
const CORRUPT_INDEX_FILE: &str = "index.json.corrupt";
const INDEX_VERSION: u32 = 1;
/// Suffix of the sibling an export is built at before it is renamed onto its output.
pub const PART_SUFFIX: &str = ".servant-part";
/// Suffix an existing output is moved to while an overwriting export replaces it.
const OLD_SUFFIX: &str = ".servant-old";
/// Serving a chunk touches its content's last-use time in memory; writing the index
/// for every chunk served would cost an fsync per request, so reads persist it at
/// most this often (every other change is persisted at once, and `flush` on drop).
const TOUCH_PERSIST_SECS: u64 = 60;
/// An unpinned fetch left incomplete and untouched for this long is abandoned: it
/// may be evicted for the quota like fetched content (partials go first).
pub const STALE_PARTIAL_SECS: u64 = 24 * 3600;

/// Whether eviction may take this content: fetched (unpinned) and complete, or an
/// abandoned partial fetch.
fn evictable(c: &Content, now: u64) -> bool {
    !c.pinned && (c.complete || now.saturating_sub(c.last_used) >= STALE_PARTIAL_SECS)
}

/// Why a store operation failed. Every variant says which content, chunk or path was
/// involved, so the message alone tells the user what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file or directory could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The disk (or the user's disk quota) is full. What was already stored is kept,
    /// so retrying after freeing space resumes.
    #[error(
        "disk full while {context}; free some space and retry (what is already stored is kept)"
    )]
    DiskFull {
        /// What was being written, naming the path.
        context: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The content is not in the store.
    #[error("content {0} is not in the store")]
    NotFound(ContentId),
    /// A manifest (received or built) breaks the manifest rules.
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// Manifest bytes received for a fetch do not hash to the id that was asked for:
    /// whoever sent them is wrong or lying, ask another provider.
    #[error("manifest bytes hash to {got}, not to the requested content id {expected}")]
    IdMismatch {
        /// The id that was asked for.
        expected: ContentId,
        /// The hash of the bytes received.
        got: ContentId,
    },
    /// Chunk data does not match its hash in the manifest; nothing was written.
    #[error("chunk {index} does not match its hash in the manifest")]
    HashMismatch {
        /// Global chunk index.
        index: u64,
    },
    /// A chunk index past the end of the manifest.
    #[error("chunk index {0} is past the end of the manifest")]
    BadIndex(u64),
    /// The manifest gives a chunk hash a length that disagrees with the same hash
    /// elsewhere (in the manifest or in the store): no data has two lengths, so the
    /// manifest is hostile or broken.
    #[error("manifest gives chunk {index} a length that disagrees with the same data elsewhere")]
    ConflictingChunk {
        /// Global chunk index.
        index: u64,
    },
    /// The content still lacks chunks.
    #[error("content {id} is incomplete: {missing} of its {total} chunks are missing")]
    Incomplete {
        /// The content.
        id: ContentId,
        /// Chunks without a block.
        missing: u64,
        /// Chunks in the manifest.
        total: u64,
    },
    /// Fetching the content would push the store past its quota even after evicting
    /// every fetched, unshared content.
    #[error("not enough room in the store: the content needs {needed} more bytes but at most {available} of the {quota}-byte quota can be made free; raise the store quota or unshare content")]
    QuotaFull {
        /// Bytes of blocks the content needs that the store lacks.
        needed: u64,
        /// Bytes that are free or could be freed by eviction.
        available: u64,
        /// The store's quota.
        quota: u64,
    },
    /// Only regular files and directories can be shared.
    #[error("{0} is neither a regular file nor a directory")]
    NotADirectoryOrFile(PathBuf),
    /// Manifest paths are UTF-8; a name that is not cannot be shared faithfully.
    #[error("{0}: the name is not valid UTF-8; rename it to share it")]
    NonUtf8Path(PathBuf),
    /// A directory with more files than a manifest may list.
    #[error("{path} holds more than {MAX_ENTRIES} files, more than one share may list")]
    TooManyFiles {
        /// The directory being shared.
        path: PathBuf,
    },
    /// The output exists and overwriting was not allowed.
    #[error("{0} already exists; choose another output path or allow overwriting")]
    AlreadyExists(PathBuf),
    /// A block on disk no longer matches its hash. It was dropped from the store.
    #[error("chunk {index} of {id} is corrupt on disk ({path}); it was dropped from the store, fetch (or share) the content again to repair it")]
    Corrupt {
        /// The content.
        id: ContentId,
        /// Global chunk index.
        index: u64,
        /// The block file.
        path: PathBuf,
    },
    /// A block the store believed it had is gone from disk.
    #[error("chunk {index} of {id} is missing from disk ({path}); fetch (or share) the content again to repair it")]
    MissingBlock {
        /// The content.
        id: ContentId,
        /// Global chunk index.
        index: u64,
        /// The block file.
        path: PathBuf,
    },
    /// A stored manifest file no longer hashes to its content id.
    #[error("the stored manifest of {id} ({path}) is corrupt; remove the content and fetch or share it again")]
    CorruptManifest {
        /// The content.
        id: ContentId,
        /// The manifest file.
        path: PathBuf,
    },
}

/// Builds an I/O error, singling out a full disk so the user sees what to do.
pub(crate) fn io_err(context: impl Into<String>, source: io::Error) -> StoreError {
    let context = context.into();
    match source.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            StoreError::DiskFull { context, source }
        }
        _ => StoreError::Io { context, source },
    }
}

/// What the store holds of one content, for listings and the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentInfo {
    /// The content id.
    pub id: ContentId,
    /// The name the sharer gave it.
    pub name: String,
    /// File or directory.
    pub kind: Kind,
    /// Total bytes of its files.
    pub size: u64,
    /// Chunks in its manifest.
    pub chunks: u64,
    /// Shared by this node: never evicted.
    pub pinned: bool,
    /// Every chunk is stored and verified: servable and exportable.
    pub complete: bool,
    /// Chunks whose block is stored.
    pub have_chunks: u64,
    /// Last import, fetch, export or serve, in unix seconds.
    pub last_used: u64,
    /// Where the file is kept when the store links a fetched file instead of holding
    /// its blocks (the output the fetch wrote; the user's to move or delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// One content known to the store.
struct Content {
    /// Shared through `Arc` so chunk reads and writes can work outside the lock.
    manifest: Arc<Manifest>,
    pinned: bool,
    complete: bool,
    last_used: u64,
    /// Orders uses within the same second, so LRU eviction is exact; memory only.
    seq: u64,
    /// Kept in a file outside the store (no block references held), if linked.
    linked: Option<Linked>,
}

/// One distinct block referenced by some content (or found on disk).
struct Block {
    /// How many contents reference it (each content counts once, however many of its
    /// chunks share the hash), plus imports in progress that hold it.
    refs: u64,
    len: u64,
    /// Whether the block file exists, so presence checks never touch the disk.
    present: bool,
    /// Whether this process has seen the file's bytes match their hash (it wrote them
    /// after checking, or read and hashed them once): serving then checks only the
    /// length, so a chunk is not hashed again on every request (the fetcher checks
    /// every chunk it receives; export still checks every block).
    verified: bool,
}

/// The store's state, behind one mutex.
struct Inner {
    contents: HashMap<ContentId, Content>,
    blocks: HashMap<Hash, Block>,
    /// Sum of `len` over present blocks: the disk use, kept without rescanning.
    used: u64,
    seq: u64,
    /// The index on disk lags memory.
    dirty: bool,
    last_persist: u64,
}

impl Inner {
    fn touch(&mut self, id: &ContentId) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(c) = self.contents.get_mut(id) {
            c.last_used = now_secs();
            c.seq = seq;
            self.dirty = true;
        }
    }

    fn present(&self, hash: &Hash) -> bool {
        self.blocks.get(hash).is_some_and(|b| b.present)
    }

    fn presence(&self, manifest: &Manifest) -> Vec<bool> {
        manifest.chunks().map(|r| self.present(&r.hash)).collect()
    }

    fn missing(&self, manifest: &Manifest) -> u64 {
        manifest.chunks().filter(|r| !self.present(&r.hash)).count() as u64
    }

    /// Per chunk of `c`, whether it is held: as a block, or verified in its linked file.
    fn presence_of(&self, c: &Content) -> Vec<bool> {
        match &c.linked {
            Some(l) => l.have.clone(),
            None => self.presence(&c.manifest),
        }
    }

    /// Chunks of `c` not held.
    fn missing_of(&self, c: &Content) -> u64 {
        match &c.linked {
            Some(l) => l.have.iter().filter(|h| !**h).count() as u64,
            None => self.missing(&c.manifest),
        }
    }

    /// Takes one reference on every distinct block of `manifest`.
    fn hold_manifest(&mut self, manifest: &Manifest) {
        for (hash, len) in distinct_blocks(manifest) {
            self.blocks
                .entry(hash)
                .or_insert(Block {
                    refs: 0,
                    len,
                    present: false,
                    verified: false,
                })
                .refs += 1;
        }
    }

    fn info(&self, id: ContentId, c: &Content) -> ContentInfo {
        ContentInfo {
            id,
            name: c.manifest.name.clone(),
            kind: c.manifest.kind,
            size: c.manifest.total_size(),
            chunks: c.manifest.chunk_count() as u64,
            pinned: c.pinned,
            complete: c.complete,
            have_chunks: c.manifest.chunk_count() as u64 - self.missing_of(c),
            last_used: c.last_used,
            path: c.linked.as_ref().map(|l| l.out.clone()),
        }
    }
}

/// Every distinct block of a manifest with its length.
fn distinct_blocks(manifest: &Manifest) -> HashMap<Hash, u64> {
    manifest
        .chunks()
        .map(|r| (r.hash, u64::from(r.len)))
        .collect()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexFile {
    version: u32,
    contents: Vec<IndexEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexEntry {
    id: ContentId,
    pinned: bool,
    complete: bool,
    last_used: u64,
    /// The output file a linked content is kept in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    linked: Option<PathBuf>,
}

/// The content-addressed store. `Send + Sync`: share it in an `Arc` and call it from
/// blocking tasks.
pub struct Store {
    root: PathBuf,
    quota: u64,
    /// A std `Mutex` because no caller holds it across an `.await` (the API is
    /// synchronous) and critical sections are map updates, plus the odd unlink.
    inner: Mutex<Inner>,
    /// Serializes index writes so an older snapshot never lands after a newer one.
    persist_lock: Mutex<()>,
    /// Makes temp file names unique within this process; the data dir lock keeps
    /// other processes out.
    tmp_seq: AtomicU64,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `path` with `suffix` appended to its last component.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// Removes a file, symlink or directory tree at `path` if there is one.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes a rename or file creation in `dir` durable. Best effort: some filesystems
/// refuse to fsync directories, and the data itself is already synced.
pub(crate) fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not fsync directory");
    }
}

/// Reads into `buf` until it is full or the reader ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads a block expected to hold `len` bytes. `Ok(None)` when its size is wrong;
/// reading at most `len + 1` bytes keeps a damaged, huge file from filling memory.
fn read_block(path: &Path, len: u64) -> io::Result<Option<Vec<u8>>> {
    let mut file = File::open(path)?;
    let Ok(size) = usize::try_from(len) else {
        return Ok(None);
    };
    let mut data = crate::chunk_pool::take(size);
    let got = read_full(&mut file, &mut data)?;
    // A block longer than its recorded length is as damaged as a shorter one.
    let mut past = [0u8; 1];
    let longer = read_full(&mut file, &mut past)? > 0;
    if got != size || longer {
        crate::chunk_pool::give(data);
        return Ok(None);
    }
    Ok(Some(data))
}

/// The references an import in progress holds on the blocks it wrote or reused, so
/// that a concurrent removal of other content sharing them cannot delete them before
/// the new manifest is registered. Dropping it (an error, a panic) gives them back.
struct ImportRefs<'a> {
    store: &'a Store,
    held: HashSet<Hash>,
}

impl ImportRefs<'_> {
    /// Takes a reference on `hash` (once per import); returns whether it is present.
    fn hold(&mut self, inner: &mut Inner, hash: Hash, len: u64) -> bool {
        if self.held.insert(hash) {
            inner
                .blocks
                .entry(hash)
                .or_insert(Block {
                    refs: 0,
                    len,
                    present: false,
                    verified: false,
                })
                .refs += 1;
        }
        inner.present(&hash)
    }

    /// Hands the references over to a newly registered content.
    fn commit(mut self) {
        self.held.clear();
    }

    fn release_in(mut self, inner: &mut Inner) {
        for hash in std::mem::take(&mut self.held) {
            self.store.release_block(inner, &hash);
        }
    }
}

impl Drop for ImportRefs<'_> {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut inner = self.store.lock();
        for hash in std::mem::take(&mut self.held) {
            self.store.release_block(&mut inner, &hash);
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, normally `<data_dir>/store`,
    /// with a quota on the bytes of blocks kept. Removes stale temp files and
    /// rebuilds its state from the manifests and blocks on disk.
    pub fn open(dir: &Path, quota_bytes: u64) -> Result<Store, StoreError> {
        for sub in ["", BLOCKS_DIR, MANIFESTS_DIR, TMP_DIR] {
            let path = dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(|e| io_err(format!("creating store directory {}", path.display()), e))?;
        }
        let store = Store {
            root: dir.to_path_buf(),
            quota: quota_bytes,
            inner: Mutex::new(Inner {
                contents: HashMap::new(),
                blocks: HashMap::new(),
                used: 0,
                seq: 0,
                dirty: false,
                last_persist: now_secs(),
            }),
            persist_lock: Mutex::new(()),
            tmp_seq: AtomicU64::new(0),
        };
        store.clean_tmp()?;
        let index = store.load_index();
        let (manifests, unreadable) = store.load_manifests()?;
        {
            let mut inner = store.lock();
            let mut index: HashMap<ContentId, IndexEntry> =
                index.into_iter().map(|e| (e.id, e)).collect();
            let now = now_secs();
            let mut unlisted: HashSet<ContentId> = HashSet::new();
            for (id, manifest) in manifests {
                let (pinned, mut complete, last_used, out) = match index.remove(&id) {
                    Some(e) => (e.pinned, e.complete, e.last_used, e.linked),
                    None => {
                        tracing::info!(%id, "content missing from the store index; picked up from its manifest");
                        inner.dirty = true;
                        unlisted.insert(id);
                        (false, false, now, None)
                    }
                };
                let linked = match out {
                    Some(out) => {
                        let size = manifest.total_size();
                        let mut l = Linked::new(out, manifest.chunk_count(), None);
                        if complete {
                            // Only the size is checked here; every read re-hashes.
                            match fs::metadata(&l.out) {
                                Ok(meta) if meta.is_file() && meta.len() == size => {
                                    l.have.fill(true);
                                    inner.used += size;
                                }
                                _ => {
                                    tracing::warn!(%id, path = %l.out.display(),
                                        "the file a fetched content was kept in is gone or changed; no longer serving it");
                                    complete = false;
                                    inner.dirty = true;
                                }
                            }
                        }
                        Some(l)
                    }
                    None => {
                        inner.hold_manifest(&manifest);
                        None
                    }
                };
                inner.contents.insert(
                    id,
                    Content {
                        manifest: Arc::new(manifest),
                        pinned,
                        complete,
                        last_used,
                        seq: 0,
                        linked,
                    },
                );
            }
            for id in index.keys() {
                tracing::warn!(%id, "store index lists content whose manifest is gone; dropping it");
                inner.dirty = true;
            }
            store.scan_blocks(&mut inner, unreadable == 0)?;
            let mut broken = Vec::new();
            let mut whole = Vec::new();
            for (id, c) in &inner.contents {
                let missing = inner.missing_of(c);
                if c.complete && missing > 0 {
                    broken.push(*id);
                } else if !c.complete && missing == 0 && unlisted.contains(id) {
                    // Not in the index (lost or corrupt) but every block is here: it
                    // is servable, so serve and announce it again. (An index entry
                    // saying incomplete is a fetch that never finished: left alone.)
                    whole.push(*id);
                }
            }
            for id in whole {
                if let Some(c) = inner.contents.get_mut(&id) {
                    c.complete = true;
                }
                inner.dirty = true;
            }
            for id in broken {
                tracing::warn!(%id, "content marked complete lacks blocks on disk; marked incomplete");
                if let Some(c) = inner.contents.get_mut(&id) {
                    c.complete = false;
                }
                inner.dirty = true;
            }
        }
        if store.lock().dirty {
            store.persist_logged();
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are at worst slightly
        // stale (the disk is the truth and is re-read on open): keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn block_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(BLOCKS_DIR).join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, id: &ContentId) -> PathBuf {
        self.root.join(MANIFESTS_DIR).join(id.to_hex())
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(TMP_DIR)
            .join(format!("{}.{n}", std::process::id()))
    }

    fn clean_tmp(&self) -> Result<(), StoreError> {
        let tmp = self.root.join(TMP_DIR);
        let entries =
            fs::read_dir(&tmp).map_err(|e| io_err(format!("listing {}", tmp.display()), e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if let Err(e) = remove_any(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove stale temp file");
            }
        }
        Ok(())
    }

    /// Reads the index; a missing one is empty, a corrupt one is set aside.
    fn load_index(&self) -> Vec<IndexEntry> {
        let path = self.root.join(INDEX_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the store index; rebuilding it");
                return Vec::new();
            }
        };
        match serde_json::from_slice::<IndexFile>(&bytes) {
            Ok(index) if index.version == INDEX_VERSION => index.contents,
            other => {
                let why = match other {
                    Ok(index) => format!("unknown version {}", index.version),
                    Err(e) => e.to_string(),
                };
                let aside = self.root.join(CORRUPT_INDEX_FILE);
                tracing::warn!(path = %path.display(), error = %why, kept_as = %aside.display(),
                    "store index is corrupt; rebuilding it (shared content must be shared again to be pinned)");
                if let Err(e) = fs::rename(&path, &aside) {
                    tracing::warn!(error = %e, "could not set the corrupt index aside");
                }
                Vec::new()
            }
        }
    }

    /// Reads every manifest file; returns those that check out and how many did not.
    /// Files that fail are logged and left in place, never deleted.
    #[allow(clippy::type_complexity)]
    fn load_manifests(&self) -> Result<(Vec<(ContentId, Manifest)>, usize), StoreError> {
        let dir = self.root.join(MANIFESTS_DIR);
        let entries =
            fs::read_dir(&dir).map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
        let mut out = Vec::new();
        let mut unreadable = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
            let path = entry.path();
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ContentId>().ok())
            else {
                tracing::warn!(path = %path.display(), "ignoring unexpected file among manifests");
                continue;
            };
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read manifest; skipping its content");
                    unreadable += 1;
                    continue;
                }
            };
            if Manifest::id_of(&bytes) != id {
                tracing::warn!(path = %path.display(), "manifest does not hash to its name (corrupt); skipping its content");
                unreadable += 1;
                continue;
            }
            match Manifest::decode(&bytes) {
                Ok(m) => out.push((id, m)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "manifest does not decode; skipping its content");
                    unreadable += 1;
                }
            }
        }
        Ok((out, unreadable))
    }

    /// Learns which blocks exist. Blocks of no known content are deleted when every
    /// manifest was readable (they are leftovers of an interrupted import or removal);
    /// otherwise they may belong to an unreadable manifest and are kept and counted.
    fn scan_blocks(&self, inner: &mut Inner, collect_orphans: bool) -> Result<(), StoreError> {
        let dir = self.root.join(BLOCKS_DIR);
        let subs =
            fs::read_dir(&dir).map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
        let mut orphans = 0u64;
        for sub in subs {
            let sub = sub.map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
            let sub_path = sub.path();
            if !sub.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let files = fs::read_dir(&sub_path)
                .map_err(|e| io_err(format!("listing {}", sub_path.display()), e))?;
            for file in files {
                let file =
                    file.map_err(|e| io_err(format!("listing {}", sub_path.display()), e))?;
                let path = file.path();
                let hash = file
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Hash>().ok())
                    .filter(|h| self.block_path(h) == path);
                let (Some(hash), Ok(meta)) = (hash, file.metadata()) else {
                    tracing::warn!(path = %path.display(), "ignoring unexpected file among blocks");
                    continue;
                };
                let len = meta.len();
                match inner.blocks.get_mut(&hash) {
                    Some(b) if b.len == len => {
                        b.present = true;
                        inner.used += len;
                    }
                    Some(b) => {
                        tracing::warn!(path = %path.display(), size = len, expected = b.len,
                            "block has the wrong size (damaged); removing it so it is fetched again");
                        if let Err(e) = fs::remove_file(&path) {
                            tracing::warn!(path = %path.display(), error = %e, "could not remove damaged block");
                        }
                    }
                    None if collect_orphans => match fs::remove_file(&path) {
                        Ok(()) => orphans += 1,
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "could not remove unreferenced block")
                        }
                    },
                    None => {
                        inner.blocks.insert(
                            hash,
                            Block {
                                refs: 0,
                                len,
                                present: true,
                                verified: false,
                            },
                        );
                        inner.used += len;
                    }
                }
            }
        }
        if orphans > 0 {
            tracing::info!(count = orphans, "removed blocks no content references");
        }
        Ok(())
    }

    /// Writes `data` to `dest` through a synced temp file and a rename, so `dest`
    /// holds all of `data` or does not exist. `durable` also syncs the directory.
    fn write_atomic(
        &self,
        dest: &Path,
        data: &[u8],
        context: impl FnOnce() -> String,
        durable: bool,
    ) -> Result<(), StoreError> {
        let tmp = self.tmp_path();
        let result = (|| -> io::Result<()> {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(data)?;
            // Before the rename: otherwise a power cut could leave the final name
            // pointing at an empty or partial file.
            file.sync_data()?;
            drop(file);
            match fs::rename(&tmp, dest) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if let Some(parent) = dest.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::rename(&tmp, dest)?;
                }
                other => other?,
            }
            if durable {
                if let Some(parent) = dest.parent() {
                    sync_dir(parent);
                }
            }
            Ok(())
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(context(), e)
        })
    }

    /// Writes a verified block and records it as present; `index` names the chunk
    /// in errors.
    fn store_block(&self, hash: &Hash, data: &[u8], index: u64) -> Result<(), StoreError> {
        let path = self.block_path(hash);
        self.write_atomic(
            &path,
            data,
            || format!("writing chunk {index} to {}", path.display()),
            false,
        )?;
        let mut inner = self.lock();
        let inner = &mut *inner;
        match inner.blocks.get_mut(hash) {
            Some(b) => {
                if !b.present {
                    // The bytes, verified by their hash, are the truth about the
                    // length, whatever a manifest claimed before they arrived.
                    b.len = data.len() as u64;
                    b.present = true;
                    inner.used += b.len;
                }
                // Its callers checked these bytes against the hash.
                b.verified = true;
            }
            // Every content that wanted it was removed while we wrote it.
            None => {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// Drops one reference to a block, deleting it when none is left.
    fn release_block(&self, inner: &mut Inner, hash: &Hash) {
        let Some(b) = inner.blocks.get_mut(hash) else {
            return;
        };
        b.refs = b.refs.saturating_sub(1);
        if b.refs > 0 {
            return;
        }
        let (present, len) = (b.present, b.len);
        inner.blocks.remove(hash);
        if present {
            inner.used = inner.used.saturating_sub(len);
            let path = self.block_path(hash);
            // Under the lock, so a concurrent write of the same block cannot be
            // recorded as present and then lose its file to this unlink.
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove block");
                }
            }
        }
    }

    /// Forgets a content, deletes its manifest and the blocks no one else uses.
    fn drop_content(&self, inner: &mut Inner, id: &ContentId) -> bool {
        let Some(c) = inner.contents.remove(id) else {
            return false;
        };
        let path = self.manifest_path(id);
        // The manifest goes first: a crash after it leaves only unreferenced blocks,
        // which the next open deletes.
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove manifest");
            }
        }
        match &c.linked {
            Some(l) => {
                inner.used = inner.used.saturating_sub(l.bytes(&c.manifest));
                // The finished file is the user's; an unfinished one is ours.
                if !c.complete {
                    let part = l.part_path();
                    if let Err(e) = remove_any(&part) {
                        tracing::warn!(path = %part.display(), error = %e, "could not remove partial output");
                    }
                }
            }
            None => {
                for hash in distinct_blocks(&c.manifest).keys() {
                    self.release_block(inner, hash);
                }
            }
        }
        inner.dirty = true;
        true
    }

    /// Records that a block's bytes on disk were seen to match its hash.
    fn mark_verified(&self, hash: &Hash) {
        if let Some(b) = self.lock().blocks.get_mut(hash) {
            b.verified = true;
        }
    }

    /// A block read back from disk is missing or damaged: forget it so the chunk is
    /// reported missing (a fetch or import writes it again), and mark every content
    /// using it incomplete so it is neither served nor exported as whole.
    fn quarantine(&self, hash: &Hash) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(b) = inner.blocks.get_mut(hash) {
            b.verified = false;
            if b.present {
                b.present = false;
                inner.used = inner.used.saturating_sub(b.len);
            }
        }
        let path = self.block_path(hash);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove damaged block");
            }
        }
        for (id, c) in inner.contents.iter_mut() {
            if c.complete
                && c.linked.is_none()
                && c.manifest.entries.iter().any(|e| e.chunks.contains(hash))
            {
                tracing::warn!(%id, block = %hash, "content lost a block; marked incomplete");
                c.complete = false;
            }
        }
        inner.dirty = true;
    }

    /// Writes the index. Serialized by `persist_lock`, the snapshot taken under it.
    fn persist(&self) -> Result<(), StoreError> {
        let _order = self.persist_lock.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = {
            let mut inner = self.lock();
            let mut contents: Vec<IndexEntry> = inner
                .contents
                .iter()
                .map(|(id, c)| IndexEntry {
                    id: *id,
                    pinned: c.pinned,
                    complete: c.complete,
                    last_used: c.last_used,
                    linked: c.linked.as_ref().map(|l| l.out.clone()),
                })
                .collect();
            contents.sort_by_key(|e| e.id);
            inner.dirty = false;
            inner.last_persist = now_secs();
            serde_json::to_vec_pretty(&IndexFile {
                version: INDEX_VERSION,
                contents,
            })
            .unwrap_or_default()
        };
        let path = self.root.join(INDEX_FILE);
        let result = self.write_atomic(
            &path,
            &bytes,
            || format!("writing the store index {}", path.display()),
            true,
        );
        if result.is_err() {
            self.lock().dirty = true;
        }
        result
    }

    /// Persists after a change whose caller already succeeded: the index is only a
    /// cache rebuilt on open, so failing the operation for it would mislead.
    fn persist_logged(&self) {
        if let Err(e) = self.persist() {
            tracing::warn!(error = %e, "could not write the store index; will retry");
        }
    }

    /// Writes the index now if it lags memory (last-use times of served content).
    /// Also done on drop; call it at shutdown to see the error.
    pub fn flush(&self) -> Result<(), StoreError> {
        if self.lock().dirty {
            self.persist()?;
        }
        Ok(())
    }

    /// Imports a file or a directory and pins it (this node shares it).
    ///
    /// A directory is walked recursively: regular files only (symlinks and special
    /// files are skipped with a warning, empty directories are not represented),
    /// entries sorted by path so the same tree always gives the same manifest and id.
    /// Files are read one chunk at a time, never whole. Importing the same content
    /// again returns the same id and pins it (and repairs any block it lost).
    pub fn import(
        &self,
        path: &Path,
        chunk_size: u32,
    ) -> Result<(ContentId, Manifest), StoreError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(ManifestError::ChunkSize(chunk_size).into());
        }
        let meta =
            fs::metadata(path).map_err(|e| io_err(format!("reading {}", path.display()), e))?;
        let (kind, files) = if meta.is_file() {
            (Kind::File, vec![(String::new(), path.to_path_buf())])
        } else if meta.is_dir() {
            (Kind::Dir, walk(path)?)
        } else {
            return Err(StoreError::NotADirectoryOrFile(path.to_path_buf()));
        };
        let name = import_name(path)?;
        let mut refs = ImportRefs {
            store: self,
            held: HashSet::new(),
        };
        let mut buf = vec![0u8; chunk_size as usize];
        let mut entries = Vec::with_capacity(files.len());
        let mut index = 0u64;
        for (rel, file) in files {
            let (size, chunks) = self.import_file(&file, &mut buf, &mut refs, &mut index)?;
            entries.push(Entry {
                path: rel,
                size,
                chunks,
            });
        }
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            name,
            kind,
            chunk_size,
            entries,
        };
        manifest.validate()?;
        let bytes = manifest.encode();
        let id = Manifest::id_of(&bytes);
        {
            let mut inner = self.lock();
            let known = inner.contents.get(&id).map(|c| Arc::clone(&c.manifest));
            let linked = inner.contents.get_mut(&id).and_then(|c| {
                c.linked
                    .take()
                    .map(|l| (l, c.complete, Arc::clone(&c.manifest)))
            });
            if let Some((l, was_complete, m)) = linked {
                // Shared content is held as blocks, which the import just stored: the
                // link is dropped (the user's file stays; an unfinished part goes).
                inner.used = inner.used.saturating_sub(l.bytes(&m));
                if !was_complete {
                    let _ = remove_any(&l.part_path());
                }
                if let Some(c) = inner.contents.get_mut(&id) {
                    c.pinned = true;
                    c.complete = true;
                }
                refs.commit();
            } else if let Some(known) = known {
                let complete = inner.missing(&known) == 0;
                if let Some(c) = inner.contents.get_mut(&id) {
                    c.pinned = true;
                    c.complete = complete;
                }
                refs.release_in(&mut inner);
            } else {
                // Under the lock, so "known content" and "manifest file exists" never
                // disagree with a concurrent removal.
                self.write_manifest(&id, &bytes)?;
                inner.contents.insert(
                    id,
                    Content {
                        manifest: Arc::new(manifest.clone()),
                        pinned: true,
                        complete: true,
                        last_used: 0,
                        seq: 0,
                        linked: None,
                    },
                );
                refs.commit();
            }
            inner.touch(&id);
        }
        self.persist_logged();
        tracing::info!(%id, name = %manifest.name, size = manifest.total_size(), "imported content");
        Ok((id, manifest))
    }

    /// Stores one file's chunks; returns its size and chunk hashes.
    fn import_file(
        &self,
        path: &Path,
        buf: &mut [u8],
        refs: &mut ImportRefs<'_>,
        index: &mut u64,
    ) -> Result<(u64, Vec<Hash>), StoreError> {
        let mut file =
            File::open(path).map_err(|e| io_err(format!("opening {}", path.display()), e))?;
        let mut size = 0u64;
        let mut chunks = Vec::new();
        loop {
            let n = read_full(&mut file, buf)
                .map_err(|e| io_err(format!("reading {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            let hash = Hash::of(data);
            let present = refs.hold(&mut self.lock(), hash, n as u64);
            if !present {
                self.store_block(&hash, data, *index)?;
            }
            chunks.push(hash);
            size += n as u64;
            *index += 1;
            if n < buf.len() {
                break;
            }
        }
        Ok((size, chunks))
    }

    fn write_manifest(&self, id: &ContentId, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.manifest_path(id);
        self.write_atomic(
            &path,
            bytes,
            || format!("writing manifest {}", path.display()),
            true,
        )
    }

    /// Stores a manifest received for a fetch of `id` and records the content as
    /// incomplete and unpinned (unless it is already known). Returns the manifest and,
    /// per global chunk index, whether its block is already stored: after a restart
    /// the same call tells which chunks are still missing.
    ///
    /// New content is refused with [`StoreError::QuotaFull`] when its missing blocks
    /// cannot fit even after evicting every evictable content (a best-effort check:
    /// fetches admitted concurrently are not counted against each other).
    pub fn begin_fetch(
        &self,
        id: ContentId,
        manifest_bytes: &[u8],
    ) -> Result<(Manifest, Vec<bool>), StoreError> {
        let got = Manifest::id_of(manifest_bytes);
        if got != id {
            return Err(StoreError::IdMismatch { expected: id, got });
        }
        let manifest = Manifest::decode(manifest_bytes)?;
        let mut inner = self.lock();
        // Quota accounting and block sharing trust a hash's length; a manifest that
        // claims another length for known data would corrupt both.
        let mut lengths: HashMap<Hash, u32> = HashMap::new();
        for (index, chunk) in manifest.chunks().enumerate() {
            let known = lengths
                .insert(chunk.hash, chunk.len)
                .map(u64::from)
                .or_else(|| inner.blocks.get(&chunk.hash).map(|b| b.len));
            if known.is_some_and(|len| len != u64::from(chunk.len)) {
                return Err(StoreError::ConflictingChunk {
                    index: index as u64,
                });
            }
        }
        if let Some(c) = inner.contents.get_mut(&id) {
            let manifest = Arc::clone(&c.manifest);
            let mut lost = 0;
            if let Some(l) = c.linked.as_mut().filter(|_| c.complete) {
                // The user may have moved or deleted the file since: then fetch it
                // again rather than claim it is here.
                let size = manifest.total_size();
                let whole = fs::metadata(&l.out).is_ok_and(|m| m.is_file() && m.len() == size);
                if !whole {
                    tracing::warn!(%id, path = %l.out.display(), "a fetched file is gone or changed; fetching it again");
                    lost = l.bytes(&manifest);
                    l.have.fill(false);
                    c.complete = false;
                }
            }
            if lost > 0 {
                inner.used = inner.used.saturating_sub(lost);
                inner.dirty = true;
            }
            let presence = inner
                .contents
                .get(&id)
                .map(|c| inner.presence_of(c))
                .unwrap_or_default();
            inner.touch(&id);
            return Ok(((*manifest).clone(), presence));
        }
        let needed: u64 = distinct_blocks(&manifest)
            .iter()
            .filter(|(h, _)| !inner.present(h))
            .map(|(_, len)| len)
            .sum();
        let unpinned = inner.used.saturating_sub(pinned_bytes(&inner));
        let available = self
            .quota
            .saturating_sub(unpinned.saturating_sub(reclaimable(&inner, None)));
        if needed > available {
            return Err(StoreError::QuotaFull {
                needed,
                available,
                quota: self.quota,
            });
        }
        self.write_manifest(&id, manifest_bytes)?;
        inner.hold_manifest(&manifest);
        let presence = inner.presence(&manifest);
        inner.contents.insert(
            id,
            Content {
                manifest: Arc::new(manifest.clone()),
                pinned: false,
                complete: false,
                last_used: 0,
                seq: 0,
                linked: None,
            },
        );
        inner.touch(&id);
        drop(inner);
        self.persist_logged();
        Ok((manifest, presence))
    }

    /// Verifies chunk `index` of `id` against its hash in the manifest
    /// ([`StoreError::HashMismatch`] and nothing written otherwise), then stores it.
    /// A linked content's chunk goes to its part file instead of a block.
    pub fn put_chunk(&self, id: ContentId, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let (manifest, linked) = {
            let inner = self.lock();
            let c = inner.contents.get(&id).ok_or(StoreError::NotFound(id))?;
            let linked = c.linked.as_ref().map(|l| (l.has(index), l.part.clone()));
            (Arc::clone(&c.manifest), linked)
        };
        let chunk = manifest.chunk(index).ok_or(StoreError::BadIndex(index))?;
        if data.len() != chunk.len as usize || Hash::of(data) != chunk.hash {
            return Err(StoreError::HashMismatch { index });
        }
        match linked {
            Some((true, _)) => Ok(()),
            Some((false, Some(part))) => {
                part.write_at(chunk.offset, data)?;
                let mut inner = self.lock();
                let inner = &mut *inner;
                // Only into the file the record still names: one moved to another
                // output meanwhile was re-hashed there, without this chunk.
                let added = inner
                    .contents
                    .get_mut(&id)
                    .and_then(|c| c.linked.as_mut())
                    .filter(|l| l.part.as_ref().is_some_and(|p| Arc::ptr_eq(p, &part)))
                    .is_some_and(|l| l.set(index, true));
                if added {
                    inner.used += u64::from(chunk.len);
                }
                Ok(())
            }
            Some((false, None)) => Err(StoreError::Io {
                context: format!("writing chunk {index} of {id}"),
                source: io::Error::other("its output file is not open; fetch it again"),
            }),
            None => {
                if self.lock().present(&chunk.hash) {
                    return Ok(());
                }
                self.store_block(&chunk.hash, data, index)
            }
        }
    }

    /// Keeps a single-file fetch of `id` only in its output file: chunks go to
    /// `<out>.servant-part` (created, or reopened and re-hashed after an interruption,
    /// or moved there from an earlier output path) and [`Store::complete`] renames it
    /// onto `out`. Returns which chunks are verified, or `None` when the content is
    /// not linkable (a directory, shared, complete, or partly held as blocks), so the
    /// caller keeps blocks and writes its own part file. An existing `out` is refused
    /// unless `overwrite`.
    pub fn link(
        &self,
        id: ContentId,
        out: &Path,
        overwrite: bool,
    ) -> Result<Option<Vec<bool>>, StoreError> {
        let (manifest, earlier) = {
            let inner = self.lock();
            let c = inner.contents.get(&id).ok_or(StoreError::NotFound(id))?;
            if c.manifest.kind != Kind::File || c.pinned || c.complete {
                return Ok(None);
            }
            let earlier = match &c.linked {
                Some(l) if l.part.is_some() && l.out == out => return Ok(Some(l.have.clone())),
                Some(l) => Some(l.out.clone()),
                None if inner.presence(&c.manifest).contains(&true) => return Ok(None),
                None => None,
            };
            (Arc::clone(&c.manifest), earlier)
        };
        let size = manifest.total_size();
        let part_path = with_suffix(out, PART_SUFFIX);
        if let Some(old_out) = &earlier {
            if old_out != out {
                // A file handle still open on the old part (a fetch under way) keeps
                // writing into the moved file: a rename keeps the inode.
                let from = with_suffix(old_out, PART_SUFFIX);
                if fs::symlink_metadata(&from).is_ok() {
                    crate::part_file::check_output(out, overwrite)?;
                    if let Err(e) = fs::rename(&from, &part_path) {
                        // Another filesystem, say: the verified chunks are fetched
                        // again rather than copied.
                        tracing::warn!(from = %from.display(), to = %part_path.display(), error = %e,
                            "could not move the partial output; starting it again");
                        let _ = remove_any(&from);
                    }
                }
            } else if fs::symlink_metadata(&part_path).is_err() && self.adopt_output(id, out)? {
                // Killed between renaming the finished file into place and recording
                // it: the output is whole, and now known again.
                return Ok(Some(vec![true; manifest.chunk_count()]));
            }
        }
        // Only bytes read back and hashed count as verified: whatever an earlier
        // record said, the file now at the part path is the truth.
        let existed = fs::symlink_metadata(&part_path).is_ok_and(|m| m.is_file());
        let part = match earlier {
            Some(_) => PartFile::reopen(out, size, overwrite)?,
            None => PartFile::create(out, size, overwrite)?,
        };
        let have = if existed {
            crate::linked::scan(&part, &manifest)
                .map_err(|e| io_err(format!("reading {}", part.part_path().display()), e))?
        } else {
            vec![false; manifest.chunk_count()]
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(c) = inner.contents.get_mut(&id) else {
            part.abandon();
            return Err(StoreError::NotFound(id));
        };
        if c.pinned || c.complete {
            // Shared or finished meanwhile: the blocks are the record now.
            part.abandon();
            return Ok(None);
        }
        let fresh = c.linked.is_none();
        let old_bytes = c.linked.as_ref().map_or(0, |l| l.bytes(&c.manifest));
        let mut l = Linked::new(out.to_path_buf(), have.len(), Some(Arc::new(part)));
        l.have = have.clone();
        let new_bytes = l.bytes(&c.manifest);
        c.linked = Some(l);
        let manifest = Arc::clone(&c.manifest);
        inner.used = inner.used.saturating_sub(old_bytes) + new_bytes;
        if fresh {
            // The references begin_fetch took: a linked content holds no block.
            for hash in distinct_blocks(&manifest).keys() {
                self.release_block(inner, hash);
            }
        }
        inner.dirty = true;
        drop(guard);
        // Not just logged: a restart that does not know of the link would take the
        // part file for a stale one and start it again, losing its verified chunks.
        self.persist()?;
        let verified = have.iter().filter(|h| **h).count();
        tracing::info!(%id, out = %out.display(), verified, "fetching into the output file only");
        Ok(Some(have))
    }

    /// A linked content whose part file is gone but whose output holds every chunk
    /// (verified by reading it back) is recorded complete. Returns whether it was.
    fn adopt_output(&self, id: ContentId, out: &Path) -> Result<bool, StoreError> {
        let Some(manifest) = self
            .lock()
            .contents
            .get(&id)
            .map(|c| Arc::clone(&c.manifest))
        else {
            return Ok(false);
        };
        if !fs::metadata(out).is_ok_and(|m| m.is_file() && m.len() == manifest.total_size()) {
            return Ok(false);
        }
        let file = match crate::linked::open_file(out) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(format!("opening {}", out.display()), e)),
        };
        if crate::linked::read_back(&file, out, &manifest, |_| Ok(()))?.is_some() {
            return Ok(false);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(c) = inner.contents.get_mut(&id) else {
            return Ok(false);
        };
        let Some(l) = c.linked.as_mut().filter(|l| l.out == out) else {
            return Ok(false);
        };
        let before = l.bytes(&manifest);
        l.have.fill(true);
        l.part = None;
        c.complete = true;
        inner.used = inner.used.saturating_sub(before) + manifest.total_size();
        inner.dirty = true;
        drop(guard);
        self.persist_logged();
        tracing::info!(%id, out = %out.display(), "found a fetched file whole at its output");
        Ok(true)
    }

    /// Marks a fetched content complete once every chunk is stored
    /// ([`StoreError::Incomplete`] otherwise), then evicts least-recently-used
    /// complete, unpinned contents other than `id` until the blocks fit the quota.
    /// Returns the evicted ids, which the node must stop providing. Pinned content is
    /// never evicted, even over quota.
    ///
    /// A linked content's part file is synced and renamed onto its output first.
    pub fn complete(&self, id: ContentId) -> Result<Vec<ContentId>, StoreError> {
        let part = {
            let inner = self.lock();
            let c = inner.contents.get(&id).ok_or(StoreError::NotFound(id))?;
            let missing = inner.missing_of(c);
            if missing > 0 {
                return Err(StoreError::Incomplete {
                    id,
                    missing,
                    total: c.manifest.chunk_count() as u64,
                });
            }
            match &c.linked {
                Some(l) if l.part.is_none() && !c.complete => {
                    // Another fetch of the same content moved its file elsewhere (the
                    // API runs one at a time; the store still refuses a race).
                    return Err(StoreError::Io {
                        context: format!("completing {id}"),
                        source: io::Error::other(
                            "its partial output was taken over by another fetch of the same content",
                        ),
                    });
                }
                Some(l) => l.part.clone(),
                None => None,
            }
        };
        // Outside the lock: syncing a large file can take a while on a real disk.
        if let Some(part) = &part {
            if let Err(e) = part.finish() {
                // Two callers finishing one content at once (the API runs one fetch
                // per content; the store stays safe without it): the other renamed it.
                if !self.lock().contents.get(&id).is_some_and(|c| c.complete) {
                    return Err(e);
                }
            }
        }
        let mut inner = self.lock();
        if let Some(c) = inner.contents.get_mut(&id) {
            c.complete = true;
            if let Some(l) = c.linked.as_mut() {
                // Read by path from now on: the file is the user's, and a handle
                // would keep serving a version they replaced.
                l.part = None;
            }
        }
        inner.touch(&id);
        let evicted = self.evict(&mut inner, &id);
        drop(inner);
        self.persist_logged();
        Ok(evicted)
    }

    fn evict(&self, inner: &mut Inner, keep: &ContentId) -> Vec<ContentId> {
        let mut evicted = Vec::new();
        let pinned = pinned_bytes(inner);
        let now = now_secs();
        while inner.used.saturating_sub(pinned) > self.quota {
            // Abandoned partials first (they serve nobody), then least recently used.
            let victim = inner
                .contents
                .iter()
                .filter(|(id, c)| *id != keep && evictable(c, now))
                .min_by_key(|(id, c)| (c.complete, c.last_used, c.seq, **id))
                .map(|(id, _)| *id);
            let Some(victim) = victim else {
                tracing::warn!(used = inner.used, quota = self.quota,
                    "store is over its quota with nothing left to evict (shared or in-progress content)");
                break;
            };
            self.drop_content(inner, &victim);
            tracing::info!(id = %victim, "evicted content to stay within the store quota");
            evicted.push(victim);
        }
        evicted
    }

    /// The exact manifest bytes of a content the store knows (complete or not), for
    /// serving; `None` if unknown.
    pub fn manifest_bytes(&self, id: ContentId) -> Result<Option<Vec<u8>>, StoreError> {
        if !self.lock().contents.contains_key(&id) {
            return Ok(None);
        }
        let path = self.manifest_path(&id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", path.display()), e)),
        };
        if Manifest::id_of(&bytes) != id {
            return Err(StoreError::CorruptManifest { id, path });
        }
        Ok(Some(bytes))
    }

    /// Reads chunk `index` of `id` for serving. `None` if the content is unknown, the
    /// index is past the end, or the block is not stored. Only block files named by
    /// the manifest's hashes are read, never a path derived from the request; the
    /// block is verified, and a damaged one is dropped (and reported as absent).
    pub fn read_chunk(&self, id: ContentId, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(read) = self.read_linked(id, index) {
            return read;
        }
        let (chunk, persist, verified) = {
            let mut inner = self.lock();
            let Some(chunk) = inner
                .contents
                .get(&id)
                .and_then(|c| c.manifest.chunk(index))
            else {
                return Ok(None);
            };
            if !inner.present(&chunk.hash) {
                return Ok(None);
            }
            // A manifest that disagrees with the stored block about its length is
            // this content's problem, not the block's: never drop shared data for it.
            let Some(block) = inner.blocks.get(&chunk.hash) else {
                return Ok(None);
            };
            if block.len != u64::from(chunk.len) {
                return Ok(None);
            }
            let verified = block.verified;
            inner.touch(&id);
            let persist = now_secs().saturating_sub(inner.last_persist) >= TOUCH_PERSIST_SECS;
            (chunk, persist, verified)
        };
        if persist {
            self.persist_logged();
        }
        let path = self.block_path(&chunk.hash);
        match read_block(&path, u64::from(chunk.len)) {
            Ok(Some(data)) if verified => Ok(Some(data)),
            Ok(Some(data)) if Hash::of(&data) == chunk.hash => {
                self.mark_verified(&chunk.hash);
                Ok(Some(data))
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), %id, index, "stored block is damaged; dropping it");
                self.quarantine(&chunk.hash);
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), %id, index, "stored block vanished from disk");
                self.quarantine(&chunk.hash);
                Ok(None)
            }
            Err(e) => Err(io_err(
                format!("reading chunk {index} from {}", path.display()),
                e,
            )),
        }
    }

    /// [`Store::read_chunk`] for a linked content (`None` if `id` is not linked): from
    /// the part file while fetching, from the output afterwards, always re-hashed.
    fn read_linked(
        &self,
        id: ContentId,
        index: u64,
    ) -> Option<Result<Option<Vec<u8>>, StoreError>> {
        let (chunk, source) = {
            let mut inner = self.lock();
            let c = inner.contents.get(&id)?;
            let l = c.linked.as_ref()?;
            let Some(chunk) = c.manifest.chunk(index).filter(|_| l.has(index)) else {
                return Some(Ok(None));
            };
            let source = match &l.part {
                Some(part) => Ok(Arc::clone(part)),
                None => Err(l.out.clone()),
            };
            inner.touch(&id);
            (chunk, source)
        };
        let (read, path) = match source {
            Ok(part) => {
                let read = part
                    .read_at(chunk.offset, chunk.len as usize)
                    .map(|data| (Hash::of(&data) == chunk.hash).then_some(data));
                (read, part.part_path().to_path_buf())
            }
            Err(out) => {
                let read = crate::linked::open_file(&out)
                    .and_then(|f| crate::linked::read_verified(&f, &chunk));
                (read, out)
            }
        };
        Some(match read {
            Ok(Some(data)) => Ok(Some(data)),
            Ok(None) => {
                tracing::warn!(path = %path.display(), %id, index, "a fetched file no longer holds this chunk; not serving it");
                self.lose_linked_chunk(id, index);
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), %id, "a fetched file is gone; not serving it");
                self.lose_linked_file(id);
                Ok(None)
            }
            Err(e) => Err(io_err(
                format!("reading chunk {index} from {}", path.display()),
                e,
            )),
        })
    }

    /// A linked content's file is gone: every chunk is missing now.
    fn lose_linked_file(&self, id: ContentId) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(c) = inner.contents.get_mut(&id) else {
            return;
        };
        if let Some(l) = c.linked.as_mut() {
            let lost = l.bytes(&c.manifest);
            l.have.fill(false);
            inner.used = inner.used.saturating_sub(lost);
            c.complete = false;
            inner.dirty = true;
        }
    }

    /// A linked chunk no longer matches (the user changed or removed the file): it
    /// is missing now, and the content incomplete.
    fn lose_linked_chunk(&self, id: ContentId, index: u64) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(c) = inner.contents.get_mut(&id) else {
            return;
        };
        let len = c.manifest.chunk(index).map_or(0, |ch| u64::from(ch.len));
        if let Some(l) = c.linked.as_mut() {
            if l.set(index, false) {
                inner.used = inner.used.saturating_sub(len);
            }
            c.complete = false;
            inner.dirty = true;
        }
    }

    /// Assembles complete content at `out`: built at `<out>.servant-part` (a file or
    /// a directory) and renamed onto `out`, every block verified while copying. An
    /// existing `out` is refused unless `overwrite`. On any failure the partial
    /// output is removed and the blocks stay in the store, so a retry works.
    pub fn export(&self, id: ContentId, out: &Path, overwrite: bool) -> Result<(), StoreError> {
        let manifest = {
            let mut inner = self.lock();
            let c = inner.contents.get(&id).ok_or(StoreError::NotFound(id))?;
            let manifest = Arc::clone(&c.manifest);
            if !c.complete {
                return Err(StoreError::Incomplete {
                    id,
                    missing: inner.missing_of(c),
                    total: manifest.chunk_count() as u64,
                });
            }
            if c.linked.as_ref().is_some_and(|l| l.out == out) {
                // Already there (the fetch that linked it wrote it to this path), if
                // the user has not changed it since: read it back.
                inner.touch(&id);
                drop(inner);
                return self.read_back_linked(id, &manifest, out, None);
            }
            // Most recently used now, so a concurrent eviction picks anything else.
            inner.touch(&id);
            manifest
        };
        let existing = match fs::symlink_metadata(out) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(format!("checking output {}", out.display()), e)),
        };
        if existing.is_some() && !overwrite {
            return Err(StoreError::AlreadyExists(out.to_path_buf()));
        }
        let part = with_suffix(out, PART_SUFFIX);
        // A leftover of an interrupted export to the same output.
        remove_any(&part).map_err(|e| io_err(format!("removing stale {}", part.display()), e))?;
        let built = match manifest.kind {
            Kind::File => self.export_entry(id, &manifest, 0, &part),
            Kind::Dir => self.export_dir(id, &manifest, &part),
        };
        let placed = built.and_then(|()| {
            // A rename replaces a file (or symlink) atomically, but not a directory.
            let replace_in_place = match &existing {
                None => true,
                Some(meta) => manifest.kind == Kind::File && !meta.is_dir(),
            };
            if replace_in_place {
                fs::rename(&part, out).map_err(|e| {
                    io_err(
                        format!("renaming {} to {}", part.display(), out.display()),
                        e,
                    )
                })
            } else {
                replace(&part, out)
            }
        });
        if let Err(e) = placed {
            if let Err(clean) = remove_any(&part) {
                tracing::warn!(path = %part.display(), error = %clean, "could not remove partial export");
            }
            return Err(e);
        }
        if let Some(parent) = out.parent() {
            sync_dir(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            });
        }
        tracing::info!(%id, out = %out.display(), "exported content");
        Ok(())
    }

    fn export_dir(
        &self,
        id: ContentId,
        manifest: &Manifest,
        part: &Path,
    ) -> Result<(), StoreError> {
        fs::create_dir(part).map_err(|e| io_err(format!("creating {}", part.display()), e))?;
        for index in 0..manifest.entries.len() {
            let rel = manifest
                .entry_path(index)
                .ok_or_else(|| ManifestError::Path(manifest.entries[index].path.clone()))?;
            let dest = part.join(rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| io_err(format!("creating {}", parent.display()), e))?;
            }
            self.export_entry(id, manifest, index, &dest)?;
        }
        Ok(())
    }

    /// Writes entry `entry` of the manifest to `dest`, verifying each block.
    fn export_entry(
        &self,
        id: ContentId,
        manifest: &Manifest,
        entry: usize,
        dest: &Path,
    ) -> Result<(), StoreError> {
        let mut first = 0u64;
        for e in &manifest.entries[..entry] {
            first += e.chunks.len() as u64;
        }
        let Some(e) = manifest.entries.get(entry) else {
            return Ok(());
        };
        // create_new: on a case-insensitive disk two entries may meet; fail, never
        // let one silently replace the other.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .map_err(|err| io_err(format!("creating {}", dest.display()), err))?;
        let chunk_size = u64::from(manifest.chunk_size);
        let linked = self
            .lock()
            .contents
            .get(&id)
            .and_then(|c| c.linked.as_ref())
            .map(|l| l.out.clone());
        if let Some(src) = linked {
            return self.read_back_linked(id, manifest, &src, Some((file, dest)));
        }
        for (i, hash) in e.chunks.iter().enumerate() {
            let index = first + i as u64;
            let len = (e.size - i as u64 * chunk_size).min(chunk_size);
            let path = self.block_path(hash);
            let recorded = self.lock().blocks.get(hash).map(|b| b.len);
            if recorded != Some(len) {
                return Err(StoreError::ConflictingChunk { index });
            }
            // Unlike serving (where the fetcher checks every chunk anyway), export
            // produces the user's bytes: it always checks them.
            let data = match read_block(&path, len) {
                Ok(Some(data)) if Hash::of(&data) == *hash => data,
                Ok(_) => {
                    self.quarantine(hash);
                    return Err(StoreError::Corrupt { id, index, path });
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    self.quarantine(hash);
                    return Err(StoreError::MissingBlock { id, index, path });
                }
                Err(err) => {
                    return Err(io_err(
                        format!("reading chunk {index} from {}", path.display()),
                        err,
                    ))
                }
            };
            file.write_all(&data)
                .map_err(|err| io_err(format!("writing {}", dest.display()), err))?;
        }
        file.sync_all()
            .map_err(|err| io_err(format!("writing {}", dest.display()), err))
    }

    /// Reads a linked content's file `src` back, checking every chunk, and copies it
    /// into `dest` (a created file and its path) when given. A chunk that no longer
    /// matches is marked missing and reported; a file that is gone loses them all.
    fn read_back_linked(
        &self,
        id: ContentId,
        manifest: &Manifest,
        src: &Path,
        mut dest: Option<(File, &Path)>,
    ) -> Result<(), StoreError> {
        let input = match crate::linked::open_file(src) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.lose_linked_file(id);
                return Err(StoreError::MissingBlock {
                    id,
                    index: 0,
                    path: src.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err(format!("opening {}", src.display()), e)),
        };
        let bad = crate::linked::read_back(&input, src, manifest, |data| match &mut dest {
            Some((file, path)) => file
                .write_all(data)
                .map_err(|err| io_err(format!("writing {}", path.display()), err)),
            None => Ok(()),
        })?;
        if let Some(index) = bad {
            self.lose_linked_chunk(id, index);
            return Err(StoreError::Corrupt {
                id,
                index,
                path: src.to_path_buf(),
            });
        }
        match dest {
            Some((file, path)) => file
                .sync_all()
                .map_err(|err| io_err(format!("writing {}", path.display()), err)),
            None => Ok(()),
        }
    }

    /// Unshares content: unpins and removes it with every block no other content
    /// references. Returns whether it existed.
    pub fn remove(&self, id: ContentId) -> Result<bool, StoreError> {
        let existed = self.drop_content(&mut self.lock(), &id);
        if existed {
            self.flush()?;
            tracing::info!(%id, "removed content from the store");
        }
        Ok(existed)
    }

    /// Every content in the store, sorted by name.
    pub fn list(&self) -> Vec<ContentInfo> {
        let inner = self.lock();
        let mut out: Vec<ContentInfo> = inner
            .contents
            .iter()
            .map(|(id, c)| inner.info(*id, c))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    /// What search answers from: every complete content's id, name, size and kind.
    /// Cheap (no per-chunk work), for callers on the event loop.
    pub fn catalog(&self) -> Vec<(ContentId, String, u64, Kind)> {
        let inner = self.lock();
        inner
            .contents
            .iter()
            .filter(|(_, c)| c.complete)
            .map(|(id, c)| {
                let m = &c.manifest;
                (*id, m.name.clone(), m.total_size(), m.kind)
            })
            .collect()
    }

    /// How many contents the store holds, complete or not.
    pub fn len(&self) -> usize {
        self.lock().contents.len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One content's state, if the store has it.
    pub fn info(&self, id: ContentId) -> Option<ContentInfo> {
        let inner = self.lock();
        inner.contents.get(&id).map(|c| inner.info(id, c))
    }

    /// How many chunks a content has, if the store knows it: cheap, for every request.
    pub fn chunk_count(&self, id: ContentId) -> Option<u64> {
        self.lock()
            .contents
            .get(&id)
            .map(|c| c.manifest.chunk_count() as u64)
    }

    /// Content this node shares, to announce as provider at start.
    pub fn pinned(&self) -> Vec<ContentId> {
        self.ids_where(|c| c.pinned)
    }

    /// Every complete content: everything this node can serve whole.
    pub fn complete_ids(&self) -> Vec<ContentId> {
        self.ids_where(|c| c.complete)
    }

    fn ids_where(&self, keep: impl Fn(&Content) -> bool) -> Vec<ContentId> {
        let mut ids: Vec<_> = self
            .lock()
            .contents
            .iter()
            .filter(|(_, c)| keep(c))
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        ids
    }

    /// Bytes the store accounts for: blocks on disk, each distinct block counted once,
    /// plus the verified chunks of linked files.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    /// The quota evictable (fetched, unshared) content is kept within.
    pub fn quota(&self) -> u64 {
        self.quota
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "could not write the store index on close");
        }
    }
}

/// Bytes freed if every complete, unpinned content other than `keep` were evicted:
/// present blocks that only such contents reference.
/// Bytes of present blocks that some pinned content uses: they never count against
/// the quota, which bounds the cache of fetched content, not what the operator shares.
fn pinned_bytes(inner: &Inner) -> u64 {
    let mut seen: HashSet<Hash> = HashSet::new();
    for c in inner.contents.values().filter(|c| c.pinned) {
        seen.extend(distinct_blocks(&c.manifest).into_keys());
    }
    seen.iter()
        .filter_map(|h| inner.blocks.get(h).filter(|b| b.present))
        .map(|b| b.len)
        .sum()
}

fn reclaimable(inner: &Inner, keep: Option<&ContentId>) -> u64 {
    let mut counts: HashMap<Hash, u64> = HashMap::new();
    let mut linked = 0;
    let now = now_secs();
    for (id, c) in &inner.contents {
        if Some(id) == keep || !evictable(c, now) {
            continue;
        }
        if let Some(l) = &c.linked {
            linked += l.bytes(&c.manifest);
            continue;
        }
        for hash in distinct_blocks(&c.manifest).into_keys() {
            *counts.entry(hash).or_default() += 1;
        }
    }
    let blocks: u64 = counts
        .iter()
        .filter_map(|(hash, n)| inner.blocks.get(hash).filter(|b| b.present && b.refs == *n))
        .map(|b| b.len)
        .sum();
    blocks + linked
}

/// Puts the built `part` where `out` is, moving the old `out` aside first: a rename
/// cannot replace a directory, and the old output survives until the new one is in.
fn replace(part: &Path, out: &Path) -> Result<(), StoreError> {
    let old = with_suffix(out, OLD_SUFFIX);
    remove_any(&old).map_err(|e| io_err(format!("removing stale {}", old.display()), e))?;
    fs::rename(out, &old).map_err(|e| {
        io_err(
            format!("moving {} aside to {}", out.display(), old.display()),
            e,
        )
    })?;
    if let Err(e) = fs::rename(part, out) {
        let _ = fs::rename(&old, out);
        return Err(io_err(
            format!("renaming {} to {}", part.display(), out.display()),
            e,
        ));
    }
    if let Err(e) = remove_any(&old) {
        tracing::warn!(path = %old.display(), error = %e, "could not remove the replaced output");
    }
    Ok(())
}

/// The name a share is published under: the file or directory's own name.
fn import_name(path: &Path) -> Result<String, StoreError> {
    let name = match path.file_name() {
        Some(name) => name.to_owned(),
        // `.`, `..` or `/`: name it after what the path resolves to.
        None => fs::canonicalize(path)
            .map_err(|e| io_err(format!("resolving {}", path.display()), e))?
            .file_name()
            .map(|n| n.to_owned())
            .unwrap_or_else(|| OsString::from("root")),
    };
    name.into_string()
        .map_err(|_| StoreError::NonUtf8Path(path.to_path_buf()))
}

/// The regular files under `root`, as (relative `/` path, full path), sorted by
/// relative path.
fn walk(root: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let mut files = Vec::new();
    // An explicit stack, not recursion: depth is bounded by the tree, not the stack.
    let mut dirs = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = dirs.pop() {
        let entries =
            fs::read_dir(&dir).map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(format!("listing {}", dir.display()), e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name
                .to_str()
                .ok_or_else(|| StoreError::NonUtf8Path(path.clone()))?;
            let child = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry
                .file_type()
                .map_err(|e| io_err(format!("reading {}", path.display()), e))?;
            if kind.is_symlink() {
                tracing::warn!(path = %path.display(), "skipping symlink");
            } else if kind.is_dir() {
                dirs.push((path, child));
            } else if kind.is_file() {
                files.push((child, path));
                if files.len() > MAX_ENTRIES {
                    return Err(StoreError::TooManyFiles {
                        path: root.to_path_buf(),
                    });
                }
            } else {
                tracing::warn!(path = %path.display(), "skipping special file");
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const CS: u32 = MIN_CHUNK_SIZE;
    const CSU: usize = CS as usize;

    /// Deterministic bytes, different for each seed.
    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn put(path: &Path, data: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, data).unwrap();
    }

    fn block_files(store_dir: &Path) -> usize {
        fs::read_dir(store_dir.join(BLOCKS_DIR))
            .unwrap()
            .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum()
    }

    /// Imports `data` into a source store and begins fetching it into `dst`.
    fn fetch_into(src: &Store, dst: &Store, dir: &Path, name: &str, data: &[u8]) -> ContentId {
        let path = dir.join(name);
        put(&path, data);
        let (id, _) = src.import(&path, CS).unwrap();
        let mbytes = src.manifest_bytes(id).unwrap().unwrap();
        let (m, _) = dst.begin_fetch(id, &mbytes).unwrap();
        for i in 0..m.chunk_count() as u64 {
            dst.put_chunk(id, i, &src.read_chunk(id, i).unwrap().unwrap())
                .unwrap();
        }
        id
    }

    /// Imports `data` into `src` and begins a linked fetch of it into `dst` at `out`:
    /// `put` of its chunks are written before returning.
    fn linked_fetch(
        src: &Store,
        dst: &Store,
        dir: &Path,
        name: &str,
        data: &[u8],
        out: &Path,
        put_chunks: impl Fn(u64) -> bool,
    ) -> Result<ContentId, Box<dyn std::error::Error>> {
        let path = dir.join(name);
        put(&path, data);
        let (id, _) = src.import(&path, CS)?;
        let mbytes = src.manifest_bytes(id)?.ok_or("missing")?;
        let (m, _) = dst.begin_fetch(id, &mbytes)?;
        let have = dst.link(id, out, false)?.ok_or("not linkable")?;
        assert!(!have.contains(&true));
        for i in (0..m.chunk_count() as u64).filter(|i| put_chunks(*i)) {
            dst.put_chunk(id, i, &src.read_chunk(id, i)?.ok_or("missing")?)?;
        }
        Ok(id)
    }

    /// A scratch directory with a source store (`src`, unlimited) and a destination
    /// store (`dst`, with `quota`): the set-up of every linked-fetch test.
    fn two_stores(
        quota: u64,
    ) -> Result<(tempfile::TempDir, Store, PathBuf, Store), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let src = Store::open(&tmp.path().join("src"), u64::MAX)?;
        let dst_dir = tmp.path().join("dst");
        let dst = Store::open(&dst_dir, quota)?;
        Ok((tmp, src, dst_dir, dst))
    }

    #[test]
    fn a_linked_fetch_writes_each_chunk_once_and_serves_from_the_output(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (tmp, src, dst_dir, dst) = two_stores(u64::MAX)?;
        let data = bytes(3 * CSU + 17, 40);
        let out = tmp.path().join("out.bin");
        let id = linked_fetch(&src, &dst, tmp.path(), "a", &data, &out, |_| true)?;
        assert_eq!(
            block_files(&dst_dir),
            0,
            "no block is stored for a linked fetch"
        );
        assert!(!out.exists(), "the output appears only when whole");
        // Chunks already verified are served from the part file during the fetch.
        assert_eq!(
            dst.read_chunk(id, 1)?.ok_or("missing")?,
            &data[CSU..2 * CSU]
        );
        assert!(dst.complete(id)?.is_empty());
        assert_eq!(fs::read(&out)?, data);
        assert!(!with_suffix(&out, PART_SUFFIX).exists());
        let info = dst.info(id).ok_or("unknown content")?;
        assert!(info.complete && !info.pinned);
        assert_eq!((info.have_chunks, info.path.as_deref()), (4, Some(&*out)));
        assert_eq!(dst.used_bytes(), data.len() as u64);
        assert_eq!(dst.read_chunk(id, 3)?.ok_or("missing")?, &data[3 * CSU..]);
        // Exporting to the path it is kept at is nothing to do; elsewhere, a copy.
        dst.export(id, &out, false)?;
        let copy = tmp.path().join("copy.bin");
        dst.export(id, &copy, false)?;
        assert_eq!(fs::read(&copy)?, data);

        // The link survives a restart; the user's edit is caught at the next read.
        drop(dst);
        let dst = Store::open(&dst_dir, u64::MAX)?;
        assert!(dst.info(id).ok_or("unknown content")?.complete);
        let mut edited = data.clone();
        edited[CSU + 5] ^= 1;
        fs::write(&out, &edited)?;
        assert!(dst.read_chunk(id, 0)?.is_some());
        assert!(dst.read_chunk(id, 1)?.is_none());
        let info = dst.info(id).ok_or("unknown content")?;
        assert!(!info.complete);
        assert_eq!(info.have_chunks, 3);
        assert!(matches!(
            dst.export(id, &tmp.path().join("x"), false),
            Err(StoreError::Incomplete { .. })
        ));
        // Unsharing forgets it; the user's file stays.
        assert!(dst.remove(id)?);
        assert_eq!(fs::read(&out)?, edited);
        assert_eq!(dst.used_bytes(), 0);
        Ok(())
    }

    #[test]
    fn a_linked_fetch_resumes_from_its_part_file_after_a_restart(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (tmp, src, dst_dir, dst) = two_stores(u64::MAX)?;
        let data = bytes(5 * CSU, 41);
        let out = tmp.path().join("out.bin");
        let id = linked_fetch(&src, &dst, tmp.path(), "r", &data, &out, |i| i % 2 == 0)?;
        // A killed node: nothing but what is on disk survives.
        std::mem::forget(dst);
        let part = with_suffix(&out, PART_SUFFIX);
        // A chunk half-written at the kill is not taken for verified.
        let file = OpenOptions::new().write(true).open(&part)?;
        file.write_all_at(b"garbage", 2 * CS as u64)?;
        drop(file);
        let dst = Store::open(&dst_dir, u64::MAX)?;
        let mbytes = src.manifest_bytes(id)?.ok_or("missing")?;
        let (_, have) = dst.begin_fetch(id, &mbytes)?;
        assert!(
            !have.contains(&true),
            "verified chunks are known only after a re-hash"
        );
        let have = dst.link(id, &out, false)?.ok_or("missing")?;
        assert_eq!(have, vec![true, false, false, false, true]);
        for i in [1, 2, 3] {
            dst.put_chunk(id, i, &src.read_chunk(id, i)?.ok_or("missing")?)?;
        }
        dst.complete(id)?;
        assert_eq!(fs::read(&out)?, data);

        // An interrupted linked fetch moved to another output keeps its chunks.
        let other = bytes(2 * CSU, 42);
        let first = tmp.path().join("first.bin");
        let id2 = linked_fetch(&src, &dst, tmp.path(), "m", &other, &first, |i| i == 0)?;
        let second = tmp.path().join("second.bin");
        let have = dst.link(id2, &second, false)?.ok_or("missing")?;
        assert_eq!(have, vec![true, false]);
        assert!(!with_suffix(&first, PART_SUFFIX).exists());
        dst.put_chunk(id2, 1, &src.read_chunk(id2, 1)?.ok_or("missing")?)?;
        dst.complete(id2)?;
        assert_eq!(fs::read(&second)?, other);
        Ok(())
    }

    #[test]
    fn linked_content_is_evicted_without_deleting_the_file_and_sharing_converts_it(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (tmp, src, _, dst) = two_stores(2 * CS as u64)?;
        // Outputs under the sources' names, so sharing one gives the same id.
        let outs = tmp.path().join("outs");
        fs::create_dir(&outs)?;
        let (xo, yo) = (outs.join("x"), outs.join("y"));
        let x = linked_fetch(&src, &dst, tmp.path(), "x", &bytes(CSU, 43), &xo, |_| true)?;
        dst.complete(x)?;
        let y = linked_fetch(&src, &dst, tmp.path(), "y", &bytes(CSU, 44), &yo, |_| true)?;
        dst.complete(y)?;
        let z = fetch_into(&src, &dst, tmp.path(), "z", &bytes(CSU, 45));
        assert_eq!(dst.complete(z)?, vec![x]);
        assert!(xo.exists(), "eviction never deletes the user's file");
        assert_eq!(dst.used_bytes(), 2 * CS as u64);

        // An unfinished linked fetch that is unshared loses its part file (ours).
        let wo = tmp.path().join("w.out");
        let w = linked_fetch(&src, &dst, tmp.path(), "w", &bytes(2 * CSU, 46), &wo, |i| {
            i == 0
        })?;
        assert!(with_suffix(&wo, PART_SUFFIX).exists());
        assert!(dst.remove(w)?);
        assert!(!with_suffix(&wo, PART_SUFFIX).exists());

        // Sharing the same file turns the linked content into pinned blocks.
        let (again, _) = dst.import(&yo, CS)?;
        assert_eq!(again, y);
        let info = dst.info(y).ok_or("unknown content")?;
        assert!(info.pinned && info.complete && info.path.is_none());
        fs::remove_file(&yo)?;
        assert!(dst.read_chunk(y, 0)?.is_some());
        Ok(())
    }

    #[test]
    fn a_linked_file_deleted_by_the_user_is_fetched_again() -> Result<(), Box<dyn std::error::Error>>
    {
        let (tmp, src, _, dst) = two_stores(u64::MAX)?;
        let data = bytes(2 * CSU, 48);
        let out = tmp.path().join("gone.bin");
        let id = linked_fetch(&src, &dst, tmp.path(), "g", &data, &out, |_| true)?;
        dst.complete(id)?;
        fs::remove_file(&out)?;
        let mbytes = src.manifest_bytes(id)?.ok_or("missing")?;
        let (_, have) = dst.begin_fetch(id, &mbytes)?;
        assert_eq!(have, vec![false, false]);
        assert!(!dst.info(id).ok_or("unknown content")?.complete);
        assert_eq!(dst.used_bytes(), 0);
        assert_eq!(
            dst.link(id, &out, false)?.ok_or("missing")?,
            vec![false, false]
        );
        for i in 0..2 {
            dst.put_chunk(id, i, &src.read_chunk(id, i)?.ok_or("missing")?)?;
        }
        dst.complete(id)?;
        assert_eq!(fs::read(&out)?, data);
        Ok(())
    }

    #[test]
    fn a_moved_part_file_is_re_hashed_and_a_lost_one_restarts_from_nothing(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (tmp, src, _, dst) = two_stores(u64::MAX)?;
        let data = bytes(3 * CSU, 49);
        let first = tmp.path().join("first.bin");
        let id = linked_fetch(&src, &dst, tmp.path(), "l", &data, &first, |i| i < 2)?;
        // The part file vanishes (another disk, a user's cleanup): nothing it held
        // may count as verified at the new output.
        fs::remove_file(with_suffix(&first, PART_SUFFIX))?;
        let second = tmp.path().join("second.bin");
        assert_eq!(
            dst.link(id, &second, false)?.ok_or("missing")?,
            vec![false; 3]
        );
        assert_eq!(dst.info(id).ok_or("unknown content")?.have_chunks, 0);
        assert_eq!(dst.used_bytes(), 0);
        assert!(matches!(
            dst.complete(id),
            Err(StoreError::Incomplete { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_kill_between_the_rename_and_the_index_finds_the_output_whole(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (tmp, src, dst_dir, dst) = two_stores(u64::MAX)?;
        let data = bytes(2 * CSU + 3, 50);
        let out = tmp.path().join("whole.bin");
        let id = linked_fetch(&src, &dst, tmp.path(), "w", &data, &out, |_| true)?;
        // What complete() does first, then the kill before the index says so.
        fs::rename(with_suffix(&out, PART_SUFFIX), &out)?;
        std::mem::forget(dst);
        let dst = Store::open(&dst_dir, u64::MAX)?;
        assert!(!dst.info(id).ok_or("unknown content")?.complete);
        let mbytes = src.manifest_bytes(id)?.ok_or("missing")?;
        dst.begin_fetch(id, &mbytes)?;
        assert_eq!(dst.link(id, &out, false)?.ok_or("missing")?, vec![true; 3]);
        assert!(dst.complete(id)?.is_empty());
        assert!(dst.info(id).ok_or("unknown content")?.complete);
        assert_eq!(fs::read(&out)?, data);

        // Fetching it again to the same path reads it back: an edit that kept the
        // size is caught, not reported as done.
        let mut edited = data.clone();
        edited[7] ^= 0xff;
        fs::write(&out, &edited)?;
        assert!(matches!(
            dst.export(id, &out, true),
            Err(StoreError::Corrupt { index: 0, .. })
        ));
        assert_eq!(dst.info(id).ok_or("unknown content")?.have_chunks, 2);
        Ok(())
    }

    #[test]
    fn content_partly_held_as_blocks_or_a_directory_is_not_linked(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (tmp, src, _, dst) = two_stores(u64::MAX)?;
        let id = fetch_into(&src, &dst, tmp.path(), "b", &bytes(2 * CSU, 47));
        assert!(dst.link(id, &tmp.path().join("b.out"), false)?.is_none());
        let dir = tmp.path().join("tree");
        put(&dir.join("a"), b"one");
        put(&dir.join("sub/b"), b"two");
        let (d, _) = src.import(&dir, CS)?;
        let mbytes = src.manifest_bytes(d)?.ok_or("missing")?;
        dst.begin_fetch(d, &mbytes)?;
        assert!(dst.link(d, &tmp.path().join("d.out"), false)?.is_none());
        let taken = tmp.path().join("taken");
        put(&taken, b"keep");
        let e = src.import(&tmp.path().join("tree/a"), CS)?.0;
        let ebytes = src.manifest_bytes(e)?.ok_or("missing")?;
        dst.begin_fetch(e, &ebytes)?;
        assert!(matches!(
            dst.link(e, &taken, false),
            Err(StoreError::AlreadyExists(_))
        ));
        assert_eq!(fs::read(&taken)?, b"keep");
        Ok(())
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn file_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        for (i, len) in [0, 100, 3 * CSU + 123, 2 * CSU].into_iter().enumerate() {
            let data = bytes(len, i as u64);
            let src = tmp.path().join(format!("in{i}.bin"));
            put(&src, &data);
            let (id, manifest) = store.import(&src, CS).unwrap();
            assert_eq!(manifest.kind, Kind::File);
            assert_eq!(manifest.chunk_count(), len.div_ceil(CSU));
            let info = store.info(id).unwrap();
            assert!(info.pinned && info.complete);
            assert_eq!(info.have_chunks, info.chunks);
            assert_eq!(info.name, format!("in{i}.bin"));
            let out = tmp.path().join(format!("out{i}.bin"));
            store.export(id, &out, false).unwrap();
            assert_eq!(fs::read(&out).unwrap(), data);
            assert!(!with_suffix(&out, PART_SUFFIX).exists());
        }
    }

    #[test]
    fn directory_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        let src = tmp.path().join("tree");
        let files = [
            ("a.txt", bytes(10, 1)),
            ("sub/b.bin", bytes(2 * CSU + 5, 2)),
            ("sub/deeper/empty", Vec::new()),
            ("sub/deeper/c", bytes(CSU, 3)),
        ];
        for (rel, data) in &files {
            put(&src.join(rel), data);
        }
        std::os::unix::fs::symlink(src.join("a.txt"), src.join("link")).unwrap();
        let (id, manifest) = store.import(&src, CS).unwrap();
        assert_eq!(manifest.kind, Kind::Dir);
        let paths: Vec<_> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["a.txt", "sub/b.bin", "sub/deeper/c", "sub/deeper/empty"]
        );
        let out = tmp.path().join("out");
        store.export(id, &out, false).unwrap();
        for (rel, data) in &files {
            assert_eq!(&fs::read(out.join(rel)).unwrap(), data, "{rel}");
        }
        assert!(!out.join("link").exists());
    }

    #[test]
    fn same_content_twice_gives_same_id() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        let src = tmp.path().join("f");
        put(&src, &bytes(3 * CSU, 9));
        let (a, _) = store.import(&src, CS).unwrap();
        let used = store.used_bytes();
        assert_eq!(used, 3 * CSU as u64);
        let (b, _) = store.import(&src, CS).unwrap();
        assert_eq!(a, b);
        assert_eq!(store.used_bytes(), used);
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.pinned(), vec![a]);
        // A fresh store derives the same id from the same bytes.
        let other = Store::open(&tmp.path().join("other"), u64::MAX).unwrap();
        assert_eq!(other.import(&src, CS).unwrap().0, a);
    }

    #[test]
    fn put_chunk_rejects_wrong_data() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Store::open(&tmp.path().join("src"), u64::MAX).unwrap();
        let dst_dir = tmp.path().join("dst");
        let dst = Store::open(&dst_dir, u64::MAX).unwrap();
        let file = tmp.path().join("f");
        put(&file, &bytes(2 * CSU, 4));
        let (id, _) = src.import(&file, CS).unwrap();
        let mbytes = src.manifest_bytes(id).unwrap().unwrap();
        assert!(matches!(
            dst.begin_fetch(Hash::of(b"other"), &mbytes),
            Err(StoreError::IdMismatch { .. })
        ));
        let (_, have) = dst.begin_fetch(id, &mbytes).unwrap();
        assert_eq!(have, [false, false]);
        assert!(matches!(
            dst.put_chunk(id, 0, &bytes(CSU, 5)),
            Err(StoreError::HashMismatch { index: 0 })
        ));
        assert!(matches!(
            dst.put_chunk(id, 2, &bytes(CSU, 5)),
            Err(StoreError::BadIndex(2))
        ));
        assert_eq!(dst.used_bytes(), 0);
        assert_eq!(block_files(&dst_dir), 0);
        assert_eq!(dst.info(id).unwrap().have_chunks, 0);
    }

    #[test]
    fn fetch_resumes_after_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Store::open(&tmp.path().join("src"), u64::MAX).unwrap();
        let data = bytes(4 * CSU - 7, 6);
        let file = tmp.path().join("f");
        put(&file, &data);
        let (id, _) = src.import(&file, CS).unwrap();
        let mbytes = src.manifest_bytes(id).unwrap().unwrap();
        let dst_dir = tmp.path().join("dst");
        {
            let dst = Store::open(&dst_dir, u64::MAX).unwrap();
            dst.begin_fetch(id, &mbytes).unwrap();
            for i in [0, 2] {
                dst.put_chunk(id, i, &src.read_chunk(id, i).unwrap().unwrap())
                    .unwrap();
            }
        }
        let dst = Store::open(&dst_dir, u64::MAX).unwrap();
        let (_, have) = dst.begin_fetch(id, &mbytes).unwrap();
        assert_eq!(have, [true, false, true, false]);
        assert!(matches!(
            dst.complete(id),
            Err(StoreError::Incomplete {
                missing: 2,
                total: 4,
                ..
            })
        ));
        assert!(dst.read_chunk(id, 1).unwrap().is_none());
        for i in [1, 3] {
            dst.put_chunk(id, i, &src.read_chunk(id, i).unwrap().unwrap())
                .unwrap();
        }
        assert!(dst.complete(id).unwrap().is_empty());
        let info = dst.info(id).unwrap();
        assert!(info.complete && !info.pinned);
        let out = tmp.path().join("out");
        dst.export(id, &out, false).unwrap();
        assert_eq!(fs::read(out).unwrap(), data);
        drop(dst);
        let dst = Store::open(&dst_dir, u64::MAX).unwrap();
        assert_eq!(dst.complete_ids(), vec![id]);
    }

    #[test]
    fn complete_evicts_least_recently_used_unpinned() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Store::open(&tmp.path().join("src"), u64::MAX).unwrap();
        // The quota bounds fetched content; the pinned share does not count.
        let dst = Store::open(&tmp.path().join("dst"), 2 * CS as u64).unwrap();
        let pinned = tmp.path().join("p");
        put(&pinned, &bytes(CSU, 10));
        let (p, _) = dst.import(&pinned, CS).unwrap();
        let x = fetch_into(&src, &dst, tmp.path(), "x", &bytes(CSU, 11));
        assert!(dst.complete(x).unwrap().is_empty());
        let y = fetch_into(&src, &dst, tmp.path(), "y", &bytes(CSU, 12));
        assert!(dst.complete(y).unwrap().is_empty());
        // Serving x makes y the least recently used.
        assert!(dst.read_chunk(x, 0).unwrap().is_some());
        let z = fetch_into(&src, &dst, tmp.path(), "z", &bytes(CSU, 13));
        assert_eq!(dst.complete(z).unwrap(), vec![y]);
        assert!(dst.info(y).is_none());
        assert!(dst.read_chunk(y, 0).unwrap().is_none());
        assert_eq!(dst.used_bytes(), 3 * CS as u64);
        let mut left = dst.complete_ids();
        left.sort();
        let mut want = vec![p, x, z];
        want.sort();
        assert_eq!(left, want);

        // Pinned content is kept even when it alone exceeds the quota, and does not
        // stop fetches that fit; a fetch larger than the quota is refused up front.
        let small = Store::open(&tmp.path().join("small"), CS as u64).unwrap();
        let big = tmp.path().join("big");
        put(&big, &bytes(2 * CSU, 14));
        let (b, _) = small.import(&big, CS).unwrap();
        let mbytes = src.manifest_bytes(z).unwrap().unwrap();
        assert!(small.begin_fetch(z, &mbytes).is_ok());
        let huge = tmp.path().join("huge");
        put(&huge, &bytes(2 * CSU, 15));
        let (h, _) = src.import(&huge, CS).unwrap();
        let hbytes = src.manifest_bytes(h).unwrap().unwrap();
        assert!(matches!(
            small.begin_fetch(h, &hbytes),
            Err(StoreError::QuotaFull { .. })
        ));
        assert_eq!(small.pinned(), vec![b]);
        assert_eq!(small.used_bytes(), 2 * CS as u64);
    }

    #[test]
    fn remove_keeps_shared_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let store = Store::open(&dir, u64::MAX).unwrap();
        let common = bytes(2 * CSU, 20);
        let a_data = [common.clone(), bytes(CSU, 21)].concat();
        let b_data = [common, bytes(100, 22)].concat();
        let (a_path, b_path) = (tmp.path().join("a"), tmp.path().join("b"));
        put(&a_path, &a_data);
        put(&b_path, &b_data);
        let (a, _) = store.import(&a_path, CS).unwrap();
        let (b, _) = store.import(&b_path, CS).unwrap();
        assert_eq!(store.used_bytes(), 3 * CS as u64 + 100);
        assert!(store.remove(a).unwrap());
        assert!(!store.remove(a).unwrap());
        assert_eq!(store.used_bytes(), 2 * CS as u64 + 100);
        assert_eq!(block_files(&dir), 3);
        let out = tmp.path().join("out");
        store.export(b, &out, false).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b_data);
        assert!(store.remove(b).unwrap());
        assert_eq!(store.used_bytes(), 0);
        assert_eq!(block_files(&dir), 0);
        assert!(store.list().is_empty());
    }

    #[test]
    fn read_chunk_is_bounds_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        let data = bytes(CSU + 1, 30);
        let file = tmp.path().join("f");
        put(&file, &data);
        let (id, _) = store.import(&file, CS).unwrap();
        assert_eq!(store.read_chunk(id, 0).unwrap().unwrap(), &data[..CSU]);
        assert_eq!(store.read_chunk(id, 1).unwrap().unwrap(), &data[CSU..]);
        assert!(store.read_chunk(id, 2).unwrap().is_none());
        assert!(store.read_chunk(id, u64::MAX).unwrap().is_none());
        assert!(store.read_chunk(Hash::of(b"x"), 0).unwrap().is_none());
        assert!(store.manifest_bytes(Hash::of(b"x")).unwrap().is_none());
    }

    #[test]
    fn export_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        let file = tmp.path().join("f");
        put(&file, &bytes(500, 40));
        let (id, _) = store.import(&file, CS).unwrap();
        let out = tmp.path().join("out");
        put(&out, b"precious");
        assert!(matches!(
            store.export(id, &out, false),
            Err(StoreError::AlreadyExists(_))
        ));
        assert_eq!(fs::read(&out).unwrap(), b"precious");
        store.export(id, &out, true).unwrap();
        assert_eq!(fs::read(&out).unwrap(), bytes(500, 40));

        // A directory replaces an existing directory only when allowed.
        let tree = tmp.path().join("tree");
        put(&tree.join("x"), b"x");
        let (dir_id, _) = store.import(&tree, CS).unwrap();
        let out_dir = tmp.path().join("out_dir");
        put(&out_dir.join("old"), b"old");
        assert!(store.export(dir_id, &out_dir, false).is_err());
        store.export(dir_id, &out_dir, true).unwrap();
        assert_eq!(fs::read(out_dir.join("x")).unwrap(), b"x");
        assert!(!out_dir.join("old").exists());
        assert!(!with_suffix(&out_dir, OLD_SUFFIX).exists());
    }

    #[test]
    fn export_to_unwritable_place_keeps_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        let data = bytes(2 * CSU, 50);
        let file = tmp.path().join("f");
        put(&file, &data);
        let (id, _) = store.import(&file, CS).unwrap();
        // A path under a regular file cannot be created, even by root.
        let out = file.join("out");
        let err = store.export(id, &out, false).unwrap_err();
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
        assert_eq!(store.used_bytes(), 2 * CS as u64);
        assert!(store.info(id).unwrap().complete);
        let good = tmp.path().join("good");
        store.export(id, &good, false).unwrap();
        assert_eq!(fs::read(good).unwrap(), data);
    }

    #[test]
    fn corrupt_block_fails_export() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        let data = bytes(3 * CSU, 60);
        let file = tmp.path().join("f");
        put(&file, &data);
        let (id, manifest) = store.import(&file, CS).unwrap();
        let victim = store.block_path(&manifest.entries[0].chunks[1]);
        fs::write(&victim, bytes(CSU, 61)).unwrap();
        let out = tmp.path().join("out");
        assert!(matches!(
            store.export(id, &out, false),
            Err(StoreError::Corrupt { index: 1, .. })
        ));
        assert!(!out.exists());
        assert!(!with_suffix(&out, PART_SUFFIX).exists());
        let info = store.info(id).unwrap();
        assert!(!info.complete);
        assert_eq!(info.have_chunks, 2);
        // Sharing the file again repairs it.
        store.import(&file, CS).unwrap();
        store.export(id, &out, false).unwrap();
        assert_eq!(fs::read(out).unwrap(), data);
    }

    #[test]
    fn abandoned_partial_fetches_are_evicted_first() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Store::open(&tmp.path().join("src"), u64::MAX).unwrap();
        let dst = Store::open(&tmp.path().join("dst"), 2 * CS as u64).unwrap();
        // A partial fetch: one of its two chunks arrived, then it was abandoned.
        let part = tmp.path().join("part");
        put(&part, &bytes(2 * CSU, 90));
        let (pid, _) = src.import(&part, CS).unwrap();
        let pbytes = src.manifest_bytes(pid).unwrap().unwrap();
        dst.begin_fetch(pid, &pbytes).unwrap();
        dst.put_chunk(pid, 0, &src.read_chunk(pid, 0).unwrap().unwrap())
            .unwrap();
        let x = fetch_into(&src, &dst, tmp.path(), "x", &bytes(CSU, 91));
        assert!(dst.complete(x).unwrap().is_empty(), "within the quota");
        // A fresh partial is kept even over the quota; an abandoned one goes first.
        let y = fetch_into(&src, &dst, tmp.path(), "y", &bytes(CSU, 92));
        assert_eq!(dst.complete(y).unwrap(), vec![x]);
        if let Some(c) = dst.lock().contents.get_mut(&pid) {
            c.last_used = now_secs() - STALE_PARTIAL_SECS - 1;
        }
        let z = fetch_into(&src, &dst, tmp.path(), "z", &bytes(CSU, 93));
        assert_eq!(dst.complete(z).unwrap(), vec![pid]);
        assert!(dst.info(y).is_some() && dst.info(z).is_some());
    }

    #[test]
    fn a_manifest_cannot_give_known_data_another_length() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        let file = tmp.path().join("f");
        let data = bytes(CSU, 80);
        put(&file, &data);
        let (id, manifest) = store.import(&file, CS).unwrap();
        // A hostile manifest naming our block's hash with a shorter length.
        let hash = manifest.entries[0].chunks[0];
        let hostile = Manifest {
            version: servant_protocol::manifest::MANIFEST_VERSION,
            name: "h".into(),
            kind: Kind::File,
            chunk_size: CS,
            entries: vec![servant_protocol::manifest::Entry {
                path: String::new(),
                size: 10,
                chunks: vec![hash],
            }],
        };
        let bytes_h = hostile.encode();
        assert!(matches!(
            store.begin_fetch(Manifest::id_of(&bytes_h), &bytes_h),
            Err(StoreError::ConflictingChunk { index: 0 })
        ));
        // Chunk data must have the manifest's length as well as its hash.
        let src = Store::open(&tmp.path().join("src"), u64::MAX).unwrap();
        let other = tmp.path().join("g");
        put(&other, &bytes(2 * CSU, 81));
        let (gid, _) = src.import(&other, CS).unwrap();
        let gbytes = src.manifest_bytes(gid).unwrap().unwrap();
        store.begin_fetch(gid, &gbytes).unwrap();
        let mut chunk = src.read_chunk(gid, 0).unwrap().unwrap();
        chunk.push(0);
        assert!(matches!(
            store.put_chunk(gid, 0, &chunk),
            Err(StoreError::HashMismatch { index: 0 })
        ));
        // Our share is untouched.
        assert!(store.info(id).unwrap().complete);
        assert_eq!(store.read_chunk(id, 0).unwrap().unwrap(), data);
    }

    #[test]
    fn open_survives_corrupt_index_and_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let file = tmp.path().join("f");
        put(&file, &bytes(CSU, 70));
        let id = {
            let store = Store::open(&dir, u64::MAX).unwrap();
            store.import(&file, CS).unwrap().0
        };
        fs::write(dir.join(INDEX_FILE), b"{not json").unwrap();
        let bogus = dir.join(MANIFESTS_DIR).join(Hash::of(b"bogus").to_hex());
        fs::write(&bogus, b"garbage").unwrap();
        fs::write(dir.join(TMP_DIR).join("stale"), b"half a block").unwrap();
        let store = Store::open(&dir, u64::MAX).unwrap();
        // The pinned flag went with the index; every block is there, so the content
        // is whole and servable again.
        let info = store.info(id).unwrap();
        assert!(!info.pinned && info.complete);
        assert_eq!(info.have_chunks, 1);
        assert!(bogus.exists(), "unreadable manifests are kept");
        assert!(dir.join(CORRUPT_INDEX_FILE).exists());
        assert_eq!(fs::read_dir(dir.join(TMP_DIR)).unwrap().count(), 0);
        assert_eq!(store.list().len(), 1);
        // All blocks present: completing it needs no network.
        assert!(store.complete(id).unwrap().is_empty());
    }

    #[test]
    fn open_drops_unreferenced_blocks_and_dangling_index_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let file = tmp.path().join("f");
        put(&file, &bytes(CSU, 80));
        let id = {
            let store = Store::open(&dir, u64::MAX).unwrap();
            let id = store.import(&file, CS).unwrap().0;
            let orphan = bytes(100, 81);
            let path = store.block_path(&Hash::of(&orphan));
            put(&path, &orphan);
            id
        };
        fs::remove_file(dir.join(MANIFESTS_DIR).join(id.to_hex())).unwrap();
        let store = Store::open(&dir, u64::MAX).unwrap();
        assert!(store.list().is_empty());
        assert_eq!(store.used_bytes(), 0);
        assert_eq!(block_files(&dir), 0);
    }

    #[test]
    fn concurrent_imports_and_removals_keep_counts_right() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let store = Arc::new(Store::open(&dir, u64::MAX).unwrap());
        let common = bytes(3 * CSU, 90);
        let mut paths = Vec::new();
        for i in 0..4u64 {
            let path = tmp.path().join(format!("f{i}"));
            put(&path, &[common.clone(), bytes(CSU, 91 + i)].concat());
            paths.push(path);
        }
        let threads: Vec<_> = paths
            .iter()
            .cycle()
            .take(12)
            .cloned()
            .map(|path| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let (id, _) = store.import(&path, CS).unwrap();
                    // Racing removals of content that shares blocks with imports.
                    store.remove(id).unwrap();
                    store.import(&path, CS).unwrap().0
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.list().len(), 4);
        assert_eq!(store.used_bytes(), 7 * CS as u64);
        for (i, path) in paths.iter().enumerate() {
            let (id, _) = store.import(path, CS).unwrap();
            let out = tmp.path().join(format!("out{i}"));
            store.export(id, &out, false).unwrap();
            assert_eq!(fs::read(&out).unwrap(), fs::read(path).unwrap());
        }
        for id in store.pinned() {
            store.remove(id).unwrap();
        }
        assert_eq!(store.used_bytes(), 0);
        assert_eq!(block_files(&dir), 0);
    }

    #[test]
    fn damaged_block_is_not_served() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store"), u64::MAX).unwrap();
        let file = tmp.path().join("f");
        put(&file, &bytes(2 * CSU, 100));
        let (id, manifest) = store.import(&file, CS).unwrap();
        fs::write(store.block_path(&manifest.entries[0].chunks[0]), b"short").unwrap();
        assert!(store.read_chunk(id, 0).unwrap().is_none());
        assert!(store.read_chunk(id, 1).unwrap().is_some());
        assert!(store.complete_ids().is_empty());
        assert_eq!(store.used_bytes(), CS as u64);
    }

    #[test]
    fn a_block_rotted_on_disk_is_caught_at_its_first_serve_after_a_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let file = tmp.path().join("f");
        put(&file, &bytes(2 * CSU, 101));
        let (id, manifest) = {
            let store = Store::open(&dir, u64::MAX).unwrap();
            store.import(&file, CS).unwrap()
        };
        // Same size, other bytes: only a hash can tell.
        fs::write(
            Store::open(&dir, u64::MAX)
                .unwrap()
                .block_path(&manifest.entries[0].chunks[0]),
            bytes(CSU, 102),
        )
        .unwrap();
        let store = Store::open(&dir, u64::MAX).unwrap();
        assert!(store.read_chunk(id, 0).unwrap().is_none());
        // A block hashed once is then served without hashing it again.
        assert!(store.read_chunk(id, 1).unwrap().is_some());
        assert!(store.read_chunk(id, 1).unwrap().is_some());
    }

    #[test]
    fn full_disk_message_names_the_chunk_and_path() {
        let err = io_err(
            "writing chunk 3 to /x/blocks/ab/cd",
            io::Error::from(io::ErrorKind::StorageFull),
        );
        assert!(matches!(err, StoreError::DiskFull { .. }));
        assert!(err
            .to_string()
            .starts_with("disk full while writing chunk 3 to /x/blocks/ab/cd"));
    }
}
