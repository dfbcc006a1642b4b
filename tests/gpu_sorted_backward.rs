//! The sorted backward on the GPU (shaders/sorted_backward.wgsl) against the f64 reference.
//!
//! Both backends differentiate the same forward, the reference's (f32 out), so these tests
//! measure the backward alone: the GPU's f32 J, right side, damped and refined solve and
//! gradient against the reference's f64 implicit differentiation of the same plan.

mod gpu_support;

use gpu_support::{make_batch, reference_backward, reference_forward, rng, uniform};
use soft_topk::gpu::{GpuBackend, SORTED_K_MAX};
use soft_topk::{Backend, Batch, Cotangent, Direction, Forward, Scale, SoftTopK, K};

/// Gradient error relative to the row's largest reference gradient: f32 forms J and the right
/// side to a few 1e-7 relative (compensated sums), and the refined solve recovers β to about
/// that where J is well conditioned (1e-5 passes on this grid).
const GRAD_TOLERANCE: f64 = 1e-4;
/// Absolute gradient error per unit of 2/(s·ε): the GPU forms the gradient from plan entries
/// and potentials of order 1, so its error is a few f32 roundings (2^-24 ≈ 6e-8) per unit of
/// factor however small the row's gradient is (nearly hard rows: 2.9e-7 seen; 1.5e-6 without
/// the refinement of the damped solve, which this bound rejects).
const GRAD_ABSOLUTE: f64 = 1e-6;

const EPSILONS: [f64; 4] = [1e-3, 1e-2, 0.1, 1.0];
const SIZES: [usize; 7] = [1, 2, 7, 64, 257, 1000, 4096];
const ROWS: [usize; 3] = [1, 3, 8];

/// Row r's 2/(s·ε), and whether its gradient is 0 by definition (a bad row, k = 0 or a single
/// valid entry) rather than by saturation.
fn row_factor(op: &SoftTopK, batch: &Batch, r: usize) -> (f64, bool) {
    match soft_topk::check_row(op, batch, r) {
        Ok(spec) => (
            2.0 / (spec.scale * op.epsilon),
            spec.is_trivial(soft_topk::Variant::Sorted),
        ),
        Err(_) => (0.0, true),
    }
}

/// Checks row r of a GPU gradient against the reference's: finite, exactly 0 on excluded
/// entries and on rows whose gradient is 0 by definition, else within GRAD_TOLERANCE of the
/// row's scale plus GRAD_ABSOLUTE per unit of factor. Returns the share of that allowance
/// used.
fn check_row_gradient(
    op: &SoftTopK,
    batch: &Batch,
    r: usize,
    got: &[f32],
    want: &[f32],
    label: &str,
) -> f64 {
    if let Some(at) = got.iter().position(|v| !v.is_finite()) {
        panic!("{label}: non-finite gradient {} at index {at}", got[at]);
    }
    let (factor, zero_row) = row_factor(op, batch, r);
    for (i, &g) in got.iter().enumerate() {
        let excluded = !batch.is_valid(r, i, op.direction);
        assert!(
            !((excluded || zero_row) && g != 0.0),
            "{label}: index {i} must be 0 (excluded: {excluded}, zero row: {zero_row}), got {g}"
        );
    }
    if zero_row {
        return 0.0;
    }
    let scale = want.iter().fold(0.0f64, |m, &b| m.max((b as f64).abs()));
    let allowed = GRAD_TOLERANCE * scale + GRAD_ABSOLUTE * factor;
    let (mut err, mut at) = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w as f64).abs();
        if e > err {
            (err, at) = (e, i);
        }
    }
    assert!(
        err <= allowed,
        "{label}: error {err:.3e} > {allowed:.3e} ({GRAD_TOLERANCE:.0e} × scale {scale:.3e} + \
         {GRAD_ABSOLUTE:.0e} × factor {factor:.3e}) at index {at}: got {}, expected {}",
        got[at],
        want[at]
    );
    if allowed > 0.0 {
        err / allowed
    } else {
        0.0
    }
}

/// A random cotangent of the kind asked for: the mask's (rows × n) or the ranks' (rows ×
/// k_max × n).
fn cotangent_values(forward: &Forward, ranks: bool, seed: u64) -> Vec<f32> {
    let per_row = if ranks { forward.k_max } else { 1 };
    uniform(&mut rng(seed), forward.rows * per_row * forward.n)
}

fn cotangent(values: &[f32], ranks: bool) -> Cotangent<'_> {
    if ranks {
        Cotangent::Ranks(values)
    } else {
        Cotangent::Mask(values)
    }
}

/// The GPU's backward of `op` against the reference's, both cotangent kinds; returns the
/// largest share of a row's allowance used.
fn compare_backward(gpu: &GpuBackend, op: &SoftTopK, batch: &Batch, what: &str, seed: u64) -> f64 {
    let forward = reference_forward(op, batch);
    let n = batch.n();
    let mut worst = 0.0f64;
    for ranks in [false, true] {
        let values = cotangent_values(&forward, ranks, seed * 2 + ranks as u64);
        let cot = cotangent(&values, ranks);
        let got = gpu.backward(op, batch, &forward, cot).unwrap();
        let want = reference_backward(op, batch, &forward, cot);
        let kind = if ranks { "ranks" } else { "mask" };
        for r in 0..batch.rows() {
            let span = r * n..(r + 1) * n;
            let label = format!("{what} row {r} ({kind} cotangent)");
            let err = check_row_gradient(op, batch, r, &got[span.clone()], &want[span], &label);
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn sorted_backward_grid() {
    let gpu = gpu_or_skip!();
    let mut case = 0u64;
    let mut worst = (0.0f64, String::new());
    for n in SIZES {
        for epsilon in EPSILONS {
            for direction in [Direction::Largest, Direction::Smallest] {
                for scale in [Scale::None, Scale::Max] {
                    case += 1;
                    let rows = ROWS[case as usize % ROWS.len()];
                    let largest = direction == Direction::Largest;
                    // Rows of every kind (uniform, ties, offset, excluded by −∞ or +∞).
                    let (scores, valid) =
                        make_batch(&mut rng(9000 + case), rows, n, largest, case as usize);
                    // Per-row k: 1, a few, n − 1 and n, capped at 16 (the f64 reference's k×k
                    // work per item), and 0.
                    let k_list = [1usize, 2, 5, 16, n.saturating_sub(1), n, 0];
                    let per_row: Vec<usize> = (0..rows)
                        .map(|r| k_list[(r + case as usize) % k_list.len()].min(16).min(n))
                        .collect();
                    let op = SoftTopK::new(0, epsilon)
                        .per_row_k(per_row.clone())
                        .sorted()
                        .direction(direction)
                        .scale(scale);
                    // The validity mask on even cases; without it the excluded kind's masked
                    // entries are NaN, which makes its row a bad row.
                    let batch = Batch::new(&scores, rows, n).unwrap();
                    let batch = if case.is_multiple_of(2) {
                        batch.with_valid(&valid).unwrap()
                    } else {
                        batch
                    };
                    let what = format!(
                        "n={n} eps={epsilon} {direction:?} {scale:?} rows={rows} k={per_row:?}"
                    );
                    let err = compare_backward(&gpu, &op, &batch, &what, case);
                    if err > worst.0 {
                        worst = (err, what);
                    }
                }
            }
        }
    }
    eprintln!(
        "largest share of a row's allowance used: {:.3}: {}",
        worst.0, worst.1
    );
}

/// With k = n the plan is a soft permutation: the mask is 1 everywhere whatever the scores,
/// so a mask cotangent has a zero gradient, also on nearly hard rows where J is nearly
/// singular: the right side vanishes term by term (g is the same on every anchor of an item).
#[test]
fn soft_permutation_mask_gradient_is_zero() {
    let gpu = gpu_or_skip!();
    for (case, n) in [2usize, 7, 16].into_iter().enumerate() {
        for epsilon in EPSILONS {
            let scores = uniform(&mut rng(300 + case as u64), 3 * n);
            let batch = Batch::new(&scores, 3, n).unwrap();
            let op = SoftTopK::new(n, epsilon).sorted();
            let forward = reference_forward(&op, &batch);
            let g = uniform(&mut rng(400 + case as u64), 3 * n);
            let got = gpu
                .backward(&op, &batch, &forward, Cotangent::Mask(&g))
                .unwrap();
            let factor = 2.0 / epsilon;
            let worst = got.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
            assert!(
                worst <= GRAD_ABSOLUTE * factor,
                "n={n} eps={epsilon}: |grad| up to {worst:.3e}, expected 0"
            );
        }
    }
}

/// A saturated row (every plan entry exactly 0 or 1: no anchor exchanges mass) has a singular
/// J; its gradient is exactly 0 and never NaN, and it leaves the other rows alone.
#[test]
fn saturated_row_gives_zero_gradient() {
    let gpu = gpu_or_skip!();
    let n = 8;
    // Row 0: scores 10 apart at ε = 1e-3 (a hard plan, every entry 0 or 1 in f32). Row 1:
    // scores within ε of each other, a soft plan.
    let mut scores: Vec<f32> = (0..n).map(|i| 10.0 * i as f32).collect();
    scores.extend(uniform(&mut rng(11), n).iter().map(|&u| 1e-3 * u));
    let batch = Batch::new(&scores, 2, n).unwrap();
    let op = SoftTopK::new(3, 1e-3).sorted();
    let forward = reference_forward(&op, &batch);
    let ranks = forward.ranks.as_ref().unwrap();
    assert!(
        ranks[..3 * n].iter().all(|&p| p == 0.0 || p == 1.0),
        "row 0 is not saturated: {:?}",
        &ranks[..3 * n]
    );
    for kind in [false, true] {
        let values = cotangent_values(&forward, kind, 12);
        let got = gpu
            .backward(&op, &batch, &forward, cotangent(&values, kind))
            .unwrap();
        assert!(
            got[..n].iter().all(|&v| v == 0.0),
            "saturated row: {:?}",
            &got[..n]
        );
        let want = reference_backward(&op, &batch, &forward, cotangent(&values, kind));
        assert!(
            want[..n].iter().all(|&v| v == 0.0),
            "reference: {:?}",
            &want[..n]
        );
        assert!(
            want[n..].iter().any(|&v| v != 0.0),
            "row 1 should have a gradient"
        );
        check_row_gradient(&op, &batch, 1, &got[n..], &want[n..], "soft row beside it");
    }
}

/// The backend with its CPU fallback off answers the sorted backward (it would refuse a
/// hand-off), so the answer came from the kernel; k above SORTED_K_MAX is refused.
#[test]
fn strict_backend_answers_the_sorted_backward() {
    let Some(_) = gpu_support::gpu() else {
        return;
    };
    let strict = GpuBackend::new()
        .expect("an adapter exists (checked above)")
        .with_cpu_fallback(false);
    let (rows, n) = (3, 300);
    let x = uniform(&mut rng(21), rows * n);
    let batch = Batch::new(&x, rows, n).unwrap();
    let op = SoftTopK::new(5, 0.05).sorted();
    let forward = reference_forward(&op, &batch);
    for kind in [false, true] {
        let values = cotangent_values(&forward, kind, 22);
        let cot = cotangent(&values, kind);
        assert!(strict.runs_backward_on_gpu(&op, &cot));
        let got = strict
            .backward(&op, &batch, &forward, cot)
            .expect("the kernel answers");
        let want = reference_backward(&op, &batch, &forward, cot);
        for r in 0..rows {
            let span = r * n..(r + 1) * n;
            let label = format!("strict row {r}");
            check_row_gradient(&op, &batch, r, &got[span.clone()], &want[span], &label);
        }
    }

    let wide = SoftTopK::new(SORTED_K_MAX + 1, 0.05).sorted();
    let forward = reference_forward(&wide, &batch);
    let g = vec![1.0f32; rows * n];
    assert!(!strict.runs_backward_on_gpu(&wide, &Cotangent::Mask(&g)));
    assert!(strict
        .backward(&wide, &batch, &forward, Cotangent::Mask(&g))
        .is_err());
}

/// A batch split into parts (a small per-binding limit) gives the same gradient as one part:
/// rows are independent and each is computed the same way.
#[test]
fn split_batch_gives_the_same_gradient() {
    let Some(whole) = gpu_support::gpu() else {
        return;
    };
    let (rows, n) = (7, 1500);
    let (scores, valid) = make_batch(&mut rng(31), rows, n, true, 0);
    let batch = Batch::new(&scores, rows, n)
        .unwrap()
        .with_valid(&valid)
        .unwrap();
    let op = SoftTopK {
        k: K::PerRow(vec![4, 1, 9, 16, 2, 0, 7]),
        ..SoftTopK::new(0, 0.01).sorted()
    };
    let k_max = op.rank_slots(rows, n);
    // Two rows per part: the ranks' k_max × n floats per row are the largest binding.
    let limit = 2 * (k_max * n * 4) as u64;
    let split = GpuBackend::new()
        .expect("an adapter exists (checked above)")
        .with_part_limit(Some(limit));
    let per_part = split
        .max_rows_per_part(n, soft_topk::Variant::Sorted, k_max)
        .unwrap();
    assert!(per_part < rows, "{per_part} rows per part: no split");
    let forward = reference_forward(&op, &batch);
    for kind in [false, true] {
        let values = cotangent_values(&forward, kind, 32);
        let one = whole
            .backward(&op, &batch, &forward, cotangent(&values, kind))
            .unwrap();
        let parts = split
            .backward(&op, &batch, &forward, cotangent(&values, kind))
            .unwrap();
        let differ = one
            .iter()
            .zip(&parts)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            differ.is_none(),
            "split and whole differ at {differ:?}: {:?}",
            differ.map(|i| (parts[i], one[i]))
        );
        assert!(one.iter().any(|&v| v != 0.0));
    }
}

/// A row whose 2/(s·ε) passes the f32 range while its gradient does not (tied scores at
/// ε = 3e-39: a soft plan, gradients near 1e38) is answered by the f64 reference instead of
/// the kernel: finite, and the reference's own values.
#[test]
fn wide_factor_row_is_answered_by_the_reference() {
    let gpu = gpu_or_skip!();
    let n = 5;
    let mut scores = vec![1.0f32; n];
    scores.extend(uniform(&mut rng(41), n));
    let batch = Batch::new(&scores, 2, n).unwrap();
    let op = SoftTopK::new(2, 3e-39).sorted();
    let forward = reference_forward(&op, &batch);
    let g = uniform(&mut rng(42), 2 * n);
    let got = gpu
        .backward(&op, &batch, &forward, Cotangent::Mask(&g))
        .unwrap();
    let want = reference_backward(&op, &batch, &forward, Cotangent::Mask(&g));
    assert!(
        got[..n].iter().all(|v| v.is_finite()) && got[..n].iter().any(|&v| v != 0.0),
        "{:?}",
        &got[..n]
    );
    assert_eq!(&got[..n], &want[..n]);
}
