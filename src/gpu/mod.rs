//! The GPU backend: WGSL compute kernels through wgpu (Vulkan, Metal, DX12, GL).
//!
//! - `context`: adapter choice (honouring `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`,
//!   `WGPU_POWER_PREF`), error scopes around every submission, device loss, the buffer pool.
//! - [`kernels`]: the WGSL sources (`shaders/`), the bind group layout and the pipelines,
//!   built once per backend.
//! - `rows`: per-row checks and parameters, validity bits, the split into parts.
//!
//! - `resident`: one part of a batch bound on the device for a sequence of dispatches.
//! - `transport`, `sorted_backward`: the host side of the chunked kernels.
//!
//! The exact top-k runs one workgroup per row in one dispatch for rows up to
//! [`kernels::ROW_IN_REGISTERS`] scores, and longer rows as a chunked root search, a chunk
//! kernel and a row kernel per step (shaders/topk.wgsl). The transport solve (top-k
//! Sinkhorn, the sorted forward by dual Newton or Sinkhorn) and the sorted backward cut each
//! row into chunks and run as sequences of short dispatches (shaders/plan.wgsl says why). A
//! batch whose buffers exceed the device's storage-binding size, buffer size or dispatch
//! limits is split by rows into parts run one after another.
//!
//! What runs here: everything, forward and backward, for the sorted variant with k up to
//! [`SORTED_K_MAX`] (its k×k systems live in workgroup memory). Handed to the CPU backend
//! through the same calls (said once in the log): the sorted variant with a larger k, and rows
//! f32 cannot carry (ε so small that 2/(s·ε) leaves f32's range, say), which go to the f64
//! reference as on the CPU backend. [`GpuBackend::with_cpu_fallback`] turns the large-k
//! hand-off into an error.

mod context;
pub mod kernels;
mod resident;
mod rows;
mod sorted_backward;
mod transport;

use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Once, OnceLock};

use context::Context;
use kernels::{
    long_chunks, long_work_bytes_per_row, work_bytes_per_row, Kernels, ROW_IN_REGISTERS,
};
pub use kernels::{SORTED_K_MAX, WORKGROUP_SIZE};
use resident::{Resident, OUT_A, REPORT};
use rows::{Pass, Prepared, RowParams, MODE_SOLVE};
pub use rows::{GPU_AUTO_RANGE_ROUNDINGS, GPU_AUTO_TOLERANCE};

use crate::cpu::CpuBackend;
use crate::error::{Error, GpuErrorKind, Result};
use crate::op::{Solver, Variant, K};
use crate::output::RowReport;
use crate::{check_backward_args, Backend, Batch, Cotangent, Forward, SoftTopK};

/// The operator on a GPU adapter through wgpu.
///
/// Pipelines are built once; buffers are pooled and reused between calls. The backend is
/// `Send + Sync`: threads may share one value (each call owns its buffers, and wgpu's error
/// scopes are per thread). After a device loss every call returns
/// [`crate::GpuErrorKind::DeviceLost`] and [`GpuBackend::needs_rebuild`] says so.
pub struct GpuBackend {
    ctx: Context,
    kernels: Kernels,
    /// Test hook: a smaller per-binding byte limit, to split batches on any device.
    part_limit: Option<u64>,
    /// Whether work the kernels cannot do goes to the CPU backend (else it is an error).
    cpu_fallback: bool,
}

/// The limits that decide how a batch is split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuLimits {
    /// Largest storage binding in bytes (128 MiB on lavapipe).
    pub max_storage_binding: u64,
    /// Largest buffer in bytes.
    pub max_buffer: u64,
    /// Largest dispatch along x: at most this many rows per part.
    pub max_workgroups_per_dimension: u32,
    /// Workgroup memory in bytes.
    pub max_workgroup_storage: u32,
}

static SHARED: OnceLock<std::result::Result<Arc<GpuBackend>, Error>> = OnceLock::new();

impl GpuBackend {
    /// Opens the adapter the environment asks for, or the default one (blocking).
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// Opens the adapter and builds the pipelines.
    pub async fn new_async() -> Result<Self> {
        let ctx = Context::open().await?;
        // naga reports some shader bugs by panicking; a broken pipeline build is an error of
        // this backend, not a reason to take the caller's thread down.
        let kernels = {
            let device = &ctx.device;
            let build = || std::panic::catch_unwind(AssertUnwindSafe(|| Kernels::build(device)));
            ctx.scoped(build)?.map_err(|panic| Error::Gpu {
                kind: GpuErrorKind::Internal,
                message: format!(
                    "building the pipelines panicked: {}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)")
                ),
            })?
        };
        Ok(GpuBackend {
            ctx,
            kernels,
            part_limit: None,
            cpu_fallback: true,
        })
    }

    /// The process-wide backend, created on first use. A failure is remembered too, so a
    /// machine without an adapter does not search again on every call.
    pub fn shared() -> Result<Arc<GpuBackend>> {
        SHARED
            .get_or_init(|| GpuBackend::new().map(Arc::new))
            .clone()
    }

    /// The adapter in use.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.info
    }

    /// The device limits that decide how batches are split.
    pub fn limits(&self) -> GpuLimits {
        let l = &self.ctx.limits;
        GpuLimits {
            max_storage_binding: l.max_storage_buffer_binding_size,
            max_buffer: l.max_buffer_size,
            max_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
            max_workgroup_storage: l.max_compute_workgroup_storage_size,
        }
    }

    /// Whether the device is lost: this value then only returns errors; make a new one.
    pub fn needs_rebuild(&self) -> bool {
        self.ctx.lost().is_some()
    }

    /// Lowers the per-binding byte limit used to split batches (for tests of the split on
    /// devices with large bindings). `None` restores the device's limit.
    pub fn with_part_limit(mut self, bytes: Option<u64>) -> Self {
        self.part_limit = bytes;
        self
    }

    /// With `false`, a call the GPU kernels cannot answer (see the module notes) fails with
    /// [`Error::InvalidOption`] instead of running on the CPU backend: proof, for tests and
    /// for callers who care, that an answer came from the GPU.
    pub fn with_cpu_fallback(mut self, allowed: bool) -> Self {
        self.cpu_fallback = allowed;
        self
    }

    /// Whether this backend's own kernels answer a forward of `op` over `rows` rows (else it
    /// is handed to the CPU backend, or refused without the fallback).
    pub fn runs_forward_on_gpu(&self, op: &SoftTopK, rows: usize) -> bool {
        let exact =
            op.variant == Variant::TopK && matches!(op.solver, Solver::Auto | Solver::Exact);
        let transport = op.variant == Variant::TopK || op.k_max(rows) <= SORTED_K_MAX;
        exact || transport
    }

    /// Whether this backend's own kernels answer a backward of `op` with `cotangent`: the
    /// top-k with a mask cotangent, and the sorted variant (either cotangent) when no row's k
    /// passes [`SORTED_K_MAX`].
    pub fn runs_backward_on_gpu(&self, op: &SoftTopK, cotangent: &Cotangent) -> bool {
        match op.variant {
            Variant::TopK => matches!(cotangent, Cotangent::Mask(_)),
            // Every row's k: a checked per-row list has exactly one per row.
            Variant::Sorted => op.k_max(usize::MAX) <= SORTED_K_MAX,
        }
    }

    /// The CPU hand-off, or its refusal when the fallback is off.
    fn fallback_allowed(&self, what: &str) -> Result<()> {
        if self.cpu_fallback {
            cpu_fallback_notice();
            Ok(())
        } else {
            Err(Error::InvalidOption(format!(
                "the GPU kernels do not run {what}, and the CPU fallback is off"
            )))
        }
    }

    /// The bytes one binding may hold: the device's storage-binding and buffer limits.
    fn binding_limit(&self) -> u64 {
        let l = self.limits();
        let device = l.max_storage_binding.min(l.max_buffer);
        self.part_limit.map_or(device, |p| p.min(device))
    }

    /// How many rows of length `n` one dispatch takes, for the given variant and rank slots.
    /// `Err(TooLarge)` when a single row does not fit one binding.
    pub fn max_rows_per_part(&self, n: usize, variant: Variant, k_max: usize) -> Result<usize> {
        // The largest per-row binding: the ranks (k_max × n) or the solver's scratch for
        // sorted, else one row.
        let row_bytes = match variant {
            Variant::Sorted => (n as u64 * 4 * k_max.max(1) as u64).max(work_bytes_per_row(n)),
            Variant::TopK => n as u64 * 4,
        };
        self.rows_per_part(n, row_bytes)
    }

    /// Rows per part when each takes `row_bytes` of its largest binding; `Err(TooLarge)` when
    /// one row does not fit.
    fn rows_per_part(&self, n: usize, row_bytes: u64) -> Result<usize> {
        let groups = self.ctx.limits.max_compute_workgroups_per_dimension;
        rows::rows_per_part(n, row_bytes, self.binding_limit(), groups)
    }

    fn split(
        &self,
        rows: usize,
        n: usize,
        variant: Variant,
        k_max: usize,
    ) -> Result<Vec<Range<usize>>> {
        let per_part = self.max_rows_per_part(n, variant, k_max)?;
        Ok(rows::parts(rows, per_part))
    }

    /// The exact top-k of a batch: one dispatch per part for rows that fit registers, a
    /// chunked root search for longer rows (shaders/topk.wgsl).
    fn topk_exact_forward(&self, op: &SoftTopK, batch: &Batch) -> Result<Forward> {
        let (rows, n) = (batch.rows(), batch.n());
        let mut prepared = rows::prepare(op, batch, 0, Pass::Forward);
        let on_host = host_rows(op, &mut prepared);
        let mut fwd = Forward::zeros(rows, n, 0, false);
        for part in self.topk_parts(rows, n)? {
            let count = part.len();
            let scores = &batch.scores()[part.start * n..part.end * n];
            let resident = Resident::new(
                &self.ctx,
                &self.kernels.layout,
                [
                    bytemuck::cast_slice(&prepared.params[part.clone()]),
                    bytemuck::cast_slice(part_bits(&prepared, &part)),
                    bytemuck::cast_slice(scores),
                    &[],
                ],
                [
                    (count * n * 4) as u64,
                    0,
                    (count * 16) as u64,
                    topk_work_bytes(count, n),
                ],
            )?;
            let k = &self.kernels;
            let each = count as u32;
            if n <= ROW_IN_REGISTERS {
                resident.run(&[(&k.topk_forward, (each, 1))])?;
            } else {
                let chunks = (long_chunks(n), each);
                resident.run_until_settled(
                    &[(&k.topk_long_start, (1, each))],
                    &[(&k.topk_long_pass, chunks), (&k.topk_long_step, (1, each))],
                    count,
                    TOPK_MAX_STEPS,
                )?;
                resident.run(&[(&k.topk_long_finish, chunks)])?;
            }
            let [mask, report] = resident.read([
                (OUT_A, (count * n * 4) as u64),
                (REPORT, (count * 16) as u64),
            ])?;
            fwd.mask[part.start * n..part.end * n].copy_from_slice(bytemuck::cast_slice(&mask));
            for (i, r) in part.clone().enumerate() {
                let mut rep = prepared.reports[r].clone();
                if prepared.params[r].mode == MODE_SOLVE {
                    rep.iterations = report[i * 4];
                    rep.converged = report[i * 4 + 1] == 1;
                    let sum: f64 = fwd.mask_row(r).iter().map(|&a| a as f64).sum();
                    rep.marginal_error = (sum - rep.k as f64).abs();
                }
                fwd.reports.push(rep);
            }
        }
        forward_on_host(op, batch, &on_host, &mut fwd)?;
        Ok(fwd)
    }

    /// The closed-form top-k backward: one workgroup per row that fits registers, two chunked
    /// dispatches for longer rows.
    fn topk_backward(
        &self,
        op: &SoftTopK,
        batch: &Batch,
        forward: &Forward,
        g: &[f32],
    ) -> Result<Vec<f32>> {
        let (rows, n) = (batch.rows(), batch.n());
        let pass = Pass::Backward {
            ranks_cotangent: false,
        };
        let mut prepared = rows::prepare(op, batch, 0, pass);
        let on_host = host_rows(op, &mut prepared);
        let mut grad = vec![0.0f32; rows * n];
        for part in self.topk_parts(rows, n)? {
            let count = part.len();
            let span = part.start * n..part.end * n;
            let resident = Resident::new(
                &self.ctx,
                &self.kernels.layout,
                [
                    bytemuck::cast_slice(&prepared.params[part.clone()]),
                    bytemuck::cast_slice(part_bits(&prepared, &part)),
                    bytemuck::cast_slice(&forward.mask[span.clone()]),
                    bytemuck::cast_slice(&g[span.clone()]),
                ],
                [(count * n * 4) as u64, 0, 0, topk_work_bytes(count, n)],
            )?;
            let k = &self.kernels;
            let each = count as u32;
            if n <= ROW_IN_REGISTERS {
                resident.run(&[(&k.topk_backward, (each, 1))])?;
            } else {
                let chunks = (long_chunks(n), each);
                resident.run(&[
                    (&k.topk_long_backward_pass, chunks),
                    (&k.topk_long_backward_finish, chunks),
                ])?;
            }
            let [out] = resident.read([(OUT_A, (count * n * 4) as u64)])?;
            grad[span].copy_from_slice(bytemuck::cast_slice(&out));
        }
        for r in on_host {
            let span = r * n..(r + 1) * n;
            let mut one = Forward::zeros(1, n, 0, false);
            one.mask.copy_from_slice(&forward.mask[span.clone()]);
            let cot = Cotangent::Mask(&g[span.clone()]);
            let row_grad =
                CpuBackend::new().backward(&row_op(op, r), &row_batch(batch, r)?, &one, cot)?;
            grad[span].copy_from_slice(&row_grad);
        }
        Ok(grad)
    }

    /// The parts of a top-k batch; `Err(TooLarge)` when a row needs more chunks than one
    /// dispatch takes.
    fn topk_parts(&self, rows: usize, n: usize) -> Result<Vec<Range<usize>>> {
        let groups = self.ctx.limits.max_compute_workgroups_per_dimension;
        if n > ROW_IN_REGISTERS && long_chunks(n) > groups {
            return Err(Error::TooLarge(format!(
                "a row of n = {n} needs {} workgroups in one dispatch; the device allows {groups}",
                long_chunks(n)
            )));
        }
        self.split(rows, n, Variant::TopK, 0)
    }
}

/// Root-search evaluations after which the host stops waiting for a long top-k row: the
/// kernels give up after `MAX_STEPS` in shaders/topk.wgsl, which this must equal.
pub const TOPK_MAX_STEPS: u64 = 200;

/// The `work` scratch of `count` top-k rows of length n: only long rows use it.
fn topk_work_bytes(count: usize, n: usize) -> u64 {
    if n > ROW_IN_REGISTERS {
        count as u64 * long_work_bytes_per_row(n)
    } else {
        0
    }
}

/// Rows the f32 kernels cannot carry (ε = 1e-30 on scores near 1, say: see
/// `cpu::topk::f32_bracket`). The GPU sees them as rows of zeros; the CPU backend answers them,
/// handing them on to the f64 reference as it does its own.
fn host_rows(op: &SoftTopK, prepared: &mut rows::Prepared) -> Vec<usize> {
    let mut on_host = Vec::new();
    for (r, (params, spec)) in prepared.params.iter_mut().zip(&prepared.specs).enumerate() {
        let Some(spec) = spec else { continue };
        if params.mode != MODE_SOLVE {
            continue;
        }
        let (x_min, x_max) = match op.direction {
            crate::Direction::Largest => (spec.x_min, spec.x_max),
            crate::Direction::Smallest => (-spec.x_max, -spec.x_min),
        };
        let t = spec.scale * op.epsilon / 2.0;
        if crate::cpu::topk::f32_bracket(x_min, x_max, spec.n_valid, spec.k, t).is_none() {
            params.mode = rows::MODE_ZEROS;
            on_host.push(r);
        }
    }
    on_host
}

/// Answers rows `on_host` of a forward on the CPU backend, into `fwd` (mask, ranks, report).
fn forward_on_host(
    op: &SoftTopK,
    batch: &Batch,
    on_host: &[usize],
    fwd: &mut Forward,
) -> Result<()> {
    let (n, k_max) = (batch.n(), fwd.k_max);
    for &r in on_host {
        let out = CpuBackend::new().forward(&row_op(op, r), &row_batch(batch, r)?)?;
        fwd.mask[r * n..(r + 1) * n].copy_from_slice(&out.mask);
        if let (Some(all), Some(mine)) = (fwd.ranks.as_mut(), out.ranks.as_ref()) {
            let slots = out.k_max.min(k_max);
            all[r * k_max * n..(r * k_max + slots) * n].copy_from_slice(&mine[..slots * n]);
        }
        fwd.reports[r] = out.reports[0].clone();
    }
    Ok(())
}

/// Row `r` of a batch as a batch of its own, with its validity.
fn row_batch<'a>(batch: &Batch<'a>, r: usize) -> Result<Batch<'a>> {
    match batch.valid_row(r) {
        Some(v) => Batch::single(batch.row(r))?.with_valid(v),
        None => Batch::single(batch.row(r)),
    }
}

static FALLBACK_NOTICE: Once = Once::new();

/// Says once per process that some calls run on the CPU.
fn cpu_fallback_notice() {
    FALLBACK_NOTICE.call_once(|| {
        log::warn!(
            "soft-topk: the sorted variant with k above {SORTED_K_MAX} runs on the CPU \
             backend (the GPU's k×k systems live in workgroup memory)"
        )
    });
}

/// The op of row `r` alone: per-row k becomes that row's k.
fn row_op(op: &SoftTopK, r: usize) -> SoftTopK {
    SoftTopK {
        k: K::All(op.k_of(r)),
        ..op.clone()
    }
}

/// The validity bits of a part's rows.
fn part_bits<'a>(prepared: &'a Prepared, part: &Range<usize>) -> &'a [u32] {
    &prepared.bits[part.start * prepared.words..part.end * prepared.words]
}

impl Backend for GpuBackend {
    fn name(&self) -> String {
        format!("gpu ({}, {:?})", self.ctx.info.name, self.ctx.info.backend)
    }

    fn forward(&self, op: &SoftTopK, batch: &Batch) -> Result<Forward> {
        op.check(batch.rows())?;
        self.ctx.check_alive()?;
        match (op.variant, op.solver) {
            (Variant::TopK, Solver::Auto | Solver::Exact) => self.topk_exact_forward(op, batch),
            _ if self.runs_forward_on_gpu(op, batch.rows()) => self.transport_forward(op, batch),
            _ => {
                self.fallback_allowed("this solver and variant (see the module notes)")?;
                CpuBackend::new().forward(op, batch)
            }
        }
    }

    fn backward(
        &self,
        op: &SoftTopK,
        batch: &Batch,
        forward: &Forward,
        cotangent: Cotangent,
    ) -> Result<Vec<f32>> {
        check_backward_args(op, batch, forward, cotangent)?;
        self.ctx.check_alive()?;
        match (op.variant, cotangent) {
            (Variant::TopK, Cotangent::Mask(g)) => self.topk_backward(op, batch, forward, g),
            (Variant::Sorted, _) if self.runs_backward_on_gpu(op, &cotangent) => {
                self.sorted_backward(op, batch, forward, cotangent)
            }
            _ => {
                self.fallback_allowed("this backward (see the module notes)")?;
                CpuBackend::new().backward(op, batch, forward, cotangent)
            }
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<GpuBackend>();
    let _ = RowReport::exact;
    let _ = std::mem::size_of::<RowParams>();
}
