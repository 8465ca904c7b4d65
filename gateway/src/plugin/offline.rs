//! `sluice plugin run`: a plugin author's test loop. Runs one plugin file over sample
//! messages from a JSON Lines file and prints what it made of each.
//!
//! Input, one message per line (every field but `topic` optional):
//!
//! ```json
//! {"topic": "sites/1/temp", "device_id": "d-1", "payload": {"temp": 21.5}}
//! {"topic": "sites/1/raw", "payload_base64": "U0YBAQ…", "content_type": "application/octet-stream"}
//! {"topic": "logs", "payload_text": "plain text", "attributes": {"k": "v"}}
//! ```
//!
//! Output, one line per input: `{"input": N, "outputs": […], "dropped": N, "failures": […]}`,
//! where each output carries the message and, for a router, its decision.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use crate::config::Config;
use crate::message::{Message, new_id, now_ms};
use crate::plugin::Plugins;
use crate::plugin::worker::LocalRunner;
use crate::sink::local::payload_json;

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sample {
    topic: String,
    id: Option<String>,
    #[serde(default = "default_device")]
    device_id: String,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    received_at_ms: Option<u64>,
    #[serde(default)]
    qos: u8,
    payload: Option<serde_json::Value>,
    payload_text: Option<String>,
    payload_base64: Option<String>,
}

fn default_device() -> String {
    "sample-device".to_string()
}

impl Sample {
    fn into_message(self, line: usize) -> anyhow::Result<Message> {
        let payload = match (self.payload, self.payload_text, self.payload_base64) {
            (Some(value), None, None) => serde_json::to_vec(&value)?,
            (None, Some(text), None) => text.into_bytes(),
            (None, None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .with_context(|| format!("line {line}: payload_base64"))?,
            (None, None, None) => Vec::new(),
            _ => anyhow::bail!("line {line}: give one of payload, payload_text, payload_base64"),
        };
        Ok(Message {
            id: self.id.unwrap_or_else(new_id),
            device_id: self.device_id,
            topic: self.topic,
            content_type: self.content_type,
            qos: self.qos,
            attributes: self.attributes.into_iter().collect(),
            received_at_ms: self.received_at_ms.unwrap_or_else(now_ms),
            payload,
        })
    }
}

/// Runs the plugin at `plugin` over the samples in `input`, `batch` messages per call,
/// writing one JSON line per input to `out`. Returns the plugin's counters.
pub fn run_file(
    config: &Config,
    plugin: &Path,
    plugin_config: Vec<(String, String)>,
    input: &Path,
    batch: usize,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<(String, u64)>> {
    let plugins = Plugins::single(config, plugin, plugin_config)?;
    let reader = std::io::BufReader::new(
        std::fs::File::open(input).with_context(|| format!("cannot open {}", input.display()))?,
    );
    let mut messages = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let sample: Sample = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", input.display(), index + 1))?;
        messages.push(sample.into_message(index + 1)?);
    }
    let mut runner = LocalRunner::default();
    let mut input_index = 0;
    // Taken from the front in batches (a `split_off` per batch re-copied the rest every
    // time: quadratic in the file, 7.75 s for 50,000 messages at batch 1).
    let mut messages = messages.into_iter().peekable();
    while messages.peek().is_some() {
        let chunk: Vec<Message> = messages.by_ref().take(batch.max(1)).collect();
        for result in runner.run(&plugins, chunk) {
            let outputs: Vec<_> = result
                .outputs
                .iter()
                .map(|output| {
                    let message = &output.message;
                    let mut rendered = json!({
                        "id": message.id,
                        "device_id": message.device_id,
                        "topic": message.topic,
                        "content_type": message.content_type,
                        "qos": message.qos,
                        "attributes": message.attributes.iter().cloned().collect::<BTreeMap<_, _>>(),
                    });
                    let (key, value) = payload_json(&message.payload);
                    rendered[key] = value;
                    if let Some(choice) = &output.router {
                        rendered["router"] = json!({"destination": choice.destination, "reason": choice.reason});
                    }
                    rendered
                })
                .collect();
            let failures: Vec<_> = result
                .failures
                .iter()
                .map(|f| json!({"id": f.message.id, "plugin": f.plugin, "code": f.kind.code(), "reason": f.reason}))
                .collect();
            let line = json!({"input": input_index, "outputs": outputs, "dropped": result.dropped, "failures": failures});
            writeln!(out, "{line}")?;
            input_index += 1;
        }
    }
    let counters = plugins
        .current()
        .all()
        .flat_map(|p| p.stats.counters())
        .collect();
    plugins.stop();
    Ok(counters)
}
