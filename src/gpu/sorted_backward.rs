//! The sorted backward on the device (MATH.md §5): implicit differentiation of the forward's
//! plan, three short dispatches over one resident part of the batch, submitted together and
//! read once. shaders/sorted_backward.wgsl lists them; shaders/plan.wgsl says why the work is
//! cut into chunks.

use super::kernels::{chunk_count, work_bytes_per_row};
use super::resident::{Resident, OUT_A};
use super::rows::{self, Pass, Prepared, MODE_SOLVE, MODE_ZEROS};
use super::{part_bits, GpuBackend, SORTED_K_MAX};
use crate::error::{Error, Result};
use crate::op::Variant;
use crate::reference::{backward_into, cotangent_row};
use crate::{Batch, Cotangent, Forward, SoftTopK};

impl GpuBackend {
    /// The gradient of the scores for the sorted variant with k up to [`SORTED_K_MAX`], from
    /// the forward's ranks and a mask or ranks cotangent. The arguments were checked by
    /// `check_backward_args`.
    pub(super) fn sorted_backward(
        &self,
        op: &SoftTopK,
        batch: &Batch,
        forward: &Forward,
        cotangent: Cotangent,
    ) -> Result<Vec<f32>> {
        let (rows, n) = (batch.rows(), batch.n());
        let k_max = op.rank_slots(rows, n);
        if k_max > SORTED_K_MAX {
            return Err(Error::InvalidOption(format!(
                "the GPU's sorted backward takes k up to {SORTED_K_MAX} (its k×k systems live \
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
        let ranks = forward
            .ranks
            .as_deref()
            .expect("check_backward_args requires the ranks of a sorted forward");
        // in_b: the cotangent, `width` floats per row.
        let (g, ranks_cotangent, width) = match cotangent {
            Cotangent::Mask(g) => (g, false, n),
            Cotangent::Ranks(g) => (g, true, k_max * n),
        };
        let mut prepared = rows::prepare(op, batch, k_max, Pass::Backward { ranks_cotangent });
        let on_host = wide_factor_rows(&mut prepared);

        let mut grad = vec![0.0f32; rows * n];
        let per_part = self.max_rows_per_part(n, Variant::Sorted, k_max)?;
        for part in rows::parts(rows, per_part) {
            let count = part.len();
            let resident = Resident::new(
                &self.ctx,
                &self.kernels.layout,
                [
                    bytemuck::cast_slice(&prepared.params[part.clone()]),
                    bytemuck::cast_slice(part_bits(&prepared, &part)),
                    bytemuck::cast_slice(&ranks[part.start * k_max * n..part.end * k_max * n]),
                    bytemuck::cast_slice(&g[part.start * width..part.end * width]),
                ],
                [
                    (count * n * 4) as u64,
                    0,
                    0,
                    count as u64 * work_bytes_per_row(n),
                ],
            )?;
            let k = &self.kernels;
            let chunks = (chunk_count(n), count as u32);
            let each_row = (1, count as u32);
            resident.run(&[
                (&k.sorted_backward_pass, chunks),
                (&k.sorted_backward_solve, each_row),
                (&k.sorted_backward_finish, chunks),
            ])?;
            let [out] = resident.read([(OUT_A, (count * n * 4) as u64)])?;
            grad[part.start * n..part.end * n].copy_from_slice(bytemuck::cast_slice(&out));
        }
        for r in on_host {
            let ranks = &ranks[r * k_max * n..(r + 1) * k_max * n];
            let cot = cotangent_row(cotangent, r, n, k_max);
            let row = &mut grad[r * n..(r + 1) * n];
            backward_into(op, batch, r, forward.mask_row(r), ranks, cot, row);
        }
        Ok(grad)
    }
}

/// Rows whose 2/(s·ε) passes the f32 range (ε = 3e-39 on tied scores, say), where the gradient
/// itself may still be finite: the kernel sees them as rows of zeros, and the f64 reference
/// answers them, as it does every sorted row of the CPU backend.
fn wide_factor_rows(prepared: &mut Prepared) -> Vec<usize> {
    let mut on_host = Vec::new();
    for (r, params) in prepared.params.iter_mut().enumerate() {
        if params.mode == MODE_SOLVE && !params.factor.is_finite() {
            params.mode = MODE_ZEROS;
            on_host.push(r);
        }
    }
    on_host
}
