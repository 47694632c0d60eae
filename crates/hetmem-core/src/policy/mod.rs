//! The placement heuristics of a unified-memory runtime, as pure state machines over pages and
//! time, free of any device or OS: the runtime (issue 4) feeds them faults and migrations and
//! acts on what they answer. Defaults are NVIDIA UVM's (../shared/reference/uvm-svm.md, A.8 to
//! A.10), each parameter configurable.

pub mod access_counters;
pub mod thrashing;
