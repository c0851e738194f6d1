//! Content addressing: chunk hashes, manifests and content ids.
//!
//! Shared content is cut into fixed-size chunks, each named by its BLAKE3 hash. A
//! manifest lists the content's name, its chunk size and, per file, the file's size and
//! chunk hashes; a directory is a list of such files under relative paths. The content
//! id is the BLAKE3 hash of the manifest's exact bytes, so a fetcher that asked for an
//! id can check the manifest it received, and through it every chunk, without trusting
//! whoever served them.
//!
//! Chunks are numbered across the whole manifest: file 0's chunks first, then file 1's,
//! and so on. A chunk never spans two files, so every chunk maps to one file and offset.

use std::{fmt, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

/// The manifest format this code writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Chunk size of new shares unless configured otherwise.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Smallest chunk size a manifest may declare: smaller ones make manifests huge.
pub const MIN_CHUNK_SIZE: u32 = 16 * 1024;
/// Largest chunk size a manifest may declare: bounds every chunk response.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Largest encoded manifest. At 1 MiB chunks this describes well over 100 GiB.
pub const MAX_MANIFEST_BYTES: usize = 8 * 1024 * 1024;
/// Most files in one directory manifest.
pub const MAX_ENTRIES: usize = 100_000;
/// Longest name or relative path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Deepest relative path, in components.
pub const MAX_PATH_DEPTH: usize = 64;

/// A 32-byte BLAKE3 hash, written as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The BLAKE3 hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// The hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

/// Why a hash or content id could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected 64 hex characters (a BLAKE3 hash), got {0:?}")]
pub struct HashParseError(pub String);

impl FromStr for Hash {
    type Err = HashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let short: String = s.chars().take(80).collect();
        if s.len() != 64 {
            return Err(HashParseError(short));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| HashParseError(short))?;
        Ok(Hash(out))
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A content id: the hash of a manifest's bytes. Also the Kademlia provider key.
pub type ContentId = Hash;

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One file: exactly one entry, with an empty path.
    File,
    /// A directory: entries under relative paths (possibly none).
    Dir,
}

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Relative path with `/` separators; empty for a single-file manifest.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Hashes of the file's chunks, in order.
    pub chunks: Vec<Hash>,
}

/// A manifest, as shared and as fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version, [`MANIFEST_VERSION`].
    pub version: u32,
    /// The shared file's or directory's name, as the sharer called it.
    pub name: String,
    /// A file or a directory.
    pub kind: Kind,
    /// Bytes per chunk (the last chunk of each file may be shorter).
    pub chunk_size: u32,
    /// The files.
    pub entries: Vec<Entry>,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    TooLarge(usize),
    /// Not the JSON of a manifest.
    #[error("manifest is not valid: {0}")]
    Malformed(String),
    /// A version this code does not know.
    #[error("manifest version {0} is not supported (this node reads {MANIFEST_VERSION})")]
    Version(u32),
    /// Chunk size outside the allowed range.
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
    /// More entries than [`MAX_ENTRIES`], or a file manifest without exactly one.
    #[error("manifest has {0} entries, which its kind does not allow")]
    Entries(usize),
    /// An entry's chunk list does not match its size.
    #[error("entry {index} has {got} chunks for {size} bytes (expected {expected})")]
    ChunkCount {
        /// Entry index.
        index: usize,
        /// Declared size.
        size: u64,
        /// Chunks listed.
        got: usize,
        /// Chunks the size needs.
        expected: u64,
    },
    /// A name or path that is empty, too long or too deep.
    #[error("entry path {0:?} is not allowed")]
    Path(String),
    /// Two entries that land on the same path (after sanitizing), or a file that is
    /// also another entry's directory.
    #[error("entry path {0:?} collides with another entry")]
    Collision(String),
    /// The sizes add up past what a u64 holds.
    #[error("total size overflows")]
    Overflow,
}

/// Where a chunk lives: its file, offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Index into [`Manifest::entries`].
    pub entry: usize,
    /// Byte offset within the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Expected BLAKE3 hash.
    pub hash: Hash,
}

impl Manifest {
    /// Encodes the manifest; its content id is the hash of these bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain structs of strings, numbers and hashes cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and validates a manifest from bytes whose hash the caller checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The content id of these bytes.
    pub fn id_of(bytes: &[u8]) -> ContentId {
        Hash::of(bytes)
    }

    /// Checks every structural rule: version, chunk size, chunk counts, paths.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.version != MANIFEST_VERSION {
            return Err(ManifestError::Version(self.version));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(ManifestError::ChunkSize(self.chunk_size));
        }
        if sanitize_component(&self.name).is_none() || self.name.len() > MAX_PATH_BYTES {
            return Err(ManifestError::Path(self.name.clone()));
        }
        match self.kind {
            Kind::File if self.entries.len() != 1 => {
                return Err(ManifestError::Entries(self.entries.len()))
            }
            Kind::File if !self.entries[0].path.is_empty() => {
                return Err(ManifestError::Path(self.entries[0].path.clone()))
            }
            Kind::Dir if self.entries.len() > MAX_ENTRIES => {
                return Err(ManifestError::Entries(self.entries.len()))
            }
            _ => {}
        }
        let mut total: u64 = 0;
        let mut files = std::collections::HashSet::new();
        let mut dirs = std::collections::HashSet::new();
        for (index, entry) in self.entries.iter().enumerate() {
            let expected = entry.size.div_ceil(u64::from(self.chunk_size));
            if entry.chunks.len() as u64 != expected {
                return Err(ManifestError::ChunkCount {
                    index,
                    size: entry.size,
                    got: entry.chunks.len(),
                    expected,
                });
            }
            total = total
                .checked_add(entry.size)
                .ok_or(ManifestError::Overflow)?;
            if self.kind == Kind::Dir {
                let path = sanitize_path(&entry.path)
                    .ok_or_else(|| ManifestError::Path(entry.path.clone()))?;
                let key = path.to_string_lossy().into_owned();
                // A file may not sit where another entry needs a directory.
                let mut prefix = PathBuf::new();
                let components: Vec<_> = path.components().collect();
                for component in &components[..components.len().saturating_sub(1)] {
                    prefix.push(component);
                    let p = prefix.to_string_lossy().into_owned();
                    if files.contains(&p) {
                        return Err(ManifestError::Collision(entry.path.clone()));
                    }
                    dirs.insert(p);
                }
                if dirs.contains(&key) || !files.insert(key) {
                    return Err(ManifestError::Collision(entry.path.clone()));
                }
            }
        }
        Ok(())
    }

    /// Total size of every file.
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Number of chunks across every file.
    pub fn chunk_count(&self) -> usize {
        self.entries.iter().map(|e| e.chunks.len()).sum()
    }

    /// Every chunk in order, with its file, offset, length and hash.
    pub fn chunks(&self) -> impl Iterator<Item = ChunkRef> + '_ {
        let chunk_size = u64::from(self.chunk_size);
        self.entries.iter().enumerate().flat_map(move |(entry, e)| {
            e.chunks.iter().enumerate().map(move |(i, hash)| {
                let offset = i as u64 * chunk_size;
                let len = (e.size - offset).min(chunk_size) as u32;
                ChunkRef {
                    entry,
                    offset,
                    len,
                    hash: *hash,
                }
            })
        })
    }

    /// The chunk with this global index, if there is one.
    pub fn chunk(&self, index: u64) -> Option<ChunkRef> {
        let chunk_size = u64::from(self.chunk_size);
        let mut first = 0u64;
        for (entry, e) in self.entries.iter().enumerate() {
            let n = e.chunks.len() as u64;
            if index < first + n {
                let i = index - first;
                let offset = i * chunk_size;
                return Some(ChunkRef {
                    entry,
                    offset,
                    len: (e.size - offset).min(chunk_size) as u32,
                    hash: e.chunks[i as usize],
                });
            }
            first += n;
        }
        None
    }

    /// The path, relative to the output location, where entry `index` is written:
    /// nothing for a single file (it is the output itself), the sanitized relative
    /// path for a directory's file.
    pub fn entry_path(&self, index: usize) -> Option<PathBuf> {
        let entry = self.entries.get(index)?;
        match self.kind {
            Kind::File => Some(PathBuf::new()),
            Kind::Dir => sanitize_path(&entry.path),
        }
    }

    /// The name to save under when the user gave no output path: the sharer's name,
    /// sanitized to one plain component.
    pub fn safe_name(&self) -> String {
        sanitize_component(&self.name).unwrap_or_else(|| "download".to_string())
    }
}

/// Makes one path component safe: separators, NUL and control characters become
/// `_`; `.`, `..` and empty names are refused.
pub fn sanitize_component(name: &str) -> Option<String> {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." || cleaned.len() > 255 {
        return None;
    }
    Some(cleaned)
}

/// Makes a remote relative path safe to join under a local directory: split on `/`,
/// each component sanitized; absolute paths, `..` and empty components are refused,
/// so the result never leaves the directory it is joined to.
pub fn sanitize_path(path: &str) -> Option<PathBuf> {
    if path.is_empty() || path.len() > MAX_PATH_BYTES || path.starts_with('/') {
        return None;
    }
    let mut out = PathBuf::new();
    let mut depth = 0;
    for part in path.split('/') {
        out.push(sanitize_component(part)?);
        depth += 1;
    }
    if depth > MAX_PATH_DEPTH {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> Manifest {
        let chunk_size = MIN_CHUNK_SIZE;
        let n = size.div_ceil(u64::from(chunk_size));
        Manifest {
            version: MANIFEST_VERSION,
            name: "f.bin".into(),
            kind: Kind::File,
            chunk_size,
            entries: vec![Entry {
                path: String::new(),
                size,
                chunks: (0..n).map(|i| Hash::of(&i.to_le_bytes())).collect(),
            }],
        }
    }

    #[test]
    fn round_trip_and_id() {
        let m = file(100_000);
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(Manifest::id_of(&bytes), Hash::of(&bytes));
        assert_eq!(m.chunk_count(), 7);
        let last = m.chunk(6).unwrap();
        assert_eq!(last.offset, 6 * 16384);
        assert_eq!(last.len as u64, 100_000 - 6 * 16384);
        assert!(m.chunk(7).is_none());
        assert_eq!(m.chunks().collect::<Vec<_>>()[6], last);
    }

    #[test]
    fn empty_file_has_no_chunks() {
        let m = file(0);
        assert_eq!(m.chunk_count(), 0);
        m.validate().unwrap();
    }

    #[test]
    fn rejects_mismatched_chunk_count() {
        let mut m = file(100_000);
        m.entries[0].chunks.pop();
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunkCount { .. })
        ));
    }

    #[test]
    fn rejects_bad_chunk_size_and_version() {
        let mut m = file(10);
        m.chunk_size = 1;
        assert_eq!(m.validate(), Err(ManifestError::ChunkSize(1)));
        let mut m = file(10);
        m.version = 2;
        assert_eq!(m.validate(), Err(ManifestError::Version(2)));
    }

    #[test]
    fn unknown_fields_and_garbage_are_malformed() {
        assert!(matches!(
            Manifest::decode(b"{\"version\":1,\"x\":2}"),
            Err(ManifestError::Malformed(_))
        ));
        assert!(matches!(
            Manifest::decode(&[0xff; 10]),
            Err(ManifestError::Malformed(_))
        ));
        assert!(matches!(
            Manifest::decode(&vec![b' '; MAX_MANIFEST_BYTES + 1]),
            Err(ManifestError::TooLarge(_))
        ));
    }

    #[test]
    fn hostile_paths_never_escape() {
        assert_eq!(sanitize_path("../etc/passwd"), None);
        assert_eq!(sanitize_path("/etc/passwd"), None);
        assert_eq!(sanitize_path("a/../../b"), None);
        assert_eq!(sanitize_path("a//b"), None);
        assert_eq!(sanitize_path("a\\..\\b"), Some(PathBuf::from("a_.._b")));
        assert_eq!(sanitize_path("a/b\0c"), Some(PathBuf::from("a/b_c")));
        assert_eq!(sanitize_component(".."), None);
        assert_eq!(sanitize_component("x/y").as_deref(), Some("x_y"));
        let deep = vec!["d"; MAX_PATH_DEPTH + 1].join("/");
        assert_eq!(sanitize_path(&deep), None);
    }

    #[test]
    fn directory_collisions_are_refused() {
        let entry = |path: &str| Entry {
            path: path.into(),
            size: 0,
            chunks: vec![],
        };
        let dir = |entries| Manifest {
            version: MANIFEST_VERSION,
            name: "d".into(),
            kind: Kind::Dir,
            chunk_size: MIN_CHUNK_SIZE,
            entries,
        };
        dir(vec![entry("a/b"), entry("a/c"), entry("b")])
            .validate()
            .unwrap();
        assert!(matches!(
            dir(vec![entry("a"), entry("a/b")]).validate(),
            Err(ManifestError::Collision(_))
        ));
        assert!(matches!(
            dir(vec![entry("a/b"), entry("a")]).validate(),
            Err(ManifestError::Collision(_))
        ));
        assert!(matches!(
            dir(vec![entry("x\\y"), entry("x/y"), entry("x_y")]).validate(),
            Err(ManifestError::Collision(_))
        ));
        assert!(matches!(
            dir(vec![entry("../x")]).validate(),
            Err(ManifestError::Path(_))
        ));
    }

    #[test]
    fn hash_parses_only_64_hex() {
        let h = Hash::of(b"x");
        assert_eq!(h.to_hex().parse::<Hash>().unwrap(), h);
        assert!("abc".parse::<Hash>().is_err());
        assert!("zz".repeat(32).parse::<Hash>().is_err());
    }
}
