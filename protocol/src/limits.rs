//! Size and time limits shared by every node.
//!
//! They live in the protocol crate, not in the node's config, because a peer that
//! accepts more than another peer sends would split the network: these are part of
//! the wire contract.

/// Largest encoded broadcast envelope, in bytes. Gossipsub's transmit limit is set a
/// little above this, so an oversized envelope is refused before it is parsed.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;

/// Largest title, in bytes of UTF-8.
pub const MAX_TITLE_BYTES: usize = 256;

/// Largest body, in bytes of UTF-8. Leaves room within [`MAX_ENVELOPE_BYTES`] for
/// the JSON framing and the other fields, even when every byte needs escaping
/// (a control character escapes to six bytes, so the worst case is bounded separately
/// by [`MAX_ENVELOPE_BYTES`]).
pub const MAX_BODY_BYTES: usize = 48 * 1024;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 128;

/// Length of an envelope id in hex characters (a BLAKE3 hash, 32 bytes).
pub const ENVELOPE_ID_HEX_LEN: usize = 64;

/// Longest textual PeerId we accept in an envelope's `origin`. An ed25519 PeerId is
/// 52 characters in base58; this leaves room for other key types.
pub const MAX_ORIGIN_BYTES: usize = 128;
