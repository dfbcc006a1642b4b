//! [`GpuSoftTopK`]: an operator bound to a backend, the type most users call.

use std::sync::{Arc, Once};

use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::gpu::GpuBackend;
use crate::reference::Reference;
use crate::{Backend, Batch, Cotangent, Forward, SoftTopK};

/// Where a [`GpuSoftTopK`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The GPU when a hardware adapter exists, otherwise the fast CPU backend (a software
    /// adapter such as lavapipe is slower than the CPU backend, so auto passes it over).
    #[default]
    Auto,
    /// The GPU or an error.
    Gpu,
    /// The fast f32 CPU backend.
    Cpu,
    /// The f64 reference (slow; it defines correctness).
    Reference,
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "gpu" => Ok(BackendKind::Gpu),
            "cpu" => Ok(BackendKind::Cpu),
            "reference" => Ok(BackendKind::Reference),
            other => Err(format!(
                "unknown backend '{other}' (expected auto, gpu, cpu or reference)"
            )),
        }
    }
}

/// The SOFT top-k operator bound to a backend.
///
/// Built once (the GPU's pipelines and buffers are made on first use and reused), then called
/// for any number of batches, from any number of threads.
#[derive(Clone)]
pub struct GpuSoftTopK {
    op: SoftTopK,
    backend: Arc<dyn Backend>,
    /// Where a call goes again when the backend fails with a device error (off by default).
    fallback: Option<Arc<dyn Backend>>,
}

/// The auto backend's choice is logged once per process.
static AUTO_NOTICE: Once = Once::new();

impl GpuSoftTopK {
    /// The operator on the GPU when a hardware adapter exists, else on the CPU (said once in
    /// the log).
    pub fn new(op: SoftTopK) -> Result<Self> {
        Self::with_backend(op, BackendKind::Auto)
    }

    /// The operator on a chosen backend. `Gpu` fails with [`crate::Error::NoAdapter`] when
    /// there is no adapter.
    pub fn with_backend(op: SoftTopK, kind: BackendKind) -> Result<Self> {
        let backend: Arc<dyn Backend> = match kind {
            BackendKind::Gpu => GpuBackend::shared()?,
            BackendKind::Cpu => Arc::new(CpuBackend::new()),
            BackendKind::Reference => Arc::new(Reference),
            BackendKind::Auto => match GpuBackend::shared() {
                Ok(gpu) if gpu.adapter_info().device_type != wgpu::DeviceType::Cpu => {
                    AUTO_NOTICE.call_once(|| log::info!("soft-topk: running on {}", gpu.name()));
                    gpu
                }
                // A software adapter (Mesa's lavapipe, WARP) is a GPU emulated on the CPU:
                // correct, but slower than the CPU backend, so auto does not pick it.
                Ok(gpu) => {
                    AUTO_NOTICE.call_once(|| {
                        log::info!(
                            "soft-topk: the only adapter is a software one ({}); running on the \
                             CPU backend (ask for the gpu backend to use it anyway)",
                            gpu.name()
                        )
                    });
                    Arc::new(CpuBackend::new())
                }
                Err(why) => {
                    AUTO_NOTICE.call_once(|| {
                        log::warn!("soft-topk: no usable GPU ({why}); running on the CPU backend")
                    });
                    Arc::new(CpuBackend::new())
                }
            },
        };
        Self::on(op, backend)
    }

    /// The operator on any backend value.
    pub fn on(op: SoftTopK, backend: Arc<dyn Backend>) -> Result<Self> {
        log::debug!("soft-topk: {:?} on {}", op.variant, backend.name());
        Ok(GpuSoftTopK {
            op,
            backend,
            fallback: None,
        })
    }

    /// Asks for calls that fail with a device error ([`crate::Error::Gpu`]: validation, out of
    /// memory, device lost) to be answered by the CPU backend instead, with a warning in the
    /// log. Input errors are never retried: they would fail the same way.
    pub fn fall_back_on_device_error(mut self) -> Self {
        self.fallback = Some(Arc::new(CpuBackend::new()));
        self
    }

    /// `call` on the backend, and on the fallback when the backend's device failed.
    fn with_fallback<T>(&self, call: impl Fn(&dyn Backend) -> Result<T>) -> Result<T> {
        match (call(self.backend.as_ref()), &self.fallback) {
            (Err(e @ crate::Error::Gpu { .. }), Some(fallback)) => {
                log::warn!("soft-topk: {e}; answering on {} instead", fallback.name());
                call(fallback.as_ref())
            }
            (result, _) => result,
        }
    }

    /// The operator this value computes.
    pub fn op(&self) -> &SoftTopK {
        &self.op
    }

    /// The backend's name, e.g. `"cpu"` or `"gpu (llvmpipe …)"`.
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// The forward pass: mask (and ranks) with a report per row.
    pub fn run(&self, batch: &Batch) -> Result<Forward> {
        self.with_fallback(|backend| backend.forward(&self.op, batch))
    }

    /// The backward pass: the gradient of the scores from the upstream gradient.
    pub fn backward(
        &self,
        batch: &Batch,
        forward: &Forward,
        cotangent: Cotangent,
    ) -> Result<Vec<f32>> {
        self.with_fallback(|backend| backend.backward(&self.op, batch, forward, cotangent))
    }
}
