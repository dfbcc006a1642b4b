//! Gradients of the f64 reference against central differences along random directions.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soft_topk::reference::{backward_row, forward_row, RowCotangent};
use soft_topk::{Direction, SoftTopK};

/// Central differences with step h carry an O(h²) truncation error and an O(δ/h) rounding
/// error (δ ≈ 1e-15 from the solves); h = 1e-5 in units of the temperature balances them near
/// 1e-9 relative, and 1e-6 leaves room for curvature on sharp rows.
const FD_RELATIVE_TOLERANCE: f64 = 1e-6;

/// L(x) = ⟨v, mask⟩ + Σ_j ⟨V_j, ranks_j⟩ for the op at x.
fn loss(op: &SoftTopK, x: &[f64], v: &[f64], vr: &[Vec<f64>]) -> f64 {
    let out = forward_row(op, 0, x, None);
    assert!(
        out.report.converged,
        "forward did not converge: {:?}",
        out.report
    );
    let mut l: f64 = out.mask.iter().zip(v).map(|(a, b)| a * b).sum();
    for (rank, w) in out.ranks.iter().zip(vr) {
        l += rank.iter().zip(w).map(|(a, b)| a * b).sum::<f64>();
    }
    l
}

fn check_along_random_direction(op: &SoftTopK, n: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let k = op.k_of(0).min(n);
    let sorted = op.variant == soft_topk::Variant::Sorted;
    let vr: Vec<Vec<f64>> = if sorted {
        (0..k)
            .map(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect()
    } else {
        Vec::new()
    };
    let d: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();

    let out = forward_row(op, 0, &x, None);
    let grad = backward_row(
        op,
        0,
        &x,
        None,
        &out.mask,
        &out.ranks,
        RowCotangent {
            mask: Some(&v),
            ranks: sorted.then_some(&vr[..]),
        },
    );
    let analytic: f64 = grad.iter().zip(&d).map(|(g, d)| g * d).sum();

    let h = 1e-5 * op.epsilon;
    let shifted = |t: f64| {
        x.iter()
            .zip(&d)
            .map(|(x, d)| x + t * d)
            .collect::<Vec<f64>>()
    };
    let numeric = (loss(op, &shifted(h), &v, &vr) - loss(op, &shifted(-h), &v, &vr)) / (2.0 * h);
    let scale = analytic.abs().max(numeric.abs()).max(1.0);
    assert!(
        (analytic - numeric).abs() <= FD_RELATIVE_TOLERANCE * scale,
        "{op:?}, n = {n}, seed {seed}: analytic {analytic:.12e} vs central {numeric:.12e}"
    );
}

#[test]
fn topk_gradient_matches_central_differences() {
    for (seed, (n, k, eps)) in [
        (7, 3, 0.1),
        (64, 10, 0.05),
        (33, 1, 0.3),
        (50, 49, 0.02),
        (5, 2, 2.0),
    ]
    .into_iter()
    .enumerate()
    {
        for direction in [Direction::Largest, Direction::Smallest] {
            let op = SoftTopK::new(k, eps).direction(direction);
            check_along_random_direction(&op, n, seed as u64);
        }
    }
}

#[test]
fn sorted_gradient_matches_central_differences() {
    for (seed, (n, k, eps)) in [
        (6, 2, 0.1),
        (20, 4, 0.1),
        (12, 1, 0.2),
        (9, 9, 0.2),
        (16, 5, 0.5),
    ]
    .into_iter()
    .enumerate()
    {
        for direction in [Direction::Largest, Direction::Smallest] {
            let op = SoftTopK::new(k, eps).sorted().direction(direction);
            check_along_random_direction(&op, n, 100 + seed as u64);
        }
    }
}

/// Regression: three large scores far above ten tied zeros at small ε. The k×k matrix is then
/// nearly singular in one direction (the zeros exchange almost no mass with the ranks), which
/// once made Newton stall and the backward return 0 where the true gradient is about 10.
#[test]
fn sorted_gradient_on_a_partly_saturated_row() {
    let mut x = vec![0.0f64; 13];
    (x[1], x[8], x[12]) = (9.838447084864779, 9.799139099473555, 9.608722577192102);
    let op = SoftTopK::new(3, 0.0456335961754334).sorted();
    let out = forward_row(&op, 0, &x, None);
    assert!(out.report.converged, "{:?}", out.report);
    let v: Vec<Vec<f64>> = (0..3)
        .map(|j| (0..13).map(|i| ((i * 7 + j * 3) as f64).sin()).collect())
        .collect();
    let cot = RowCotangent {
        mask: None,
        ranks: Some(&v),
    };
    let grad = backward_row(&op, 0, &x, None, &out.mask, &out.ranks, cot);
    let h = 1e-7;
    for i in [1, 8, 12] {
        let (mut up, mut down) = (x.clone(), x.clone());
        up[i] += h;
        down[i] -= h;
        let numeric =
            (loss(&op, &up, &[0.0; 13], &v) - loss(&op, &down, &[0.0; 13], &v)) / (2.0 * h);
        let scale = numeric.abs().max(1.0);
        assert!(
            (grad[i] - numeric).abs() <= FD_RELATIVE_TOLERANCE * scale,
            "entry {i}: analytic {} vs central difference {numeric}",
            grad[i]
        );
    }
}
