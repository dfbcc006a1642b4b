//! One part of a batch resident on the device: its buffers bound once, then any number of
//! submissions of dispatches over them, and read-backs of the outputs between submissions.
//!
//! The exact top-k of short rows needs one dispatch; that of long rows, the transport solve and
//! the sorted backward are sequences of short dispatches (see shaders/topk.wgsl and
//! shaders/plan.wgsl), the solves recorded a block at a time with a read-back of the row
//! reports between blocks to learn whether any row still runs.

use super::context::{BufferUse, Context, Pooled};
use crate::error::Result;

/// The bindings of the shared layout: params, validity bits, two inputs, two outputs, the row
/// reports and the kernels' scratch (`work`). Must match shaders/common.wgsl and the layout in
/// src/gpu/kernels.rs.
pub const BINDINGS: usize = 8;
/// The first binding the kernels write.
pub const FIRST_OUTPUT: usize = 4;
/// The outputs by binding: out_a, out_b, report (then `work`, which stays on the device).
pub const OUT_A: usize = 4;
pub const OUT_B: usize = 5;
pub const REPORT: usize = 6;

/// A grid of workgroups for one dispatch: (x, y), z = 1.
pub type Grid = (u32, u32);

/// A pipeline and the grid it is dispatched over.
pub type Dispatch<'p> = (&'p wgpu::ComputePipeline, Grid);

/// Evaluations (one round of a solve's step dispatches) recorded in the first submission of
/// [`Resident::run_until_settled`]; later ones double up to [`MAX_BLOCK`]. A Newton solve
/// typically ends within the first block, and the paper's 200 Sinkhorn sweeps take a handful
/// of read-backs instead of 200.
const FIRST_BLOCK: u32 = 8;
const MAX_BLOCK: u32 = 64;

/// Buffers on loan from the pool, bound as one bind group; returned to the pool on drop.
pub(crate) struct Resident<'a> {
    ctx: &'a Context,
    buffers: Vec<Pooled>,
    /// The bytes each binding covers (at least 4).
    sizes: [u64; BINDINGS],
    bind_group: wgpu::BindGroup,
}

fn bound_size(bytes: u64) -> u64 {
    bytes.max(4)
}

impl<'a> Resident<'a> {
    /// Uploads `inputs` (params, validity bits, in_a, in_b) and sets aside outputs of the given
    /// byte sizes (out_a, out_b, report, work).
    pub fn new(
        ctx: &'a Context,
        layout: &wgpu::BindGroupLayout,
        inputs: [&[u8]; 4],
        outputs: [u64; 4],
    ) -> Result<Self> {
        let mut sizes = [0u64; BINDINGS];
        let mut buffers = Vec::with_capacity(BINDINGS);
        for (i, data) in inputs.iter().enumerate() {
            sizes[i] = bound_size(data.len() as u64);
            buffers.push(ctx.take(BufferUse::Input, sizes[i]));
        }
        for (i, &bytes) in outputs.iter().enumerate() {
            sizes[FIRST_OUTPUT + i] = bound_size(bytes);
            buffers.push(ctx.take(BufferUse::Output, sizes[FIRST_OUTPUT + i]));
        }
        let bound = ctx.scoped(|| {
            for (pooled, data) in buffers.iter().zip(inputs) {
                if !data.is_empty() {
                    ctx.queue.write_buffer(&pooled.buffer, 0, data);
                }
            }
            let entries: Vec<wgpu::BindGroupEntry> = buffers
                .iter()
                .zip(sizes)
                .enumerate()
                .map(|(i, (pooled, bytes))| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &pooled.buffer,
                        offset: 0,
                        size: wgpu::BufferSize::new(bytes),
                    }),
                })
                .collect();
            ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("soft-topk bind group"),
                layout,
                entries: &entries,
            })
        });
        match bound {
            Ok(bind_group) => Ok(Resident {
                ctx,
                buffers,
                sizes,
                bind_group,
            }),
            Err(e) => {
                ctx.give_back(buffers);
                Err(e)
            }
        }
    }

    /// Records the dispatches in order in one compute pass and submits them. Later dispatches
    /// see what earlier ones wrote (WebGPU orders storage accesses between dispatches).
    pub fn run(&self, dispatches: &[Dispatch]) -> Result<()> {
        let ctx = self.ctx;
        ctx.scoped(|| {
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("soft-topk encoder"),
                });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("soft-topk pass"),
                    timestamp_writes: None,
                });
                pass.set_bind_group(0, &self.bind_group, &[]);
                for &(pipeline, (x, y)) in dispatches {
                    if x == 0 || y == 0 {
                        continue;
                    }
                    pass.set_pipeline(pipeline);
                    pass.dispatch_workgroups(x, y, 1);
                }
            }
            log::trace!("soft-topk: {} dispatches", dispatches.len());
            ctx.queue.submit([encoder.finish()]);
        })
    }

    /// Submits `first`, then `step` (the dispatches of one evaluation of every running row) a
    /// block at a time, reading the rows' running flags (word 3 of each of the `rows` reports)
    /// back between blocks, until no row runs or `cap` evaluations are spent. The kernels
    /// leave a finished row alone, so a block may overshoot. Returns the evaluations recorded.
    pub fn run_until_settled(
        &self,
        first: &[Dispatch],
        step: &[Dispatch],
        rows: usize,
        cap: u64,
    ) -> Result<u64> {
        let report_bytes = (rows * 16) as u64;
        let mut work = first.to_vec();
        let (mut done, mut block) = (0u64, FIRST_BLOCK);
        loop {
            for _ in 0..block {
                work.extend_from_slice(step);
            }
            self.run(&work)?;
            work.clear();
            done += block as u64;
            let [report] = self.read([(REPORT, report_bytes)])?;
            let running = report.chunks_exact(4).filter(|r| r[3] != 0).count();
            log::trace!("soft-topk: {running} rows still running after {done} evaluations");
            if running == 0 || done >= cap {
                return Ok(done);
            }
            block = (block * 2).min(MAX_BLOCK);
        }
    }

    /// Waits for the submitted work and reads back the first `bytes[i]` bytes of each output
    /// binding `which[i]` (`OUT_A`, `OUT_B` or `REPORT`), as 4-byte words (every output is
    /// f32 or u32; words keep the casts aligned, even for an empty output).
    pub fn read<const N: usize>(&self, which: [(usize, u64); N]) -> Result<[Vec<u32>; N]> {
        let ctx = self.ctx;
        // Each output lands in the staging buffer at an 8-byte aligned offset.
        let offsets: Vec<u64> = which
            .iter()
            .scan(0u64, |at, &(_, bytes)| {
                let here = *at;
                *at += bound_size(bytes).next_multiple_of(8);
                Some(here)
            })
            .collect();
        let total = which
            .iter()
            .map(|&(_, bytes)| bound_size(bytes).next_multiple_of(8))
            .sum::<u64>()
            .max(8);
        let staging = ctx.take(BufferUse::Staging, total);
        let copied = ctx.scoped(|| {
            let mut encoder = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("soft-topk read-back"),
                });
            for (&(binding, bytes), &at) in which.iter().zip(&offsets) {
                let bytes = bytes.min(self.sizes[binding]);
                if bytes > 0 {
                    let source = &self.buffers[binding].buffer;
                    encoder.copy_buffer_to_buffer(source, 0, &staging.buffer, at, bytes);
                }
            }
            ctx.queue.submit([encoder.finish()]);
        });
        let result = copied.and_then(|()| ctx.read_back(&staging.buffer, total));
        ctx.give_back([staging]);
        let bytes = result?;
        Ok(std::array::from_fn(|i| {
            let (at, len) = (offsets[i] as usize, which[i].1 as usize);
            bytemuck::pod_collect_to_vec(&bytes[at..at + len])
        }))
    }
}

impl Drop for Resident<'_> {
    fn drop(&mut self) {
        self.ctx.give_back(std::mem::take(&mut self.buffers));
    }
}
