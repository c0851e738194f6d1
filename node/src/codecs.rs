//! Request-response codecs for `/servant/file/1.0.0` and `/servant/search/1.0.0`.
//!
//! Both read a 4-byte big-endian length first and refuse it before allocating when it
//! exceeds the protocol's limit, so a hostile length costs nothing. The message types
//! and their validation live in the protocol crate; this is only the stream framing.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{request_response, StreamProtocol};
use servant_protocol::{
    file::{self, Request, Response},
    search::{self, Ack, Message},
};

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads a length prefix and checks it against `max`.
async fn read_len<T: AsyncRead + Unpin>(io: &mut T, max: usize) -> io::Result<usize> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    file::check_length(u32::from_be_bytes(len), max).map_err(invalid)
}

/// Reads a whole length-prefixed payload of at most `max` bytes.
async fn read_frame<T: AsyncRead + Unpin>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let len = read_len(io, max).await?;
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes a length-prefixed payload made of `head` then `body`, without joining them.
async fn write_frame<T: AsyncWrite + Unpin>(
    io: &mut T,
    head: &[u8],
    body: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(head.len() + body.len()).map_err(invalid)?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(head).await?;
    io.write_all(body).await?;
    io.close().await
}

/// The file protocol's codec.
#[derive(Debug, Clone, Default)]
pub struct FileCodec;

/// The file protocol's name as a stream protocol.
pub const FILE_PROTOCOL: StreamProtocol = StreamProtocol::new(file::PROTOCOL);
/// The search protocol's name as a stream protocol.
pub const SEARCH_PROTOCOL: StreamProtocol = StreamProtocol::new(search::PROTOCOL);

impl request_response::Codec for FileCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let payload = read_frame(io, file::MAX_REQUEST_BYTES).await?;
        Request::decode(&payload).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let len = read_len(io, file::MAX_RESPONSE_BYTES).await?;
        if len == 0 {
            return Err(invalid("empty response frame"));
        }
        let mut kind = [0u8; 1];
        io.read_exact(&mut kind).await?;
        // The kind decides the limit: only manifests may be larger than a chunk.
        let max = match kind[0] {
            1 => servant_protocol::manifest::MAX_MANIFEST_BYTES,
            _ => servant_protocol::manifest::MAX_CHUNK_SIZE as usize,
        };
        if len - 1 > max {
            return Err(invalid(format!("response of {len} bytes over its limit")));
        }
        let mut data = crate::chunk_pool::take(len - 1);
        io.read_exact(&mut data).await?;
        Response::from_parts(kind[0], data).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req.encode(), &[]).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let written = write_frame(io, &[res.kind()], res.data()).await;
        if let Response::Chunk(data) = res {
            crate::chunk_pool::give(data);
        }
        written
    }
}

/// The search protocol's codec.
#[derive(Debug, Clone, Default)]
pub struct SearchCodec;

impl request_response::Codec for SearchCodec {
    type Protocol = StreamProtocol;
    type Request = Message;
    type Response = Ack;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: AsyncRead + Unpin + Send,
    {
        let payload = read_frame(io, search::MAX_MESSAGE_BYTES).await?;
        Message::decode(&payload).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Ack>
    where
        T: AsyncRead + Unpin + Send,
    {
        let payload = read_frame(io, 64).await?;
        search::decode_ack(&payload).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Message,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req.encode(), &[]).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Ack,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &search::encode_ack(res), &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;
    use servant_protocol::manifest::Hash;

    #[tokio::test]
    async fn file_frames_round_trip() {
        let mut codec = FileCodec;
        let mut buf = Vec::new();
        let req = Request::Chunk {
            id: Hash::of(b"x"),
            index: 3,
        };
        codec
            .write_request(&FILE_PROTOCOL, &mut Cursor::new(&mut buf), req.clone())
            .await
            .unwrap();
        let got = codec
            .read_request(&FILE_PROTOCOL, &mut Cursor::new(&buf))
            .await
            .unwrap();
        assert_eq!(got, req);

        let mut buf = Vec::new();
        let res = Response::Chunk(vec![9; 5000]);
        codec
            .write_response(&FILE_PROTOCOL, &mut Cursor::new(&mut buf), res.clone())
            .await
            .unwrap();
        let got = codec
            .read_response(&FILE_PROTOCOL, &mut Cursor::new(&buf))
            .await
            .unwrap();
        assert_eq!(got, res);
    }

    #[tokio::test]
    async fn length_bombs_are_refused_without_allocating() {
        let mut codec = FileCodec;
        // A declared 4 GiB response: refused on the prefix alone.
        let bomb = [0xff, 0xff, 0xff, 0xff, 2];
        let err = codec
            .read_response(&FILE_PROTOCOL, &mut Cursor::new(&bomb[..]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A chunk one byte over the chunk limit (but under the manifest limit).
        let len = servant_protocol::manifest::MAX_CHUNK_SIZE + 2;
        let mut frame = len.to_be_bytes().to_vec();
        frame.push(2);
        let err = codec
            .read_response(&FILE_PROTOCOL, &mut Cursor::new(&frame[..]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A request longer than any request.
        let frame = [0, 0, 1, 0];
        let err = codec
            .read_request(&FILE_PROTOCOL, &mut Cursor::new(&frame[..]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut search = SearchCodec;
        let frame = [0x7f, 0, 0, 0];
        let err = search
            .read_request(&SEARCH_PROTOCOL, &mut Cursor::new(&frame[..]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
