//! Batches built from arbitrary bytes: shapes that may not fit, arbitrary f32 bit patterns,
//! per-row k, a validity mask, any ε; the forward and backward on the CPU backend and the
//! reference. Each call is a result or a typed error; every result keeps the invariants, and
//! top-k on the CPU matches the reference.
#![no_main]

#[path = "../checks.rs"]
mod checks;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| checks::check_batch(data));
