//! Servant: a production peer-to-peer node on rust-libp2p.
//!
//! The library holds everything; the `servant` binary only parses the command line
//! ([`cli`]) and calls [`Node::start`]. Integration tests and benchmarks start nodes
//! the same way, in process or as processes.
//!
//! A map of the modules, in the order a request travels:
//! [`cli`] → [`api`] (HTTP) → [`client`] (typed commands) → [`event_loop`] (owns the
//! Swarm) → [`behaviour`] (the protocols) with [`broadcast`], [`peer_manager`],
//! [`deny`] and [`known_peers`] deciding what happens; [`config`], [`identity`],
//! [`datadir`], [`metrics`] and [`logging`] around them.

#![deny(missing_docs)]

pub mod addr;
pub mod allocator;
pub mod api;
// The NetworkBehaviour derive generates an event enum without doc comments.
#[allow(missing_docs)]
pub mod behaviour;
pub mod broadcast;
pub mod chunk_pool;
pub mod cli;
mod cli_files;
pub mod client;
pub mod clock;
pub mod codecs;
pub mod config;
pub mod datadir;
pub mod deny;
pub mod doctor;
pub mod duplicates;
pub mod error_chain;
pub mod event_loop;
pub mod fetch;
pub mod files;
pub mod flat_protocols;
pub mod gossip_budget;
pub mod http_server;
pub mod identity;
pub mod ip_limits;
pub mod keep_alive;
pub mod known_peers;
mod linked;
pub mod log_limit;
pub mod logging;
pub mod metrics;
pub mod negotiation;
pub mod node;
pub mod part_file;
pub mod peer_manager;
pub mod provider_store;
pub mod reach;
pub mod refusals;
pub mod relay_throttle;
pub mod relayed_hold;
pub mod relays;
pub mod restarts;
pub mod role;
pub mod search;
pub mod slow_peers;
pub mod store;
pub mod stream_count;
pub mod streams;
pub mod subscription_cap;
pub mod swarm;
#[cfg(test)]
mod test_swarm;
pub mod token_bucket;
pub mod traversal;
pub mod upnp;
pub mod wrapped;

pub use client::Client;
pub use config::Config;
pub use node::Node;

/// This build's version, as in `servant/<version>`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
