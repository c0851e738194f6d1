//! Open streams by protocol, for `servant_streams{protocol}`.
//!
//! libp2p counts no streams, and its connection handlers never say which protocol a
//! stream was negotiated for, so every connection's muxer is wrapped and each stream
//! reads its own multistream-select negotiation: the protocol the dialing side
//! proposes first, from the bytes it writes (our outbound streams) or we read
//! (inbound ones). Until then a stream counts as `negotiating`; a stream flood that
//! never negotiates shows there. Label values come only from [`KNOWN`], the
//! protocols Servant speaks; any other name a peer proposes counts as `other`, so
//! the network cannot grow the series.
//!
//! Relayed connections are counted too: their multiplexer upgrade is
//! [`CountedYamux`], since libp2p's relay client transport builds their muxer itself.
//!
//! The same reading of the proposal decides which streams a data-profile relay holds
//! to its per-peer rate: a connection wrapped with its peer's [`Gate`] hands circuit
//! streams to [`crate::relay_throttle::Limit`], so each stream is wrapped and read
//! once, whichever of the two is on.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use futures::{AsyncRead, AsyncWrite};
use libp2p::{
    core::{
        muxing::{StreamMuxer, StreamMuxerBox, StreamMuxerEvent, SubstreamBox},
        upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo},
    },
    yamux,
};
use prometheus_client::metrics::{family::Family, gauge::Gauge};

use std::sync::Arc;

use crate::{
    metrics::ProtocolLabel,
    relay_throttle::{Gate, Limit},
};

/// The protocols Servant's behaviours speak: the only label values besides
/// `negotiating` and `other`.
pub const KNOWN: &[&str] = &[
    "/ipfs/id/1.0.0",
    "/ipfs/id/push/1.0.0",
    "/ipfs/ping/1.0.0",
    "/servant/kad/1.0.0",
    "/meshsub/1.3.0",
    "/meshsub/1.2.0",
    "/meshsub/1.1.0",
    "/meshsub/1.0.0",
    "/servant/file/1.0.0",
    "/servant/search/1.0.0",
    "/libp2p/autonat/2/dial-request",
    "/libp2p/autonat/2/dial-back",
    "/libp2p/circuit/relay/0.2.0/hop",
    "/libp2p/circuit/relay/0.2.0/stop",
    "/libp2p/dcutr",
];

/// A stream whose negotiation has not got as far as a protocol name.
pub const NEGOTIATING: &str = "negotiating";
/// A proposed protocol Servant does not speak, or a negotiation that is not one.
pub const OTHER: &str = "other";

/// The most bytes of negotiation read before giving up on finding the protocol:
/// the header and a protocol name are well under it.
const MAX_NEGOTIATION: usize = 512;
/// multistream-select's header message, length prefix included.
const HEADER: &[u8] = b"\x13/multistream/1.0.0\n";

/// Open streams by protocol.
pub type StreamGauge = Family<ProtocolLabel, Gauge>;

/// Finds the first protocol proposed in a multistream-select negotiation, from its
/// bytes in whatever pieces they come.
#[derive(Debug, Default)]
pub(crate) struct Sniffer {
    seen: Vec<u8>,
}

impl Sniffer {
    /// Feeds bytes; `Some` once the protocol is known (or known not to be found).
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Option<&'static str> {
        let room = MAX_NEGOTIATION.saturating_sub(self.seen.len());
        self.seen.extend_from_slice(&bytes[..bytes.len().min(room)]);
        let check = self.seen.len().min(HEADER.len());
        if self.seen[..check] != HEADER[..check] {
            return Some(OTHER);
        }
        if self.seen.len() > HEADER.len() {
            let rest = &self.seen[HEADER.len()..];
            // Protocol names are short: a one-byte length prefix (< 128).
            let len = usize::from(rest[0]);
            if len >= 0x80 || len == 0 {
                return Some(OTHER);
            }
            if rest.len() > len {
                let name = &rest[1..=len];
                let name = name.strip_suffix(b"\n").unwrap_or(name);
                return Some(
                    KNOWN
                        .iter()
                        .find(|k| k.as_bytes() == name)
                        .copied()
                        .unwrap_or(OTHER),
                );
            }
        }
        (self.seen.len() >= MAX_NEGOTIATION).then_some(OTHER)
    }
}

/// Wraps a connection's muxer so its streams are counted in `gauge`, and the circuit
/// streams it relays read at the rate of `gate`, its peer's, when there is one.
pub fn wrap(muxer: StreamMuxerBox, gauge: StreamGauge, gate: Option<Arc<Gate>>) -> StreamMuxerBox {
    StreamMuxerBox::new(CountingMuxer {
        inner: muxer,
        gauge,
        gate,
    })
}

/// yamux whose muxer is counted: the multiplexer upgrade for relayed connections,
/// which libp2p's relay client transport upgrades itself.
#[derive(Clone)]
pub struct CountedYamux {
    inner: yamux::Config,
    gauge: StreamGauge,
}

impl CountedYamux {
    /// yamux with its default settings, counting into `gauge`.
    pub fn new(gauge: StreamGauge) -> Self {
        CountedYamux {
            inner: yamux::Config::default(),
            gauge,
        }
    }
}

impl UpgradeInfo for CountedYamux {
    type Info = <yamux::Config as UpgradeInfo>::Info;
    type InfoIter = <yamux::Config as UpgradeInfo>::InfoIter;

    fn protocol_info(&self) -> Self::InfoIter {
        self.inner.protocol_info()
    }
}

impl<C> InboundConnectionUpgrade<C> for CountedYamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = StreamMuxerBox;
    type Error = io::Error;
    type Future = futures::future::Ready<Result<StreamMuxerBox, io::Error>>;

    fn upgrade_inbound(self, io: C, info: Self::Info) -> Self::Future {
        let muxer = self.inner.upgrade_inbound(io, info).into_inner();
        // A relayed connection carries no circuits of ours to limit.
        futures::future::ready(muxer.map(|m| wrap(StreamMuxerBox::new(m), self.gauge, None)))
    }
}

impl<C> OutboundConnectionUpgrade<C> for CountedYamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = StreamMuxerBox;
    type Error = io::Error;
    type Future = futures::future::Ready<Result<StreamMuxerBox, io::Error>>;

    fn upgrade_outbound(self, io: C, info: Self::Info) -> Self::Future {
        let muxer = self.inner.upgrade_outbound(io, info).into_inner();
        futures::future::ready(muxer.map(|m| wrap(StreamMuxerBox::new(m), self.gauge, None)))
    }
}

struct CountingMuxer {
    inner: StreamMuxerBox,
    gauge: StreamGauge,
    gate: Option<Arc<Gate>>,
}

impl CountingMuxer {
    fn stream(&self, inner: SubstreamBox, side: Side) -> Counted<SubstreamBox> {
        Counted::new(inner, self.gauge.clone(), side, self.gate.clone())
    }
}

impl StreamMuxer for CountingMuxer {
    type Substream = Counted<SubstreamBox>;
    type Error = io::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        Pin::new(&mut self.inner)
            .poll_inbound(cx)
            .map_ok(|s| self.stream(s, Side::Reads))
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        Pin::new(&mut self.inner)
            .poll_outbound(cx)
            .map_ok(|s| self.stream(s, Side::Writes))
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

/// Which direction carries the proposal: the side that opened the stream writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// An inbound stream: the proposal is read.
    Reads,
    /// An outbound stream: the proposal is written.
    Writes,
}

/// A stream counted under its protocol while it lives, and read at its peer's relay
/// rate if it turns out to be a circuit this node relays.
pub(crate) struct Counted<S> {
    inner: S,
    gauge: StreamGauge,
    label: &'static str,
    side: Side,
    sniffer: Option<Sniffer>,
    /// The peer's gate until the protocol is known.
    gate: Option<Arc<Gate>>,
    limit: Option<Limit>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, gauge: StreamGauge, side: Side, gate: Option<Arc<Gate>>) -> Self {
        gauge
            .get_or_create(&ProtocolLabel {
                protocol: NEGOTIATING,
            })
            .inc();
        Counted {
            inner,
            gauge,
            label: NEGOTIATING,
            side,
            sniffer: Some(Sniffer::default()),
            gate,
            limit: None,
        }
    }

    fn observe(&mut self, side: Side, bytes: &[u8]) {
        if side != self.side || bytes.is_empty() {
            return;
        }
        let Some(sniffer) = self.sniffer.as_mut() else {
            return;
        };
        if let Some(protocol) = sniffer.feed(bytes) {
            self.sniffer = None;
            self.relabel(protocol);
            if let Some(gate) = self.gate.take() {
                self.limit = Limit::for_stream(gate, protocol, side);
            }
        }
    }

    fn relabel(&mut self, protocol: &'static str) {
        self.gauge
            .get_or_create(&ProtocolLabel {
                protocol: self.label,
            })
            .dec();
        self.gauge.get_or_create(&ProtocolLabel { protocol }).inc();
        self.label = protocol;
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.gauge
            .get_or_create(&ProtocolLabel {
                protocol: self.label,
            })
            .dec();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(limit) = this.limit.as_mut() {
            return limit.poll_read(&mut this.inner, cx, buf);
        }
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            if this.sniffer.is_some() {
                this.observe(Side::Reads, &buf[..n]);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            if self.sniffer.is_some() {
                self.observe(Side::Writes, &buf[..n]);
            }
        }
        poll
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
    use futures::{io::Cursor, AsyncReadExt, AsyncWriteExt};

    fn message(s: &str) -> Vec<u8> {
        let mut m = vec![(s.len() + 1) as u8];
        m.extend_from_slice(s.as_bytes());
        m.push(b'\n');
        m
    }

    fn count(gauge: &StreamGauge, protocol: &'static str) -> i64 {
        gauge.get_or_create(&ProtocolLabel { protocol }).get()
    }

    #[test]
    fn the_first_proposal_is_found_in_any_pieces() {
        let mut bytes = message("/multistream/1.0.0");
        assert_eq!(bytes, HEADER);
        bytes.extend(message("/ipfs/ping/1.0.0"));
        bytes.extend(b"payload after the proposal");
        for piece in [1, 3, 7, bytes.len()] {
            let mut s = Sniffer::default();
            let found = bytes.chunks(piece).find_map(|c| s.feed(c));
            assert_eq!(found, Some("/ipfs/ping/1.0.0"), "pieces of {piece}");
        }
    }

    #[test]
    fn unknown_names_and_garbage_are_other() {
        let mut s = Sniffer::default();
        let mut bytes = message("/multistream/1.0.0");
        bytes.extend(message("/made/up/by/a/peer"));
        assert_eq!(s.feed(&bytes), Some(OTHER));
        assert_eq!(Sniffer::default().feed(b"GET / HTTP/1.1\r\n"), Some(OTHER));
        let mut s = Sniffer::default();
        assert_eq!(s.feed(HEADER), None);
        assert_eq!(s.feed(&[0xff, 0xff]), Some(OTHER));
        assert!(KNOWN.contains(&crate::behaviour::KAD_PROTOCOL.as_ref()));
        assert!(KNOWN.contains(&crate::codecs::FILE_PROTOCOL.as_ref()));
        assert!(KNOWN.contains(&crate::codecs::SEARCH_PROTOCOL.as_ref()));
        assert!(KNOWN.contains(&crate::reach::wire::DIAL_BACK_PROTOCOL.as_ref()));
    }

    #[test]
    fn a_stream_counts_while_it_lives_under_the_protocol_it_negotiates() -> io::Result<()> {
        let gauge = StreamGauge::default();
        let mut inbound = message("/multistream/1.0.0");
        inbound.extend(message("/servant/file/1.0.0"));
        let mut stream = Counted::new(Cursor::new(inbound), gauge.clone(), Side::Reads, None);
        assert_eq!(count(&gauge, NEGOTIATING), 1);
        futures::executor::block_on(async {
            let mut buf = [0u8; 4];
            while stream.read(&mut buf).await? > 0 {}
            io::Result::Ok(())
        })?;
        assert_eq!(count(&gauge, NEGOTIATING), 0);
        assert_eq!(count(&gauge, "/servant/file/1.0.0"), 1);
        let mut outbound = Counted::new(Cursor::new(Vec::new()), gauge.clone(), Side::Writes, None);
        futures::executor::block_on(async {
            outbound.write_all(HEADER).await?;
            outbound.write_all(&message("/ipfs/id/1.0.0")).await
        })?;
        assert_eq!(count(&gauge, "/ipfs/id/1.0.0"), 1);
        drop(stream);
        drop(outbound);
        assert_eq!(count(&gauge, "/servant/file/1.0.0"), 0);
        assert_eq!(count(&gauge, "/ipfs/id/1.0.0"), 0);
        // A stream dropped before it negotiated leaves nothing behind either.
        drop(Counted::new(
            Cursor::new(Vec::<u8>::new()),
            gauge.clone(),
            Side::Reads,
            None,
        ));
        assert_eq!(count(&gauge, NEGOTIATING), 0);
        Ok(())
    }
}
