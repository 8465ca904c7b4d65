//! Progress of long work at start (the first compile of a large plugin, replaying a spool
//! backlog of several segments): a spinner or a bar with the elapsed time on a terminal
//! (indicatif), plain log lines otherwise.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

/// Work under way; [`Progress::done`] ends it.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
}

impl Progress {
    /// Starts showing `what` (logged at once when stderr is not a terminal).
    pub fn start(what: String) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            {
                bar.set_style(style);
            }
            bar.set_message(what.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if bar.is_none() {
            tracing::info!("{what}");
        }
        Progress {
            bar,
            started: Instant::now(),
        }
    }

    /// Starts showing `what`, `total` steps of it (a bar on a terminal).
    pub fn counted(what: String, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} ({elapsed})")
            {
                bar.set_style(style);
            }
            bar.set_message(what.clone());
            bar
        });
        if bar.is_none() {
            tracing::info!(total, "{what}");
        }
        Progress {
            bar,
            started: Instant::now(),
        }
    }

    /// One more step done.
    pub fn step(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Ends it, logging `what` with the time it took.
    pub fn done(self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(seconds = format!("{secs:.1}"), "{what}");
    }
}
