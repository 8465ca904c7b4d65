//! One device session's connection to the endpoint: TCP, TLS with the gateway's
//! certificate, the CONNECT exchange, and MQTT 5 packets read and written with rumqttc's
//! codec (its `mqttbytes`).
//!
//! Written here rather than driven by rumqttc's event loop because the gateway holds one
//! of these per receiving device, mostly idle, and rumqttc's client sizes its state up
//! front: a queue of 100 events, a bit set for every packet id, 8 KiB read and write
//! buffers and a slot per publish in flight, about 98 KB per session (measured,
//! BENCHMARKS.md). Here nothing is held between packets but the TLS session: the read
//! buffer is let go once it holds no part of a packet, and a write's bytes once they are
//! written.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::Error as CodecError;
use rumqttc::v5::mqttbytes::v5::{ConnAck, ConnectReturnCode, Packet};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

/// The longest connecting takes, from the TCP connect to the CONNACK (rumqttc's default
/// too).
pub const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// Bytes taken from the TLS session per read: on the stack for the time of one poll, so
/// that an idle session holds no read buffer.
const READ_CHUNK: usize = 4096;

/// Why the connection could not be made, or ended.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The network or TLS failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The CONNACK did not come in time.
    #[error("no CONNACK within {} s", CONNECT_WITHIN.as_secs())]
    Timeout,
    /// The endpoint refused the CONNECT.
    #[error("the endpoint refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    /// The endpoint sent something that is not MQTT 5, or larger than announced.
    #[error("malformed packet from the endpoint: {0}")]
    Malformed(CodecError),
    /// The endpoint answered CONNECT with another packet.
    #[error("the endpoint answered CONNECT with {0}")]
    NotConnAck(&'static str),
    /// The endpoint closed the connection.
    #[error("the endpoint closed the connection")]
    Closed,
}

/// A connection to the endpoint that has its CONNACK.
pub struct Wire {
    /// The TLS session.
    stream: TlsStream<TcpStream>,
    /// Bytes read and not yet a whole packet (no capacity when there are none).
    read: BytesMut,
    /// The largest packet taken (announced in the CONNECT).
    max_incoming: u32,
    /// The largest packet the endpoint takes (from its CONNACK).
    max_outgoing: Option<u32>,
}

/// Connects to `host`:`port` with `tls`, sends `connect` (a [`Packet::Connect`] that
/// announces `max_incoming`) and waits for the CONNACK: the connection, and the
/// endpoint's answer when it accepted.
pub async fn connect(
    tls: Arc<ClientConfig>,
    host: &str,
    port: u16,
    connect: &Packet,
    max_incoming: u32,
) -> Result<(Wire, ConnAck), WireError> {
    let connecting = async {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        let mut wire = Wire {
            stream,
            read: BytesMut::new(),
            max_incoming,
            max_outgoing: None,
        };
        let mut bytes = BytesMut::new();
        wire.encode(connect, &mut bytes)
            .map_err(WireError::Malformed)?;
        wire.send(&bytes).await?;
        match wire.read().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                wire.max_outgoing = ack.properties.as_ref().and_then(|p| p.max_packet_size);
                Ok((wire, ack))
            }
            Packet::ConnAck(ack) => Err(WireError::Refused(ack.code)),
            other => Err(WireError::NotConnAck(name_of(&other))),
        }
    };
    tokio::time::timeout(CONNECT_WITHIN, connecting)
        .await
        .unwrap_or(Err(WireError::Timeout))
}

impl Wire {
    /// The next packet from the endpoint. Cancel-safe: bytes read stay for the next call.
    pub async fn read(&mut self) -> Result<Packet, WireError> {
        loop {
            if !self.read.is_empty() {
                match Packet::read(&mut self.read, Some(self.max_incoming)) {
                    Ok(packet) => {
                        if self.read.is_empty() {
                            // The packet's bytes keep what they share; the rest goes.
                            self.read = BytesMut::new();
                        }
                        return Ok(packet);
                    }
                    Err(CodecError::InsufficientBytes(_)) => {}
                    Err(error) => return Err(WireError::Malformed(error)),
                }
            }
            if poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Err(WireError::Closed);
            }
        }
    }

    /// Reads what the TLS session has into the buffer; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf))?;
        self.read.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }

    /// Appends `packet` to `out`; an error (and nothing appended) when it is larger than
    /// the endpoint takes.
    pub fn encode(&self, packet: &Packet, out: &mut BytesMut) -> Result<(), CodecError> {
        packet.write(out, self.max_outgoing).map(|_| ())
    }

    /// Writes `bytes` (whole packets) and flushes them. Not cancel-safe: a write cut
    /// short leaves a packet half written.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Ends the TLS session and the connection.
    pub async fn shut(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// A packet's name, for errors.
pub fn name_of(packet: &Packet) -> &'static str {
    match packet {
        Packet::Auth(_) => "AUTH",
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PingReq(_) => "PINGREQ",
        Packet::PingResp(_) => "PINGRESP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::Disconnect(_) => "DISCONNECT",
    }
}
