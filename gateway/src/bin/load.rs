//! `sluice-load`: drives a Sluice gateway (or anything answering the same POSTs, or any
//! MQTT 3.1.1 broker) with many connections and reports throughput and latency
//! percentiles.
//!
//! Each connection is one task with its own HTTP/1.1 client and one socket, sending a
//! request, waiting for the answer, and sending the next (closed loop). With `--rate`
//! the connections share a fixed request rate instead (open loop), and latency counts
//! from when each request was due, so a stalled server shows in the percentiles instead
//! of hiding in fewer requests (no coordinated omission).
//!
//! With `--ws`, each connection is a WebSocket session (`sluice.v1`) that keeps `--window`
//! publishes in flight and measures each from send to acknowledgement.
//!
//! With `--mqtt mqtt://HOST:PORT`, each connection is an MQTT 3.1.1 client over plain TCP
//! (client id `load-N`, clean session) that keeps `--window` QoS 1 publishes to `--topic`
//! in flight and measures each from send to PUBACK. It is a thin loop over rumqttc's
//! `mqttbytes` codec, not rumqttc's client, whose own queue and in-flight cap would stand
//! between the load and the socket; it works the same against Sluice and mosquitto.
//!
//! With `--hold`, it opens that many WebSocket sessions (with `--mqtt`: MQTT connections,
//! each waiting for its CONNACK and pinging at half its keep-alive), waits for every
//! welcome, prints `holding N sessions`, and keeps them idle for `--duration` seconds (for
//! measuring a server's memory per connection). `--persistent` makes each MQTT connection
//! keep a session (clean session off).
//!
//! `failed_by_status` counts HTTP statuses; `0` is a connection that could not be made
//! (for MQTT also a refused CONNACK), and with `--ws` and `--mqtt`, `1` is a publish
//! refused or left unacknowledged when the connection closed.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet, PingReq, Publish};
use rumqttc::mqttbytes::{self, QoS};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Drive a gateway over HTTP, WebSocket or MQTT and report requests/s and latency
/// percentiles.
#[derive(Debug, Parser)]
#[command(name = "sluice-load", version, about)]
struct Args {
    /// Base URL of the gateway, e.g. http://127.0.0.1:8080.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Path to POST to; `{device}` becomes the connection's device id.
    #[arg(long, default_value = "/topics/load/{device}")]
    path: String,
    /// Concurrent connections (one device each).
    #[arg(long, short, default_value_t = 32)]
    connections: usize,
    /// How long to measure, in seconds (after the warm-up).
    #[arg(long, short, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of traffic before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Payload size in bytes (a JSON object padded to this size).
    #[arg(long, short, default_value_t = 200)]
    payload_bytes: usize,
    /// Total requests per second across all connections (open loop); default: as fast
    /// as the server answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Use WebSocket sessions (`GET /ws`) instead of HTTP POSTs.
    #[arg(long)]
    ws: bool,
    /// Use MQTT 3.1.1 over plain TCP to this broker, e.g. mqtt://127.0.0.1:1883, instead
    /// of HTTP POSTs: QoS 1 publishes, each timed from send to PUBACK (--url is unused).
    #[arg(long, value_name = "URL", conflicts_with_all = ["ws", "rate"])]
    mqtt: Option<String>,
    /// With --mqtt: the topic to publish to; `{device}` becomes the connection's client id.
    #[arg(long, default_value = "load/{device}")]
    topic: String,
    /// With --ws or --mqtt: publishes in flight per connection (for --ws at most the
    /// gateway's window).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Open this many idle WebSocket sessions (with --mqtt: MQTT connections) and hold
    /// them for --duration seconds.
    #[arg(long)]
    hold: Option<usize>,
    /// With --mqtt: CONNECT with clean session off, so that each connection keeps a
    /// session (with Sluice's `[upstream]`: its own session at IoT Core, a bidirectional
    /// device).
    #[arg(long, requires = "mqtt")]
    persistent: bool,
    /// An extra request header, `NAME: VALUE` (repeatable), e.g. an Authorization.
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not NAME: VALUE"))?;
    Ok((name.trim().to_string(), value.trim().to_string()))
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    latency: Option<Histogram<u64>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            // 1 µs to 60 s, 3 significant digits.
            latency: Some(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
            ..Tally::default()
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        if let (Some(mine), Some(theirs)) = (&mut self.latency, &other.latency) {
            mine.add(theirs).expect("same bounds");
        }
    }
}

/// A JSON object of exactly `size` bytes, `{"device":N,"temp":21.5,"pad":"xx…"}`; below
/// that object's least size `{"pad":"xx…"}`, and below 10 bytes `size` x's (not JSON).
fn payload(size: usize, device: usize) -> Vec<u8> {
    let mut head = format!(r#"{{"device":{device},"temp":21.5,"pad":""#);
    if head.len() + 2 > size {
        head = r#"{"pad":""#.to_string();
    }
    if head.len() + 2 > size {
        return vec![b'x'; size];
    }
    let fill = size - (head.len() + 2);
    let mut body = head.into_bytes();
    body.extend(std::iter::repeat_n(b'x', fill));
    body.extend_from_slice(br#""}"#);
    body
}

async fn connection(
    args: std::sync::Arc<Args>,
    index: usize,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .http1_only()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client");
    let device = format!("load-{index}");
    let url = format!("{}{}", args.url, args.path.replace("{device}", &device));
    let body = bytes::Bytes::from(payload(args.payload_bytes, index));
    let interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(args.connections as f64 / rate));
    // Spread open-loop connections over one interval so they do not fire together.
    let mut due = start
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(index as f64 / args.connections as f64)
        });
    let mut tally = Tally::new();
    loop {
        // When this request is due: its latency counts from here.
        let slot = match interval {
            Some(interval) => {
                tokio::time::sleep_until(due.into()).await;
                let slot = due;
                due += interval;
                slot
            }
            None => Instant::now(),
        };
        // Open loop behind schedule: slots due before the end but reached after it are not
        // sent (they would run past the measured time and inflate the rate).
        if slot >= end || Instant::now() >= end {
            break;
        }
        let mut request = client
            .post(&url)
            .header("x-device-id", &device)
            .header("content-type", "application/json");
        for (name, value) in &args.headers {
            request = request.header(name, value);
        }
        let sent = request.body(body.clone()).send().await;
        let status = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                Some(status)
            }
            Err(_) => None,
        };
        if slot < measure_from {
            continue;
        }
        let micros = slot.elapsed().as_micros().clamp(1, 60_000_000) as u64;
        if let Some(histogram) = &mut tally.latency {
            histogram.saturating_record(micros);
        }
        match status {
            Some(status) if (200..300).contains(&status) => tally.ok += 1,
            Some(status) => {
                tally.failed += 1;
                *tally.statuses.entry(status).or_default() += 1;
            }
            None => {
                tally.failed += 1;
                *tally.statuses.entry(0).or_default() += 1;
            }
        }
    }
    tally
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(args: &Args, index: usize) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let url = format!("{}/ws", args.url.replacen("http", "ws", 1));
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "sluice.v1".parse()?);
    request
        .headers_mut()
        .insert("x-device-id", format!("load-{index}").parse()?);
    for (name, value) in &args.headers {
        request.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes())?,
            value.parse()?,
        );
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    // The welcome frame.
    use futures_util::StreamExt as _;
    socket
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("closed before the welcome"))??;
    Ok(socket)
}

/// One WebSocket session keeping `--window` publishes in flight.
async fn ws_connection(
    args: std::sync::Arc<Args>,
    index: usize,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message as Frame;
    let mut tally = Tally::new();
    let Ok(mut socket) = ws_connect(&args, index).await else {
        tally.failed += 1;
        *tally.statuses.entry(0).or_default() += 1;
        return tally;
    };
    let body = String::from_utf8(payload(args.payload_bytes, index)).expect("ASCII payload");
    let mut sent: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
    let mut next = 0u64;
    loop {
        while sent.len() < args.window && Instant::now() < end {
            let frame = format!(
                r#"{{"type":"publish","id":"{next}","topic":"load/{index}","payload":{body}}}"#
            );
            if socket.feed(Frame::Text(frame.into())).await.is_err() {
                return tally;
            }
            sent.insert(next, Instant::now());
            next += 1;
        }
        if sent.is_empty() {
            break;
        }
        if socket.flush().await.is_err() {
            return tally;
        }
        let Some(Ok(frame)) = socket.next().await else {
            return tally;
        };
        let Frame::Text(text) = frame else { continue };
        let Ok(reply) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let Some(id) = reply["id"].as_str().and_then(|id| id.parse::<u64>().ok()) else {
            continue;
        };
        let Some(at) = sent.remove(&id) else { continue };
        if at < measure_from || at >= end {
            continue;
        }
        if let Some(histogram) = &mut tally.latency {
            histogram.saturating_record(at.elapsed().as_micros().clamp(1, 60_000_000) as u64);
        }
        if reply["type"] == "ack" {
            tally.ok += 1;
        } else {
            tally.failed += 1;
            *tally.statuses.entry(1).or_default() += 1;
        }
    }
    let _ = socket.close(None).await;
    tally
}

/// Opens `count` connections with `connect` (given each one's index), a few hundred
/// handshakes at a time: a burst of 10,000 SYNs overflows the backlog. Prints `holding N
/// sessions` once all are open.
async fn open_all<T, F, Fut>(count: usize, connect: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    use futures_util::StreamExt as _;
    let started = Instant::now();
    let mut open = Vec::with_capacity(count);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut started_count = 0;
    while started_count < count || !pending.is_empty() {
        while started_count < count && pending.len() < 256 {
            pending.push(connect(started_count));
            started_count += 1;
        }
        if let Some(connection) = pending.next().await {
            open.push(connection?);
        }
    }
    println!(
        "holding {} sessions (opened in {:.1} s)",
        open.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(open)
}

/// Opens `count` idle WebSocket sessions, reports when all are open, holds them.
async fn hold(args: std::sync::Arc<Args>, count: usize) -> anyhow::Result<()> {
    let sockets = open_all(count, |index| {
        let args = args.clone();
        async move { ws_connect(&args, index).await }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    drop(sockets);
    Ok(())
}

/// Largest packet the MQTT client takes from the server (it expects CONNACK, PUBACK and
/// PINGRESP, a few bytes each).
const MQTT_MAX_PACKET: usize = 64 * 1024;
/// The keep-alive the MQTT clients ask for, in seconds: servers close a connection silent
/// for 1.5 times this, so held connections ping at half of it.
const MQTT_KEEP_ALIVE: u16 = 60;
/// How long a publishing MQTT client waits for its next PUBACK before it counts what is in
/// flight as failed and gives up (the HTTP mode's request timeout).
const MQTT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// `HOST:PORT` from `mqtt://HOST:PORT`.
fn mqtt_address(url: &str) -> anyhow::Result<String> {
    let address = url
        .strip_prefix("mqtt://")
        .ok_or_else(|| anyhow::anyhow!("--mqtt takes mqtt://HOST:PORT (plain TCP), not `{url}`"))?;
    Ok(address.trim_end_matches('/').to_string())
}

/// One MQTT 3.1.1 connection: the socket, and what was read of it past the last packet.
struct MqttClient {
    stream: TcpStream,
    read: BytesMut,
}

impl MqttClient {
    /// Connects to `address`, sends CONNECT (clean session unless `persistent`) and
    /// waits for the CONNACK.
    async fn connect(
        address: &str,
        client_id: &str,
        persistent: bool,
    ) -> anyhow::Result<MqttClient> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let mut client = MqttClient {
            stream,
            read: BytesMut::with_capacity(256),
        };
        let mut connect = Connect::new(client_id);
        connect.keep_alive = MQTT_KEEP_ALIVE;
        connect.clean_session = !persistent;
        let mut out = BytesMut::new();
        connect.write(&mut out)?;
        client.stream.write_all(&out).await?;
        match client.next().await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                ..
            }) => Ok(client),
            Packet::ConnAck(ack) => anyhow::bail!("CONNACK refused: {:?}", ack.code),
            other => anyhow::bail!("expected CONNACK, got {other:?}"),
        }
    }

    /// A packet already read whole, if there is one.
    fn buffered(&mut self) -> anyhow::Result<Option<Packet>> {
        match Packet::read(&mut self.read, MQTT_MAX_PACKET) {
            Ok(packet) => Ok(Some(packet)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The next packet from the server. Cancel-safe.
    async fn next(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(packet) = self.buffered()? {
                return Ok(packet);
            }
            if self.stream.read_buf(&mut self.read).await? == 0 {
                anyhow::bail!("the server closed the connection");
            }
        }
    }
}

/// One MQTT client keeping `--window` QoS 1 publishes in flight, each timed from its
/// send to its PUBACK.
async fn mqtt_connection(
    args: std::sync::Arc<Args>,
    address: String,
    index: usize,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let device = format!("load-{index}");
    let Ok(mut client) = MqttClient::connect(&address, &device, args.persistent).await else {
        tally.failed += 1;
        *tally.statuses.entry(0).or_default() += 1;
        return tally;
    };
    let mut publish = Publish::from_bytes(
        args.topic.replace("{device}", &device),
        QoS::AtLeastOnce,
        bytes::Bytes::from(payload(args.payload_bytes, index)),
    );
    // Packet id → when it was sent.
    let mut sent: std::collections::HashMap<u16, Instant> =
        std::collections::HashMap::with_capacity(args.window);
    let mut out = BytesMut::new();
    loop {
        let now = Instant::now();
        while sent.len() < args.window && now < end {
            // Packet ids run 1..=65535 (0 is not one); the window is below that, so a
            // free one is always near.
            publish.pkid = publish.pkid.checked_add(1).unwrap_or(1);
            if sent.contains_key(&publish.pkid) {
                continue;
            }
            publish
                .write(&mut out)
                .expect("a QoS 1 publish with a packet id");
            sent.insert(publish.pkid, now);
        }
        if !out.is_empty() {
            if client.stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        if sent.is_empty() {
            let mut bye = BytesMut::new();
            let _ = Packet::Disconnect.write(&mut bye, 2);
            let _ = client.stream.write_all(&bye).await;
            return tally;
        }
        // The next PUBACK, then any others already read, before sending more.
        let Ok(Ok(mut packet)) = tokio::time::timeout(MQTT_ACK_TIMEOUT, client.next()).await else {
            break;
        };
        loop {
            if let Packet::PubAck(ack) = packet
                && let Some(at) = sent.remove(&ack.pkid)
                && at >= measure_from
                && at < end
            {
                if let Some(histogram) = &mut tally.latency {
                    histogram
                        .saturating_record(at.elapsed().as_micros().clamp(1, 60_000_000) as u64);
                }
                tally.ok += 1;
            }
            match client.buffered() {
                Ok(Some(more)) => packet = more,
                Ok(None) => break,
                Err(_) => return mqtt_lost(tally, &sent, measure_from, end),
            }
        }
    }
    mqtt_lost(tally, &sent, measure_from, end)
}

/// The connection ended with `sent` unacknowledged: those sent while measuring failed.
fn mqtt_lost(
    mut tally: Tally,
    sent: &std::collections::HashMap<u16, Instant>,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let lost = sent
        .values()
        .filter(|at| **at >= measure_from && **at < end)
        .count() as u64;
    if lost > 0 {
        tally.failed += lost;
        *tally.statuses.entry(1).or_default() += lost;
    }
    tally
}

/// Keeps `client` open and idle until `until`, pinging at half its keep-alive; `false`
/// if the server closed it first.
async fn mqtt_idle(mut client: MqttClient, until: Instant) -> bool {
    let every = Duration::from_secs(u64::from(MQTT_KEEP_ALIVE) / 2);
    let mut ping = tokio::time::interval_at((Instant::now() + every).into(), every);
    let mut out = BytesMut::new();
    let _ = PingReq.write(&mut out);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => return true,
            _ = ping.tick() => {
                if client.stream.write_all(&out).await.is_err() {
                    return false;
                }
            }
            // PINGRESP; anything else is ignored too.
            packet = client.next() => if packet.is_err() {
                return false;
            },
        }
    }
}

/// Opens `count` idle MQTT connections, reports when all are open, holds them.
async fn mqtt_hold(
    args: std::sync::Arc<Args>,
    address: String,
    count: usize,
) -> anyhow::Result<()> {
    let persistent = args.persistent;
    let clients = open_all(count, |index| {
        let address = address.clone();
        async move { MqttClient::connect(&address, &format!("load-{index}"), persistent).await }
    })
    .await?;
    let until = Instant::now() + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(mqtt_idle(client, until)))
        .collect();
    let mut closed = 0;
    for task in tasks {
        if !task.await? {
            closed += 1;
        }
    }
    if closed > 0 {
        println!("{closed} sessions were closed by the server while held");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(Args::parse());
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let mqtt = args.mqtt.as_deref().map(mqtt_address).transpose()?;
    if mqtt.is_some() {
        anyhow::ensure!(
            (1..65535).contains(&args.window),
            "--window must be from 1 to 65534 with --mqtt (MQTT packet ids)"
        );
    }
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(count) = args.hold {
        return match mqtt {
            Some(address) => runtime.block_on(mqtt_hold(args.clone(), address, count)),
            None => runtime.block_on(hold(args.clone(), count)),
        };
    }
    let tally = runtime.block_on(async {
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(args.warmup);
        let end = measure_from + Duration::from_secs_f64(args.duration);
        let tasks: Vec<_> = (0..args.connections)
            .map(|i| {
                if let Some(address) = &mqtt {
                    tokio::spawn(mqtt_connection(
                        args.clone(),
                        address.clone(),
                        i,
                        measure_from,
                        end,
                    ))
                } else if args.ws {
                    tokio::spawn(ws_connection(args.clone(), i, measure_from, end))
                } else {
                    tokio::spawn(connection(args.clone(), i, start, measure_from, end))
                }
            })
            .collect();
        let mut total = Tally::new();
        for task in tasks {
            total.merge(task.await.expect("connection task"));
        }
        total
    });
    let histogram = tally.latency.expect("histogram");
    let seconds = args.duration;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let report = json!({
        "transport": if mqtt.is_some() { "mqtt" } else if args.ws { "websocket" } else { "http" },
        "connections": args.connections,
        "payload_bytes": args.payload_bytes,
        "seconds": seconds,
        "target_rate": args.rate,
        "ok": tally.ok,
        "failed": tally.failed,
        "failed_by_status": tally.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
        "requests_per_sec": (tally.ok as f64 / seconds).round(),
        "mib_per_sec": ((tally.ok as f64 * args.payload_bytes as f64) / seconds / 1048576.0 * 100.0).round() / 100.0,
        "latency_ms": {
            "p50": ms(0.50), "p90": ms(0.90), "p99": ms(0.99), "p999": ms(0.999),
            "max": histogram.max() as f64 / 1000.0,
        },
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} connections, {} B payloads, {:.1} s: {} ok ({} {}/s, {} MiB/s), {} failed {}",
            args.connections,
            args.payload_bytes,
            seconds,
            tally.ok,
            report["requests_per_sec"],
            if mqtt.is_some() { "publishes" } else { "req" },
            report["mib_per_sec"],
            tally.failed,
            if tally.statuses.is_empty() {
                String::new()
            } else {
                format!("{:?}", tally.statuses)
            },
        );
        println!(
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            histogram.max() as f64 / 1000.0
        );
    }
    Ok(())
}
