//! Invariants of the operator, on random inputs (proptest).

use proptest::prelude::*;
use soft_topk::cpu::CpuBackend;
use soft_topk::reference::forward_row;
use soft_topk::{Backend, Batch, Scale, SoftTopK, Variant};

/// f64 invariants hold to rounding: a few hundred ulps of the threshold solve at n ≤ 40.
const F64_TOLERANCE: f64 = 1e-9;
/// Σ mask = k in f32: each of n ≤ 40 entries rounds to half an ulp, the solve stops at the
/// sum's noise floor.
const F32_SUM_TOLERANCE: f32 = 1e-5;
/// ε → 0 with a gap of at least 0.25 between scores: σ(0.25/ε) at ε = 1e-3 is 1 − e^-250.
const HARD_LIMIT_TOLERANCE: f64 = 1e-12;

fn row_and_k() -> impl Strategy<Value = (Vec<f64>, usize, f64)> {
    (1usize..40).prop_flat_map(|n| {
        (
            prop::collection::vec(-10.0f64..10.0, n),
            0..=n,
            0.01f64..2.0,
        )
    })
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= F64_TOLERANCE)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mask_is_in_unit_interval_and_sums_to_k((x, k, eps) in row_and_k(), sorted in any::<bool>()) {
        let variant = if sorted { Variant::Sorted } else { Variant::TopK };
        let out = forward_row(&SoftTopK::new(k, eps).variant(variant), 0, &x, None);
        prop_assert!(out.mask.iter().all(|&a| (0.0..=1.0).contains(&a)));
        prop_assert!((out.mask.iter().sum::<f64>() - k as f64).abs() <= F64_TOLERANCE * 10.0);
        for rank in &out.ranks {
            prop_assert!((rank.iter().sum::<f64>() - 1.0).abs() <= 1e-8, "rank sums to 1");
        }
    }

    #[test]
    fn f32_backend_sums_to_k((x, k, eps) in row_and_k()) {
        let scores: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let out = CpuBackend::new()
            .forward(&SoftTopK::new(k, eps), &Batch::single(&scores).unwrap())
            .unwrap();
        prop_assert!(out.mask.iter().all(|&a| (0.0..=1.0).contains(&a)));
        prop_assert!((out.mask.iter().sum::<f32>() - k as f32).abs() <= F32_SUM_TOLERANCE);
    }

    #[test]
    fn permutation_equivariance((x, k, eps) in row_and_k(), seed in any::<u64>()) {
        let n = x.len();
        let mut order: Vec<usize> = (0..n).collect();
        // A seeded shuffle (Fisher–Yates with an LCG: enough to scramble small rows).
        let mut state = seed | 1;
        for i in (1..n).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (state >> 33) as usize % (i + 1));
        }
        let permuted: Vec<f64> = order.iter().map(|&i| x[i]).collect();
        for variant in [Variant::TopK, Variant::Sorted] {
            let op = SoftTopK::new(k, eps).variant(variant);
            let a = forward_row(&op, 0, &x, None).mask;
            let b = forward_row(&op, 0, &permuted, None).mask;
            let a_permuted: Vec<f64> = order.iter().map(|&i| a[i]).collect();
            prop_assert!(close(&a_permuted, &b), "{variant:?}");
        }
    }

    #[test]
    fn shift_invariance_and_homogeneity((x, k, eps) in row_and_k(), c in -100.0f64..100.0,
                                        lambda in 0.1f64..10.0) {
        for variant in [Variant::TopK, Variant::Sorted] {
            let op = SoftTopK::new(k, eps).variant(variant).scale(Scale::None);
            let base = forward_row(&op, 0, &x, None).mask;
            let shifted: Vec<f64> = x.iter().map(|v| v + c).collect();
            prop_assert!(close(&forward_row(&op, 0, &shifted, None).mask, &base));
            let scaled: Vec<f64> = x.iter().map(|v| v * lambda).collect();
            let op_scaled = SoftTopK::new(k, eps * lambda).variant(variant);
            prop_assert!(close(&forward_row(&op_scaled, 0, &scaled, None).mask, &base));
        }
    }

    #[test]
    fn hard_top_k_as_epsilon_vanishes(perm in Just((0..30).collect::<Vec<usize>>()).prop_shuffle(),
                                      k in 0usize..=30) {
        // Distinct scores 0.25 apart: the hard top-k is unambiguous.
        let x: Vec<f64> = perm.iter().map(|&i| i as f64 * 0.25).collect();
        let out = forward_row(&SoftTopK::new(k, 1e-3), 0, &x, None);
        for (i, &a) in out.mask.iter().enumerate() {
            let hard = if perm[i] >= 30 - k { 1.0 } else { 0.0 };
            prop_assert!((a - hard).abs() <= HARD_LIMIT_TOLERANCE, "entry {i}: {a} vs {hard}");
        }
    }

    #[test]
    fn padding_changes_nothing((x, k, eps) in row_and_k(), pad in 1usize..10,
                               sorted in any::<bool>()) {
        let variant = if sorted { Variant::Sorted } else { Variant::TopK };
        let op = SoftTopK::new(k, eps).variant(variant);
        let scores: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut padded = scores.clone();
        padded.extend(std::iter::repeat_n(f32::NEG_INFINITY, pad));
        let mut masked = scores.clone();
        masked.extend(std::iter::repeat_n(123.0, pad));
        let valid: Vec<bool> = (0..masked.len()).map(|i| i < scores.len()).collect();

        let cpu = CpuBackend::new();
        let plain = cpu.forward(&op, &Batch::single(&scores).unwrap()).unwrap();
        let by_infinity = cpu.forward(&op, &Batch::single(&padded).unwrap()).unwrap();
        let batch = Batch::single(&masked).unwrap().with_valid(&valid).unwrap();
        let by_mask = cpu.forward(&op, &batch).unwrap();
        let n = scores.len();
        prop_assert_eq!(&by_infinity.mask[..n], &plain.mask[..]);
        prop_assert_eq!(&by_mask.mask[..n], &plain.mask[..]);
        prop_assert!(by_infinity.mask[n..].iter().chain(&by_mask.mask[n..]).all(|&a| a == 0.0));
    }

    #[test]
    fn a_row_is_the_same_alone_or_in_a_batch(rows in prop::collection::vec(
            prop::collection::vec(-5.0f32..5.0, 12), 1..6), k in 0usize..=12, eps in 0.01f64..1.0) {
        let flat: Vec<f32> = rows.concat();
        let op = SoftTopK::new(k, eps);
        let cpu = CpuBackend::new();
        let together = cpu.forward(&op, &Batch::new(&flat, rows.len(), 12).unwrap()).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let alone = cpu.forward(&op, &Batch::single(row).unwrap()).unwrap();
            prop_assert_eq!(together.mask_row(r), &alone.mask[..]);
        }
    }
}
