//! The spool against the real file system and a real nats-server: events
//! appended while NATS is down, across a server SIGKILL and across a crash
//! of the spool's owner arrive exactly once; torn tails and garbage are cut
//! off and counted; a full spool refuses and counts; acked segments leave
//! the disk.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use cnnf_spool::{spawn_sender, SenderConfig, Spool, SpoolConfig, SpoolError, SpoolHandle, SpoolRecord, SyncPolicy};
use cnnf_testkit::NatsServer;
use tokio::sync::oneshot;

const STREAM: &str = "T_SPOOL";

async fn connect(server: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client);
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["t.spool.*".into()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();
    js
}

fn record(i: u64) -> SpoolRecord {
    let payload = format!("event {i} ").repeat(50);
    SpoolRecord::new(
        format!("t.spool.{}", i % 3),
        format!("n1:boot:{i}"),
        payload.into_bytes(),
    )
}

/// A record whose frame length does not depend on `i`.
fn fixed(i: u64) -> SpoolRecord {
    SpoolRecord::new("t.spool.0", format!("n1:boot:{i:08}"), vec![(i % 251) as u8; 1000])
}

fn config(sync: SyncPolicy) -> SpoolConfig {
    SpoolConfig {
        max_bytes: 64 * 1024 * 1024,
        segment_bytes: 64 * 1024,
        sync,
        ..Default::default()
    }
}

fn fast_sender() -> SenderConfig {
    SenderConfig {
        max_in_flight: 32,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        cursor_interval: Duration::from_millis(20),
    }
}

/// Message ids of the stream, in stream order.
async fn stream_ids(js: &jetstream::Context) -> Vec<String> {
    let stream = js.get_stream(STREAM).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut ids = Vec::new();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.unwrap();
        let id = message.headers.get("Nats-Msg-Id").expect("message without an id");
        ids.push(id.as_str().to_owned());
    }
    ids
}

fn expected_ids(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|i| record(i).id).collect()
}

/// Waits (bounded) until the spool has nothing left to send.
async fn drained(handle: &SpoolHandle) {
    for _ in 0..3000 {
        if handle.metrics().depth_records.get() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "spool not drained: {} records left",
        handle.metrics().depth_records.get()
    );
}

fn assert_exactly_once(ids: &[String], expected: &[String]) {
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicates in the stream");
    assert_eq!(
        ids.len(),
        expected.len(),
        "stream holds {} of {} events",
        ids.len(),
        expected.len()
    );
    let expected_set: HashSet<&String> = expected.iter().collect();
    assert_eq!(unique, expected_set, "stream holds other events than appended");
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_while_nats_is_down_arrive_exactly_once_in_order() {
    let mut server = NatsServer::start().await;
    let js = connect(&server).await;
    server.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let handle = SpoolHandle::new(Spool::open(dir.path(), config(SyncPolicy::EveryAppend)).unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let (task, publisher) = spawn_sender(handle.clone(), js.clone(), fast_sender(), async {
        let _ = stopped.await;
    })
    .unwrap();
    const N: u64 = 300;
    for i in 0..N {
        handle.append(&record(i)).unwrap();
    }
    // The sender is trying and failing meanwhile; appends were not blocked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(handle.metrics().depth_records.get(), N as i64);
    assert_eq!(handle.metrics().appended.get(), N);

    server.restart().await;
    drained(&handle).await;
    let ids = stream_ids(&js).await;
    assert_eq!(ids, expected_ids(0..N), "not every event exactly once in order");
    assert_eq!(publisher.acked.get() + publisher.duplicates.get(), N);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        handle.lock().unwrap().acked(),
        N,
        "cursor not written through the last record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_stream_loses_and_duplicates_nothing() {
    let mut server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let handle =
        SpoolHandle::new(Spool::open(dir.path(), config(SyncPolicy::Interval(Duration::from_millis(20)))).unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let (task, publisher) = spawn_sender(handle.clone(), js.clone(), fast_sender(), async {
        let _ = stopped.await;
    })
    .unwrap();

    const N: u64 = 3000;
    let appender = {
        let handle = handle.clone();
        tokio::spawn(async move {
            for i in 0..N {
                handle.append(&record(i)).unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    // Kill the server once some but not all events got through.
    for _ in 0..2000 {
        if publisher.acked.get() >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before_kill = publisher.acked.get();
    assert!(
        before_kill > 0 && before_kill < N,
        "kill not mid-stream ({before_kill} acked)"
    );
    // Events still to deliver (pending or yet to be appended) at the kill.
    let pending_at_kill = handle.metrics().depth_records.get() > 0 || handle.metrics().appended.get() < N;
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().await;
    appender.await.unwrap();
    drained(&handle).await;

    let ids = stream_ids(&js).await;
    assert_exactly_once(&ids, &expected_ids(0..N));
    assert!(
        pending_at_kill,
        "nothing left to deliver at the kill: the test proved nothing"
    );
    eprintln!(
        "killed after {before_kill} acks; resends {}, duplicates {}",
        publisher.resends.get(),
        publisher.duplicates.get()
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_the_owner_mid_send_then_reopen_delivers_exactly_once() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 2000;
    // A cursor that is written rarely leaves many sent records un-acked in
    // the cursor at the crash; they must be deduplicated, not lost.
    let lazy_cursor = SenderConfig {
        cursor_interval: Duration::from_secs(3600),
        ..fast_sender()
    };
    {
        let handle = SpoolHandle::new(Spool::open(dir.path(), config(SyncPolicy::Never)).unwrap());
        for i in 0..N {
            handle.append(&record(i)).unwrap();
        }
        let (task, publisher) =
            spawn_sender(handle.clone(), js.clone(), lazy_cursor.clone(), std::future::pending()).unwrap();
        for _ in 0..2000 {
            if publisher.acked.get() >= N / 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The crash: no shutdown, no cursor write; the task just stops.
        task.abort();
        let _ = task.await;
        let sent = publisher.acked.get();
        assert!(sent > 0 && sent < N, "crash not mid-send ({sent} acked)");
        assert_eq!(handle.lock().unwrap().acked(), 0, "cursor written before the crash");
    }
    // Reopen: the lock was released with the dropped spool, as with a
    // process that died.
    let handle = SpoolHandle::new(Spool::open(dir.path(), config(SyncPolicy::Never)).unwrap());
    assert_eq!(handle.metrics().depth_records.get(), N as i64);
    let (stop, stopped) = oneshot::channel::<()>();
    let (task, publisher) = spawn_sender(handle.clone(), js.clone(), fast_sender(), async {
        let _ = stopped.await;
    })
    .unwrap();
    drained(&handle).await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();

    let ids = stream_ids(&js).await;
    assert_exactly_once(&ids, &expected_ids(0..N));
    assert!(
        publisher.duplicates.get() > 0,
        "nothing was resent after the crash: the test proved nothing"
    );
    assert_eq!(publisher.acked.get() + publisher.duplicates.get(), N);
}

#[tokio::test]
async fn two_spools_cannot_share_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Spool::open(dir.path(), config(SyncPolicy::Never)).unwrap();
    assert!(matches!(
        Spool::open(dir.path(), config(SyncPolicy::Never)),
        Err(SpoolError::Locked(_))
    ));
}

fn read_all(spool: &Spool) -> Vec<(u64, SpoolRecord)> {
    let mut out = Vec::new();
    let mut next = 1;
    while let Some((seq, record)) = spool.read_next(next).unwrap() {
        out.push((seq, record));
        next = seq + 1;
    }
    out
}

#[test]
fn torn_tail_is_cut_off_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let big = SpoolConfig {
        segment_bytes: 1024 * 1024,
        ..config(SyncPolicy::Never)
    };
    {
        let mut spool = Spool::open(dir.path(), big.clone()).unwrap();
        for i in 0..10 {
            spool.append(&record(i)).unwrap();
        }
    }
    let segment = segment_files(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&segment).unwrap().len();
    let last_frame = record(9).frame_len() as u64;
    // Cut the last record in half, as a crash during its write would.
    OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - last_frame / 2)
        .unwrap();
    let mut spool = Spool::open(dir.path(), big.clone()).unwrap();
    assert_eq!(spool.metrics().torn_tails_repaired.get(), 1);
    assert_eq!(spool.metrics().torn_bytes_dropped.get(), last_frame - last_frame / 2);
    let records = read_all(&spool);
    assert_eq!(records.len(), 9);
    for (i, (seq, r)) in records.iter().enumerate() {
        assert_eq!((*seq, r), (i as u64 + 1, &record(i as u64)));
    }
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        len - last_frame,
        "file not truncated"
    );
    // Appending goes on right after the last intact record, with the next
    // sequence.
    assert_eq!(spool.append(&record(100)).unwrap(), 10);
    drop(spool);

    // Garbage after the last record: cut off the same way.
    let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
    file.write_all(&[0x5a; 333]).unwrap();
    drop(file);
    let spool = Spool::open(dir.path(), big.clone()).unwrap();
    assert_eq!(spool.metrics().torn_tails_repaired.get(), 1);
    assert_eq!(spool.metrics().torn_bytes_dropped.get(), 333);
    let records = read_all(&spool);
    assert_eq!(records.len(), 10);
    assert_eq!(records[9], (10, record(100)));
    drop(spool);

    // Zeros (a file extended but never written) likewise; a clean reopen
    // then repairs nothing.
    let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
    file.write_all(&[0; 4096]).unwrap();
    drop(file);
    assert_eq!(
        Spool::open(dir.path(), big.clone())
            .unwrap()
            .metrics()
            .torn_bytes_dropped
            .get(),
        4096
    );
    let spool = Spool::open(dir.path(), big).unwrap();
    assert_eq!(spool.metrics().torn_tails_repaired.get(), 0);
    assert_eq!(read_all(&spool).len(), 10);
}

#[test]
fn corruption_in_an_older_segment_skips_the_rest_of_that_segment_only() {
    let dir = tempfile::tempdir().unwrap();
    let per_segment;
    {
        let mut spool = Spool::open(dir.path(), config(SyncPolicy::Never)).unwrap();
        for i in 0..200 {
            spool.append(&fixed(i)).unwrap();
        }
        assert!(spool.segment_count() >= 3);
        per_segment = (64 * 1024 - 8) / fixed(0).frame_len();
    }
    let first = segment_files(dir.path()).remove(0);
    // Flip a byte inside the 5th record of the first segment.
    let mut bytes = std::fs::read(&first).unwrap();
    let offset = 8 + 4 * fixed(0).frame_len() + 30;
    bytes[offset] ^= 0xff;
    std::fs::write(&first, &bytes).unwrap();

    let spool = Spool::open(dir.path(), config(SyncPolicy::Never)).unwrap();
    assert_eq!(spool.metrics().corrupt_segments.get(), 1);
    assert_eq!(spool.metrics().torn_tails_repaired.get(), 0);
    let seqs: Vec<u64> = read_all(&spool).into_iter().map(|(seq, _)| seq).collect();
    let kept_first = 4;
    assert_eq!(seqs[..kept_first], [1, 2, 3, 4]);
    // Everything from the next segment on is intact.
    assert_eq!(seqs[kept_first], per_segment as u64 + 1);
    assert_eq!(*seqs.last().unwrap(), 200);
    assert_eq!(seqs.len(), 200 - (per_segment - kept_first));
    assert_eq!(spool.depth_records(), seqs.len() as u64);
}

#[test]
fn full_spool_refuses_and_counts_and_acked_segments_leave_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let small = SpoolConfig {
        max_bytes: 256 * 1024,
        segment_bytes: 32 * 1024,
        ..config(SyncPolicy::Never)
    };
    let mut spool = Spool::open(dir.path(), small.clone()).unwrap();
    let mut appended = 0;
    let mut refused = 0;
    for i in 0..1000 {
        match spool.append(&record(i)) {
            Ok(seq) => {
                assert_eq!(seq, appended + 1);
                appended += 1;
            }
            Err(SpoolError::Full { used, max, .. }) => {
                assert!(used <= max);
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(appended > 0 && refused > 0);
    assert_eq!(spool.metrics().overflowed.get(), refused);
    assert_eq!(spool.metrics().appended.get(), appended);
    assert!(spool.disk_bytes() <= small.max_bytes);
    let on_disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(on_disk, spool.disk_bytes());
    assert_eq!(spool.depth_records(), appended);

    // Too large is refused and counted separately.
    let huge = SpoolRecord::new("t.spool.0", "big", vec![0; 2 * 1024 * 1024]);
    assert!(matches!(spool.append(&huge), Err(SpoolError::RecordTooLarge { .. })));
    assert_eq!(spool.metrics().too_large.get(), 1);

    // Acking half deletes the segments that are wholly acked.
    let segments_before = segment_files(dir.path()).len();
    spool.ack_through(appended / 2).unwrap();
    let segments_half = segment_files(dir.path()).len();
    assert!(segments_half < segments_before, "no segment deleted");
    assert_eq!(spool.depth_records(), appended - appended / 2);
    assert_eq!(spool.metrics().acked.get(), appended / 2);
    // Room again.
    spool.append(&record(5000)).unwrap();
    assert!(matches!(
        spool.ack_through(appended + 10),
        Err(SpoolError::AckBeyondEnd { .. })
    ));
    spool.ack_through(appended + 1).unwrap();
    assert_eq!(spool.depth_records(), 0);
    assert_eq!(spool.depth_bytes(), 0);
    assert_eq!(segment_files(dir.path()).len(), 1, "acked segments left on disk");
    assert_eq!(spool.disk_bytes(), 8, "only an empty segment header should remain");
    drop(spool);

    // The cursor and sequences survive a reopen.
    let mut spool = Spool::open(dir.path(), small).unwrap();
    assert_eq!(spool.acked(), appended + 1);
    assert_eq!(spool.depth_records(), 0);
    assert_eq!(spool.append(&record(6000)).unwrap(), appended + 2);
    assert_eq!(read_all(&spool), vec![(appended + 2, record(6000))]);
}

#[test]
fn lost_cursor_resends_everything_still_spooled() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(dir.path(), config(SyncPolicy::Never)).unwrap();
        for i in 0..10 {
            spool.append(&record(i)).unwrap();
        }
        spool.ack_through(4).unwrap();
    }
    std::fs::write(dir.path().join("cursor"), b"garbage").unwrap();
    let spool = Spool::open(dir.path(), config(SyncPolicy::Never)).unwrap();
    assert_eq!(spool.acked(), 0);
    assert_eq!(read_all(&spool).len(), 10);
    assert_eq!(spool.next_seq(), 11);
}
