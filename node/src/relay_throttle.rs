//! Per-peer bandwidth limits on a data-profile relay.
//!
//! libp2p's relay server caps a circuit's bytes and duration but copies its bytes
//! as fast as both ends allow, so one peer pumping a 1 GiB circuit could take a
//! volunteer super-peer's whole uplink. The relay copies inside its own connection
//! handler, out of reach of any behaviour, so the limit sits below it: every
//! connection's muxer is wrapped ([`ThrottledMuxer`]), and while a peer has at least
//! one circuit through this relay (as its source or its destination) every byte read
//! from that peer's connections is paid for from the peer's one token bucket of
//! `relay_rate_per_peer` bytes a second. Reading slower fills the stream's receive
//! window, so the sender is slowed by flow control, not by dropped data. A peer
//! with no circuit pays nothing: one atomic load per read.
//!
//! Limiting reads limits each direction of a circuit at its sender: the source's
//! bytes towards the destination, the destination's replies towards the source.

use std::{
    collections::HashMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    task::{Context, Poll},
};

use futures::{AsyncRead, AsyncWrite};
use libp2p::{
    core::muxing::{StreamMuxer, StreamMuxerBox, StreamMuxerEvent, SubstreamBox},
    relay, PeerId,
};
use prometheus_client::metrics::counter::Counter;

use crate::token_bucket::TokenBucket;

/// Bytes a held-back read waits for at least, so a throttled stream wakes a few
/// times a second rather than once per byte.
const READ_GRAIN: usize = 16 * 1024;

/// The smallest burst: a rate below it would otherwise make reads smaller than a
/// yamux frame header is worth waking for.
const MIN_BURST: f64 = 16.0 * 1024.0;

/// One peer's limit, shared by all its connections.
#[derive(Debug)]
pub struct Gate {
    circuits: AtomicU32,
    bucket: Mutex<TokenBucket>,
    waits: Counter,
}

impl Gate {
    fn bucket(&self) -> MutexGuard<'_, TokenBucket> {
        // A poisoned lock means a panic elsewhere mid-update of plain numbers: the
        // bucket is still usable.
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the peer has a circuit through this relay now.
    pub fn limited(&self) -> bool {
        self.circuits.load(Ordering::Relaxed) > 0
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
    /// Limits each peer with circuits to `rate` bytes a second, with a burst of one
    /// second's worth; `waits` counts reads held back.
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

    /// The gate of `peer`, shared with its other live connections. A gate lives as
    /// long as one of the peer's connections, so circuit counts cannot outlive them.
    pub fn gate(&self, peer: PeerId) -> Arc<Gate> {
        let mut gates = self.gates();
        if let Some(gate) = gates.get(&peer).and_then(Weak::upgrade) {
            return gate;
        }
        // Entries of closed connections are dropped when they could be half the map,
        // so the map stays within twice the connections alive.
        if gates.len() >= 64 && gates.len().is_power_of_two() {
            gates.retain(|_, g| g.strong_count() > 0);
        }
        let gate = Arc::new(Gate {
            circuits: AtomicU32::new(0),
            bucket: Mutex::new(TokenBucket::full(self.rate, self.burst, now())),
            waits: self.waits.clone(),
        });
        gates.insert(peer, Arc::downgrade(&gate));
        gate
    }

    fn with_gate(&self, peer: &PeerId, f: impl FnOnce(&Gate)) {
        if let Some(gate) = self.gates().get(peer).and_then(Weak::upgrade) {
            f(&gate);
        }
    }

    /// Follows the relay's circuits: both ends of an open circuit are limited.
    pub fn on_relay_event(&self, event: &relay::Event) {
        match event {
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                for peer in [src_peer_id, dst_peer_id] {
                    self.with_gate(peer, |g| {
                        g.circuits.fetch_add(1, Ordering::Relaxed);
                    });
                }
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                for peer in [src_peer_id, dst_peer_id] {
                    self.with_gate(peer, |g| {
                        let _ =
                            g.circuits
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                    Some(n.saturating_sub(1))
                                });
                    });
                }
            }
            _ => {}
        }
    }

    /// Wraps a connection to `peer` so its reads are paid from the peer's gate.
    pub fn wrap(&self, peer: PeerId, muxer: StreamMuxerBox) -> StreamMuxerBox {
        StreamMuxerBox::new(ThrottledMuxer {
            inner: muxer,
            gate: self.gate(peer),
        })
    }
}

/// `tokio`'s clock, so tests with paused time see the bucket refill.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// A connection whose substreams read through the peer's [`Gate`].
pub struct ThrottledMuxer {
    inner: StreamMuxerBox,
    gate: Arc<Gate>,
}

impl StreamMuxer for ThrottledMuxer {
    type Substream = Throttled<SubstreamBox>;
    type Error = io::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let gate = Arc::clone(&self.gate);
        Pin::new(&mut self.inner)
            .poll_inbound(cx)
            .map_ok(|s| Throttled::new(s, gate))
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let gate = Arc::clone(&self.gate);
        Pin::new(&mut self.inner)
            .poll_outbound(cx)
            .map_ok(|s| Throttled::new(s, gate))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// A stream whose reads wait for its peer's tokens while the peer is limited.
pub struct Throttled<S> {
    inner: S,
    gate: Arc<Gate>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Throttled<S> {
    /// Reads from `inner` are paid from `gate`.
    pub fn new(inner: S, gate: Arc<Gate>) -> Self {
        Throttled {
            inner,
            gate,
            sleep: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.gate.limited() {
            this.sleep = None;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            let t = now();
            let allowance = {
                let mut bucket = this.gate.bucket();
                let available = bucket.available(t);
                if available < 1.0 {
                    let wait = bucket.wait_for(buf.len().min(READ_GRAIN) as f64, t);
                    drop(bucket);
                    this.gate.waits.inc();
                    this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                    continue;
                }
                available as usize
            };
            let n = buf.len().min(allowance);
            let read = match Pin::new(&mut this.inner).poll_read(cx, &mut buf[..n]) {
                Poll::Ready(Ok(read)) => read,
                other => return other,
            };
            // Other streams of the peer may have spent meanwhile: paying into debt
            // makes the next read of any of them wait it out.
            this.gate.bucket().charge(read as f64, now());
            return Poll::Ready(Ok(read));
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{io::Cursor, AsyncReadExt};

    fn peer() -> PeerId {
        PeerId::random()
    }

    async fn read_all(gate: Arc<Gate>, len: usize) -> (usize, tokio::time::Duration) {
        let start = tokio::time::Instant::now();
        let mut stream = Throttled::new(Cursor::new(vec![7u8; len]), gate);
        let mut out = Vec::new();
        let n = stream.read_to_end(&mut out).await.unwrap();
        (n, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_with_a_circuit_reads_at_its_rate_and_one_without_is_free() {
        let throttle = RelayThrottle::new(100 * 1024, Counter::default());
        let (a, b) = (peer(), peer());
        let gate_a = throttle.gate(a);
        let gate_b = throttle.gate(b);
        throttle.on_relay_event(&relay::Event::CircuitReqAccepted {
            src_peer_id: a,
            dst_peer_id: peer(),
        });
        // 500 KiB at 100 KiB/s after a 100 KiB burst: 4 s.
        let (n, took) = read_all(Arc::clone(&gate_a), 500 * 1024).await;
        assert_eq!(n, 500 * 1024);
        assert!(took.as_secs_f64() >= 3.9, "{took:?}");
        assert!(took.as_secs_f64() <= 4.5, "{took:?}");
        assert!(throttle.waits.get() > 0);
        let (_, took) = read_all(gate_b, 500 * 1024).await;
        assert!(took.as_secs_f64() < 0.01, "{took:?}");
        // The circuit closes: a is free again.
        throttle.on_relay_event(&relay::Event::CircuitClosed {
            src_peer_id: a,
            dst_peer_id: peer(),
            error: None,
        });
        let (_, took) = read_all(gate_a, 500 * 1024).await;
        assert!(took.as_secs_f64() < 0.01, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn all_streams_of_a_peer_share_its_one_rate() {
        let throttle = RelayThrottle::new(100 * 1024, Counter::default());
        let a = peer();
        let gates = [throttle.gate(a), throttle.gate(a)];
        assert!(Arc::ptr_eq(&gates[0], &gates[1]));
        throttle.on_relay_event(&relay::Event::CircuitReqAccepted {
            src_peer_id: peer(),
            dst_peer_id: a,
        });
        let [g0, g1] = gates;
        // Two streams of 250 KiB each: 500 KiB in all, 4 s as for one stream.
        let start = tokio::time::Instant::now();
        let (r0, r1) = tokio::join!(read_all(g0, 250 * 1024), read_all(g1, 250 * 1024));
        assert_eq!(r0.0 + r1.0, 500 * 1024);
        let took = start.elapsed().as_secs_f64();
        assert!((3.9..=4.5).contains(&took), "{took}");
    }

    #[test]
    fn gates_of_closed_connections_are_forgotten() {
        let throttle = RelayThrottle::new(1024, Counter::default());
        for _ in 0..10_000 {
            drop(throttle.gate(peer()));
        }
        let kept: Vec<_> = (0..100).map(|_| throttle.gate(peer())).collect();
        let len = throttle.gates().len();
        assert!(len <= 256, "{len}");
        // A circuit event for a peer with no connection changes nothing.
        throttle.on_relay_event(&relay::Event::CircuitReqAccepted {
            src_peer_id: peer(),
            dst_peer_id: peer(),
        });
        assert!(kept.iter().all(|g| !g.limited()));
    }
}
