//! `policy-compile`: how long the policy compiler takes to build one
//! node's verdict table, and how large the table is, with many identities,
//! rules and learned connections, beside raw baselines measured in the
//! same run.
//!
//! ```text
//! cargo run --release -p cnnf-loadtest --bin policy-compile -- --identities 10000 --rules 10000 --connections 1000000
//! ```
//!
//! The policy: one image object per identity, a subnet object, and
//! `--rules` rules (rule *i* has image *i mod identities* as its source and
//! two destinations: the next image on a port range and the subnet). The
//! models: one enforcing model per identity, `--connections` learned
//! connections spread evenly over them (half inbound, half outbound). The
//! node runs every image (the largest table a node can get).
//!
//! Printed: the compile time (policy + models → `VerdictTable`, the pure
//! part of what the service does per node; median of `--runs`), the
//! encoded size, and as baselines of the same run: protobuf encoding and
//! decoding of that very table, and building a plain `HashMap` of its
//! learned connections (the least any compiler must do with them). Ratios
//! are compile time over each baseline. `CompiledTable::build` (what an
//! agent does on receipt) is timed too.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use cnnf_core::eval::CompiledTable;
use cnnf_loadtest::results::{Figure, Results};
use cnnf_policy::compile::{self, ModelInput, Stamp};
use cnnf_policy::policy::Policy;
use cnnf_proto::v1::network_object::Kind as ObjectKind;
use cnnf_proto::v1::{
    Identity, IdentityKind, LearnedConnection, Mode, ModelState, NetworkObject, PortRange, Protocol, Rule,
    RuleDestination, RuleEffect, Side, VerdictTable,
};
use prost::Message as _;

#[derive(Debug, Parser)]
#[command(about = "Compile time and size of a node's verdict table")]
struct Args {
    /// Identities (images with a model, all on the node).
    #[arg(long, default_value_t = 10_000)]
    identities: usize,
    /// Rules.
    #[arg(long, default_value_t = 10_000)]
    rules: usize,
    /// Learned connections over all models.
    #[arg(long, default_value_t = 1_000_000)]
    connections: usize,
    /// Repetitions; the median is printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also write the figures to this file as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn image_id(i: usize) -> String {
    format!("sha256:{i:064x}")
}

fn inputs(args: &Args) -> (Policy, Vec<ModelInput>) {
    let mut policy = Policy {
        mode: Mode::Prevent as i32,
        host_mode: Mode::Alert as i32,
        ..Policy::default()
    };
    for i in 0..args.identities {
        let name = format!("image-{i:05}");
        policy.objects.insert(
            name.clone(),
            NetworkObject {
                name,
                kind: ObjectKind::Image as i32,
                image_id: image_id(i),
                ..Default::default()
            },
        );
    }
    policy.objects.insert(
        "net".into(),
        NetworkObject {
            name: "net".into(),
            kind: ObjectKind::Subnet as i32,
            cidrs: vec!["10.128.0.0/9".into()],
            ..Default::default()
        },
    );
    for r in 0..args.rules {
        let source = r % args.identities.max(1);
        let id = format!("rule-{r:05}");
        policy.rules.insert(
            id.clone(),
            Rule {
                id,
                source: format!("image-{source:05}"),
                destinations: vec![
                    RuleDestination {
                        object: format!("image-{:05}", (source + 1) % args.identities.max(1)),
                        ports: vec![PortRange {
                            first: 8000,
                            last: 8100,
                        }],
                        protocol: Protocol::Tcp as i32,
                        effect: RuleEffect::Unspecified as i32,
                    },
                    RuleDestination {
                        object: "net".into(),
                        ports: vec![PortRange { first: 22, last: 0 }],
                        protocol: Protocol::Tcp as i32,
                        effect: RuleEffect::Prevent as i32,
                    },
                ],
                allow_learned: true,
                effect: RuleEffect::Prevent as i32,
                ..Default::default()
            },
        );
    }
    let per_model = args.connections / args.identities.max(1);
    let models = (0..args.identities)
        .map(|i| ModelInput {
            image_id: image_id(i),
            state: ModelState::Enforcing as i32,
            learned: (0..per_model)
                .map(|c| LearnedConnection {
                    side: if c % 2 == 0 { Side::Inbound } else { Side::Outbound } as i32,
                    peer: Some(Identity {
                        kind: IdentityKind::Image as i32,
                        id: image_id((i + 1 + c / 2) % args.identities),
                        ..Default::default()
                    }),
                    port: 1000 + (c as u32 % 50_000),
                    protocol: Protocol::Tcp as i32,
                    count: 1,
                    ..Default::default()
                })
                .collect(),
        })
        .collect();
    (policy, models)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn timed<T>(runs: usize, mut work: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        last = Some(work());
        times.push(started.elapsed());
    }
    (median(times), last.expect("at least one run"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let (policy, models) = inputs(&args);
    println!(
        "inputs: {} identities, {} rules, {} learned connections (generated in {:.2?})",
        args.identities,
        policy.rules.len(),
        models.iter().map(|m| m.learned.len()).sum::<usize>(),
        started.elapsed()
    );

    let (compile_time, table) = timed(args.runs, || {
        compile::compile(
            &policy,
            models.clone(),
            Stamp {
                cluster: "c".into(),
                node: "n1".into(),
                version: 1,
                policy_revision: 1,
                compiled_unix_nanos: 0,
            },
        )
    });
    // The clone of the inputs is part of the timed work; time it alone.
    let (clone_time, _) = timed(args.runs, || models.clone());
    let compile_only = compile_time.saturating_sub(clone_time);
    let learned: usize = table.models.iter().map(|m| m.inbound.len() + m.outbound.len()).sum();

    let (encode_time, bytes) = timed(args.runs, || table.encode_to_vec());
    let (decode_time, decoded) = timed(args.runs, || VerdictTable::decode(bytes.as_slice()));
    let decoded = decoded?;
    assert_eq!(decoded.models.len(), table.models.len());
    let (map_time, map) = timed(args.runs, || {
        let mut map: HashMap<(&str, i32, &str, u32, i32), ()> = HashMap::with_capacity(learned);
        for model in &table.models {
            for connection in model.inbound.iter().chain(&model.outbound) {
                let peer = connection.peer.as_ref().map_or("", |p| p.id.as_str());
                map.insert(
                    (
                        model.image_id.as_str(),
                        connection.side,
                        peer,
                        connection.port,
                        connection.protocol,
                    ),
                    (),
                );
            }
        }
        map.len()
    });
    let (build_time, built) = timed(args.runs, || CompiledTable::build(table.clone()));
    built?;

    println!(
        "table: {} models, {learned} learned connections, {} rules, {} objects",
        table.models.len(),
        table.rules.len(),
        table.objects.len()
    );
    println!(
        "encoded size: {} bytes ({:.1} MiB, {:.1} bytes per learned connection)",
        bytes.len(),
        bytes.len() as f64 / 1048576.0,
        bytes.len() as f64 / learned.max(1) as f64
    );
    println!("compile (policy + models -> table, without cloning the inputs): {compile_only:.2?} (with the clone: {compile_time:.2?})");
    println!(
        "baseline protobuf encode of the table: {encode_time:.2?}  -> compile/encode {:.2}x",
        ratio(compile_only, encode_time)
    );
    println!(
        "baseline protobuf decode of the table: {decode_time:.2?}  -> compile/decode {:.2}x",
        ratio(compile_only, decode_time)
    );
    println!(
        "baseline HashMap of its {map} learned connections: {map_time:.2?}  -> compile/hashmap {:.2}x",
        ratio(compile_only, map_time)
    );
    println!("agent side: CompiledTable::build {build_time:.2?}");

    let mut results = Results::new("policy-compile");
    let what = format!(
        "compile one node's table ({} identities, {} rules, {learned} learned connections)",
        args.identities, args.rules
    );
    for (baseline, time) in [
        ("protobuf encode of the table", encode_time),
        ("protobuf decode of the table", decode_time),
        ("HashMap of its learned connections", map_time),
    ] {
        results.push(Figure::lower(what.clone(), ms(compile_only), "ms").baseline(baseline, ms(time)));
    }
    results.push(Figure::lower(
        "agent: CompiledTable::build of that table",
        ms(build_time),
        "ms",
    ));
    results.push(Figure::lower(
        "encoded table size",
        bytes.len() as f64 / 1048576.0,
        "MiB",
    ));
    results.write(args.json.as_deref())?;
    Ok(())
}

fn ms(time: Duration) -> f64 {
    time.as_secs_f64() * 1e3
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}
