//! The search protocol, `/servant/search/1.0.0`: the seeds' query with a time-to-live
//! and its query hits.
//!
//! A query floods outwards: each node answers from its own shares and forwards the
//! query to its other peers with the time-to-live lowered by one, once per query id.
//! Request-response carries one response per request, so hits do not ride on
//! responses: they travel back as requests of their own, hop by hop along the path
//! the query came, and reach the asker as soon as they are found. Every message is a
//! small JSON object with bounded fields.

use serde::{Deserialize, Serialize};

use crate::manifest::{ContentId, Kind};

/// The protocol name.
pub const PROTOCOL: &str = "/servant/search/1.0.0";
/// Largest encoded message in either direction.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Highest time-to-live a query may carry; higher ones are lowered to this.
pub const MAX_TTL: u8 = 6;
/// Longest search term, in bytes.
pub const MAX_TERM_BYTES: usize = 128;
/// Most hits in one message.
pub const MAX_HITS_PER_MESSAGE: usize = 32;
/// Longest name in a hit, in bytes.
pub const MAX_HIT_NAME_BYTES: usize = 255;
/// Most addresses of a provider in a hit.
pub const MAX_HIT_ADDRS: usize = 8;
/// Longest address or PeerId string in a hit.
pub const MAX_HIT_FIELD_BYTES: usize = 256;
/// Length of a query id in hex characters (16 random bytes).
pub const QUERY_ID_HEX_LEN: usize = 32;

/// One piece of content that matched a query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hit {
    /// The content id to fetch.
    pub id: ContentId,
    /// The content's name.
    pub name: String,
    /// Its total size in bytes.
    pub size: u64,
    /// A file or a directory.
    pub kind: Kind,
    /// The PeerId of the node that has it.
    pub provider: String,
    /// Addresses at which that node may be reached.
    pub addrs: Vec<String>,
}

/// A search message, sent as a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Message {
    /// A query travelling outwards.
    Query {
        /// Random id, 32 hex characters, used to drop a query seen before.
        id: String,
        /// What to look for (case-insensitive, in content names).
        term: String,
        /// Hops this query may travel, the one to the receiver included: the
        /// receiver forwards it only if this is above 1 (with one less).
        ttl: u8,
    },
    /// Hits travelling back towards the asker.
    Hits {
        /// The query they answer.
        id: String,
        /// What matched.
        hits: Vec<Hit>,
    },
}

/// The receiver's answer to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ack {
    /// Taken.
    Ok,
    /// A query seen before; not answered again.
    Duplicate,
    /// Too many queries from this peer: dropped.
    RateLimited,
    /// Hits for a query this node does not know (expired or never seen).
    UnknownQuery,
}

/// Why a search message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SearchError {
    /// Over [`MAX_MESSAGE_BYTES`].
    #[error("search message of {0} bytes is too large")]
    TooLarge(usize),
    /// Not the JSON of a message.
    #[error("malformed search message: {0}")]
    Malformed(String),
    /// A field past its limit or in a bad form.
    #[error("search message field {0} is invalid")]
    Field(&'static str),
}

impl SearchError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SearchError::TooLarge(_) => "too_large",
            SearchError::Malformed(_) => "malformed",
            SearchError::Field(_) => "field",
        }
    }
}

impl Message {
    /// Encodes a message.
    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and validates a message.
    pub fn decode(bytes: &[u8]) -> Result<Self, SearchError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(SearchError::TooLarge(bytes.len()));
        }
        let message: Message =
            serde_json::from_slice(bytes).map_err(|e| SearchError::Malformed(e.to_string()))?;
        message.validate()?;
        Ok(message)
    }

    /// Checks every field's limits.
    pub fn validate(&self) -> Result<(), SearchError> {
        match self {
            Message::Query { id, term, .. } => {
                check_query_id(id)?;
                if term.trim().is_empty() || term.len() > MAX_TERM_BYTES {
                    return Err(SearchError::Field("term"));
                }
            }
            Message::Hits { id, hits } => {
                check_query_id(id)?;
                if hits.len() > MAX_HITS_PER_MESSAGE {
                    return Err(SearchError::Field("hits"));
                }
                for hit in hits {
                    if hit.name.len() > MAX_HIT_NAME_BYTES {
                        return Err(SearchError::Field("name"));
                    }
                    if hit.provider.is_empty() || hit.provider.len() > MAX_HIT_FIELD_BYTES {
                        return Err(SearchError::Field("provider"));
                    }
                    if hit.addrs.len() > MAX_HIT_ADDRS
                        || hit.addrs.iter().any(|a| a.len() > MAX_HIT_FIELD_BYTES)
                    {
                        return Err(SearchError::Field("addrs"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn check_query_id(id: &str) -> Result<(), SearchError> {
    if id.len() != QUERY_ID_HEX_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SearchError::Field("id"));
    }
    Ok(())
}

/// Whether a content name matches a search term: case-insensitive substring, or the
/// exact content id.
pub fn matches(term: &str, name: &str, id: &ContentId) -> bool {
    let term = term.trim().to_lowercase();
    name.to_lowercase().contains(&term) || id.to_hex() == term
}

/// Encodes an ack.
pub fn encode_ack(ack: Ack) -> Vec<u8> {
    serde_json::to_vec(&ack).unwrap_or_default()
}

/// Decodes an ack.
pub fn decode_ack(bytes: &[u8]) -> Result<Ack, SearchError> {
    if bytes.len() > 64 {
        return Err(SearchError::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| SearchError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Hash;

    fn qid() -> String {
        "0123456789abcdef0123456789abcdef".into()
    }

    #[test]
    fn round_trip() {
        let q = Message::Query {
            id: qid(),
            term: "Report".into(),
            ttl: 3,
        };
        assert_eq!(Message::decode(&q.encode()).unwrap(), q);
        let h = Message::Hits {
            id: qid(),
            hits: vec![Hit {
                id: Hash::of(b"m"),
                name: "report.pdf".into(),
                size: 10,
                kind: Kind::File,
                provider: "12D3KooW".into(),
                addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            }],
        };
        assert_eq!(Message::decode(&h.encode()).unwrap(), h);
        for ack in [Ack::Ok, Ack::Duplicate, Ack::RateLimited, Ack::UnknownQuery] {
            assert_eq!(decode_ack(&encode_ack(ack)).unwrap(), ack);
        }
    }

    #[test]
    fn refuses_bad_fields() {
        let bad_id = Message::Query {
            id: "xyz".into(),
            term: "a".into(),
            ttl: 1,
        };
        assert_eq!(
            Message::decode(&bad_id.encode()),
            Err(SearchError::Field("id"))
        );
        let long = Message::Query {
            id: qid(),
            term: "a".repeat(MAX_TERM_BYTES + 1),
            ttl: 1,
        };
        assert_eq!(
            Message::decode(&long.encode()),
            Err(SearchError::Field("term"))
        );
        assert!(matches!(
            Message::decode(b"{\"type\":\"query\"}"),
            Err(SearchError::Malformed(_))
        ));
        assert!(matches!(
            Message::decode(&vec![b'['; MAX_MESSAGE_BYTES + 1]),
            Err(SearchError::TooLarge(_))
        ));
    }

    #[test]
    fn matching_is_case_insensitive() {
        let id = Hash::of(b"m");
        assert!(matches("REP", "annual-report.pdf", &id));
        assert!(!matches("zzz", "annual-report.pdf", &id));
        assert!(matches(&id.to_hex(), "x", &id));
    }
}
