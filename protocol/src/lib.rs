//! Servant's wire types, codecs, limits and validation.
//!
//! This crate is pure: no sockets, no files, no clocks. Everything that depends on
//! "now" takes the current time as an argument, so every rule here can be tested
//! and fuzzed with fixed inputs.

#![deny(missing_docs)]

pub mod broadcast;
pub mod file;
pub mod limits;
pub mod manifest;
pub mod search;
pub mod topic;

pub use broadcast::{Envelope, EnvelopeError};
pub use topic::{validate_topic, TopicError};
