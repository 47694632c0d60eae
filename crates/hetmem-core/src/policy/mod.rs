//! The placement heuristics of a unified-memory runtime, as pure state machines over pages and
//! time, free of any device or OS: the runtime (issue 4) feeds them faults and migrations and
//! acts on what they answer. Defaults are NVIDIA UVM's (../shared/reference/uvm-svm.md, A.8 to
//! A.10), each parameter configurable.

pub mod access_counters;
pub mod prefetch;
pub mod thrashing;

use crate::addr::DeviceId;

/// Where a page can live or who touches it: the CPU (system memory) or a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Processor {
    /// The CPU and system memory.
    Cpu,
    /// A device and its memory.
    Device(DeviceId),
}
