//! A plugin's stdout and stderr, into the gateway's log: each line a record tagged with
//! the plugin's name and the stream, at most [`OUTPUT_LINES_PER_SEC`] lines a second per
//! instance, each cut at [`OUTPUT_LINE_BYTES`]; lines over the rate are counted in the
//! plugin's `_output_dropped` counter. Python's `print` and JavaScript's `console.log`
//! land here.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Most lines of a plugin's stdout and stderr logged per second; the rest are counted
/// in the plugin's `_output_dropped` counter.
pub const OUTPUT_LINES_PER_SEC: u32 = 50;
/// Longest line logged (longer ones are cut).
pub const OUTPUT_LINE_BYTES: usize = 1024;

/// Whose output it is: the plugin's name, and its counters.
pub trait Owner: Send + Sync {
    /// The plugin's name, for the log records.
    fn name(&self) -> &str;
    /// Adds to the plugin's counter `name`.
    fn count(&self, name: &str, delta: u64);
}

/// One instance's stdout or stderr.
#[derive(Clone)]
pub struct PluginOutput {
    stats: Arc<dyn Owner>,
    stream: &'static str,
    state: Arc<Mutex<State>>,
}

struct State {
    /// The line being written.
    line: Vec<u8>,
    /// The start of the current second, and the lines logged in it.
    window: (Instant, u32),
}

impl PluginOutput {
    /// The `stream` (`stdout` or `stderr`) of an instance of the plugin `stats` is for.
    pub fn new(stats: Arc<dyn Owner>, stream: &'static str) -> PluginOutput {
        PluginOutput {
            stats,
            stream,
            state: Arc::new(Mutex::new(State {
                line: Vec::new(),
                window: (Instant::now(), 0),
            })),
        }
    }

    fn write(&self, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for &byte in bytes {
            if byte == b'\n' {
                let line = std::mem::take(&mut state.line);
                self.emit(&mut state, &line);
            } else if state.line.len() < OUTPUT_LINE_BYTES {
                state.line.push(byte);
            }
        }
    }

    fn emit(&self, state: &mut State, line: &[u8]) {
        let now = Instant::now();
        if now.duration_since(state.window.0).as_secs() >= 1 {
            state.window = (now, 0);
        }
        if state.window.1 >= OUTPUT_LINES_PER_SEC {
            self.stats.count("_output_dropped", 1);
            return;
        }
        state.window.1 += 1;
        let text = String::from_utf8_lossy(line);
        let plugin = self.stats.name();
        match self.stream {
            "stderr" => tracing::warn!(plugin, stream = "stderr", "{text}"),
            _ => tracing::info!(plugin, stream = "stdout", "{text}"),
        }
    }
}

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for PluginOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counted(Mutex<u64>);

    impl Owner for Counted {
        fn name(&self) -> &str {
            "printer"
        }
        fn count(&self, name: &str, delta: u64) {
            assert_eq!(name, "_output_dropped");
            *self.0.lock().unwrap() += delta;
        }
    }

    #[test]
    fn lines_over_the_rate_are_counted_not_logged() {
        let stats = Arc::new(Counted::default());
        let output = PluginOutput::new(stats.clone(), "stdout");
        let many: String = (0..OUTPUT_LINES_PER_SEC + 7)
            .map(|n| format!("line {n}\n"))
            .collect();
        output.write(many.as_bytes());
        output.write(&[b'x'; OUTPUT_LINE_BYTES * 2]);
        let state = output.state.lock().unwrap();
        assert_eq!(state.line.len(), OUTPUT_LINE_BYTES, "a long line is cut");
        drop(state);
        assert_eq!(*stats.0.lock().unwrap(), 7);
    }
}
