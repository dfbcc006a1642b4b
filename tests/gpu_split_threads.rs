//! Batches larger than one binding, and threads sharing one backend.

mod gpu_support;

use std::sync::Arc;

use gpu_support::{assert_abs, reference_forward, rng, uniform};
use soft_topk::gpu::GpuBackend;
use soft_topk::{Backend, Batch, SoftTopK, Variant};

/// As in gpu_parity: the root search's stopping rule and f32 σ, with the f32 noise floor of
/// Σ A over 10^6 entries.
const MASK_TOLERANCE: f64 = 2e-5;

#[test]
fn a_batch_over_the_binding_limit_runs_split() {
    let gpu = gpu_or_skip!();
    let (rows, n) = (40, 1_000_000);
    let per_part = gpu.max_rows_per_part(n, Variant::TopK, 0).unwrap();
    eprintln!(
        "{}: storage binding limit {} bytes, {per_part} rows of 10^6 per part",
        gpu.name(),
        gpu.limits().max_storage_binding
    );
    if gpu.limits().max_storage_binding < (rows * n * 4) as u64 {
        assert!(per_part < rows, "160 MB must not fit one part here");
    }

    let scores = uniform(&mut rng(40), rows * n);
    let batch = Batch::new(&scores, rows, n).unwrap();
    let op = SoftTopK::new(1000, 0.01);
    let out = gpu.forward(&op, &batch).unwrap();

    // A few rows on either side of each part boundary, against the reference.
    for r in [0, per_part.min(rows) - 1, per_part.min(rows - 1), rows - 1] {
        let one = Batch::single(batch.row(r)).unwrap();
        let want = reference_forward(&op, &one);
        assert_abs(
            &format!("row {r}"),
            out.mask_row(r),
            &want.mask,
            MASK_TOLERANCE,
        );
        assert!(out.reports[r].converged, "row {r}: {:?}", out.reports[r]);
    }
}

#[test]
fn a_single_row_over_the_binding_limit_is_too_large() {
    let gpu = gpu_or_skip!();
    let limit = gpu
        .limits()
        .max_storage_binding
        .min(gpu.limits().max_buffer);
    let n = (limit / 4) as usize + 1;
    let err = gpu.max_rows_per_part(n, Variant::TopK, 0).unwrap_err();
    assert_eq!(err.kind(), "too_large", "{err}");
    assert!(err.to_string().contains(&format!("n = {n}")), "{err}");
}

#[test]
fn a_lowered_part_limit_splits_small_batches_the_same() {
    let Some(_) = gpu_support::gpu() else { return };
    let small = GpuBackend::new()
        .unwrap()
        .with_part_limit(Some(4 * 300 * 2));
    let (rows, n) = (7, 300);
    let scores = uniform(&mut rng(41), rows * n);
    let batch = Batch::new(&scores, rows, n).unwrap();
    let op = SoftTopK::new(20, 0.05);
    assert_eq!(small.max_rows_per_part(n, Variant::TopK, 0).unwrap(), 2);
    let split = small.forward(&op, &batch).unwrap();
    let whole = GpuBackend::shared().unwrap().forward(&op, &batch).unwrap();
    assert_eq!(split.mask, whole.mask);
}

#[test]
fn eight_threads_share_one_backend() {
    let gpu: Arc<GpuBackend> = gpu_or_skip!();
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let gpu = Arc::clone(&gpu);
            std::thread::spawn(move || {
                for round in 0..4u64 {
                    let (rows, n) = (3 + t as usize, 200 + 37 * t as usize);
                    let scores = uniform(&mut rng(100 * t + round), rows * n);
                    let batch = Batch::new(&scores, rows, n).unwrap();
                    let op = SoftTopK::new(5 + t as usize, 0.02);
                    let got = gpu.forward(&op, &batch).unwrap();
                    let want = reference_forward(&op, &batch);
                    assert_abs(
                        &format!("thread {t} round {round}"),
                        &got.mask,
                        &want.mask,
                        MASK_TOLERANCE,
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a thread failed");
    }
}
