//! The floor under Sluice's HTTP path, for `scripts/bench-cores` (`HTTP_SERVERS` `floor`
//! and `floor-durable`): the same HTTP stack as the gateway (hyper's auto builder under
//! an axum router, Tokio's multi-thread runtime with one worker per CPU, mimalloc) doing
//! no work of Sluice's: `POST /topics/{topic}` reads the body and answers IoT Core's
//! `{"message":"OK","traceId":…}`.
//!
//! With `--durable DIR`, each body first becomes a line of `DIR/floor.jsonl`, and the
//! answer waits until a writer thread (under `SCHED_BATCH`, as the gateway's writers) has
//! written and `fdatasync`ed it, in groups: every line that arrived while the previous
//! group was being synced goes in the next one. That is the least any server that
//! acknowledges only durable messages does per request, and what is left of a CPU budget
//! per request once it is paid is what Sluice's own work (authentication, policy,
//! plugins, routing, the spool's records) may cost.
//!
//! Usage: `http_floor [--durable DIR]`; prints `listening on http://ADDR`.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::sync::oneshot;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lines waiting for the writer, and who waits for each group.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    waiters: Vec<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Writer {
    pending: Mutex<Pending>,
    ready: Condvar,
}

impl Writer {
    /// Writes and syncs group after group, then tells the group's waiters.
    fn run(&self, mut file: std::fs::File) {
        let mut taken = Pending::default();
        loop {
            {
                let mut pending = self.pending.lock().expect("lock");
                while pending.waiters.is_empty() {
                    pending = self.ready.wait(pending).expect("lock");
                }
                std::mem::swap(&mut *pending, &mut taken);
            }
            file.write_all(&taken.lines).expect("write");
            file.sync_data().expect("fdatasync");
            taken.lines.clear();
            for waiter in taken.waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

async fn publish(
    State(writer): State<Option<Arc<Writer>>>,
    Path(topic): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(writer) = writer {
        let (done, synced) = oneshot::channel();
        {
            let mut pending = writer.pending.lock().expect("lock");
            serde_json::to_writer(
                &mut pending.lines,
                &serde_json::json!({ "topic": topic, "payload": String::from_utf8_lossy(&body) }),
            )
            .expect("a line");
            pending.lines.push(b'\n');
            pending.waiters.push(done);
        }
        writer.ready.notify_one();
        if synced.await.is_err() {
            return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    let answer = format!(r#"{{"message":"OK","traceId":"{}"}}"#, uuid::Uuid::now_v7());
    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let writer = match (args.next().as_deref(), args.next()) {
        (None, _) => None,
        (Some("--durable"), Some(dir)) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(std::path::Path::new(&dir).join("floor.jsonl"))?;
            let writer = Arc::new(Writer::default());
            let running = writer.clone();
            // Started as the gateway starts its writers (`SCHED_BATCH`): the floor is the
            // least such a server does, so it gets the same help.
            sluice_gateway::disk_thread::spawn("floor-writer", move || running.run(file))?;
            Some(writer)
        }
        _ => anyhow::bail!("usage: http_floor [--durable DIR]"),
    };
    let app = axum::Router::new()
        .route("/topics/{*topic}", axum::routing::post(publish))
        .with_state(writer);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            println!("listening on http://{}", listener.local_addr()?);
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let (service, builder) = (TowerToHyperService::new(app.clone()), builder.clone());
                tokio::spawn(async move {
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
}
