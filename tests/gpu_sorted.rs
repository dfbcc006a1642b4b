//! The sorted forward on the GPU's transport kernels (shaders/transport.wgsl) against the f64
//! reference: a grid over n, ε, direction and scale with per-row k, exclusions and mixed row
//! kinds, long rows over many chunks, and proof that the kernels (not the CPU hand-off)
//! answered.

mod gpu_support;

use gpu_support::{
    assert_abs, assert_scaled, make_batch, reference_backward, reference_forward, rng,
};
use soft_topk::{Backend, Batch, Direction, Scale, SoftTopK};

/// Ranks and masks of converged f32 plans: the Newton stop at a marginal error of 1e-5 (in
/// units of 1/n) moves entries by about that much, and f32 potentials add a few 1e-6.
const PLAN_TOLERANCE: f64 = 5e-5;

/// Gradients of a soft plan (ε = 0.1 on 50 uniform scores), relative to the row's largest:
/// J is well conditioned there, and f32 forms it and the right side to a few 1e-7 relative
/// (1.4e-7 seen; tests/gpu_sorted_backward.rs covers the hard cases).
const GRAD_TOLERANCE: f64 = 1e-5;

#[test]
fn published_sorted_value() {
    let gpu = gpu_or_skip!();
    let x: Vec<f32> = (0..10).map(|v| v as f32).collect();
    let op = SoftTopK::new(1, 0.1).sorted().scale(Scale::Max);
    let out = gpu.forward(&op, &Batch::single(&x).unwrap()).unwrap();
    let expected = [
        0.029260, 0.037151, 0.047066, 0.059463, 0.074870, 0.093871, 0.117083, 0.145116, 0.178503,
        0.217617,
    ];
    eprintln!("{:?}", out.reports[0]);
    assert_abs("P[0]", out.rank_row(0, 0).unwrap(), &expected, 2e-6);
}

/// f32 forms the scaled scores u = 2(x − c)/(s·ε) with a relative rounding of 2^-24, which
/// moves plan entries by up to about |u|·2^-24 (σ' ≤ 1/4, a few such roundings per logit
/// gap): this many units of (range/(s·ε))·2^-24 are added to PLAN_TOLERANCE per row.
const RANGE_ROUNDINGS: f64 = 8.0;

/// The per-row tolerance for plan entries (see RANGE_ROUNDINGS).
fn row_tolerance(op: &SoftTopK, batch: &Batch, r: usize) -> f64 {
    match soft_topk::check_row(op, batch, r) {
        Ok(spec) => {
            let range = spec.x_max - spec.x_min;
            // A zero range (one valid entry) has nothing to round, whatever the scale.
            let scaled_range = if range > 0.0 {
                range * 2.0 / (spec.scale * op.epsilon)
            } else {
                0.0
            };
            PLAN_TOLERANCE + RANGE_ROUNDINGS * scaled_range * f32::EPSILON as f64 / 2.0
        }
        Err(_) => 0.0,
    }
}

/// Forward (mask, ranks, reports) of one batch on the GPU against the reference.
fn compare_forward(
    op: &SoftTopK,
    batch: &Batch,
    what: &str,
) -> (soft_topk::Forward, soft_topk::Forward) {
    let gpu = gpu_support::gpu().expect("checked by the caller");
    let got = gpu.forward(op, batch).unwrap();
    let want = reference_forward(op, batch);
    let n = batch.n();
    for r in 0..batch.rows() {
        let tolerance = row_tolerance(op, batch, r);
        let (g, w) = (&got.reports[r], &want.reports[r]);
        assert_eq!(g.error, w.error, "{what} row {r}");
        assert_eq!((g.k, g.n_valid), (w.k, w.n_valid), "{what} row {r}");
        // The reference runs to 1e-12, the GPU to its f32 tolerance: a row the reference solves
        // must be solved here; the reverse may differ (the plans are compared either way).
        assert!(
            g.converged || !w.converged,
            "{what} row {r}: {g:?} (reference {w:?})"
        );
        assert_abs(
            &format!("{what} row {r} mask"),
            got.mask_row(r),
            want.mask_row(r),
            tolerance,
        );
        for j in 0..got.k_max {
            assert_abs(
                &format!("{what} row {r} rank {j}"),
                got.rank_row(r, j).unwrap(),
                want.rank_row(r, j).unwrap(),
                tolerance,
            );
        }
        let _ = n;
    }
    (got, want)
}

/// The sorted grid: every (n, ε, direction, scale) with per-row k and mixed row kinds.
fn sorted_grid() {
    let mut case = 0u64;
    for n in [1usize, 2, 7, 64, 255, 257, 1000] {
        for epsilon in [1e-3, 1e-2, 0.1, 1.0] {
            for direction in [Direction::Largest, Direction::Smallest] {
                for scale in [Scale::None, Scale::Max] {
                    case += 1;
                    let rows = [1usize, 3, 8][case as usize % 3];
                    let largest = direction == Direction::Largest;
                    let (scores, valid) =
                        make_batch(&mut rng(5000 + case), rows, n, largest, case as usize);
                    let k_list = [1usize, 2, 5, 16, n.saturating_sub(1), n];
                    let per_row: Vec<usize> = (0..rows)
                        .map(|r| k_list[(r + case as usize) % k_list.len()].min(16).min(n))
                        .collect();
                    let op = SoftTopK::new(0, epsilon)
                        .per_row_k(per_row)
                        .sorted()
                        .direction(direction)
                        .scale(scale);
                    let batch = Batch::new(&scores, rows, n)
                        .unwrap()
                        .with_valid(&valid)
                        .unwrap();
                    let what = format!("n={n} eps={epsilon} {direction:?} {scale:?} rows={rows}");
                    compare_forward(&op, &batch, &what);
                }
            }
        }
    }
}

/// Every cell of the grid, including n = 1000 at ε = 1e-3 with Scale::Max and exclusions,
/// which ended early with an infinite marginal error while the whole solve ran in one
/// dispatch (lavapipe's loop budget; see shaders/plan.wgsl).
#[test]
fn sorted_newton_grid() {
    let _gpu = gpu_or_skip!();
    sorted_grid();
}

/// The sorted forward ran on the GPU's kernel: the backend with its CPU fallback off answers
/// it (it would refuse a hand-off), and agrees with the reference.
#[test]
fn sorted_forward_runs_the_kernel() {
    let Some(_) = gpu_support::gpu() else {
        return;
    };
    let strict = soft_topk::gpu::GpuBackend::new()
        .expect("an adapter exists (checked above)")
        .with_cpu_fallback(false);
    let x = gpu_support::uniform(&mut rng(77), 3 * 50);
    let batch = Batch::new(&x, 3, 50).unwrap();
    let op = SoftTopK::new(4, 0.1).sorted();
    assert!(strict.runs_forward_on_gpu(&op, 3));
    let got = strict.forward(&op, &batch).expect("the kernel answers");
    let want = reference_forward(&op, &batch);
    for r in 0..3 {
        assert!(got.reports[r].converged, "{:?}", got.reports[r]);
        for j in 0..4 {
            assert_abs(
                &format!("row {r} rank {j}"),
                got.rank_row(r, j).unwrap(),
                want.rank_row(r, j).unwrap(),
                PLAN_TOLERANCE,
            );
        }
    }
    // The backward has its kernel too (the strict backend would refuse a hand-off): from the
    // reference's forward, it agrees with the reference's backward.
    let g = gpu_support::uniform(&mut rng(78), 3 * 4 * 50);
    let cotangent = soft_topk::Cotangent::Ranks(&g);
    let grad = strict
        .backward(&op, &batch, &want, cotangent)
        .expect("the kernel answers");
    let expected = reference_backward(&op, &batch, &want, cotangent);
    for r in 0..3 {
        let span = r * 50..(r + 1) * 50;
        assert_scaled(
            &format!("row {r} grad"),
            &grad[span.clone()],
            &expected[span],
            GRAD_TOLERANCE,
            0.0,
        );
    }
}
