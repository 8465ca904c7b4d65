//! `sluice spool drain`: another instance's data directory, delivered.
//!
//! An instance acknowledges a message once it is in the spool on its own volume. When the
//! instance dies for good, what it acknowledged waits there: its volume, re-attached to a
//! replacement or mounted beside a running gateway, is drained by this command. It takes
//! the directory's lock (a directory a live gateway holds is refused), runs the directory's
//! dead letters again (a sink's refusal goes back to its queue, a plugin's failure through
//! the chain again, as `sluice dlq redrive` does), delivers every queue to the configured
//! sinks as the dead instance would have, and says what it delivered and what is left.
//!
//! The sinks' own connections carry the dead instance's id (kept in its data directory),
//! so they take no other instance's connection at IoT Core.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::config::Config;
use crate::record::SinkId;

/// What a drain did.
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    /// The data directory.
    pub data_dir: String,
    /// Its instance id (the one its sinks' connections carried).
    pub instance: String,
    /// Per sink: records delivered, and left in its queue (not delivered before the
    /// timeout: its sink kept failing).
    pub sinks: Vec<SinkDrain>,
    /// Dead letters found and run again.
    pub dead_letters_redriven: usize,
    /// Dead letters in the store at the end: refused again (by a plugin, a rule or a
    /// sink), with their reasons in the store (`sluice dlq`).
    pub dead_letters_left: u64,
    /// Whether everything was delivered: no record and no dead letter left.
    pub complete: bool,
    /// How long the drain took.
    pub seconds: f64,
}

/// One sink's part of a drain.
#[derive(Debug, Clone, Serialize)]
pub struct SinkDrain {
    /// `kinesis`, `iot-core` or `local`.
    pub sink: &'static str,
    /// Records that left the queue delivered (or refused for good, then dead letters).
    pub delivered: u64,
    /// Records still in the queue.
    pub left: u64,
}

/// Dead letters redriven per request, as `sluice dlq redrive --all` does.
const REDRIVE_PAGE: usize = 100;

/// Drains `config.server.data_dir` to `config`'s sinks, for at most `timeout`
/// (`server.instance_id` is not used: the sinks' connections carry the id kept in the
/// directory, the dead instance's).
pub async fn drain(config: &Config, timeout: Duration) -> anyhow::Result<DrainReport> {
    let started = Instant::now();
    let dir = &config.server.data_dir;
    anyhow::ensure!(
        dir.join("spool.redb").is_file(),
        "{} holds no spool: is it a gateway's data directory?",
        dir.display()
    );
    let instance = crate::instance::resolve(None, dir)?;
    let spool = Arc::new(crate::spool::Spool::open(
        dir,
        config.spool.max_bytes_per_sink,
    )?);
    spool.set_dead_letter_limit(u64::MAX);
    let local = Arc::new(crate::sink::local::LocalSink::open(dir)?);
    let plugins = crate::plugin::Plugins::start(config)?;
    let sinks = Arc::new(crate::sink::Sinks::build(config, &instance, local.clone(), None).await?);
    let pipeline =
        crate::pipeline::Pipeline::new(config, plugins.clone(), sinks.clone(), spool.clone());

    // The letters stored now, run again once each: one refused again comes back under a
    // new key, and stays.
    let mut keys = Vec::new();
    loop {
        let from = keys.last().map_or(0, |key| key + 1);
        let page = spool.dead_letters(from, REDRIVE_PAGE)?;
        if page.is_empty() {
            break;
        }
        keys.extend(page.into_iter().map(|(key, _)| key));
    }
    for chunk in keys.chunks(REDRIVE_PAGE) {
        pipeline
            .redrive(chunk)
            .await
            .context("cannot run the dead letters again")?;
    }

    let waiting = |sink: SinkId| spool.depth(sink);
    let before: Vec<u64> = SinkId::ALL.iter().map(|sink| waiting(*sink)).collect();
    let (_drain, draining) = tokio::sync::watch::channel(true);
    let deliverers =
        crate::spool::deliver::start(spool.clone(), sinks, config.spool.expired, draining);
    let aborts: Vec<_> = deliverers.iter().map(|d| d.abort_handle()).collect();
    let all = futures_util::future::join_all(deliverers);
    if tokio::time::timeout(timeout, all).await.is_err() {
        aborts.iter().for_each(tokio::task::AbortHandle::abort);
    }
    let sinks: Vec<SinkDrain> = SinkId::ALL
        .iter()
        .zip(before)
        .map(|(sink, before)| {
            let left = waiting(*sink);
            SinkDrain {
                sink: sink.name(),
                delivered: before.saturating_sub(left),
                left,
            }
        })
        .collect();
    let dead_letters_left = spool.stats().dead_letters;
    plugins.stop();
    local.close();
    spool.close();
    Ok(DrainReport {
        data_dir: dir.display().to_string(),
        instance,
        complete: dead_letters_left == 0 && sinks.iter().all(|s| s.left == 0),
        sinks,
        dead_letters_redriven: keys.len(),
        dead_letters_left,
        seconds: started.elapsed().as_secs_f64(),
    })
}
