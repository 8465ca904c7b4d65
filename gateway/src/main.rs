//! The `sluice` command: parses the command line, sets up logging, and hands over to the
//! library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sluice_gateway::config::Config;
use sluice_gateway::plugin::host::{Host, Limits};

mod admin_client;

// Messages cross the plugin boundary as many small strings, allocated and freed per
// batch; glibc's allocator spends much of that time trimming and re-faulting its heap
// (measured in BENCHMARKS.md). mimalloc keeps it in user space.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice: an ingestion gateway for IoT fleets, extended with WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. Without --config: the embedded default (plain HTTP on
    /// 127.0.0.1:8080, no plugins, the spool and the local sink under ./sluice-data).
    /// SIGHUP reads the configuration file again (like `sluice admin reload`); SIGTERM
    /// or Ctrl-C stops it cleanly.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address, overriding the configuration (port 0 picks a free port).
        /// Without [auth], only a loopback address, unless the configuration sets
        /// server.allow_unauthenticated = true.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory, overriding the configuration.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// This instance's id among the gateways that serve one fleet, overriding
        /// server.instance_id (the gateway's own connections at IoT Core are named after
        /// it). Default: one made at the first start and kept in the data directory.
        #[arg(long, env = "SLUICE_INSTANCE_ID")]
        instance_id: Option<String>,
    },
    /// Work with plugin components.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Device tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// A data directory no gateway runs on (a dead instance's volume): deliver it.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Dead letters of a running gateway: list, show, redrive, discard (through its
    /// admin API).
    Dlq {
        #[command(flatten)]
        target: admin_client::AdminTarget,
        #[command(subcommand)]
        command: admin_client::DlqCommand,
    },
    /// A running gateway, through its admin API: reload the configuration, list plugins,
    /// upload and activate plugin versions.
    Admin {
        #[command(flatten)]
        target: admin_client::AdminTarget,
        #[command(subcommand)]
        command: admin_client::AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SpoolCommand {
    /// Deliver everything in DIR's spool to the configured sinks, its dead letters run
    /// again first, and report what was delivered and what is left. Refused while a
    /// gateway runs on DIR. Exits 0 when nothing is left, 1 otherwise.
    Drain {
        /// The data directory (a dead instance's volume).
        #[arg(long)]
        data_dir: PathBuf,
        /// The configuration whose sinks (and plugins, for dead letters) to use: the
        /// fleet's. Without it: the embedded default (the local sink, in DIR).
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Give up after this many seconds, leaving what was not delivered in DIR.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Write a ready plugin project into the directory NAME: the plugin on its language's
    /// SDK, a copy of the SDK and the WIT, samples, a unit test, and a README with the
    /// commands that build it and run it through `sluice plugin run`.
    New {
        /// The project's directory and the plugin's name.
        name: String,
        /// Its language.
        #[arg(long, value_enum)]
        lang: sluice_gateway::plugin::new::Lang,
        /// Its kind.
        #[arg(long, value_enum, default_value = "transform")]
        kind: KindArg,
    },
    /// Validate a component against the sluice:plugin WIT and list its imports and
    /// exports. Exits 1 if the gateway would refuse it.
    Check {
        /// The component file (.wasm).
        file: PathBuf,
    },
    /// Run a plugin offline over sample messages (JSON Lines) and print the outcomes.
    Run {
        /// The component file (.wasm).
        file: PathBuf,
        /// Sample messages, one JSON object per line.
        #[arg(long, short)]
        input: PathBuf,
        /// Plugin configuration, as KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        settings: Vec<(String, String)>,
        /// Messages per plugin call.
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
}

/// A plugin's kind, on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KindArg {
    /// Changes, drops, splits or refuses messages.
    Transform,
    /// Chooses destinations.
    Router,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint a bearer token for a device, signed with a key from `[auth.tokens]`; prints
    /// it on stdout.
    Issue {
        /// Configuration file with the `[auth.tokens]` keys.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// The device id (the token's `sub`).
        #[arg(long)]
        device: String,
        /// Lifetime, e.g. `15m`, `1h`, `1day` (at most `auth.tokens.max_ttl_secs`).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Groups, for policy grants (repeatable, or comma-separated).
        #[arg(long = "group", value_delimiter = ',')]
        groups: Vec<String>,
        /// Sign with this key id instead of `auth.tokens.signing_key` (default: the last
        /// key listed).
        #[arg(long)]
        key_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file, reporting every problem at once, and load its
    /// plugins. Exits 1 if the gateway would refuse to start with it.
    Check {
        /// Configuration file (TOML).
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let directives = std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info".to_string());
    // Colours only for a terminal: log files and collectors get plain text (and the
    // gateway skips the escape codes on every request span).
    let ansi = std::io::stderr().is_terminal();
    let json = matches!(format, LogFormat::Json);
    sluice_gateway::logging::subscriber(&directives, json, ansi, std::io::stderr).init();
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            listen,
            data_dir,
            instance_id,
        } => {
            let source = sluice_gateway::reconfigure::ConfigSource {
                path: config,
                listen,
                data_dir,
                instance_id,
            };
            let config = source.load()?;
            runtime(&config)?.block_on(async {
                let shutdown = sluice_gateway::Shutdown::on_signals();
                sluice_gateway::run(source, config, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Spool {
            command:
                SpoolCommand::Drain {
                    data_dir,
                    config,
                    timeout,
                    json,
                },
        } => spool_drain(data_dir, config, timeout, json),
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => plugin_check(&file),
        Command::Plugin {
            command: PluginCommand::New { name, lang, kind },
        } => {
            let kind = match kind {
                KindArg::Transform => sluice_gateway::plugin::PluginKind::Transform,
                KindArg::Router => sluice_gateway::plugin::PluginKind::Router,
            };
            let dir = sluice_gateway::plugin::new::write(&name, lang, kind)?;
            println!(
                "{}: a {kind} plugin project; its README.md says how to build and run it",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin {
            command:
                PluginCommand::Run {
                    file,
                    input,
                    settings,
                    batch,
                },
        } => {
            let config = Config::default();
            // A plugin's clock sleeps wait on the runtime's timer, as in the gateway.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let _context = runtime.enter();
            let mut stdout = std::io::stdout().lock();
            let counters = sluice_gateway::plugin::offline::run_file(
                &config,
                &file,
                settings,
                &input,
                batch,
                &mut stdout,
            )?;
            for (name, value) in counters {
                eprintln!("counter {name} = {value}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command:
                TokenCommand::Issue {
                    config,
                    device,
                    ttl,
                    groups,
                    key_id,
                },
        } => {
            let loaded = Config::load(&config)?;
            let tokens = loaded
                .auth
                .as_ref()
                .and_then(|auth| auth.tokens.as_ref())
                .with_context(|| format!("{} has no [auth.tokens]", config.display()))?;
            let keys = sluice_gateway::auth::token::TokenKeys::new(tokens);
            println!("{}", keys.issue(&device, &groups, ttl, key_id.as_deref())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { target, command } => {
            admin_client::run(target, command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin { target, command } => {
            admin_client::run_admin(target, command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let loaded = Config::load(&config)?;
            let plugins = sluice_gateway::plugin::Plugins::check(&loaded)?;
            let count = plugins.current().all().count();
            plugins.stop();
            println!("{}: OK ({count} plugin(s) loaded)", config.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn plugin_check(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = Config::default();
    let limits = Limits {
        call_timeout: std::time::Duration::from_millis(config.plugins.call_timeout_ms),
        memory_bytes: (config.plugins.memory_limit_mib as usize) << 20,
    };
    let cache = std::env::temp_dir().join("sluice-plugin-check-cache");
    let host = Host::new(limits, cache, 4)?;
    let inspection = host.inspect(file)?;
    println!("{}", file.display());
    match &inspection.verdict {
        Ok(kind) => println!("  world: sluice:plugin/{kind}"),
        Err(sluice_gateway::plugin::PluginError::ForbiddenImports { .. }) => {
            println!("  world: not checked (refused imports first)")
        }
        Err(_) => println!("  world: none (exports neither transformer nor routing)"),
    }
    println!("  imports (what the gateway gives each):");
    for (name, rule) in &inspection.imports {
        match rule {
            Ok(what) => println!("    ok      {name}: {what}"),
            Err(why) => println!("    REFUSED {name}: {why}"),
        }
    }
    println!("  exports:");
    for name in &inspection.exports {
        println!("    {name}");
    }
    match inspection.verdict {
        Ok(_) => {
            println!("OK: the gateway accepts this plugin");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            println!("REFUSED: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The async runtime `config`'s gateway runs on: plugins run on these threads too (see
/// `plugins.workers`).
fn runtime(config: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.plugins.workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `sluice spool drain`.
fn spool_drain(
    data_dir: PathBuf,
    config: Option<PathBuf>,
    timeout: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let source = sluice_gateway::reconfigure::ConfigSource {
        path: config,
        data_dir: Some(data_dir),
        ..Default::default()
    };
    let config = source.load()?;
    let report = runtime(&config)?.block_on(sluice_gateway::handover::drain(
        &config,
        std::time::Duration::from_secs(timeout),
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} (instance {}), in {:.1} s:",
            report.data_dir, report.instance, report.seconds
        );
        for sink in &report.sinks {
            println!(
                "  {:<9} {} delivered, {} left",
                sink.sink, sink.delivered, sink.left
            );
        }
        println!(
            "  dead letters: {} run again, {} left{}",
            report.dead_letters_redriven,
            report.dead_letters_left,
            if report.dead_letters_left > 0 {
                " (refused again: `sluice dlq list` on a gateway run on the directory says why)"
            } else {
                ""
            }
        );
        println!(
            "{}",
            if report.complete {
                "everything was delivered"
            } else {
                "NOT everything was delivered: what is left stays in the directory; drain it again"
            }
        );
    }
    Ok(if report.complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
