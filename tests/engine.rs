//! GpuSoftTopK: backend choice and the fallback on device errors.

use std::sync::Arc;

use soft_topk::{
    Backend, BackendKind, Batch, Cotangent, Error, Forward, GpuErrorKind, GpuSoftTopK, Result,
    SoftTopK,
};

/// A backend whose device always fails, as a lost GPU would.
struct LostDevice;

impl Backend for LostDevice {
    fn name(&self) -> String {
        "lost device".into()
    }

    fn forward(&self, _: &SoftTopK, _: &Batch) -> Result<Forward> {
        Err(Error::Gpu {
            kind: GpuErrorKind::DeviceLost,
            message: "test".into(),
        })
    }

    fn backward(&self, _: &SoftTopK, _: &Batch, _: &Forward, _: Cotangent) -> Result<Vec<f32>> {
        Err(Error::Gpu {
            kind: GpuErrorKind::DeviceLost,
            message: "test".into(),
        })
    }
}

#[test]
fn device_errors_surface_unless_a_fallback_is_asked_for() {
    let scores = [0.3f32, 0.1, 0.9, 0.4];
    let batch = Batch::single(&scores).unwrap();
    let op = SoftTopK::new(2, 0.1);

    let strict = GpuSoftTopK::on(op.clone(), Arc::new(LostDevice)).unwrap();
    let err = strict.run(&batch).unwrap_err();
    assert_eq!(err.kind(), "gpu");

    let forgiving = GpuSoftTopK::on(op.clone(), Arc::new(LostDevice))
        .unwrap()
        .fall_back_on_device_error();
    let out = forgiving.run(&batch).expect("answered on the CPU");
    let cpu = GpuSoftTopK::with_backend(op, BackendKind::Cpu)
        .unwrap()
        .run(&batch)
        .unwrap();
    assert_eq!(out.mask, cpu.mask);
    let g = [1.0f32, 0.0, 0.0, 0.0];
    assert!(forgiving
        .backward(&batch, &out, Cotangent::Mask(&g))
        .is_ok());
}

#[test]
fn input_errors_are_not_retried_elsewhere() {
    let scores = [0.3f32, f32::NAN];
    let batch = Batch::single(&scores).unwrap();
    let topk = GpuSoftTopK::with_backend(SoftTopK::new(1, 0.1), BackendKind::Cpu)
        .unwrap()
        .fall_back_on_device_error();
    let out = topk.run(&batch).unwrap();
    assert_eq!(out.first_error().map(Error::kind), Some("non_finite_input"));
    let bad_eps = GpuSoftTopK::with_backend(SoftTopK::new(1, -1.0), BackendKind::Cpu).unwrap();
    assert_eq!(bad_eps.run(&batch).unwrap_err().kind(), "eps_not_positive");
}
