//! The AutoNAT v2 wire messages (libp2p's `/libp2p/autonat/2/dial-request` and
//! `/libp2p/autonat/2/dial-back`), for Servant's own client.
//!
//! Servant runs libp2p's AutoNAT v2 server, but probes with a client of its own:
//! libp2p's client tests each address once and never again, while Servant wants
//! several servers' word on an address, and wants it again later. The messages are
//! protobuf, each framed by an unsigned-varint length, as the AutoNAT v2 spec gives.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// Where a client asks a server to dial it back.
pub const DIAL_REQUEST_PROTOCOL: StreamProtocol =
    StreamProtocol::new("/libp2p/autonat/2/dial-request");
/// Where a server proves, on a fresh connection, that its dial reached us.
pub const DIAL_BACK_PROTOCOL: StreamProtocol = StreamProtocol::new("/libp2p/autonat/2/dial-back");
/// The largest dial-request message we accept (a response or a data request).
pub const MAX_MESSAGE_BYTES: usize = 4_104;
/// The largest dial-back message (a nonce).
pub const MAX_DIAL_BACK_BYTES: usize = 16;
/// Bytes of padding per data message when a server asks for data before dialing an
/// address it did not observe (its defence against being used to flood others).
pub const DATA_CHUNK: usize = 4_096;
/// The most padding we send for one probe: libp2p's server asks for 30-100 kB.
pub const MAX_DATA_REQUESTED: u64 = 128 * 1024;

/// The envelope of every dial-request stream message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    /// Which message this is.
    #[prost(oneof = "Msg", tags = "1, 2, 3, 4")]
    pub msg: Option<Msg>,
}

/// The four messages of the dial-request stream.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Msg {
    /// Client → server: dial me back at one of these.
    #[prost(message, tag = "1")]
    DialRequest(DialRequest),
    /// Server → client: the outcome.
    #[prost(message, tag = "2")]
    DialResponse(DialResponse),
    /// Server → client: send this much data first.
    #[prost(message, tag = "3")]
    DialDataRequest(DialDataRequest),
    /// Client → server: padding.
    #[prost(message, tag = "4")]
    DialDataResponse(DialDataResponse),
}

/// Addresses to test (binary multiaddrs) and the nonce the dial-back must carry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DialRequest {
    /// Candidate addresses, as multiaddr bytes.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub addrs: Vec<Vec<u8>>,
    /// The nonce the server sends back over its new connection.
    #[prost(fixed64, tag = "2")]
    pub nonce: u64,
}

/// The server wants `num_bytes` of padding before it dials `addr_idx`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DialDataRequest {
    /// The address it will dial.
    #[prost(uint32, tag = "1")]
    pub addr_idx: u32,
    /// How many bytes it wants.
    #[prost(uint64, tag = "2")]
    pub num_bytes: u64,
}

/// The outcome of a dial request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DialResponse {
    /// Whether the request was served ([`response_status`]).
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// Which address was dialed.
    #[prost(uint32, tag = "2")]
    pub addr_idx: u32,
    /// How the dial went ([`dial_status`]).
    #[prost(int32, tag = "3")]
    pub dial_status: i32,
}

/// Padding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DialDataResponse {
    /// Zeros.
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
}

/// The dial-back: the nonce of the request, over the new connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DialBack {
    /// The request's nonce.
    #[prost(fixed64, tag = "1")]
    pub nonce: u64,
}

/// The client's acknowledgement of a dial-back.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DialBackResponse {
    /// Always OK (0).
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `DialResponse.status` values.
pub mod response_status {
    /// The server failed.
    pub const INTERNAL_ERROR: i32 = 0;
    /// The server refused to serve (busy, throttled).
    pub const REQUEST_REJECTED: i32 = 100;
    /// The server will not dial any of the addresses.
    pub const DIAL_REFUSED: i32 = 101;
    /// Served: see the dial status.
    pub const OK: i32 = 200;
}

/// `DialResponse.dial_status` values.
pub mod dial_status {
    /// The dial failed: the address is not reachable from the server.
    pub const DIAL_ERROR: i32 = 100;
    /// Connected, but the dial-back stream failed.
    pub const DIAL_BACK_ERROR: i32 = 101;
    /// Connected and delivered the nonce.
    pub const OK: i32 = 200;
}

/// Writes one length-prefixed message.
pub async fn write<M: prost::Message>(
    io: &mut (impl AsyncWrite + Unpin),
    msg: &M,
) -> std::io::Result<()> {
    let body = msg.encode_to_vec();
    let mut len = unsigned_varint::encode::usize_buffer();
    io.write_all(unsigned_varint::encode::usize(body.len(), &mut len))
        .await?;
    io.write_all(&body).await?;
    io.flush().await
}

/// Reads one length-prefixed message of at most `max` bytes; a longer declared
/// length is refused before anything is allocated for it.
pub async fn read<M: prost::Message + Default>(
    io: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> std::io::Result<M> {
    let mut len: u64 = 0;
    for i in 0..10 {
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await?;
        len |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            break;
        }
        if i == 9 {
            return Err(invalid("length prefix too long"));
        }
    }
    if len > max as u64 {
        return Err(invalid(format!("message of {len} bytes, limit {max}")));
    }
    let mut body = vec![0u8; len as usize];
    io.read_exact(&mut body).await?;
    M::decode(body.as_slice()).map_err(|e| invalid(e.to_string()))
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_round_trip_with_their_length_prefix() {
        let msg = Message {
            msg: Some(Msg::DialRequest(DialRequest {
                addrs: vec![vec![4, 127, 0, 0, 1]],
                nonce: u64::MAX,
            })),
        };
        let mut buf = Vec::new();
        write(&mut buf, &msg).await.unwrap();
        let back: Message = read(&mut buf.as_slice(), MAX_MESSAGE_BYTES).await.unwrap();
        assert_eq!(back, msg);
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused() {
        // A 4 GiB length prefix, and nothing after it.
        let mut bomb = Vec::new();
        let mut len = unsigned_varint::encode::u64_buffer();
        bomb.extend_from_slice(unsigned_varint::encode::u64(4 << 30, &mut len));
        let err = read::<DialBack>(&mut bomb.as_slice(), MAX_DIAL_BACK_BYTES)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let endless = [0xffu8; 12];
        assert!(read::<DialBack>(&mut endless.as_slice(), 16).await.is_err());
    }

    #[test]
    fn a_full_data_message_fits_the_limit() {
        let msg = Message {
            msg: Some(Msg::DialDataResponse(DialDataResponse {
                data: vec![0; DATA_CHUNK],
            })),
        };
        assert!(prost::Message::encoded_len(&msg) < MAX_MESSAGE_BYTES);
    }
}
