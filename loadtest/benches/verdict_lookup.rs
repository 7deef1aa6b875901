//! The cost of one verdict (`CompiledTable::decide`) on a node's hot path,
//! against a bare `HashMap<(u32, u32, u16), u8>` lookup over as many
//! learned connections: DESIGN.md asks ≤ 200 ns p99 with 10k identities,
//! 10k rules and 1M learned connections, flat as rules grow.
//!
//! One table per rule count (10, 100, 1k, 10k), each with 10k images, an
//! enforcing model per image and 1M learned connections (50 outbound and
//! 50 matching inbound per image). Rules name the first half of the images
//! as sources (an allowed image destination, a subnet that prevents, and
//! allow-learned on every other rule); the second half has no rule, so the
//! model and the mode decide. Connections mix four kinds evenly: known to
//! the models, unknown, allowed by a rule, prevented by a subnet rule.
//!
//! Besides criterion's numbers it prints, per table: build time, the
//! index's estimated heap size, the resident-memory growth of building the
//! table and of building the index, a per-decision p50/p99/p99.9 timed one
//! decision at a time (timer cost shown beside it), and the ratio to the
//! baseline over the same mix. Every figure of `decide` is also taken for
//! `decide_interned`, the agent's path, with each identity interned once
//! per table as the agent's peers cache it.

#![allow(missing_docs)] // criterion_group! generates an undocumented public fn.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use cnnf_core::eval::{CompiledTable, Connection, Decision, Identity, InternedIdentity, Scope};
use cnnf_core::proto::{
    self, network_object::Kind, CompiledModel, LearnedConnection, NetworkObject, PortRange, Rule, RuleDestination,
    VerdictTable,
};
use cnnf_testkit::images::{image_id, image_name};
use criterion::{criterion_group, criterion_main, Criterion};

const IMAGES: u32 = 10_000;
/// Images below this have rules (at the larger rule counts); the rest never.
const RULED: u32 = IMAGES / 2;
const LEARNED_PER_SIDE: u32 = 50;
const RULE_COUNTS: [u32; 4] = [10, 100, 1_000, 10_000];
const MIX: usize = 4096;

fn address(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8))
}

/// The k-th learned destination of image i: peer and port.
fn learned_peer(i: u32, k: u32) -> (u32, u16) {
    ((i + 1 + k * 97) % IMAGES, 8000 + (k % 16) as u16)
}

fn peer(i: u32) -> proto::Identity {
    proto::Identity {
        kind: proto::IdentityKind::Image as i32,
        id: image_id(i),
        name: image_name(i),
        ..Default::default()
    }
}

/// 10k images, each with an enforcing model of 100 learned connections.
fn base_table() -> VerdictTable {
    let learned = |peer_index: u32, port: u16| LearnedConnection {
        peer: Some(peer(peer_index)),
        port: u32::from(port),
        protocol: proto::Protocol::Tcp as i32,
        count: 1,
        ..Default::default()
    };
    let models = (0..IMAGES)
        .map(|i| CompiledModel {
            image_id: image_id(i),
            state: proto::ModelState::Enforcing as i32,
            outbound: (0..LEARNED_PER_SIDE)
                .map(|k| {
                    let (to, port) = learned_peer(i, k);
                    learned(to, port)
                })
                .collect(),
            inbound: (0..LEARNED_PER_SIDE)
                .map(|k| {
                    let from = (i + IMAGES * 100 - 1 - k * 97) % IMAGES;
                    learned(from, learned_peer(from, k).1)
                })
                .collect(),
        })
        .collect();
    let mut objects: Vec<NetworkObject> = (0..IMAGES)
        .map(|i| NetworkObject {
            name: format!("img-{i}"),
            kind: Kind::Image as i32,
            image_id: image_id(i),
            ..Default::default()
        })
        .collect();
    objects.push(NetworkObject {
        name: "blocked".into(),
        kind: Kind::Subnet as i32,
        cidrs: vec!["10.250.0.0/16".into()],
        ..Default::default()
    });
    objects.extend((0..100).map(|n| NetworkObject {
        name: format!("partner-{n}"),
        kind: Kind::Subnet as i32,
        cidrs: vec![format!("10.100.{n}.0/24"), format!("fd00:{n:x}::/48")],
        ..Default::default()
    }));
    VerdictTable {
        version: 1,
        mode: proto::Mode::Alert as i32,
        host_mode: proto::Mode::Alert as i32,
        objects,
        models,
        ..Default::default()
    }
}

/// Rule r: source image r mod RULED, allows the next image on 9000, sends
/// to a partner subnet on 443, prevents the blocked subnet.
fn rules(count: u32) -> Vec<Rule> {
    (0..count)
        .map(|r| {
            let source = r % RULED;
            Rule {
                id: format!("rule-{r}"),
                source: format!("img-{source}"),
                destinations: vec![
                    RuleDestination {
                        object: format!("img-{}", source + 1),
                        ports: vec![PortRange {
                            first: 9000 + r / RULED,
                            last: 0,
                        }],
                        protocol: proto::Protocol::Tcp as i32,
                        effect: proto::RuleEffect::Unspecified as i32,
                    },
                    RuleDestination {
                        object: format!("partner-{}", r % 100),
                        ports: vec![PortRange { first: 443, last: 0 }],
                        protocol: proto::Protocol::Tcp as i32,
                        effect: proto::RuleEffect::Unspecified as i32,
                    },
                    RuleDestination {
                        object: "blocked".into(),
                        ports: vec![],
                        protocol: proto::Protocol::Any as i32,
                        effect: proto::RuleEffect::Prevent as i32,
                    },
                ],
                allow_learned: r % 2 == 0,
                effect: proto::RuleEffect::Alert as i32,
                ..Default::default()
            }
        })
        .collect()
}

/// A connection by index: source, destination, destination address, port.
type Spec = (u32, u32, IpAddr, u16);

/// The mix: known, unknown, rule-allowed, prevented by a subnet rule.
fn mix(rule_count: u32) -> Vec<(&'static str, Spec)> {
    let sources_with_rules = rule_count.min(RULED);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |below: u32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % u64::from(below)) as u32
    };
    (0..MIX)
        .map(|n| match n % 4 {
            0 => {
                let source = RULED + next(IMAGES - RULED);
                let (to, port) = learned_peer(source, next(LEARNED_PER_SIDE));
                ("known", (source, to, address(to), port))
            }
            1 => {
                let source = RULED + next(IMAGES - RULED);
                let to = next(IMAGES);
                ("unknown", (source, to, address(to), 23))
            }
            2 => {
                let source = next(sources_with_rules);
                ("rule allows", (source, source + 1, address(source + 1), 9000))
            }
            _ => {
                let source = next(sources_with_rules);
                let blocked = IpAddr::V4(Ipv4Addr::new(10, 250, 0, next(250) as u8));
                ("subnet prevents", (source, next(IMAGES), blocked, 5432))
            }
        })
        .collect()
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// p50, p99, p99.9 of `samples` (nanoseconds).
fn percentiles(samples: &mut [u64]) -> (u64, u64, u64) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99), at(0.999))
}

fn verdict_lookup(c: &mut Criterion) {
    let rss_start = rss_bytes();
    let started = Instant::now();
    let base = base_table();
    let learned: usize = base
        .models
        .iter()
        .map(|model| model.inbound.len() + model.outbound.len())
        .sum();
    println!(
        "table: {IMAGES} images, {learned} learned connections, {} objects; generated in {:.2?}, rss +{:.0} MiB",
        base.objects.len(),
        started.elapsed(),
        mib(rss_bytes().saturating_sub(rss_start)),
    );
    assert_eq!(learned, 1_000_000);

    let identities: Vec<Identity> = (0..IMAGES)
        .map(|i| Identity::Image {
            id: image_id(i),
            name: image_name(i),
        })
        .collect();

    // The baseline: the same learned connections as (image, peer, port).
    let mut baseline: HashMap<(u32, u32, u16), u8> = HashMap::new();
    for i in 0..IMAGES {
        for k in 0..LEARNED_PER_SIDE {
            let (to, port) = learned_peer(i, k);
            baseline.insert((i, to, port), 1);
            baseline.insert((to, i, port), 2);
        }
    }

    for rule_count in RULE_COUNTS {
        let mut table = base.clone();
        table.rules = rules(rule_count);
        let rss_before = rss_bytes();
        let started = Instant::now();
        let compiled = CompiledTable::build(table).unwrap();
        let build = started.elapsed();
        println!(
            "{rule_count:>5} rules: build {build:.2?}, index ≈ {:.1} MiB (estimate), rss +{:.0} MiB",
            mib(compiled.index_heap_bytes()),
            mib(rss_bytes().saturating_sub(rss_before)),
        );

        let specs = mix(rule_count);
        let connections: Vec<Connection<'_>> = specs
            .iter()
            .map(|(_, (source, destination, destination_address, port))| Connection {
                source: &identities[*source as usize],
                source_address: address(*source),
                destination: &identities[*destination as usize],
                destination_address: *destination_address,
                port: *port,
                protocol: proto::Protocol::Tcp,
                scope: Scope::Egress,
            })
            .collect();
        let keys: Vec<(u32, u32, u16)> = specs
            .iter()
            .map(|(_, (source, destination, _, port))| (*source, *destination, *port))
            .collect();
        check_mix(&compiled, &specs, &connections);
        // The agent's path: every identity interned once per table.
        let started = Instant::now();
        let interned: Vec<InternedIdentity> = identities.iter().map(|identity| compiled.intern(identity)).collect();
        println!(
            "{rule_count:>5} rules: {} identities interned in {:.2?}",
            interned.len(),
            started.elapsed()
        );
        let ends: Vec<(&InternedIdentity, &InternedIdentity)> = specs
            .iter()
            .map(|(_, (source, destination, _, _))| (&interned[*source as usize], &interned[*destination as usize]))
            .collect();
        for (connection, (source, destination)) in connections.iter().zip(&ends) {
            assert_eq!(
                compiled.decide_interned(connection, source, destination),
                compiled.decide(connection)
            );
        }

        let mut group = c.benchmark_group(format!("verdict lookup, {rule_count} rules"));
        group.bench_function("baseline: HashMap<(u32,u32,u16),u8>", |b| {
            let mut n = 0usize;
            b.iter(|| {
                n = (n + 1) % MIX;
                baseline.get(black_box(&keys[n])).copied()
            })
        });
        group.bench_function("cnnf: CompiledTable::decide (mix)", |b| {
            let mut n = 0usize;
            b.iter(|| {
                n = (n + 1) % MIX;
                compiled.decide(black_box(&connections[n])).verdict
            })
        });
        group.bench_function("cnnf: CompiledTable::decide_interned (mix)", |b| {
            let mut n = 0usize;
            b.iter(|| {
                n = (n + 1) % MIX;
                let (source, destination) = ends[n];
                compiled
                    .decide_interned(black_box(&connections[n]), source, destination)
                    .verdict
            })
        });
        for kind in ["known", "unknown", "rule allows", "subnet prevents"] {
            let subset: Vec<&Connection<'_>> = specs
                .iter()
                .zip(&connections)
                .filter(|((name, _), _)| *name == kind)
                .map(|(_, connection)| connection)
                .collect();
            group.bench_function(format!("cnnf: decide ({kind})"), |b| {
                let mut n = 0usize;
                b.iter(|| {
                    n = (n + 1) % subset.len();
                    compiled.decide(black_box(subset[n])).verdict
                })
            });
        }
        group.finish();

        one_at_a_time(rule_count, &compiled, &connections, &ends, &baseline, &keys);
    }
}

/// Every connection of the mix decides as its kind says.
fn check_mix(compiled: &CompiledTable, specs: &[(&str, Spec)], connections: &[Connection<'_>]) {
    for ((kind, _), connection) in specs.iter().zip(connections) {
        let Decision { verdict, .. } = compiled.decide(connection);
        let expected = match *kind {
            "known" => proto::Verdict::Allow,
            "unknown" => proto::Verdict::Alert,
            "rule allows" => proto::Verdict::Allow,
            _ => proto::Verdict::Prevent,
        };
        assert_eq!(verdict, expected, "{kind}: {connection:?}");
    }
}

/// Per-decision percentiles, timed singly, and the ratio of means to the
/// baseline over the same mix.
fn one_at_a_time(
    rule_count: u32,
    compiled: &CompiledTable,
    connections: &[Connection<'_>],
    ends: &[(&InternedIdentity, &InternedIdentity)],
    baseline: &HashMap<(u32, u32, u16), u8>,
    keys: &[(u32, u32, u16)],
) {
    const ROUNDS: usize = 250;
    let mut timer = Vec::with_capacity(MIX * ROUNDS);
    let mut decide = Vec::with_capacity(MIX * ROUNDS);
    let mut interned = Vec::with_capacity(MIX * ROUNDS);
    let mut lookup = Vec::with_capacity(MIX * ROUNDS);
    for _ in 0..ROUNDS {
        for ((connection, key), (source, destination)) in connections.iter().zip(keys).zip(ends) {
            let t0 = Instant::now();
            let t1 = Instant::now();
            black_box(compiled.decide(black_box(connection)));
            let t2 = Instant::now();
            black_box(compiled.decide_interned(black_box(connection), source, destination));
            let t3 = Instant::now();
            black_box(baseline.get(black_box(key)));
            let t4 = Instant::now();
            timer.push((t1 - t0).as_nanos() as u64);
            decide.push((t2 - t1).as_nanos() as u64);
            interned.push((t3 - t2).as_nanos() as u64);
            lookup.push((t4 - t3).as_nanos() as u64);
        }
    }
    let (timer50, _, _) = percentiles(&mut timer);
    let (d50, d99, d999) = percentiles(&mut decide);
    let (i50, i99, i999) = percentiles(&mut interned);
    let (l50, l99, _) = percentiles(&mut lookup);

    // Means over tight loops (no timer per call).
    let mean = |f: &mut dyn FnMut(usize)| {
        let started = Instant::now();
        for round in 0..ROUNDS {
            for n in 0..MIX {
                f(n + round);
            }
        }
        started.elapsed() / (ROUNDS * MIX) as u32
    };
    let decide_mean: Duration = mean(&mut |n| {
        black_box(compiled.decide(black_box(&connections[n % MIX])));
    });
    let interned_mean: Duration = mean(&mut |n| {
        let (source, destination) = ends[n % MIX];
        black_box(compiled.decide_interned(black_box(&connections[n % MIX]), source, destination));
    });
    let lookup_mean: Duration = mean(&mut |n| {
        black_box(baseline.get(black_box(&keys[n % MIX])));
    });
    println!(
        "{rule_count:>5} rules, timed singly (timer itself p50 {timer50} ns, included): decide p50 {d50} ns, p99 {d99} ns, \
         p99.9 {d999} ns; decide_interned p50 {i50} ns, p99 {i99} ns, p99.9 {i999} ns; baseline p50 {l50} ns, p99 {l99} ns"
    );
    println!(
        "{rule_count:>5} rules, tight loop: decide {decide_mean:.0?}/decision, decide_interned {interned_mean:.0?}/decision, \
         baseline {lookup_mean:.0?}/lookup, ratios {:.2} and {:.2}",
        decide_mean.as_secs_f64() / lookup_mean.as_secs_f64(),
        interned_mean.as_secs_f64() / lookup_mean.as_secs_f64()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = verdict_lookup
}
criterion_main!(benches);
