//! Broadcast on gossipsub: joined topics, validation of what arrives, duplicate
//! suppression beyond gossipsub's own cache, and fan-out to local subscribers.
//!
//! Gossipsub hands every message to [`Broadcast::validate`] before forwarding it
//! (`validate_messages`), so a message that fails here is neither delivered nor
//! forwarded, and a structurally bad one costs its sender score.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use libp2p::{
    gossipsub::{self, MessageAcceptance},
    PeerId,
};
use serde::{Deserialize, Serialize};
use servant_protocol::{Envelope, EnvelopeError};
use tokio::sync::broadcast;

use crate::clock::unix_ms;

/// Most topics a node joins at once; bounds gossipsub state and metric labels.
pub const MAX_TOPICS: usize = 64;
/// Messages buffered per topic for slow local subscribers; a subscriber that falls
/// further behind is told how many it missed.
pub const SUBSCRIBER_BUFFER: usize = 256;
/// Most envelope ids remembered for duplicate suppression.
pub const SEEN_CAPACITY: usize = 100_000;
/// A topic no local subscriber listens to any more is left after this long (unless
/// the config pins it), so a subscriber that reconnects keeps its mesh.
pub const UNSUBSCRIBE_GRACE: Duration = Duration::from_secs(10);

/// A broadcast as delivered to a local subscriber (one JSON line of `servant subscribe`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The topic it arrived on.
    pub topic: String,
    /// The envelope's fields: id, title, body, time, origin.
    #[serde(flatten)]
    pub envelope: Envelope,
    /// The peer that forwarded it to this node; absent for local publications.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from: Option<String>,
    /// When it arrived here, in milliseconds since the Unix epoch.
    pub received_at: u64,
}

/// Why a message was refused, with what gossipsub should do about its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// A fixed label for metrics and logs.
    pub reason: &'static str,
    /// `Reject` penalizes the forwarder; `Ignore` only drops the message.
    pub acceptance: MessageAcceptance,
    /// Details for the debug log.
    pub detail: String,
}

/// Why a local publish or subscribe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BroadcastError {
    /// The topic name is not valid.
    #[error("invalid topic: {0}")]
    Topic(#[from] servant_protocol::TopicError),
    /// The message is not valid (a field too long, say).
    #[error("invalid message: {0}")]
    Envelope(#[from] EnvelopeError),
    /// No connected peer subscribes to the topic, so the message went nowhere.
    #[error("no connected peer subscribes to topic `{0}` yet; the message was not sent")]
    NoPeers(String),
    /// The node already joined [`MAX_TOPICS`] topics.
    #[error("this node already joined {MAX_TOPICS} topics")]
    TooManyTopics,
    /// The same message was just published (same title, body and millisecond).
    #[error("an identical message was just published")]
    Duplicate,
    /// Gossipsub refused the message.
    #[error("gossipsub refused the message: {0}")]
    Gossipsub(String),
}

struct Topic {
    /// Joined through the config: never left for lack of subscribers.
    pinned: bool,
    sender: broadcast::Sender<Arc<Delivery>>,
    /// Since when no local subscriber listens, if none does.
    idle_since: Option<Instant>,
}

/// Duplicate suppression keyed by envelope id, bounded in count and in time.
///
/// Gossipsub's own cache keys by message id (the hash of the bytes) and forgets after
/// a minute; this one keys by the envelope's content id, so a re-encoded copy is a
/// duplicate too, and remembers for the whole message age, after which the age check
/// refuses the message anyway.
struct SeenCache {
    ids: HashSet<[u8; 32]>,
    order: VecDeque<([u8; 32], Instant)>,
    ttl: Duration,
    capacity: usize,
}

impl SeenCache {
    fn new(ttl: Duration, capacity: usize) -> Self {
        SeenCache {
            ids: HashSet::new(),
            order: VecDeque::new(),
            ttl,
            capacity,
        }
    }

    /// Records `id`; false if it was already there.
    fn insert(&mut self, id: &str, now: Instant) -> bool {
        self.expire(now);
        let mut key = [0u8; 32];
        if hex::decode_to_slice(id, &mut key).is_err() {
            // Envelope::decode guarantees 64 hex digits; hash anything else.
            key = *blake3::hash(id.as_bytes()).as_bytes();
        }
        if !self.ids.insert(key) {
            return false;
        }
        self.order.push_back((key, now));
        while self.order.len() > self.capacity {
            if let Some((old, _)) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }

    fn expire(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            self.ids.remove(key);
            self.order.pop_front();
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The broadcast state of a node.
pub struct Broadcast {
    local: PeerId,
    topics: HashMap<String, Topic>,
    seen: SeenCache,
    max_age_ms: u64,
    max_skew_ms: u64,
}

impl Broadcast {
    /// Broadcast state for `local`, refusing messages older than `max_age` or dated
    /// more than `max_skew` ahead.
    pub fn new(local: PeerId, max_age: Duration, max_skew: Duration) -> Self {
        Broadcast {
            local,
            topics: HashMap::new(),
            seen: SeenCache::new(max_age + max_skew, SEEN_CAPACITY),
            max_age_ms: max_age.as_millis() as u64,
            max_skew_ms: max_skew.as_millis() as u64,
        }
    }

    /// The label a topic gets in metrics: its name if joined, else `other`, so
    /// peers cannot create series.
    pub fn label(&self, topic: &str) -> String {
        if self.topics.contains_key(topic) {
            topic.to_string()
        } else {
            "other".to_string()
        }
    }

    /// Joined topic names, sorted.
    pub fn topics(&self) -> Vec<String> {
        let mut names: Vec<String> = self.topics.keys().cloned().collect();
        names.sort();
        names
    }

    /// Ids remembered for duplicate suppression.
    pub fn seen_len(&self) -> usize {
        self.seen.len()
    }

    /// Joins `topic` (if not yet) and returns a receiver of its deliveries.
    pub fn join(
        &mut self,
        gossipsub: &mut crate::behaviour::Gossipsub,
        topic: &str,
        pinned: bool,
    ) -> Result<broadcast::Receiver<Arc<Delivery>>, BroadcastError> {
        servant_protocol::validate_topic(topic)?;
        if let Some(state) = self.topics.get_mut(topic) {
            state.pinned |= pinned;
            state.idle_since = None;
            return Ok(state.sender.subscribe());
        }
        if self.topics.len() >= MAX_TOPICS {
            return Err(BroadcastError::TooManyTopics);
        }
        let ident = gossipsub::IdentTopic::new(topic);
        gossipsub
            .subscribe(&ident)
            .map_err(|e| BroadcastError::Gossipsub(e.to_string()))?;
        if let Err(e) = gossipsub.set_topic_params(ident, crate::behaviour::topic_score_params()) {
            tracing::warn!(topic, error = e, "cannot set topic score parameters");
        }
        let (sender, receiver) = broadcast::channel(SUBSCRIBER_BUFFER);
        self.topics.insert(
            topic.to_string(),
            Topic {
                pinned,
                sender,
                idle_since: None,
            },
        );
        tracing::info!(topic, "joined topic");
        Ok(receiver)
    }

    /// Leaves topics that nobody listens to any more and the config does not pin.
    pub fn leave_idle(&mut self, gossipsub: &mut crate::behaviour::Gossipsub, now: Instant) {
        let mut leave = Vec::new();
        for (name, state) in self.topics.iter_mut() {
            if state.pinned || state.sender.receiver_count() > 0 {
                state.idle_since = None;
                continue;
            }
            let since = *state.idle_since.get_or_insert(now);
            if now.duration_since(since) >= UNSUBSCRIBE_GRACE {
                leave.push(name.clone());
            }
        }
        for name in leave {
            self.topics.remove(&name);
            gossipsub.unsubscribe(&gossipsub::IdentTopic::new(name.as_str()));
            tracing::info!(topic = name, "left topic: no subscriber left");
        }
    }

    /// Publishes a message from this node and delivers it to local subscribers.
    pub fn publish(
        &mut self,
        gossipsub: &mut crate::behaviour::Gossipsub,
        topic: &str,
        title: String,
        body: String,
    ) -> Result<Delivery, BroadcastError> {
        servant_protocol::validate_topic(topic)?;
        let envelope = Envelope::new(title, body, unix_ms(), self.local.to_string())?;
        let bytes = envelope.encode()?;
        match gossipsub.publish(gossipsub::IdentTopic::new(topic), bytes) {
            Ok(_) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                return Err(BroadcastError::NoPeers(topic.to_string()))
            }
            Err(gossipsub::PublishError::Duplicate) => return Err(BroadcastError::Duplicate),
            Err(e) => return Err(BroadcastError::Gossipsub(e.to_string())),
        }
        self.seen.insert(&envelope.id, Instant::now());
        let delivery = Delivery {
            topic: topic.to_string(),
            envelope,
            from: None,
            received_at: unix_ms(),
        };
        self.deliver(delivery.clone());
        Ok(delivery)
    }

    /// Checks a message gossipsub received; on success it is delivered locally.
    pub fn validate(
        &mut self,
        message: &gossipsub::Message,
        propagation_source: PeerId,
    ) -> Result<Delivery, Rejection> {
        let topic = message.topic.as_str();
        if !self.topics.contains_key(topic) {
            return Err(Rejection {
                reason: "not_subscribed",
                acceptance: MessageAcceptance::Ignore,
                detail: String::new(),
            });
        }
        let reject = |e: EnvelopeError| Rejection {
            reason: e.reason(),
            acceptance: MessageAcceptance::Reject,
            detail: e.to_string(),
        };
        let envelope = Envelope::decode(&message.data).map_err(reject)?;
        // Strict validation guarantees a signed source; the envelope must name it,
        // or a peer could speak in another's name.
        let source = message.source.map(|p| p.to_string());
        if source.as_deref() != Some(envelope.origin.as_str()) {
            return Err(Rejection {
                reason: "origin_mismatch",
                acceptance: MessageAcceptance::Reject,
                detail: format!(
                    "envelope origin {} but signed by {:?}",
                    envelope.origin, source
                ),
            });
        }
        // A replay outside gossipsub's duplicate window lands here and is refused.
        // Honest forwarders check the same rule moments earlier, so only a clock off
        // by more than max_clock_skew makes them fail it: a message up to twice the
        // limits is ignored without penalty; beyond that no clock explains it, and
        // the sender pays.
        if let Err(e) = envelope.check_age(unix_ms(), self.max_age_ms, self.max_skew_ms) {
            let blatant = envelope
                .check_age(unix_ms(), self.max_age_ms * 2, self.max_skew_ms * 2)
                .is_err();
            return Err(Rejection {
                reason: e.reason(),
                acceptance: if blatant {
                    MessageAcceptance::Reject
                } else {
                    MessageAcceptance::Ignore
                },
                detail: e.to_string(),
            });
        }
        if !self.seen.insert(&envelope.id, Instant::now()) {
            return Err(Rejection {
                reason: "duplicate",
                acceptance: MessageAcceptance::Ignore,
                detail: envelope.id,
            });
        }
        let delivery = Delivery {
            topic: topic.to_string(),
            envelope,
            from: Some(propagation_source.to_string()),
            received_at: unix_ms(),
        };
        self.deliver(delivery.clone());
        Ok(delivery)
    }

    fn deliver(&self, delivery: Delivery) {
        if let Some(state) = self.topics.get(&delivery.topic) {
            // No receiver is fine: the node may relay a topic nobody reads locally.
            let _ = state.sender.send(Arc::new(delivery));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_cache_is_bounded_in_count_and_time() {
        let start = Instant::now();
        let mut cache = SeenCache::new(Duration::from_secs(10), 3);
        let id = |n: u8| hex::encode([n; 32]);
        assert!(cache.insert(&id(1), start));
        assert!(!cache.insert(&id(1), start), "duplicate");
        for n in 2..=4 {
            assert!(cache.insert(&id(n), start));
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.insert(&id(1), start), "evicted by capacity");
        let later = start + Duration::from_secs(11);
        assert!(cache.insert(&id(4), later), "expired");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn odd_ids_still_deduplicate() {
        let mut cache = SeenCache::new(Duration::from_secs(10), 10);
        assert!(cache.insert("not-hex", Instant::now()));
        assert!(!cache.insert("not-hex", Instant::now()));
    }
}
