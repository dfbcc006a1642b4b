//! Small end-to-end checks of the GPU backend against MATH.md §6's reference values.

mod gpu_support;

use soft_topk::gpu::{kernels, WORKGROUP_SIZE};
use soft_topk::reference::Reference;
use soft_topk::{Backend, Batch, Cotangent, Scale, SoftTopK};

/// f32 against the f64 values of MATH.md §6 (six digits given there).
const PUBLISHED_TOLERANCE: f64 = 2e-6;

/// The value of `const NAME: u32 = VALUEu;` in a WGSL source.
fn wgsl_const(source: &str, name: &str) -> u64 {
    let prefix = format!("const {name}: u32");
    let line = source
        .lines()
        .find(|l| l.trim_start().starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in the source"));
    line.split('=')
        .nth(1)
        .and_then(|v| {
            v.trim()
                .trim_end_matches(';')
                .trim_end_matches('u')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{name} is not a u32 literal: {line}"))
}

/// Every size declared in WGSL and mirrored in Rust agrees.
#[test]
fn sizes_match_the_wgsl_constants() {
    let mirrored: [(&str, &str, u64); 10] = [
        (kernels::COMMON_WGSL, "WG", WORKGROUP_SIZE as u64),
        (kernels::TOPK_WGSL, "PER_THREAD", kernels::PER_THREAD as u64),
        (
            kernels::TOPK_WGSL,
            "ROW_IN_REGISTERS",
            kernels::ROW_IN_REGISTERS as u64,
        ),
        (
            kernels::TOPK_WGSL,
            "MAX_STEPS",
            soft_topk::gpu::TOPK_MAX_STEPS,
        ),
        (kernels::TOPK_WGSL, "LONG_STATE", kernels::LONG_STATE),
        (kernels::TOPK_WGSL, "LONG_PARTIAL", kernels::LONG_PARTIAL),
        (kernels::PLAN_WGSL, "K_MAX", kernels::SORTED_K_MAX as u64),
        (kernels::PLAN_WGSL, "CHUNK", kernels::CHUNK as u64),
        (kernels::PLAN_WGSL, "STATE_STRIDE", kernels::STATE_STRIDE),
        (
            kernels::PLAN_WGSL,
            "PARTIAL_STRIDE",
            kernels::PARTIAL_STRIDE,
        ),
    ];
    for (source, name, rust) in mirrored {
        assert_eq!(
            wgsl_const(source, name),
            rust,
            "WGSL {name} vs its Rust mirror"
        );
    }
    assert_eq!(
        wgsl_const(kernels::TOPK_WGSL, "ROW_IN_REGISTERS"),
        wgsl_const(kernels::COMMON_WGSL, "WG") * wgsl_const(kernels::TOPK_WGSL, "PER_THREAD"),
        "ROW_IN_REGISTERS = WG · PER_THREAD"
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
