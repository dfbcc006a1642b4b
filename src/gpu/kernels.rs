//! The WGSL sources, the one bind group layout, and the compute pipelines, built once per
//! backend.

/// Threads per workgroup of every kernel. Must equal `WG` in shaders/common.wgsl (a test
/// checks the two agree).
pub const WORKGROUP_SIZE: u32 = 256;

/// The largest k of the sorted variant on the GPU: its k×k systems live in workgroup memory.
/// Must equal `K_MAX` in shaders/transport.wgsl and shaders/sorted_backward.wgsl.
pub const SORTED_K_MAX: usize = 32;

/// Shared helpers: workgroup size, row parameters, bindings, σ, sums.
pub const COMMON_WGSL: &str = include_str!("../../shaders/common.wgsl");
/// Top-k: the exact threshold solve and its closed-form backward.
pub const TOPK_WGSL: &str = include_str!("../../shaders/topk.wgsl");

/// Transport: Sinkhorn (top-k and sorted) and dual Newton (sorted). N.B. Experimental: built
/// only when the environment sets `SOFT_TOPK_EXPERIMENTAL_TRANSPORT`. On lavapipe its loop
/// ends early on some n = 1000 rows: llvmpipe gives every invocation a budget of 65535 loop
/// iterations shared by all the loops nested in the Newton loop (gallivm's loop limiter), and
/// one evaluation pass at n = 1000 spends about 7000 of them on the first threads, so after
/// about nine passes the loop is left with no stopping rule having fired.
pub const TRANSPORT_WGSL: &str = include_str!("../../shaders/transport.wgsl");

/// Number of storage bindings in the shared layout (params, valid bits, two inputs, two
/// outputs, report): within the WebGPU default of 8 per stage.
const BINDINGS: u32 = 7;
/// Bindings the kernels write.
const WRITTEN: [u32; 3] = [4, 5, 6];

/// The compute pipelines and their layout.
pub(crate) struct Kernels {
    pub layout: wgpu::BindGroupLayout,
    pub topk_forward: wgpu::ComputePipeline,
    pub topk_backward: wgpu::ComputePipeline,
    /// Built only when `SOFT_TOPK_EXPERIMENTAL_TRANSPORT` is set (see `TRANSPORT_WGSL`).
    pub transport_forward: Option<wgpu::ComputePipeline>,
}

/// A family's full source: the shared helpers first, then the family's file.
pub fn family_source(family: &str) -> String {
    format!("{COMMON_WGSL}\n{family}")
}

impl Kernels {
    pub fn build(device: &wgpu::Device) -> Kernels {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = (0..BINDINGS)
            .map(|binding| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: !WRITTEN.contains(&binding),
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("soft-topk bindings"),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("soft-topk pipeline layout"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });

        let topk = module(device, "soft-topk topk.wgsl", TOPK_WGSL);
        let pipeline = |module: &wgpu::ShaderModule, entry: &str| {
            log::debug!("soft-topk: building pipeline {entry}");
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pipeline_layout),
                module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            })
        };
        let transport = std::env::var_os("SOFT_TOPK_EXPERIMENTAL_TRANSPORT").map(|_| {
            let module = module(device, "soft-topk transport.wgsl", TRANSPORT_WGSL);
            pipeline(&module, "transport_forward")
        });
        Kernels {
            transport_forward: transport,
            topk_forward: pipeline(&topk, "topk_forward"),
            topk_backward: pipeline(&topk, "topk_backward"),
            layout,
        }
    }
}

fn module(device: &wgpu::Device, label: &str, family: &str) -> wgpu::ShaderModule {
    device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(family_source(family).into()),
    })
}
