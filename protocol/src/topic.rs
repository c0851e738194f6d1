//! Topic names.

use crate::limits::MAX_TOPIC_BYTES;

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The name is empty.
    #[error("topic name is empty")]
    Empty,
    /// The name is longer than [`MAX_TOPIC_BYTES`].
    #[error("topic name is {len} bytes, at most {max} allowed")]
    TooLong {
        /// Length of the refused name.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name holds a character outside printable ASCII, or whitespace.
    #[error("topic name may hold printable ASCII without spaces only")]
    BadCharacter,
}

/// Checks a topic name: 1 to [`MAX_TOPIC_BYTES`] bytes of printable ASCII, no spaces.
///
/// Topic names end up in metric labels, log lines and URLs; keeping them to a
/// plain alphabet keeps all three safe without escaping.
pub fn validate_topic(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong {
            len: name.len(),
            max: MAX_TOPIC_BYTES,
        });
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TopicError::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        assert_eq!(validate_topic("chat"), Ok(()));
        assert_eq!(validate_topic("servant/news-1.0"), Ok(()));
        assert_eq!(validate_topic(&"a".repeat(MAX_TOPIC_BYTES)), Ok(()));
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert!(matches!(
            validate_topic(&"a".repeat(MAX_TOPIC_BYTES + 1)),
            Err(TopicError::TooLong { .. })
        ));
        assert_eq!(validate_topic("a b"), Err(TopicError::BadCharacter));
        assert_eq!(validate_topic("tab\t"), Err(TopicError::BadCharacter));
        assert_eq!(validate_topic("é"), Err(TopicError::BadCharacter));
    }
}
