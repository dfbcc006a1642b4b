//! Mismatched pieces: every way a forward or backward call's shapes can disagree is a typed
//! error on every backend, never a panic.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use soft_topk::{Backend, Batch, Cotangent, Error, Forward, SoftTopK};

fn backends() -> Vec<Arc<dyn Backend>> {
    common::all_backends("shape checks")
}

/// Runs `call` and demands a typed error of `kind`; a panic or a success fails the test.
fn expect_kind<T: std::fmt::Debug>(
    label: &str,
    kind: &str,
    call: impl FnOnce() -> soft_topk::Result<T>,
) {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Err(e)) => assert_eq!(e.kind(), kind, "{label}: wrong error {e:?}"),
        Ok(Ok(v)) => panic!("{label}: accepted, gave {v:?}; expected a {kind} error"),
        Err(_) => panic!("{label}: panicked; expected a {kind} error"),
    }
}

/// A 3 × 4 batch and the forward outputs of three ops on it, for each backend.
struct Setup {
    scores: Vec<f32>,
    topk: SoftTopK,
    sorted: SoftTopK,
}

fn setup() -> Setup {
    Setup {
        scores: (0..12).map(|i| (i * 7 % 5) as f32 * 0.3).collect(),
        topk: SoftTopK::new(2, 0.1),
        sorted: SoftTopK::new(2, 0.1).sorted(),
    }
}

#[test]
fn batch_constructors_refuse_bad_shapes() {
    let scores = [1.0f32; 12];
    expect_kind("n = 0", "empty_input", || Batch::new(&[], 3, 0));
    expect_kind("n = 0, no rows", "empty_input", || Batch::new(&[], 0, 0));
    expect_kind("too few scores", "shape_mismatch", || {
        Batch::new(&scores, 4, 4)
    });
    expect_kind("too many scores", "shape_mismatch", || {
        Batch::new(&scores, 2, 4)
    });
    expect_kind("rows × n overflows", "shape_mismatch", || {
        Batch::new(&scores, usize::MAX, 2)
    });
    expect_kind("short validity mask", "shape_mismatch", || {
        Batch::new(&scores, 3, 4).and_then(|b| b.with_valid(&[true; 11]))
    });
    expect_kind("long validity mask", "shape_mismatch", || {
        Batch::new(&scores, 3, 4).and_then(|b| b.with_valid(&[true; 13]))
    });
    expect_kind("empty single row", "empty_input", || Batch::single(&[]));
}

#[test]
fn per_row_k_of_the_wrong_length_is_a_shape_error() {
    let Setup { scores, .. } = setup();
    let batch = Batch::new(&scores, 3, 4).expect("batch");
    for b in backends() {
        for ks in [vec![], vec![1, 2], vec![1, 2, 3, 4]] {
            for op in [
                SoftTopK::new(0, 0.1).per_row_k(ks.clone()),
                SoftTopK::new(0, 0.1).per_row_k(ks.clone()).sorted(),
            ] {
                let label = format!("{}: per-row k {ks:?} {:?}", b.name(), op.variant);
                expect_kind(&label, "shape_mismatch", || b.forward(&op, &batch));
                let good = SoftTopK::new(1, 0.1).variant(op.variant);
                let fwd = b.forward(&good, &batch).expect("forward");
                expect_kind(&label, "shape_mismatch", || {
                    b.backward(&op, &batch, &fwd, Cotangent::Mask(&[0.5; 12]))
                });
            }
        }
    }
}

#[test]
fn cotangents_of_the_wrong_length_or_kind_are_typed_errors() {
    let Setup {
        scores,
        topk,
        sorted,
    } = setup();
    let batch = Batch::new(&scores, 3, 4).expect("batch");
    for b in backends() {
        let name = b.name();
        let f_topk = b.forward(&topk, &batch).expect("top-k forward");
        let f_sorted = b.forward(&sorted, &batch).expect("sorted forward");
        for len in [0, 11, 13, 24] {
            let g = vec![1.0f32; len];
            expect_kind(
                &format!("{name}: top-k mask cotangent of {len}"),
                "shape_mismatch",
                || b.backward(&topk, &batch, &f_topk, Cotangent::Mask(&g)),
            );
            expect_kind(
                &format!("{name}: sorted mask cotangent of {len}"),
                "shape_mismatch",
                || b.backward(&sorted, &batch, &f_sorted, Cotangent::Mask(&g)),
            );
        }
        for len in [0, 12, 23, 25, 36] {
            let g = vec![1.0f32; len];
            let label = format!("{name}: ranks cotangent of {len}");
            expect_kind(&label, "shape_mismatch", || {
                b.backward(&sorted, &batch, &f_sorted, Cotangent::Ranks(&g))
            });
        }
        let g = vec![1.0f32; 24];
        expect_kind(
            &format!("{name}: ranks cotangent for top-k"),
            "invalid_option",
            || b.backward(&topk, &batch, &f_topk, Cotangent::Ranks(&g)),
        );
        // The right lengths pass, so the errors above are about the lengths.
        let ok = b.backward(&sorted, &batch, &f_sorted, Cotangent::Ranks(&g));
        assert!(
            ok.is_ok(),
            "{name}: a fitting ranks cotangent was refused: {ok:?}"
        );
    }
}

#[test]
fn a_forward_of_another_shape_or_op_is_a_shape_error() {
    let Setup {
        scores,
        topk,
        sorted,
    } = setup();
    let batch = Batch::new(&scores, 3, 4).expect("batch");
    let g = [1.0f32; 12];
    for b in backends() {
        let name = b.name();
        // Same number of values, other shapes.
        for (rows, n) in [(4, 3), (2, 6), (1, 12), (12, 1)] {
            let other = Batch::new(&scores, rows, n).expect("reshaped batch");
            for op in [&topk, &sorted] {
                let fwd = b.forward(op, &other).expect("forward");
                let label = format!("{name}: {:?} forward of {rows}×{n} for 3×4", op.variant);
                expect_kind(&label, "shape_mismatch", || {
                    b.backward(op, &batch, &fwd, Cotangent::Mask(&g))
                });
            }
        }
        // Right shape, wrong op.
        let f_topk = b.forward(&topk, &batch).expect("forward");
        let f_sorted = b.forward(&sorted, &batch).expect("forward");
        let sorted3 = SoftTopK::new(3, 0.1).sorted();
        let f_sorted3 = b.forward(&sorted3, &batch).expect("forward");
        let mismatched = [
            ("top-k forward, sorted op", &sorted, &f_topk),
            ("sorted forward, top-k op", &topk, &f_sorted),
            ("sorted k=2 forward, k=3 op", &sorted3, &f_sorted),
            ("sorted k=3 forward, k=2 op", &sorted, &f_sorted3),
        ];
        for (what, op, fwd) in mismatched {
            expect_kind(&format!("{name}: {what}"), "shape_mismatch", || {
                b.backward(op, &batch, fwd, Cotangent::Mask(&g))
            });
        }
        let g_ranks = vec![1.0f32; 24];
        expect_kind(
            &format!("{name}: k=2 ranks for k=3"),
            "shape_mismatch",
            || b.backward(&sorted3, &batch, &f_sorted, Cotangent::Ranks(&g_ranks)),
        );
    }
}

/// `Forward`'s fields are public, so a caller can hand back an edited one: lengths that no
/// longer fit are errors, not out-of-bounds panics.
#[test]
fn an_edited_forward_is_a_shape_error() {
    let Setup {
        scores,
        topk,
        sorted,
    } = setup();
    let batch = Batch::new(&scores, 3, 4).expect("batch");
    let g = [1.0f32; 12];
    for b in backends() {
        let name = b.name();
        let f_topk = b.forward(&topk, &batch).expect("forward");
        let f_sorted = b.forward(&sorted, &batch).expect("forward");
        type Edit = Box<dyn Fn(&mut Forward)>;
        let edits: Vec<(&str, &SoftTopK, Edit)> = vec![
            ("short mask", &topk, Box::new(|f| f.mask.truncate(11))),
            ("long mask", &topk, Box::new(|f| f.mask.push(0.5))),
            (
                "ranks on top-k",
                &topk,
                Box::new(|f| f.ranks = Some(vec![])),
            ),
            ("k_max on top-k", &topk, Box::new(|f| f.k_max = 2)),
            (
                "short ranks",
                &sorted,
                Box::new(|f| f.ranks = Some(vec![0.5; 5])),
            ),
            ("no ranks", &sorted, Box::new(|f| f.ranks = None)),
            ("k_max too large", &sorted, Box::new(|f| f.k_max = 5)),
            ("k_max too small", &sorted, Box::new(|f| f.k_max = 1)),
            ("rows lie", &sorted, Box::new(|f| f.rows = 2)),
        ];
        for (what, op, edit) in edits {
            let mut fwd = if op.variant == soft_topk::Variant::Sorted {
                f_sorted.clone()
            } else {
                f_topk.clone()
            };
            edit(&mut fwd);
            expect_kind(&format!("{name}: {what}"), "shape_mismatch", || {
                b.backward(op, &batch, &fwd, Cotangent::Mask(&g))
            });
        }
    }
}

/// A batch of no rows is a valid batch: empty outputs, no error.
#[test]
fn a_batch_of_no_rows_gives_empty_outputs() {
    let batch = Batch::new(&[], 0, 5).expect("no rows");
    for b in backends() {
        for op in [
            SoftTopK::new(3, 0.1),
            SoftTopK::new(3, 0.1).sorted(),
            SoftTopK::new(0, 0.1).per_row_k(vec![]).sorted(),
        ] {
            let fwd = b.forward(&op, &batch).expect("forward of no rows");
            assert!(
                fwd.mask.is_empty() && fwd.reports.is_empty(),
                "{}",
                b.name()
            );
            let grad = b
                .backward(&op, &batch, &fwd, Cotangent::Mask(&[]))
                .expect("backward of no rows");
            assert!(grad.is_empty(), "{}", b.name());
        }
    }
}

/// k > n in one row is that row's error; ks beyond any row (usize::MAX) too.
#[test]
fn per_row_k_beyond_n_is_a_row_error() {
    let Setup { scores, .. } = setup();
    let batch = Batch::new(&scores, 3, 4).expect("batch");
    for b in backends() {
        for sorted in [false, true] {
            let ks = vec![1, 5, if sorted { 9 } else { usize::MAX }];
            let mut op = SoftTopK::new(0, 0.1).per_row_k(ks);
            if sorted {
                op = op.sorted();
            }
            let fwd = b.forward(&op, &batch).expect("forward");
            let kinds: Vec<_> = fwd
                .reports
                .iter()
                .map(|r| r.error.as_ref().map(Error::kind))
                .collect();
            assert_eq!(
                kinds,
                [None, Some("k_out_of_range"), Some("k_out_of_range")],
                "{} sorted={sorted}",
                b.name()
            );
            let grad = b
                .backward(&op, &batch, &fwd, Cotangent::Mask(&[1.0; 12]))
                .expect("backward");
            assert!(
                grad[4..].iter().all(|&d| d == 0.0),
                "{}: failed rows have a gradient",
                b.name()
            );
        }
    }
}

/// Regression: the sorted output was sized by the largest k alone, so k = 2⁴⁰ on a row of 4
/// (an input error) tried to allocate rows × k × n floats and aborted the process. The slots
/// are now capped at n; the row reports k_out_of_range.
#[test]
fn regression_huge_k_does_not_size_the_sorted_output() {
    let scores = [1.0f32, 2.0, 3.0, 4.0, 0.5, 0.25, 0.125, 0.0];
    let batch = Batch::new(&scores, 2, 4).expect("batch");
    for b in backends() {
        for op in [
            SoftTopK::new(1 << 40, 0.1).sorted(),
            SoftTopK::new(usize::MAX, 0.1).sorted(),
            SoftTopK::new(0, 0.1)
                .per_row_k(vec![2, usize::MAX])
                .sorted(),
        ] {
            let label = format!("{}: k {:?}", b.name(), op.k);
            let fwd = b.forward(&op, &batch).expect("forward");
            assert!(
                fwd.k_max <= 4,
                "{label}: {} rank slots for n = 4",
                fwd.k_max
            );
            assert_eq!(
                fwd.reports[1].error.as_ref().map(Error::kind),
                Some("k_out_of_range"),
                "{label}"
            );
            let g = vec![1.0f32; 2 * fwd.k_max * 4];
            let grad = b
                .backward(&op, &batch, &fwd, Cotangent::Ranks(&g))
                .expect("backward");
            assert!(
                grad[4..].iter().all(|&d| d == 0.0),
                "{label}: failed row has a gradient"
            );
        }
    }
}
