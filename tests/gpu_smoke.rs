//! Small end-to-end checks of the GPU backend against MATH.md §6's reference values.

mod gpu_support;

use soft_topk::gpu::{kernels, WORKGROUP_SIZE};
use soft_topk::reference::Reference;
use soft_topk::{Backend, Batch, Cotangent, Scale, SoftTopK};

/// f32 against the f64 values of MATH.md §6 (six digits given there).
const PUBLISHED_TOLERANCE: f64 = 2e-6;

#[test]
fn workgroup_size_matches_the_wgsl_constant() {
    let line = kernels::COMMON_WGSL
        .lines()
        .find(|l| l.trim_start().starts_with("const WG: u32"))
        .expect("common.wgsl declares WG");
    let value: u32 = line
        .split('=')
        .nth(1)
        .and_then(|v| {
            v.trim()
                .trim_end_matches(';')
                .trim_end_matches('u')
                .parse()
                .ok()
        })
        .expect("WG is a u32 literal");
    assert_eq!(
        value, WORKGROUP_SIZE,
        "shaders/common.wgsl WG vs gpu::WORKGROUP_SIZE"
    );
}

#[test]
fn official_demo_smallest_scale_max() {
    let gpu = gpu_or_skip!();
    eprintln!("backend: {}", gpu.name());
    let x = [5.0f32, 2.0, 3.0, 4.0, 1.0, 6.0];
    let op = SoftTopK::new(3, 0.05).smallest().scale(Scale::Max);
    let batch = Batch::single(&x).unwrap();
    let out = gpu.forward(&op, &batch).unwrap();
    let expected = [0.158869, 0.841131, 0.635424, 0.364576, 0.941463, 0.058537];
    for (i, (&a, e)) in out.mask.iter().zip(expected).enumerate() {
        assert!(
            (a as f64 - e).abs() < PUBLISHED_TOLERANCE,
            "A[{i}] = {a}, expected {e}"
        );
    }
    let v = [0.0f32, 1.0, 1.0, 1.0, 0.0, 0.0];
    let grad = gpu
        .backward(&op, &batch, &out, Cotangent::Mask(&v))
        .unwrap();
    let expected = [
        0.105416, -0.043062, -0.074652, -0.074652, 0.043475, 0.043475,
    ];
    for (i, (&g, e)) in grad.iter().zip(expected).enumerate() {
        assert!((g as f64 - e).abs() < 1e-5, "grad[{i}] = {g}, expected {e}");
    }
    let reference = Reference.forward(&op, &batch).unwrap();
    assert!(out.reports[0].converged, "{:?}", out.reports[0]);
    assert_eq!(out.reports[0].k, reference.reports[0].k);
}
