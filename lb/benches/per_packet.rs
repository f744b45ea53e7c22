//! Micro-benchmarks of the per-packet work: validating a query, choosing a backend with each
//! policy, entering a query in the in-flight table and rewriting its ID, and matching and
//! restoring an answer. Run with `cargo bench -p lb --bench per_packet`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use lb::backend::Backend;
use lb::inflight::{InflightTable, Origin};
use lb::policy::{pick, PickContext, Policy};
use lb::wire;

fn query() -> Vec<u8> {
    wire::build_query(
        0x1234,
        &wire::encode_name("host42.example.test.").unwrap(),
        1,
    )
}

fn answer(q: &[u8]) -> Vec<u8> {
    let mut a = q.to_vec();
    a[2] |= 0x84;
    a[7] = 1;
    a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 1]);
    a
}

fn backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            Arc::new(Backend::new(
                format!("127.0.0.{}:53", i + 1).parse().unwrap(),
            ))
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let q = query();
    c.bench_function("check_query", |b| {
        b.iter(|| lb::dataplane::query::check_query(black_box(&q)))
    });

    let set = backends(4);
    let question = wire::question(&q).unwrap();
    for policy in [
        Policy::LeastOutstanding,
        Policy::RoundRobin,
        Policy::FirstAvailable,
        Policy::QnameHash,
    ] {
        let mut counter = 0usize;
        c.bench_function(&format!("pick/{}", policy.as_str()), |b| {
            b.iter(|| {
                counter = counter.wrapping_add(1);
                let h = if policy == Policy::QnameHash {
                    wire::qname_hash(&q, &question)
                } else {
                    0
                };
                pick(
                    policy,
                    black_box(&set),
                    PickContext {
                        qname_hash: h,
                        counter,
                    },
                    |b: &Arc<Backend>| b.is_usable(),
                )
            })
        });
    }

    let client: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let origin = Origin {
        client,
        listener: 0,
        local: None,
    };
    let mut table = InflightTable::new(4096);
    let mut rng_state = 0x9e37_79b9u32;
    let now = Instant::now();
    let mut buf = q.clone();
    c.bench_function("inflight_insert_rewrite_release", |b| {
        b.iter(|| {
            let id = table
                .insert(
                    || {
                        rng_state ^= rng_state << 13;
                        rng_state ^= rng_state >> 17;
                        rng_state ^= rng_state << 5;
                        rng_state as u16
                    },
                    origin,
                    &q,
                    Some(question),
                    now,
                    0,
                )
                .unwrap();
            wire::set_id(&mut buf, id);
            table.release(black_box(id))
        })
    });

    let mut a = answer(&q);
    let id = table
        .insert(|| 777, origin, &q, Some(question), now, 0)
        .unwrap();
    wire::set_id(&mut a, id);
    c.bench_function("match_answer_and_restore_id", |b| {
        b.iter(|| {
            let h = wire::header(black_box(&a)).unwrap();
            let slot = table.get(h.id).unwrap();
            let ok = wire::answer_matches(&slot.query, slot.question.as_ref(), &a);
            let client_id = slot.client_id;
            wire::set_id(&mut a, client_id);
            wire::set_id(&mut a, h.id);
            ok
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
