//! The operator's console: a page on the admin listener that shows the gateway's live
//! state (traffic, routes, plugins, dead letters, devices, configuration) and acts on it
//! through the admin API.
//!
//! # Layout
//! - [`page`]: the page and its assets (HTML, CSS, JavaScript, the vendored uPlot),
//!   embedded in the binary; served without the token, since they hold no data.
//! - [`api`]: the JSON the page reads that the admin API did not have: an overview of
//!   the moment, the time series, the running configuration. Behind the admin token, like
//!   every other admin route.
//! - [`history`]: the time series, one point per second for 15 minutes, in memory.
//! - [`exposition`]: the gateway's Prometheus text read back into numbers.
//!
//! [`start`] begins sampling once a second; the admin listener mounts [`page::router`]
//! and [`api::router`].

pub mod api;
pub mod exposition;
pub mod history;
pub mod page;

use std::sync::{Arc, Mutex};

use crate::shutdown::Shutdown;

/// What the console's endpoints and sampler read.
#[derive(Clone)]
pub struct Console {
    /// The message path: spool, plugins.
    pub pipeline: Arc<crate::pipeline::Pipeline>,
    /// The running configuration.
    pub reloader: Arc<crate::reconfigure::Reloader>,
    /// The time series.
    pub history: Arc<Mutex<history::History>>,
}

impl Console {
    /// A console with an empty history.
    pub fn new(
        pipeline: Arc<crate::pipeline::Pipeline>,
        reloader: Arc<crate::reconfigure::Reloader>,
    ) -> Console {
        Console {
            pipeline,
            reloader,
            history: Arc::default(),
        }
    }

    /// Reads the metrics and the spool now and adds the reading to the history.
    pub fn sample(&self) {
        let samples = exposition::parse(&crate::metrics::METRICS.render());
        let reading =
            history::Reading::from_samples(now_ms(), &samples, &self.pipeline.spool().stats());
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(reading);
    }
}

/// Samples once a second until `shutdown` fires.
pub fn start(console: Console, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks =
            tokio::time::interval(std::time::Duration::from_millis(history::INTERVAL_MS));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => console.sample(),
                () = shutdown.wait() => break,
            }
        }
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
