//! The queue log: the sinks' queues as append-only segment files in `<data_dir>/queue/`.
//!
//! Each file is named after the first sequence number it may hold and is a run of
//! entries, `[marker: u32][body length: u32][checksum: u32][body]`, little-endian, the
//! marker the constant [`MARKER`], the checksum a CRC-32 of the segment's number and the
//! body:
//! - a record: `1, sink, seq: u64, encoded record`;
//! - a delivery: `2, sink, count: u32, count × seq: u64`, the records a sink confirmed.
//!
//! A group of changes is one `write` at the end of the newest segment and, when it adds
//! records, one `fdatasync`. Deliveries are written without one: lost in a crash, they
//! only mean records delivered again.
//!
//! Once every record in an older segment is delivered the file is recycled: kept (two at
//! most, as `<n>.spare`; the rest are deleted) and renamed to be the next segment. Its
//! new entries overwrite blocks the file already has, so their `fdatasync` writes the
//! data alone, not the file's new size too: on ext4 one disk write instead of two, a
//! third less time and CPU per `fdatasync` on the machine of `BENCHMARKS.md`. What the
//! file held before cannot pass for new entries: their checksums were made with another
//! segment number. So the queue takes about as much disk as what waits in it, plus three
//! segments. A new segment gets much the same by being filled with zeros a little ahead of
//! small groups ([`Log::write`]); a zero length ends the entries.
//!
//! Opening reads every segment entry by entry. Where an entry's marker, length or checksum
//! is wrong, it looks for the next marker that starts a whole entry and goes on from
//! there: one damaged entry (a flipped bit on the disk) costs that entry alone, and is
//! logged at error level with its segment and offset and counted
//! (`sluice_spool_damaged_entries_total`). Where no whole entry follows, that is the end
//! of what was written, or a write cut short by a crash, of which nothing was
//! acknowledged (an `fdatasync` covers everything before it). Writing then goes on in a
//! new segment, never after such an end. A write that fails is cut off, and its sequence
//! numbers are never used again.
//!
//! Segments written before the marker (`[length][checksum][body]` entries) are still
//! read, the old way: up to their first bad entry. Writing always starts a new segment,
//! so a segment is of one format throughout.
//!
//! Written here rather than taken from a crate: the spool needs group commit, removal of
//! confirmed records in any order, in-order reads by sequence number and whole files
//! dropped once delivered. redb (which keeps the dead letters) rewrites B-tree pages on
//! every commit, about a dozen page writes per group, and cost a tenth of the gateway's
//! CPU under load; the persistent-queue crates on crates.io `fsync` per item or cannot
//! remove records out of order.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::record::{PerSink, SinkId};

/// A segment is closed, and a new one begun, once it is this long.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Delivered segments kept for reuse.
const MAX_SPARES: usize = 2;

/// How far a new segment is filled with zeros ahead of its data, when groups are small
/// next to it (see [`Log::write`]).
const ZERO_AHEAD: u64 = 128 << 10;

/// The first four bytes of every entry (`SLQ1` read as little-endian bytes): where an
/// entry is damaged, the next one is found again by it. A payload can hold these bytes
/// too, but an entry found by them counts only if its checksum, salted with the segment
/// number, holds.
pub const MARKER: u32 = u32::from_le_bytes(*b"SLQ1");

const HEADER: usize = 12;
/// The header of entries in segments written before [`MARKER`]: no marker.
const LEGACY_HEADER: usize = 8;
const RECORD: u8 = 1;
const DELIVERY: u8 = 2;
/// Kind, sink and sequence number before a record's bytes.
const RECORD_PREFIX: usize = 10;

/// Where a queued record is.
#[derive(Debug, Clone, Copy)]
pub struct Loc {
    segment: u64,
    /// The entry's first byte.
    offset: u64,
    /// The record's encoded length (the entry is longer by its header and prefix).
    len: u32,
}

impl Loc {
    /// The record's encoded length.
    pub fn len(&self) -> u64 {
        u64::from(self.len)
    }
}

struct Segment {
    file: Arc<File>,
    /// Records in it not yet delivered.
    live: u64,
    /// Written before [`MARKER`]: entries have the older, shorter header.
    legacy: bool,
}

/// Where every queued record is; shared by the writer and the readers.
#[derive(Default)]
pub struct Index {
    queues: PerSink<BTreeMap<u64, Loc>>,
    segments: BTreeMap<u64, Segment>,
}

impl Index {
    /// Records and encoded bytes queued for `sink`.
    pub fn totals(&self, sink: SinkId) -> (u64, u64) {
        let queue = &self.queues[sink];
        (queue.len() as u64, queue.values().map(Loc::len).sum())
    }

    /// The sequence number of the oldest record queued for `sink`.
    pub fn oldest(&self, sink: SinkId) -> Option<u64> {
        self.queues[sink].keys().next().copied()
    }

    /// Whether `seq` is queued for `sink`.
    pub fn contains(&self, sink: SinkId, seq: u64) -> bool {
        self.queues[sink].contains_key(&seq)
    }

    /// Records `seq` for `sink` at `loc`.
    pub fn insert(&mut self, sink: SinkId, seq: u64, loc: Loc) {
        if self.queues[sink].insert(seq, loc).is_none()
            && let Some(segment) = self.segments.get_mut(&loc.segment)
        {
            segment.live += 1;
        }
    }

    /// Forgets `seq` for `sink` (delivered); its location if it was queued.
    pub fn remove(&mut self, sink: SinkId, seq: u64) -> Option<Loc> {
        let loc = self.queues[sink].remove(&seq)?;
        if let Some(segment) = self.segments.get_mut(&loc.segment) {
            segment.live = segment.live.saturating_sub(1);
        }
        Some(loc)
    }

    /// Up to `max_records` locations (and about `max_bytes`) for `sink` from `from` on,
    /// with their files, and whether that reached the end of the queue.
    pub fn window(
        &self,
        sink: SinkId,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> (Vec<(u64, Loc, Source)>, bool) {
        let mut out = Vec::new();
        let mut size = 0usize;
        for (&seq, &loc) in self.queues[sink].range(from..) {
            let len = loc.len as usize;
            if !out.is_empty() && (out.len() >= max_records || size + len > max_bytes) {
                return (out, false);
            }
            size += len;
            if let Some(segment) = self.segments.get(&loc.segment) {
                let source = Source {
                    file: segment.file.clone(),
                    legacy: segment.legacy,
                };
                out.push((seq, loc, source));
            }
        }
        (out, true)
    }

    /// Takes the segments other than `head` with nothing left to deliver.
    fn take_empty(&mut self, head: u64) -> Vec<u64> {
        let empty: Vec<u64> = self
            .segments
            .iter()
            .filter(|&(&id, segment)| id != head && segment.live == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in &empty {
            self.segments.remove(id);
        }
        empty
    }
}

/// The segment file a record is in, and its format.
pub struct Source {
    file: Arc<File>,
    legacy: bool,
}

/// Reads the record at `loc` from `source`, checking its entry.
pub fn read_record(source: &Source, seq: u64, loc: Loc) -> Result<Vec<u8>, String> {
    let body_len = RECORD_PREFIX + loc.len as usize;
    let header = if source.legacy { LEGACY_HEADER } else { HEADER };
    let mut entry = vec![0u8; header + body_len];
    source
        .file
        .read_exact_at(&mut entry, loc.offset)
        .map_err(|e| format!("cannot read segment {}: {e}", loc.segment))?;
    let checked = if source.legacy {
        check_legacy_entry(&entry, loc.segment)
    } else {
        check_entry(&entry, loc.segment)
    };
    let body = checked.ok_or_else(|| {
        format!(
            "entry at byte {} of segment {} is damaged",
            loc.offset, loc.segment
        )
    })?;
    if body.len() != body_len || body[0] != RECORD || u64_at(body, 2) != seq {
        return Err(format!(
            "entry at byte {} of segment {} is not record {seq}",
            loc.offset, loc.segment
        ));
    }
    Ok(body[RECORD_PREFIX..].to_vec())
}

/// The body of the entry of segment `segment` at the start of `bytes` if its marker,
/// length and checksum hold.
fn check_entry(bytes: &[u8], segment: u64) -> Option<&[u8]> {
    let marker = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
    if marker != MARKER {
        return None;
    }
    check_legacy_entry(&bytes[4..], segment)
}

/// Like [`check_entry`], for an entry without a marker (segments written before it).
fn check_legacy_entry(bytes: &[u8], segment: u64) -> Option<&[u8]> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let body = bytes.get(LEGACY_HEADER..LEGACY_HEADER.checked_add(len)?)?;
    (len > 0 && checksum(segment, body) == crc).then_some(body)
}

/// The checksum of an entry of segment `segment`: a recycled file's old entries fail it.
pub(super) fn checksum(segment: u64, body: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&segment.to_le_bytes());
    crc.update(body);
    crc.finalize()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

fn sink_of(byte: u8) -> Option<SinkId> {
    SinkId::ALL.get(usize::from(byte)).copied()
}

/// The writer's side: the newest segment and the entries staged for the next write.
pub struct Log {
    dir: PathBuf,
    head: Arc<File>,
    head_id: u64,
    /// Where the newest segment's data ends.
    head_len: u64,
    /// Where the blocks it already has end (zeros, or a recycled file's old entries).
    allocated: u64,
    segment_bytes: u64,
    /// Delivered segments to reuse.
    spares: Vec<PathBuf>,
    staged: Vec<u8>,
    /// A failed write could not be cut off: nothing more may be written.
    broken: bool,
}

/// What opening found.
pub struct Opened {
    /// The writer's side.
    pub log: Log,
    /// Where the queued records are.
    pub index: Index,
    /// One past the highest sequence number in the log.
    pub next_seq: u64,
}

impl Log {
    /// Opens (creating if needed) the log in `dir`, reads every segment into an index (up
    /// to its first bad entry), starts a new segment to write to, and retires segments
    /// with nothing left to deliver. Sequence numbers continue from at least `next_seq`.
    pub fn open(dir: &Path, segment_bytes: u64, next_seq: u64) -> anyhow::Result<Opened> {
        use anyhow::Context as _;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut ids: Vec<u64> = Vec::new();
        let mut spares = Vec::new();
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(id) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
                ids.push(id);
            } else if name.ends_with(".spare") {
                spares.push(path);
            }
        }
        ids.sort_unstable();
        for extra in spares.drain(MAX_SPARES.min(spares.len())..) {
            let _ = std::fs::remove_file(extra);
        }
        let mut index = Index::default();
        let mut next_seq = next_seq.max(ids.last().map_or(0, |id| id + 1));
        // A backlog over several segments takes a while to read: say so.
        let progress = (ids.len() > 2).then(|| {
            crate::progress::Progress::counted(
                format!("replaying the spool: {} segments", ids.len()),
                ids.len() as u64,
            )
        });
        for &id in &ids {
            let path = segment_path(dir, id);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            // A segment whose first entry is whole without a marker was written before
            // the marker existed. (One whose first entry is damaged is read as of today's
            // format: the entries after it are found again.)
            let legacy = check_legacy_entry(&bytes, id).is_some()
                || (!bytes.windows(4).any(|w| w == MARKER.to_le_bytes())
                    && bytes.iter().any(|&b| b != 0));
            index.segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    live: 0,
                    legacy,
                },
            );
            let end = if legacy {
                replay_legacy(&bytes, id, &mut index, &mut next_seq)
            } else {
                replay(&bytes, id, &mut index, &mut next_seq)
            };
            tracing::debug!(segment = %path.display(), end, "spool segment read");
            if let Some(progress) = &progress {
                progress.step();
            }
        }
        if let Some(progress) = progress {
            progress.done(&format!("spool replayed: {} segments", ids.len()));
        }
        let mut log = Log {
            dir: dir.to_path_buf(),
            head: Arc::new(File::open(dir)?),
            head_id: 0,
            head_len: 0,
            allocated: 0,
            segment_bytes,
            staged: Vec::new(),
            spares,
            broken: false,
        };
        // Never written after an end found here: a new segment, past every number used.
        log.start_segment(&mut index, next_seq)?;
        let head_id = log.head_id;
        for id in index.take_empty(head_id) {
            log.retire(id);
        }
        Ok(Opened {
            log,
            index,
            next_seq: next_seq.max(head_id),
        })
    }

    /// Starts a group: begins a new segment (named `next_seq`) if the newest is full.
    /// Nothing may be staged.
    pub fn begin(&mut self, index: &std::sync::Mutex<Index>, next_seq: u64) -> std::io::Result<()> {
        debug_assert!(self.staged.is_empty());
        if self.broken {
            return Err(std::io::Error::other(
                "an earlier write failed and could not be cut off; restart the gateway",
            ));
        }
        if self.head_len < self.segment_bytes {
            return Ok(());
        }
        self.start_segment(&mut lock(index), next_seq)
    }

    /// Makes segment `id` the newest: a spare renamed, or a new file.
    fn start_segment(&mut self, index: &mut Index, id: u64) -> std::io::Result<()> {
        let path = segment_path(&self.dir, id);
        let file = loop {
            let Some(spare) = self.spares.pop() else {
                break OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)?;
            };
            match std::fs::rename(&spare, &path) {
                Ok(()) => break OpenOptions::new().read(true).write(true).open(&path)?,
                Err(error) => {
                    tracing::warn!(spare = %spare.display(), %error, "cannot reuse a spool segment");
                }
            }
        };
        // The name must survive a crash before anything in the file counts.
        File::open(&self.dir)?.sync_all()?;
        let file = Arc::new(file);
        index.segments.insert(
            id,
            Segment {
                file: file.clone(),
                live: 0,
                legacy: false,
            },
        );
        self.allocated = file.metadata()?.len();
        self.head = file;
        self.head_id = id;
        self.head_len = 0;
        Ok(())
    }

    /// Keeps delivered segment `id` as a spare, or deletes it.
    fn retire(&mut self, id: u64) {
        let path = segment_path(&self.dir, id);
        let result = if self.spares.len() < MAX_SPARES {
            let spare = self.dir.join(format!("{id:020}.spare"));
            std::fs::rename(&path, &spare).map(|()| self.spares.push(spare))
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(error) = result {
            tracing::warn!(segment = %path.display(), %error, "cannot retire a delivered spool segment");
        }
    }

    /// Stages record `seq` for `sink`; where it will be once written.
    pub fn stage_record(&mut self, sink: SinkId, seq: u64, record: &[u8]) -> Loc {
        let offset = self.head_len + self.staged.len() as u64;
        let len = u32::try_from(record.len()).expect("records are far below 4 GiB");
        self.entry(RECORD_PREFIX + record.len(), |body| {
            body.push(RECORD);
            body.push(sink.code());
            body.extend_from_slice(&seq.to_le_bytes());
            body.extend_from_slice(record);
        });
        Loc {
            segment: self.head_id,
            offset,
            len,
        }
    }

    /// Stages the delivery of `seqs` from `sink`'s queue.
    pub fn stage_delivery(&mut self, sink: SinkId, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let count = u32::try_from(seqs.len()).expect("windows are far below 4 G records");
        self.entry(6 + 8 * seqs.len(), |body| {
            body.push(DELIVERY);
            body.push(sink.code());
            body.extend_from_slice(&count.to_le_bytes());
            for seq in seqs {
                body.extend_from_slice(&seq.to_le_bytes());
            }
        });
    }

    fn entry(&mut self, body_len: usize, fill: impl FnOnce(&mut Vec<u8>)) {
        let start = self.staged.len();
        self.staged.extend_from_slice(&[0; HEADER]);
        fill(&mut self.staged);
        let body = &self.staged[start + HEADER..];
        debug_assert_eq!(body.len(), body_len);
        let crc = checksum(self.head_id, body);
        let len = u32::try_from(body.len()).expect("entries are far below 4 GiB");
        self.staged[start..start + 4].copy_from_slice(&MARKER.to_le_bytes());
        self.staged[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
        self.staged[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    }

    /// Writes what is staged, then `fdatasync`s when `sync`. On failure the segment is
    /// cut back to where its data ended, so nothing staged counts.
    ///
    /// A write past the blocks the file has also changes its size, which its `fdatasync`
    /// must then write too. A new segment is therefore filled with zeros [`ZERO_AHEAD`]
    /// past a small group's end: one size change for many groups, as in a recycled
    /// segment. Large groups (large records) are only appended, so their bytes are not
    /// written twice.
    pub fn write(&mut self, sync: bool) -> std::io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let end = self.head_len + self.staged.len() as u64;
        let mut result = Ok(());
        if end > self.allocated && self.staged.len() as u64 <= ZERO_AHEAD / 4 {
            let from = self.allocated.max(end);
            let zeros = vec![0u8; (end + ZERO_AHEAD - from) as usize];
            result = self.head.write_all_at(&zeros, from);
            if result.is_ok() {
                self.allocated = end + ZERO_AHEAD;
            }
        }
        let result = result
            .and_then(|()| self.head.write_all_at(&self.staged, self.head_len))
            .and_then(|()| if sync { self.head.sync_data() } else { Ok(()) });
        self.staged.clear();
        match result {
            Ok(()) => {
                self.head_len = end;
                self.allocated = self.allocated.max(end);
                Ok(())
            }
            Err(error) => {
                self.allocated = self.head_len;
                if let Err(cut) = self.head.set_len(self.head_len) {
                    tracing::error!(%cut, "cannot cut the spool's segment back after a failed write");
                    self.broken = true;
                }
                Err(error)
            }
        }
    }

    /// Retires the segments whose records were all delivered (never the newest).
    pub fn drop_delivered(&mut self, index: &mut Index) {
        for id in index.take_empty(self.head_id) {
            self.retire(id);
        }
    }
}

/// Reads the entries of segment `id` into `index`, skipping damaged ones; how many bytes
/// of it hold entries (the end of the last whole one).
fn replay(bytes: &[u8], id: u64, index: &mut Index, next_seq: &mut u64) -> usize {
    let mut at = 0;
    let mut end = 0;
    while at < bytes.len() {
        match check_entry(&bytes[at..], id) {
            Some(body) if apply_entry(body, id, at, index, next_seq) => {
                at += HEADER + body.len();
                end = at;
            }
            _ => {
                let Some(next) = next_entry(bytes, at + 1, id) else {
                    // Nothing whole after it: the end of what was written (zeros, a
                    // recycled file's old entries, or a write a crash cut short, of which
                    // nothing was acknowledged).
                    break;
                };
                tracing::error!(
                    segment = id,
                    offset = at,
                    skipped_bytes = next - at,
                    "a damaged spool entry is skipped: the record in it (if any) is lost, \
                     or a delivery in it is made again"
                );
                crate::metrics::METRICS.spool_damaged_entries.inc();
                at = next;
            }
        }
    }
    end
}

/// Where the next whole entry of segment `id` starts in `bytes`, from `from` on.
fn next_entry(bytes: &[u8], from: usize, id: u64) -> Option<usize> {
    let marker = MARKER.to_le_bytes();
    let mut at = from;
    while at + HEADER <= bytes.len() {
        let found = bytes[at..].windows(4).position(|w| w == marker)?;
        at += found;
        if check_entry(&bytes[at..], id).is_some_and(entry_is_sane) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Whether a checked entry's body is one this log writes.
fn entry_is_sane(body: &[u8]) -> bool {
    let sink = body.get(1).copied().and_then(sink_of);
    match (body[0], sink) {
        (RECORD, Some(_)) => body.len() >= RECORD_PREFIX,
        (DELIVERY, Some(_)) if body.len() >= 6 => {
            let count = u32::from_le_bytes(body[2..6].try_into().expect("four bytes")) as usize;
            body.len() == 6 + 8 * count
        }
        _ => false,
    }
}

/// Applies one checked entry at byte `at` of segment `id` to `index`; false if its body
/// is not one this log writes.
fn apply_entry(body: &[u8], id: u64, at: usize, index: &mut Index, next_seq: &mut u64) -> bool {
    if !entry_is_sane(body) {
        return false;
    }
    let sink = sink_of(body[1]).expect("checked by entry_is_sane");
    if body[0] == RECORD {
        let seq = u64_at(body, 2);
        let len = (body.len() - RECORD_PREFIX) as u32;
        index.insert(
            sink,
            seq,
            Loc {
                segment: id,
                offset: at as u64,
                len,
            },
        );
        *next_seq = (*next_seq).max(seq + 1);
    } else {
        let count = u32::from_le_bytes(body[2..6].try_into().expect("four bytes")) as usize;
        for n in 0..count {
            index.remove(sink, u64_at(body, 6 + 8 * n));
        }
    }
    true
}

/// Reads the entries of a segment written before [`MARKER`] into `index`, up to its
/// first bad one; how many bytes of it were whole.
fn replay_legacy(bytes: &[u8], id: u64, index: &mut Index, next_seq: &mut u64) -> usize {
    let mut at = 0;
    while at < bytes.len() {
        let Some(body) = check_legacy_entry(&bytes[at..], id) else {
            // The older format has no marker to find the next entry by: what follows a
            // bad entry that is not the zeros after the data cannot be read.
            if bytes[at..].iter().take(LEGACY_HEADER).any(|&b| b != 0) {
                tracing::error!(
                    segment = id,
                    offset = at,
                    "a spool segment of the format without markers has a bad entry; \
                     the entries after it cannot be found again and are not read"
                );
                crate::metrics::METRICS.spool_damaged_entries.inc();
            }
            break;
        };
        if !apply_entry(body, id, at, index, next_seq) {
            break;
        }
        at += LEGACY_HEADER + body.len();
    }
    at
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

fn lock(index: &std::sync::Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}
