//! Throughput of the spool: records of one decision batch (64 KiB, about
//! 1000 decisions) appended as fast as one task can, while the sender
//! drains them to a local nats-server; then the time until all are acked.
//!
//! `cargo run --release -p cnnf-spool --example throughput -- [records] [every|interval|never]`

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use cnnf_spool::{spawn_sender, SenderConfig, Spool, SpoolConfig, SpoolHandle, SpoolRecord, SyncPolicy};
use cnnf_testkit::NatsServer;

const PAYLOAD: usize = 64 * 1024;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let records: u64 = args
        .next()
        .map_or(5000, |a| a.parse().expect("records must be a number"));
    let sync = match args.next().as_deref().unwrap_or("every") {
        "every" => SyncPolicy::EveryAppend,
        "interval" => SyncPolicy::Interval(Duration::from_millis(50)),
        "never" => SyncPolicy::Never,
        other => panic!("unknown sync policy {other}: every|interval|never"),
    };
    let server = NatsServer::start().await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    js.get_or_create_stream(stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.*".into()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig {
        max_bytes: 4 * 1024 * 1024 * 1024,
        sync,
        ..Default::default()
    };
    let handle = SpoolHandle::new(Spool::open(dir.path(), config).unwrap());
    let (task, publisher) = spawn_sender(
        handle.clone(),
        js.clone(),
        SenderConfig::default(),
        std::future::pending(),
    )
    .unwrap();

    let payload = bytes::Bytes::from(vec![0x42u8; PAYLOAD]);
    let start = Instant::now();
    for i in 0..records {
        let record = SpoolRecord::new(format!("bench.{}", i % 4), format!("bench:boot:{i}"), payload.clone());
        handle.append(&record).unwrap();
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let appended = start.elapsed();
    while handle.metrics().depth_records.get() > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let drained = start.elapsed();
    task.abort();
    let mb = (records as f64 * PAYLOAD as f64) / (1024.0 * 1024.0);
    println!("sync policy: {sync:?}; {records} records of {PAYLOAD} bytes ({mb:.0} MiB)");
    println!(
        "append:            {:>9.0} records/s  {:>7.1} MiB/s  ({:.2} s, sender draining concurrently)",
        records as f64 / appended.as_secs_f64(),
        mb / appended.as_secs_f64(),
        appended.as_secs_f64()
    );
    println!(
        "append + drained:  {:>9.0} records/s  {:>7.1} MiB/s  ({:.2} s until JetStream acked all)",
        records as f64 / drained.as_secs_f64(),
        mb / drained.as_secs_f64(),
        drained.as_secs_f64()
    );
    println!(
        "publisher: acked {} duplicates {} resends {}",
        publisher.acked.get(),
        publisher.duplicates.get(),
        publisher.resends.get()
    );
    assert_eq!(publisher.acked.get(), records, "not every record stored once");
}
