//! Policy presets, run modes and advice: what `--preset`, `--mode` and `--advice` name.
//!
//! * `uvm-default`: NVIDIA's driver defaults (uvm-svm.md A.3-A.9): batches of 256 faults,
//!   batch-flush replay, 4 KiB fault granularity with the tree prefetcher at 51 % over 64 KiB
//!   leaves, eviction by allocation order, thrashing detection on; a CPU fault brings back its
//!   64 KiB region (UVM's prefetcher runs on CPU faults too, its big-page upgrade at least; the
//!   density growth beyond 64 KiB is not modelled).
//! * `none`: pure demand paging: each faulted 4 KiB page migrates alone, either way, no
//!   prefetcher, no thrashing detection; batches and eviction as `uvm-default`.
//! * `hetmem`: our best settings, chosen by measurement (README, "Measured"): whole-block
//!   windows, the stream detector, eviction by use, and once device memory is full a working
//!   set kept in it while the rest is mapped remotely, with access counters bringing in what
//!   is reread, and batches of 32 faults; see [`Preset::config`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hetmem_core::{
    fault_ring::ReplayPolicy,
    policy::{
        access_counters::AccessCounterConfig,
        prefetch::{PrefetchConfig, StreamConfig},
        thrashing::ThrashingConfig,
    },
    HUGE_PAGE_SIZE, PAGE_SIZE,
};
use hetmem_runtime::{ContextBuilder, EvictionOrder};
use hetmem_sim::accel::AccelConfig;
use serde::Serialize;

use crate::WorkloadError;

/// A policy preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// NVIDIA UVM's defaults.
    UvmDefault,
    /// Pure demand paging.
    None,
    /// hetmem's tuned settings.
    Hetmem,
}

/// The settings a preset stands for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PresetConfig {
    /// Migration window of a fault (bytes).
    pub granularity: u64,
    /// The tree prefetcher's threshold (percent), when on.
    pub tree_threshold: Option<u32>,
    /// The stream detector, when on.
    pub stream: bool,
    /// How far ahead the stream detector may reach, in pages (its depth doubles up to this).
    pub stream_max_depth_pages: u64,
    /// Advancing faults, after the one that starts a stream, before the detector reads ahead.
    pub stream_confirm: u32,
    /// Thrashing detection.
    pub thrashing: bool,
    /// Eviction order (true: allocation order, NVIDIA's; false: accessed-bit LRU).
    pub allocation_order_eviction: bool,
    /// Window a CPU fault on a device page brings back (bytes).
    pub cpu_window: u64,
    /// The most a CPU fault continuing a walk brings back (bytes), when CPU readahead is on.
    pub cpu_readahead: Option<u64>,
    /// Window of a fault once device memory is full (bytes), if smaller.
    pub pressure_window: Option<u64>,
    /// At a launch, migrate back first what CPU faults took from the device since the last one.
    pub restore_on_launch: bool,
    /// As a launch ends, move to system memory what the CPU took back after the launches before.
    pub readback_after_launch: bool,
    /// Once device memory is full, keep the working set and map the rest where it is.
    pub spill_remote: bool,
    /// Access counters (UVM's notifications: remote accesses to a 64 KiB region that migrate
    /// it once they reach this many), when on.
    pub access_counter_threshold: Option<u32>,
    /// Faults per batch.
    pub batch_size: usize,
    /// Replay policy.
    #[serde(serialize_with = "by_name")]
    pub replay: ReplayPolicy,
}

/// A replay policy as its name.
fn by_name<S: serde::Serializer>(r: &ReplayPolicy, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.name())
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 3] = [Preset::UvmDefault, Preset::None, Preset::Hetmem];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::UvmDefault => "uvm-default",
            Preset::None => "none",
            Preset::Hetmem => "hetmem",
        }
    }

    /// Its settings.
    pub fn config(self) -> PresetConfig {
        let uvm = PresetConfig {
            granularity: PAGE_SIZE,
            tree_threshold: Some(51),
            stream: false,
            stream_max_depth_pages: 512,
            stream_confirm: 2,
            thrashing: true,
            allocation_order_eviction: true,
            cpu_window: 64 << 10,
            cpu_readahead: None,
            pressure_window: None,
            restore_on_launch: false,
            readback_after_launch: false,
            spill_remote: false,
            access_counter_threshold: None,
            batch_size: 256,
            replay: ReplayPolicy::BatchFlush,
        };
        match self {
            Preset::UvmDefault => uvm,
            Preset::None => PresetConfig {
                tree_threshold: None,
                thrashing: false,
                cpu_window: PAGE_SIZE,
                ..uvm
            },
            // Chosen by measurement (`hetmem bench --matrix`, README "Measured"): whole 2 MiB
            // blocks per fault (AMD's default granularity) amortise the per-batch and
            // per-block costs that dominate a fault's service, and the stream detector
            // migrates ahead of sequential walks; eviction by use keeps reused chunks; a CPU
            // fault brings back its block. Once device memory is full a fault brings in its
            // 64 KiB, grown by the tree prefetcher where the block is already dense (random
            // access at 2x: 276x explicit copies with 2 MiB windows, 32x with 64 KiB). A
            // launch first brings back what CPU faults took from the device since the last
            // one, into free memory (`kvcache` at 0.5x: 3.1x to 1.9x, no fault round a step for
            // the block table the CPU rewrote), and a launch's end moves back to system memory
            // what the CPU took after each of the two launches before (`bfs`'s flag: 13 CPU
            // faults to 5). A CPU fault that continues a walk brings back twice the last
            // window, up to 16 MiB (`gemm`'s 14 MiB result read back in 3-4 faults, not 7). The stream detector reads ahead from a stream's
            // second block on, in the background (no replay waits for it): with whole-block
            // windows a walk faults once a block, and arrays of a few blocks were done before
            // the default confirmation (stream at 0.5x: 1.35x to 1.16x). Its reach stays at
            // 2 MiB: 8 MiB filled the free memory a growing `kvcache` at 1x needed (2.7x to
            // 7x, eleven evictions instead of two). Once device memory is full and every
            // chunk in it is in the working set (`ContextBuilder::spill_remote`), a fault's
            // 2 MiB window is mapped remotely instead of evicting it (at 2x: random 27x to
            // 1.6x, bfs 16x to 2.9x, kvcache 37x to 21x); access counters migrate a 64 KiB
            // region after 2048 remote accesses (its lines read about four times: a region
            // reread that often costs less migrated; atax at 2x 5.1x to 3.3x). Batches hold 32
            // faults (`uvm_perf_fault_batch_count`, 256 by default): with whole-block windows
            // the first faults of a batch bring in their blocks, and the rest of a 256-entry
            // batch is mostly faults those blocks serve, each sorted (0.5 µs) before any copy
            // starts; batch-flush discards them and the replay finds their pages resident
            // (atax's first batch held 256 rows of one array: at 0.5x 1.23x to 1.14x, at 1x
            // 1.14x to 1.07x; at 2x 3.35x to 3.24x, the rest unchanged).
            Preset::Hetmem => PresetConfig {
                granularity: HUGE_PAGE_SIZE,
                tree_threshold: Some(51),
                stream: true,
                stream_max_depth_pages: 512,
                stream_confirm: 1,
                thrashing: true,
                allocation_order_eviction: false,
                cpu_window: HUGE_PAGE_SIZE,
                cpu_readahead: Some(16 << 20),
                pressure_window: Some(64 << 10),
                restore_on_launch: true,
                readback_after_launch: true,
                spill_remote: true,
                access_counter_threshold: Some(2048),
                batch_size: 32,
                replay: ReplayPolicy::BatchFlush,
            },
        }
    }
}

impl PresetConfig {
    /// A context builder with these settings and one device `accel` (its batch and replay
    /// settings replaced).
    pub fn builder(&self, accel: AccelConfig) -> ContextBuilder {
        let accel = AccelConfig {
            batch_size: self.batch_size,
            replay: self.replay,
            // Batches hold what the warps in flight fault on (see
            // `AccelConfig::coalesce_until_stalled`), waiting at most 50 ms for them: a warp
            // of `gemm` computes for milliseconds of host time between faults, and a compute
            // unit thread may wait that long for one of the two cores (with 5 ms, `gemm`'s
            // batches held 7-9 faults instead of 33, and its runs varied by 20 %).
            fault_coalesce: Duration::from_millis(50),
            coalesce_until_stalled: true,
            ..accel
        };
        hetmem_runtime::Context::builder()
            .device(accel)
            .granularity(self.granularity)
            .cpu_fault_window(self.cpu_window)
            .cpu_readahead(self.cpu_readahead)
            .pressure_window(self.pressure_window)
            .restore_on_launch(self.restore_on_launch)
            .readback_after_launch(self.readback_after_launch)
            .spill_remote(self.spill_remote)
            .access_counters(
                self.access_counter_threshold
                    .map(|threshold| AccessCounterConfig {
                        threshold,
                        ..AccessCounterConfig::default()
                    }),
            )
            .prefetcher(self.tree_threshold.map(|t| PrefetchConfig {
                threshold_percent: t,
                ..PrefetchConfig::default()
            }))
            .stream_prefetcher(self.stream.then(|| StreamConfig {
                depth_pages: 512.min(self.stream_max_depth_pages),
                max_depth_pages: self.stream_max_depth_pages,
                confirm: self.stream_confirm,
                ..StreamConfig::default()
            }))
            .thrashing(self.thrashing.then(ThrashingConfig::default))
            .eviction(if self.allocation_order_eviction {
                EvictionOrder::AllocationOrder
            } else {
                EvictionOrder::AccessedLru
            })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, WorkloadError> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| WorkloadError::UnknownPreset { name: s.into() })
    }
}

/// How a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Managed memory: pages migrate on faults under the preset.
    Managed,
    /// The explicit-copy baseline: inputs prefetched to the device before the launches that
    /// read them, outputs back after, no faults.
    Explicit,
    /// Plain Rust on the CPU (the reference every other mode is checked against).
    Cpu,
}

impl Mode {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Managed => "managed",
            Mode::Explicit => "explicit",
            Mode::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, WorkloadError> {
        [Mode::Managed, Mode::Explicit, Mode::Cpu]
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| WorkloadError::UnknownMode { name: s.into() })
    }
}

/// Advice a managed run gives the runtime about the workload's buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Advise {
    /// None: the program as written for demand paging.
    #[default]
    None,
    /// `cudaMemPrefetchAsync` of each input to the device where explicit copies would copy it
    /// (UVMBench's "with prefetch" variant), and of each output back.
    Prefetch,
    /// Inputs read-mostly (`cudaMemAdviseSetReadMostly`): devices get read copies.
    ReadMostly,
}

impl Advise {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Advise::None => "none",
            Advise::Prefetch => "prefetch",
            Advise::ReadMostly => "read-mostly",
        }
    }
}

impl fmt::Display for Advise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Advise {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, WorkloadError> {
        [Advise::None, Advise::Prefetch, Advise::ReadMostly]
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| WorkloadError::UnknownAdvice { name: s.into() })
    }
}
