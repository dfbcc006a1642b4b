//! Throughput of the SOFT top-k: forward and forward + backward, per backend and size.
//!
//! `cargo bench --bench throughput` runs the full grid; `SOFT_TOPK_BENCH=smoke` keeps only
//! 1 × 1000 with short warm-up and measurement (a minute or two, even on lavapipe, whose
//! 200-sweep Sinkhorn at 64 × 1000 takes seconds a call), `SOFT_TOPK_BENCH=full` adds
//! 4096 × 4096 on the GPU. Criterion prints
//! elements per second (Throughput::Elements = rows × n). GPU work is waited for inside the
//! timed region: `forward` returns only after the results are read back.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soft_topk::cpu::CpuBackend;
use soft_topk::gpu::GpuBackend;
use soft_topk::reference::Reference;
use soft_topk::{Backend, Batch, Cotangent, SoftTopK, Solver};

/// ε of the comparison in benches/README.md (uniform scores in [0, 1)).
const EPSILON: f64 = 0.01;

fn smoke() -> bool {
    std::env::var("SOFT_TOPK_BENCH").as_deref() == Ok("smoke")
}

fn sizes() -> Vec<(usize, usize)> {
    if smoke() {
        return vec![(1, 1000)];
    }
    match std::env::var("SOFT_TOPK_BENCH").as_deref() {
        Ok("full") => vec![
            (1, 1000),
            (64, 1000),
            (256, 4096),
            (16, 65536),
            (4096, 4096),
        ],
        _ => vec![(1, 1000), (64, 1000), (256, 4096), (16, 65536)],
    }
}

fn scores(rows: usize, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(2020);
    (0..rows * n).map(|_| rng.random::<f32>()).collect()
}

fn backends() -> Vec<(&'static str, Arc<dyn Backend>)> {
    let mut list: Vec<(&'static str, Arc<dyn Backend>)> = vec![
        ("cpu", Arc::new(CpuBackend::new())),
        ("reference", Arc::new(Reference)),
    ];
    match GpuBackend::shared() {
        Ok(gpu) => {
            eprintln!("GPU adapter: {}", gpu.name());
            list.push(("gpu", gpu));
        }
        Err(e) => eprintln!("GPU benches skipped: {e}"),
    }
    list
}

/// Which (backend, size) pairs are worth timing: the reference only where it takes under a
/// second, 4096 × 4096 only on the GPU.
fn wanted(backend: &str, rows: usize, n: usize) -> bool {
    match backend {
        "reference" => rows * n <= 64 * 1000,
        "gpu" => true,
        _ => rows * n < 4096 * 4096,
    }
}

fn bench_op(c: &mut Criterion, group_name: &str, op_for: impl Fn(usize) -> SoftTopK) {
    let mut group = c.benchmark_group(group_name);
    group.sample_size(10);
    if smoke() {
        group.warm_up_time(Duration::from_millis(200));
        group.measurement_time(Duration::from_millis(500));
    }
    for (name, backend) in backends() {
        for (rows, n) in sizes() {
            if !wanted(name, rows, n) {
                continue;
            }
            let op = op_for(n);
            let x = scores(rows, n);
            let g = scores(rows, n);
            let batch = Batch::new(&x, rows, n).expect("bench batch");
            let id = format!("{name}/{rows}x{n}");
            group.throughput(Throughput::Elements((rows * n) as u64));
            group.bench_function(BenchmarkId::new("forward", &id), |b| {
                b.iter(|| backend.forward(&op, &batch).expect("forward"))
            });
            group.bench_function(BenchmarkId::new("forward+backward", &id), |b| {
                b.iter(|| {
                    let out = backend.forward(&op, &batch).expect("forward");
                    backend
                        .backward(&op, &batch, &out, Cotangent::Mask(&g))
                        .expect("backward")
                })
            });
        }
    }
    group.finish();
}

fn topk_exact(c: &mut Criterion) {
    bench_op(c, "topk_exact", |n| SoftTopK::new((n / 10).max(1), EPSILON));
}

fn topk_paper(c: &mut Criterion) {
    bench_op(c, "topk_sinkhorn_200", |n| {
        SoftTopK::new((n / 10).max(1), EPSILON).solver(Solver::PAPER)
    });
}

fn sorted(c: &mut Criterion) {
    for k in [4, 16] {
        bench_op(c, &format!("sorted_k{k}"), |_| {
            SoftTopK::new(k, EPSILON).sorted()
        });
    }
}

criterion_group!(benches, topk_exact, topk_paper, sorted);
criterion_main!(benches);
