//! The spool on disk: segment files of framed records and an ack cursor.
//!
//! # Layout
//!
//! A spool directory holds `lock` (held with an exclusive file lock while a
//! [`Spool`] is open, so two processes never write one spool), `cursor`
//! (the highest acked sequence), and segment files `<first seq>.seg`
//! (20 digits) of framed records (see [`crate::frame`]) after an 8-byte
//! magic. Records get consecutive sequences starting at 1; the last segment
//! is the one appended to, and a new one starts once it would grow past
//! `segment_bytes`.
//!
//! # Acks
//!
//! [`Spool::ack_through`] writes the cursor (to a temporary file, then
//! renamed over the old one, so a crash leaves the old or the new cursor,
//! never half of one) and then deletes every segment all of whose records
//! are acked. A cursor that is lost or unreadable counts as "nothing
//! acked": everything still on disk is sent again, and JetStream drops the
//! copies by message id.
//!
//! # Opening: torn tails and corruption
//!
//! Opening checks every record's checksum and sequence. In the last
//! segment, the first invalid frame and everything after it are a torn
//! tail (a write cut short by a crash, or garbage): the file is truncated
//! there, logged, and counted (`torn_tails_repaired`). In an older segment
//! an invalid frame is corruption (the disk, not a crash, damaged it): the
//! rest of that segment is skipped, logged at error level and counted
//! (`corrupt_segments`, `corrupt_bytes_skipped`), and the spool goes on
//! with the next segment. We chose skipping over refusing to start because
//! an agent that cannot open its spool cannot report anything, while one
//! that skipped a damaged stretch still delivers everything else, and says
//! how much it lost.
//!
//! # Durability
//!
//! An append is one `write` into the page cache before it returns, so a
//! process crash (kill -9, panic, OOM) loses nothing that `append` returned
//! `Ok` for. A power loss or kernel crash loses what was not yet fsynced,
//! depending on [`SyncPolicy`]: nothing with `EveryAppend` (an fsync before
//! `append` returns), at most the last interval with `Interval`, whatever
//! the kernel had not written back with `Never`. The cursor is not fsynced:
//! after a power loss it may be older than it was, which only means
//! records are sent again and deduplicated by JetStream.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::frame::{self, EncodeError, FrameError, SpoolRecord, HEADER_LEN};
use crate::metrics::SpoolMetrics;

const SEGMENT_MAGIC: &[u8; 8] = b"CNNFSEG1";
const SEGMENT_HEADER_LEN: u64 = SEGMENT_MAGIC.len() as u64;
const CURSOR_MAGIC: &[u8; 8] = b"CNNFCUR1";
const CURSOR_FILE: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";
const LOCK_FILE: &str = "lock";
const SEGMENT_SUFFIX: &str = ".seg";

/// When appended records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Fsync before `append` returns: a power loss loses nothing acked to
    /// the caller. Costs one fsync per record (records are batches).
    EveryAppend,
    /// Fsync in the background at this interval (done by
    /// [`SpoolHandle`](crate::SpoolHandle)'s syncer task; a bare [`Spool`]
    /// leaves it to its owner via [`Spool::sync`]). A power loss loses at
    /// most about one interval.
    Interval(Duration),
    /// Never fsync; the kernel writes back on its own schedule.
    Never,
}

/// Settings of a spool.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Most bytes of segment files on disk; an append that would exceed it
    /// is refused with [`SpoolError::Full`]. Acked records in a segment
    /// that still holds un-acked ones count until the segment goes.
    pub max_bytes: u64,
    /// Size at which a new segment file is started (below 4 GiB).
    pub segment_bytes: u64,
    /// Largest record (its frame body) accepted. Keep it below the
    /// streams' maximum message size, headers included: JetStream refuses
    /// a larger message only after it was sent, and the publisher retries it.
    pub max_record_bytes: u32,
    /// When records are fsynced. The default, every 50 ms in the
    /// background, keeps fsyncs off the appender's path: on a disk shared
    /// with a busy nats-server an fsync per 64 KiB record measured about
    /// 200 records/s, the interval about 18,000 (see the crate's
    /// `throughput` example).
    pub sync: SyncPolicy,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            // Room for the headers under the streams' 1 MiB message limit.
            max_record_bytes: 1024 * 1024 - 4096,
            sync: SyncPolicy::Interval(Duration::from_millis(50)),
        }
    }
}

/// Errors of a spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("spool {op} of {path} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process (or another `Spool` in this one) has the directory open.
    #[error("spool directory {0} is in use by another process")]
    Locked(PathBuf),
    /// The spool is full: the record was refused and counted as overflowed.
    #[error("spool full: {used} of {max} bytes used, record needs {needed}")]
    Full {
        /// Bytes the record needs.
        needed: u64,
        /// Bytes on disk.
        used: u64,
        /// The limit.
        max: u64,
    },
    /// The record is larger than `max_record_bytes`.
    #[error("record of {len} bytes exceeds the spool's limit of {max}")]
    RecordTooLarge {
        /// Frame body length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// The record cannot be framed.
    #[error("record cannot be spooled: {0}")]
    Encode(#[from] EncodeError),
    /// A record read back is invalid.
    #[error("corrupt record in {path} at offset {offset}: {source}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Offset of the frame.
        offset: u64,
        /// What is wrong.
        source: FrameError,
    },
    /// An ack of a sequence that was never appended.
    #[error("ack through {seq} but the last appended sequence is {last}")]
    AckBeyondEnd {
        /// Sequence acked.
        seq: u64,
        /// Last sequence appended.
        last: u64,
    },
    /// The configuration is unusable.
    #[error("invalid spool configuration: {0}")]
    InvalidConfig(String),
    /// A thread panicked while holding the spool.
    #[error("spool lock poisoned by a panic")]
    Poisoned,
}

impl SpoolError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
        move |source| SpoolError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Offset of each record; record `i` has sequence `first_seq + i`.
    starts: Vec<u32>,
    /// Valid bytes (header and records); reads never go past it.
    size: u64,
}

impl Segment {
    fn last_seq(&self) -> Option<u64> {
        (!self.starts.is_empty()).then(|| self.first_seq + self.starts.len() as u64 - 1)
    }

    fn end_of(&self, index: usize) -> u64 {
        self.starts.get(index + 1).map_or(self.size, |&s| u64::from(s))
    }

    /// Frame bytes of the records with sequence in `(after, through]`.
    fn bytes_and_count_in(&self, after: u64, through: u64) -> (u64, u64) {
        let Some(last) = self.last_seq() else {
            return (0, 0);
        };
        let lo = (after + 1).max(self.first_seq);
        let hi = through.min(last);
        if lo > hi {
            return (0, 0);
        }
        let (a, b) = ((lo - self.first_seq) as usize, (hi - self.first_seq) as usize);
        (self.end_of(b) - u64::from(self.starts[a]), (b - a + 1) as u64)
    }
}

/// Files to fsync, taken from a spool so the fsync can run without
/// holding it.
#[derive(Debug, Default)]
pub struct SyncJob {
    files: Vec<Arc<File>>,
    dir: Option<PathBuf>,
}

impl SyncJob {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dir.is_none()
    }

    /// Fsyncs the files (data) and, if segments were created or deleted,
    /// the directory.
    pub fn run(self) -> Result<(), SpoolError> {
        for file in &self.files {
            file.sync_data().map_err(|source| SpoolError::Io {
                op: "fsync",
                path: PathBuf::from("segment"),
                source,
            })?;
        }
        if let Some(dir) = &self.dir {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(SpoolError::io("fsync", dir))?;
        }
        Ok(())
    }
}

/// The durable outbox: append records, read them back in order, ack them.
///
/// Synchronous file I/O: an append is one `write` of page-cache speed
/// (plus an fsync under [`SyncPolicy::EveryAppend`]), cheaper than handing
/// the bytes to a blocking pool. Share it between tasks through
/// [`SpoolHandle`](crate::SpoolHandle).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    config: SpoolConfig,
    _lock: File,
    /// Oldest first; the last one is appended to. Never empty.
    segments: VecDeque<Segment>,
    next_seq: u64,
    acked: u64,
    disk_bytes: u64,
    depth_records: u64,
    depth_bytes: u64,
    /// Written since the last sync: sealed segments and the active one.
    unsynced: Vec<Arc<File>>,
    active_dirty: bool,
    dir_dirty: bool,
    buf: Vec<u8>,
    metrics: SpoolMetrics,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, repairing a torn tail and
    /// skipping corrupt stretches (see the module docs).
    pub fn open(dir: impl AsRef<Path>, config: SpoolConfig) -> Result<Spool, SpoolError> {
        Self::open_with_metrics(dir, config, SpoolMetrics::default())
    }

    /// Like [`open`](Self::open), reporting into `metrics`.
    pub fn open_with_metrics(
        dir: impl AsRef<Path>,
        config: SpoolConfig,
        metrics: SpoolMetrics,
    ) -> Result<Spool, SpoolError> {
        let dir = dir.as_ref().to_owned();
        validate(&config)?;
        fs::create_dir_all(&dir).map_err(SpoolError::io("create", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(SpoolError::io("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir)),
            Err(fs::TryLockError::Error(e)) => return Err(SpoolError::io("lock", &lock_path)(e)),
        }
        let _ = fs::remove_file(dir.join(CURSOR_TMP));
        let acked = read_cursor(&dir);

        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(SpoolError::io("list", &dir))? {
            let entry = entry.map_err(SpoolError::io("list", &dir))?;
            let name = entry.file_name();
            let Some(first_seq) = name.to_str().and_then(parse_segment_name) else {
                continue;
            };
            names.push((first_seq, entry.path()));
        }
        names.sort();

        let mut spool = Spool {
            dir,
            config,
            _lock: lock,
            segments: VecDeque::new(),
            next_seq: acked + 1,
            acked,
            disk_bytes: 0,
            depth_records: 0,
            depth_bytes: 0,
            unsynced: Vec::new(),
            active_dirty: false,
            dir_dirty: false,
            buf: Vec::new(),
            metrics,
        };
        let count = names.len();
        for (i, (first_seq, path)) in names.into_iter().enumerate() {
            if let Some(segment) = spool.load_segment(first_seq, path, i + 1 == count)? {
                spool.segments.push_back(segment);
            }
        }
        spool.finish_open()?;
        tracing::info!(
            message = "Spool opened.",
            dir = %spool.dir.display(),
            segments = spool.segments.len(),
            acked = spool.acked,
            next_seq = spool.next_seq,
            depth_records = spool.depth_records,
            depth_bytes = spool.depth_bytes
        );
        Ok(spool)
    }

    /// Reads and checks one segment; `None` if it has to go.
    fn load_segment(&mut self, first_seq: u64, path: PathBuf, is_last: bool) -> Result<Option<Segment>, SpoolError> {
        let bytes = fs::read(&path).map_err(SpoolError::io("read", &path))?;
        let header_ok = bytes.len() >= SEGMENT_HEADER_LEN as usize && bytes.starts_with(SEGMENT_MAGIC);
        if !header_ok {
            if bytes.len() < SEGMENT_HEADER_LEN as usize && SEGMENT_MAGIC.starts_with(&bytes) {
                // Created but its header never fully written: a crash at
                // rotation. Nothing in it.
                if !bytes.is_empty() {
                    self.metrics.torn_tails_repaired.inc();
                    self.metrics.torn_bytes_dropped.inc_by(bytes.len() as u64);
                }
                tracing::warn!(message = "Removing spool segment with a torn header.", path = %path.display());
                fs::remove_file(&path).map_err(SpoolError::io("remove", &path))?;
                return Ok(None);
            }
            let aside = path.with_extension("seg.corrupt");
            tracing::error!(
                message = "Spool segment is not a spool segment; set aside.",
                path = %path.display(),
                renamed_to = %aside.display(),
                bytes = bytes.len()
            );
            self.metrics.corrupt_segments.inc();
            self.metrics.corrupt_bytes_skipped.inc_by(bytes.len() as u64);
            fs::rename(&path, &aside).map_err(SpoolError::io("rename", &path))?;
            return Ok(None);
        }

        let mut starts = Vec::new();
        let mut offset = SEGMENT_HEADER_LEN as usize;
        let mut problem = None;
        while offset < bytes.len() {
            match frame::decode(&bytes[offset..], self.config.max_record_bytes) {
                Ok((seq, _, len)) if seq == first_seq + starts.len() as u64 => {
                    starts.push(offset as u32);
                    offset += len;
                }
                Ok((seq, _, _)) => {
                    problem = Some(format!(
                        "sequence {seq} where {} was expected",
                        first_seq + starts.len() as u64
                    ));
                    break;
                }
                Err(error) => {
                    problem = Some(error.to_string());
                    break;
                }
            }
        }
        let dropped = (bytes.len() - offset) as u64;
        if let Some(problem) = problem {
            if is_last {
                tracing::warn!(
                    message = "Torn tail cut off the spool.",
                    path = %path.display(),
                    offset,
                    bytes_dropped = dropped,
                    records_kept = starts.len(),
                    %problem
                );
                self.metrics.torn_tails_repaired.inc();
                self.metrics.torn_bytes_dropped.inc_by(dropped);
            } else {
                tracing::error!(
                    message = "Corrupt spool segment: skipping the rest of it.",
                    path = %path.display(),
                    offset,
                    bytes_skipped = dropped,
                    records_kept = starts.len(),
                    %problem
                );
                self.metrics.corrupt_segments.inc();
                self.metrics.corrupt_bytes_skipped.inc_by(dropped);
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(SpoolError::io("open", &path))?;
        if is_last && dropped > 0 {
            file.set_len(offset as u64).map_err(SpoolError::io("truncate", &path))?;
            file.sync_all().map_err(SpoolError::io("fsync", &path))?;
        }
        Ok(Some(Segment {
            first_seq,
            path,
            file: Arc::new(file),
            starts,
            size: offset as u64,
        }))
    }

    /// Drops fully acked segments, picks the next sequence, makes sure an
    /// active segment exists and computes the depth.
    fn finish_open(&mut self) -> Result<(), SpoolError> {
        // Sequences never go back, even when the cursor was lost: an empty
        // segment still names the sequence its first record would get.
        for segment in &self.segments {
            let next = segment.last_seq().map_or(segment.first_seq, |last| last + 1);
            self.next_seq = self.next_seq.max(next);
        }
        // An empty last segment is reused only if it starts at next_seq.
        if let Some(last) = self.segments.back() {
            if last.starts.is_empty() && last.first_seq != self.next_seq {
                let segment = self.segments.pop_back().expect("checked above");
                remove_segment_file(&segment)?;
            }
        }
        for segment in &self.segments {
            self.disk_bytes += segment.size;
        }
        self.delete_acked_segments()?;
        if self.segments.is_empty() {
            self.create_segment()?;
        }
        for segment in &self.segments {
            let (bytes, count) = segment.bytes_and_count_in(self.acked, u64::MAX);
            self.depth_bytes += bytes;
            self.depth_records += count;
        }
        self.publish_gauges();
        Ok(())
    }

    /// The spool's counters and gauges.
    pub fn metrics(&self) -> &SpoolMetrics {
        &self.metrics
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &SpoolConfig {
        &self.config
    }

    /// The highest acked sequence (0: none).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The sequence the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records waiting to be acked.
    pub fn depth_records(&self) -> u64 {
        self.depth_records
    }

    /// Bytes of records waiting to be acked.
    pub fn depth_bytes(&self) -> u64 {
        self.depth_bytes
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends `record` and returns its sequence. Refuses with
    /// [`SpoolError::Full`] (counted as `overflowed`) or
    /// [`SpoolError::RecordTooLarge`] (counted as `too_large`); the caller
    /// decides what to do with the record, but it is never dropped
    /// without a count.
    pub fn append(&mut self, record: &SpoolRecord) -> Result<u64, SpoolError> {
        let seq = self.write(record)?;
        if self.config.sync == SyncPolicy::EveryAppend {
            self.sync_job().run()?;
        }
        Ok(seq)
    }

    /// Appends without the fsync of [`SyncPolicy::EveryAppend`]; the caller
    /// runs [`sync_job`](Self::sync_job) (outside its lock).
    pub(crate) fn write(&mut self, record: &SpoolRecord) -> Result<u64, SpoolError> {
        let body = record.frame_len() - HEADER_LEN;
        if body > self.config.max_record_bytes as usize {
            self.metrics.too_large.inc();
            return Err(SpoolError::RecordTooLarge {
                len: body,
                max: self.config.max_record_bytes,
            });
        }
        let len = record.frame_len() as u64;
        let active = self.segments.back().expect("spool has an active segment");
        let rotate = !active.starts.is_empty() && active.size + len > self.config.segment_bytes;
        let needed = len + if rotate { SEGMENT_HEADER_LEN } else { 0 };
        if self.disk_bytes + needed > self.config.max_bytes {
            self.metrics.overflowed.inc();
            return Err(SpoolError::Full {
                needed,
                used: self.disk_bytes,
                max: self.config.max_bytes,
            });
        }
        if rotate {
            self.seal_active();
            self.create_segment()?;
        }
        let seq = self.next_seq;
        self.buf.clear();
        frame::encode(seq, record, &mut self.buf)?;
        let active = self.segments.back_mut().expect("spool has an active segment");
        if let Err(source) = active.file.write_all_at(&self.buf, active.size) {
            // Take back a partial write so the next record follows the last
            // complete one; if even that fails, later records go to a new
            // segment and the bytes past `size` are never read.
            if active.file.set_len(active.size).is_err() {
                self.seal_active();
                let _ = self.create_segment();
            }
            return Err(SpoolError::Io {
                op: "append to",
                path: self.segments.back().map(|s| s.path.clone()).unwrap_or_default(),
                source,
            });
        }
        active.starts.push(active.size as u32);
        active.size += len;
        self.active_dirty = true;
        self.next_seq += 1;
        self.disk_bytes += len;
        self.depth_records += 1;
        self.depth_bytes += len;
        self.metrics.appended.inc();
        self.publish_gauges();
        Ok(seq)
    }

    /// The first record with a sequence at or after `from`, if any.
    pub fn read_next(&self, from: u64) -> Result<Option<(u64, SpoolRecord)>, SpoolError> {
        for segment in &self.segments {
            let Some(last) = segment.last_seq() else {
                continue;
            };
            if last < from {
                continue;
            }
            let seq = from.max(segment.first_seq);
            let index = (seq - segment.first_seq) as usize;
            let start = u64::from(segment.starts[index]);
            let end = segment.end_of(index);
            let mut bytes = vec![0; (end - start) as usize];
            segment
                .file
                .read_exact_at(&mut bytes, start)
                .map_err(SpoolError::io("read", &segment.path))?;
            let corrupt = |source| SpoolError::Corrupt {
                path: segment.path.clone(),
                offset: start,
                source,
            };
            let (read_seq, record, _) = frame::decode(&bytes, self.config.max_record_bytes).map_err(corrupt)?;
            if read_seq != seq {
                return Err(corrupt(FrameError::Malformed("sequence differs from the index")));
            }
            return Ok(Some((seq, record)));
        }
        Ok(None)
    }

    /// Marks every record through `seq` as delivered: persists the cursor,
    /// then deletes the segments that hold nothing un-acked.
    pub fn ack_through(&mut self, seq: u64) -> Result<(), SpoolError> {
        if seq <= self.acked {
            return Ok(());
        }
        if seq >= self.next_seq {
            return Err(SpoolError::AckBeyondEnd {
                seq,
                last: self.next_seq - 1,
            });
        }
        let (mut bytes, mut count) = (0, 0);
        for segment in &self.segments {
            let (b, c) = segment.bytes_and_count_in(self.acked, seq);
            bytes += b;
            count += c;
        }
        write_cursor(&self.dir, seq)?;
        self.acked = seq;
        self.depth_bytes -= bytes;
        self.depth_records -= count;
        self.metrics.acked.inc_by(count);
        self.delete_acked_segments()?;
        // Everything acked: start the active segment afresh so its bytes
        // leave the disk too.
        let active = self.segments.back().expect("spool has an active segment");
        if self.depth_records == 0 && !active.starts.is_empty() {
            self.create_segment()?;
            self.delete_acked_segments()?;
        }
        self.publish_gauges();
        Ok(())
    }

    /// Fsyncs everything written so far.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.sync_job().run()
    }

    /// What has to be fsynced for everything written so far to be durable.
    pub fn sync_job(&mut self) -> SyncJob {
        let mut files = std::mem::take(&mut self.unsynced);
        if self.active_dirty {
            files.push(self.segments.back().expect("spool has an active segment").file.clone());
            self.active_dirty = false;
        }
        let dir = std::mem::take(&mut self.dir_dirty).then(|| self.dir.clone());
        SyncJob { files, dir }
    }

    fn seal_active(&mut self) {
        if self.active_dirty {
            let file = self.segments.back().expect("spool has an active segment").file.clone();
            self.unsynced.push(file);
            self.active_dirty = false;
        }
    }

    /// Starts a new active segment named after `next_seq`.
    fn create_segment(&mut self) -> Result<(), SpoolError> {
        let path = self.dir.join(segment_name(self.next_seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(SpoolError::io("create", &path))?;
        file.write_all_at(SEGMENT_MAGIC, 0)
            .map_err(SpoolError::io("write header of", &path))?;
        self.segments.push_back(Segment {
            first_seq: self.next_seq,
            path,
            file: Arc::new(file),
            starts: Vec::new(),
            size: SEGMENT_HEADER_LEN,
        });
        self.disk_bytes += SEGMENT_HEADER_LEN;
        self.active_dirty = true;
        self.dir_dirty = true;
        Ok(())
    }

    /// Deletes segments, oldest first, that are not the active one and hold
    /// no un-acked record.
    fn delete_acked_segments(&mut self) -> Result<(), SpoolError> {
        while self.segments.len() > 1 {
            let front = &self.segments[0];
            if front.last_seq().is_some_and(|last| last > self.acked) {
                break;
            }
            let segment = self.segments.pop_front().expect("checked above");
            remove_segment_file(&segment)?;
            self.disk_bytes -= segment.size;
            self.dir_dirty = true;
        }
        Ok(())
    }

    fn publish_gauges(&self) {
        self.metrics.depth_records.set(self.depth_records as i64);
        self.metrics.depth_bytes.set(self.depth_bytes as i64);
        self.metrics.disk_bytes.set(self.disk_bytes as i64);
    }
}

fn validate(config: &SpoolConfig) -> Result<(), SpoolError> {
    let invalid = |what: String| Err(SpoolError::InvalidConfig(what));
    if config.segment_bytes <= SEGMENT_HEADER_LEN || config.segment_bytes > u64::from(u32::MAX) {
        return invalid(format!("segment_bytes {} must be in 9..4GiB", config.segment_bytes));
    }
    if config.max_bytes < config.segment_bytes {
        return invalid(format!(
            "max_bytes {} is below segment_bytes {}",
            config.max_bytes, config.segment_bytes
        ));
    }
    if (config.max_record_bytes as usize) < frame::MIN_BODY_LEN {
        return invalid(format!("max_record_bytes {} is too small", config.max_record_bytes));
    }
    if let SyncPolicy::Interval(interval) = config.sync {
        if interval.is_zero() {
            return invalid("sync interval is zero".into());
        }
    }
    Ok(())
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn remove_segment_file(segment: &Segment) -> Result<(), SpoolError> {
    match fs::remove_file(&segment.path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SpoolError::io("remove", &segment.path)(e)),
    }
}

/// The acked sequence in `dir`'s cursor file; 0 (nothing acked) when it is
/// missing or unreadable, which only causes resends.
fn read_cursor(dir: &Path) -> u64 {
    let path = dir.join(CURSOR_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
        Err(error) => {
            tracing::warn!(message = "Spool cursor unreadable; resending everything spooled.", path = %path.display(), %error);
            return 0;
        }
    };
    match decode_cursor(&bytes) {
        Some(seq) => seq,
        None => {
            tracing::warn!(
                message = "Spool cursor invalid; resending everything spooled.",
                path = %path.display(),
                len = bytes.len()
            );
            0
        }
    }
}

fn encode_cursor(seq: u64) -> [u8; 20] {
    let mut out = [0; 20];
    out[..8].copy_from_slice(CURSOR_MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_cursor(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != 20 || &bytes[..8] != CURSOR_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    if crc32fast::hash(&bytes[..16]) != crc {
        return None;
    }
    Some(u64::from_le_bytes(bytes[8..16].try_into().ok()?))
}

fn write_cursor(dir: &Path, seq: u64) -> Result<(), SpoolError> {
    let tmp = dir.join(CURSOR_TMP);
    fs::write(&tmp, encode_cursor(seq)).map_err(SpoolError::io("write", &tmp))?;
    let path = dir.join(CURSOR_FILE);
    fs::rename(&tmp, &path).map_err(SpoolError::io("rename", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejects_damage() {
        let bytes = encode_cursor(123_456);
        assert_eq!(decode_cursor(&bytes), Some(123_456));
        for i in 0..bytes.len() {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert_eq!(decode_cursor(&bad), None, "damage at {i} unnoticed");
        }
        assert_eq!(decode_cursor(&bytes[..19]), None);
        assert_eq!(decode_cursor(&[]), None);
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_name(42), "00000000000000000042.seg");
        assert_eq!(parse_segment_name("00000000000000000042.seg"), Some(42));
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000042.seg.corrupt"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
    }
}
