//! The GPU backend against the f64 reference on a seeded grid of shapes, k, ε, directions,
//! scales, exclusions, ties and bad rows.

mod gpu_support;

use gpu_support::{
    assert_abs, assert_scaled, make_batch, reference_backward, reference_forward, rng, uniform,
};
use soft_topk::gpu::kernels::ROW_IN_REGISTERS;
use soft_topk::{Backend, Batch, Cotangent, Direction, Scale, SoftTopK};

/// Mask entries: the GPU stops its root search when the next Newton step would move every
/// σ argument by under 2^-21, and f32 rounding of σ adds ~1e-7; rows of 10^5 add the f32
/// noise floor of Σ A. 2e-5 leaves a margin over the ~5e-6 seen.
const MASK_TOLERANCE: f64 = 2e-5;
/// Gradients, relative to the row's largest reference gradient: A' = A(1 − A) is formed from
/// an f32 mask, whose 1 − A near saturation carries an absolute error of ~6e-8 that the
/// factor 2/(s·ε) does not amplify relative to the largest entry.
const GRAD_TOLERANCE: f64 = 2e-4;
/// Absolute gradient error per unit of 2/(s·ε): an f32 mask knows A' = A(1 − A) only to
/// ±2^-24, and grad = factor·A'·(g − ḡ) with |g − ḡ| ≤ 2; 4·2^-24 leaves a margin.
const GRAD_ABSOLUTE: f64 = 2.4e-7;

const EPSILONS: [f64; 4] = [1e-3, 1e-2, 0.1, 1.0];
const ROWS: [usize; 3] = [1, 3, 64];

fn ks(n: usize) -> [usize; 5] {
    [0, 1.min(n), n / 2, n.saturating_sub(1), n]
}

/// Runs one batch on the GPU and the reference and compares mask, reports and gradient.
fn compare(op: &SoftTopK, batch: &Batch, what: &str, seed: u64) {
    let gpu = gpu_support::gpu().expect("checked by the caller");
    let got = gpu.forward(op, batch).unwrap();
    let want = reference_forward(op, batch);
    assert_abs(
        &format!("{what} mask"),
        &got.mask,
        &want.mask,
        MASK_TOLERANCE,
    );
    for (r, (g, w)) in got.reports.iter().zip(&want.reports).enumerate() {
        assert_eq!(g.error, w.error, "{what} row {r}: error");
        assert_eq!(
            (g.k, g.n_valid),
            (w.k, w.n_valid),
            "{what} row {r}: k, n_valid"
        );
        assert!(g.converged || g.error.is_some(), "{what} row {r}: {g:?}");
    }

    let upstream = uniform(&mut rng(seed ^ 0xface), batch.scores().len());
    let got_grad = gpu
        .backward(op, batch, &got, Cotangent::Mask(&upstream))
        .unwrap();
    let want_grad = reference_backward(op, batch, &want, Cotangent::Mask(&upstream));
    let n = batch.n();
    for r in 0..batch.rows() {
        let span = r * n..(r + 1) * n;
        assert_scaled(
            &format!("{what} row {r} grad"),
            &got_grad[span.clone()],
            &want_grad[span],
            GRAD_TOLERANCE,
            GRAD_ABSOLUTE * 2.0 / op.epsilon / GRAD_TOLERANCE,
        );
    }
}

#[test]
fn topk_exact_grid() {
    let _gpu = gpu_or_skip!();
    let sizes = [1usize, 2, 7, 255, 256, 257, 1000, 4096];
    let mut case = 0u64;
    for &n in &sizes {
        for &epsilon in &EPSILONS {
            for direction in [Direction::Largest, Direction::Smallest] {
                for scale in [Scale::None, Scale::Max] {
                    case += 1;
                    let rows = ROWS[case as usize % ROWS.len()];
                    let largest = direction == Direction::Largest;
                    let (scores, valid) =
                        make_batch(&mut rng(case), rows, n, largest, case as usize);
                    let k_list = ks(n);
                    let per_row: Vec<usize> =
                        (0..rows).map(|r| k_list[(r + case as usize) % 5]).collect();
                    let op = SoftTopK::new(0, epsilon)
                        .per_row_k(per_row)
                        .direction(direction)
                        .scale(scale);
                    let batch = Batch::new(&scores, rows, n)
                        .unwrap()
                        .with_valid(&valid)
                        .unwrap();
                    let what = format!("n={n} eps={epsilon} {direction:?} {scale:?} rows={rows}");
                    compare(&op, &batch, &what, case);
                }
            }
        }
    }
}

#[test]
fn topk_exact_long_rows() {
    let _gpu = gpu_or_skip!();
    let n = 100_000;
    for (case, (epsilon, direction, scale)) in [
        (1e-2, Direction::Largest, Scale::None),
        (1e-3, Direction::Smallest, Scale::None),
        (1.0, Direction::Largest, Scale::Max),
    ]
    .into_iter()
    .enumerate()
    {
        let rows = 3;
        let largest = direction == Direction::Largest;
        let (scores, valid) = make_batch(&mut rng(900 + case as u64), rows, n, largest, case);
        let per_row = vec![1, n / 2, n - 1];
        let op = SoftTopK::new(0, epsilon)
            .per_row_k(per_row)
            .direction(direction)
            .scale(scale);
        let batch = Batch::new(&scores, rows, n)
            .unwrap()
            .with_valid(&valid)
            .unwrap();
        compare(
            &op,
            &batch,
            &format!("n={n} eps={epsilon} {direction:?} {scale:?}"),
            900,
        );
    }
}

/// Rows just past what one workgroup holds in registers go to the chunked root search:
/// lengths that end a chunk early, exactly, or one entry into a new one, with every kind of
/// row (exclusions included) and k at both ends.
#[test]
fn topk_exact_chunk_boundaries() {
    let _gpu = gpu_or_skip!();
    let chunk = ROW_IN_REGISTERS;
    for (case, n) in [chunk + 1, 2 * chunk, 3 * chunk + 1]
        .into_iter()
        .enumerate()
    {
        let rows = 4;
        let (scores, valid) = make_batch(&mut rng(950 + case as u64), rows, n, true, case);
        let op = SoftTopK::new(0, 0.01).per_row_k(vec![1, n / 3, n - 1, n]);
        let batch = Batch::new(&scores, rows, n)
            .unwrap()
            .with_valid(&valid)
            .unwrap();
        compare(&op, &batch, &format!("n={n}"), 950);
    }
}

/// One row of 10^6: the longest, spread over 245 workgroups per root-search step.
#[test]
fn topk_exact_a_million() {
    let _gpu = gpu_or_skip!();
    let n = 1_000_000;
    let scores = uniform(&mut rng(990), n);
    for (k, epsilon) in [(n / 10, 1e-2), (7, 1e-3)] {
        let op = SoftTopK::new(k, epsilon);
        let batch = Batch::single(&scores).unwrap();
        compare(&op, &batch, &format!("n={n} k={k} eps={epsilon}"), 990);
    }
}

#[test]
fn a_bad_row_leaves_the_others_alone() {
    let gpu = gpu_or_skip!();
    let (rows, n) = (5, 300);
    let mut scores = uniform(&mut rng(7), rows * n);
    let clean = gpu
        .forward(
            &SoftTopK::new(30, 0.01),
            &Batch::new(&scores, rows, n).unwrap(),
        )
        .unwrap();
    scores[2 * n + 17] = f32::NAN;
    let batch = Batch::new(&scores, rows, n).unwrap();
    let out = gpu.forward(&SoftTopK::new(30, 0.01), &batch).unwrap();
    let error = out.reports[2]
        .error
        .as_ref()
        .expect("row 2 reports its NaN");
    assert_eq!(error.kind(), "non_finite_input");
    assert!(
        out.mask_row(2).iter().all(|&a| a == 0.0),
        "the bad row's mask is 0"
    );
    for r in [0, 1, 3, 4] {
        assert_eq!(out.mask_row(r), clean.mask_row(r), "row {r} changed");
    }
    let g = vec![1.0f32; rows * n];
    let grad = gpu
        .backward(&SoftTopK::new(30, 0.01), &batch, &out, Cotangent::Mask(&g))
        .unwrap();
    assert!(grad[2 * n..3 * n].iter().all(|&d| d == 0.0));
    assert!(grad.iter().all(|d| d.is_finite()));
}

#[test]
fn ties_and_saturation() {
    let gpu = gpu_or_skip!();
    let ties = [1.0f32; 4];
    let out = gpu
        .forward(&SoftTopK::new(2, 0.3), &Batch::single(&ties).unwrap())
        .unwrap();
    assert_abs("ties", &out.mask, &[0.5; 4], MASK_TOLERANCE);

    let x = [0.0f32, 10.0, 20.0, 30.0];
    let op = SoftTopK::new(2, 1e-3);
    let batch = Batch::single(&x).unwrap();
    let out = gpu.forward(&op, &batch).unwrap();
    assert_abs("saturated", &out.mask, &[0.0, 0.0, 1.0, 1.0], 0.0);
    let grad = gpu
        .backward(&op, &batch, &out, Cotangent::Mask(&[1.0, -2.0, 3.0, 0.5]))
        .unwrap();
    assert!(
        grad.iter().all(|&d| d == 0.0),
        "saturated gradient {grad:?}"
    );
}
