//! A WebSocket client for the tests (tokio-tungstenite), speaking `sluice.v1`.

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::harness::Gateway;

/// A client session.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A single-threaded runtime for driving a client.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Opens `GET /ws` as `device` (the `x-device-id` header), offering `protocol`; the
/// gateway must choose `sluice.v1`. `Err` carries the refusal.
pub async fn connect(gateway: &Gateway, device: &str, protocol: &str) -> Result<Socket, String> {
    let url = format!("{}/ws", gateway.url.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("sec-websocket-protocol", protocol.parse().unwrap());
    headers.insert("x-device-id", device.parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(response.headers()["sec-websocket-protocol"], "sluice.v1");
    Ok(socket)
}

/// The next JSON text frame (pings are answered by the client library while reading).
pub async fn next_json(socket: &mut Socket) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Frame::Text(text)))) => return serde_json::from_str(&text).unwrap(),
            Ok(Some(Ok(Frame::Ping(_) | Frame::Pong(_)))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}
