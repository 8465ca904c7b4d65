//! A gateway assembled in-process for unit tests of the HTTP apps (`oneshot` requests,
//! no socket) and of MQTT connections fed bytes as a socket would feed them (also the
//! fuzz target's way in, with the `fuzzing` feature): the real pipeline, spool and local
//! sink in a temporary directory.

use std::sync::Arc;

use crate::config::Config;
use crate::ingress::live::Live;
use crate::ingress::mqtt::connection::{self, Credentials};
use crate::ingress::mqtt::transport::Scripted;
use crate::ingress::sessions::Sessions;
use crate::ingress::state::{AppState, Shared};
use crate::pipeline::Pipeline;
use crate::plugin::Plugins;
use crate::reconfigure::{ConfigSource, Reloader};
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::sink::Sinks;
use crate::sink::local::LocalSink;
use crate::spool::Spool;

/// The parts of a gateway, kept alive together.
pub struct Fixture {
    /// What the device routes share.
    pub state: AppState,
    /// Configuration reloads (the admin API's).
    pub reloader: Arc<Reloader>,
    /// Starts the gateway's leaving (`state.leaving`), as the admin API's drain does.
    pub leave: Arc<ShutdownTrigger>,
    /// Holds the data directory (deleted on drop).
    _dir: tempfile::TempDir,
    /// Fires the shutdown signal on drop.
    _trigger: ShutdownTrigger,
}

/// A gateway on `config` (TOML) with its data in a fresh temporary directory; must run
/// inside a Tokio runtime.
pub fn gateway(config: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::parse(config).expect("test config");
    config.server.data_dir = dir.path().join("data");
    std::fs::create_dir_all(&config.server.data_dir).expect("data dir");
    let data = &config.server.data_dir;
    let spool = Arc::new(Spool::open(data, config.spool.max_bytes_per_sink).expect("spool"));
    spool.set_dead_letter_limit(config.spool.max_dead_letter_bytes);
    let local = Arc::new(LocalSink::open(data).expect("local sink"));
    let plugins = Plugins::start(&config).expect("plugins");
    let live = Live::new(&config, None).expect("device side");
    let sinks = Arc::new(Sinks::new(local, None, None));
    let pipeline = Arc::new(Pipeline::new(&config, plugins, sinks, spool));
    let source = ConfigSource::default();
    let reloader = Arc::new(Reloader::new(
        source,
        config,
        live.clone(),
        pipeline.clone(),
        None,
    ));
    let (trigger, shutdown) = Shutdown::new();
    let (leave, leaving) = Shutdown::new();
    Fixture {
        state: AppState::new(Shared {
            pipeline,
            live,
            shutdown,
            leaving,
            sessions: Arc::new(Sessions::default()),
            upstream: None,
            held: None,
            shadows: None,
            mqtt_clients: Default::default(),
        }),
        reloader,
        leave: Arc::new(leave),
        _dir: dir,
        _trigger: trigger,
    }
}

impl Fixture {
    /// An MQTT connection (over `[mqtt] listen`, no certificate) whose socket gives
    /// `input` in reads of `chunk` bytes and then ends: everything the gateway sent back.
    pub async fn mqtt_connection(&self, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut io = Scripted {
            input,
            chunk,
            sent: Vec::new(),
        };
        let limits = crate::ingress::mqtt::limits(&self.state.rules().mqtt);
        let credentials = Credentials::default();
        connection::run(&mut io, self.state.clone(), credentials, limits, "mqtt").await;
        io.sent
    }
}

/// The rows of the README's table whose header row is `header` (as written, e.g.
/// `| status | code | when |`): each row's cells, trimmed. Tests hold the code to the
/// tables that document it.
pub fn readme_table(header: &str) -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut lines = readme.lines().skip_while(|line| line.trim() != header);
    assert!(lines.next().is_some(), "the README has no table `{header}`");
    lines
        .skip(1) // the `| --- |` row
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            line.trim()
                .trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_string())
                .collect()
        })
        .collect()
}

/// Log output kept in memory, for tests of what is logged: clone it into a subscriber's
/// writer (`move || log.clone()`), then read [`LogBuffer::text`].
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuffer {
    /// Everything written so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        kept.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
