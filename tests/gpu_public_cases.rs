//! Every public case of `../shared/cases/public.jsonl` through the GPU backend.

mod common;
mod gpu_support;

use common::load_cases;
use soft_topk::{Backend, Batch, Cotangent, Variant};

/// The cases are float64 values for float64 scores; the GPU sees the scores rounded to f32
/// and computes in f32. Masks and ranks: a few 1e-6 from the rounding of the scores times
/// (range of x)/(s·ε) on the cases' ranges, 2e-4 leaves room for the largest such ratio.
const VALUE_TOLERANCE: f64 = 2e-4;
/// Gradients, relative to the case's largest gradient entry (they scale with 1/(s·ε)).
const GRAD_TOLERANCE: f64 = 2e-3;
/// Absolute gradient error per unit of 2/ε: an f32 mask knows A(1 − A) only to ±2^-24 (see
/// gpu_parity), so nearly saturated cases are compared to this floor.
const GRAD_ABSOLUTE: f64 = 2.4e-7;

#[test]
fn every_public_case_on_the_gpu() {
    let gpu = gpu_or_skip!();
    let cases = load_cases();
    assert!(!cases.is_empty());
    let mut ran = 0;
    for case in &cases {
        let op = case.op();
        let x: Vec<f32> = case.scores().iter().map(|&v| v as f32).collect();
        if let Some(kind) = &case.expect_error {
            let got = match Batch::single(&x) {
                Err(e) => Some(e.kind().to_string()),
                Ok(batch) => match gpu.forward(&op, &batch) {
                    Err(e) => Some(e.kind().to_string()),
                    Ok(out) => out.reports[0].error.as_ref().map(|e| e.kind().to_string()),
                },
            };
            assert_eq!(got.as_deref(), Some(kind.as_str()), "case {}", case.id);
            continue;
        }
        let batch = Batch::single(&x).unwrap();
        let out = match gpu.forward(&op, &batch) {
            Ok(out) => out,
            Err(e) if op.variant == Variant::Sorted && e.kind() == "invalid_option" => {
                eprintln!("case {}: sorted not on this GPU build: {e}", case.id);
                continue;
            }
            Err(e) => panic!("case {}: {e}", case.id),
        };
        assert!(out.reports[0].error.is_none(), "case {}", case.id);
        let expected_grad = &case.expected.as_ref().unwrap().grad_x;
        let (grad, values, expected): (Vec<f32>, Vec<f32>, Vec<f64>) = match op.variant {
            Variant::TopK => {
                let v: Vec<f32> = case.cotangent_mask().iter().map(|&v| v as f32).collect();
                let g = gpu
                    .backward(&op, &batch, &out, Cotangent::Mask(&v))
                    .unwrap();
                (g, out.mask.clone(), case.expected_mask())
            }
            Variant::Sorted => {
                let k = out.k_max;
                let v = case.cotangent_ranks();
                let flat: Vec<f32> = v.iter().flatten().map(|&v| v as f32).collect();
                let g = gpu
                    .backward(&op, &batch, &out, Cotangent::Ranks(&flat))
                    .unwrap();
                let ranks = out.ranks.clone().unwrap();
                let want: Vec<f64> = case.expected_ranks().into_iter().flatten().collect();
                assert_eq!(ranks.len(), k * x.len());
                (g, ranks, want)
            }
        };
        for (i, (&a, &e)) in values.iter().zip(&expected).enumerate() {
            assert!(
                (a as f64 - e).abs() <= VALUE_TOLERANCE,
                "case {}: value {i}: got {a}, expected {e}",
                case.id
            );
        }
        let floor = GRAD_ABSOLUTE * 2.0 / case.eps / GRAD_TOLERANCE;
        let scale = expected_grad.iter().fold(floor, |m, g| m.max(g.abs()));
        for (i, (&a, &e)) in grad.iter().zip(expected_grad).enumerate() {
            assert!(
                (a as f64 - e).abs() <= GRAD_TOLERANCE * scale,
                "case {}: grad {i}: got {a}, expected {e} (scale {scale:.3e})",
                case.id
            );
        }
        ran += 1;
    }
    eprintln!("{ran} public cases compared on {}", gpu.name());
}
