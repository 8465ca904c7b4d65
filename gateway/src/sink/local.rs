//! The local sink: routed records appended as JSON Lines under the data directory, one
//! file per destination kind (`iot-core.jsonl`, `kinesis.jsonl`, `local.jsonl`). Each
//! line ([`json_line`], also the Kinesis sink's envelope) holds the message's id, device, topic, destination,
//! rule, reason and payload:
//!
//! - `payload`: the payload itself when it is JSON;
//! - `payload_text`: the payload as a string when it is other UTF-8 text;
//! - `payload_base64`: the payload in base64 otherwise.
//!
//! and `received_at_ms`, `qos`, and `content_type` and `attributes` when set.
//!
//! One writer thread owns the files: it takes every batch waiting, appends them, writes
//! them out and `fdatasync`s each file it wrote to (once per group, not per record), and
//! only then confirms them all: a device is acknowledged for the records written
//! straight here (`spool::direct`), and the spool drops the records it delivered here,
//! so they must survive a power cut here first. A file created on the way has its
//! directory entry synced too. A group that fails (a full disk) is cut off the files
//! again before its records are refused, so their second try leaves no torn line.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use base64::Engine as _;
use tokio::sync::oneshot;

use crate::record::Record;
use crate::sink::SinkError;

/// One batch for the writer: its lines, each ending in a newline, in one buffer per file
/// stem; and where to confirm.
struct Job {
    chunks: Vec<(&'static str, Vec<u8>)>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The embedded default sink.
pub struct LocalSink {
    /// Hands lines to the writer thread; `None` once closed.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The writer thread, joined on close.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// `fdatasync`s of sink files so far: one per file per group of batches.
    syncs: Arc<AtomicU64>,
}

impl LocalSink {
    /// Opens (creating if needed) the sink under `dir` and starts its writer.
    pub fn open(dir: &Path) -> anyhow::Result<LocalSink> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.to_path_buf();
        let (jobs, queue) = mpsc::channel::<Job>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counted = syncs.clone();
        let writer = crate::disk_thread::spawn("sluice-local-sink", move || {
            write_loop(&dir, &queue, &counted)
        })?;
        Ok(LocalSink {
            jobs: Mutex::new(Some(jobs)),
            writer: Mutex::new(Some(writer)),
            syncs,
        })
    }

    /// `fdatasync`s of sink files so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Stops taking records, writes what is queued, and waits for the writer.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = writer.join();
        }
    }

    /// The file a destination kind is written to.
    pub fn file_for(dir: &Path, kind: &str) -> PathBuf {
        dir.join(format!("{kind}.jsonl"))
    }
}

impl LocalSink {
    /// Appends `records` to their files; resolves once they are written and flushed.
    pub async fn write(&self, records: Vec<Record>) -> Result<(), SinkError> {
        // One buffer per file (nearly always one), not a string per line: a line's own
        // allocation and its copy into the writer were about 2% of a 1 KB MQTT message.
        let mut chunks: Vec<(&'static str, Vec<u8>)> = Vec::new();
        for record in &records {
            let kind = record.decision.destination.kind();
            let at = match chunks.iter().position(|(k, _)| *k == kind) {
                Some(at) => at,
                None => {
                    chunks.push((kind, Vec::new()));
                    chunks.len() - 1
                }
            };
            let chunk = &mut chunks[at].1;
            chunk.reserve(LINE_HEAD_BYTES + record.message.payload.len());
            write_line(record, chunk);
            chunk.push(b'\n');
        }
        let (done, confirmed) = oneshot::channel();
        let sent = match &*self.jobs.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(jobs) => jobs.send(Job { chunks, done }).is_ok(),
            None => false,
        };
        if !sent {
            return Err(SinkError::Unavailable(
                "the local sink is closed".to_string(),
            ));
        }
        match confirmed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SinkError::Unavailable(error)),
            Err(_) => Err(SinkError::Unavailable(
                "the local sink writer stopped".to_string(),
            )),
        }
    }
}

impl crate::sink::Sink for LocalSink {
    fn deliver(&self, records: Vec<Record>) -> crate::sink::SinkFuture<'_> {
        Box::pin(async move { self.write(records).await.map(|()| Vec::new()) })
    }
}

/// Room reserved for a line beyond its payload (its head is usually under 300 bytes).
const LINE_HEAD_BYTES: usize = 320;

/// Renders one record as a JSON object on one line (without the newline).
pub fn json_line(record: &Record) -> String {
    let mut line = Vec::with_capacity(LINE_HEAD_BYTES + record.message.payload.len());
    write_line(record, &mut line);
    String::from_utf8(line).expect("a line is written from UTF-8 text")
}

/// Appends one record as a JSON object on one line (without the newline) to `out`: id,
/// device, topic, destination, rule, reason, received_at_ms, qos, then content_type and
/// attributes when set, then the payload. Written field by field (serde_json's writer
/// escapes byte by byte; the head was a third of a line's cost that way).
fn write_line(record: &Record, out: &mut Vec<u8>) {
    let message = &record.message;
    let decision = &record.decision;
    out.push(b'{');
    str_field(out, "id", &message.id);
    str_field(out, "device", &message.device_id);
    str_field(out, "topic", &message.topic);
    json_field(out, "destination", &decision.destination);
    str_field(out, "rule", &decision.rule);
    str_field(out, "reason", &decision.reason);
    json_field(out, "received_at_ms", &message.received_at_ms);
    json_field(out, "qos", &message.qos);
    if !message.content_type.is_empty() {
        str_field(out, "content_type", &message.content_type);
    }
    if !message.attributes.is_empty() {
        let attributes: BTreeMap<&str, &str> = message
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        json_field(out, "attributes", &attributes);
    }
    match embeddable_json(&message.payload) {
        // JSON payloads (the common case) go in as they are: checked, not rebuilt.
        Some(json) => {
            key(out, "payload");
            out.extend_from_slice(json.as_bytes());
        }
        None => {
            let (name, value) = payload_json(&message.payload);
            json_field(out, name, &value);
        }
    }
    out.push(b'}');
}

/// Appends a field's name (after a comma, unless it is the object's first).
fn key(out: &mut Vec<u8>, name: &str) {
    if out.last() != Some(&b'{') {
        out.push(b',');
    }
    push_str(out, name);
    out.push(b':');
}

/// Appends a field whose value is a string.
fn str_field(out: &mut Vec<u8>, name: &str, text: &str) {
    key(out, name);
    push_str(out, text);
}

/// Appends a field whose value serde_json writes.
fn json_field(out: &mut Vec<u8>, name: &str, value: &(impl serde::Serialize + ?Sized)) {
    key(out, name);
    push_json(out, value);
}

/// Appends `text` as a JSON string, exactly as serde_json writes it: between quotes as
/// it is when nothing in it needs escaping (ids, topics, rule names nearly always), by
/// serde_json otherwise.
fn push_str(out: &mut Vec<u8>, text: &str) {
    // No early exit, so that the check runs many bytes at a time.
    let escapes = text.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if escapes {
        push_json(out, text);
    } else {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

/// Appends `value` as serde_json writes it.
fn push_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    serde_json::to_writer(&mut *out, value).expect("plain data always serialises");
}

/// The payload as JSON text to embed verbatim in a line: valid JSON on one line.
///
/// Checking the syntax (`IgnoredAny`) is enough for most payloads, but it lets through
/// two things a full parse refuses: `\u` escapes of lone surrogates and numbers out of
/// `f64`'s range. Payloads that could hold either (any `\u`, or a digit followed by an
/// exponent) take the full parse instead.
fn embeddable_json(payload: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(payload)
        .ok()?
        .trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    // Inside JSON strings line breaks are escaped; outside they are whitespace that
    // would split the line. (`memchr` scans a whole payload at a time, SIMD-wide; these
    // checks were a tenth of a 1 KB message's cost byte by byte.)
    let bytes = text.as_bytes();
    if text.is_empty()
        || memchr::memchr2(b'\n', b'\r', bytes).is_some()
        || memchr::memmem::find(bytes, b"\\u").is_some()
    {
        return None;
    }
    let exponent =
        memchr::memchr2_iter(b'e', b'E', bytes).any(|at| at > 0 && bytes[at - 1].is_ascii_digit());
    if exponent {
        return None;
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    Some(text)
}

/// A payload as one JSON field: `payload` (the JSON itself), `payload_text` (other
/// UTF-8) or `payload_base64` (anything else).
pub fn payload_json(payload: &[u8]) -> (&'static str, serde_json::Value) {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) {
        return ("payload", value);
    }
    match std::str::from_utf8(payload) {
        Ok(text) => ("payload_text", text.into()),
        Err(_) => (
            "payload_base64",
            base64::engine::general_purpose::STANDARD
                .encode(payload)
                .into(),
        ),
    }
}

/// An open sink file.
struct OpenFile {
    writer: BufWriter<File>,
    /// Written to since its last `fdatasync`.
    dirty: bool,
    /// Its length after the last group that was confirmed: a failed group is cut off
    /// back to it, so that no torn line stays before the records' second try.
    confirmed_len: u64,
    /// Bytes appended since then.
    pending: u64,
    /// Where the synced part last left the page cache (see [`OpenFile::uncache`]).
    uncached_to: u64,
    /// Created by this writer: its directory entry must be synced too.
    created: bool,
}

/// Synced bytes dropped from the page cache at a time, at least.
#[cfg(target_os = "linux")]
const UNCACHE_STEP: u64 = 1 << 20;

impl OpenFile {
    /// Drops the file's synced pages from the page cache, a megabyte or more at a time.
    /// Nothing here reads them back, and pages the kernel has to find for a file that
    /// only grows were a quarter of a 1 KB MQTT message's cost on a VM (each fresh page
    /// a fault in the host); the pages let go of are the next ones written. Advice only:
    /// a failure changes nothing.
    fn uncache(&mut self) {
        #[cfg(target_os = "linux")]
        if self.confirmed_len >= self.uncached_to + UNCACHE_STEP {
            // The last, partly written page stays: it is written again.
            let to = self.confirmed_len & !4095;
            let _ = rustix::fs::fadvise(
                self.writer.get_ref(),
                self.uncached_to,
                std::num::NonZeroU64::new(to - self.uncached_to),
                rustix::fs::Advice::DontNeed,
            );
            self.uncached_to = to;
        }
    }
}

/// The writer thread: group-writes whatever is queued, syncs, confirms.
fn write_loop(dir: &Path, queue: &mpsc::Receiver<Job>, syncs: &AtomicU64) {
    let mut files: HashMap<&'static str, OpenFile> = HashMap::new();
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter());
        let mut result = Ok(());
        for job in &batch {
            for (kind, chunk) in &job.chunks {
                if let Err(error) = append(dir, &mut files, kind, chunk) {
                    result = Err(error);
                }
            }
        }
        let mut created = false;
        for (kind, file) in &mut files {
            if !file.dirty {
                continue;
            }
            file.dirty = false;
            created |= std::mem::take(&mut file.created);
            let synced = file
                .writer
                .flush()
                .and_then(|()| file.writer.get_ref().sync_data());
            match synced {
                Ok(()) => {
                    syncs.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::METRICS.local_sink_syncs.inc();
                }
                Err(error) => result = Err(format!("cannot write {kind}.jsonl: {error}")),
            }
        }
        if created && let Err(error) = File::open(dir).and_then(|d| d.sync_all()) {
            result = Err(format!("cannot sync {}: {error}", dir.display()));
        }
        match &result {
            Ok(()) => {
                for file in files.values_mut() {
                    file.confirmed_len += std::mem::take(&mut file.pending);
                    file.uncache();
                }
            }
            Err(error) => {
                tracing::error!(%error, "local sink write failed");
                // Every record of the group is refused and sent again: what of it reached
                // the files (a torn line, on a full disk) is cut off. The buffers are
                // dropped unwritten, and the files reopened on the next batch.
                for (kind, file) in files.drain() {
                    let (file_handle, _unwritten) = file.writer.into_parts();
                    if file.pending > 0
                        && let Err(error) = file_handle.set_len(file.confirmed_len)
                    {
                        tracing::error!(%error, file = %kind, "cannot cut a failed write off the local sink file");
                    }
                }
            }
        }
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

/// Appends `lines` (whole lines) to `kind`'s file, opening it first if needed.
fn append(
    dir: &Path,
    files: &mut HashMap<&'static str, OpenFile>,
    kind: &'static str,
    lines: &[u8],
) -> Result<(), String> {
    let file = match files.entry(kind) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => {
            let path = LocalSink::file_for(dir, kind);
            let existed = path.exists();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
            let confirmed_len = file
                .metadata()
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?
                .len();
            entry.insert(OpenFile {
                writer: BufWriter::with_capacity(256 * 1024, file),
                dirty: false,
                created: !existed,
                confirmed_len,
                uncached_to: 0,
                pending: 0,
            })
        }
    };
    file.dirty = true;
    file.pending += lines.len() as u64;
    file.writer
        .write_all(lines)
        .map_err(|error| format!("cannot write {kind}.jsonl: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::route::{Decision, Destination};

    fn record(payload: &[u8], content_type: &str, attributes: &[(&str, &str)]) -> Record {
        Record {
            message: Message {
                id: "m-1".into(),
                device_id: "dev-1".into(),
                topic: "a/b".into(),
                content_type: content_type.into(),
                qos: 1,
                attributes: attributes
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                received_at_ms: 42,
                payload: payload.to_vec(),
            },
            decision: Decision {
                destination: Destination::Local,
                rule: "builtin:default".into(),
                reason: "a \"quoted\" reason".into(),
            },
        }
    }

    /// Records are confirmed only once their file is synced, once per group of records
    /// and file, not once per record.
    #[tokio::test]
    async fn a_write_is_confirmed_after_one_sync_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalSink::open(dir.path()).unwrap();
        let mut kinesis = record(b"{}", "", &[]);
        kinesis.decision.destination = Destination::Kinesis {
            stream: "s".into(),
            partition_key: "k".into(),
            explicit_hash_key: None,
        };
        let records = vec![
            record(b"1", "", &[]),
            record(b"2", "", &[]),
            record(b"3", "", &[]),
            kinesis,
        ];
        sink.write(records).await.unwrap();
        assert_eq!(sink.syncs(), 2, "local.jsonl and kinesis.jsonl, once each");
        let lines = std::fs::read_to_string(LocalSink::file_for(dir.path(), "local")).unwrap();
        assert_eq!(lines.lines().count(), 3);
        sink.write(vec![record(b"4", "", &[])]).await.unwrap();
        assert_eq!(sink.syncs(), 3, "only the file written to is synced");
        sink.close();
    }

    #[test]
    fn a_line_is_one_json_object_with_the_payload_in_its_best_form() {
        let cases: [(&[u8], &str, serde_json::Value); 12] = [
            (
                br#"{"t": 21.5, "n": [1, 2]}"#,
                "payload",
                serde_json::json!({"t": 21.5, "n": [1, 2]}),
            ),
            (b" 7 ", "payload", serde_json::json!(7)),
            (
                b"{\n  \"pretty\": true\n}",
                "payload",
                serde_json::json!({"pretty": true}),
            ),
            (b"not json", "payload_text", serde_json::json!("not json")),
            (
                b"{\"cut\": ",
                "payload_text",
                serde_json::json!("{\"cut\": "),
            ),
            (&[0xff, 0x00], "payload_base64", serde_json::json!("/wA=")),
            (
                br#"{"big": 1e999}"#,
                "payload_text",
                serde_json::json!(r#"{"big": 1e999}"#),
            ),
            (
                br#"{"big": 1E999}"#,
                "payload_text",
                serde_json::json!(r#"{"big": 1E999}"#),
            ),
            (b"{\"a\":\r1}", "payload", serde_json::json!({"a": 1})),
            (
                br#""\ud800""#,
                "payload_text",
                serde_json::json!(r#""\ud800""#),
            ),
            (
                br#"{"e": 2.5e3}"#,
                "payload",
                serde_json::json!({"e": 2500.0}),
            ),
            (b"\xc2\xa07", "payload_text", serde_json::json!("\u{a0}7")),
        ];
        for (payload, field, expected) in cases {
            let line = json_line(&record(payload, "", &[]));
            assert!(!line.contains('\n'), "{line}");
            let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(parsed[field], expected, "{line}");
            assert_eq!(parsed["id"], "m-1");
            assert_eq!(parsed["reason"], "a \"quoted\" reason");
            assert_eq!(parsed["destination"], serde_json::json!({"type": "local"}));
            assert!(parsed.get("content_type").is_none() && parsed.get("attributes").is_none());
        }
        let line = json_line(&record(b"{}", "application/json", &[("k", "v")]));
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["content_type"], "application/json");
        assert_eq!(parsed["attributes"], serde_json::json!({"k": "v"}));
        assert_eq!(parsed["payload"], serde_json::json!({}));
    }

    /// The head written field by field is byte for byte what serde_json makes of the
    /// same fields, whatever the strings hold.
    #[test]
    fn a_line_head_is_what_serde_json_writes() {
        #[derive(serde::Serialize)]
        struct Head<'a> {
            id: &'a str,
            device: &'a str,
            topic: &'a str,
            destination: &'a Destination,
            rule: &'a str,
            reason: &'a str,
            received_at_ms: u64,
            qos: u8,
            #[serde(skip_serializing_if = "str::is_empty")]
            content_type: &'a str,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            attributes: BTreeMap<&'a str, &'a str>,
            payload: serde_json::Value,
        }
        let texts = [
            "plain",
            "",
            "a \"quoted\" \\ slash/",
            "tab\tline\nbell\u{7}del\u{7f}",
            "\u{e9}t\u{e9} \u{1f600} \u{2028}",
        ];
        for (n, text) in texts.iter().enumerate() {
            let mut record = record(b"[1,2]", text, &[("z", text), ("a", "b")]);
            record.message.id = format!("{text}-{n}");
            record.message.device_id = text.to_string();
            record.message.topic = format!("t/{text}");
            record.decision.rule = text.to_string();
            record.decision.destination = Destination::Kinesis {
                stream: text.to_string(),
                partition_key: text.to_string(),
                explicit_hash_key: None,
            };
            let message = &record.message;
            let expected = serde_json::to_string(&Head {
                id: &message.id,
                device: &message.device_id,
                topic: &message.topic,
                destination: &record.decision.destination,
                rule: &record.decision.rule,
                reason: &record.decision.reason,
                received_at_ms: message.received_at_ms,
                qos: message.qos,
                content_type: &message.content_type,
                attributes: message
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
                payload: serde_json::json!([1, 2]),
            })
            .unwrap();
            assert_eq!(json_line(&record), expected);
        }
    }
}
