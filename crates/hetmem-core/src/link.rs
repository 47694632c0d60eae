//! Link model: the modelled time a host↔device interconnect and the UVM fault path would take, so
//! that policies can be studied on realistic ratios even though every copy here is a host memcpy.
//!
//! What it models (perf-anchors.md §0, §1, §2.1, §4.1, §6):
//!
//! * **Transfers** over the link, per direction ([`Direction`]): a fixed per-transfer latency plus a
//!   data phase at `peak × efficiency(size)`, where the efficiency curve is piecewise linear in
//!   `log(size)` ([`CurvePoint`]). The PCIe curve is derived from the UVMSmart PCIe 3 x16
//!   measurements of §2.1 (4 KiB … 1 MiB) so that a single transfer reproduces them, and
//!   saturates where UVMSmart's fitted atan curve reaches its asymptote.
//! * **Batches of transfers** on one copy engine ([`LinkModel::transfers`]), pipelined: the fixed
//!   latency of transfer `i + 1` overlaps the data phase of transfer `i`; data phases never overlap.
//! * **The GPU fault path** ([`FaultCosts`]): a fixed cost per fault batch (interrupt, fault-buffer
//!   fetch, flush), a per-fault-entry cost (sort, deduplicate, policy), a per-2 MiB-VABlock service
//!   cost, the replay, and the CPU fault round trip of `migrate_to_ram`; plus TLB invalidations
//!   ([`TlbCosts`]) and remote (mapped, zero-copy) access over the link.
//! * **The device clock** ([`DeviceClock`]): a thread-safe accumulator of modelled time by
//!   [`Cause`], and the reports that set it beside wall time ([`ClockReport`], [`TimeReport`]).
//!
//! ```text
//!   one transfer        |<- latency ->|<-------- bytes / (peak x eff(bytes)) -------->|
//!
//!   a pipelined batch   |<- L ->|<---- data 0 ---->|<-- data 1 -->|<------ data 2 ------>|
//!                               |<- L ->|  (setup of 1 hidden)    |
//!                                       |<- L ->|  (setup of 2 hidden)
//! ```
//!
//! What it deliberately does not model:
//!
//! * **Overlap and contention.** The clock is a *sum* of charges: the device is taken to stall
//!   while a fault batch is serviced (§6 "the accelerator stalls while the batch is serviced (no
//!   overlap)"), and two copy engines charging at once each get the full link, as if they ran one
//!   after the other. There is no timeline, no bidirectional sharing, no queueing.
//! * **Size effects beyond the curve**: the drop of very large pageable copies (A100 falls from
//!   25.1 to 16.5–18 GB/s at 10–20 GiB, §4.1), GPU clock ramp (Xe, §1.1), device-memory bandwidth
//!   (§4.2), CPU-side `migrate_vma` throughput (§3.1).
//! * **The composition of a VABlock's service** (populate vs copy vs evict, first-touch DMA-map
//!   setup, §1.1/§1.2): one per-VABlock cost stands for all of it; transfers are charged apart.
//! * **Dependent remote accesses**: [`LinkModel::remote_access`] is a streaming (many lines in
//!   flight) throughput model; a pointer chase that waits a link round trip per line is not.
//!
//! Neighbours: the simulated device's copy engines charge [`LinkModel::transfer`] /
//! [`LinkModel::transfers`] as [`Cause::MigrateToDevice`] / [`Cause::MigrateToHost`]; the device
//! fault service charges [`LinkModel::fault_batch`] (through [`FaultBatchCost::charge_to`]); the
//! CPU fault backend charges [`LinkModel::cpu_fault`]; the device MMU charges
//! [`LinkModel::tlb_invalidate`]; warps that read system memory through a remote mapping charge
//! [`LinkModel::remote_access`]; the CLI and benches print [`TimeReport`] and [`ClockReport`].
//! With [`LinkModel::off`] every cost is zero and copies run at memcpy speed: nothing is added.
//!
//! Invariant defended: modelled time never decreases with more work. A valid model
//! ([`LinkModel::validate`]) has an efficiency curve that never falls with size and never grows
//! faster than size, so a larger transfer never takes less time and is never slower per byte;
//! clock arithmetic saturates instead of wrapping.
//!
//! Sources: `/work/shared/reference/perf-anchors.md` (cited by section below); UVMSmart
//! (DebashisGanguly/gpgpu-sim_UVMSmart, `micro-benchmarks/transferBandwidth.cu`, and its
//! fitted bandwidth model and 45 µs far-fault latency); Zheng et al. HPCA'16 via Kim et al.
//! ASPLOS'20; Allen & Ge SC'21; ARIADNE; nvbandwidth issues; Schieffer et al. ICPP'24.
//!
//! ```
//! use hetmem_core::link::{Cause, DeviceClock, Direction, LinkModel, ModelTime};
//!
//! let link: LinkModel = "pcie4".parse().unwrap();
//! let clock = DeviceClock::new();
//! clock.charge(Cause::MigrateToDevice, link.transfer(Direction::HostToDevice, 2 << 20));
//! link.fault_batch(1, 1, &[64 << 10]).charge_to(&clock);
//! assert!(clock.snapshot().total > ModelTime::from_micros(20));
//! ```

use std::fmt;
use std::iter::Sum;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const NANOS_PER_SEC: f64 = 1e9;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

// ---------------------------------------------------------------------------------------------
// Units
// ---------------------------------------------------------------------------------------------

/// Modelled time in whole nanoseconds. Arithmetic is checked or saturating, never wrapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelTime(u64);

impl ModelTime {
    /// No time.
    pub const ZERO: ModelTime = ModelTime(0);
    /// The largest representable time (about 584 years); saturating arithmetic stops here.
    pub const MAX: ModelTime = ModelTime(u64::MAX);

    /// `ns` nanoseconds.
    pub const fn from_nanos(ns: u64) -> Self {
        ModelTime(ns)
    }
    /// `us` microseconds (saturating).
    pub const fn from_micros(us: u64) -> Self {
        ModelTime(us.saturating_mul(1_000))
    }
    /// `ms` milliseconds (saturating).
    pub const fn from_millis(ms: u64) -> Self {
        ModelTime(ms.saturating_mul(1_000_000))
    }
    /// A wall-clock duration as modelled time (saturating).
    pub fn from_duration(d: Duration) -> Self {
        ModelTime(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
    /// Rounds a non-negative number of nanoseconds to the nearest whole one. NaN and negative
    /// values (only an invalid model produces them) give zero; too large saturates.
    fn from_nanos_f64(ns: f64) -> Self {
        if ns.is_nan() || ns <= 0.0 {
            ModelTime::ZERO
        } else {
            // `as` saturates at u64::MAX for values out of range (and infinity).
            ModelTime(ns.round() as u64)
        }
    }

    /// Whole nanoseconds.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
    /// Microseconds, fractional.
    pub fn as_micros_f64(self) -> f64 {
        self.0 as f64 / 1e3
    }
    /// Seconds, fractional.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_SEC
    }
    /// As a [`Duration`].
    pub const fn as_duration(self) -> Duration {
        Duration::from_nanos(self.0)
    }
    /// Is it zero?
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// `self + rhs`, or `None` on overflow.
    pub const fn checked_add(self, rhs: ModelTime) -> Option<ModelTime> {
        match self.0.checked_add(rhs.0) {
            Some(ns) => Some(ModelTime(ns)),
            None => None,
        }
    }
    /// `self + rhs`, stopping at [`ModelTime::MAX`].
    pub const fn saturating_add(self, rhs: ModelTime) -> ModelTime {
        ModelTime(self.0.saturating_add(rhs.0))
    }
    /// `self - rhs`, or `None` if `rhs` is larger.
    pub const fn checked_sub(self, rhs: ModelTime) -> Option<ModelTime> {
        match self.0.checked_sub(rhs.0) {
            Some(ns) => Some(ModelTime(ns)),
            None => None,
        }
    }
    /// `self - rhs`, stopping at zero.
    pub const fn saturating_sub(self, rhs: ModelTime) -> ModelTime {
        ModelTime(self.0.saturating_sub(rhs.0))
    }
    /// `self × n`, or `None` on overflow.
    pub const fn checked_mul(self, n: u64) -> Option<ModelTime> {
        match self.0.checked_mul(n) {
            Some(ns) => Some(ModelTime(ns)),
            None => None,
        }
    }
    /// `self × n`, stopping at [`ModelTime::MAX`].
    pub const fn saturating_mul(self, n: u64) -> ModelTime {
        ModelTime(self.0.saturating_mul(n))
    }
}

impl Sum for ModelTime {
    /// Saturating sum.
    fn sum<I: Iterator<Item = ModelTime>>(iter: I) -> ModelTime {
        iter.fold(ModelTime::ZERO, ModelTime::saturating_add)
    }
}

impl From<ModelTime> for Duration {
    fn from(t: ModelTime) -> Duration {
        t.as_duration()
    }
}

impl fmt::Display for ModelTime {
    /// `850 ns`, `12.345 us`, `3.457 ms`, `1.250 s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0;
        if ns < 1_000 {
            write!(f, "{ns} ns")
        } else if ns < 1_000_000 {
            write!(f, "{:.3} us", ns as f64 / 1e3)
        } else if ns < 1_000_000_000 {
            write!(f, "{:.3} ms", ns as f64 / 1e6)
        } else {
            write!(f, "{:.3} s", ns as f64 / 1e9)
        }
    }
}

/// A link bandwidth in bytes per second. [`Bandwidth::INFINITE`] makes transfers free (the model
/// switched off).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Bandwidth(f64);

impl Bandwidth {
    /// Unlimited: every transfer's data phase takes no time.
    pub const INFINITE: Bandwidth = Bandwidth(f64::INFINITY);

    /// `bps` bytes per second.
    pub const fn from_bytes_per_sec(bps: f64) -> Self {
        Bandwidth(bps)
    }
    /// `gb` × 10⁹ bytes per second (the unit of link specs and nvbandwidth).
    pub const fn from_gb_per_sec(gb: f64) -> Self {
        Bandwidth(gb * 1e9)
    }
    /// `gib` × 2³⁰ bytes per second (the unit nvprof prints as "GB/s").
    pub const fn from_gib_per_sec(gib: f64) -> Self {
        Bandwidth(gib * GIB)
    }
    /// Bytes per second.
    pub const fn bytes_per_sec(self) -> f64 {
        self.0
    }
    /// 10⁹ bytes per second.
    pub fn gb_per_sec(self) -> f64 {
        self.0 / 1e9
    }
    /// 2³⁰ bytes per second.
    pub fn gib_per_sec(self) -> f64 {
        self.0 / GIB
    }
    /// Is it unlimited?
    pub fn is_infinite(self) -> bool {
        self.0.is_infinite() && self.0 > 0.0
    }
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_infinite() {
            write!(f, "unlimited")
        } else {
            write!(f, "{:.2} GB/s", self.gb_per_sec())
        }
    }
}

/// Which way bytes cross the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// System memory to device memory (H2D): migrations to the device, remote reads by the device.
    HostToDevice,
    /// Device memory to system memory (D2H): evictions, `migrate_to_ram`, remote writes.
    DeviceToHost,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::HostToDevice, Direction::DeviceToHost];

    /// The clock cause a migration in this direction is charged to.
    pub fn migrate_cause(self) -> Cause {
        match self {
            Direction::HostToDevice => Cause::MigrateToDevice,
            Direction::DeviceToHost => Cause::MigrateToHost,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::HostToDevice => "host-to-device",
            Direction::DeviceToHost => "device-to-host",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Why a link model was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LinkError {
    /// A peak bandwidth is zero, negative or NaN ([`Bandwidth::INFINITE`] is allowed).
    #[error("{dir} peak bandwidth must be positive, got {bytes_per_sec} B/s")]
    NonPositiveBandwidth {
        /// The direction.
        dir: Direction,
        /// The value given.
        bytes_per_sec: f64,
    },
    /// A curve point has size zero (the curve is interpolated in log(size)).
    #[error("efficiency curve point {index} has size zero")]
    ZeroSizePoint {
        /// Index in the curve.
        index: usize,
    },
    /// A curve point's efficiency is not in (0, 1].
    #[error("efficiency curve point {index} has efficiency {efficiency}, outside (0, 1]")]
    EfficiencyOutOfRange {
        /// Index in the curve.
        index: usize,
        /// The value given.
        efficiency: f64,
    },
    /// Curve sizes are not strictly increasing.
    #[error("efficiency curve point {index} ({bytes} B) is not larger than the point before it")]
    CurveSizesNotIncreasing {
        /// Index in the curve.
        index: usize,
        /// Its size.
        bytes: u64,
    },
    /// Efficiency falls with size: a larger transfer would be slower per byte.
    #[error("efficiency curve falls at point {index} ({bytes} B)")]
    CurveNotMonotone {
        /// Index in the curve.
        index: usize,
        /// Its size.
        bytes: u64,
    },
    /// Efficiency grows faster than size between point `index - 1` and `index`: a larger
    /// transfer would finish sooner than a smaller one.
    #[error("efficiency curve rises faster than size before point {index} ({bytes} B)")]
    CurveOutrunsSize {
        /// Index in the curve.
        index: usize,
        /// Its size.
        bytes: u64,
    },
    /// The remote-access line size is zero.
    #[error("remote access line size must be positive")]
    ZeroRemoteLine,
    /// The TLB full-flush ceiling is zero.
    #[error("TLB full-flush ceiling must be at least one range")]
    ZeroFlushCeiling,
    /// A preset name that is not one of `pcie3`, `pcie4`, `pcie5`, `nvlink-c2c`, `off`.
    #[error("unknown link model {name:?} (expected one of pcie3, pcie4, pcie5, nvlink-c2c, off)")]
    UnknownPreset {
        /// The name given.
        name: String,
    },
}

/// One point of the size-dependent efficiency curve: transfers of `bytes` move data at
/// `efficiency × peak` during their data phase (the fixed latency comes on top).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurvePoint {
    /// Transfer size.
    pub bytes: u64,
    /// Fraction of the peak bandwidth, in (0, 1].
    pub efficiency: f64,
}

/// Costs of the device fault path (NVIDIA UVM's replayable far faults, perf-anchors §1 and §6).
/// Transfers are not in here: they are charged through the link's bandwidth model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultCosts {
    /// Fixed cost of one fault batch: interrupt, bottom-half wake-up, fault-buffer fetch, buffer
    /// flush between batches (§1.2 "fault delivery = interrupt + host read of the GPU fault
    /// buffer"; §1.3 replay policy batch-flush).
    pub batch: ModelTime,
    /// Per fault-buffer entry, duplicates included: sorting, deduplication, policy decisions
    /// (§1.2 Kim: the "fault handling" pre-processing part of a batch).
    pub per_fault: ModelTime,
    /// Per 2 MiB VABlock serviced: populate, page-table update, DMA mapping, excluding the copy
    /// (§6 "per-VABlock service ≈ 10–30 µs"; §1.1 ARIADNE "roughly 20 µs" per VABlock).
    pub per_vablock: ModelTime,
    /// Issuing the replay that lets the stalled warps retry (one per batch).
    pub replay: ModelTime,
    /// A CPU fault on a device-resident page (`migrate_to_ram`) round trip, excluding the copy
    /// back (§6 "a userfaultfd round trip (~8 µs)").
    pub cpu_fault: ModelTime,
}

impl FaultCosts {
    /// Every cost zero.
    pub const ZERO: FaultCosts = FaultCosts {
        batch: ModelTime::ZERO,
        per_fault: ModelTime::ZERO,
        per_vablock: ModelTime::ZERO,
        replay: ModelTime::ZERO,
        cpu_fault: ModelTime::ZERO,
    };

    /// The NVIDIA UVM-class fault path the presets share (the host software dominates, §1.2:
    /// "data transfer is <25 % of batch time"; "management dominates"):
    ///
    /// * `batch` 20 µs — with `per_fault` 0.5 µs a full 256-entry batch spends
    ///   20 + 256 × 0.5 = 148 µs before any page is touched, Kim's median pre-processing 140 µs
    ///   (§1.2: 50–430 µs, median 140 µs); the split between the two is an assumption.
    /// * `per_fault` 0.5 µs — Kim's median 140 µs over a 256-fault batch (§1.2, §1.3 batch
    ///   size 256) is 0.55 µs per entry.
    /// * `per_vablock` 10 µs — the low end of §6's 10–30 µs, because the copy is charged apart
    ///   (ARIADNE's ~20 µs per VABlock, §1.1, includes it).
    /// * `replay` 5 µs — an assumption: the anchors give no separate replay cost; with it a
    ///   one-fault batch migrating 4–64 KiB over PCIe 3 costs 37–43 µs, inside Zheng's 20–50 µs
    ///   (§1.1) and just under UVMSmart's 45 µs.
    /// * `cpu_fault` 8 µs — §6 "a userfaultfd round trip (~8 µs)"; §3.2 measured 7.8 µs.
    pub const UVM: FaultCosts = FaultCosts {
        batch: ModelTime::from_micros(20),
        per_fault: ModelTime::from_nanos(500),
        per_vablock: ModelTime::from_micros(10),
        replay: ModelTime::from_micros(5),
        cpu_fault: ModelTime::from_micros(8),
    };
}

/// Costs of TLB invalidation (a device TLB invalidate, or a CPU shootdown before migration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbCosts {
    /// One invalidation round trip (issue, wait for the acknowledgement).
    pub invalidate: ModelTime,
    /// Each range invalidated in it.
    pub per_range: ModelTime,
    /// Above this many ranges the invalidation becomes a full flush and costs no more.
    pub full_flush_ranges: u64,
}

impl TlbCosts {
    /// Every cost zero (ceiling kept valid).
    pub const ZERO: TlbCosts = TlbCosts {
        invalidate: ModelTime::ZERO,
        per_range: ModelTime::ZERO,
        full_flush_ranges: 33,
    };

    /// The presets' TLB costs:
    ///
    /// * `invalidate` 2 µs — §0/§4.4 "IPI/TLB shootdown ~1–3 µs round trip", the midpoint;
    ///   a device TLB invalidate (a method pushed to the MMU, then a fence) is assumed the same
    ///   order.
    /// * `per_range` 0.1 µs — an assumption (no anchor), small beside the round trip.
    /// * `full_flush_ranges` 33 — §4.4 Linux `tlb_single_page_flush_ceiling` = 33 pages.
    pub const SHOOTDOWN: TlbCosts = TlbCosts {
        invalidate: ModelTime::from_micros(2),
        per_range: ModelTime::from_nanos(100),
        full_flush_ranges: 33,
    };
}

/// The link and fault-path model of one device: what each transfer and each fault round trip
/// costs in modelled time. Build one from a preset ([`LinkModel::pcie4_x16`], …, or by name with
/// [`FromStr`]) or fill the fields and call [`LinkModel::validate`]. Cost functions never panic;
/// on a model that fails validation their results are meaningless.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkModel {
    /// Peak (large-transfer) bandwidth host → device.
    pub h2d: Bandwidth,
    /// Peak (large-transfer) bandwidth device → host.
    pub d2h: Bandwidth,
    /// Fixed cost of every transfer (descriptor fetch, doorbell, completion), both directions.
    pub latency: ModelTime,
    /// Data-phase efficiency by transfer size, strictly increasing sizes; interpolated linearly
    /// in log(size), flat beyond either end. Empty means 1.0 at every size.
    pub curve: Vec<CurvePoint>,
    /// The device fault path.
    pub faults: FaultCosts,
    /// TLB invalidation.
    pub tlb: TlbCosts,
    /// Granule of a remote (mapped, zero-copy) access: every access moves whole lines.
    pub remote_line_bytes: u64,
}

/// §2.1: UVMSmart `transferBandwidth.cu`, GTX 1080 Ti, PCIe 3.0 x16, pageable `cudaMemcpy` H2D,
/// nvprof: (size in KiB, throughput). nvprof's "KB" and "GB/s" are binary units: 4 KiB in
/// 1.184 µs is 3.46 × 10⁹ B/s = 3.22 GiB/s, the "3.2 GB/s" quoted; 1 MiB in 87.011 µs is
/// 11.22 GiB/s, the "11.2 GB/s" quoted.
const PCIE3_MEASURED_KIB_GIBPS: [(u64, f64); 9] = [
    (4, 3.2),
    (8, 4.9),
    (16, 6.4),
    (32, 7.7),
    (64, 8.5),
    (128, 9.6),
    (256, 10.5),
    (512, 11.0),
    (1024, 11.2),
];

/// §2.1: UVMSmart's fitted model `bw = (2a/π)·atan(b·size_KB)` with a = 12 / 24 / 48 for
/// PCIe 3 / 4 / 5 x16. Its asymptote is `a`, read in the same unit as the measurements it was
/// fitted to (nvprof's GiB/s). 12 GiB/s = 12.9 GB/s is 82 % of Gen3's raw 15.75 GB/s (§4.1).
const PCIE3_PEAK: Bandwidth = Bandwidth::from_gib_per_sec(12.0);
const PCIE4_PEAK: Bandwidth = Bandwidth::from_gib_per_sec(24.0);
const PCIE5_PEAK: Bandwidth = Bandwidth::from_gib_per_sec(48.0);

/// §4.1: GTX 1080 Ti (Gen3) pinned D2H ~11.5 GB/s (cupy issue #1937).
const PCIE3_D2H_PEAK: Bandwidth = Bandwidth::from_gb_per_sec(11.5);

/// §0/§4.1: NVLink-C2C (GH200) measured 375 GB/s H2D, 297 GB/s D2H (Schieffer et al. ICPP'24).
const C2C_H2D_PEAK: Bandwidth = Bandwidth::from_gb_per_sec(375.0);
const C2C_D2H_PEAK: Bandwidth = Bandwidth::from_gb_per_sec(297.0);

/// Fixed per-transfer latency of every preset. The §2.1 times are end to end; how much of the
/// 1.184 µs of a 4 KiB copy is fixed is not measured. 0.5 µs is an assumption inside the range
/// the anchors allow: any value up to ~0.75 µs leaves a data-phase curve that rises with size
/// (above that, the derived efficiency at 4 KiB exceeds that at 8 KiB). No anchor gives C2C's
/// small-copy latency either; the same value keeps the presets differing only in bandwidth.
const LINK_LATENCY: ModelTime = ModelTime::from_nanos(500);

/// Where the PCIe curve reaches the peak: UVMSmart's fit (2/π)·atan(0.07292·8192) = 0.9989 is
/// within 0.1 % of its asymptote at 8 MiB (§2.1). Beyond the last measurement (1 MiB) the curve
/// rises linearly in log(size) to this point.
const CURVE_SATURATION_BYTES: u64 = 8 * MIB;

/// Device L2 line size (128 B on NVIDIA GPUs): the granule of a remote (zero-copy) access.
const REMOTE_LINE_BYTES: u64 = 128;

/// The copy whose data rate a stream of remote lines reaches: the largest size §2.1 measured
/// (see [`LinkModel::remote_access`]).
const REMOTE_STREAM_BYTES: u64 = MIB;

/// The data-phase efficiency curve of the PCIe presets, derived from §2.1: at each measured size
/// `s` with measured end-to-end time `t = s / bw`, the data phase takes `t − latency`, so
/// `efficiency = s / (peak × (t − latency))`, which makes a single transfer reproduce the
/// measurement exactly. 4 KiB → 0.459, 64 KiB → 0.761, 1 MiB → 0.939, 8 MiB → 1.0.
/// PCIe 4 and 5 reuse the shape, as UVMSmart does (one `b` for all three generations).
fn pcie_curve() -> Vec<CurvePoint> {
    let latency_s = LINK_LATENCY.as_nanos() as f64 / NANOS_PER_SEC;
    let mut curve: Vec<CurvePoint> = PCIE3_MEASURED_KIB_GIBPS
        .iter()
        .map(|&(kib, gibps)| {
            let bytes = kib * KIB;
            let measured_s = bytes as f64 / (gibps * GIB);
            let efficiency = bytes as f64 / (PCIE3_PEAK.bytes_per_sec() * (measured_s - latency_s));
            CurvePoint { bytes, efficiency }
        })
        .collect();
    curve.push(CurvePoint {
        bytes: CURVE_SATURATION_BYTES,
        efficiency: 1.0,
    });
    curve
}

impl LinkModel {
    /// PCIe 3.0 x16 (GTX 1080 Ti class).
    ///
    /// * H2D peak 12 GiB/s (12.9 GB/s): UVMSmart's fitted asymptote a = 12 (§2.1).
    /// * D2H peak 11.5 GB/s: GTX 1080 Ti pinned D2H ~11.5 GB/s (§4.1, cupy #1937).
    /// * Latency 0.5 µs and the curve derived from the §2.1 measurements (4 KiB 3.2 GiB/s …
    ///   64 KiB 8.5 GiB/s … 1 MiB 11.2 GiB/s), which a single H2D transfer reproduces; a 2 MiB
    ///   H2D copy comes out at 11.5 GiB/s.
    /// * Faults [`FaultCosts::UVM`], TLB [`TlbCosts::SHOOTDOWN`].
    pub fn pcie3_x16() -> Self {
        LinkModel {
            h2d: PCIE3_PEAK,
            d2h: PCIE3_D2H_PEAK,
            latency: LINK_LATENCY,
            curve: pcie_curve(),
            faults: FaultCosts::UVM,
            tlb: TlbCosts::SHOOTDOWN,
            remote_line_bytes: REMOTE_LINE_BYTES,
        }
    }

    /// PCIe 4.0 x16 (A100 / RTX A5000 class).
    ///
    /// * Peak 24 GiB/s (25.8 GB/s) each way: UVMSmart's a = 24 (§2.1); measured A100 H2D
    ///   25.1 GB/s at 0.5–1 GiB (§4.1, nvbandwidth #42), §0 "~25 GB/s".
    /// * Latency and curve as [`LinkModel::pcie3_x16`] (UVMSmart keeps the curve shape across
    ///   generations).
    /// * Faults [`FaultCosts::UVM`], TLB [`TlbCosts::SHOOTDOWN`].
    pub fn pcie4_x16() -> Self {
        LinkModel {
            h2d: PCIE4_PEAK,
            d2h: PCIE4_PEAK,
            ..Self::pcie3_x16()
        }
    }

    /// PCIe 5.0 x16 (H100 PCIe class).
    ///
    /// * Peak 48 GiB/s (51.5 GB/s) each way: UVMSmart's a = 48 (§2.1); measured H100 H2D CE
    ///   55.6 GB/s, D2H 52.8 GB/s (§4.1), §0 "~50–56 GB/s".
    /// * Latency and curve as [`LinkModel::pcie3_x16`].
    /// * Faults [`FaultCosts::UVM`], TLB [`TlbCosts::SHOOTDOWN`].
    pub fn pcie5_x16() -> Self {
        LinkModel {
            h2d: PCIE5_PEAK,
            d2h: PCIE5_PEAK,
            ..Self::pcie3_x16()
        }
    }

    /// NVLink-C2C (GH200).
    ///
    /// * H2D peak 375 GB/s, D2H 297 GB/s: Schieffer et al. ICPP'24 (§0, §4.1; spec 450 per
    ///   direction).
    /// * Latency and curve shape as the PCIe presets: no anchor gives C2C small-copy costs.
    /// * Faults [`FaultCosts::UVM`] (the driver's host software does not get faster with the
    ///   link, §1.2), TLB [`TlbCosts::SHOOTDOWN`].
    pub fn nvlink_c2c() -> Self {
        LinkModel {
            h2d: C2C_H2D_PEAK,
            d2h: C2C_D2H_PEAK,
            ..Self::pcie3_x16()
        }
    }

    /// No model: infinite bandwidth, zero latency, zero fault and TLB costs. Every cost function
    /// returns [`ModelTime::ZERO`] and copies run at memcpy speed.
    pub fn off() -> Self {
        LinkModel {
            h2d: Bandwidth::INFINITE,
            d2h: Bandwidth::INFINITE,
            latency: ModelTime::ZERO,
            curve: Vec::new(),
            faults: FaultCosts::ZERO,
            tlb: TlbCosts::ZERO,
            remote_line_bytes: REMOTE_LINE_BYTES,
        }
    }

    /// The model of a preset.
    pub fn preset(preset: LinkPreset) -> Self {
        match preset {
            LinkPreset::Pcie3X16 => Self::pcie3_x16(),
            LinkPreset::Pcie4X16 => Self::pcie4_x16(),
            LinkPreset::Pcie5X16 => Self::pcie5_x16(),
            LinkPreset::NvlinkC2c => Self::nvlink_c2c(),
            LinkPreset::Off => Self::off(),
        }
    }

    /// Does every cost function return zero?
    pub fn is_off(&self) -> bool {
        self.h2d.is_infinite()
            && self.d2h.is_infinite()
            && self.latency.is_zero()
            && self.faults == FaultCosts::ZERO
            && self.tlb.invalidate.is_zero()
            && self.tlb.per_range.is_zero()
    }

    /// Checks the configuration: positive bandwidths, a curve with positive strictly increasing
    /// sizes and efficiencies in (0, 1] that never fall and never grow faster than size (between
    /// points `(s0, e0)` and `(s1, e1)`: `e1 − e0 ≤ e0 · ln(s1/s0)`, which keeps
    /// `size / efficiency(size)`, hence transfer time, non-decreasing), non-zero remote line and
    /// TLB ceiling.
    pub fn validate(&self) -> Result<(), LinkError> {
        for (dir, bw) in [
            (Direction::HostToDevice, self.h2d),
            (Direction::DeviceToHost, self.d2h),
        ] {
            let bps = bw.bytes_per_sec();
            if bps.is_nan() || bps <= 0.0 {
                return Err(LinkError::NonPositiveBandwidth {
                    dir,
                    bytes_per_sec: bps,
                });
            }
        }
        for (index, p) in self.curve.iter().enumerate() {
            if p.bytes == 0 {
                return Err(LinkError::ZeroSizePoint { index });
            }
            let e = p.efficiency;
            if e.is_nan() || e <= 0.0 || e > 1.0 {
                return Err(LinkError::EfficiencyOutOfRange {
                    index,
                    efficiency: p.efficiency,
                });
            }
        }
        for (i, w) in self.curve.windows(2).enumerate() {
            let (a, b) = (w[0], w[1]);
            let index = i + 1;
            if b.bytes <= a.bytes {
                return Err(LinkError::CurveSizesNotIncreasing {
                    index,
                    bytes: b.bytes,
                });
            }
            if b.efficiency < a.efficiency {
                return Err(LinkError::CurveNotMonotone {
                    index,
                    bytes: b.bytes,
                });
            }
            // Within the segment e(s) = e0 + k·ln(s/s0); d(s/e)/ds ≥ 0 ⇔ k ≤ e(s), and e(s) ≥ e0.
            let k = (b.efficiency - a.efficiency) / (b.bytes as f64 / a.bytes as f64).ln();
            if k > a.efficiency {
                return Err(LinkError::CurveOutrunsSize {
                    index,
                    bytes: b.bytes,
                });
            }
        }
        if self.remote_line_bytes == 0 {
            return Err(LinkError::ZeroRemoteLine);
        }
        if self.tlb.full_flush_ranges == 0 {
            return Err(LinkError::ZeroFlushCeiling);
        }
        Ok(())
    }

    /// Peak bandwidth in `dir`.
    pub fn peak(&self, dir: Direction) -> Bandwidth {
        match dir {
            Direction::HostToDevice => self.h2d,
            Direction::DeviceToHost => self.d2h,
        }
    }

    /// Data-phase efficiency of a transfer of `bytes`: the curve interpolated linearly in
    /// log(size), flat beyond either end, 1.0 for an empty curve.
    pub fn efficiency(&self, bytes: u64) -> f64 {
        let c = &self.curve;
        let (Some(first), Some(last)) = (c.first(), c.last()) else {
            return 1.0;
        };
        if bytes <= first.bytes {
            return first.efficiency;
        }
        // First point at or above `bytes`; at least 1 because c[0].bytes < bytes.
        let i = c.partition_point(|p| p.bytes < bytes);
        let Some(&hi) = c.get(i) else {
            return last.efficiency;
        };
        let lo = c[i - 1];
        let f = (bytes as f64 / lo.bytes as f64).ln() / (hi.bytes as f64 / lo.bytes as f64).ln();
        lo.efficiency + (hi.efficiency - lo.efficiency) * f
    }

    /// Data phase of a transfer, in nanoseconds (unrounded).
    fn data_ns(&self, dir: Direction, bytes: u64) -> f64 {
        if bytes == 0 {
            return 0.0;
        }
        bytes as f64 * NANOS_PER_SEC / (self.peak(dir).bytes_per_sec() * self.efficiency(bytes))
    }

    /// One transfer, in nanoseconds (unrounded).
    fn transfer_ns(&self, dir: Direction, bytes: u64) -> f64 {
        if bytes == 0 {
            return 0.0;
        }
        self.latency.as_nanos() as f64 + self.data_ns(dir, bytes)
    }

    /// A pipelined batch, in nanoseconds (unrounded). Two stages: setups (the fixed latency) run
    /// one after another and ahead of the data; data phases run one after another, each once its
    /// setup is done.
    fn transfers_ns(&self, dir: Direction, sizes: &[u64]) -> f64 {
        let latency = self.latency.as_nanos() as f64;
        let (mut setup_done, mut data_done) = (0.0f64, 0.0f64);
        for &bytes in sizes.iter().filter(|&&b| b > 0) {
            setup_done += latency;
            data_done = setup_done.max(data_done) + self.data_ns(dir, bytes);
        }
        data_done
    }

    /// Modelled time of one transfer of `bytes` in `dir`: `latency + bytes / (peak ×
    /// efficiency(bytes))`. Zero bytes cost nothing.
    pub fn transfer(&self, dir: Direction, bytes: u64) -> ModelTime {
        ModelTime::from_nanos_f64(self.transfer_ns(dir, bytes))
    }

    /// Modelled time of a batch of transfers queued together on one copy engine in `dir`.
    ///
    /// Choice: **pipelined**. Each transfer pays the fixed latency once, but the latency of
    /// transfer `i + 1` (descriptor fetch, doorbell) overlaps the data phase of transfer `i`;
    /// latencies run one after another, and so do data phases (one link, one direction). For
    /// `n` transfers the batch takes `max over k of (k × latency + Σ_{i ≥ k} data_i)`: about
    /// `latency + Σ data` when copies are larger than `latency × bandwidth` (data-bound), about
    /// `n × latency` when they are smaller (setup-bound: at 0.5 µs, two million copies a
    /// second). Never less than `latency + Σ data`, never more than the transfers one by one;
    /// a batch of one costs [`LinkModel::transfer`]; zero-byte entries cost nothing. Each
    /// transfer keeps the efficiency of its own size: batching hides latency, it does not merge
    /// small copies into a large one (hmm.rst: batch, or per-call overhead dominates).
    pub fn transfers(&self, dir: Direction, sizes: &[u64]) -> ModelTime {
        ModelTime::from_nanos_f64(self.transfers_ns(dir, sizes))
    }

    /// Effective end-to-end bandwidth of one transfer of `bytes` (latency included).
    pub fn transfer_bandwidth(&self, dir: Direction, bytes: u64) -> Bandwidth {
        let ns = self.transfer_ns(dir, bytes);
        if ns > 0.0 {
            Bandwidth::from_bytes_per_sec(bytes as f64 * NANOS_PER_SEC / ns)
        } else {
            Bandwidth::INFINITE
        }
    }

    /// Host-side service of one fault batch, transfers excluded: `batch + faults × per_fault +
    /// vablocks × per_vablock`. `faults` counts fault-buffer entries, duplicates included (each
    /// is fetched and sorted, §1.2); `vablocks` the distinct 2 MiB blocks serviced. An empty
    /// batch costs nothing.
    pub fn fault_service(&self, faults: u64, vablocks: u64) -> ModelTime {
        if faults == 0 {
            return ModelTime::ZERO;
        }
        let f = &self.faults;
        f.batch
            .saturating_add(f.per_fault.saturating_mul(faults))
            .saturating_add(f.per_vablock.saturating_mul(vablocks))
    }

    /// One replay (per serviced batch).
    pub fn replay(&self) -> ModelTime {
        self.faults.replay
    }

    /// One CPU fault on a device-resident page (`migrate_to_ram`), the copy back excluded: charge
    /// that as a [`Direction::DeviceToHost`] transfer.
    pub fn cpu_fault(&self) -> ModelTime {
        self.faults.cpu_fault
    }

    /// One device fault batch, whole: its service ([`LinkModel::fault_service`]), its migrations
    /// to the device as one pipelined batch ([`LinkModel::transfers`]) and its replay. Evictions
    /// it causes are charged apart, as [`Direction::DeviceToHost`] transfers.
    pub fn fault_batch(&self, faults: u64, vablocks: u64, migrations: &[u64]) -> FaultBatchCost {
        FaultBatchCost {
            faults,
            service: self.fault_service(faults, vablocks),
            migrate: self.transfers(Direction::HostToDevice, migrations),
            replay: if faults == 0 {
                ModelTime::ZERO
            } else {
                self.replay()
            },
        }
    }

    /// One TLB invalidation covering `ranges` ranges: `invalidate + min(ranges, ceiling) ×
    /// per_range` (past the ceiling it is a full flush). Zero ranges cost nothing.
    pub fn tlb_invalidate(&self, ranges: u64) -> ModelTime {
        if ranges == 0 {
            return ModelTime::ZERO;
        }
        let t = &self.tlb;
        t.invalidate
            .saturating_add(t.per_range.saturating_mul(ranges.min(t.full_flush_ranges)))
    }

    /// A remote (mapped, zero-copy) access of `bytes` over the link in `dir` (a device reading
    /// system memory is [`Direction::HostToDevice`]): whole lines of `remote_line_bytes`, each
    /// moved at the data rate of a large copy, `peak × efficiency(REMOTE_STREAM_BYTES)`.
    ///
    /// A streaming model: many lines in flight, so no per-line latency, and no per-transfer
    /// setup or size ramp either, which belong to the copy engine's DMA, not to loads. EMOGI
    /// (Min et al., PVLDB 14(2), 2020) measured that a GPU's cache-line-sized accesses to host
    /// memory, coalesced and aligned, nearly saturate PCIe once enough are outstanding; "nearly"
    /// is taken as the rate of the largest copy §2.1 measured (1 MiB, 94 % of the peak), so a
    /// stream of lines is never faster than the copy engine's best. The simulated warp charges
    /// each distinct line once per execution (its coalesced requests), so an uncoalesced 4-byte
    /// load pays a whole line, the waste EMOGI measured. Nothing is cached: touching the same
    /// bytes again costs again.
    pub fn remote_access(&self, dir: Direction, bytes: u64) -> ModelTime {
        let line = self.remote_line_bytes.max(1);
        let lines = bytes.div_ceil(line);
        let per_line =
            self.data_ns(dir, REMOTE_STREAM_BYTES) * line as f64 / REMOTE_STREAM_BYTES as f64;
        ModelTime::from_nanos_f64(lines as f64 * per_line)
    }
}

impl FromStr for LinkModel {
    type Err = LinkError;

    /// A preset by name: `pcie3`, `pcie4`, `pcie5`, `nvlink-c2c` or `off`.
    fn from_str(s: &str) -> Result<Self, LinkError> {
        Ok(LinkModel::preset(s.parse()?))
    }
}

/// The named presets (for the CLI's `--link`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkPreset {
    /// [`LinkModel::pcie3_x16`], `pcie3`.
    Pcie3X16,
    /// [`LinkModel::pcie4_x16`], `pcie4`.
    Pcie4X16,
    /// [`LinkModel::pcie5_x16`], `pcie5`.
    Pcie5X16,
    /// [`LinkModel::nvlink_c2c`], `nvlink-c2c`.
    NvlinkC2c,
    /// [`LinkModel::off`], `off`.
    Off,
}

impl LinkPreset {
    /// Every preset.
    pub const ALL: [LinkPreset; 5] = [
        LinkPreset::Pcie3X16,
        LinkPreset::Pcie4X16,
        LinkPreset::Pcie5X16,
        LinkPreset::NvlinkC2c,
        LinkPreset::Off,
    ];

    /// Its name, as [`FromStr`] accepts it.
    pub fn name(self) -> &'static str {
        match self {
            LinkPreset::Pcie3X16 => "pcie3",
            LinkPreset::Pcie4X16 => "pcie4",
            LinkPreset::Pcie5X16 => "pcie5",
            LinkPreset::NvlinkC2c => "nvlink-c2c",
            LinkPreset::Off => "off",
        }
    }

    /// Its model.
    pub fn model(self) -> LinkModel {
        LinkModel::preset(self)
    }
}

impl fmt::Display for LinkPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LinkPreset {
    type Err = LinkError;

    /// `pcie3`, `pcie4`, `pcie5`, `nvlink-c2c`, `off` (ASCII case ignored).
    fn from_str(s: &str) -> Result<Self, LinkError> {
        LinkPreset::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| LinkError::UnknownPreset { name: s.to_owned() })
    }
}

/// The modelled cost of one device fault batch, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultBatchCost {
    /// Fault-buffer entries in the batch.
    pub faults: u64,
    /// Host-side service ([`Cause::FaultService`]).
    pub service: ModelTime,
    /// Migrations to the device ([`Cause::MigrateToDevice`]).
    pub migrate: ModelTime,
    /// The replay ([`Cause::Replay`]).
    pub replay: ModelTime,
}

impl FaultBatchCost {
    /// Service, migrations and replay together.
    pub fn total(&self) -> ModelTime {
        self.service
            .saturating_add(self.migrate)
            .saturating_add(self.replay)
    }

    /// The batch's total over its faults (zero for an empty batch): the cost one fault sees
    /// when it shares the batch with the others.
    pub fn per_fault(&self) -> ModelTime {
        match self.faults {
            0 => ModelTime::ZERO,
            n => ModelTime::from_nanos(self.total().as_nanos() / n),
        }
    }

    /// Charges each part to `clock` under its cause.
    pub fn charge_to(&self, clock: &DeviceClock) {
        clock.charge(Cause::FaultService, self.service);
        clock.charge(Cause::MigrateToDevice, self.migrate);
        clock.charge(Cause::Replay, self.replay);
    }
}

// ---------------------------------------------------------------------------------------------
// The clock
// ---------------------------------------------------------------------------------------------

/// What modelled time was spent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// Copies host → device (fault-driven, prefetch).
    MigrateToDevice = 0,
    /// Copies device → host (eviction, CPU faults).
    MigrateToHost = 1,
    /// Host-side service of device fault batches.
    FaultService = 2,
    /// Replays.
    Replay = 3,
    /// CPU faults on device-resident pages.
    CpuFault = 4,
    /// TLB invalidations.
    TlbInvalidate = 5,
    /// Remote (zero-copy) accesses over the link.
    RemoteAccess = 6,
    /// The device's own work.
    Compute = 7,
}

impl Cause {
    /// Number of causes.
    pub const COUNT: usize = 8;
    /// Every cause, in index order.
    pub const ALL: [Cause; Cause::COUNT] = [
        Cause::MigrateToDevice,
        Cause::MigrateToHost,
        Cause::FaultService,
        Cause::Replay,
        Cause::CpuFault,
        Cause::TlbInvalidate,
        Cause::RemoteAccess,
        Cause::Compute,
    ];

    /// Dense index, `0..COUNT`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Cause::MigrateToDevice => "migrate-to-device",
            Cause::MigrateToHost => "migrate-to-host",
            Cause::FaultService => "fault-service",
            Cause::Replay => "replay",
            Cause::CpuFault => "cpu-fault",
            Cause::TlbInvalidate => "tlb-invalidate",
            Cause::RemoteAccess => "remote-access",
            Cause::Compute => "compute",
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the transfers a thread charges relate to the clock's timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TransferMode {
    /// The timeline waits for the transfer's end.
    Sync,
    /// Queued on the copy engine; the next replay's fence waits for it.
    Async,
    /// Queued on the copy engine; only a full fence (a launch's end) waits for it.
    Ahead,
}

thread_local! {
    /// How transfers this thread charges run on the copy engines.
    static TRANSFER_MODE: std::cell::Cell<TransferMode> =
        const { std::cell::Cell::new(TransferMode::Sync) };
}

/// While alive, the transfers this thread charges to a [`DeviceClock`] are *asynchronous*: they
/// queue on the copy engine of their direction and the clock's timeline does not wait for them
/// until a [`DeviceClock::fence`]. The fault service holds one while it services a batch and
/// while it migrates what the prefetchers queued: UVM pushes a batch's copies to the copy engines
/// and its page-table updates to channels, and waits for their trackers only before the replay,
/// so the host work on the next block overlaps the copy of the previous one, and copies queued
/// between batches run while the driver fetches and sorts the next batch.
/// [`AsyncTransfers::suspend`] makes them synchronous again inside such a scope (an eviction's
/// copy must land before its frames are reused).
///
/// [`AsyncTransfers::ahead`] is for migrations no stalled warp waits for: what the prefetchers
/// queued past the blocks a batch faulted on, and access-counter migrations of pages warps
/// already reach remotely. They run on the copy engines at a lower priority than every other
/// transfer, in what the link has left, and the replays' fences ignore them
/// ([`DeviceClock::fence_replay`]): the next replay waits for the copies its own batch needs,
/// which take the link ahead of a readahead queued before them, as a page-cache read waits for
/// its page and not for the asynchronous readahead window, and a block layer serves the read
/// before the readahead. A launch's end ([`DeviceClock::fence`]) waits for everything. Host
/// work charged inside `ahead` is background too: it takes the host timeline, but no warp waits
/// for it, so it runs beside the launch's compute ([`DeviceClock::launch_computed`]).
#[derive(Debug)]
pub struct AsyncTransfers {
    prev: TransferMode,
}

impl AsyncTransfers {
    fn set(mode: TransferMode) -> Self {
        AsyncTransfers {
            prev: TRANSFER_MODE.with(|c| c.replace(mode)),
        }
    }

    /// Transfers charged by this thread are asynchronous until the guard drops; the next
    /// replay waits for them.
    pub fn enter() -> Self {
        Self::set(TransferMode::Async)
    }

    /// Transfers charged by this thread are asynchronous until the guard drops, and no replay
    /// waits for them: only a full fence does.
    pub fn ahead() -> Self {
        Self::set(TransferMode::Ahead)
    }

    /// Transfers charged by this thread are synchronous until the guard drops.
    pub fn suspend() -> Self {
        Self::set(TransferMode::Sync)
    }
}

impl Drop for AsyncTransfers {
    fn drop(&mut self) {
        TRANSFER_MODE.with(|c| c.set(self.prev));
    }
}

/// A device's modelled clock: the modelled time charged to it, by cause, and a timeline.
/// Lock-free: copy engines, the fault service and CPU-fault handlers charge it concurrently
/// through `&self`; times saturate at [`ModelTime::MAX`].
///
/// Two readings ([`ClockReport`]): `total`, the sum of every charge (how long each part of the
/// memory system was busy), and `elapsed`, the end of the timeline (how long it took). They
/// differ only by what overlapped:
///
/// ```text
///   host (fault service, replay, CPU faults, ...)  |batch 20us|blk|blk|  wait  |replay|
///   copy engine, host to device                          |<- copy 0 ->|<- copy 1 ->|
///                                                        ^ issued     fence before the replay ^
/// ```
///
/// Host-side charges run one after another on the timeline. A transfer runs on its direction's
/// copy engine, after whatever that engine already runs; a synchronous one (the default) makes
/// the timeline wait for its end, an asynchronous one (inside [`AsyncTransfers`]) does not, until
/// the next [`DeviceClock::fence`]. With no asynchronous transfer, `elapsed` equals `total`
/// (plus the launches' compute, where [`DeviceClock::launch_computed`] placed it: after the
/// launch's own stalls, beside its background work).
///
/// Readahead ([`AsyncTransfers::ahead`]) has a queue of its own on each engine and yields to
/// every other transfer: one that starts while a readahead is still running pushes the
/// readahead's end back by its own length, so the link is never idle with work queued, and
/// never carries more than one transfer at a time. This assumes readahead is issued in pieces
/// small enough that a demand copy waits for none (a 64 KiB piece is 5 µs on PCIe 3).
#[derive(Debug, Default)]
pub struct DeviceClock {
    nanos: [AtomicU64; Cause::COUNT],
    charges: [AtomicU64; Cause::COUNT],
    /// The host timeline: where serial work has reached.
    now: AtomicU64,
    /// When each copy engine (host to device, device to host) finishes what it was given,
    /// readahead aside.
    engines: [AtomicU64; 2],
    /// When each engine's readahead ends: it runs in what the other transfers leave.
    ahead: [AtomicU64; 2],
    /// When the last transfer the next replay waits for ends (every asynchronous transfer but
    /// those queued [`AsyncTransfers::ahead`]).
    due: AtomicU64,
    /// The timeline as the warps see it: every host charge but the background ones (charged
    /// inside [`AsyncTransfers::ahead`]: no warp waits for them), synchronous transfers, and
    /// the replays' waits for their copies. How far it moves during a launch is how long the
    /// launch's warps were held up ([`DeviceClock::launch_computed`]).
    demand: AtomicU64,
    /// Compute placed on the timeline by [`DeviceClock::launch_computed`].
    compute: AtomicU64,
    /// Of that compute, how much ran beside background work (the timeline moved that much less
    /// than the memory system's work and the compute one after the other).
    overlap: AtomicU64,
}

/// Adds `t` to `a`, saturating at `u64::MAX`; returns the value before.
fn add_saturating(a: &AtomicU64, t: u64) -> u64 {
    // The closure always returns Some, so fetch_update cannot fail.
    a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ns| {
        Some(ns.saturating_add(t))
    })
    .unwrap_or(0)
}

/// Where a launch began on a [`DeviceClock`]'s timelines ([`DeviceClock::launch_mark`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchMark {
    now: u64,
    demand: u64,
}

impl DeviceClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `t` under `cause` and counts one charge (even a zero one: with the model off the
    /// counts still say how many transfers and faults there were). A migration cause is a
    /// transfer on its copy engine, synchronous unless this thread is inside
    /// [`AsyncTransfers`]; any other cause runs on the host timeline.
    pub fn charge(&self, cause: Cause, t: ModelTime) {
        let i = cause.index();
        add_saturating(&self.nanos[i], t.as_nanos());
        let engine = match cause {
            Cause::MigrateToDevice => Some(0),
            Cause::MigrateToHost => Some(1),
            _ => None,
        };
        let mode = TRANSFER_MODE.with(std::cell::Cell::get);
        match engine.map(|e| (e, mode)) {
            None => {
                add_saturating(&self.now, t.as_nanos());
                if mode != TransferMode::Ahead {
                    add_saturating(&self.demand, t.as_nanos());
                }
            }
            Some((e, TransferMode::Sync)) => {
                // The timeline waits for the engine, then for the transfer (added, so that
                // synchronous charges from several threads still sum); so do the warps.
                let busy = self.engines[e].load(Ordering::Relaxed);
                self.now.fetch_max(busy, Ordering::Relaxed);
                self.demand.fetch_max(busy, Ordering::Relaxed);
                add_saturating(&self.demand, t.as_nanos());
                let start = add_saturating(&self.now, t.as_nanos());
                self.engines[e].fetch_max(start.saturating_add(t.as_nanos()), Ordering::Relaxed);
                self.displace_readahead(e, start, t);
            }
            Some((e, TransferMode::Async)) => {
                // Queued behind the engine's work, from now on; the timeline goes on.
                let now = self.now.load(Ordering::Relaxed);
                // The closure always returns Some, so fetch_update cannot fail.
                let start = self.engines[e]
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
                        Some(x.max(now).saturating_add(t.as_nanos()))
                    })
                    .unwrap_or(0)
                    .max(now);
                self.due
                    .fetch_max(start.saturating_add(t.as_nanos()), Ordering::Relaxed);
                self.displace_readahead(e, start, t);
            }
            Some((e, TransferMode::Ahead)) => {
                // After the readahead already queued and whatever else the engine has.
                let after = self
                    .now
                    .load(Ordering::Relaxed)
                    .max(self.engines[e].load(Ordering::Relaxed));
                // The closure always returns Some, so fetch_update cannot fail.
                let _ = self.ahead[e].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
                    Some(x.max(after).saturating_add(t.as_nanos()))
                });
            }
        }
        // No event per charge: remote accesses charge once per access of a lane, and even a
        // disabled `trace!` costs a callsite check there; the clock itself is the record
        // (`snapshot`: time and count by cause).
        self.charges[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A transfer of `t` on engine `e` from `start` on takes the link from a readahead still
    /// running then, which ends that much later.
    fn displace_readahead(&self, e: usize, start: u64, t: ModelTime) {
        // A `None` from the closure (no readahead running) leaves the value as it is.
        let _ = self.ahead[e].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
            (x > start).then(|| x.saturating_add(t.as_nanos()))
        });
    }

    /// When every transfer queued so far ends.
    fn engines_done(&self) -> u64 {
        self.engines
            .iter()
            .chain(&self.ahead)
            .map(|a| a.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// The timeline waits for every transfer queued so far (a launch, before it ends).
    pub fn fence(&self) {
        self.now.fetch_max(self.engines_done(), Ordering::Relaxed);
    }

    /// The timeline waits for the transfers a replay needs: every one queued so far except
    /// those queued [`AsyncTransfers::ahead`] (unless a needed one queued behind them).
    pub fn fence_replay(&self) {
        let due = self.due.load(Ordering::Relaxed);
        self.now.fetch_max(due, Ordering::Relaxed);
        self.demand.fetch_max(due, Ordering::Relaxed);
    }

    /// Marks where a launch begins, for [`DeviceClock::launch_computed`].
    pub fn launch_mark(&self) -> LaunchMark {
        let now = self.now.load(Ordering::Relaxed);
        // Nothing before the launch overlaps it: the warps' view starts where the timeline is.
        let demand = self.demand.fetch_max(now, Ordering::Relaxed).max(now);
        LaunchMark { now, demand }
    }

    /// Places the compute of the launch that began at `mark` on the timeline, once the launch
    /// has ended (after its [`DeviceClock::fence`]). The device computes whenever its warps
    /// are not held up, so the launch ends `compute` after its start plus however long they
    /// were held up (what the warps' timeline moved since the mark: demand faults' service,
    /// the replays' waits for their copies, synchronous transfers, remote accesses), or when
    /// the memory system's work is done, whichever is later. Background work (readahead and
    /// access-counter migrations, charged inside [`AsyncTransfers::ahead`]) thus runs beside
    /// the compute, as a driver's worker services a prefetch while the warps compute. Work no
    /// warp waits for is the only overlap: without it the launch ends where the memory
    /// system's work and the compute one after the other would.
    ///
    /// This assumes the compute is spread over the launch: a stall holds up every warp, and
    /// background work overlaps any compute. A launch whose background work comes at its end,
    /// after the warps finished, is charged optimistically by up to that work; one whose
    /// stalls hold up only some warps, pessimistically.
    pub fn launch_computed(&self, mark: LaunchMark, compute: ModelTime) {
        let held = self
            .demand
            .load(Ordering::Relaxed)
            .saturating_sub(mark.demand);
        let compute = compute.as_nanos();
        let end = mark.now.saturating_add(compute).saturating_add(held);
        let before = self.now.fetch_max(end, Ordering::Relaxed);
        let now = before.max(end);
        self.demand.fetch_max(now, Ordering::Relaxed);
        // One after the other, the launch would have ended at `before + compute`.
        let overlap = before.saturating_add(compute).saturating_sub(now);
        add_saturating(&self.compute, compute);
        add_saturating(&self.overlap, overlap);
    }

    /// The end of the timeline: the host's work and every queued transfer done.
    pub fn elapsed(&self) -> ModelTime {
        ModelTime(self.now.load(Ordering::Relaxed).max(self.engines_done()))
    }

    /// Modelled time charged so far, all causes.
    pub fn total(&self) -> ModelTime {
        Cause::ALL.iter().map(|&c| self.get(c)).sum()
    }

    /// Modelled time charged so far under `cause`.
    pub fn get(&self, cause: Cause) -> ModelTime {
        ModelTime(self.nanos[cause.index()].load(Ordering::Relaxed))
    }

    /// Reads every cause. Charges racing with the snapshot land in this one or the next;
    /// `total` is always the sum of `by_cause` as read.
    pub fn snapshot(&self) -> ClockReport {
        let by_cause = std::array::from_fn(|i| ModelTime(self.nanos[i].load(Ordering::Relaxed)));
        let charges = std::array::from_fn(|i| self.charges[i].load(Ordering::Relaxed));
        ClockReport {
            total: by_cause.iter().copied().sum(),
            elapsed: self.elapsed(),
            compute: ModelTime(self.compute.load(Ordering::Relaxed)),
            overlap: ModelTime(self.overlap.load(Ordering::Relaxed)),
            by_cause,
            charges,
        }
    }
}

/// A copy of a [`DeviceClock`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockReport {
    /// Sum over causes: how long the parts of the memory system were busy.
    pub total: ModelTime,
    /// The end of the device's timeline ([`DeviceClock`]): `total` and `compute` less what
    /// overlapped.
    pub elapsed: ModelTime,
    /// Launches' compute placed on the timeline ([`DeviceClock::launch_computed`]); not in
    /// `total`.
    pub compute: ModelTime,
    /// Of `compute`, what ran beside background work of the memory system.
    pub overlap: ModelTime,
    /// Modelled time by cause, indexed by [`Cause::index`].
    pub by_cause: [ModelTime; Cause::COUNT],
    /// Number of charges by cause, indexed by [`Cause::index`].
    pub charges: [u64; Cause::COUNT],
}

impl ClockReport {
    /// Time under `cause`.
    pub fn get(&self, cause: Cause) -> ModelTime {
        self.by_cause[cause.index()]
    }

    /// Charges under `cause`.
    pub fn charges_of(&self, cause: Cause) -> u64 {
        self.charges[cause.index()]
    }

    /// What was charged between `earlier` and this report (saturating at zero).
    pub fn since(&self, earlier: &ClockReport) -> ClockReport {
        let by_cause =
            std::array::from_fn(|i| self.by_cause[i].saturating_sub(earlier.by_cause[i]));
        let charges = std::array::from_fn(|i| self.charges[i].saturating_sub(earlier.charges[i]));
        ClockReport {
            total: by_cause.iter().copied().sum(),
            elapsed: self.elapsed.saturating_sub(earlier.elapsed),
            compute: self.compute.saturating_sub(earlier.compute),
            overlap: self.overlap.saturating_sub(earlier.overlap),
            by_cause,
            charges,
        }
    }

    /// This modelled time beside a measured wall time.
    pub fn against(&self, wall: Duration) -> TimeReport {
        TimeReport::new(wall, self.total)
    }
}

impl fmt::Display for ClockReport {
    /// `modelled 1.234 ms` followed by one `; cause time (n charges)` per cause charged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "modelled {}", self.total)?;
        for c in Cause::ALL {
            if self.charges_of(c) > 0 {
                write!(f, "; {c} {} ({} charges)", self.get(c), self.charges_of(c))?;
            }
        }
        Ok(())
    }
}

/// Wall time and modelled time of the same run, side by side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeReport {
    /// Measured on this machine.
    pub wall: Duration,
    /// Charged to the device clock.
    pub modelled: ModelTime,
}

impl TimeReport {
    /// Pairs a wall time with a modelled time.
    pub fn new(wall: Duration, modelled: ModelTime) -> Self {
        TimeReport { wall, modelled }
    }

    /// `modelled / wall`: how many times longer the modelled hardware takes than this run did.
    /// `None` when no wall time elapsed.
    pub fn ratio(&self) -> Option<f64> {
        let wall = self.wall.as_secs_f64();
        (wall > 0.0).then(|| self.modelled.as_secs_f64() / wall)
    }
}

impl fmt::Display for TimeReport {
    /// `wall 1.200 ms, modelled 3.400 ms (2.83x)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wall {}, modelled {}",
            ModelTime::from_duration(self.wall),
            self.modelled
        )?;
        match self.ratio() {
            Some(r) => write!(f, " ({r:.2}x)"),
            None => write!(f, " (-)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    const H2D: Direction = Direction::HostToDevice;
    const D2H: Direction = Direction::DeviceToHost;

    /// Counts the events it is given, at every level.
    #[derive(Default)]
    struct EventCounter(std::sync::atomic::AtomicU64);

    impl tracing::Subscriber for EventCounter {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn the_timeline_overlaps_only_asynchronous_transfers_until_a_fence() {
        let us = ModelTime::from_micros;
        // Synchronous: everything in a row, elapsed = total.
        let c = DeviceClock::new();
        c.charge(Cause::FaultService, us(20));
        c.charge(Cause::MigrateToDevice, us(170));
        c.charge(Cause::Replay, us(5));
        let r = c.snapshot();
        assert_eq!((r.total, r.elapsed), (us(195), us(195)));
        // Asynchronous: the copy runs while the host services the next block; the fence waits
        // for it; the replay comes after.
        let c = DeviceClock::new();
        c.charge(Cause::FaultService, us(20));
        {
            let _async = AsyncTransfers::enter();
            c.charge(Cause::MigrateToDevice, us(170));
            c.charge(Cause::FaultService, us(10));
            c.charge(Cause::MigrateToDevice, us(170));
            // An eviction inside the scope is synchronous again: it waits for the engine too.
            {
                let _sync = AsyncTransfers::suspend();
                c.charge(Cause::MigrateToHost, us(100));
            }
            assert_eq!(c.snapshot().elapsed, us(20 + 10 + 100).max(us(20 + 340)));
        }
        c.fence();
        c.charge(Cause::Replay, us(5));
        let r = c.snapshot();
        assert_eq!(r.total, us(20 + 170 + 10 + 170 + 100 + 5));
        // Host: 20, then 10 (30); H2D engine busy 20..360; the synchronous D2H copy starts on
        // the host timeline at 30 and ends at 130; the fence waits for 360; the replay ends 365.
        assert_eq!(r.elapsed, us(365));
        assert!(r.elapsed < r.total);
        let later = c.snapshot();
        assert_eq!(later.since(&r).elapsed, ModelTime::ZERO);
    }

    #[test]
    fn a_launch_computes_after_its_stalls_and_beside_its_background_work() {
        let us = ModelTime::from_micros;
        // A launch that one batch holds up, followed by background work: a readahead's host
        // service (30) and copy (100), queued ahead.
        let launch = |c: &DeviceClock, compute: u64| {
            let mark = c.launch_mark();
            c.charge(Cause::FaultService, us(20));
            {
                let _async = AsyncTransfers::enter();
                c.charge(Cause::MigrateToDevice, us(170));
            }
            {
                let _ahead = AsyncTransfers::ahead();
                c.charge(Cause::FaultService, us(30));
                c.charge(Cause::MigrateToDevice, us(100));
            }
            // The replay waits for its copy (20..190), not for the readahead's service or copy.
            c.fence_replay();
            c.charge(Cause::Replay, us(5));
            c.fence();
            c.launch_computed(mark, us(compute));
        };
        // Host: batch 0..20, readahead service 20..50; the batch's copy 20..190, the
        // readahead's 190..290; the replay 190..195: the warps were held up 195. The memory
        // system is done at 290; computing 200 after the stall ends at 395, not 490.
        let c = DeviceClock::new();
        launch(&c, 200);
        let r = c.snapshot();
        assert_eq!(r.elapsed, us(395));
        assert_eq!((r.compute, r.overlap), (us(200), us(95)));
        assert_eq!(r.total, us(20 + 170 + 30 + 100 + 5));
        // What comes after the launch starts at its end.
        c.charge(Cause::CpuFault, us(10));
        assert_eq!(c.snapshot().elapsed, us(405));
        // Compute shorter than the background work hides entirely in it: a second launch,
        // from 405, ends with its readahead at 695, and its 50 of compute ran beside it.
        launch(&c, 50);
        let r2 = c.snapshot().since(&r);
        assert_eq!(r2.elapsed, us(290 + 10));
        assert_eq!((r2.compute, r2.overlap), (us(50), us(50)));
        // Without background work nothing overlaps: the launch ends where the memory system's
        // work and the compute one after the other would (an explicit copy, then a launch).
        let c = DeviceClock::new();
        c.charge(Cause::MigrateToDevice, us(100));
        let mark = c.launch_mark();
        c.charge(Cause::RemoteAccess, us(7));
        c.fence();
        c.launch_computed(mark, us(50));
        c.charge(Cause::MigrateToHost, us(100));
        let r = c.snapshot();
        assert_eq!(
            (r.elapsed, r.compute, r.overlap),
            (us(257), us(50), ModelTime::ZERO)
        );
    }

    #[test]
    fn a_replay_waits_for_its_own_copies_and_not_for_a_readahead_queued_after_them() {
        let us = ModelTime::from_micros;
        let c = DeviceClock::new();
        // Batch 1: service, its copy, then a readahead queued behind it, then the replay.
        c.charge(Cause::FaultService, us(20));
        {
            let _async = AsyncTransfers::enter();
            c.charge(Cause::MigrateToDevice, us(170));
        }
        {
            let _ahead = AsyncTransfers::ahead();
            c.charge(Cause::MigrateToDevice, us(170));
        }
        c.fence_replay();
        c.charge(Cause::Replay, us(5));
        // The replay waited for its copy (20..190), not for the readahead (190..360).
        assert_eq!(c.snapshot().elapsed, us(360));
        c.charge(Cause::FaultService, us(20));
        // Batch 2 is serviced while the readahead runs (195..215); its copy takes the link from
        // the readahead (215..255), which ends that much later (400), and its replay waits
        // only for its own copy.
        {
            let _async = AsyncTransfers::enter();
            c.charge(Cause::MigrateToDevice, us(40));
        }
        c.fence_replay();
        c.charge(Cause::Replay, us(5));
        assert_eq!(c.snapshot().elapsed, us(400));
        c.charge(Cause::FaultService, us(1));
        // The host is at 261: the readahead is still running.
        // A readahead queued now goes behind the first (400..500): the replay does not wait for
        // it; the full fence does.
        {
            let _ahead = AsyncTransfers::ahead();
            c.charge(Cause::MigrateToDevice, us(100));
        }
        c.fence_replay();
        c.charge(Cause::Replay, us(5));
        let before_fence = c.snapshot();
        assert_eq!(before_fence.elapsed, us(500));
        // A synchronous copy (an eviction's, the other way) does not wait for the readahead, on
        // the other engine; one this way takes the link from it too.
        c.charge(Cause::MigrateToHost, us(10));
        c.charge(Cause::MigrateToDevice, us(10));
        // Host: 266 + 10 + 10 = 286; the readahead, displaced 10 more, ends at 510.
        c.fence();
        c.charge(Cause::Replay, us(5));
        assert_eq!(c.snapshot().elapsed, us(515));
        // Nothing idled with work queued: the H2D engine was busy from 20 to 510 (170 + 170 +
        // 40 + 100 + 10 = 490 µs of copies).
        assert_eq!(
            c.snapshot().total,
            us(20 + 170 + 170 + 5 + 20 + 40 + 5 + 1 + 100 + 5 + 10 + 10 + 5)
        );
    }

    /// One step of a random clock history.
    #[derive(Clone, Copy, Debug)]
    enum ClockOp {
        /// A charge of `ns` under cause `cause` (an index into [`Cause::ALL`]), in `mode`
        /// (0 synchronous, 1 asynchronous, 2 readahead).
        Charge {
            cause: usize,
            ns: u64,
            mode: u8,
        },
        FenceReplay,
        Fence,
    }

    fn clock_op() -> impl Strategy<Value = ClockOp> {
        prop_oneof![
            6 => (0..Cause::COUNT, 0u64..1_000_000, 0u8..3)
                .prop_map(|(cause, ns, mode)| ClockOp::Charge { cause, ns, mode }),
            2 => Just(ClockOp::FenceReplay),
            1 => Just(ClockOp::Fence),
        ]
    }

    proptest! {
        #[test]
        fn the_timeline_never_runs_backwards_nor_past_the_work_charged(
            ops in proptest::collection::vec(clock_op(), 1..60)
        ) {
            let c = DeviceClock::new();
            let mut last = ModelTime::ZERO;
            let mut overlapped = false;
            for op in ops {
                match op {
                    ClockOp::Charge { cause, ns, mode } => {
                        let t = ModelTime::from_nanos(ns);
                        let _scope = match mode {
                            0 => AsyncTransfers::suspend(),
                            1 => AsyncTransfers::enter(),
                            _ => AsyncTransfers::ahead(),
                        };
                        overlapped |= mode != 0;
                        c.charge(Cause::ALL[cause], t);
                    }
                    ClockOp::FenceReplay => {
                        let before = c.snapshot().elapsed;
                        c.fence_replay();
                        // A replay's fence waits for no more than a full fence would.
                        prop_assert_eq!(c.snapshot().elapsed, before);
                    }
                    ClockOp::Fence => {
                        c.fence();
                        // Nothing is outstanding after a full fence: host work adds in full.
                        let before = c.snapshot().elapsed;
                        c.charge(Cause::Replay, ModelTime::from_nanos(7));
                        prop_assert_eq!(c.snapshot().elapsed, before.saturating_add(ModelTime::from_nanos(7)));
                    }
                }
                let r = c.snapshot();
                prop_assert!(r.elapsed >= last, "the timeline ran backwards: {:?}", r);
                prop_assert!(r.elapsed <= r.total, "elapsed past the work charged: {:?}", r);
                if !overlapped {
                    prop_assert_eq!(r.elapsed, r.total);
                }
                last = r.elapsed;
            }
        }
    }

    #[test]
    fn charging_the_clock_emits_no_event_per_charge() {
        // Remote accesses charge the clock once per lane access: an event each would cost a
        // subscriber's work on the hottest path of a remote-mapped kernel.
        let counter = Arc::new(EventCounter::default());
        let clock = DeviceClock::new();
        tracing::subscriber::with_default(Arc::clone(&counter), || {
            for _ in 0..1000 {
                clock.charge(Cause::RemoteAccess, ModelTime::from_nanos(10));
            }
        });
        assert_eq!(counter.0.load(Ordering::Relaxed), 0);
        let r = clock.snapshot();
        assert_eq!(r.charges_of(Cause::RemoteAccess), 1000);
        assert_eq!(r.get(Cause::RemoteAccess).as_nanos(), 10_000);
    }

    /// The four link presets, slowest first.
    fn links() -> [LinkModel; 4] {
        [
            LinkModel::pcie3_x16(),
            LinkModel::pcie4_x16(),
            LinkModel::pcie5_x16(),
            LinkModel::nvlink_c2c(),
        ]
    }

    /// Sizes from 1 B to 1 GiB: powers of two and the points between.
    fn sweep() -> impl Iterator<Item = u64> {
        (0..=30).flat_map(|s| [1u64 << s, (1u64 << s) + (1u64 << s) / 2])
    }

    fn gibps(link: &LinkModel, dir: Direction, bytes: u64) -> f64 {
        link.transfer_bandwidth(dir, bytes).gib_per_sec()
    }

    #[test]
    fn presets_validate() {
        for p in LinkPreset::ALL {
            assert_eq!(p.model().validate(), Ok(()), "{p}");
        }
    }

    #[test]
    fn efficiency_is_monotone_in_size_for_every_preset() {
        for p in LinkPreset::ALL {
            let m = p.model();
            let mut prev = 0.0;
            for s in sweep() {
                let e = m.efficiency(s);
                assert!(e > 0.0 && e <= 1.0, "{p} {s}: {e}");
                assert!(e >= prev, "{p}: efficiency falls at {s} B ({prev} -> {e})");
                prev = e;
            }
        }
    }

    #[test]
    fn pcie3_single_transfers_reproduce_the_measured_sizes() {
        // §2.1, UVMSmart transferBandwidth.cu: each measured point within 0.5 %.
        let m = LinkModel::pcie3_x16();
        for (kib, measured) in PCIE3_MEASURED_KIB_GIBPS {
            let got = gibps(&m, H2D, kib * KIB);
            assert!(
                (got / measured - 1.0).abs() < 0.005,
                "{kib} KiB: {got:.3} GiB/s, measured {measured}"
            );
        }
        // §2.1 / §0 give the times of three of them: 4 KB 1.18 µs, 64 KB 7.2 µs, 1 MB 87 µs.
        for (bytes, us) in [(4 * KIB, 1.18), (64 * KIB, 7.2), (MIB, 87.0)] {
            let got = m.transfer(H2D, bytes).as_micros_f64();
            assert!((got / us - 1.0).abs() < 0.03, "{bytes} B: {got} us vs {us}");
        }
    }

    #[test]
    fn pcie3_2mib_transfer_lands_between_the_1mib_measurement_and_the_fitted_peak() {
        // No anchor measures 2 MiB on PCIe 3; the anchors bracket it: 1 MiB measured 11.2 GiB/s
        // (§2.1; larger is never slower per byte) below, UVMSmart's fitted asymptote a = 12
        // GiB/s (§2.1) above. The pinned ~11.5 GB/s of §4.1 lies between.
        let bw = gibps(&LinkModel::pcie3_x16(), H2D, 2 * MIB);
        assert!(
            (11.2..=12.0).contains(&bw),
            "2 MiB on PCIe 3: {bw:.3} GiB/s"
        );
    }

    #[test]
    fn large_transfers_reach_the_measured_link_rates() {
        let gbps = |m: &LinkModel, dir| m.transfer_bandwidth(dir, 1 << 30).gb_per_sec();
        // §4.1: A100 (Gen4) H2D 25.1 GB/s at 0.5–1 GiB; within 5 %.
        let p4 = gbps(&LinkModel::pcie4_x16(), H2D);
        assert!((p4 / 25.1 - 1.0).abs() < 0.05, "pcie4 {p4}");
        // §0: Gen5 x16 practical H2D ~50–56 GB/s.
        let p5 = gbps(&LinkModel::pcie5_x16(), H2D);
        assert!((50.0..=56.0).contains(&p5), "pcie5 {p5}");
        // §0/§4.1: C2C 375 GB/s H2D, 297 GB/s D2H; within 1 %.
        let c2c = LinkModel::nvlink_c2c();
        assert!((gbps(&c2c, H2D) / 375.0 - 1.0).abs() < 0.01);
        assert!((gbps(&c2c, D2H) / 297.0 - 1.0).abs() < 0.01);
        // §4.1: Gen3 pinned D2H ~11.5 GB/s.
        let p3 = gbps(&LinkModel::pcie3_x16(), D2H);
        assert!((p3 / 11.5 - 1.0).abs() < 0.01, "pcie3 d2h {p3}");
    }

    #[test]
    fn off_model_charges_zero() {
        let m = LinkModel::off();
        assert!(m.is_off());
        assert!(!LinkModel::pcie3_x16().is_off());
        let clock = DeviceClock::new();
        for dir in Direction::ALL {
            for s in sweep() {
                clock.charge(dir.migrate_cause(), m.transfer(dir, s));
                clock.charge(Cause::RemoteAccess, m.remote_access(dir, s));
            }
            clock.charge(dir.migrate_cause(), m.transfers(dir, &[4096, 1 << 21]));
        }
        m.fault_batch(256, 40, &[64 * KIB; 256]).charge_to(&clock);
        clock.charge(Cause::CpuFault, m.cpu_fault());
        clock.charge(Cause::TlbInvalidate, m.tlb_invalidate(1000));
        let r = clock.snapshot();
        assert_eq!(r.total, ModelTime::ZERO);
        // The events are still counted.
        assert_eq!(r.charges_of(Cause::CpuFault), 1);
        assert_eq!(r.charges_of(Cause::MigrateToDevice), 62 + 1 + 1);
        assert_eq!(m.transfer_bandwidth(H2D, 4096), Bandwidth::INFINITE);
    }

    #[test]
    fn presets_are_ordered_for_every_size() {
        for dir in Direction::ALL {
            for s in sweep() {
                for w in links().windows(2) {
                    let (slow, fast) = (&w[0], &w[1]);
                    assert!(
                        slow.transfer_ns(dir, s) > fast.transfer_ns(dir, s),
                        "{dir} {s} B"
                    );
                    assert!(slow.transfer(dir, s) >= fast.transfer(dir, s));
                    assert!(slow.remote_access(dir, s) >= fast.remote_access(dir, s));
                    assert!(slow.efficiency(s) <= fast.efficiency(s) + f64::EPSILON);
                }
            }
        }
    }

    #[test]
    fn one_fault_batch_costs_20_to_50_us_on_pcie3() {
        // §0/§1.1: single far-fault service 20–50 µs (Zheng via Kim); UVMSmart 45 µs.
        // §6: 4 KB fault unit, 64 KB migration unit.
        let m = LinkModel::pcie3_x16();
        for bytes in [4 * KIB, 64 * KIB] {
            let c = m.fault_batch(1, 1, &[bytes]);
            let us = c.per_fault().as_micros_f64();
            assert!((20.0..=50.0).contains(&us), "{bytes} B: {us} us");
            assert_eq!(c.per_fault(), c.total());
        }
    }

    /// A batch of `n` faults with `faults_per_block` faults per VABlock, each migrating 64 KiB.
    fn batch(m: &LinkModel, n: u64, faults_per_block: f64) -> FaultBatchCost {
        let vablocks = ((n as f64 / faults_per_block).ceil() as u64).max(1);
        m.fault_batch(n, vablocks, &vec![64 * KIB; n as usize])
    }

    #[test]
    fn per_fault_cost_amortises_with_batch_size() {
        // §1.2 Allen & Ge faults per VABlock: stream 15.4, regular 5.9, random 1.04.
        let m = LinkModel::pcie3_x16();
        for fpb in [15.4, 5.9, 1.04] {
            let costs: Vec<ModelTime> = (0..=8)
                .map(|k| batch(&m, 1 << k, fpb).per_fault())
                .collect();
            for w in costs.windows(2) {
                assert!(w[1] <= w[0], "{fpb} faults/block: {costs:?}");
            }
            assert!(costs[8] < costs[0], "{fpb}: no amortisation {costs:?}");
        }
        // Regular access amortises to under a third (fixed batch and replay, shared blocks).
        let one = batch(&m, 1, 5.9).per_fault();
        let full = batch(&m, 256, 5.9).per_fault();
        assert!(full.saturating_mul(3) < one, "{one} -> {full}");
    }

    #[test]
    fn bigger_batches_win_despite_duplicates() {
        // §1.2 Allen & Ge: "duplicate faults are common; bigger batches still win (fewer
        // batches beats extra duplicates)". 128 pages in 22 VABlocks (their "regular" 5.9
        // faults per block). One batch takes 256 entries, every fault twice. Split into two
        // duplicate-free batches of 64, each still touches every block, because faults arrive
        // interleaved from nearly every SM (§1.2), so each block is serviced twice.
        let m = LinkModel::pcie3_x16();
        let half = vec![64 * KIB; 64];
        let big = m.fault_batch(256, 22, &[half.clone(), half.clone()].concat());
        let small = m.fault_batch(64, 22, &half);
        assert!(
            big.total() < small.total().saturating_mul(2),
            "{} vs 2 x {}",
            big.total(),
            small.total()
        );
    }

    #[test]
    fn full_batches_land_between_kim_and_ariadne() {
        // §6: a 256-fault batch "should land in the 0.2–0.6 ms range (Kim) to a few ms
        // (ARIADNE)". Shapes: Allen & Ge faults per VABlock (§1.2), 4 KiB or 64 KiB migrations.
        let m = LinkModel::pcie3_x16();
        for fpb in [22.4f64, 15.4, 5.9, 2.9, 1.04] {
            for bytes in [4 * KIB, 64 * KIB] {
                let vablocks = (256.0 / fpb).ceil() as u64;
                let t = m.fault_batch(256, vablocks, &vec![bytes; 256]).total();
                assert!(
                    (ModelTime::from_micros(200)..=ModelTime::from_millis(5)).contains(&t),
                    "{fpb} faults/block, {bytes} B: {t}"
                );
            }
        }
        // With 4 KiB migrations and dense blocks a batch sits in Kim's 223–553 µs.
        let t = m.fault_batch(256, 17, &vec![4 * KIB; 256]).total();
        assert!((ModelTime::from_micros(223)..=ModelTime::from_micros(553)).contains(&t));
    }

    #[test]
    fn a_batch_of_transfers_hides_latency_but_never_beats_the_data() {
        let m = LinkModel::pcie3_x16();
        let sizes = [4 * KIB, 0, 64 * KIB, 2 * MIB, 4 * KIB, 512];
        let batch = m.transfers(H2D, &sizes);
        let separate: ModelTime = sizes.iter().map(|&s| m.transfer(H2D, s)).sum();
        let data: f64 = sizes.iter().map(|&s| m.data_ns(H2D, s)).sum();
        assert!(batch < separate);
        assert!(batch.as_nanos() as f64 + 0.5 >= m.latency.as_nanos() as f64 + data);
        assert_eq!(m.transfers(H2D, &[2 * MIB]), m.transfer(H2D, 2 * MIB));
        assert_eq!(m.transfers(H2D, &[]), ModelTime::ZERO);
        // Tiny copies are setup-bound: every latency is paid.
        let tiny = m.transfers(H2D, &[1; 10]);
        assert!(tiny >= m.latency.saturating_mul(10));
    }

    #[test]
    fn tlb_invalidation_stops_growing_at_a_full_flush() {
        let m = LinkModel::pcie3_x16();
        assert_eq!(m.tlb_invalidate(0), ModelTime::ZERO);
        // §4.4: ~1–3 µs round trip.
        let one = m.tlb_invalidate(1).as_micros_f64();
        assert!((1.0..=3.0).contains(&one), "{one}");
        assert!(m.tlb_invalidate(2) > m.tlb_invalidate(1));
        // §4.4: full flush above 33 pages.
        assert_eq!(m.tlb_invalidate(33), m.tlb_invalidate(10_000));
        assert!(m.tlb_invalidate(32) < m.tlb_invalidate(33));
    }

    #[test]
    fn remote_access_moves_whole_lines_and_repeats_cost_again() {
        let m = LinkModel::pcie3_x16();
        assert_eq!(m.remote_access(H2D, 0), ModelTime::ZERO);
        assert_eq!(m.remote_access(H2D, 1), m.remote_access(H2D, 128));
        assert!(m.remote_access(H2D, 129) > m.remote_access(H2D, 128));
        // Reading a 64 KiB big page once remotely beats migrating it (no fault, no latency),
        // reading it ten times does not: the trade-off a placement policy weighs.
        let page = 64 * KIB;
        let migrate = m.fault_batch(1, 1, &[page]).total();
        assert!(m.remote_access(H2D, page) < migrate);
        assert!(m.remote_access(H2D, 10 * page) > m.transfer(H2D, page));
        // Lines stream at a large copy's data rate (EMOGI): a MiB read line by line takes one
        // 1 MiB copy's time less its setup, in either direction; 256 copies of 4 KiB take more
        // than twice as long.
        for dir in [H2D, D2H] {
            let copy = m.transfer(dir, MIB).as_nanos() as f64 - LINK_LATENCY.as_nanos() as f64;
            let got = m.remote_access(dir, MIB).as_nanos() as f64;
            assert!(
                (got / copy - 1.0).abs() < 0.001,
                "{dir:?}: {got} ns, copy {copy}"
            );
            let small = m.transfer(dir, 4 * KIB).as_nanos() as f64 * 256.0;
            assert!(got * 2.0 < small, "{dir:?}: {got} ns, 4 KiB copies {small}");
        }
        assert!(m.remote_access(D2H, MIB) > m.remote_access(H2D, MIB));
    }

    #[test]
    fn cpu_fault_and_replay_come_from_the_anchors() {
        let m = LinkModel::pcie3_x16();
        // §6 "a userfaultfd round trip (~8 µs)".
        assert_eq!(m.cpu_fault(), ModelTime::from_micros(8));
        assert!(m.replay() > ModelTime::ZERO);
        assert_eq!(LinkModel::off().replay(), ModelTime::ZERO);
        assert_eq!(m.fault_service(0, 3), ModelTime::ZERO);
        assert_eq!(m.fault_batch(0, 0, &[]), FaultBatchCost::default());
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let good = LinkModel::pcie3_x16;
        let mut m = good();
        m.h2d = Bandwidth::from_bytes_per_sec(0.0);
        assert!(matches!(
            m.validate(),
            Err(LinkError::NonPositiveBandwidth {
                dir: Direction::HostToDevice,
                ..
            })
        ));
        let mut m = good();
        m.d2h = Bandwidth::from_bytes_per_sec(f64::NAN);
        assert!(matches!(
            m.validate(),
            Err(LinkError::NonPositiveBandwidth {
                dir: Direction::DeviceToHost,
                ..
            })
        ));
        let mut m = good();
        m.d2h = Bandwidth::from_gb_per_sec(-1.0);
        assert!(m.validate().is_err());

        let pt = |bytes, efficiency| CurvePoint { bytes, efficiency };
        let with_curve = |curve: Vec<CurvePoint>| LinkModel { curve, ..good() };
        assert_eq!(
            with_curve(vec![pt(0, 0.5)]).validate(),
            Err(LinkError::ZeroSizePoint { index: 0 })
        );
        assert_eq!(
            with_curve(vec![pt(4096, 0.5), pt(8192, 1.5)]).validate(),
            Err(LinkError::EfficiencyOutOfRange {
                index: 1,
                efficiency: 1.5
            })
        );
        assert!(matches!(
            with_curve(vec![pt(4096, 0.0)]).validate(),
            Err(LinkError::EfficiencyOutOfRange { index: 0, .. })
        ));
        assert_eq!(
            with_curve(vec![pt(8192, 0.5), pt(4096, 0.6)]).validate(),
            Err(LinkError::CurveSizesNotIncreasing {
                index: 1,
                bytes: 4096
            })
        );
        assert_eq!(
            with_curve(vec![pt(4096, 0.5), pt(4096, 0.6)]).validate(),
            Err(LinkError::CurveSizesNotIncreasing {
                index: 1,
                bytes: 4096
            })
        );
        assert_eq!(
            with_curve(vec![pt(4096, 0.8), pt(8192, 0.6)]).validate(),
            Err(LinkError::CurveNotMonotone {
                index: 1,
                bytes: 8192
            })
        );
        // 0.2 -> 0.9 across one doubling: an 8 KiB copy would finish before a 4 KiB one.
        let outrun = with_curve(vec![pt(4096, 0.2), pt(8192, 0.9)]);
        assert_eq!(
            outrun.validate(),
            Err(LinkError::CurveOutrunsSize {
                index: 1,
                bytes: 8192
            })
        );
        assert!(outrun.transfer_ns(H2D, 8192) < outrun.transfer_ns(H2D, 4096));

        assert_eq!(
            LinkModel {
                remote_line_bytes: 0,
                ..good()
            }
            .validate(),
            Err(LinkError::ZeroRemoteLine)
        );
        let mut m = good();
        m.tlb.full_flush_ranges = 0;
        assert_eq!(m.validate(), Err(LinkError::ZeroFlushCeiling));
        // An empty curve is valid: full efficiency at every size.
        let flat = with_curve(Vec::new());
        assert_eq!(flat.validate(), Ok(()));
        assert_eq!(flat.efficiency(12345), 1.0);
    }

    #[test]
    fn preset_names_round_trip() {
        for p in LinkPreset::ALL {
            assert_eq!(p.to_string().parse::<LinkPreset>(), Ok(p));
            assert_eq!(p.name().parse::<LinkModel>(), Ok(p.model()));
        }
        assert_eq!("PCIe4".parse::<LinkPreset>(), Ok(LinkPreset::Pcie4X16));
        assert_eq!("nvlink-c2c".parse(), Ok(LinkModel::nvlink_c2c()));
        assert_eq!("off".parse(), Ok(LinkModel::off()));
        let err = "pcie6".parse::<LinkModel>().unwrap_err();
        assert_eq!(
            err,
            LinkError::UnknownPreset {
                name: "pcie6".into()
            }
        );
        assert!(err.to_string().contains("pcie3"));
    }

    #[test]
    fn concurrent_charges_sum_exactly() {
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 5_000;
        let clock = Arc::new(DeviceClock::new());
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let clock = Arc::clone(&clock);
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let cause = Cause::ALL[((t + i) % Cause::COUNT as u64) as usize];
                        clock.charge(cause, ModelTime::from_nanos(t * 1_000 + i));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut want = [0u64; Cause::COUNT];
        let mut want_n = [0u64; Cause::COUNT];
        for t in 0..THREADS {
            for i in 0..PER_THREAD {
                let c = ((t + i) % Cause::COUNT as u64) as usize;
                want[c] += t * 1_000 + i;
                want_n[c] += 1;
            }
        }
        let r = clock.snapshot();
        for c in Cause::ALL {
            assert_eq!(r.get(c).as_nanos(), want[c.index()], "{c}");
            assert_eq!(r.charges_of(c), want_n[c.index()], "{c}");
        }
        assert_eq!(r.total.as_nanos(), want.iter().sum::<u64>());
        assert_eq!(clock.total(), r.total);
    }

    #[test]
    fn clock_saturates_instead_of_wrapping() {
        let clock = DeviceClock::new();
        clock.charge(Cause::Compute, ModelTime::MAX);
        clock.charge(Cause::Compute, ModelTime::from_nanos(1));
        clock.charge(Cause::Replay, ModelTime::from_nanos(1));
        assert_eq!(clock.get(Cause::Compute), ModelTime::MAX);
        assert_eq!(clock.snapshot().total, ModelTime::MAX);
    }

    #[test]
    fn clock_reports_subtract_and_print() {
        let m = LinkModel::pcie4_x16();
        let clock = DeviceClock::new();
        clock.charge(Cause::Compute, ModelTime::from_micros(100));
        let before = clock.snapshot();
        m.fault_batch(4, 1, &[64 * KIB; 4]).charge_to(&clock);
        let d = clock.snapshot().since(&before);
        assert_eq!(d.get(Cause::Compute), ModelTime::ZERO);
        assert_eq!(d.charges_of(Cause::FaultService), 1);
        assert_eq!(d.charges_of(Cause::Compute), 0);
        assert_eq!(d.total, m.fault_batch(4, 1, &[64 * KIB; 4]).total());
        let s = d.to_string();
        assert!(s.starts_with("modelled "), "{s}");
        assert!(s.contains("fault-service") && s.contains("replay"), "{s}");
        assert!(!s.contains("compute"), "{s}");
        let tr = d.against(Duration::from_micros(10));
        assert_eq!(tr.modelled, d.total);
    }

    #[test]
    fn model_time_arithmetic_is_checked_and_displays_in_units() {
        let t = ModelTime::from_micros(3);
        assert_eq!(t.as_nanos(), 3_000);
        assert_eq!(ModelTime::MAX.checked_add(t), None);
        assert_eq!(ModelTime::MAX.saturating_add(t), ModelTime::MAX);
        assert_eq!(ModelTime::ZERO.checked_sub(t), None);
        assert_eq!(ModelTime::ZERO.saturating_sub(t), ModelTime::ZERO);
        assert_eq!(t.checked_mul(u64::MAX), None);
        assert_eq!(t.checked_mul(2), Some(ModelTime::from_nanos(6_000)));
        assert_eq!(ModelTime::from_micros(u64::MAX), ModelTime::MAX);
        assert_eq!(
            [t, t, ModelTime::MAX].into_iter().sum::<ModelTime>(),
            ModelTime::MAX
        );
        assert_eq!(ModelTime::from_nanos(850).to_string(), "850 ns");
        assert_eq!(ModelTime::from_nanos(12_345).to_string(), "12.345 us");
        assert_eq!(ModelTime::from_nanos(3_456_700).to_string(), "3.457 ms");
        assert_eq!(ModelTime::from_millis(1_250).to_string(), "1.250 s");
        assert_eq!(Duration::from(t), Duration::from_micros(3));
        assert_eq!(ModelTime::from_duration(Duration::MAX), ModelTime::MAX);
        assert_eq!(ModelTime::from_nanos_f64(f64::NAN), ModelTime::ZERO);
        assert_eq!(ModelTime::from_nanos_f64(-3.0), ModelTime::ZERO);
        assert_eq!(ModelTime::from_nanos_f64(f64::INFINITY), ModelTime::MAX);
        assert_eq!(ModelTime::from_nanos_f64(2.5), ModelTime::from_nanos(3));
    }

    #[test]
    fn time_report_pairs_wall_and_modelled() {
        let r = TimeReport::new(Duration::from_micros(1_200), ModelTime::from_micros(3_400));
        let ratio = r.ratio().unwrap();
        assert!((ratio - 3_400.0 / 1_200.0).abs() < 1e-9);
        assert_eq!(r.to_string(), "wall 1.200 ms, modelled 3.400 ms (2.83x)");
        let none = TimeReport::new(Duration::ZERO, ModelTime::from_micros(1));
        assert_eq!(none.ratio(), None);
        assert_eq!(none.to_string(), "wall 0 ns, modelled 1.000 us (-)");
    }

    #[test]
    fn bandwidth_units_and_display() {
        let b = Bandwidth::from_gib_per_sec(1.0);
        assert_eq!(b.bytes_per_sec(), (1u64 << 30) as f64);
        assert!((b.gb_per_sec() - 1.073_741_824).abs() < 1e-12);
        assert_eq!(Bandwidth::from_gb_per_sec(12.5).to_string(), "12.50 GB/s");
        assert_eq!(Bandwidth::INFINITE.to_string(), "unlimited");
        assert!(!Bandwidth::from_gb_per_sec(1.0).is_infinite());
        assert_eq!(
            Direction::HostToDevice.migrate_cause(),
            Cause::MigrateToDevice
        );
        assert_eq!(
            Direction::DeviceToHost.migrate_cause(),
            Cause::MigrateToHost
        );
        for (i, c) in Cause::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }

    proptest! {
        #[test]
        fn larger_transfers_are_never_slower_per_byte(
            a in 1u64..(1 << 34), b in 1u64..(1 << 34), preset in 0usize..4
        ) {
            let m = &links()[preset];
            let (small, large) = (a.min(b), a.max(b));
            for dir in Direction::ALL {
                // Per byte: t(large)/large <= t(small)/small, on the unrounded model.
                let (ts, tl) = (m.transfer_ns(dir, small), m.transfer_ns(dir, large));
                prop_assert!(tl * small as f64 <= ts * large as f64 * (1.0 + 1e-12));
                // And never sooner in total.
                prop_assert!(tl >= ts * (1.0 - 1e-12));
                prop_assert!(m.transfer(dir, large) >= m.transfer(dir, small));
            }
        }

        #[test]
        fn presets_are_ordered_for_arbitrary_sizes(bytes in 1u64..(1 << 36)) {
            for dir in Direction::ALL {
                for w in links().windows(2) {
                    prop_assert!(w[0].transfer_ns(dir, bytes) > w[1].transfer_ns(dir, bytes));
                }
            }
        }

        #[test]
        fn a_batch_lies_between_its_data_and_its_separate_transfers(
            sizes in proptest::collection::vec(0u64..(4 << 20), 0..40), preset in 0usize..4
        ) {
            let m = &links()[preset];
            let batch = m.transfers_ns(H2D, &sizes);
            let separate: f64 = sizes.iter().map(|&s| m.transfer_ns(H2D, s)).sum();
            let data: f64 = sizes.iter().map(|&s| m.data_ns(H2D, s)).sum();
            let latency = if sizes.iter().any(|&s| s > 0) { m.latency.as_nanos() as f64 } else { 0.0 };
            prop_assert!(batch <= separate * (1.0 + 1e-12) + 1e-6);
            prop_assert!(batch >= (latency + data) * (1.0 - 1e-12) - 1e-6);
        }
    }
}
