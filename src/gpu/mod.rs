//! The GPU backend (placeholder until the WGSL kernels land).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::{Backend, Batch, Cotangent, Forward, SoftTopK};

/// The operator on a GPU adapter through wgpu.
pub struct GpuBackend {
    _private: (),
}

impl GpuBackend {
    /// The process-wide GPU backend, created on first use.
    pub fn shared() -> Result<Arc<GpuBackend>> {
        Err(Error::NoAdapter("the GPU backend is not built yet".into()))
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> String {
        "gpu".into()
    }

    fn forward(&self, _op: &SoftTopK, _batch: &Batch) -> Result<Forward> {
        Err(Error::NoAdapter("the GPU backend is not built yet".into()))
    }

    fn backward(&self, _: &SoftTopK, _: &Batch, _: &Forward, _: Cotangent) -> Result<Vec<f32>> {
        Err(Error::NoAdapter("the GPU backend is not built yet".into()))
    }
}
