//! The public reference cases of `../shared/cases/public.jsonl` on the f64 reference.

mod common;

use common::{assert_close, load_cases};
use soft_topk::reference::{backward_row, forward_row, RowCotangent};
use soft_topk::Variant;

/// The cases' expected values come from Sinkhorn run to a 1e-12 marginal error and from the
/// exact solution; the reference must match them to 1e-9 (relative above 1).
const REFERENCE_TOLERANCE: f64 = 1e-9;

#[test]
fn reference_matches_every_public_case() {
    let cases = load_cases();
    assert!(!cases.is_empty(), "no public cases found");
    for case in &cases {
        let op = case.op();
        let x = case.scores();
        if let Some(kind) = &case.expect_error {
            let out = forward_row(&op, 0, &x, None);
            let got = out.report.error.as_ref().map(|e| e.kind());
            let got = got.or_else(|| op.check(1).err().map(|e| e.kind()));
            assert_eq!(got, Some(kind.as_str()), "case {}: wrong error", case.id);
            continue;
        }
        let out = forward_row(&op, 0, &x, None);
        assert!(
            out.report.error.is_none(),
            "case {}: {:?}",
            case.id,
            out.report.error
        );
        let expected_grad = &case.expected.as_ref().unwrap().grad_x;
        let grad = match op.variant {
            Variant::TopK => {
                assert_close(
                    &format!("{} mask", case.id),
                    &out.mask,
                    &case.expected_mask(),
                    REFERENCE_TOLERANCE,
                );
                let v = case.cotangent_mask();
                backward_row(
                    &op,
                    0,
                    &x,
                    None,
                    &out.mask,
                    &out.ranks,
                    RowCotangent {
                        mask: Some(&v),
                        ranks: None,
                    },
                )
            }
            Variant::Sorted => {
                let expected = case.expected_ranks();
                for (j, rank) in expected.iter().enumerate() {
                    assert_close(
                        &format!("{} rank {j}", case.id),
                        &out.ranks[j],
                        rank,
                        REFERENCE_TOLERANCE,
                    );
                }
                let v = case.cotangent_ranks();
                backward_row(
                    &op,
                    0,
                    &x,
                    None,
                    &out.mask,
                    &out.ranks,
                    RowCotangent {
                        mask: None,
                        ranks: Some(&v),
                    },
                )
            }
        };
        assert_close(
            &format!("{} grad", case.id),
            &grad,
            expected_grad,
            REFERENCE_TOLERANCE,
        );
    }
}
