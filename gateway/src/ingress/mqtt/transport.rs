//! What carries MQTT's bytes: a byte stream (TLS, TCP) or WebSocket binary frames.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;

use axum::extract::ws::{Message as Frame, WebSocket};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use crate::ingress::guard::ReadAllowance;

/// What carries the MQTT bytes.
pub trait Transport: Send {
    /// Reads more bytes into `buffer`; `Ok(0)` at the end. Cancel-safe.
    fn read_more(
        &mut self,
        buffer: &mut BytesMut,
    ) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes `bytes` whole.
    fn send(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// The CONNECT is in: what was bounded until the client said who it is is not.
    fn connected(&mut self) {}
}

/// The most one read of a byte stream takes: a window of 16 publishes of 1 KB and their
/// headers fit, so a busy client's batch comes in one read.
const READ_CHUNK: usize = 32 * 1024;

/// A byte stream (TLS, TCP).
pub struct Stream<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for Stream<S> {
    /// Reads into room on the poller's stack and appends what came to `buffer`, so that
    /// a connection waiting for its client holds no read buffer at all (the session
    /// lets go of an empty one) and yet one read takes up to [`READ_CHUNK`]. The copy
    /// costs less than a read buffer kept per idle connection would.
    async fn read_more(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            let mut room = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut room);
            std::task::ready!(Pin::new(&mut self.0).poll_read(cx, &mut read))?;
            buffer.extend_from_slice(read.filled());
            Poll::Ready(Ok(read.filled().len()))
        })
        .await
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes).await?;
        self.0.flush().await
    }
}

/// MQTT in WebSocket binary frames (a packet may span frames, and a frame hold several).
pub struct WsTransport {
    /// The upgraded connection.
    pub socket: WebSocket,
    /// Pings a quiet device's connection, so that it does not count as idle.
    pub ping: tokio::time::Interval,
    /// What the connection may read before the CONNECT (lifted after it).
    pub allowance: Option<ReadAllowance>,
}

impl Transport for WsTransport {
    async fn read_more(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        loop {
            tokio::select! {
                frame = self.socket.recv() => match frame {
                    None | Some(Ok(Frame::Close(_))) => return Ok(0),
                    Some(Err(error)) => return Err(io::Error::other(error)),
                    Some(Ok(Frame::Binary(bytes))) if !bytes.is_empty() => {
                        buffer.extend_from_slice(&bytes);
                        return Ok(bytes.len());
                    }
                    Some(Ok(Frame::Text(_))) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "MQTT over WebSocket is binary frames"));
                    }
                    Some(Ok(_)) => {}
                },
                _ = self.ping.tick() => {
                    self.socket.send(Frame::Ping(Default::default())).await.map_err(io::Error::other)?;
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.socket
            .send(Frame::Binary(bytes.to_vec().into()))
            .await
            .map_err(io::Error::other)
    }

    fn connected(&mut self) {
        if let Some(allowance) = self.allowance.take() {
            allowance.lift();
        }
    }
}

/// Bytes given in advance, read in chunks of `chunk` bytes and then the end; what the
/// gateway sends is kept. For tests and the fuzz target, which feed a connection as a
/// socket would without one.
#[cfg(any(test, feature = "fuzzing"))]
pub struct Scripted<'a> {
    /// What is still to be read.
    pub input: &'a [u8],
    /// The most one read gives.
    pub chunk: usize,
    /// What the gateway sent.
    pub sent: Vec<u8>,
}

#[cfg(any(test, feature = "fuzzing"))]
impl Transport for &mut Scripted<'_> {
    async fn read_more(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        let n = self.chunk.max(1).min(self.input.len());
        buffer.extend_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sent.extend_from_slice(bytes);
        Ok(())
    }
}
