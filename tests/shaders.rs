//! The WGSL families on their own, without a device: each validates with naga (the compiler
//! wgpu itself uses), and no entry point needs more workgroup memory than every WebGPU adapter
//! must offer. Lavapipe offers more than that and the limit is not checked when a pipeline is
//! built there, so a kernel over it would pass every other test here and fail on a real GPU.

use naga::valid::{Capabilities, GlobalUse, ValidationFlags, Validator};
use naga::AddressSpace;
use soft_topk::gpu::kernels::{
    family_source, COMMON_WGSL, PLAN_WGSL, SORTED_BACKWARD_WGSL, TOPK_WGSL, TRANSPORT_WGSL,
};

/// WebGPU's guaranteed `maxComputeWorkgroupStorageSize`: 16 KiB.
const WEBGPU_WORKGROUP_STORAGE: u32 = 16_384;

/// Each family as the pipelines build it (the shared helpers first).
fn families() -> [(&'static str, String); 3] {
    [
        ("topk", family_source(&[COMMON_WGSL, TOPK_WGSL])),
        (
            "transport",
            family_source(&[COMMON_WGSL, PLAN_WGSL, TRANSPORT_WGSL]),
        ),
        (
            "sorted_backward",
            family_source(&[COMMON_WGSL, PLAN_WGSL, SORTED_BACKWARD_WGSL]),
        ),
    ]
}

#[test]
fn every_entry_point_fits_webgpu_workgroup_memory() {
    for (family, source) in families() {
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{family}: {}", e.emit_to_string(&source)));
        let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{family}: {}", e.emit_to_string(&source)));
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).expect("layout");

        assert!(!module.entry_points.is_empty(), "{family} has entry points");
        for (index, entry) in module.entry_points.iter().enumerate() {
            let uses = info.get_entry_point(index);
            let bytes: u32 = module
                .global_variables
                .iter()
                .filter(|(handle, var)| {
                    var.space == AddressSpace::WorkGroup && uses[*handle] != GlobalUse::empty()
                })
                .map(|(_, var)| layouter[var.ty].size)
                .sum();
            eprintln!(
                "{family}::{}: {bytes} bytes of workgroup memory",
                entry.name
            );
            assert!(
                bytes <= WEBGPU_WORKGROUP_STORAGE,
                "{family}::{} uses {bytes} bytes of workgroup memory; WebGPU guarantees \
                 {WEBGPU_WORKGROUP_STORAGE}",
                entry.name
            );
        }
    }
}
