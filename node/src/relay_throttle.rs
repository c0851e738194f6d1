//! Per-peer bandwidth limits on a data-profile relay.
//!
//! libp2p's relay server caps a circuit's bytes and duration but copies its bytes
//! as fast as both ends allow, so one peer pumping a 1 GiB circuit could take a
//! volunteer super-peer's whole uplink. The relay copies inside its own connection
//! handler, out of reach of any behaviour, so the limit sits below it: every
//! connection's muxer is wrapped with its peer's [`Gate`] (`stream_count::wrap`, which
//! reads each stream's multistream-select proposal anyway), and the streams that carry circuits (the hop stream a
//! source opens, the stop stream the relay opens to a destination) pay for every byte
//! the relay reads from them from one token bucket per peer, of `relay_rate_per_peer`
//! bytes a second. Reading slower fills the stream's receive window, so the sender is
//! slowed by flow control, not by dropped data. Every other stream (ping, identify,
//! gossipsub, a file fetch from the relay itself) is never held back.
//!
//! Tying the limit to the streams, not to the relay's circuit events, keeps it exact:
//! libp2p-relay can report one circuit closed twice, and a count kept from its events
//! could be driven to zero by a peer with a circuit still open.
//!
//! Limiting reads limits each direction of a circuit at its sender: the source's
//! bytes towards the destination, the destination's replies towards the source.

use std::{
    collections::HashMap,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, Weak},
    task::{Context, Poll},
};

use futures::AsyncRead;
use libp2p::{relay, PeerId};
use prometheus_client::metrics::counter::Counter;

use crate::{stream_count::Side, token_bucket::TokenBucket};

/// Bytes a held-back read waits for at least, so a throttled stream wakes a few
/// times a second rather than once per byte.
const READ_GRAIN: usize = 16 * 1024;

/// The smallest burst: a rate below it would otherwise make reads smaller than a
/// yamux frame header is worth waking for.
const MIN_BURST: f64 = 16.0 * 1024.0;

/// Whether a stream carries circuit bytes this node relays: a hop stream a source
/// opened to us, or a stop stream we opened to a destination. The same protocols the
/// other way round are this node's own relayed connections, never limited here.
fn relays_circuits(protocol: &str, proposer: Side) -> bool {
    match proposer {
        Side::Reads => protocol == relay::HOP_PROTOCOL_NAME.as_ref(),
        Side::Writes => protocol == relay::STOP_PROTOCOL_NAME.as_ref(),
    }
}

/// One peer's token bucket, shared by the circuit streams of all its connections.
#[derive(Debug)]
pub struct Gate {
    bucket: Mutex<TokenBucket>,
    waits: Counter,
}

impl Gate {
    fn bucket(&self) -> MutexGuard<'_, TokenBucket> {
        // A poisoned lock means a panic elsewhere mid-update of plain numbers: the
        // bucket is still usable.
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The relay's per-peer limits: one [`Gate`] per connected peer.
#[derive(Debug)]
pub struct RelayThrottle {
    rate: f64,
    burst: f64,
    gates: Mutex<HashMap<PeerId, Weak<Gate>>>,
    waits: Counter,
}

impl RelayThrottle {
    /// Limits each peer's circuit streams to `rate` bytes a second together, with a
    /// burst of one second's worth (at least 16 KiB); `waits` counts reads held back.
    pub fn new(rate: u64, waits: Counter) -> Arc<Self> {
        let rate = rate as f64;
        Arc::new(RelayThrottle {
            rate,
            burst: rate.max(MIN_BURST),
            gates: Mutex::new(HashMap::new()),
            waits,
        })
    }

    fn gates(&self) -> MutexGuard<'_, HashMap<PeerId, Weak<Gate>>> {
        self.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The gate of `peer`, shared with its other live connections; it lives as long
    /// as one of them.
    pub fn gate(&self, peer: PeerId) -> Arc<Gate> {
        let mut gates = self.gates();
        if let Some(gate) = gates.get(&peer).and_then(Weak::upgrade) {
            return gate;
        }
        // Entries of closed connections are dropped when they could be half the map,
        // so the map stays within about twice the peers connected.
        if gates.len() >= 64 && gates.len().is_power_of_two() {
            gates.retain(|_, g| g.strong_count() > 0);
        }
        let gate = Arc::new(Gate {
            bucket: Mutex::new(TokenBucket::full(self.rate, self.burst, now())),
            waits: self.waits.clone(),
        });
        gates.insert(peer, Arc::downgrade(&gate));
        gate
    }
}

/// `tokio`'s clock, so tests with paused time see the bucket refill.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// A circuit stream's reads, paid from its peer's [`Gate`].
pub(crate) struct Limit {
    gate: Arc<Gate>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// This read already waited (and was counted) at least once.
    waited: bool,
}

impl Limit {
    /// The limit for a stream of `protocol` proposed by `proposer`'s side, if it is a
    /// circuit this node relays.
    pub(crate) fn for_stream(gate: Arc<Gate>, protocol: &str, proposer: Side) -> Option<Self> {
        relays_circuits(protocol, proposer).then_some(Limit {
            gate,
            sleep: None,
            waited: false,
        })
    }

    /// Reads from `inner` once the peer's bucket holds tokens for it.
    pub(crate) fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Pin::new(inner).poll_read(cx, buf);
        }
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            // Tokens are taken before the read, so streams reading at once cannot all
            // spend the same balance; what the read did not use is given back.
            let t = now();
            let reserved = {
                let mut bucket = self.gate.bucket();
                let available = bucket.available(t);
                if available < 1.0 {
                    let wait = bucket.wait_for(buf.len().min(READ_GRAIN) as f64, t);
                    drop(bucket);
                    if !self.waited {
                        self.waited = true;
                        self.gate.waits.inc();
                    }
                    self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                    continue;
                }
                let n = buf.len().min(available as usize);
                bucket.charge(n as f64, t);
                n
            };
            let poll = Pin::new(&mut *inner).poll_read(cx, &mut buf[..reserved]);
            let used = match &poll {
                Poll::Ready(Ok(read)) => *read,
                _ => 0,
            };
            if used < reserved {
                self.gate.bucket().refund((reserved - used) as f64);
            }
            if poll.is_ready() {
                self.waited = false;
            }
            return poll;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream_count::{Counted, StreamGauge};
    use futures::{io::Cursor, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    fn proposal(protocol: &str) -> Vec<u8> {
        let mut bytes = b"\x13/multistream/1.0.0\n".to_vec();
        bytes.push((protocol.len() + 1) as u8);
        bytes.extend_from_slice(protocol.as_bytes());
        bytes.push(b'\n');
        bytes
    }

    /// Reads an inbound stream proposing `protocol` and then `len` bytes; how long it took.
    async fn read_inbound(
        gate: Arc<Gate>,
        protocol: &str,
        len: usize,
    ) -> io::Result<tokio::time::Duration> {
        let mut bytes = proposal(protocol);
        bytes.extend(vec![7u8; len]);
        let total = bytes.len();
        let start = tokio::time::Instant::now();
        let mut stream = Counted::new(
            Cursor::new(bytes),
            StreamGauge::default(),
            Side::Reads,
            Some(gate),
        );
        let mut out = Vec::new();
        let n = stream.read_to_end(&mut out).await?;
        assert_eq!(n, total);
        Ok(start.elapsed())
    }

    /// Reads from one buffer, writes to another: an outbound stream's two halves.
    struct Duplex {
        read: Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl AsyncRead for Duplex {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.read).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Duplex {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn hop() -> String {
        relay::HOP_PROTOCOL_NAME.to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_streams_read_at_the_peers_rate_and_others_are_free() -> io::Result<()> {
        let throttle = RelayThrottle::new(100 * 1024, Counter::default());
        let gate = throttle.gate(PeerId::random());
        // 500 KiB at 100 KiB/s after a 100 KiB burst: 4 s.
        let took = read_inbound(Arc::clone(&gate), &hop(), 500 * 1024)
            .await?
            .as_secs_f64();
        assert!((3.9..=4.5).contains(&took), "{took}");
        assert!(throttle.waits.get() > 0);
        // The same peer's ping stream (and the bucket now empty): not held back.
        let took = read_inbound(Arc::clone(&gate), "/ipfs/ping/1.0.0", 500 * 1024).await?;
        assert!(took.as_secs_f64() < 0.01, "{took:?}");
        // A stop stream the peer opened to us is our own relayed connection: free.
        let stop = relay::STOP_PROTOCOL_NAME.to_string();
        let took = read_inbound(gate, &stop, 500 * 1024).await?;
        assert!(took.as_secs_f64() < 0.01, "{took:?}");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_stream_the_relay_opens_is_limited_too() -> io::Result<()> {
        let throttle = RelayThrottle::new(100 * 1024, Counter::default());
        let gate = throttle.gate(PeerId::random());
        let start = tokio::time::Instant::now();
        // The relay writes the proposal of the stop protocol, then reads the reply.
        let duplex = Duplex {
            read: Cursor::new(vec![0u8; 300 * 1024]),
            written: Vec::new(),
        };
        let mut stream = Counted::new(duplex, StreamGauge::default(), Side::Writes, Some(gate));
        stream
            .write_all(&proposal(relay::STOP_PROTOCOL_NAME.as_ref()))
            .await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        let took = start.elapsed().as_secs_f64();
        assert_eq!(out.len(), 300 * 1024);
        // 300 KiB at 100 KiB/s after a 100 KiB burst: 2 s.
        assert!((1.9..=2.5).contains(&took), "{took}");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn all_circuit_streams_of_a_peer_share_its_one_rate() -> io::Result<()> {
        let throttle = RelayThrottle::new(100 * 1024, Counter::default());
        let peer = PeerId::random();
        let (g0, g1) = (throttle.gate(peer), throttle.gate(peer));
        assert!(Arc::ptr_eq(&g0, &g1));
        // Two streams of 250 KiB each: 500 KiB in all, 4 s as for one stream.
        let hop = hop();
        let start = tokio::time::Instant::now();
        let (r0, r1) = tokio::join!(
            read_inbound(g0, &hop, 250 * 1024),
            read_inbound(g1, &hop, 250 * 1024)
        );
        r0?;
        r1?;
        let took = start.elapsed().as_secs_f64();
        assert!((3.9..=4.5).contains(&took), "{took}");
        Ok(())
    }

    #[test]
    fn gates_of_closed_connections_are_forgotten() {
        let throttle = RelayThrottle::new(1024, Counter::default());
        for _ in 0..10_000 {
            drop(throttle.gate(PeerId::random()));
        }
        let _kept: Vec<_> = (0..100).map(|_| throttle.gate(PeerId::random())).collect();
        let len = throttle.gates().len();
        assert!(len <= 256, "{len}");
    }
}
