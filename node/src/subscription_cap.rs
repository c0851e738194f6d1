//! Caps on the topics gossipsub remembers for each remote peer.
//!
//! Gossipsub keeps, per connected peer, the set of topics that peer says it
//! subscribes to, whether or not this node joins them. With libp2p's default filter
//! that set has no bound: one peer sending SUBSCRIBEs for random topic names grows it
//! (and the topic-to-peers map beside it) for as long as it likes. libp2p's
//! `MaxCountSubscriptionFilter` bounds both the set and the subscriptions one RPC
//! may carry; an RPC that would pass either bound is ignored whole (gossipsub logs
//! it, and the node's log limiter keeps a flood of those lines bounded).
//!
//! libp2p 0.57 does not export the subscription type a filter of our own would have
//! to name, so the filter is libp2p's, configured here.

use libp2p::gossipsub::{AllowAllSubscriptionFilter, MaxCountSubscriptionFilter};

/// Topics one remote peer may be remembered as subscribing to. A Servant node joins
/// at most [`crate::broadcast::MAX_TOPICS`]; twice that leaves room for other libp2p
/// peers that join topics of their own.
pub const MAX_TOPICS_PER_PEER: usize = 2 * crate::broadcast::MAX_TOPICS;

/// Subscription changes one RPC may carry.
pub const MAX_SUBSCRIPTIONS_PER_RPC: usize = MAX_TOPICS_PER_PEER;

/// The filter gossipsub runs every remote peer's subscriptions through.
pub type SubscriptionCap = MaxCountSubscriptionFilter<AllowAllSubscriptionFilter>;

/// The filter with Servant's caps.
pub fn subscription_cap() -> SubscriptionCap {
    MaxCountSubscriptionFilter {
        filter: AllowAllSubscriptionFilter {},
        max_subscribed_topics: MAX_TOPICS_PER_PEER,
        max_subscriptions_per_request: MAX_SUBSCRIPTIONS_PER_RPC,
    }
}
