//! The WGSL sources, the one bind group layout, and the compute pipelines, built once per
//! backend.

/// Threads per workgroup of every kernel. Must equal `WG` in shaders/common.wgsl (a test
/// checks the two agree).
pub const WORKGROUP_SIZE: u32 = 256;

/// The largest k of the sorted variant on the GPU: its k×k systems live in workgroup memory.
/// Must equal `K_MAX` in shaders/plan.wgsl.
pub const SORTED_K_MAX: usize = 32;

/// Shared helpers: workgroup size, row parameters, bindings, σ, sums.
pub const COMMON_WGSL: &str = include_str!("../../shaders/common.wgsl");
/// Top-k: the exact threshold solve and its closed-form backward.
pub const TOPK_WGSL: &str = include_str!("../../shaders/topk.wgsl");

/// Shared by the transport solve and the sorted backward: the k×k systems, the chunked layout
/// of the `work` scratch binding, the Jacobian over a tile of plan rows, the damped solve.
pub const PLAN_WGSL: &str = include_str!("../../shaders/plan.wgsl");
/// Transport: Sinkhorn (top-k and sorted) and dual Newton (sorted), as a sequence of short
/// dispatches driven by src/gpu/transport.rs.
pub const TRANSPORT_WGSL: &str = include_str!("../../shaders/transport.wgsl");
/// The sorted backward (implicit differentiation of the plan), three dispatches driven by
/// src/gpu/sorted_backward.rs.
pub const SORTED_BACKWARD_WGSL: &str = include_str!("../../shaders/sorted_backward.wgsl");

/// Scores each thread of the exact top-k holds in registers. Must equal `PER_THREAD` in
/// shaders/topk.wgsl.
pub const PER_THREAD: u32 = 16;
/// The longest row the exact top-k solves in one workgroup, held in registers; longer rows are
/// cut into chunks of this many scores, one workgroup each. Must equal `ROW_IN_REGISTERS` in
/// shaders/topk.wgsl.
pub const ROW_IN_REGISTERS: usize = (WORKGROUP_SIZE * PER_THREAD) as usize;
/// Floats of search state, and of each chunk's sums, per long row in `work`. Must equal
/// `LONG_STATE` and `LONG_PARTIAL` in shaders/topk.wgsl.
pub const LONG_STATE: u64 = 8;
pub const LONG_PARTIAL: u64 = 4;

/// Chunks of a long top-k row of length n (at least one).
pub fn long_chunks(n: usize) -> u32 {
    n.div_ceil(ROW_IN_REGISTERS).max(1) as u32
}

/// Bytes of `work` one long top-k row of length n needs.
pub fn long_work_bytes_per_row(n: usize) -> u64 {
    4 * (LONG_STATE + long_chunks(n) as u64 * LONG_PARTIAL)
}

/// Scores per workgroup of the chunked kernels. Must equal `CHUNK` in shaders/plan.wgsl.
pub const CHUNK: u32 = 1024;
/// Floats of per-row state at the start of each row's `work`. Must equal `STATE_STRIDE` in
/// shaders/plan.wgsl.
pub const STATE_STRIDE: u64 = 160;
/// Floats of each chunk's partial sums in `work`. Must equal `PARTIAL_STRIDE` in
/// shaders/plan.wgsl.
pub const PARTIAL_STRIDE: u64 = 596;

/// Chunks of a row of length n (at least one).
pub fn chunk_count(n: usize) -> u32 {
    (n.div_ceil(CHUNK as usize).max(1)) as u32
}

/// Bytes of `work` one row of length n needs.
pub fn work_bytes_per_row(n: usize) -> u64 {
    4 * (STATE_STRIDE + chunk_count(n) as u64 * PARTIAL_STRIDE)
}

/// Number of storage bindings in the shared layout (params, valid bits, two inputs, two
/// outputs, report, work): the WebGPU default of 8 per stage, so any adapter takes it.
const BINDINGS: u32 = super::resident::BINDINGS as u32;
/// Bindings from this one on are written by the kernels.
const FIRST_WRITTEN: u32 = super::resident::FIRST_OUTPUT as u32;

/// The compute pipelines and their layout.
pub(crate) struct Kernels {
    pub layout: wgpu::BindGroupLayout,
    pub topk_forward: wgpu::ComputePipeline,
    pub topk_backward: wgpu::ComputePipeline,
    /// The exact top-k of rows longer than [`ROW_IN_REGISTERS`], in the order the host
    /// records them: start, then (pass, step) per root-search step, then finish; the backward
    /// as pass, finish.
    pub topk_long_start: wgpu::ComputePipeline,
    pub topk_long_pass: wgpu::ComputePipeline,
    pub topk_long_step: wgpu::ComputePipeline,
    pub topk_long_finish: wgpu::ComputePipeline,
    pub topk_long_backward_pass: wgpu::ComputePipeline,
    pub topk_long_backward_finish: wgpu::ComputePipeline,
    /// The transport solve's dispatches, in the order the host records them.
    pub transport_init: wgpu::ComputePipeline,
    pub transport_start: wgpu::ComputePipeline,
    pub transport_pass: wgpu::ComputePipeline,
    pub transport_step: wgpu::ComputePipeline,
    pub transport_finish: wgpu::ComputePipeline,
    /// The sorted backward's dispatches, in order.
    pub sorted_backward_pass: wgpu::ComputePipeline,
    pub sorted_backward_solve: wgpu::ComputePipeline,
    pub sorted_backward_finish: wgpu::ComputePipeline,
}

/// A family's full source: its files joined in order (the shared helpers first).
pub fn family_source(files: &[&str]) -> String {
    files.join("\n")
}

impl Kernels {
    pub fn build(device: &wgpu::Device) -> Kernels {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = (0..BINDINGS)
            .map(|binding| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: binding < FIRST_WRITTEN,
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

        let topk = module(device, "soft-topk topk.wgsl", &[COMMON_WGSL, TOPK_WGSL]);
        let transport = module(
            device,
            "soft-topk transport.wgsl",
            &[COMMON_WGSL, PLAN_WGSL, TRANSPORT_WGSL],
        );
        let sorted_backward = module(
            device,
            "soft-topk sorted_backward.wgsl",
            &[COMMON_WGSL, PLAN_WGSL, SORTED_BACKWARD_WGSL],
        );
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
        Kernels {
            transport_init: pipeline(&transport, "transport_init"),
            transport_start: pipeline(&transport, "transport_start"),
            transport_pass: pipeline(&transport, "transport_pass"),
            transport_step: pipeline(&transport, "transport_step"),
            transport_finish: pipeline(&transport, "transport_finish"),
            sorted_backward_pass: pipeline(&sorted_backward, "sorted_backward_pass"),
            sorted_backward_solve: pipeline(&sorted_backward, "sorted_backward_solve"),
            sorted_backward_finish: pipeline(&sorted_backward, "sorted_backward_finish"),
            topk_forward: pipeline(&topk, "topk_forward"),
            topk_backward: pipeline(&topk, "topk_backward"),
            topk_long_start: pipeline(&topk, "topk_long_start"),
            topk_long_pass: pipeline(&topk, "topk_long_pass"),
            topk_long_step: pipeline(&topk, "topk_long_step"),
            topk_long_finish: pipeline(&topk, "topk_long_finish"),
            topk_long_backward_pass: pipeline(&topk, "topk_long_backward_pass"),
            topk_long_backward_finish: pipeline(&topk, "topk_long_backward_finish"),
            layout,
        }
    }
}

fn module(device: &wgpu::Device, label: &str, files: &[&str]) -> wgpu::ShaderModule {
    device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(family_source(files).into()),
    })
}
