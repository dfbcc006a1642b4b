//! The fast CPU backend against the f64 reference: seeded grids, awkward sizes, public cases.

mod common;

use common::{load_cases, uniform_scores, worst_abs};
use soft_topk::cpu::CpuBackend;
use soft_topk::reference::Reference;
use soft_topk::{check_row, Backend, Batch, Cotangent, Direction, Scale, SoftTopK, Variant};

/// f32 evaluates σ to a few ulp, and the threshold search stops at the f32 sum's noise
/// (≈ 0.5 ulp·√n): a mask entry moves by at most that, 6e-8·√4096 ≈ 4e-6 at n = 4096.
const MASK_TOLERANCE: f32 = 1e-5;
/// Gradients are 2/(s·ε)·A'·(g − ḡ): an error δ in A moves A' by δ and g − ḡ by up to
/// 2·max|g|·δ/A', so the gradient may move by 4·δ·max|g|·2/(s·ε), δ the mask tolerance.
const GRAD_ERROR_PER_MASK_ERROR: f32 = 4.0;
/// The sorted variant runs the f64 reference inside; only f32 rounding of the outputs remains.
const SORTED_TOLERANCE: f32 = 1e-6;

fn compare(op: &SoftTopK, batch: &Batch, cotangent: &[f32], label: &str) {
    let (cpu, reference) = (CpuBackend::new(), Reference);
    let fast = cpu.forward(op, batch).expect("cpu forward");
    let slow = reference.forward(op, batch).expect("reference forward");
    let tolerance = if op.variant == Variant::Sorted {
        SORTED_TOLERANCE
    } else {
        MASK_TOLERANCE
    };
    let (err, at, _) = worst_abs(&fast.mask, &slow.mask);
    assert!(
        err <= tolerance,
        "{label}: mask error {err:e} at {at} (tolerance {tolerance:e})"
    );
    for (a, b) in fast.reports.iter().zip(&slow.reports) {
        assert_eq!(a.error, b.error, "{label}: row errors differ");
        assert!(a.converged, "{label}: cpu did not converge: {a:?}");
    }

    let g_fast = cpu
        .backward(op, batch, &fast, Cotangent::Mask(cotangent))
        .expect("cpu backward");
    let g_slow = reference
        .backward(op, batch, &slow, Cotangent::Mask(cotangent))
        .expect("ref");
    for r in 0..batch.rows() {
        let row = r * batch.n()..(r + 1) * batch.n();
        let (err, at, _) = worst_abs(&g_fast[row.clone()], &g_slow[row.clone()]);
        let Ok(spec) = check_row(op, batch, r) else {
            continue;
        };
        let factor = (2.0 / (spec.scale * op.epsilon)) as f32;
        let g_max = cotangent[row].iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let allowed = GRAD_ERROR_PER_MASK_ERROR * tolerance * factor * g_max;
        assert!(
            err <= allowed,
            "{label}: row {r} gradient error {err:e} at {at} (allowed {allowed:e})"
        );
        assert!(
            g_fast.iter().all(|g| g.is_finite()),
            "{label}: non-finite gradient"
        );
    }
}

#[test]
fn topk_matches_the_reference_on_a_seeded_grid() {
    let mut seed = 0;
    for n in [1usize, 2, 7, 255, 256, 257, 1000, 4096] {
        let rows = if n <= 1000 { 64 } else { 3 };
        for k in [0, 1, n / 2, n.saturating_sub(1), n] {
            for eps in [1e-3, 1e-2, 0.1, 1.0] {
                for (direction, scale) in [
                    (Direction::Largest, Scale::None),
                    (Direction::Smallest, Scale::Max),
                ] {
                    seed += 1;
                    let scores = uniform_scores(rows, n, -1.0, 1.0, seed);
                    let g = uniform_scores(rows, n, -1.0, 1.0, seed + 10_000);
                    let batch = Batch::new(&scores, rows, n).unwrap();
                    let op = SoftTopK::new(k, eps).direction(direction).scale(scale);
                    compare(
                        &op,
                        &batch,
                        &g,
                        &format!("n={n} k={k} eps={eps} {direction:?}"),
                    );
                }
            }
        }
    }
}

#[test]
fn sorted_matches_the_reference() {
    for (n, k, eps) in [
        (6, 2, 0.1),
        (40, 4, 0.05),
        (100, 16, 0.1),
        (9, 9, 0.3),
        (30, 1, 0.01),
    ] {
        let scores = uniform_scores(3, n, 0.0, 1.0, n as u64);
        let g = uniform_scores(3, n, -1.0, 1.0, 7);
        let batch = Batch::new(&scores, 3, n).unwrap();
        let op = SoftTopK::new(k, eps).variant(Variant::Sorted);
        compare(&op, &batch, &g, &format!("sorted n={n} k={k} eps={eps}"));
    }
}

#[test]
fn ties_exclusions_and_per_row_k() {
    // Row 0: ties at the threshold; row 1: an excluded infinity and a masked-out entry; row 2:
    // all equal. Both directions: a row with exclusions is solved on its gathered entries,
    // in largest orientation, which is where a smallest-mode row once got a wrong bracket.
    for direction in [Direction::Largest, Direction::Smallest] {
        let excluded = match direction {
            Direction::Largest => f32::NEG_INFINITY,
            Direction::Smallest => f32::INFINITY,
        };
        #[rustfmt::skip]
        let scores = [
            1.0, 2.0, 2.0, 2.0, 3.0, 0.0,
            excluded, 0.5, 0.2, f32::NAN, 0.9, 0.1,
            4.0, 4.0, 4.0, 4.0, 4.0, 4.0,
        ];
        let mut valid = [true; 18];
        valid[9] = false;
        let batch = Batch::new(&scores, 3, 6)
            .unwrap()
            .with_valid(&valid)
            .unwrap();
        let op = SoftTopK::new(0, 0.05)
            .per_row_k(vec![3, 2, 4])
            .direction(direction);
        let g: Vec<f32> = (0..18).map(|i| (i as f32 * 0.37).sin()).collect();
        compare(
            &op,
            &batch,
            &g,
            &format!("ties, exclusions, per-row k, {direction:?}"),
        );

        let out = CpuBackend::new().forward(&op, &batch).unwrap();
        assert_eq!(out.mask[6], 0.0, "an excluded infinity gets 0");
        assert_eq!(out.mask[9], 0.0, "a masked-out NaN gets 0");
        for &a in &out.mask[12..18] {
            assert!((a - 4.0 / 6.0).abs() < 1e-6, "all-equal row: {a}");
        }
    }
}

#[test]
fn a_bad_row_spoils_nothing_else() {
    let mut scores = uniform_scores(3, 50, -1.0, 1.0, 99);
    let clean = CpuBackend::new()
        .forward(&SoftTopK::new(5, 0.1), &Batch::new(&scores, 3, 50).unwrap())
        .unwrap();
    scores[50 + 17] = f32::NAN;
    let out = CpuBackend::new()
        .forward(&SoftTopK::new(5, 0.1), &Batch::new(&scores, 3, 50).unwrap())
        .unwrap();
    let err = out.reports[1]
        .error
        .as_ref()
        .expect("row 1 reports its NaN");
    assert_eq!(err.kind(), "non_finite_input");
    assert!(err.to_string().contains("row 1, column 17"), "{err}");
    assert_eq!(out.mask_row(0), clean.mask_row(0));
    assert_eq!(out.mask_row(2), clean.mask_row(2));
    assert!(out.mask_row(1).iter().all(|&a| a == 0.0));
}

#[test]
fn public_cases_on_the_cpu_backend() {
    for case in load_cases() {
        let scores: Vec<f32> = case.scores().iter().map(|&x| x as f32).collect();
        if case.expect_error.is_some() || scores.is_empty() {
            continue;
        }
        let batch = Batch::single(&scores).unwrap();
        let op = case.op();
        let g: Vec<f32> = if op.variant == Variant::TopK {
            case.cotangent_mask().iter().map(|&v| v as f32).collect()
        } else {
            vec![0.5; scores.len()]
        };
        compare(&op, &batch, &g, &case.id);
    }
}
