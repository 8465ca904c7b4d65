//! Network tools for tests that must see exactly what happens on one connection: a raw
//! HTTP/1.1 client that keeps its one TCP connection (no silent reconnects, no pool),
//! and a TCP proxy whose link a test can cut and restore (a network outage between the
//! gateway and a server that itself keeps running).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An answer read off a raw connection.
pub struct RawReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for RawReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawReply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP/1.1 connection to `http://ADDR`, used for every request made through it.
pub struct RawHttp {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    host: String,
}

impl RawHttp {
    /// Connects to a gateway URL (`http://127.0.0.1:PORT`).
    pub fn connect(url: &str) -> RawHttp {
        let host = url
            .strip_prefix("http://")
            .expect("a plain http:// URL")
            .to_string();
        let stream = TcpStream::connect(&host).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        RawHttp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            host,
        }
    }

    /// Sends a request head announcing `content_length` body bytes, with `extra` headers.
    pub fn send_head(
        &mut self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        content_length: usize,
    ) -> std::io::Result<()> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {content_length}\r\n",
            self.host
        );
        for (name, value) in extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        self.writer.write_all(head.as_bytes())
    }

    pub fn send_body(&mut self, body: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(body)
    }

    /// A whole request and its answer.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<RawReply> {
        self.send_head(method, path, extra, body.len())?;
        self.send_body(body)?;
        self.read_reply()
    }

    /// Reads one answer (an interim `100 Continue` too: it has no body).
    pub fn read_reply(&mut self) -> std::io::Result<RawReply> {
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection was closed before an answer",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(bad("end of stream in the headers".into()));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("header {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut reply = RawReply {
            status,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) {
            return Ok(reply);
        }
        if let Some(length) = reply.header("content-length") {
            let length: usize = length.parse().map_err(|_| bad("content-length".into()))?;
            reply.body = vec![0; length];
            self.reader.read_exact(&mut reply.body)?;
        } else if reply.header("transfer-encoding") == Some("chunked") {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let size = usize::from_str_radix(size.trim(), 16)
                    .map_err(|_| bad(format!("chunk size {size:?}")))?;
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                reply.body.extend_from_slice(&chunk[..size]);
            }
        }
        Ok(reply)
    }
}

/// Requests caught in flight: each connection has sent its request head with
/// `Expect: 100-continue` and been told `100 Continue`, so the gateway is inside the
/// handler, waiting for the body.
pub fn requests_in_flight(url: &str, count: usize, topic: &str) -> Vec<(RawHttp, Vec<u8>)> {
    (0..count)
        .map(|n| {
            let mut raw = RawHttp::connect(url);
            let body = format!(r#"{{"in_flight":{n}}}"#).into_bytes();
            let device = format!("in-flight-{n}");
            raw.send_head(
                "POST",
                &format!("/topics/{topic}"),
                &[("x-device-id", &device), ("expect", "100-continue")],
                body.len(),
            )
            .unwrap();
            let interim = raw.read_reply().expect("an interim answer");
            assert_eq!(interim.status, 100, "{interim:?}");
            (raw, body)
        })
        .collect()
}

/// Finishes requests caught in flight: every one must be answered 200 with an id.
pub fn finish_in_flight(requests: Vec<(RawHttp, Vec<u8>)>) -> Vec<String> {
    requests
        .into_iter()
        .map(|(mut raw, body)| {
            raw.send_body(&body)
                .expect("the connection of a request in flight stays open");
            let reply = raw
                .read_reply()
                .expect("a request in flight at SIGTERM is answered");
            assert_eq!(reply.status, 200, "{reply:?}");
            reply.json()["id"].as_str().expect("an id").to_string()
        })
        .collect()
}

/// A TCP proxy on 127.0.0.1 to `upstream`. [`Proxy::cut`] closes every connection it
/// carries and refuses new ones (each is closed as soon as it is accepted) until
/// [`Proxy::restore`]. [`Proxy::hold_answers`] keeps what `upstream` sends (a broker's
/// PUBACKs) from reaching the clients, as a slow link would, until
/// [`Proxy::release_answers`].
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

struct ProxyState {
    open: AtomicBool,
    stopped: AtomicBool,
    connections: Mutex<Vec<TcpStream>>,
    /// Whether bytes from `upstream` wait before they are passed on.
    holding: Mutex<bool>,
    released: std::sync::Condvar,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            open: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            holding: Mutex::new(false),
            released: std::sync::Condvar::new(),
        });
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if !shared.open.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let mut connections = shared.connections.lock().unwrap();
                connections.push(client.try_clone().unwrap());
                connections.push(server.try_clone().unwrap());
                drop(connections);
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                answers(server, client, shared.clone());
            }
        });
        Proxy { port, state }
    }

    /// The outage: every carried connection is closed, new ones are closed at once.
    pub fn cut(&self) {
        self.state.open.store(false, Ordering::SeqCst);
        for stream in self.state.connections.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// The link is back: new connections are carried again.
    pub fn restore(&self) {
        self.state.open.store(true, Ordering::SeqCst);
    }

    /// What `upstream` sends from now on waits in the proxy.
    pub fn hold_answers(&self) {
        *self.state.holding.lock().unwrap() = true;
    }

    /// What waited, and what comes after, is passed on.
    pub fn release_answers(&self) {
        *self.state.holding.lock().unwrap() = false;
        self.state.released.notify_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.state.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies what `server` sends to `client`, each read waiting while the proxy holds
/// answers, until either ends; then closes both.
fn answers(mut server: TcpStream, mut client: TcpStream, state: Arc<ProxyState>) {
    use std::io::{Read as _, Write as _};
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        while let Ok(read) = server.read(&mut buffer) {
            if read == 0 {
                break;
            }
            let holding = state.holding.lock().unwrap();
            drop(
                state
                    .released
                    .wait_while(holding, |holding| *holding)
                    .unwrap(),
            );
            if client.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        let _ = server.shutdown(Shutdown::Both);
        let _ = client.shutdown(Shutdown::Both);
    });
}

/// Copies `from` to `to` until either ends, then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// Whether a TCP connection to `url`'s address is refused (the listener is closed).
pub fn refuses_connections(url: &str) -> bool {
    let address = url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    TcpStream::connect(address).is_err()
}
