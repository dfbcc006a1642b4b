//! The GPU's transport kernels beyond the sorted grid of tests/gpu_sorted.rs: top-k Sinkhorn
//! (converged, and the paper's fixed 200 sweeps), sorted Sinkhorn, and rows long enough to
//! span many chunks, each against the f64 reference. Every check runs on a backend whose CPU
//! hand-off is off, so an answer can only come from the kernels.

mod gpu_support;

use gpu_support::{assert_abs, make_batch, reference_forward, rng, uniform};
use soft_topk::gpu::GpuBackend;
use soft_topk::{Backend, Batch, Direction, Scale, SoftTopK, Solver};

/// Masks of a converged f32 solve against the f64 solution: the stop at a marginal error of
/// TOLERANCE (units of 1/n) moves entries by about that much, f32 potentials add a few 1e-6.
const CONVERGED_TOLERANCE: f64 = 5e-5;
/// The Sinkhorn tolerance (marginal error in units of 1/n, i.e. in counts) asked of both sides
/// in the converged checks: reachable in f32, whose column sums of up to 4096 entries near 1
/// carry a rounding of a few n·2^-24 (1.8e-4 was the floor seen at n = 257, k = 256).
const SINKHORN_TOLERANCE: f64 = 1e-3;
/// The same for the sorted variant, whose ranked columns each sum to 1.
const SORTED_SINKHORN_TOLERANCE: f64 = 2e-5;
/// A column-sum error of δ counts moves no mask entry by more than δ: the converged top-k
/// checks allow the stopping tolerance on top of the f32 plan's own error.
const SINKHORN_MASK_TOLERANCE: f64 = SINKHORN_TOLERANCE + CONVERGED_TOLERANCE;
const SORTED_SINKHORN_PLAN_TOLERANCE: f64 = SORTED_SINKHORN_TOLERANCE + CONVERGED_TOLERANCE;
/// The paper's 200 sweeps in f32 against the same 200 sweeps in f64: both stop at the same
/// unconverged iterate; each sweep's f32 rounding (a few 1e-7 of the potentials) is carried
/// along, not amplified, by Sinkhorn's contraction, so 200 sweeps keep well inside 1e-4.
const SWEEPS_TOLERANCE: f64 = 1e-4;

/// A GPU backend that refuses to hand work to the CPU.
fn strict() -> Option<GpuBackend> {
    gpu_support::gpu()?;
    Some(
        GpuBackend::new()
            .expect("an adapter exists (checked above)")
            .with_cpu_fallback(false),
    )
}

macro_rules! strict_or_skip {
    () => {
        match strict() {
            Some(backend) => backend,
            None => return,
        }
    };
}

/// The forward of `op` on the strict GPU against the reference: masks and ranks within
/// `tolerance`, and the same verdict on convergence where the reference converged.
fn compare(gpu: &GpuBackend, op: &SoftTopK, batch: &Batch, tolerance: f64, what: &str) {
    let got = gpu.forward(op, batch).expect("the kernels answer");
    let want = reference_forward(op, batch);
    for r in 0..batch.rows() {
        let (g, w) = (&got.reports[r], &want.reports[r]);
        assert_eq!(g.error, w.error, "{what} row {r}");
        assert_abs(
            &format!("{what} row {r} mask"),
            got.mask_row(r),
            want.mask_row(r),
            tolerance,
        );
        for j in 0..got.k_max {
            assert_abs(
                &format!("{what} row {r} rank {j}"),
                got.rank_row(r, j).expect("sorted"),
                want.rank_row(r, j).expect("sorted"),
                tolerance,
            );
        }
        if let Solver::Sinkhorn { tolerance: 0.0, .. } = op.solver {
            // A fixed sweep count: both ran exactly that many.
            assert_eq!(g.iterations, w.iterations, "{what} row {r}: {g:?} vs {w:?}");
        } else if w.converged && w.error.is_none() {
            assert!(g.converged, "{what} row {r}: {g:?} (reference {w:?})");
        }
    }
}

#[test]
fn topk_sinkhorn_converged() {
    let gpu = strict_or_skip!();
    let solver = Solver::Sinkhorn {
        tolerance: SINKHORN_TOLERANCE,
        max_iterations: 3_000,
    };
    let mut case = 0;
    for n in [1usize, 7, 257, 1000, 4096] {
        // Sinkhorn converges in reasonable sweeps only at moderate ε (MATH.md §1).
        for epsilon in [0.1, 1.0] {
            for direction in [Direction::Largest, Direction::Smallest] {
                case += 1;
                let rows = 3;
                let largest = direction == Direction::Largest;
                let (scores, valid) =
                    make_batch(&mut rng(700 + case), rows, n, largest, case as usize);
                let k = [1, n / 2, n.saturating_sub(1)][case as usize % 3];
                let op = SoftTopK::new(k, epsilon)
                    .direction(direction)
                    .solver(solver);
                let batch = Batch::new(&scores, rows, n)
                    .unwrap()
                    .with_valid(&valid)
                    .unwrap();
                let what = format!("n={n} eps={epsilon}");
                compare(&gpu, &op, &batch, SINKHORN_MASK_TOLERANCE, &what);
            }
        }
    }
}

#[test]
fn topk_paper_sweeps_match_the_reference_sweeps() {
    let gpu = strict_or_skip!();
    for (n, epsilon, scale) in [
        (1000, 0.01, Scale::None),
        (1000, 0.01, Scale::Max),
        (257, 0.1, Scale::Max),
    ] {
        let x = uniform(&mut rng(n as u64), 4 * n);
        let op = SoftTopK::new(n / 10, epsilon)
            .scale(scale)
            .solver(Solver::PAPER);
        let batch = Batch::new(&x, 4, n).unwrap();
        compare(
            &gpu,
            &op,
            &batch,
            SWEEPS_TOLERANCE,
            &format!("paper n={n} eps={epsilon}"),
        );
    }
}

#[test]
fn sorted_sinkhorn_converged() {
    let gpu = strict_or_skip!();
    let solver = Solver::Sinkhorn {
        tolerance: SORTED_SINKHORN_TOLERANCE,
        max_iterations: 5_000,
    };
    for (n, k) in [(7usize, 3usize), (64, 4), (257, 16)] {
        let x = uniform(&mut rng(900 + n as u64), 3 * n);
        let op = SoftTopK::new(k, 1.0).sorted().solver(solver);
        let batch = Batch::new(&x, 3, n).unwrap();
        let what = format!("sorted sinkhorn n={n} k={k}");
        compare(&gpu, &op, &batch, SORTED_SINKHORN_PLAN_TOLERANCE, &what);
    }
}

/// Rows of many chunks (CHUNK = 1024 scores per workgroup): the chunks' partial sums, and the
/// warm start merged from the chunks' lists, must add up to the one-row answer.
#[test]
fn sorted_long_rows() {
    let gpu = strict_or_skip!();
    for (n, k, epsilon) in [
        (4096usize, 16usize, 0.01),
        (100_000, 4, 0.1),
        (100_000, 16, 0.01),
    ] {
        let x = uniform(&mut rng(n as u64 + k as u64), n);
        let op = SoftTopK::new(k, epsilon).sorted();
        let batch = Batch::single(&x).unwrap();
        // The default tolerance's f32 floor grows with the scaled spread of the k + 1 largest
        // scores (GPU_AUTO_RANGE_ROUNDINGS); uniform scores keep it near 1e-5.
        compare(
            &gpu,
            &op,
            &batch,
            CONVERGED_TOLERANCE,
            &format!("long n={n} k={k}"),
        );
    }
}

/// A "mask out" score of −1e20 (a common padding value) next to ordinary scores: centred at
/// mid-range, the ordinary scores would sit at |u| ≈ 1e22 where f32 keeps none of their gaps.
#[test]
fn sorted_far_outlier() {
    let gpu = strict_or_skip!();
    let mut x = uniform(&mut rng(31), 50);
    x[7] = -1e20;
    let op = SoftTopK::new(5, 0.05).sorted();
    compare(
        &gpu,
        &op,
        &Batch::single(&x).unwrap(),
        CONVERGED_TOLERANCE,
        "outlier",
    );
}
