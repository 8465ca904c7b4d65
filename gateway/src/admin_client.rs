//! `sluice dlq …` and `sluice admin …`: clients of the running gateway's admin API (the
//! spool file is locked while the gateway runs, a redrive needs its plugins and sinks,
//! and plugin versions and reloads act on the running process).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::Value;
use sluice_gateway::config::Config;

/// Where the admin API is and how to get in.
#[derive(Debug, clap::Args)]
pub struct AdminTarget {
    /// Configuration file of the running gateway: its `[admin]` section gives the
    /// address and token.
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Admin API base URL, e.g. http://127.0.0.1:9091 (overrides the config).
    #[arg(long, global = true, env = "SLUICE_ADMIN_URL")]
    admin_url: Option<String>,
    /// Admin token (overrides the config).
    #[arg(
        long,
        global = true,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

/// The dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        /// Start at this key.
        #[arg(long)]
        from: Option<u64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload, as JSON.
    Show {
        /// The dead letter's key (from `list`).
        key: u64,
    },
    /// Run dead letters again (after fixing the plugin or the sink).
    Redrive {
        /// Keys to redrive.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        keys: Vec<u64>,
        /// Redrive every dead letter stored now, 100 at a time, with a progress bar on a
        /// terminal.
        #[arg(long)]
        all: bool,
    },
    /// Discard one dead letter for good.
    Discard {
        /// The dead letter's key.
        key: u64,
    },
}

/// The other admin commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Read the configuration file again and apply it (like SIGHUP); prints what was
    /// applied and what needs a restart.
    Reload,
    /// Take the gateway out of service and stop it, as SIGTERM does: /readyz red and HTTP
    /// refused for server.leave_delay_ms, then no new connections, sessions told to go,
    /// the spool delivered within server.shutdown_grace_ms; the process exits.
    Drain,
    /// Read the certificates registered at AWS IoT again ([auth.registry]), every
    /// certificate's things too; prints how many there are and how many are ACTIVE.
    RefreshRegistry,
    /// List the plugin chain: versions, hashes, counters.
    Plugins {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Upload a new version of a plugin: validated first, then (unless --no-activate)
    /// serving in place of the current one.
    Upload {
        /// The plugin's configured name.
        name: String,
        /// The component file (.wasm).
        file: PathBuf,
        /// Only store and validate it; activate later with `sluice admin activate`.
        #[arg(long)]
        no_activate: bool,
    },
    /// Delete an uploaded version (not the one serving).
    DeleteVersion {
        /// The plugin's configured name.
        name: String,
        /// The version's hash (from `sluice admin plugins --json`).
        hash: String,
    },
    /// Make an uploaded version serve, or the configured file again.
    Activate {
        /// The plugin's configured name.
        name: String,
        /// The uploaded version's hash (from `sluice admin plugins`).
        #[arg(
            long,
            required_unless_present = "configured",
            conflicts_with = "configured"
        )]
        hash: Option<String>,
        /// Go back to the file named in the configuration.
        #[arg(long)]
        configured: bool,
    },
}

struct Client {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Client {
    fn new(target: AdminTarget) -> anyhow::Result<Client> {
        let config = match &target.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let base = match (target.admin_url, config.admin.listen) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(listen)) => format!("http://{listen}"),
            (None, None) => {
                bail!("no admin API: give --admin-url, or --config with an [admin] section")
            }
        };
        let token = target
            .token
            .or(config.admin.token)
            .context("no admin token: give --token, or --config with admin.token")?;
        let http = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()?;
        Ok(Client { base, token, http })
    }

    fn send(&self, request: reqwest::blocking::RequestBuilder) -> anyhow::Result<Option<Value>> {
        let response = request.bearer_auth(&self.token).send().with_context(|| {
            format!(
                "cannot reach the admin API at {} (is the gateway running?)",
                self.base
            )
        })?;
        let status = response.status();
        let text = response.text()?;
        if !status.is_success() {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    Some(format!(
                        "{}: {}",
                        v["code"].as_str()?,
                        v["message"].as_str()?
                    ))
                })
                .unwrap_or(text);
            bail!("the admin API answered {status}: {detail}");
        }
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&text)?))
    }
}

/// Runs one `sluice admin` command.
pub fn run_admin(target: AdminTarget, command: AdminCommand) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let base = &client.base;
    let print = |value: Option<Value>| -> anyhow::Result<()> {
        println!(
            "{}",
            serde_json::to_string_pretty(&value.unwrap_or_default())?
        );
        Ok(())
    };
    match command {
        AdminCommand::Reload => {
            print(client.send(client.http.post(format!("{base}/admin/reload")))?)
        }
        AdminCommand::Drain => print(client.send(client.http.post(format!("{base}/admin/drain")))?),
        AdminCommand::RefreshRegistry => {
            print(client.send(client.http.post(format!("{base}/admin/registry/refresh")))?)
        }
        AdminCommand::Plugins { json } => {
            let answer = client
                .send(client.http.get(format!("{base}/admin/plugins")))?
                .unwrap_or_default();
            if json {
                return print(Some(answer));
            }
            println!(
                "{:<16} {:<10} {:<14} {:<11} {:>10} {:>10}  FILE",
                "NAME", "KIND", "HASH", "SOURCE", "CALLS", "AVG µs"
            );
            for plugin in answer["plugins"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<16} {:<10} {:<14} {:<11} {:>10} {:>10.1}  {}",
                    plugin["name"].as_str().unwrap_or(""),
                    plugin["kind"].as_str().unwrap_or(""),
                    plugin["hash"]
                        .as_str()
                        .unwrap_or("")
                        .get(..12)
                        .unwrap_or(""),
                    plugin["source"].as_str().unwrap_or(""),
                    plugin["calls"],
                    plugin["average_call_us"].as_f64().unwrap_or(0.0),
                    plugin["path"].as_str().unwrap_or(""),
                );
            }
            Ok(())
        }
        AdminCommand::Upload {
            name,
            file,
            no_activate,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let request = client
                .http
                .post(format!("{base}/admin/plugins/{name}/versions"))
                .query(&[("activate", (!no_activate).to_string())])
                .body(bytes);
            print(client.send(request)?)
        }
        AdminCommand::DeleteVersion { name, hash } => {
            client.send(
                client
                    .http
                    .delete(format!("{base}/admin/plugins/{name}/versions/{hash}")),
            )?;
            println!("deleted version {hash} of plugin {name}");
            Ok(())
        }
        AdminCommand::Activate { name, hash, .. } => {
            // clap requires --hash or --configured, never both.
            let body = match hash {
                Some(hash) => serde_json::json!({ "hash": hash }),
                None => serde_json::json!({ "configured": true }),
            };
            let request = client
                .http
                .post(format!("{base}/admin/plugins/{name}/activate"))
                .json(&body);
            print(client.send(request)?)
        }
    }
}

/// Runs one `sluice dlq` command.
pub fn run(target: AdminTarget, command: DlqCommand) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let base = &client.base;
    match command {
        DlqCommand::List { from, limit, json } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(from) = from {
                query.push(("from", from.to_string()));
            }
            let answer = client
                .send(client.http.get(format!("{base}/admin/dlq")).query(&query))?
                .unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            let letters = answer["dead_letters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            println!(
                "{:<8} {:<36} {:<16} {:<24} {:<24} REASON",
                "KEY", "ID", "DEVICE", "TOPIC", "ORIGIN"
            );
            for letter in &letters {
                let origin = &letter["origin"];
                let origin = match origin["stage"].as_str() {
                    Some("plugin") => format!("plugin:{}", origin["plugin"].as_str().unwrap_or("")),
                    Some("sink") => format!("sink:{}", origin["sink"].as_str().unwrap_or("")),
                    Some("rule") => origin["rule"].as_str().unwrap_or("rule").to_string(),
                    _ => String::new(),
                };
                println!(
                    "{:<8} {:<36} {:<16} {:<24} {:<24} {}",
                    letter["key"],
                    letter["id"].as_str().unwrap_or(""),
                    letter["device"].as_str().unwrap_or(""),
                    letter["topic"].as_str().unwrap_or(""),
                    origin,
                    letter["reason"].as_str().unwrap_or(""),
                );
            }
            if let Some(next) = answer["next"].as_u64() {
                eprintln!("more: --from {next}");
            }
        }
        DlqCommand::Show { key } => {
            let answer = client.send(client.http.get(format!("{base}/admin/dlq/{key}")))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&answer.unwrap_or_default())?
            );
        }
        DlqCommand::Redrive { keys, all } => {
            let answer = if all {
                redrive_all(&client)?
            } else {
                client
                    .send(
                        client
                            .http
                            .post(format!("{base}/admin/dlq/redrive"))
                            .json(&serde_json::json!({"keys": keys})),
                    )?
                    .unwrap_or_default()
            };
            let redriven = answer["redriven"].as_array().cloned().unwrap_or_default();
            for letter in &redriven {
                println!(
                    "{} {} {}",
                    letter["key"],
                    letter["id"].as_str().unwrap_or(""),
                    letter["status"].as_str().unwrap_or("")
                );
            }
            let kept = answer["kept"].as_array().cloned().unwrap_or_default();
            for letter in &kept {
                println!(
                    "{} {} kept: {}",
                    letter["key"],
                    letter["id"].as_str().unwrap_or(""),
                    letter["error"]["message"]
                        .as_str()
                        .unwrap_or("refused again")
                );
            }
            let missing = answer["missing"].as_array().cloned().unwrap_or_default();
            println!(
                "redriven: {}, kept (refused again): {}, not found: {}",
                redriven.len(),
                kept.len(),
                missing.len()
            );
        }
        DlqCommand::Discard { key } => {
            client.send(client.http.delete(format!("{base}/admin/dlq/{key}")))?;
            println!("discarded dead letter {key}");
        }
    }
    Ok(())
}

/// Dead letters per redrive request of `--all`: small enough that progress shows.
const REDRIVE_CHUNK: usize = 100;

/// `sluice dlq redrive --all`: lists every key stored now, then redrives them a chunk at
/// a time, with a progress bar on a terminal and a line per chunk otherwise. Letters that
/// fail again come back under new keys and are not retried (as with `{"all": true}`).
/// The answers merged into one.
fn redrive_all(client: &Client) -> anyhow::Result<Value> {
    use std::io::IsTerminal as _;
    let base = &client.base;
    let mut keys = Vec::new();
    let mut from = 0u64;
    loop {
        let page = client
            .send(
                client
                    .http
                    .get(format!("{base}/admin/dlq"))
                    .query(&[("from", from.to_string()), ("limit", "1000".to_string())]),
            )?
            .unwrap_or_default();
        keys.extend(
            page["dead_letters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|letter| letter["key"].as_u64()),
        );
        match page["next"].as_u64() {
            Some(next) => from = next,
            None => break,
        }
    }
    let terminal = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(keys.len() as u64);
    if terminal {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "redriving {bar:40} {pos}/{len} dead letters ({per_sec}, {eta} left)",
            )
            .expect("a valid template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut merged = serde_json::json!({"redriven": [], "kept": [], "missing": []});
    let mut done = 0;
    for chunk in keys.chunks(REDRIVE_CHUNK) {
        let answer = client
            .send(
                client
                    .http
                    .post(format!("{base}/admin/dlq/redrive"))
                    .json(&serde_json::json!({"keys": chunk})),
            )?
            .unwrap_or_default();
        for part in ["redriven", "kept", "missing"] {
            if let (Some(all), Some(more)) = (merged[part].as_array_mut(), answer[part].as_array())
            {
                all.extend(more.iter().cloned());
            }
        }
        done += chunk.len();
        bar.inc(chunk.len() as u64);
        if !terminal {
            eprintln!("redrive: {done} of {} dead letters", keys.len());
        }
    }
    bar.finish_and_clear();
    Ok(merged)
}
