//! The fast CPU backend (placeholder: the reference, until the f32 kernels land).
use crate::{Backend, Batch, Cotangent, Forward, Result, SoftTopK};

#[derive(Debug, Clone, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }
    fn forward(&self, op: &SoftTopK, batch: &Batch) -> Result<Forward> {
        crate::reference::Reference.forward(op, batch)
    }
    fn backward(
        &self,
        op: &SoftTopK,
        batch: &Batch,
        f: &Forward,
        c: Cotangent,
    ) -> Result<Vec<f32>> {
        crate::reference::Reference.backward(op, batch, f, c)
    }
}
