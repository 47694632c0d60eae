//! hetmem-workloads: what the `hetmem` command runs and reports (issue 5).
//!
//! Workloads ([`workloads`]) are kernels on the simulated accelerator over data the CPU prepares
//! and checks, after the access patterns of the papers in perf-anchors.md §5: streaming (triad),
//! a 2D convolution stencil, tiled GEMM, ATAX's row then column walks, random unique-page access,
//! BFS over a generated graph, and a paged key-value cache growing and being read. Each one also
//! runs as plain Rust on the CPU, and every device run is checked against that result.
//!
//! A run ([`mod@run`]) puts a workload on a fresh [`hetmem_runtime::Context`] in one of three modes
//! ([`Mode`]): managed memory under a policy preset ([`Preset`]: `uvm-default`, `none`,
//! `hetmem`), the explicit-copy baseline (inputs prefetched to the device before the first
//! launch, outputs back after the last, no faults: the `cudaMemcpy` program, charged on the same
//! link model), or CPU only. The report ([`report`]) has wall and modelled time, the slowdown
//! against explicit copies, faults, batches, migrations by trigger, evictions, thrashing and
//! fault-service latency; [`trace`] writes Chrome trace events, [`plot`] an SVG of residency
//! and migrations over time, [`inspect`] the ranges of the context (AMD's `svm_ranges`), and
//! [`mod@bench`] the matrix of workloads × presets × oversubscription.
//!
//! ```text
//!   WorkloadSpec ──build──► dyn Workload ──run(ex: &mut Exec)──► output (checked against cpu())
//!                                              │
//!   RunConfig (mode, preset, link, memory) ──► run::run ── Context ── Accelerator (hetmem-sim)
//!                                              │   sampler thread: residency, migrations
//!                                              ▼
//!                                          RunReport ──► table / JSON / trace / SVG / CSV
//! ```
//!
//! Modelled time is the device clock's charges (fault service, migrations, replays, TLB
//! invalidations, remote accesses, CPU faults) plus a roofline model of the kernels' own work
//! ([`model::DeviceModel`]): the simulator charges no compute, and without it every ratio against
//! explicit copies would be a ratio of overheads alone.
#![forbid(unsafe_code)]

pub mod bench;
pub mod exec;
pub mod inspect;
pub mod model;
pub mod plot;
pub mod preset;
pub mod report;
pub mod run;
pub mod trace;
pub mod workload;
pub mod workloads;

pub use exec::Exec;
pub use preset::{Advise, Mode, Preset};
pub use report::RunReport;
pub use run::{run, RunConfig, Sample};
pub use workload::{Workload, WorkloadKind, WorkloadSpec};

use hetmem_runtime::RuntimeError;

/// What can go wrong building or running a workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A workload name nobody knows.
    #[error("unknown workload {name:?} (known: {known})")]
    UnknownWorkload {
        /// The name given.
        name: String,
        /// The names known.
        known: String,
    },
    /// A preset name nobody knows.
    #[error("unknown preset {name:?} (known: uvm-default, none, hetmem)")]
    UnknownPreset {
        /// The name given.
        name: String,
    },
    /// A mode name nobody knows.
    #[error("unknown mode {name:?} (known: managed, explicit, cpu)")]
    UnknownMode {
        /// The name given.
        name: String,
    },
    /// Advice nobody knows.
    #[error("unknown advice {name:?} (known: none, prefetch, read-mostly)")]
    UnknownAdvice {
        /// The name given.
        name: String,
    },
    /// A size that cannot be parsed.
    #[error("bad size {text:?}: {why}")]
    BadSize {
        /// The text given.
        text: String,
        /// Why.
        why: &'static str,
    },
    /// A footprint too small for the workload's shape.
    #[error("{workload}: {bytes} bytes is too small (at least {min} bytes)")]
    TooSmall {
        /// The workload.
        workload: WorkloadKind,
        /// The size asked for.
        bytes: u64,
        /// The least it needs.
        min: u64,
    },
    /// A footprint too large for this machine to hold or simulate.
    #[error("{workload}: {bytes} bytes is too large (at most {max} bytes)")]
    TooLarge {
        /// The workload.
        workload: WorkloadKind,
        /// The size asked for.
        bytes: u64,
        /// The most it takes.
        max: u64,
    },
    /// Device memory that cannot hold one 2 MiB chunk.
    #[error("device memory of {bytes} bytes is less than one 2 MiB chunk")]
    DeviceTooSmall {
        /// The size asked for.
        bytes: u64,
    },
    /// The device run's output differs from the CPU's.
    #[error("{workload}: the device result differs from the CPU result at word {index} (device {device:#x}, cpu {cpu:#x})")]
    Mismatch {
        /// The workload.
        workload: WorkloadKind,
        /// First word that differs.
        index: usize,
        /// The device's value.
        device: u32,
        /// The CPU's value.
        cpu: u32,
    },
    /// The device run's output has the wrong length.
    #[error("{workload}: the device result has {device} words, the CPU result {cpu}")]
    LengthMismatch {
        /// The workload.
        workload: WorkloadKind,
        /// The device result's length.
        device: usize,
        /// The CPU result's length.
        cpu: usize,
    },
    /// The runtime refused.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Writing a report, trace or plot failed.
    #[error("writing {what}: {source}")]
    Io {
        /// What was being written.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A sampler or worker thread failed.
    #[error("a worker thread failed: {0}")]
    Worker(String),
}
