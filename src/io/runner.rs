//! The backend of one run of the tool, chosen once and shared by every problem.

use std::sync::Arc;

use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::gpu::GpuBackend;
use crate::reference::Reference;
use crate::{Backend, BackendKind, GpuSoftTopK, SoftTopK};

/// A backend chosen once per run.
///
/// Each JSON line carries its own k and ε, so each line needs its own [`GpuSoftTopK`]; building
/// one from an already chosen backend is an `Arc` clone, whereas `Auto` would look for a GPU
/// adapter again on every line. `Auto` is resolved here through
/// [`GpuSoftTopK::with_backend`], so the tool falls back to the CPU exactly as the library does.
#[derive(Clone)]
pub struct Runner {
    kind: BackendKind,
    backend: Arc<dyn Backend>,
}

impl Runner {
    /// The backend for `kind`; `Gpu` fails with [`crate::Error::NoAdapter`] when there is none.
    pub fn new(kind: BackendKind) -> Result<Self> {
        let (kind, backend): (BackendKind, Arc<dyn Backend>) = match kind {
            BackendKind::Reference => (kind, Arc::new(Reference)),
            BackendKind::Cpu => (kind, Arc::new(CpuBackend::new())),
            BackendKind::Gpu => (kind, GpuBackend::shared()?),
            BackendKind::Auto => {
                // The probe's op is never run; it only lets the library make its choice.
                let probe = GpuSoftTopK::with_backend(SoftTopK::new(1, 1.0), BackendKind::Auto)?;
                if probe.backend_name().starts_with("gpu") {
                    (BackendKind::Gpu, GpuBackend::shared()?)
                } else {
                    (BackendKind::Cpu, Arc::new(CpuBackend::new()))
                }
            }
        };
        log::debug!("soft-topk tool: running on {}", backend.name());
        Ok(Runner { kind, backend })
    }

    /// The backend actually used (`Auto` resolved to `Gpu` or `Cpu`).
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Whether answers come from the f64 reference, which the tool then runs on f64 inputs
    /// directly instead of rounding them to f32 first.
    pub fn is_reference(&self) -> bool {
        self.kind == BackendKind::Reference
    }

    /// The backend's name, as the library reports it.
    pub fn name(&self) -> String {
        self.backend.name()
    }

    /// The operator `op` on this run's backend.
    pub fn operator(&self, op: SoftTopK) -> Result<GpuSoftTopK> {
        GpuSoftTopK::on(op, Arc::clone(&self.backend))
    }
}
