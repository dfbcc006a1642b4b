//! One JSON line through the tool's parser and solver, on the reference and the CPU backend.
//!
//! Every input must give one output line: a solution whose numbers are finite and of the
//! problem's lengths, or an error object of a documented kind. Problems whose solve would
//! take seconds (large sorted rows, huge iteration caps) are parsed but not solved.
#![no_main]

#[path = "../checks.rs"]
mod checks;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| checks::check_jsonl(data));
