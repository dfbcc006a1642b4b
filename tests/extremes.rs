//! Numeric extremes on every backend: scores near ±f32::MAX, spreads of 1e-30 and 1e30,
//! subnormals, ε from 1e-30 to 1e30, ties, rows of one entry, rows with fewer valid entries
//! than k or none at all, k = 0 and k = n; both variants, directions and scales, forward and
//! backward. Each answer is either right (invariants, and agreement with the f64 reference)
//! or a typed error — never NaN, never a panic.

mod common;

use std::sync::Arc;

use common::worst_abs;
use rand::{Rng, SeedableRng};
use soft_topk::cpu::CpuBackend;
use soft_topk::reference::Reference;
use soft_topk::{
    check_row, Backend, Batch, Cotangent, Direction, Error, Forward, Scale, SoftTopK, Variant,
};

/// The f32 backends round σ and the threshold to a few ulp; at these extremes the scores
/// themselves are f32, so only the solve's rounding remains (a looser bound than cpu_parity's
/// 1e-5 because ties at the f32 resolution of huge scores turn rounding into mask movement).
const MASK_TOLERANCE: f32 = 1e-4;
/// Σ mask = k up to the f32 rounding of n values in [0, 1] and the solvers' stopping rule.
const SUM_TOLERANCE: f64 = 1e-3;
/// A gradient error per unit of mask error, per unit of 2/(s·ε)·max|g| (see cpu_parity.rs).
const GRAD_ERROR_PER_MASK_ERROR: f32 = 4.0;
/// The gradient is 2/(s·ε) times a factor of order k·max|g|; with 2/(s·ε) above this it may
/// pass f32::MAX for real (ε = 3e-39 gives 6.7e38), so only NaN is an error there.
const GRAD_MAY_OVERFLOW: f64 = 1e36;

/// Scores spanning the float range's edges, in largest orientation; smallest mode negates them.
fn families() -> Vec<(&'static str, Vec<f32>)> {
    let sub = |bits: u32| f32::from_bits(bits);
    vec![
        (
            "near_max",
            vec![3.0e38, 2.9e38, 3.1e38, 2.5e38, f32::MAX, 1e38],
        ),
        (
            "near_max_mixed_signs",
            vec![3e38, -3e38, 2e38, -1e38, 0.0, f32::MAX, f32::MIN],
        ),
        ("near_min", vec![-3.0e38, -2.9e38, f32::MIN, -3.1e38, -1e38]),
        (
            "spread_1e-30",
            (0..6).map(|i| i as f32 * 1e-30 - 2e-30).collect(),
        ),
        (
            "spread_1e-30_on_one",
            (0..5).map(|i| 1.0 + i as f32 * 1e-30).collect(),
        ),
        (
            "spread_1e30",
            (0..6).map(|i| (i as f32 - 3.0) * 1e30).collect(),
        ),
        ("subnormal", (1..7).map(sub).collect()),
        (
            "subnormal_mixed_signs",
            vec![sub(3), -sub(2), sub(1), 0.0, -0.0, -sub(7)],
        ),
        ("all_equal", vec![0.7; 5]),
        ("all_equal_huge", vec![f32::MAX; 4]),
        ("all_equal_zero_signs", vec![0.0, -0.0, 0.0, -0.0]),
        ("one", vec![0.25]),
        ("one_huge", vec![-3e38]),
        ("one_subnormal", vec![sub(1)]),
        (
            "some_excluded",
            vec![1.0, f32::NEG_INFINITY, f32::NEG_INFINITY, 2.0, 0.5],
        ),
        ("all_excluded", vec![f32::NEG_INFINITY; 4]),
    ]
}

const EPSILONS: [f64; 9] = [1e-30, 1e-10, 1e-2, 1.0, 1e10, 1e30, 3e-39, 1e-300, 5e-324];

fn backends() -> Vec<Arc<dyn Backend>> {
    common::all_backends("extremes")
}

/// Largest |a − b| and where, with equal values (the same infinity too) counting as 0.
fn worst_gap(actual: &[f32], expected: &[f32]) -> (f32, usize) {
    let gap = |(a, b): (&f32, &f32)| if a == b { 0.0 } else { (a - b).abs() };
    actual
        .iter()
        .zip(expected)
        .map(gap)
        .enumerate()
        .fold(
            (0.0, 0),
            |w, (i, e)| if e > w.0 || e.is_nan() { (e, i) } else { w },
        )
}

fn assert_row_zero(label: &str, what: &str, values: &[f32]) {
    let bad = values.iter().position(|&v| v != 0.0);
    assert!(
        bad.is_none(),
        "{label}: {what} should be 0, entry {bad:?} is {:?}",
        bad.map(|i| values[i])
    );
}

/// Checks one backend's forward and backward on `batch` against the reference's, and the
/// invariants every answer must keep.
fn check_backend(label: &str, backend: &dyn Backend, op: &SoftTopK, batch: &Batch, seed: u64) {
    let label = format!("{label} on {}", backend.name());
    let (rows, n) = (batch.rows(), batch.n());
    let reference = Reference.forward(op, batch).expect("reference forward");
    let fwd = match backend.forward(op, batch) {
        Ok(f) => f,
        Err(e) => panic!("{label}: forward refused a valid call with {e:?}"),
    };
    assert_eq!(
        (fwd.rows, fwd.n, fwd.mask.len()),
        (rows, n, rows * n),
        "{label}"
    );

    for r in 0..rows {
        let row_label = format!("{label}, row {r}");
        let report = &fwd.reports[r];
        let mask = fwd.mask_row(r);
        // Debug text, not ==: the error of a NaN score carries the NaN.
        assert_eq!(
            format!("{:?}", report.error),
            format!("{:?}", reference.reports[r].error),
            "{row_label}: row errors differ from the reference"
        );
        if report.error.is_some() {
            assert_row_zero(&row_label, "the mask of a failed row", mask);
            continue;
        }
        let bad = mask.iter().position(|m| !(0.0..=1.0).contains(m));
        assert!(bad.is_none(), "{row_label}: mask {mask:?} leaves [0, 1]");
        for (c, &m) in mask.iter().enumerate() {
            if !batch.is_valid(r, c, op.direction) {
                assert_eq!(m, 0.0, "{row_label}: excluded column {c} has mass");
            }
        }
        let total: f64 = mask.iter().map(|&m| m as f64).sum();
        if report.converged {
            assert!(
                (total - report.k as f64).abs() <= SUM_TOLERANCE * (report.k.max(1) as f64),
                "{row_label}: Σ mask = {total}, k = {} ({report:?})",
                report.k
            );
        }
        let (err, at, _) = worst_abs(mask, reference.mask_row(r));
        assert!(
            err <= MASK_TOLERANCE,
            "{row_label}: mask error {err:e} at column {at} against the reference \
             ({mask:?} vs {:?})",
            reference.mask_row(r)
        );
        if op.variant == Variant::Sorted {
            check_ranks(&row_label, &fwd, &reference, r, report.k);
        }
    }
    check_backward(&label, backend, op, batch, &fwd, &reference, seed);
}

fn check_ranks(label: &str, fwd: &Forward, reference: &Forward, r: usize, k: usize) {
    for j in 0..fwd.k_max {
        let rank = fwd.rank_row(r, j).expect("sorted output has ranks");
        if j >= k {
            assert_row_zero(label, &format!("rank {j} beyond k = {k}"), rank);
            continue;
        }
        let bad = rank.iter().position(|m| !(0.0..=1.0).contains(m));
        assert!(bad.is_none(), "{label}: rank {j} = {rank:?} leaves [0, 1]");
        let (err, at, _) = worst_abs(rank, reference.rank_row(r, j).expect("reference ranks"));
        assert!(
            err <= MASK_TOLERANCE,
            "{label}: rank {j} error {err:e} at column {at} against the reference"
        );
    }
}

fn check_backward(
    label: &str,
    backend: &dyn Backend,
    op: &SoftTopK,
    batch: &Batch,
    fwd: &Forward,
    reference: &Forward,
    seed: u64,
) {
    let (rows, n) = (batch.rows(), batch.n());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let g_mask: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let g_ranks: Vec<f32> = (0..rows * fwd.k_max * n)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut cotangents = vec![("mask", Cotangent::Mask(&g_mask), &g_mask)];
    if op.variant == Variant::Sorted {
        cotangents.push(("ranks", Cotangent::Ranks(&g_ranks), &g_ranks));
    }
    for (what, cot, g) in cotangents {
        let label = format!("{label}, {what} cotangent");
        let grad = backend
            .backward(op, batch, fwd, cot)
            .unwrap_or_else(|e| panic!("{label}: backward refused a valid call with {e:?}"));
        let want = Reference
            .backward(op, batch, reference, cot)
            .expect("reference backward");
        assert_eq!(grad.len(), rows * n, "{label}");
        let g_max = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for r in 0..rows {
            let row = &grad[r * n..(r + 1) * n];
            let Ok(spec) = check_row(op, batch, r) else {
                assert_row_zero(&label, "the gradient of a failed row", row);
                continue;
            };
            let factor = 2.0 / (spec.scale * op.epsilon);
            let bad = row.iter().position(|d| d.is_nan());
            assert!(
                bad.is_none(),
                "{label}: row {r} gradient {bad:?} is NaN: {row:?}"
            );
            // N.B. Beyond GRAD_MAY_OVERFLOW the true gradient can pass f32::MAX; it then
            // saturates to ±inf, which is the right f32 answer, so only NaN is refused there.
            if factor < GRAD_MAY_OVERFLOW {
                let bad = row.iter().position(|d| !d.is_finite());
                assert!(
                    bad.is_none(),
                    "{label}: row {r} gradient {bad:?} not finite: {row:?}"
                );
            }
            for (c, &d) in row.iter().enumerate() {
                if !batch.is_valid(r, c, op.direction) {
                    assert_eq!(d, 0.0, "{label}: excluded column {c} has a gradient");
                }
            }
            let allowed =
                (GRAD_ERROR_PER_MASK_ERROR as f64 * MASK_TOLERANCE as f64 * factor) as f32 * g_max;
            let (err, at) = worst_gap(row, &want[r * n..(r + 1) * n]);
            assert!(
                err <= allowed.max(f32::MIN_POSITIVE),
                "{label}: row {r} gradient error {err:e} at column {at} (allowed {allowed:e}): \
                 {row:?} vs {:?}",
                &want[r * n..(r + 1) * n]
            );
        }
    }
}

/// Every family × k × ε × variant × direction × scale, one row per call, on every backend.
#[test]
fn every_extreme_row_on_every_backend() {
    let backends = backends();
    let mut calls = 0usize;
    for (name, row) in families() {
        let n = row.len();
        let mut ks: Vec<usize> = vec![0, 1, n / 2, n.saturating_sub(1), n];
        ks.dedup();
        for &k in &ks {
            for &epsilon in &EPSILONS {
                for variant in [Variant::TopK, Variant::Sorted] {
                    for direction in [Direction::Largest, Direction::Smallest] {
                        for scale in [Scale::None, Scale::Max] {
                            let scores: Vec<f32> =
                                row.iter().map(|&x| direction.sign() as f32 * x).collect();
                            let batch = Batch::new(&scores, 1, n).expect("one row");
                            let op = SoftTopK::new(k, epsilon)
                                .variant(variant)
                                .direction(direction)
                                .scale(scale);
                            let label = format!(
                                "{name} k={k} eps={epsilon:e} {variant:?} {direction:?} \
                                 {scale:?}"
                            );
                            for backend in &backends {
                                check_backend(&label, backend.as_ref(), &op, &batch, calls as u64);
                                calls += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("extremes: {calls} forward + backward calls checked");
}

/// The extremes side by side in one batch (padded with exclusions to one n), each row with its
/// own k: the batch answer equals the rows solved one at a time.
#[test]
fn extreme_rows_together_equal_rows_alone() {
    let families = families();
    let n = families
        .iter()
        .map(|(_, r)| r.len())
        .max()
        .expect("families");
    let mut scores = Vec::new();
    let mut valid = Vec::new();
    let mut ks = Vec::new();
    for (i, (_, row)) in families.iter().enumerate() {
        scores.extend(row.iter().copied());
        valid.extend(row.iter().map(|_| true));
        // Padding is excluded both ways: by the validity mask and, every other row, by −∞.
        let pad = if i % 2 == 0 {
            f32::NEG_INFINITY
        } else {
            f32::NAN
        };
        scores.extend(std::iter::repeat_n(pad, n - row.len()));
        valid.extend(std::iter::repeat_n(i % 2 == 0, n - row.len()));
        ks.push((i * 3) % (n + 1));
    }
    let rows = families.len();
    let batch = Batch::new(&scores, rows, n)
        .and_then(|b| b.with_valid(&valid))
        .expect("padded batch");
    for backend in backends() {
        for variant in [Variant::TopK, Variant::Sorted] {
            for epsilon in [1e-30, 1e-2, 1e30] {
                let op = SoftTopK::new(0, epsilon)
                    .per_row_k(ks.clone())
                    .variant(variant);
                let label = format!("together {variant:?} eps={epsilon:e}");
                check_backend(&label, backend.as_ref(), &op, &batch, 7);
                let together = backend.forward(&op, &batch).expect("batch forward");
                for (r, &k) in ks.iter().enumerate() {
                    let alone_scores = batch.row(r);
                    let alone_valid = batch.valid_row(r).expect("mask");
                    let alone = Batch::single(alone_scores)
                        .and_then(|b| b.with_valid(alone_valid))
                        .expect("one row");
                    let alone_op = SoftTopK::new(k, epsilon).variant(variant);
                    let solo = backend.forward(&alone_op, &alone).expect("row forward");
                    assert_eq!(
                        together.mask_row(r),
                        solo.mask_row(0),
                        "{label} on {}: row {r} differs when solved alone",
                        backend.name()
                    );
                }
            }
        }
    }
}

/// ε = 0, negative, NaN or infinite is a typed error on every backend, forward and backward.
#[test]
fn bad_epsilon_is_a_typed_error() {
    let scores = [1.0f32, 2.0, 3.0];
    let batch = Batch::single(&scores).expect("one row");
    let good = Reference
        .forward(&SoftTopK::new(1, 0.1), &batch)
        .expect("forward");
    for backend in backends() {
        for epsilon in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for variant in [Variant::TopK, Variant::Sorted] {
                let op = SoftTopK::new(1, epsilon).variant(variant);
                let name = backend.name();
                let forward = backend.forward(&op, &batch);
                assert!(
                    matches!(forward, Err(Error::EpsNotPositive { .. })),
                    "{name}: eps {epsilon} {variant:?} forward gave {forward:?}"
                );
                let grad = backend.backward(&op, &batch, &good, Cotangent::Mask(&[1.0; 3]));
                assert!(
                    matches!(grad, Err(Error::EpsNotPositive { .. })),
                    "{name}: eps {epsilon} {variant:?} backward gave {grad:?}"
                );
            }
        }
    }
}

/// NaN and the wrong infinity in a valid entry are the row's typed error; the other rows of
/// the batch keep their answers.
#[test]
fn non_finite_scores_are_row_errors() {
    let n = 4;
    #[rustfmt::skip]
    let scores = [
        1.0, f32::NAN, 2.0, 3.0,
        1.0, f32::INFINITY, 2.0, 3.0,
        1.0, 2.0, 3.0, 4.0,
    ];
    for backend in backends() {
        for variant in [Variant::TopK, Variant::Sorted] {
            for direction in [Direction::Largest, Direction::Smallest] {
                let flipped: Vec<f32> = scores
                    .iter()
                    .map(|&x| direction.sign() as f32 * x)
                    .collect();
                let batch = Batch::new(&flipped, 3, n).expect("batch");
                let op = SoftTopK::new(2, 0.1).variant(variant).direction(direction);
                let label = format!("non-finite {variant:?} {direction:?}");
                check_backend(&label, backend.as_ref(), &op, &batch, 11);
                let fwd = backend.forward(&op, &batch).expect("forward");
                for r in 0..2 {
                    let kind = fwd.reports[r].error.as_ref().map(Error::kind);
                    assert_eq!(kind, Some("non_finite_input"), "{label}: row {r}");
                }
                assert!(
                    fwd.reports[2].error.is_none(),
                    "{label}: the good row failed"
                );
            }
        }
    }
}

/// Regression: the CPU's f32 threshold search carried θ in f64 score units, so a temperature
/// below the f64 spacing of the scores could not move θ off a tie: five equal scores of 1.0 at
/// ε = 1e-30, k = 1 came out as 1/2 each (Σ = 2.5) and were reported converged. Such rows now
/// go to the f64 reference, which works on centred scores.
#[test]
fn regression_cpu_threshold_below_f64_resolution() {
    let one_ulp = f32::EPSILON;
    let cases: [(&str, Vec<f32>, usize, f64); 3] = [
        ("ties at 1, eps 1e-30", vec![1.0; 5], 1, 1e-30),
        ("ties at 1000, eps 1e-14", vec![1000.0; 4], 1, 1e-14),
        (
            "ulp spread at 1, eps 1e-17",
            vec![1.0, 1.0 + one_ulp, 1.0 + 2.0 * one_ulp, 1.0 + 3.0 * one_ulp],
            2,
            1e-17,
        ),
    ];
    for (label, scores, k, epsilon) in cases {
        let batch = Batch::single(&scores).expect("one row");
        let op = SoftTopK::new(k, epsilon);
        let cpu = CpuBackend::new().forward(&op, &batch).expect("cpu forward");
        let reference = Reference.forward(&op, &batch).expect("reference forward");
        let total: f64 = cpu.mask.iter().map(|&m| m as f64).sum();
        assert!(
            (total - k as f64).abs() <= SUM_TOLERANCE,
            "{label}: Σ mask = {total}, k = {k}: {:?}",
            cpu.mask
        );
        let (err, at, _) = worst_abs(&cpu.mask, &reference.mask);
        assert!(err <= MASK_TOLERANCE, "{label}: mask error {err:e} at {at}");
        check_backend(label, &CpuBackend::new(), &op, &batch, 3);
    }
}

/// Regression: with 2/(s·ε) beyond f64 (ε = 5e-324) or u = 2·(x − c)/(s·ε) beyond it (a
/// spread of 1e300 at ε = 1e-10, reachable through the tool's f64 input), the reference computed
/// 0·∞ = NaN for tied scores: the sorted plan was NaN and its masks (NaN clamped by min(1))
/// read 1 on every entry, summing to n instead of k. Found by tests/fuzz_parsers.rs.
#[test]
fn regression_reference_temperature_beyond_f64() {
    let cases: [(&str, Vec<f64>, usize, f64); 4] = [
        ("ties, eps 5e-324", vec![0.0; 7], 1, 5e-324),
        ("distinct, eps 5e-324", vec![0.3, -1.0, 2.0, 0.3], 2, 5e-324),
        (
            "spread 1e300, eps 1e-10",
            vec![1e300, -1e300, 0.0, 5.0],
            2,
            1e-10,
        ),
        (
            "spread 1.7e308, eps 1",
            vec![1.7e308, -1.7e308, 0.0],
            1,
            1.0,
        ),
    ];
    for (label, scores, k, epsilon) in cases {
        for variant in [Variant::TopK, Variant::Sorted] {
            let op = SoftTopK::new(k, epsilon).variant(variant);
            let out = soft_topk::reference::forward_row(&op, 0, &scores, None);
            let label = format!("{label} {variant:?}");
            assert!(out.report.error.is_none(), "{label}: {:?}", out.report);
            let values = out.mask.iter().chain(out.ranks.iter().flatten());
            assert!(values.clone().all(|v| v.is_finite()), "{label}: {out:?}");
            let total: f64 = out.mask.iter().sum();
            assert!(
                (total - k as f64).abs() <= SUM_TOLERANCE,
                "{label}: Σ mask = {total}: {out:?}"
            );
            for (j, rank) in out.ranks.iter().enumerate() {
                let mass: f64 = rank.iter().sum();
                assert!(
                    (mass - 1.0).abs() <= SUM_TOLERANCE,
                    "{label}: rank {j} holds {mass}"
                );
            }
        }
    }
}
