//! The reference values of MATH.md §6, to the digits printed there, and the agreement of the
//! exact top-k with Sinkhorn run to convergence.

use soft_topk::reference::{backward_row, forward_row, RowCotangent};
use soft_topk::{Direction, Scale, SoftTopK, Solver};

/// MATH.md prints six decimals: half a unit in the last place.
const PRINTED_DIGITS: f64 = 5e-7;
/// Sinkhorn run to a 1e-13 marginal error leaves the mask within about that of the root.
const SINKHORN_AGREEMENT: f64 = 1e-10;

fn assert_digits(what: &str, got: &[f64], want: &[f64]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= PRINTED_DIGITS,
            "{what}[{i}]: got {g:.9}, MATH.md says {w}"
        );
    }
}

#[test]
fn official_demo_smallest_scale_max() {
    let x = [5.0, 2.0, 3.0, 4.0, 1.0, 6.0];
    let op = SoftTopK::new(3, 0.05)
        .direction(Direction::Smallest)
        .scale(Scale::Max);
    let out = forward_row(&op, 0, &x, None);
    assert_digits(
        "A",
        &out.mask,
        &[0.158869, 0.841131, 0.635424, 0.364576, 0.941463, 0.058537],
    );
    let v = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0];
    let cot = RowCotangent {
        mask: Some(&v),
        ranks: None,
    };
    let grad = backward_row(&op, 0, &x, None, &out.mask, &out.ranks, cot);
    let want = [
        0.105416, -0.043062, -0.074652, -0.074652, 0.043475, 0.043475,
    ];
    assert_digits("dL/dx", &grad, &want);
}

#[test]
fn sorted_k1_scale_max() {
    let x: Vec<f64> = (0..10).map(f64::from).collect();
    let op = SoftTopK::new(1, 0.1).sorted().scale(Scale::Max);
    let out = forward_row(&op, 0, &x, None);
    let want = [
        0.029260, 0.037151, 0.047066, 0.059463, 0.074870, 0.093871, 0.117083, 0.145116, 0.178503,
        0.217617,
    ];
    assert_digits("P[0]", &out.ranks[0], &want);
}

#[test]
fn ties_saturation_and_trivial_k() {
    for eps in [1e-3, 0.1, 10.0] {
        let out = forward_row(&SoftTopK::new(2, eps), 0, &[1.0, 1.0, 1.0, 1.0], None);
        assert_digits("ties", &out.mask, &[0.5; 4]);
    }

    let x = [0.0, 10.0, 20.0, 30.0];
    let op = SoftTopK::new(2, 1e-3);
    let out = forward_row(&op, 0, &x, None);
    assert_digits("saturated", &out.mask, &[0.0, 0.0, 1.0, 1.0]);
    let v = [1.0, -2.0, 3.0, -4.0];
    let cot = RowCotangent {
        mask: Some(&v),
        ranks: None,
    };
    let grad = backward_row(&op, 0, &x, None, &out.mask, &out.ranks, cot);
    assert!(
        grad.iter().all(|&g| g == 0.0),
        "saturated gradient {grad:?}"
    );

    let x = [0.3, -1.0, 2.0];
    for (k, fill) in [(0, 0.0), (3, 1.0)] {
        let op = SoftTopK::new(k, 0.1);
        let out = forward_row(&op, 0, &x, None);
        assert_eq!(out.mask, vec![fill; 3], "k = {k}");
        let cot = RowCotangent {
            mask: Some(&v[..3]),
            ranks: None,
        };
        let grad = backward_row(&op, 0, &x, None, &out.mask, &out.ranks, cot);
        assert_eq!(grad, vec![0.0; 3], "k = {k} gradient");
    }
    let out = forward_row(&SoftTopK::new(1, 0.1), 0, &[42.0], None);
    assert_eq!(out.mask, vec![1.0], "n = 1");
}

#[test]
fn exact_top_k_agrees_with_converged_sinkhorn() {
    let x = [0.12, 0.96, 0.68, 0.11, 0.49, 0.53, 0.25, -0.4, 0.77, 0.31];
    for (k, eps) in [(1, 0.5), (3, 0.1), (5, 0.05), (9, 0.2)] {
        for scale in [Scale::None, Scale::Max] {
            let exact = forward_row(&SoftTopK::new(k, eps).scale(scale), 0, &x, None);
            let sinkhorn_op = SoftTopK::new(k, eps)
                .scale(scale)
                .solver(Solver::sinkhorn(1e-13, 1_000_000));
            let iterative = forward_row(&sinkhorn_op, 0, &x, None);
            assert!(
                iterative.report.converged,
                "k={k} eps={eps}: {:?}",
                iterative.report
            );
            for (i, (a, b)) in exact.mask.iter().zip(&iterative.mask).enumerate() {
                assert!(
                    (a - b).abs() <= SINKHORN_AGREEMENT,
                    "k={k} eps={eps} {scale:?} [{i}]: exact {a} vs Sinkhorn {b}"
                );
            }
        }
    }
}

#[test]
fn paper_setting_runs_exactly_200_sweeps() {
    let x: Vec<f64> = (0..50).map(|i| ((i * 37) % 50) as f64 / 50.0).collect();
    let op = SoftTopK::new(5, 1e-3).solver(Solver::PAPER);
    let out = forward_row(&op, 0, &x, None);
    assert_eq!(out.report.iterations, 200);
}
