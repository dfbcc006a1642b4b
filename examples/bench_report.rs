//! The bench report: one JSON line per configuration, for the README's table.
//!
//! ```text
//! cargo run --release --example bench_report               # CPU (and GPU when present)
//! cargo run --release --example bench_report -- --quick    # small sizes only
//! cargo run --release --example bench_report -- --no-gpu --topk  # what benches/compare runs
//! ```
//!
//! Each line: backend, adapter (null on the CPU), variant, solver, rows, n, k, ε, the median
//! seconds of the forward and of forward + backward over warm runs, elements per second
//! (forward + backward), the largest error of the mask against the f64 exact solution, the count
//! of non-finite gradient entries, and on the GPU the forward's GB/s with its ratio to a plain
//! copy kernel timed on the same adapter (the practical ceiling of a memory-bound operator). GPU
//! times include the upload of the scores and the readback of the results.

use std::sync::Arc;

use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use soft_topk::cpu::CpuBackend;
use soft_topk::gpu::GpuBackend;
use soft_topk::reference::Reference;
use soft_topk::{Backend, Batch, Cotangent, SoftTopK, Solver, Variant};

#[path = "support/timing.rs"]
mod timing;

#[derive(Parser)]
struct Args {
    /// Only the two small sizes.
    #[arg(long)]
    quick: bool,
    /// Warm runs per measurement (the median is reported).
    #[arg(long, default_value_t = 7)]
    repeats: usize,
    /// ε of every configuration.
    #[arg(long, default_value_t = 0.01)]
    epsilon: f64,
    /// Skip the GPU backend even when an adapter exists (a software adapter such as llvmpipe
    /// takes minutes and measures nothing the CPU comparison needs).
    #[arg(long)]
    no_gpu: bool,
    /// Only the top-k configurations, no sorted ones.
    #[arg(long)]
    topk: bool,
    /// Only this crate's own solvers, not the paper's 200 sweeps beside them (on llvmpipe the
    /// sweeps at 256 × 4096 take minutes a call).
    #[arg(long)]
    no_paper: bool,
}

struct Config {
    label: &'static str,
    op: SoftTopK,
    rows: usize,
    n: usize,
}

fn configs(args: &Args, gpu: bool) -> Vec<Config> {
    let mut sizes = vec![(1, 1000), (64, 1000)];
    if !args.quick {
        sizes.extend([(256, 4096), (16, 65536)]);
        if gpu {
            sizes.push((4096, 4096));
        }
    }
    let mut list = Vec::new();
    for &(rows, n) in &sizes {
        let k = n / 10;
        list.push(Config {
            label: "exact",
            op: SoftTopK::new(k, args.epsilon),
            rows,
            n,
        });
        if rows * n <= 256 * 4096 && !args.no_paper {
            let paper = SoftTopK::new(k, args.epsilon).solver(Solver::PAPER);
            list.push(Config {
                label: "sinkhorn_200",
                op: paper,
                rows,
                n,
            });
        }
        if rows * n <= 64 * 1000 && !args.topk {
            for k in [4, 16] {
                let sorted = SoftTopK::new(k, args.epsilon).sorted();
                list.push(Config {
                    label: "newton",
                    op: sorted.clone(),
                    rows,
                    n,
                });
                if !args.no_paper {
                    list.push(Config {
                        label: "sinkhorn_200",
                        op: sorted.solver(Solver::PAPER),
                        rows,
                        n,
                    });
                }
            }
        }
    }
    list
}

/// The copy kernel: each invocation moves one vec4 from `src` to `dst`.
const COPY_SHADER: &str = "
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn copy(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x < arrayLength(&src) {
        dst[id.x] = src[id.x];
    }
}
";

/// GB/s of a plain buffer-to-buffer copy kernel (bytes read + bytes written, per second) on
/// the adapter the environment selects: the practical ceiling of a memory-bound operator.
fn copy_bandwidth(repeats: usize) -> Option<f64> {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        // The same choice as the GPU backend's, so both time the same adapter.
        descriptor.backends = wgpu::Backends::PRIMARY;
    }
    let instance = wgpu::Instance::new(descriptor);
    let options = wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::from_env()
            .unwrap_or(wgpu::PowerPreference::HighPerformance),
        ..Default::default()
    };
    let adapter = pollster::block_on(instance.request_adapter(&options)).ok()?;
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default())).ok()?;

    // 64 MiB each way: large enough to leave every cache, within every binding limit.
    let bytes: u64 = 64 << 20;
    let buffer = |label| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let (src, dst) = (buffer("copy source"), buffer("copy destination"));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("copy kernel"),
        source: wgpu::ShaderSource::Wgsl(COPY_SHADER.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("copy pipeline"),
        layout: None,
        module: &module,
        entry_point: Some("copy"),
        compilation_options: wgpu::PipelineCompilationOptions::default(),
        cache: None,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("copy bindings"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: src.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: dst.as_entire_binding(),
            },
        ],
    });
    let workgroups = (bytes / 16).div_ceil(256) as u32;
    let seconds = timing::median_seconds(repeats, || {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(workgroups, 1, 1);
        }
        queue.submit([encoder.finish()]);
        let _ = device.poll(wgpu::PollType::wait_indefinitely());
    });
    Some(2.0 * bytes as f64 / seconds / 1e9)
}

fn main() {
    let args = Args::parse();
    // Each backend with the name of its adapter (none for the CPU).
    let mut backends: Vec<(Arc<dyn Backend>, Option<String>)> =
        vec![(Arc::new(CpuBackend::new()), None)];
    let mut copy_gb_per_s = None;
    let gpu = if args.no_gpu {
        Err("skipped (--no-gpu)".to_string())
    } else {
        GpuBackend::shared().map_err(|e| e.to_string())
    };
    match gpu {
        Ok(gpu) => {
            copy_gb_per_s = copy_bandwidth(args.repeats);
            eprintln!("{}: copy kernel {:?} GB/s", gpu.name(), copy_gb_per_s);
            let adapter = gpu.adapter_info().name.clone();
            backends.push((gpu, Some(adapter)));
        }
        Err(e) => eprintln!("no GPU: {e}"),
    }
    let gpu_present = backends.len() > 1;
    let mut rng = ChaCha8Rng::seed_from_u64(2020);
    for config in configs(&args, gpu_present) {
        let Config { label, op, rows, n } = config;
        let x: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>()).collect();
        let g: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let batch = Batch::new(&x, rows, n).expect("batch");
        // The f64 reference with its default solver (exact top-k, Newton to 1e-12 for sorted):
        // the solution itself, whatever solver the configuration times.
        let exact_op = op.clone().solver(Solver::Auto);
        let exact = Reference
            .forward(&exact_op, &batch)
            .expect("reference forward");
        for (backend, adapter) in &backends {
            let forward = || backend.forward(&op, &batch).expect("forward");
            let fwd_s = timing::median_seconds(args.repeats, || drop(forward()));
            let fwd_bwd_s = timing::median_seconds(args.repeats, || {
                let out = forward();
                drop(
                    backend
                        .backward(&op, &batch, &out, Cotangent::Mask(&g))
                        .expect("backward"),
                );
            });
            let out = forward();
            let grad = backend
                .backward(&op, &batch, &out, Cotangent::Mask(&g))
                .expect("bwd");
            let mask_error = out
                .mask
                .iter()
                .zip(&exact.mask)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let reports = &out.reports;
            // The forward reads each score and writes each mask entry once: 8 bytes an element.
            let gb_per_s = 8.0 * (rows * n) as f64 / fwd_s / 1e9;
            let is_gpu = adapter.is_some();
            let line = json!({
                "backend": backend.name(),
                "adapter": adapter,
                "variant": if op.variant == Variant::Sorted { "sorted" } else { "topk" },
                "solver": label,
                "rows": rows,
                "n": n,
                "k": op.k_of(0),
                "epsilon": op.epsilon,
                "forward_s": fwd_s,
                "forward_backward_s": fwd_bwd_s,
                "elements_per_s": (rows * n) as f64 / fwd_bwd_s,
                "max_mask_error": mask_error,
                "non_finite_grad": grad.iter().filter(|v| !v.is_finite()).count(),
                "converged_rows": reports.iter().filter(|r| r.converged).count(),
                "max_iterations": reports.iter().map(|r| r.iterations).max(),
                "max_marginal_error": reports.iter().map(|r| r.marginal_error).fold(0.0, f64::max),
                "gb_per_s": is_gpu.then_some(gb_per_s),
                "copy_gb_per_s": if is_gpu { copy_gb_per_s } else { None },
                "fraction_of_copy": copy_gb_per_s.filter(|_| is_gpu).map(|c| gb_per_s / c),
            });
            println!("{line}");
        }
    }
}
