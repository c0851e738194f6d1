//! An error's chain of causes, including the payload an `io::Error` carries.
//!
//! libp2p hands most failures over as `io::Error`s wrapping its own error types, and
//! an `io::Error`'s `source()` skips its payload (it returns the payload's source), so
//! a walk by `source()` alone never sees the error that says what happened.

use std::{error::Error, io};

/// `error` and every error beneath it, outermost first.
pub fn causes<'a>(error: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
    let mut all = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        all.push(e);
        if let Some(payload) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            // The io::Error's own `source()` is the payload's, which this call walks.
            all.extend(causes(payload));
            break;
        }
        next = e.source();
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("deepest")]
    struct Deepest;

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] Deepest);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] io::Error);

    #[test]
    fn the_payload_of_an_io_error_is_among_the_causes() {
        let error = Outer(io::Error::other(Inner(Deepest)));
        let found = causes(&error);
        assert!(found.iter().any(|e| e.downcast_ref::<Inner>().is_some()));
        assert!(found
            .iter()
            .any(|e| e.downcast_ref::<io::Error>().is_some()));
        assert!(
            found[0].downcast_ref::<Outer>().is_some(),
            "outermost first"
        );
        // Outer, the io::Error, Inner, Deepest: each once (the io::Error's `source()`
        // leads to Deepest again).
        assert_eq!(found.len(), 4, "{found:?}");
    }
}
