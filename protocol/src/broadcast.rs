//! The broadcast envelope: what travels inside a gossipsub message.
//!
//! It follows the genesis-node format of the seeds (`id`, `title`, message `body`,
//! `time`) and adds the `origin` PeerId. The encoding is JSON, so any libp2p
//! implementation can publish on a Servant topic with a few lines of code:
//!
//! ```json
//! {"id":"<64 hex>","title":"hello","body":"world","time":1763780000000,"origin":"12D3Koo..."}
//! ```
//!
//! `id` is the BLAKE3 hash of the other four fields, so it names the content: two
//! encodings of the same envelope carry the same id, and a forged id is caught by
//! recomputing it. `time` is milliseconds since the Unix epoch.

use serde::{Deserialize, Serialize};

use crate::limits::{
    ENVELOPE_ID_HEX_LEN, MAX_BODY_BYTES, MAX_ENVELOPE_BYTES, MAX_ORIGIN_BYTES, MAX_TITLE_BYTES,
};

/// BLAKE3 key-derivation context for envelope ids; changing the format means a new context.
const ID_CONTEXT: &str = "servant 2026 broadcast envelope v1";

/// A broadcast message as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Content id: lowercase hex of the BLAKE3 hash over the other fields.
    pub id: String,
    /// A short subject line; may be empty.
    pub title: String,
    /// The message text.
    pub body: String,
    /// When the origin published it, in milliseconds since the Unix epoch.
    pub time: u64,
    /// The PeerId of the publisher, as text. The node checks it against the
    /// gossipsub signature, which the protocol crate cannot see.
    pub origin: String,
}

/// Why an envelope was refused. Each variant maps to a metric label through
/// [`EnvelopeError::reason`], so operators can tell spam from clock trouble.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The encoded envelope is larger than [`MAX_ENVELOPE_BYTES`]; it was not parsed.
    #[error("envelope is {len} bytes, at most {max} allowed")]
    TooLarge {
        /// Size of the refused envelope.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a JSON envelope with exactly the expected fields.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// A field is longer than its limit.
    #[error("field `{field}` is {len} bytes, at most {max} allowed")]
    FieldTooLong {
        /// Name of the field.
        field: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The id is not the hash of the content.
    #[error("envelope id does not match its content")]
    IdMismatch,
    /// The envelope is older than the maximum message age.
    #[error("envelope is {age_ms} ms old, at most {max_ms} ms allowed")]
    TooOld {
        /// Its age when checked.
        age_ms: u64,
        /// The configured maximum age.
        max_ms: u64,
    },
    /// The envelope's time is further in the future than clock skew explains.
    #[error("envelope is dated {ahead_ms} ms in the future, at most {max_ms} ms allowed")]
    FromFuture {
        /// How far ahead of the local clock it is.
        ahead_ms: u64,
        /// The tolerated clock skew.
        max_ms: u64,
    },
}

impl EnvelopeError {
    /// A short, fixed label for metrics and logs (never a value chosen by a peer).
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge { .. } => "too_large",
            EnvelopeError::Malformed(_) => "malformed",
            EnvelopeError::FieldTooLong { .. } => "field_too_long",
            EnvelopeError::IdMismatch => "id_mismatch",
            EnvelopeError::TooOld { .. } => "too_old",
            EnvelopeError::FromFuture { .. } => "from_future",
        }
    }
}

impl Envelope {
    /// Builds an envelope and computes its id. Fails if a field is over its limit.
    pub fn new(
        title: impl Into<String>,
        body: impl Into<String>,
        time: u64,
        origin: impl Into<String>,
    ) -> Result<Self, EnvelopeError> {
        let mut envelope = Envelope {
            id: String::new(),
            title: title.into(),
            body: body.into(),
            time,
            origin: origin.into(),
        };
        envelope.check_fields()?;
        envelope.id = envelope.content_id();
        Ok(envelope)
    }

    /// The id this envelope's content hashes to.
    pub fn content_id(&self) -> String {
        let mut hasher = blake3::Hasher::new_derive_key(ID_CONTEXT);
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        for field in [&self.title, &self.body, &self.origin] {
            hasher.update(&(field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
        hasher.update(&self.time.to_le_bytes());
        hasher.finalize().to_hex().to_string()
    }

    /// Encodes to the wire format.
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        let bytes =
            serde_json::to_vec(self).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                len: bytes.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes and checks everything that does not depend on the clock: size,
    /// shape, field limits and the id. The size is checked before any parsing.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                len: bytes.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        let envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        envelope.check_fields()?;
        if envelope.id.len() != ENVELOPE_ID_HEX_LEN || envelope.id != envelope.content_id() {
            return Err(EnvelopeError::IdMismatch);
        }
        Ok(envelope)
    }

    /// Checks the envelope's time against `now_ms`: at most `max_age_ms` old and at
    /// most `max_skew_ms` in the future.
    ///
    /// The age limit is what makes replays harmless: a message replayed after the
    /// duplicate cache forgot it is older than the limit and refused.
    pub fn check_age(
        &self,
        now_ms: u64,
        max_age_ms: u64,
        max_skew_ms: u64,
    ) -> Result<(), EnvelopeError> {
        if self.time > now_ms {
            let ahead_ms = self.time - now_ms;
            if ahead_ms > max_skew_ms {
                return Err(EnvelopeError::FromFuture {
                    ahead_ms,
                    max_ms: max_skew_ms,
                });
            }
            return Ok(());
        }
        let age_ms = now_ms - self.time;
        if age_ms > max_age_ms {
            return Err(EnvelopeError::TooOld {
                age_ms,
                max_ms: max_age_ms,
            });
        }
        Ok(())
    }

    fn check_fields(&self) -> Result<(), EnvelopeError> {
        let limits = [
            ("title", self.title.len(), MAX_TITLE_BYTES),
            ("body", self.body.len(), MAX_BODY_BYTES),
            ("origin", self.origin.len(), MAX_ORIGIN_BYTES),
        ];
        for (field, len, max) in limits {
            if len > max {
                return Err(EnvelopeError::FieldTooLong { field, len, max });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

    fn sample() -> Envelope {
        Envelope::new("#BROADCAST", "Hello world", 1_763_780_000_000, ORIGIN).unwrap()
    }

    #[test]
    fn round_trips() {
        let envelope = sample();
        let bytes = envelope.encode().unwrap();
        assert_eq!(Envelope::decode(&bytes).unwrap(), envelope);
        assert_eq!(envelope.id.len(), ENVELOPE_ID_HEX_LEN);
    }

    #[test]
    fn id_is_a_content_hash() {
        let a = sample();
        let b = sample();
        assert_eq!(a.id, b.id, "same content, same id");
        let c = Envelope::new("#BROADCAST", "Hello world!", a.time, ORIGIN).unwrap();
        assert_ne!(a.id, c.id);
        // Moving a byte between fields changes the id.
        let d = Envelope::new("#BROADCASTH", "ello world", a.time, ORIGIN).unwrap();
        assert_ne!(a.id, d.id);
    }

    #[test]
    fn accepts_other_field_order_and_whitespace() {
        let e = sample();
        let text = format!(
            "{{ \"origin\": \"{}\", \"time\": {}, \"body\": \"{}\", \"title\": \"{}\", \"id\": \"{}\" }}",
            e.origin, e.time, e.body, e.title, e.id
        );
        assert_eq!(Envelope::decode(text.as_bytes()).unwrap(), e);
    }

    #[test]
    fn rejects_forged_id() {
        let mut e = sample();
        e.body = "tampered".into();
        let bytes = serde_json::to_vec(&e).unwrap();
        assert_eq!(Envelope::decode(&bytes), Err(EnvelopeError::IdMismatch));
        e.id = "zz".into();
        let bytes = serde_json::to_vec(&e).unwrap();
        assert_eq!(Envelope::decode(&bytes), Err(EnvelopeError::IdMismatch));
    }

    #[test]
    fn rejects_oversized_before_parsing() {
        let bytes = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::TooLarge { .. })
        ));
    }

    #[test]
    fn rejects_long_fields() {
        let long = "x".repeat(MAX_TITLE_BYTES + 1);
        assert!(matches!(
            Envelope::new(long, "", 0, ORIGIN),
            Err(EnvelopeError::FieldTooLong { field: "title", .. })
        ));
        let long = "x".repeat(MAX_BODY_BYTES + 1);
        assert!(matches!(
            Envelope::new("", long, 0, ORIGIN),
            Err(EnvelopeError::FieldTooLong { field: "body", .. })
        ));
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in [
            &b""[..],
            b"null",
            b"[]",
            b"{}",
            b"{\"id\":1}",
            b"\xff\xfe",
            b"{\"id\":\"\",\"title\":\"\",\"body\":\"\",\"time\":-1,\"origin\":\"\"}",
        ] {
            assert!(
                matches!(Envelope::decode(bad), Err(EnvelopeError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_unknown_and_duplicate_fields() {
        let e = sample();
        let mut value = serde_json::to_value(&e).unwrap();
        value["extra"] = serde_json::json!(1);
        let bytes = serde_json::to_vec(&value).unwrap();
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::Malformed(_))
        ));
        let dup = format!(
            "{{\"id\":\"{}\",\"title\":\"a\",\"title\":\"b\",\"body\":\"\",\"time\":0,\"origin\":\"\"}}",
            e.id
        );
        assert!(matches!(
            Envelope::decode(dup.as_bytes()),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn checks_age_and_skew() {
        let e = sample();
        let t = e.time;
        assert_eq!(e.check_age(t, 1_000, 100), Ok(()));
        assert_eq!(e.check_age(t + 1_000, 1_000, 100), Ok(()));
        assert_eq!(
            e.check_age(t + 1_001, 1_000, 100),
            Err(EnvelopeError::TooOld {
                age_ms: 1_001,
                max_ms: 1_000
            })
        );
        assert_eq!(e.check_age(t - 100, 1_000, 100), Ok(()));
        assert_eq!(
            e.check_age(t - 101, 1_000, 100),
            Err(EnvelopeError::FromFuture {
                ahead_ms: 101,
                max_ms: 100
            })
        );
    }

    #[test]
    fn reasons_are_distinct() {
        let errors = [
            EnvelopeError::TooLarge { len: 0, max: 0 },
            EnvelopeError::Malformed(String::new()),
            EnvelopeError::FieldTooLong {
                field: "x",
                len: 0,
                max: 0,
            },
            EnvelopeError::IdMismatch,
            EnvelopeError::TooOld {
                age_ms: 0,
                max_ms: 0,
            },
            EnvelopeError::FromFuture {
                ahead_ms: 0,
                max_ms: 0,
            },
        ];
        let mut reasons: Vec<_> = errors.iter().map(|e| e.reason()).collect();
        reasons.sort();
        reasons.dedup();
        assert_eq!(reasons.len(), errors.len());
    }
}
