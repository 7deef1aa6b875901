//! The cost of the checks every consumer applies to a message
//! (`cnnf_core::envelope::decode`) against a bare protobuf decode.

#![allow(missing_docs)] // criterion_group! generates an undocumented public fn.

use criterion::{criterion_group, criterion_main, Criterion};
use prost::Message;

fn decode(c: &mut Criterion) {
    let bytes = cnnf_core::envelope::encode(cnnf_loadtest::decision_event(42, "node-1"));
    let mut group = c.benchmark_group("decode decision event");
    group.bench_function("baseline: prost decode", |b| {
        b.iter(|| cnnf_proto::v1::Envelope::decode(std::hint::black_box(bytes.as_slice())).unwrap())
    });
    group.bench_function("cnnf: decode + checks", |b| {
        b.iter(|| {
            cnnf_core::envelope::decode(
                std::hint::black_box(bytes.as_slice()),
                cnnf_core::envelope::DEFAULT_MAX_MESSAGE_BYTES,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
