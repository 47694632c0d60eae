//! Fuzzes operation sequences: the fuzzer's bytes decode (`Op::decode`) into the ops the model
//! test draws, and the same interpreter (`hetmem_testkit::Machine`) runs them on a context of two
//! devices, checking every byte, every invariant and the frame accounting after each step.
//! `cargo +nightly fuzz run ops` (see the README).
#![no_main]

use hetmem_testkit::{Machine, ModelConfig, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ops = Op::decode(data);
    if ops.is_empty() {
        return;
    }
    if let Err(e) = Machine::run(ModelConfig::default(), &ops[..ops.len().min(64)]) {
        panic!("{e}\nops: {ops:?}");
    }
});
