//! Regressions found by trying the crate as a new user would, on every backend.

mod common;

use std::sync::Arc;

use soft_topk::{Backend, Batch, SoftTopK};

/// f32 outputs of a well-conditioned row: a few ulps of 1.
const F32_TOLERANCE: f32 = 1e-6;

fn backends() -> Vec<Arc<dyn Backend>> {
    common::all_backends("regressions")
}

/// One score of −1e20 (a common way to mask an entry out) used to collapse the others: the
/// scores were centred at their mid-range, −5e19, where 2, 2.5 and 3 are one f64. The mask
/// summed to 3 for k = 2 and still reported convergence. The outlier must change nothing but
/// its own entry, whatever its size.
#[test]
fn one_huge_score_leaves_the_others_exact() {
    let op = SoftTopK::new(2, 0.1);
    for backend in backends() {
        let plain = [-10.0f32, 2.0, 3.0, 2.5];
        let want = backend
            .forward(&op, &Batch::single(&plain).unwrap())
            .unwrap();
        for outlier in [-1e12f32, -1e15, -1e20, -3.4e38] {
            let x = [outlier, 2.0, 3.0, 2.5];
            let got = backend.forward(&op, &Batch::single(&x).unwrap()).unwrap();
            for (i, (a, b)) in got.mask.iter().zip(&want.mask).enumerate() {
                assert!(
                    (a - b).abs() <= F32_TOLERANCE,
                    "{} with {outlier}: mask[{i}] = {a}, without the outlier {b}",
                    backend.name()
                );
            }
            assert!(
                got.reports[0].converged,
                "{}: {:?}",
                backend.name(),
                got.reports[0]
            );
        }

        // The same from above, top-k and sorted.
        for op in [SoftTopK::new(2, 0.1), SoftTopK::new(2, 0.1).sorted()] {
            let high = backend
                .forward(&op, &Batch::single(&[1e20, 2.0, 3.0]).unwrap())
                .unwrap();
            let moderate = backend
                .forward(&op, &Batch::single(&[100.0, 2.0, 3.0]).unwrap())
                .unwrap();
            for (i, (a, b)) in high.mask.iter().zip(&moderate.mask).enumerate() {
                assert!(
                    (a - b).abs() <= F32_TOLERANCE,
                    "{}: [{i}] {a} vs {b}",
                    backend.name()
                );
            }
        }
    }
}
