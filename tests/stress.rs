//! Concurrency: 8 threads × 200 calls of mixed shapes against one shared backend and one
//! shared `GpuSoftTopK`, every answer checked against the reference solving each row alone,
//! and the process's memory measured across two identical rounds.

use std::sync::Arc;
use std::thread;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soft_topk::cpu::CpuBackend;
use soft_topk::gpu::GpuBackend;
use soft_topk::reference::Reference;
use soft_topk::{Backend, Batch, Cotangent, GpuSoftTopK, SoftTopK, Variant};

const THREADS: usize = 8;
const CALLS_PER_THREAD: usize = 200;
/// f32 top-k against the f64 reference, as in cpu_parity.rs: σ to a few ulp and the threshold
/// stopped at the f32 sum's noise, ≈ 6e-8·√n ≤ 1e-6 here.
const MASK_TOLERANCE: f32 = 1e-5;
/// The GPU solves the sorted variant in f32, where every scaled score u = 2(x − c)/(s·ε)
/// carries a rounding of |u|·2^-24 that moves plan entries by as much (σ' ≤ 1/4, a few such
/// roundings per logit gap): sorted rows allow this many units of (range/(s·ε))·2^-24 on top
/// of MASK_TOLERANCE, as tests/gpu_sorted.rs does (the CPU backend solves them in f64).
const SORTED_RANGE_ROUNDINGS: f32 = 8.0;
/// Gradient error per unit of mask error, per unit of 2/(s·ε)·max|g| (see cpu_parity.rs).
const GRAD_ERROR_PER_MASK_ERROR: f32 = 4.0;
/// A second round of the same calls may grow the resident set by at most this much. The
/// allocator's arenas and rayon's pool settle in the first round (measured: a few KiB of
/// growth in the second); one round's outputs add up to ≈ 16 MiB (1600 calls × ~8 rows ×
/// ~150 entries × mask and gradient, f32), so leaking them would pass this twice over.
const SECOND_ROUND_GROWTH_KIB: u64 = 8 * 1024;

/// One call: its op, its scores and where its rows came from.
struct Call {
    op: SoftTopK,
    rows: usize,
    n: usize,
    scores: Vec<f32>,
    cotangent: Vec<f32>,
    /// Use the shared `GpuSoftTopK` (whose op is fixed) rather than the backend directly.
    shared_operator: bool,
}

/// The op of the shared `GpuSoftTopK`.
fn shared_op() -> SoftTopK {
    SoftTopK::new(3, 0.1)
}

fn make_call(rng: &mut ChaCha8Rng) -> Call {
    let rows = rng.random_range(1..=16);
    let shared_operator = rng.random_bool(0.25);
    let sorted = !shared_operator && rng.random_bool(0.3);
    // Sorted rows solve k×k systems in the reference inside: keep them small in debug mode.
    let n = if sorted {
        rng.random_range(1..=48)
    } else {
        rng.random_range(if shared_operator { 3 } else { 1 }..=300)
    };
    let mut scores: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-2.0..2.0)).collect();
    // Some rows with a NaN (a row error), some with exclusions.
    for r in 0..rows {
        if rng.random_bool(0.1) {
            scores[r * n + rng.random_range(0..n)] = f32::NAN;
        }
        if rng.random_bool(0.1) {
            scores[r * n + rng.random_range(0..n)] = f32::NEG_INFINITY;
        }
    }
    let epsilon = 10f64.powf(rng.random_range(-2.5..1.0));
    let max_k = if sorted { n.min(6) } else { n };
    let ks: Vec<usize> = (0..rows).map(|_| rng.random_range(0..=max_k)).collect();
    let op = if shared_operator {
        shared_op()
    } else {
        let op = SoftTopK::new(0, epsilon).per_row_k(ks);
        if sorted {
            op.sorted()
        } else {
            op
        }
    };
    let cotangent = (0..rows * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Call {
        op,
        rows,
        n,
        scores,
        cotangent,
        shared_operator,
    }
}

/// Runs a call on the shared backend (or the shared operator) and checks each row against
/// the reference solving that row alone.
fn run_and_check(call: &Call, backend: &Arc<dyn Backend>, shared: &GpuSoftTopK, label: &str) {
    let batch = Batch::new(&call.scores, call.rows, call.n).expect("call batch");
    let (fwd, grad) = if call.shared_operator {
        let fwd = shared.run(&batch).expect("shared forward");
        let grad = shared.backward(&batch, &fwd, Cotangent::Mask(&call.cotangent));
        (fwd, grad.expect("shared backward"))
    } else {
        let fwd = backend.forward(&call.op, &batch).expect("forward");
        let grad = backend.backward(&call.op, &batch, &fwd, Cotangent::Mask(&call.cotangent));
        (fwd, grad.expect("backward"))
    };
    let n = call.n;
    for r in 0..call.rows {
        let row = &call.scores[r * n..(r + 1) * n];
        let g_row = &call.cotangent[r * n..(r + 1) * n];
        let alone = Batch::single(row).expect("row");
        let op = SoftTopK {
            k: soft_topk::K::All(call.op.k_of(r)),
            ..call.op.clone()
        };
        let want = Reference.forward(&op, &alone).expect("reference forward");
        let want_grad = Reference
            .backward(&op, &alone, &want, Cotangent::Mask(g_row))
            .expect("reference backward");
        // The kinds: the batch's error names row r, the row alone names row 0.
        assert_eq!(
            fwd.reports[r].error.as_ref().map(|e| e.kind()),
            want.reports[0].error.as_ref().map(|e| e.kind()),
            "{label}, row {r}: row errors differ"
        );
        let finite = row.iter().filter(|v| v.is_finite());
        let range = finite.clone().fold(f32::MIN, |a, &b| a.max(b))
            - finite.fold(f32::MAX, |a, &b| a.min(b));
        let tolerance = if op.variant == Variant::Sorted && range > 0.0 {
            let scaled_range = range * 2.0 / op.epsilon as f32;
            MASK_TOLERANCE + SORTED_RANGE_ROUNDINGS * scaled_range * f32::EPSILON / 2.0
        } else {
            MASK_TOLERANCE
        };
        let mask = fwd.mask_row(r);
        let (err, at) = worst(mask, want.mask_row(0));
        assert!(
            err <= tolerance,
            "{label}, row {r} ({:?}, n = {n}): mask error {err:e} at {at}",
            op.variant
        );
        if op.variant == Variant::Sorted {
            for j in 0..op.k_of(0).min(n) {
                let got = fwd.rank_row(r, j).expect("ranks");
                let (err, at) = worst(got, want.rank_row(0, j).expect("reference ranks"));
                assert!(
                    err <= tolerance,
                    "{label}, row {r}: rank {j} error {err:e} at {at}"
                );
            }
        }
        let factor = 2.0 / op.epsilon;
        let g_max = g_row.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let allowed = GRAD_ERROR_PER_MASK_ERROR * tolerance * factor as f32 * g_max;
        let (err, at) = worst(&grad[r * n..(r + 1) * n], &want_grad);
        assert!(
            err <= allowed,
            "{label}, row {r}: gradient error {err:e} at {at} (allowed {allowed:e})"
        );
    }
}

/// Largest |a − b| and where; NaN counts as the worst.
fn worst(actual: &[f32], expected: &[f32]) -> (f32, usize) {
    let mut w = (0.0f32, 0usize);
    for (i, (a, b)) in actual.iter().zip(expected).enumerate() {
        let e = (a - b).abs();
        if e > w.0 || e.is_nan() {
            w = (if e.is_nan() { f32::INFINITY } else { e }, i);
        }
    }
    w
}

fn vm_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One round: every thread runs its 200 calls (the same calls each round: seeded by thread).
fn round(backend: &Arc<dyn Backend>, shared: &GpuSoftTopK, name: &str) {
    thread::scope(|scope| {
        for t in 0..THREADS {
            let (backend, shared) = (Arc::clone(backend), shared.clone());
            scope.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(1000 + t as u64);
                for c in 0..CALLS_PER_THREAD {
                    let call = make_call(&mut rng);
                    let label = format!("{name}: thread {t}, call {c}");
                    run_and_check(&call, &backend, &shared, &label);
                }
            });
        }
    });
}

/// VmRSS is the whole process's: the tests take turns, from before each builds its backend
/// (opening an adapter and compiling its pipelines takes ~150 MiB on lavapipe), so that one's
/// growth is not charged to the other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Two rounds of calls on `backend`; the second may not grow VmRSS by more than
/// SECOND_ROUND_GROWTH_KIB. The caller holds its turn (see `take_turn`).
fn stress(backend: Arc<dyn Backend>) {
    let name = backend.name();
    let shared = GpuSoftTopK::on(shared_op(), Arc::clone(&backend)).expect("shared operator");
    let start = vm_rss_kib();
    round(&backend, &shared, &name);
    let after_first = vm_rss_kib();
    round(&backend, &shared, &name);
    let after_second = vm_rss_kib();
    eprintln!(
        "stress on {name}: {} calls per round; VmRSS {start:?} → {after_first:?} → \
         {after_second:?} KiB",
        THREADS * CALLS_PER_THREAD
    );
    match (after_first, after_second) {
        (Some(first), Some(second)) => assert!(
            second.saturating_sub(first) <= SECOND_ROUND_GROWTH_KIB,
            "{name}: the second round grew VmRSS from {first} to {second} KiB (allowed \
             {SECOND_ROUND_GROWTH_KIB} KiB)"
        ),
        _ => eprintln!("stress on {name}: NOT CHECKED: /proc/self/status has no VmRSS here"),
    }
}

#[test]
fn eight_threads_share_the_cpu_backend() {
    let _turn = take_turn();
    stress(Arc::new(CpuBackend::new()));
}

#[test]
fn eight_threads_share_the_gpu_backend() {
    let _turn = take_turn();
    // Under CI (CI=true) lavapipe is installed: a missing adapter fails instead of skipping.
    match GpuBackend::shared() {
        Ok(gpu) => stress(gpu),
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true but no GPU adapter: {why}")
        }
        Err(why) => eprintln!("SKIPPED on GPU: the concurrency stress test did not run ({why})"),
    }
}
