//! What every device listener does to the connections it accepts, so that slow or idle
//! clients cannot hold sockets for ever and one client cannot take them all:
//!
//! - **a connection limit** (`server.max_connections`): a connection accepted beyond it
//!   is closed at once;
//! - **a handshake timeout** (`server.handshake_timeout_secs`) for TLS;
//! - **a first-request timeout** (`server.header_timeout_secs`): until the end of the
//!   first request head (`\r\n\r\n`; the HTTP/2 preface ends with one too) has been read
//!   or the server has written something, the client has this long. hyper's own header
//!   timeout covers the requests after it, but not the protocol detection before the
//!   first, where a client sending half a request line would otherwise wait for ever;
//! - **an idle timeout** (`server.idle_timeout_secs`): a read that waits this long
//!   with nothing written meanwhile ends the connection;
//! - **a write timeout** (`server.write_timeout_secs`): a write (or flush) that makes no
//!   progress this long ends the connection: a client that stops reading cannot hold a
//!   session, its place in `GET /admin/devices` or its client id, while the task that
//!   writes to it waits (and reads nothing, so the idle timeout never fires).
//!
//! - **a read allowance**, set by what the connection carries ([`ReadAllowance`]): MQTT
//!   over WebSocket may read only so many bytes before its CONNECT, so that a client
//!   that has not authenticated cannot make the gateway buffer a frame of the full
//!   packet size (a WebSocket frame is read whole before MQTT sees any of it).
//!
//! Each closed connection is counted in `sluice_connections_closed_total` with its
//! reason, open ones in `sluice_connections`.
//!
//! Written here rather than taken from a crate: `tokio-io-timeout` times reads and writes
//! one at a time, but a read waiting while the server writes (a WebSocket session's
//! pings, a response being sent) is not idle, and the first-request deadline needs to
//! see the bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::config::ServerConfig;

/// The limits of one listener.
#[derive(Clone)]
pub struct Guard {
    /// The listener's name in metrics (`http`, later `mqtt`).
    listener: &'static str,
    /// One permit per open connection.
    slots: Arc<Semaphore>,
    /// `server.max_connections`.
    max: usize,
    /// `server.handshake_timeout_secs`.
    pub handshake_timeout: Duration,
    /// `server.header_timeout_secs`.
    pub first_request_timeout: Duration,
    /// `server.idle_timeout_secs`.
    pub idle_timeout: Duration,
    /// `server.write_timeout_secs`.
    pub write_timeout: Duration,
}

/// An open connection's place under the limit; given back on drop.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        gauge(self.listener).dec();
    }
}

fn gauge(listener: &'static str) -> prometheus_client::metrics::gauge::Gauge {
    crate::metrics::METRICS
        .connections
        .get_or_create(&crate::metrics::ListenerLabel {
            listener: listener.to_string(),
        })
        .clone()
}

impl Guard {
    /// The limits of `server` for the listener called `listener`.
    pub fn new(listener: &'static str, server: &ServerConfig) -> Guard {
        Guard {
            listener,
            slots: Arc::new(Semaphore::new(server.max_connections)),
            max: server.max_connections,
            handshake_timeout: Duration::from_secs(server.handshake_timeout_secs),
            first_request_timeout: Duration::from_secs(server.header_timeout_secs),
            idle_timeout: Duration::from_secs(server.idle_timeout_secs),
            write_timeout: Duration::from_secs(server.write_timeout_secs),
        }
    }

    /// A place for a connection just accepted, or `None` when the listener is full (the
    /// caller closes the connection; it is counted here).
    pub fn admit(&self) -> Option<Slot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                gauge(self.listener).inc();
                Some(Slot {
                    _permit: permit,
                    listener: self.listener,
                })
            }
            Err(_) => {
                self.closed("refused_full");
                tracing::warn!(
                    listener = self.listener,
                    max = self.max,
                    "connection refused: server.max_connections are open"
                );
                None
            }
        }
    }

    /// Counts a connection closed for `reason`.
    pub fn closed(&self, reason: &str) {
        crate::metrics::METRICS.connection_closed(self.listener, reason);
    }

    /// Runs a TLS `handshake` within the handshake timeout; `None` (counted) when it
    /// fails or takes too long.
    pub async fn handshake<T, E: std::fmt::Display>(
        &self,
        peer: std::net::SocketAddr,
        handshake: impl Future<Output = Result<T, E>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.closed("handshake_timeout");
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        }
    }

    /// `stream` with the first-request and idle timeouts.
    pub fn watch<S>(&self, stream: S) -> Guarded<S> {
        self.watch_idle(stream, self.idle_timeout)
    }

    /// `stream` with the first-request timeout and an idle timeout of its own (an MQTT
    /// connection's keep-alive can be far longer than an HTTP connection's idle time).
    pub fn watch_idle<S>(&self, stream: S, idle_timeout: Duration) -> Guarded<S> {
        Guarded {
            inner: stream,
            deadline: Box::pin(tokio::time::sleep(self.first_request_timeout)),
            first_request: Some(FirstRequest::default()),
            first_request_timeout: self.first_request_timeout,
            idle_timeout,
            write_stalled: None,
            allowance: ReadAllowance::default(),
            guard: self.clone(),
        }
    }
}

/// How many more bytes a connection may read; unlimited unless set. Shared between the
/// connection's [`Guarded`] stream and what runs on it (the request that upgrades it).
#[derive(Clone, Debug)]
pub struct ReadAllowance(Arc<AtomicUsize>);

impl Default for ReadAllowance {
    fn default() -> ReadAllowance {
        ReadAllowance(Arc::new(AtomicUsize::new(usize::MAX)))
    }
}

impl ReadAllowance {
    /// From now on, the connection may read `bytes` more.
    pub fn limit(&self, bytes: usize) {
        self.0.store(bytes, Ordering::Relaxed);
    }

    /// From now on, the connection reads without limit.
    pub fn lift(&self) {
        self.0.store(usize::MAX, Ordering::Relaxed);
    }

    /// Takes `read` bytes from the allowance; false when they were more than was left.
    /// (Only the connection's reader spends, so load-then-store does not race.)
    fn spend(&self, read: usize) -> bool {
        let left = self.0.load(Ordering::Relaxed);
        if left == usize::MAX {
            return true;
        }
        self.0.store(left.saturating_sub(read), Ordering::Relaxed);
        read <= left
    }
}

/// Looks for the end of the first request head in the bytes read.
#[derive(Default)]
struct FirstRequest {
    /// The last bytes seen, so that a `\r\n\r\n` split across reads is found.
    tail: [u8; 3],
}

impl FirstRequest {
    /// Whether `bytes` (read after the ones seen so far) end the first request head.
    fn ends_in(&mut self, bytes: &[u8]) -> bool {
        // The bytes that may finish a `\r\n\r\n` begun in the last read, then the rest.
        let mut joined = self.tail.to_vec();
        joined.extend_from_slice(&bytes[..bytes.len().min(3)]);
        if joined.windows(4).any(|w| w == b"\r\n\r\n") || bytes.windows(4).any(|w| w == b"\r\n\r\n")
        {
            return true;
        }
        let mut last = self.tail.to_vec();
        last.extend_from_slice(bytes);
        self.tail.copy_from_slice(&last[last.len() - 3..]);
        false
    }
}

/// A connection under a [`Guard`]'s timeouts: a read that is due fails with
/// `TimedOut`, which ends the connection.
pub struct Guarded<S> {
    inner: S,
    /// When the connection is closed if nothing happens: the first-request deadline
    /// while `first_request` is `Some`, then the idle deadline.
    deadline: Pin<Box<Sleep>>,
    first_request: Option<FirstRequest>,
    first_request_timeout: Duration,
    idle_timeout: Duration,
    /// Since the write waiting now made no progress: the write deadline (made on the
    /// first stall, so that a connection that never stalls carries none).
    write_stalled: Option<(bool, Pin<Box<Sleep>>)>,
    /// How much more may be read.
    allowance: ReadAllowance,
    guard: Guard,
}

impl<S> Guarded<S> {
    /// The connection's read allowance, for what runs on it to set.
    pub fn allowance(&self) -> ReadAllowance {
        self.allowance.clone()
    }

    /// Something happened: the idle deadline moves (the first-request one does not).
    fn active(&mut self) {
        if self.first_request.is_none() {
            self.deadline
                .as_mut()
                .reset(Instant::now() + self.idle_timeout);
        }
    }

    /// A write made progress: a later stall starts a new write deadline.
    fn wrote(&mut self) {
        if let Some((stalled, _)) = &mut self.write_stalled {
            *stalled = false;
        }
    }

    /// A write could not go on: pending until it has stalled for the write timeout,
    /// then the error that ends the connection (counted).
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.guard.write_timeout;
        let (stalled, deadline) = self
            .write_stalled
            .get_or_insert_with(|| (false, Box::pin(tokio::time::sleep(timeout))));
        if !*stalled {
            *stalled = true;
            deadline.as_mut().reset(Instant::now() + timeout);
        }
        ready!(deadline.as_mut().poll(cx));
        self.guard.closed("write_timeout");
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("write_timeout: the client read nothing for {timeout:?}"),
        ))
    }

    /// The first request is in: from now on only the idle timeout applies.
    fn first_request_done(&mut self) {
        if self.first_request.take().is_some() {
            self.active();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let read = &buf.filled()[before..];
                if !self.allowance.spend(read.len()) {
                    self.guard.closed("read_allowance");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "read_allowance: the client sent more than it may yet",
                    )));
                }
                if !read.is_empty() {
                    let ended = self
                        .first_request
                        .as_mut()
                        .is_some_and(|first| first.ends_in(read));
                    if ended {
                        self.first_request_done();
                    } else {
                        self.active();
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                ready!(self.deadline.as_mut().poll(cx));
                let (reason, after) = if self.first_request.is_some() {
                    ("first_request_timeout", self.first_request_timeout)
                } else {
                    ("idle_timeout", self.idle_timeout)
                };
                self.guard.closed(reason);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{reason}: nothing for {after:?}"),
                )))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Poll::Ready(written) = Pin::new(&mut self.inner).poll_write(cx, buf) else {
            return self.stalled(cx).map(Err);
        };
        if matches!(written, Ok(n) if n > 0) {
            // The server answers only once it has a request (or, for HTTP/2, the preface).
            self.first_request_done();
            self.active();
            self.wrote();
        }
        Poll::Ready(written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Poll::Ready(flushed) = Pin::new(&mut self.inner).poll_flush(cx) else {
            return self.stalled(cx).map(Err);
        };
        self.wrote();
        Poll::Ready(flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Poll::Ready(written) = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) else {
            return self.stalled(cx).map(Err);
        };
        if matches!(written, Ok(n) if n > 0) {
            self.first_request_done();
            self.active();
            self.wrote();
        }
        Poll::Ready(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A guard with short timeouts: 300 ms for the first request, 500 ms idle.
    fn guard(max: usize) -> Guard {
        let server = ServerConfig {
            max_connections: max,
            ..ServerConfig::default()
        };
        Guard {
            first_request_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_millis(400),
            ..Guard::new("test", &server)
        }
    }

    #[test]
    fn the_end_of_a_request_head_is_found_across_reads() {
        let mut first = FirstRequest::default();
        assert!(!first.ends_in(b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(first.ends_in(b"\n\r\n"));
        let mut first = FirstRequest::default();
        assert!(!first.ends_in(b"GET / HTTP/1.1\r\n"));
        assert!(!first.ends_in(b"\r"));
        assert!(first.ends_in(b"\n"));
        // A head over 4 KiB in one read (a large token) is still seen to end.
        let mut first = FirstRequest::default();
        let mut head = b"GET /commands?wait=60 HTTP/1.1\r\nauthorization: Bearer ".to_vec();
        head.extend(std::iter::repeat_n(b'x', 8000));
        head.extend_from_slice(b"\r\n\r\n");
        assert!(first.ends_in(&head));
    }

    #[test]
    fn connections_past_the_limit_get_no_slot_until_one_closes() {
        let guard = guard(2);
        let a = guard.admit().unwrap();
        let _b = guard.admit().unwrap();
        assert!(guard.admit().is_none());
        drop(a);
        assert!(guard.admit().is_some());
    }

    /// A client that sends half a request head is cut off at the first-request deadline;
    /// one that sends a whole one is then held to the idle timeout, which its traffic
    /// keeps moving.
    #[tokio::test]
    async fn half_a_request_times_out_and_traffic_keeps_a_connection_open() {
        let (client, server) = tokio::io::duplex(1024);
        let mut guarded = guard(10).watch(server);
        let (_client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 8);
        let started = Instant::now();
        let error = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");

        let (client, server) = tokio::io::duplex(1024);
        let mut guarded = guard(10).watch(server);
        let (_client_read, mut client_write) = tokio::io::split(client);
        client_write
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 18);
        // Traffic every 200 ms, under the 500 ms idle timeout, for over a second: more
        // than twice the idle timeout.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client_write.write_all(b"x").await.unwrap();
            assert_eq!(guarded.read(&mut buf).await.unwrap(), 1);
        }
        let started = Instant::now();
        let error = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(450));
    }

    /// A client that stops reading ends its connection once a write has made no
    /// progress for the write timeout; one that reads slowly (but reads) keeps it.
    #[tokio::test]
    async fn a_write_that_makes_no_progress_times_out() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = guard(10).watch(server);
        // Slow but reading: 64 bytes every 200 ms, under the 400 ms write timeout.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut read = 0;
            while read < 640 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                read += client.read(&mut buf).await.unwrap();
            }
            client
        });
        guarded.write_all(&[7u8; 640]).await.unwrap();
        let _client = reader.await.unwrap();
        // Not reading at all: the write fails after the write timeout.
        let started = Instant::now();
        let error = tokio::time::timeout(Duration::from_secs(5), guarded.write_all(&[7u8; 640]))
            .await
            .expect("the write gave up by itself")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(350), "{waited:?}");
    }
}
