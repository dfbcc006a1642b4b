//! The transport solve on the device: Sinkhorn (top-k and sorted) and dual Newton (sorted), a
//! sequence of short dispatches over one resident part of the batch. shaders/plan.wgsl says
//! why a solve is cut up; shaders/transport.wgsl lists the dispatches.

use super::kernels::{chunk_count, work_bytes_per_row};
use super::resident::{Resident, OUT_A, OUT_B, REPORT};
use super::rows::{self, Pass, Prepared, GPU_AUTO_RANGE_ROUNDINGS, MODE_SOLVE, MODE_ZEROS};
use super::{forward_on_host, part_bits, GpuBackend, SORTED_K_MAX};
use crate::error::{Error, Result};
use crate::op::{Solver, Variant};
use crate::{Batch, Forward, SoftTopK};

/// Evaluations one Newton step may take: its trials (the line search halves a step up to 30
/// times, `LINE_SEARCH_STEPS` in shaders/transport.wgsl), the fallback's measurement, slack.
const EVALUATIONS_PER_STEP: u64 = 32;

impl GpuBackend {
    /// Sinkhorn (top-k or sorted) or dual Newton (sorted) for k up to [`SORTED_K_MAX`].
    pub(super) fn transport_forward(&self, op: &SoftTopK, batch: &Batch) -> Result<Forward> {
        let (rows, n) = (batch.rows(), batch.n());
        let sorted = op.variant == Variant::Sorted;
        let k_max = if sorted { op.rank_slots(rows, n) } else { 0 };
        if k_max > SORTED_K_MAX {
            return Err(Error::InvalidOption(format!(
                "the GPU's sorted variant takes k up to {SORTED_K_MAX} (its k×k systems live \
                 in workgroup memory); k = {k_max} needs the CPU backend"
            )));
        }
        let groups = self.ctx.limits.max_compute_workgroups_per_dimension;
        if chunk_count(n) > groups {
            return Err(Error::TooLarge(format!(
                "a row of n = {n} needs {} workgroups in one dispatch; the device allows {groups}",
                chunk_count(n)
            )));
        }
        let mut prepared = rows::prepare(op, batch, k_max, Pass::Forward);
        let on_host = centre_rows(op, batch, &mut prepared);
        let mut fwd = Forward::zeros(rows, n, k_max, sorted);
        let row_bytes = (n as u64 * 4 * k_max.max(1) as u64).max(work_bytes_per_row(n));
        for part in rows::parts(rows, self.rows_per_part(n, row_bytes)?) {
            let count = part.len();
            let scores = &batch.scores()[part.start * n..part.end * n];
            let report_bytes = (count * 16) as u64;
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
                    (count * k_max * n * 4) as u64,
                    report_bytes,
                    count as u64 * work_bytes_per_row(n),
                ],
            )?;
            let k = &self.kernels;
            let chunks = (chunk_count(n), count as u32);
            let each_row = (1, count as u32);
            let most_steps = prepared.params[part.clone()]
                .iter()
                .filter(|p| p.mode == MODE_SOLVE)
                .map(|p| p.max_iterations)
                .max()
                .unwrap_or(0);
            let cap = (most_steps as u64 + 1) * EVALUATIONS_PER_STEP;

            resident.run_until_settled(
                &[(&k.transport_init, chunks), (&k.transport_start, each_row)],
                &[(&k.transport_pass, chunks), (&k.transport_step, each_row)],
                count,
                cap,
            )?;
            resident.run(&[(&k.transport_finish, chunks)])?;
            let [mask, ranks, report] = resident.read([
                (OUT_A, (count * n * 4) as u64),
                (OUT_B, (count * k_max * n * 4) as u64),
                (REPORT, report_bytes),
            ])?;

            fwd.mask[part.start * n..part.end * n].copy_from_slice(bytemuck::cast_slice(&mask));
            if let Some(all) = fwd.ranks.as_mut() {
                let span = part.start * k_max * n..part.end * k_max * n;
                all[span].copy_from_slice(bytemuck::cast_slice(&ranks));
            }
            let report: &[u32] = bytemuck::cast_slice(&report);
            for (i, r) in part.clone().enumerate() {
                let mut rep = prepared.reports[r].clone();
                if prepared.params[r].mode == MODE_SOLVE {
                    let got = &report[i * 4..i * 4 + 4];
                    rep.iterations = got[0];
                    rep.converged = got[1] == 1;
                    rep.marginal_error = f32::from_bits(got[2]) as f64;
                }
                fwd.reports.push(rep);
            }
        }
        forward_on_host(op, batch, &on_host, &mut fwd)?;
        Ok(fwd)
    }
}

/// The largest scaled distance |u| = |v − centre|·2/(s·ε) the kernels take: u·y for y up to
/// K_MAX, and sums of a few such terms, stay far inside f32's range (3.4e38).
const MAX_SCALED: f64 = 1e30;

/// The largest |v − centre| the kernels take in f32 (whose largest value is 3.4e38).
const MAX_DISTANCE: f64 = 1e38;

/// The smallest nonzero |v − centre| spread the kernels take: f32 gaps far below it may be
/// subnormal, which GPUs may flush to 0.
const MIN_DISTANCE: f64 = 1e-30;

/// Centres each row to solve at its hard threshold, halfway between its k-th and (k+1)-th
/// largest valid score (in v = sign·x), and raises the default tolerance to the row's f32
/// floor (see [`GPU_AUTO_RANGE_ROUNDINGS`]). Centred at mid-range instead, one far outlier (a
/// −1e20 "mask out" score, say) would put every other score at |u| ≈ 1e22, where f32 keeps
/// no digit of their gaps. Rows whose scaled scores still pass [`MAX_SCALED`] (ε = 1e-30 on
/// scores near 1, spreads near f32's largest value) are returned, set to zeros: the CPU
/// backend answers them.
fn centre_rows(op: &SoftTopK, batch: &Batch, prepared: &mut Prepared) -> Vec<usize> {
    let n = batch.n();
    let sign = op.direction.sign();
    let mut on_host = Vec::new();
    let mut v: Vec<f64> = Vec::with_capacity(n);
    for (r, (p, spec)) in prepared.params.iter_mut().zip(&prepared.specs).enumerate() {
        let Some(spec) = spec else { continue };
        if p.mode != MODE_SOLVE {
            continue;
        }
        v.clear();
        let row = batch.row(r);
        v.extend(
            (0..n)
                .filter(|&c| batch.is_valid(r, c, op.direction))
                .map(|c| sign * row[c] as f64),
        );
        // In decreasing order: v[k − 1] is the k-th largest, everything after it is smaller.
        let k = spec.k.clamp(1, v.len());
        v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = v[k - 1];
        let next = v[k..].iter().copied().reduce(f64::max).unwrap_or(kth);
        let centre = 0.5 * kth + 0.5 * next;
        let (v_min, v_max) = if sign > 0.0 {
            (spec.x_min, spec.x_max)
        } else {
            (-spec.x_max, -spec.x_min)
        };
        let factor = 2.0 / (spec.scale * op.epsilon);
        // The kernels form v − centre in f32 before scaling: it must not overflow either.
        let distance = (0.5 * v_max - 0.5 * centre).max(0.5 * centre - 0.5 * v_min) * 2.0;
        // GPUs may flush subnormal f32 to 0: a row spread over less than MIN_DISTANCE could
        // lose its gaps, and a factor past f32's range would be infinite.
        let carried = distance * factor <= MAX_SCALED
            && factor <= MAX_SCALED
            && distance <= MAX_DISTANCE
            && (distance == 0.0 || distance >= MIN_DISTANCE);
        if !carried {
            p.mode = MODE_ZEROS;
            on_host.push(r);
            continue;
        }
        p.centre = centre as f32;
        if matches!(op.solver, Solver::Auto | Solver::Exact) {
            let spread = (v_max - next) * factor;
            let floor = GPU_AUTO_RANGE_ROUNDINGS * spread * f32::EPSILON as f64 / 2.0;
            p.tolerance = (p.tolerance as f64).max(floor) as f32;
        }
    }
    on_host
}
