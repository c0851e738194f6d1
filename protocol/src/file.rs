//! The file protocol, `/servant/file/1.0.0`: manifests and chunks, one request and one
//! response per stream.
//!
//! Frames are binary: a 4-byte big-endian length, then the payload, whose first byte
//! is its kind. Chunk data travels as raw bytes (no JSON, no base64), and every length
//! is checked against its limit before anything is allocated, so a declared 4 GiB
//! length costs the reader nothing but the rejection.

use crate::manifest::{ContentId, Hash, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES};

/// The protocol name.
pub const PROTOCOL: &str = "/servant/file/1.0.0";
/// Largest request payload (a kind byte, a content id and a chunk index).
pub const MAX_REQUEST_BYTES: usize = 64;
/// Largest response payload: a manifest or a chunk, plus its kind byte.
pub const MAX_RESPONSE_BYTES: usize = {
    let chunk = MAX_CHUNK_SIZE as usize;
    (if MAX_MANIFEST_BYTES > chunk {
        MAX_MANIFEST_BYTES
    } else {
        chunk
    }) + 1
};

const REQ_MANIFEST: u8 = 1;
const REQ_CHUNK: u8 = 2;
const RESP_MANIFEST: u8 = 1;
const RESP_CHUNK: u8 = 2;
const RESP_NOT_FOUND: u8 = 3;
const RESP_BUSY: u8 = 4;
const RESP_BAD_REQUEST: u8 = 5;

/// What a fetcher asks a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The manifest whose hash is this content id.
    Manifest(ContentId),
    /// Chunk `index` (numbered across the whole manifest) of this content.
    Chunk {
        /// The content.
        id: ContentId,
        /// Global chunk index.
        index: u64,
    },
}

/// What a provider answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The manifest's bytes; the fetcher checks their hash against the id it asked for.
    Manifest(Vec<u8>),
    /// The chunk's bytes; the fetcher checks their hash against the manifest.
    Chunk(Vec<u8>),
    /// The provider does not have it (any more).
    NotFound,
    /// Too many requests from this peer in flight or too fast: try later or elsewhere.
    Busy,
    /// The request made no sense (an index past the end).
    BadRequest,
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The declared length is larger than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Declared length.
        len: u64,
        /// Limit for this frame.
        max: usize,
    },
    /// An empty payload or an unknown kind byte.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The payload's length does not fit its kind.
    #[error("frame of kind {kind} has a bad length {len}")]
    Length {
        /// Kind byte.
        kind: u8,
        /// Payload length.
        len: usize,
    },
}

impl Request {
    /// The payload bytes (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(41);
        match self {
            Request::Manifest(id) => {
                out.push(REQ_MANIFEST);
                out.extend_from_slice(&id.0);
            }
            Request::Chunk { id, index } => {
                out.push(REQ_CHUNK);
                out.extend_from_slice(&id.0);
                out.extend_from_slice(&index.to_be_bytes());
            }
        }
        out
    }

    /// Parses a payload.
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        let (&kind, rest) = payload.split_first().ok_or(FrameError::Kind(0))?;
        let bad = || FrameError::Length {
            kind,
            len: payload.len(),
        };
        match kind {
            REQ_MANIFEST => {
                let id: [u8; 32] = rest.try_into().map_err(|_| bad())?;
                Ok(Request::Manifest(Hash(id)))
            }
            REQ_CHUNK => {
                if rest.len() != 40 {
                    return Err(bad());
                }
                let (id, index) = rest.split_at(32);
                let id: [u8; 32] = id.try_into().map_err(|_| bad())?;
                let index: [u8; 8] = index.try_into().map_err(|_| bad())?;
                Ok(Request::Chunk {
                    id: Hash(id),
                    index: u64::from_be_bytes(index),
                })
            }
            other => Err(FrameError::Kind(other)),
        }
    }
}

impl Response {
    /// The kind byte, written before the payload. Kept apart from the data so a chunk
    /// is written straight from its buffer without copying it into a frame.
    pub fn kind(&self) -> u8 {
        match self {
            Response::Manifest(_) => RESP_MANIFEST,
            Response::Chunk(_) => RESP_CHUNK,
            Response::NotFound => RESP_NOT_FOUND,
            Response::Busy => RESP_BUSY,
            Response::BadRequest => RESP_BAD_REQUEST,
        }
    }

    /// The bytes after the kind byte.
    pub fn data(&self) -> &[u8] {
        match self {
            Response::Manifest(d) | Response::Chunk(d) => d,
            _ => &[],
        }
    }

    /// The whole payload (kind byte and data).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.data().len());
        out.push(self.kind());
        out.extend_from_slice(self.data());
        out
    }

    /// Parses a whole payload (kind byte and data).
    pub fn decode(mut payload: Vec<u8>) -> Result<Self, FrameError> {
        if payload.is_empty() {
            return Err(FrameError::Kind(0));
        }
        let kind = payload.remove(0);
        Self::from_parts(kind, payload)
    }

    /// Builds a response from its kind byte and the data read after it; a reader that
    /// reads the kind first fills the data buffer without a copy.
    pub fn from_parts(kind: u8, payload: Vec<u8>) -> Result<Self, FrameError> {
        let len = payload.len();
        let empty = |r: Response| {
            if len == 0 {
                Ok(r)
            } else {
                Err(FrameError::Length { kind, len })
            }
        };
        match kind {
            RESP_MANIFEST if len <= MAX_MANIFEST_BYTES => Ok(Response::Manifest(payload)),
            RESP_CHUNK if len <= MAX_CHUNK_SIZE as usize => Ok(Response::Chunk(payload)),
            RESP_MANIFEST | RESP_CHUNK => Err(FrameError::Length { kind, len }),
            RESP_NOT_FOUND => empty(Response::NotFound),
            RESP_BUSY => empty(Response::Busy),
            RESP_BAD_REQUEST => empty(Response::BadRequest),
            other => Err(FrameError::Kind(other)),
        }
    }
}

/// Checks a declared frame length against a limit before the reader allocates for it.
pub fn check_length(len: u32, max: usize) -> Result<usize, FrameError> {
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let id = Hash::of(b"x");
        for r in [
            Request::Manifest(id),
            Request::Chunk {
                id,
                index: u64::MAX - 1,
            },
        ] {
            let bytes = r.encode();
            assert!(bytes.len() <= MAX_REQUEST_BYTES);
            assert_eq!(Request::decode(&bytes).unwrap(), r);
        }
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::Manifest(b"{}".to_vec()),
            Response::Chunk(vec![7; 1000]),
            Response::Chunk(vec![]),
            Response::NotFound,
            Response::Busy,
            Response::BadRequest,
        ] {
            assert_eq!(Response::decode(r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert_eq!(Request::decode(&[]), Err(FrameError::Kind(0)));
        assert_eq!(Request::decode(&[9; 33]), Err(FrameError::Kind(9)));
        assert!(matches!(
            Request::decode(&[REQ_CHUNK; 40]),
            Err(FrameError::Length { .. })
        ));
        assert!(matches!(
            Request::decode(&[REQ_MANIFEST; 34]),
            Err(FrameError::Length { .. })
        ));
        assert!(matches!(
            Response::decode(vec![RESP_BUSY, 1]),
            Err(FrameError::Length { .. })
        ));
        let mut big = vec![0u8; MAX_CHUNK_SIZE as usize + 2];
        big[0] = RESP_CHUNK;
        assert!(matches!(
            Response::decode(big),
            Err(FrameError::Length { .. })
        ));
        assert!(check_length(u32::MAX, MAX_RESPONSE_BYTES).is_err());
        assert_eq!(check_length(10, MAX_REQUEST_BYTES), Ok(10));
    }
}
