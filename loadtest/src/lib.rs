//! CNNF's benchmarks. Speed is measured here, never asserted in tests.
//!
//! Every benchmark measures CNNF's figure *and* a raw baseline in the same
//! run on the same machine, and prints the ratio, so numbers from
//! different machines compare. The load generators are binaries
//! (`src/bin/`); micro-benchmarks use criterion (`benches/`).
//!
//! May depend on anything in the workspace; nothing may depend on it.

#![forbid(unsafe_code)]

pub mod results;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cnnf_proto::v1::{
    envelope::Payload, ConnectionDecision, DecisionBatch, Direction, Endpoint, Envelope, Identity, IdentityKind, Mode,
    Protocol, Verdict,
};

/// A realistic decision event: one decision with both identities resolved.
pub fn decision_event(i: u64, node: &str) -> Envelope {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0);
    let identity = |n: u64| Identity {
        kind: IdentityKind::Image as i32,
        id: format!("sha256:{:064x}", n % 1000),
        name: format!("registry.example/app-{}:1.{}", n % 1000, n % 7),
        container_id: format!("{:064x}", n),
        cluster: "bench".into(),
        node: node.into(),
    };
    Envelope {
        event_id: format!("{node}:bench:{i}"),
        cluster: "bench".into(),
        node: node.into(),
        time_unix_nanos: now,
        payload: Some(Payload::Decisions(DecisionBatch {
            decisions: vec![ConnectionDecision {
                source: Some(Endpoint {
                    address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                    port: 40000 + (i % 20000) as u32,
                    identity: Some(identity(i)),
                }),
                destination: Some(Endpoint {
                    address: "10.99.0.10".into(),
                    port: 5432,
                    identity: Some(identity(i + 1)),
                }),
                protocol: Protocol::Tcp as i32,
                direction: Direction::Egress as i32,
                verdict: Verdict::Allow as i32,
                mode: Mode::Alert as i32,
                first_seen_unix_nanos: now,
                last_seen_unix_nanos: now,
                count: 1,
                ..Default::default()
            }],
            overflow_count: 0,
        })),
        ..Default::default()
    }
}

/// The NATS server a benchmark runs against: the one at `url`, or a fresh
/// one started here (kept running while the returned guard lives), with
/// the CNNF topology declared. Returns the guard, a JetStream context and
/// the server's URL.
pub async fn nats(
    url: Option<&str>,
) -> anyhow::Result<(Option<cnnf_testkit::NatsServer>, async_nats::jetstream::Context, String)> {
    let (server, url) = match url {
        Some(url) => (None, url.to_owned()),
        None => {
            let server = cnnf_testkit::NatsServer::start().await;
            let url = server.url();
            (Some(server), url)
        }
    };
    let js = cnnf_bus::jetstream(async_nats::connect(&url).await?);
    cnnf_bus::topology::ensure(&js, &Default::default()).await?;
    Ok((server, js, url))
}

/// Events per second.
pub fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

/// Prints one row: name, CNNF rate, baseline rate, ratio.
pub fn report(what: &str, cnnf: f64, baseline_name: &str, baseline: f64) {
    println!(
        "{what:<34} {cnnf:>12.0} events/s   {baseline_name:<30} {baseline:>12.0} events/s   ratio {:.2}",
        cnnf / baseline
    );
}
