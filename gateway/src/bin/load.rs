//! `sluice-load`: drives a Sluice gateway (or anything answering the same POSTs) with many
//! connections and reports throughput and latency percentiles.
//!
//! With `--ws`, each connection is a WebSocket session (`sluice.v1`) that keeps `--window`
//! publishes in flight and measures each from send to acknowledgement. With `--hold`, it
//! opens that many WebSocket sessions, waits for every welcome, prints `holding N
//! sessions`, and keeps them idle for `--duration` seconds (for measuring the gateway's
//! memory per connection).
//!
//! Each connection is one task with its own HTTP/1.1 client and one socket, sending a
//! request, waiting for the answer, and sending the next (closed loop). With `--rate`
//! the connections share a fixed request rate instead (open loop), and latency counts
//! from when each request was due, so a stalled server shows in the percentiles instead
//! of hiding in fewer requests (no coordinated omission).

use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;

/// Drive a gateway over HTTP and report requests/s and latency percentiles.
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
    /// With --ws: publishes in flight per session (at most the gateway's window).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Open this many idle WebSocket sessions and hold them for --duration seconds.
    #[arg(long)]
    hold: Option<usize>,
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

fn payload(size: usize, device: usize) -> Vec<u8> {
    let head = format!(r#"{{"device":{device},"temp":21.5,"pad":""#);
    let fill = size.saturating_sub(head.len() + 2);
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

/// Opens `count` idle sessions, reports when all are open, holds them.
async fn hold(args: std::sync::Arc<Args>, count: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(count);
    // A few hundred handshakes at a time: a burst of 10,000 SYNs overflows the backlog.
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut opened = 0;
    use futures_util::StreamExt as _;
    while opened < count || !pending.is_empty() {
        while opened < count && pending.len() < 256 {
            let args = args.clone();
            pending.push(async move { ws_connect(&args, opened).await });
            opened += 1;
        }
        if let Some(socket) = pending.next().await {
            sockets.push(socket?);
        }
    }
    println!(
        "holding {} sessions (opened in {:.1} s)",
        sockets.len(),
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    drop(sockets);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(Args::parse());
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(count) = args.hold {
        return runtime.block_on(hold(args.clone(), count));
    }
    let tally = runtime.block_on(async {
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(args.warmup);
        let end = measure_from + Duration::from_secs_f64(args.duration);
        let tasks: Vec<_> = (0..args.connections)
            .map(|i| {
                if args.ws {
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
        "transport": if args.ws { "websocket" } else { "http" },
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
            "{} connections, {} B payloads, {:.1} s: {} ok ({} req/s, {} MiB/s), {} failed {}",
            args.connections,
            args.payload_bytes,
            seconds,
            tally.ok,
            report["requests_per_sec"],
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
