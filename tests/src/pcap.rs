//! Reading the NAT lab's packet captures ([`crate::natlab::Lab::capture`]): each
//! IPv4 TCP or UDP frame as its timestamp, addresses, ports, TCP flags and payload
//! length, which is what timing a hole punch hop by hop needs (the payloads are
//! encrypted anyway).

use std::{net::SocketAddrV4, path::Path, time::Duration};

use anyhow::{Context, Result};
use etherparse::{LaxPacketHeaders, NetHeaders, TransportHeader};
use pcap_file::pcap::PcapReader;

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// When the kernel saw it (since the Unix epoch; every port of a lab shares the
    /// clock).
    pub at: Duration,
    /// Sender.
    pub src: SocketAddrV4,
    /// Receiver.
    pub dst: SocketAddrV4,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// TCP flags as tcpdump prints them (`S`, `S.`, `.`, `P.`, `F.`, `R`), empty for
    /// UDP.
    pub flags: String,
    /// Bytes above the transport header, as sent (a capture may have kept fewer).
    pub payload: usize,
}

impl Frame {
    /// A TCP SYN without ACK: the first packet of a connection attempt.
    pub fn is_syn(&self) -> bool {
        self.flags == "S"
    }
}

/// The IPv4 TCP and UDP frames of the pcap file at `path`, in capture order; other
/// frames (ARP, IPv6) are left out.
pub fn read(path: &Path) -> Result<Vec<Frame>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut reader =
        PcapReader::new(file).with_context(|| format!("{}: not a pcap file", path.display()))?;
    let mut frames = Vec::new();
    while let Some(packet) = reader.next_packet() {
        let packet = packet.with_context(|| format!("{}: a truncated record", path.display()))?;
        if let Some(frame) = decode(packet.timestamp, &packet.data) {
            frames.push(frame);
        }
    }
    Ok(frames)
}

/// One Ethernet frame, or `None` for one that is not IPv4 TCP or UDP.
fn decode(at: Duration, data: &[u8]) -> Option<Frame> {
    // Lax: the capture cuts frames short, so the IP length is more than is there.
    let headers = LaxPacketHeaders::from_ethernet(data).ok()?;
    let Some(NetHeaders::Ipv4(ip, _)) = headers.net else {
        return None;
    };
    let above_ip = usize::from(ip.total_len).saturating_sub(ip.header_len());
    let addr = |octets: [u8; 4], port| SocketAddrV4::new(octets.into(), port);
    let (proto, flags, sport, dport, header) = match headers.transport? {
        TransportHeader::Tcp(tcp) => {
            let mut flags = String::new();
            for (set, c) in [
                (tcp.syn, 'S'),
                (tcp.fin, 'F'),
                (tcp.rst, 'R'),
                (tcp.psh, 'P'),
            ] {
                if set {
                    flags.push(c);
                }
            }
            if tcp.ack {
                flags.push('.');
            }
            let len = tcp.header_len();
            ("tcp", flags, tcp.source_port, tcp.destination_port, len)
        }
        TransportHeader::Udp(udp) => (
            "udp",
            String::new(),
            udp.source_port,
            udp.destination_port,
            8,
        ),
        _ => return None,
    };
    Some(Frame {
        at,
        src: addr(ip.source, sport),
        dst: addr(ip.destination, dport),
        proto,
        flags,
        payload: above_ip.saturating_sub(header),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal Ethernet + IPv4 + TCP frame, cut short like a capture cuts it.
    fn tcp_frame(syn: bool, ack: bool, payload: u16) -> Vec<u8> {
        let builder = etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([198, 18, 0, 21], [198, 18, 0, 22], 64)
            .tcp(4001, 4002, 7, 1000);
        let builder = if syn { builder.syn() } else { builder };
        let builder = if ack { builder.ack(1) } else { builder };
        let body = vec![0u8; usize::from(payload)];
        let mut out = Vec::new();
        builder
            .write(&mut out, &body)
            .expect("writing to a Vec cannot fail");
        out.truncate(80);
        out
    }

    #[test]
    fn frames_cut_short_keep_their_sent_length_and_flags() {
        let at = Duration::from_millis(5);
        let syn = decode(at, &tcp_frame(true, false, 0)).expect("a TCP frame");
        assert!(syn.is_syn());
        assert_eq!(syn.src, "198.18.0.21:4001".parse().unwrap());
        assert_eq!(syn.dst, "198.18.0.22:4002".parse().unwrap());
        let data = decode(at, &tcp_frame(false, true, 1400)).expect("a TCP frame");
        assert_eq!((data.flags.as_str(), data.payload), (".", 1400));
        assert!(decode(at, &[0u8; 10]).is_none());
    }
}
