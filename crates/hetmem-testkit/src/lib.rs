//! hetmem-testkit: the operation interpreter of the reliability tests (issue 6).
//!
//! One [`Machine`] runs a [`Context`] of one or two simulated devices and a few *slots* of
//! memory (managed allocations and registered `Vec`s), and applies [`Op`]s to them: CPU reads and
//! writes, kernel reads and writes, prefetch each way, advice, suspend (eviction of everything),
//! registration and release, `munmap` and `madvise(MADV_DONTNEED)` through hetmem and behind its
//! back, and protection changes. Next to the real memory it keeps a plain buffer per slot that
//! only the model touches, and after every step [`Machine::check`] compares them without moving
//! anything ("peeking": a page in system memory is read through a CPU view, a page on a device
//! straight from its frame in the device's arena), checks every invariant checker the context
//! has (`Context::check_invariants`: page states, notifier tree, pools, device page tables and
//! TLBs, fault rings, thrashing detector) and checks the pools' accounting: every frame in use is
//! a page of a live slot or a read copy, so nothing leaks.
//!
//! The same interpreter serves the proptest model test (`hetmem-runtime/tests/model.rs`, with
//! [`op_strategy`] and shrinking) and the fuzz target (`fuzz/`, with [`Op::decode`] over the
//! fuzzer's bytes), so a sequence either finds replays in the other.
//!
//! Neighbours: `hetmem-runtime` (what is tested), `hetmem-sim` (the devices), `hetmem` (page
//! states, read by the peek). Defends DESIGN.md invariants 1 (coherence: every kernel read and
//! every peek sees the model's bytes), 3 (nothing lost: frames accounted for, every byte where it
//! was) and 5 (isolation: a kernel write to read-only memory fails).
#![deny(unsafe_code)]

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};
use std::time::{Duration, Instant};

use hetmem::{AddressSpace, DeviceMemory, Prot};
use hetmem_core::{page_state::Location, DeviceId, PageRange, PAGE_SIZE};
use hetmem_runtime::{Advice, Context, Managed, Page, Processor, Registered, RuntimeError};
use hetmem_sim::accel::{AccelConfig, Miss, Thread};
use proptest::prelude::*;

mod raw;

/// Wall-clock budget of a stress test: `HETMEM_STRESS_SECS` seconds, else `default_secs` (the
/// variable the `hetmem-sim` stress tests read, so one setting lengthens them all).
pub fn stress_budget(default_secs: u64) -> Duration {
    let secs = std::env::var("HETMEM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    Duration::from_secs(secs)
}

/// u32 words in a page.
pub const WORDS_PER_PAGE: usize = (PAGE_SIZE / 4) as usize;
/// Words a kernel lane reads or writes (a 256-byte slice; 16 lanes per page).
const LANE_WORDS: u64 = 64;

/// How a [`Machine`] is built.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Devices in the context (1 or 2 in the tests).
    pub devices: usize,
    /// Slots of memory the operations address.
    pub slots: usize,
    /// Most pages in one slot.
    pub max_pages: u64,
    /// The context's per-device memory limit in pages (eviction when a migration would pass it).
    pub memory_limit_pages: Option<u64>,
    /// Thrashing detection (on by default in a context; wall-clock driven).
    pub thrashing: bool,
    /// Each device's fault ring capacity (a power of two; small rings overflow: fault
    /// injection of a full ring).
    pub ring_capacity: usize,
    /// A full device keeps its working set and maps the rest remotely
    /// (`ContextBuilder::spill_remote`).
    pub spill_remote: bool,
    /// Access counters with this threshold (remote accesses per 64 KiB region), when on.
    pub access_counter_threshold: Option<u32>,
    /// Each launch first restores what CPU faults took from its device
    /// (`ContextBuilder::restore_on_launch`; with thrashing detection, pages the CPU keeps
    /// rewriting are mapped where they are).
    pub restore_on_launch: bool,
    /// Each launch's end moves to system memory what the CPU took back after the launches
    /// before (`ContextBuilder::readback_after_launch`).
    pub readback_after_launch: bool,
    /// The window a CPU fault brings back (bytes), and the CPU readahead limit
    /// (`ContextBuilder::cpu_fault_window`, `ContextBuilder::cpu_readahead`).
    pub cpu_window: u64,
    pub cpu_readahead: Option<u64>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            devices: 2,
            slots: 4,
            max_pages: 24,
            memory_limit_pages: Some(48),
            thrashing: true,
            ring_capacity: 4096,
            spill_remote: false,
            access_counter_threshold: None,
            restore_on_launch: false,
            readback_after_launch: false,
            cpu_window: PAGE_SIZE,
            cpu_readahead: None,
        }
    }
}

/// A processor, by index into the machine's devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// System memory.
    Cpu,
    /// Device `n` (modulo the devices there are).
    Dev(u8),
}

/// Advice an [`Op::Advise`] gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdviceOp {
    /// `SetPreferredLocation`.
    Preferred(Target),
    /// `UnsetPreferredLocation`.
    UnsetPreferred,
    /// `SetAccessedBy(device n)`: the device maps the range at once.
    AccessedBy(u8),
    /// `UnsetAccessedBy(device n)`.
    UnsetAccessedBy(u8),
    /// `SetReadMostly`: read duplication.
    ReadMostly,
    /// `UnsetReadMostly`.
    UnsetReadMostly,
    /// `SetGranularity(4 KiB << (n % 10))`.
    Granularity(u8),
    /// `UnsetGranularity`.
    UnsetGranularity,
}

/// One step. Indices are taken modulo what exists (slots, pages of the slot, devices), so every
/// sequence of ops is valid; an op on an empty slot does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A managed allocation of `pages` pages (1 + pages % max) in `slot` (what was there is
    /// released first).
    Alloc {
        /// Slot.
        slot: u8,
        /// Pages.
        pages: u8,
    },
    /// A `Vec<Page>` holding `seed`'s pattern, registered in `slot`.
    Register {
        /// Slot.
        slot: u8,
        /// Pages.
        pages: u8,
        /// Pattern seed.
        seed: u32,
    },
    /// Drops the allocation (hetmem's munmap) or unregisters (the `Vec` comes back, checked).
    Release {
        /// Slot.
        slot: u8,
    },
    /// The CPU writes `len` words from `word` through a view (device pages fault home).
    CpuWrite {
        /// Slot.
        slot: u8,
        /// First word.
        word: u16,
        /// Words.
        len: u16,
        /// Value seed.
        seed: u32,
    },
    /// The CPU reads `npages` pages from `page` through a view and compares.
    CpuRead {
        /// Slot.
        slot: u8,
        /// First page.
        page: u8,
        /// Pages.
        npages: u8,
    },
    /// A kernel on `dev` writes `npages` pages from `page`.
    KernelWrite {
        /// Device.
        dev: u8,
        /// Slot.
        slot: u8,
        /// First page.
        page: u8,
        /// Pages.
        npages: u8,
        /// Value seed.
        seed: u32,
    },
    /// A kernel on `dev` reads `npages` pages from `page` and compares every word.
    KernelRead {
        /// Device.
        dev: u8,
        /// Slot.
        slot: u8,
        /// First page.
        page: u8,
        /// Pages.
        npages: u8,
    },
    /// `prefetch(pages, to)` and its fence.
    Prefetch {
        /// Slot.
        slot: u8,
        /// First page.
        page: u8,
        /// Pages.
        npages: u8,
        /// Where to.
        to: Target,
    },
    /// `advise(pages, advice)`.
    Advise {
        /// Slot.
        slot: u8,
        /// First page.
        page: u8,
        /// Pages.
        npages: u8,
        /// The advice.
        advice: AdviceOp,
    },
    /// Every device page goes back to system memory.
    Suspend,
    /// `madvise(MADV_DONTNEED)`: through hetmem (`AddressSpace::discard`) or behind its back
    /// (a raw system call; the userfaultfd REMOVE event invalidates). The pages read as zero.
    Discard {
        /// Slot.
        slot: u8,
        /// First page.
        page: u8,
        /// Pages.
        npages: u8,
        /// A raw madvise rather than hetmem's.
        behind_back: bool,
    },
    /// A raw `munmap` of a whole managed allocation behind hetmem's back (the UNMAP event frees
    /// its device frames). Registered slots are released instead.
    Unmap {
        /// Slot.
        slot: u8,
    },
    /// The pages become read-only: a kernel write on `dev` must fail with a typed error and
    /// change nothing, a kernel read still works; then read-write again.
    ReadOnly {
        /// Device.
        dev: u8,
        /// Slot.
        slot: u8,
        /// First page.
        page: u8,
        /// Pages.
        npages: u8,
    },
}

impl Op {
    /// Kinds of op, for the tally.
    pub const KINDS: [&'static str; 14] = [
        "alloc",
        "register",
        "release",
        "cpu_write",
        "cpu_read",
        "kernel_write",
        "kernel_read",
        "prefetch",
        "advise",
        "suspend",
        "discard",
        "unmap",
        "read_only",
        "skipped",
    ];

    fn kind(&self) -> usize {
        match self {
            Op::Alloc { .. } => 0,
            Op::Register { .. } => 1,
            Op::Release { .. } => 2,
            Op::CpuWrite { .. } => 3,
            Op::CpuRead { .. } => 4,
            Op::KernelWrite { .. } => 5,
            Op::KernelRead { .. } => 6,
            Op::Prefetch { .. } => 7,
            Op::Advise { .. } => 8,
            Op::Suspend => 9,
            Op::Discard { .. } => 10,
            Op::Unmap { .. } => 11,
            Op::ReadOnly { .. } => 12,
        }
    }

    /// Decodes the ops in a fuzzer's bytes (each op takes one tag byte and its fields; a
    /// truncated last op is dropped). Every byte string decodes to a valid sequence.
    pub fn decode(data: &[u8]) -> Vec<Op> {
        let mut b = Bytes(data);
        let mut ops = Vec::new();
        while let Some(tag) = b.u8() {
            let op = match tag % 16 {
                0 | 13 => b.with(|b| {
                    Some(Op::Alloc {
                        slot: b.u8()?,
                        pages: b.u8()?,
                    })
                }),
                1 => b.with(|b| {
                    Some(Op::Register {
                        slot: b.u8()?,
                        pages: b.u8()?,
                        seed: b.u32()?,
                    })
                }),
                2 => b.with(|b| Some(Op::Release { slot: b.u8()? })),
                3 | 14 => b.with(|b| {
                    Some(Op::CpuWrite {
                        slot: b.u8()?,
                        word: b.u16()?,
                        len: b.u16()?,
                        seed: b.u32()?,
                    })
                }),
                4 => b.with(|b| {
                    Some(Op::CpuRead {
                        slot: b.u8()?,
                        page: b.u8()?,
                        npages: b.u8()?,
                    })
                }),
                5 | 15 => b.with(|b| {
                    Some(Op::KernelWrite {
                        dev: b.u8()?,
                        slot: b.u8()?,
                        page: b.u8()?,
                        npages: b.u8()?,
                        seed: b.u32()?,
                    })
                }),
                6 => b.with(|b| {
                    Some(Op::KernelRead {
                        dev: b.u8()?,
                        slot: b.u8()?,
                        page: b.u8()?,
                        npages: b.u8()?,
                    })
                }),
                7 => b.with(|b| {
                    Some(Op::Prefetch {
                        slot: b.u8()?,
                        page: b.u8()?,
                        npages: b.u8()?,
                        to: target(b.u8()?),
                    })
                }),
                8 => b.with(|b| {
                    let (slot, page, npages, a, n) = (b.u8()?, b.u8()?, b.u8()?, b.u8()?, b.u8()?);
                    let advice = match a % 8 {
                        0 => AdviceOp::Preferred(target(n)),
                        1 => AdviceOp::UnsetPreferred,
                        2 => AdviceOp::AccessedBy(n),
                        3 => AdviceOp::UnsetAccessedBy(n),
                        4 => AdviceOp::ReadMostly,
                        5 => AdviceOp::UnsetReadMostly,
                        6 => AdviceOp::Granularity(n),
                        _ => AdviceOp::UnsetGranularity,
                    };
                    Some(Op::Advise {
                        slot,
                        page,
                        npages,
                        advice,
                    })
                }),
                9 => Some(Op::Suspend),
                10 => b.with(|b| {
                    Some(Op::Discard {
                        slot: b.u8()?,
                        page: b.u8()?,
                        npages: b.u8()?,
                        behind_back: b.u8()? % 2 == 1,
                    })
                }),
                11 => b.with(|b| Some(Op::Unmap { slot: b.u8()? })),
                _ => b.with(|b| {
                    Some(Op::ReadOnly {
                        dev: b.u8()?,
                        slot: b.u8()?,
                        page: b.u8()?,
                        npages: b.u8()?,
                    })
                }),
            };
            match op {
                Some(op) => ops.push(op),
                None => break,
            }
        }
        ops
    }

    /// The bytes [`Op::decode`] reads back as this op (for seeding a fuzz corpus).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Op::Alloc { slot, pages } => out.extend([0, slot, pages]),
            Op::Register { slot, pages, seed } => {
                out.extend([1, slot, pages]);
                out.extend(seed.to_le_bytes());
            }
            Op::Release { slot } => out.extend([2, slot]),
            Op::CpuWrite {
                slot,
                word,
                len,
                seed,
            } => {
                out.extend([3, slot]);
                out.extend(word.to_le_bytes());
                out.extend(len.to_le_bytes());
                out.extend(seed.to_le_bytes());
            }
            Op::CpuRead { slot, page, npages } => out.extend([4, slot, page, npages]),
            Op::KernelWrite {
                dev,
                slot,
                page,
                npages,
                seed,
            } => {
                out.extend([5, dev, slot, page, npages]);
                out.extend(seed.to_le_bytes());
            }
            Op::KernelRead {
                dev,
                slot,
                page,
                npages,
            } => out.extend([6, dev, slot, page, npages]),
            Op::Prefetch {
                slot,
                page,
                npages,
                to,
            } => out.extend([7, slot, page, npages, target_byte(to)]),
            Op::Advise {
                slot,
                page,
                npages,
                advice,
            } => {
                let (a, n) = match advice {
                    AdviceOp::Preferred(t) => (0, target_byte(t)),
                    AdviceOp::UnsetPreferred => (1, 0),
                    AdviceOp::AccessedBy(n) => (2, n),
                    AdviceOp::UnsetAccessedBy(n) => (3, n),
                    AdviceOp::ReadMostly => (4, 0),
                    AdviceOp::UnsetReadMostly => (5, 0),
                    AdviceOp::Granularity(n) => (6, n),
                    AdviceOp::UnsetGranularity => (7, 0),
                };
                out.extend([8, slot, page, npages, a, n]);
            }
            Op::Suspend => out.push(9),
            Op::Discard {
                slot,
                page,
                npages,
                behind_back,
            } => out.extend([10, slot, page, npages, u8::from(behind_back)]),
            Op::Unmap { slot } => out.extend([11, slot]),
            Op::ReadOnly {
                dev,
                slot,
                page,
                npages,
            } => out.extend([12, dev, slot, page, npages]),
        }
    }
}

fn target(b: u8) -> Target {
    if b.is_multiple_of(3) {
        Target::Cpu
    } else {
        Target::Dev(b % 3 - 1)
    }
}

fn target_byte(t: Target) -> u8 {
    match t {
        Target::Cpu => 0,
        Target::Dev(n) => n % 2 + 1,
    }
}

/// A cursor over a fuzzer's bytes.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn with<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        f(self)
    }
}

/// A proptest strategy over single ops (sequences: `proptest::collection::vec(op_strategy(), n)`).
/// Weighted toward the operations that move pages.
pub fn op_strategy() -> impl Strategy<Value = Op> {
    let slot = 0u8..4;
    let page = any::<u8>();
    let npages = 1u8..12;
    let dev = 0u8..2;
    let target = prop_oneof![Just(Target::Cpu), (0u8..2).prop_map(Target::Dev)];
    let advice = prop_oneof![
        target.clone().prop_map(AdviceOp::Preferred),
        Just(AdviceOp::UnsetPreferred),
        (0u8..2).prop_map(AdviceOp::AccessedBy),
        (0u8..2).prop_map(AdviceOp::UnsetAccessedBy),
        Just(AdviceOp::ReadMostly),
        Just(AdviceOp::UnsetReadMostly),
        (0u8..10).prop_map(AdviceOp::Granularity),
        Just(AdviceOp::UnsetGranularity),
    ];
    prop_oneof![
        3 => (slot.clone(), any::<u8>()).prop_map(|(slot, pages)| Op::Alloc { slot, pages }),
        1 => (slot.clone(), any::<u8>(), any::<u32>())
            .prop_map(|(slot, pages, seed)| Op::Register { slot, pages, seed }),
        1 => slot.clone().prop_map(|slot| Op::Release { slot }),
        4 => (slot.clone(), any::<u16>(), 1u16..3000, any::<u32>())
            .prop_map(|(slot, word, len, seed)| Op::CpuWrite { slot, word, len, seed }),
        2 => (slot.clone(), page, npages.clone())
            .prop_map(|(slot, page, npages)| Op::CpuRead { slot, page, npages }),
        4 => (dev.clone(), slot.clone(), page, npages.clone(), any::<u32>()).prop_map(
            |(dev, slot, page, npages, seed)| Op::KernelWrite { dev, slot, page, npages, seed }
        ),
        4 => (dev.clone(), slot.clone(), page, npages.clone())
            .prop_map(|(dev, slot, page, npages)| Op::KernelRead { dev, slot, page, npages }),
        4 => (slot.clone(), page, npages.clone(), target)
            .prop_map(|(slot, page, npages, to)| Op::Prefetch { slot, page, npages, to }),
        3 => (slot.clone(), page, npages.clone(), advice)
            .prop_map(|(slot, page, npages, advice)| Op::Advise { slot, page, npages, advice }),
        1 => Just(Op::Suspend),
        2 => (slot.clone(), page, npages.clone(), any::<bool>()).prop_map(
            |(slot, page, npages, behind_back)| Op::Discard { slot, page, npages, behind_back }
        ),
        1 => slot.clone().prop_map(|slot| Op::Unmap { slot }),
        1 => (dev, slot, page, npages)
            .prop_map(|(dev, slot, page, npages)| Op::ReadOnly { dev, slot, page, npages }),
    ]
}

/// The memory of a slot.
enum Mem {
    Managed(Managed),
    Registered(Registered<Page>),
}

impl Mem {
    fn range(&self) -> PageRange {
        match self {
            Mem::Managed(m) => m.range(),
            Mem::Registered(r) => r.range(),
        }
    }

    fn words(&self) -> Vec<u32> {
        match self {
            Mem::Managed(m) => m.view::<u32>().to_vec(),
            Mem::Registered(r) => r.view::<u32>().to_vec(),
        }
    }
}

struct Slot {
    mem: Mem,
    /// The plain buffer: what every word must hold.
    model: Vec<u32>,
}

/// What a run did, for the figures.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Ops applied, by [`Op::KINDS`] (an op on an empty slot counts as skipped).
    pub ops: [u64; 14],
    /// Checks after a step (invariants, peek of every byte, frame accounting).
    pub checks: u64,
    /// Bytes compared against the model, peeks and reads together.
    pub bytes_checked: u64,
    /// Kernel launches refused as they should be (writes to read-only memory).
    pub refused_writes: u64,
    /// Pages a full device mapped remotely instead of evicting (spilling), and spilled pages
    /// whose mappings a launch revoked.
    pub pages_spilled: u64,
    pub spill_revocations: u64,
    /// Access-counter notifications (regions whose remote accesses crossed the threshold).
    pub counter_notifications: u64,
    /// Pages restored at launches, and pages the CPU kept rewriting mapped where they are.
    pub launch_restores: u64,
    pub launch_bounce_pins: u64,
    /// Pages launches' ends read back to system memory.
    pub launch_readbacks: u64,
}

impl Tally {
    /// Ops applied in all.
    pub fn total(&self) -> u64 {
        self.ops.iter().sum()
    }

    /// Adds `other` to this tally.
    pub fn add(&mut self, other: &Tally) {
        for (a, b) in self.ops.iter_mut().zip(other.ops) {
            *a += b;
        }
        self.checks += other.checks;
        self.bytes_checked += other.bytes_checked;
        self.refused_writes += other.refused_writes;
        self.pages_spilled += other.pages_spilled;
        self.spill_revocations += other.spill_revocations;
        self.counter_notifications += other.counter_notifications;
        self.launch_restores += other.launch_restores;
        self.launch_bounce_pins += other.launch_bounce_pins;
        self.launch_readbacks += other.launch_readbacks;
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ops (", self.total())?;
        let mut first = true;
        for (k, n) in Op::KINDS.iter().zip(self.ops) {
            if n > 0 {
                if !first {
                    write!(f, ", ")?;
                }
                first = false;
                write!(f, "{k} {n}")?;
            }
        }
        write!(
            f,
            "), {} checks, {} MiB compared, {} writes to read-only memory refused, {} pages \
             spilled, {} spilled pages revoked, {} counter notifications, {} pages restored \
             at launches, {} pinned by launch bounces, {} read back as launches ended",
            self.checks,
            self.bytes_checked >> 20,
            self.refused_writes,
            self.pages_spilled,
            self.spill_revocations,
            self.counter_notifications,
            self.launch_restores,
            self.launch_bounce_pins,
            self.launch_readbacks
        )
    }
}

/// The word `i` of a slot written with `seed`.
fn value(seed: u32, i: usize) -> u32 {
    seed.wrapping_mul(0x9e37_79b1) ^ (i as u32).wrapping_mul(0x85eb_ca6b) ^ 0x5bd1_e995
}

/// A context, its slots and their models.
pub struct Machine {
    ctx: Context,
    devs: Vec<DeviceId>,
    slots: Vec<Option<Slot>>,
    config: ModelConfig,
    /// The tally so far.
    pub tally: Tally,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("devs", &self.devs)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A small device for the model: 8 MiB, two compute units, no link model.
pub fn small_device() -> AccelConfig {
    AccelConfig {
        memory_bytes: 8 << 20,
        compute_units: 2,
        link: hetmem_core::link::LinkModel::off(),
        ..AccelConfig::default()
    }
}

impl Machine {
    /// A context with `config.devices` small devices and empty slots.
    pub fn new(config: ModelConfig) -> Result<Machine, String> {
        let mut b = Context::builder();
        for _ in 0..config.devices {
            b = b.device(AccelConfig {
                ring_capacity: config.ring_capacity,
                ..small_device()
            });
        }
        if let Some(p) = config.memory_limit_pages {
            b = b.memory_limit(p * PAGE_SIZE);
        }
        if !config.thrashing {
            b = b.thrashing(None);
        }
        b = b
            .restore_on_launch(config.restore_on_launch)
            .readback_after_launch(config.readback_after_launch)
            .cpu_fault_window(config.cpu_window)
            .cpu_readahead(config.cpu_readahead)
            .spill_remote(config.spill_remote)
            .access_counters(config.access_counter_threshold.map(|threshold| {
                hetmem_core::policy::access_counters::AccessCounterConfig {
                    threshold,
                    ..Default::default()
                }
            }));
        let ctx = b.build().map_err(|e| e.to_string())?;
        let devs = ctx.devices();
        let slots = (0..config.slots).map(|_| None).collect();
        let mut m = Machine {
            ctx,
            devs,
            slots,
            config,
            tally: Tally::default(),
        };
        // Every slot starts full (the last one registered), so that few ops find nothing.
        let n = m.slots.len();
        for s in 0..n {
            let pages = (5 * s as u64 + 3) as u8;
            let op = if s + 1 == n && n > 1 {
                Op::Register {
                    slot: s as u8,
                    pages,
                    seed: s as u32,
                }
            } else {
                Op::Alloc {
                    slot: s as u8,
                    pages,
                }
            };
            m.apply_inner(&op)?;
        }
        Ok(m)
    }

    /// The context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The pages of slot `slot`, if it holds memory.
    pub fn slot_range(&self, slot: usize) -> Option<PageRange> {
        self.slots.get(slot)?.as_ref().map(|s| s.mem.range())
    }

    fn dev(&self, n: u8) -> DeviceId {
        self.devs[n as usize % self.devs.len()]
    }

    fn processor(&self, t: Target) -> Processor {
        match t {
            Target::Cpu => Processor::Cpu,
            Target::Dev(n) => Processor::Device(self.dev(n)),
        }
    }

    fn slot_index(&self, slot: u8) -> usize {
        slot as usize % self.slots.len()
    }

    /// Pages `[page, page + npages)` of slot `s`, clipped to it (at least one page).
    fn pages(&self, s: usize, page: u8, npages: u8) -> Option<(PageRange, usize, usize)> {
        let slot = self.slots[s].as_ref()?;
        let range = slot.mem.range();
        let n = range.npages();
        let first = u64::from(page) % n;
        let count = (u64::from(npages).max(1)).min(n - first);
        let sub = PageRange::new(range.page(first).0, count * PAGE_SIZE).expect("inside the slot");
        Some((sub, first as usize, count as usize))
    }

    /// Applies `op`, then checks everything. `Err` says what went wrong (a mismatch, an
    /// unexpected error, a broken invariant).
    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        self.apply(op)?;
        self.check().map_err(|e| format!("after {op:?}: {e}"))
    }

    /// Applies `op` without the check.
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        let done = self.apply_inner(op).map_err(|e| format!("{op:?}: {e}"))?;
        self.tally.ops[if done { op.kind() } else { 13 }] += 1;
        Ok(())
    }

    fn apply_inner(&mut self, op: &Op) -> Result<bool, String> {
        let e = |e: RuntimeError| e.to_string();
        match *op {
            Op::Alloc { slot, pages } => {
                let s = self.slot_index(slot);
                self.release(s)?;
                let n = 1 + u64::from(pages) % self.config.max_pages;
                let m = self.ctx.alloc(n * PAGE_SIZE).map_err(e)?;
                self.slots[s] = Some(Slot {
                    mem: Mem::Managed(m),
                    model: vec![0; n as usize * WORDS_PER_PAGE],
                });
            }
            Op::Register { slot, pages, seed } => {
                let s = self.slot_index(slot);
                self.release(s)?;
                let n = 1 + u64::from(pages) % self.config.max_pages;
                let model: Vec<u32> = (0..n as usize * WORDS_PER_PAGE)
                    .map(|i| value(seed, i))
                    .collect();
                let mut buf = vec![Page::default(); n as usize];
                for (k, p) in buf.iter_mut().enumerate() {
                    for (j, w) in p.0.chunks_exact_mut(4).enumerate() {
                        w.copy_from_slice(&model[k * WORDS_PER_PAGE + j].to_le_bytes());
                    }
                }
                let r = self.ctx.register(buf).map_err(|r| r.error.to_string())?;
                self.slots[s] = Some(Slot {
                    mem: Mem::Registered(r),
                    model,
                });
            }
            Op::Release { slot } => {
                let s = self.slot_index(slot);
                if self.slots[s].is_none() {
                    return Ok(false);
                }
                self.release(s)?;
            }
            Op::CpuWrite {
                slot,
                word,
                len,
                seed,
            } => {
                let s = self.slot_index(slot);
                let Some(sl) = self.slots[s].as_mut() else {
                    return Ok(false);
                };
                let words = sl.model.len();
                let first = word as usize % words;
                let end = (first + len.max(1) as usize).min(words);
                for i in first..end {
                    sl.model[i] = value(seed, i);
                }
                let src = &sl.model[first..end];
                match &mut sl.mem {
                    Mem::Managed(m) => m.view_mut::<u32>()[first..end].copy_from_slice(src),
                    Mem::Registered(r) => r.view_mut::<u32>()[first..end].copy_from_slice(src),
                }
            }
            Op::CpuRead { slot, page, npages } => {
                let s = self.slot_index(slot);
                let Some((_, first, count)) = self.pages(s, page, npages) else {
                    return Ok(false);
                };
                let sl = self.slots[s].as_ref().expect("slot checked");
                let (a, b) = (first * WORDS_PER_PAGE, (first + count) * WORDS_PER_PAGE);
                let got: Vec<u32> = match &sl.mem {
                    Mem::Managed(m) => m.view::<u32>()[a..b].to_vec(),
                    Mem::Registered(r) => r.view::<u32>()[a..b].to_vec(),
                };
                compare(&got, &sl.model[a..b], a, "CPU read")?;
                self.tally.bytes_checked += (b - a) as u64 * 4;
            }
            Op::KernelWrite {
                dev,
                slot,
                page,
                npages,
                seed,
            } => {
                let s = self.slot_index(slot);
                let Some((sub, first, count)) = self.pages(s, page, npages) else {
                    return Ok(false);
                };
                self.kernel_write(self.dev(dev), sub, first * WORDS_PER_PAGE, seed)
                    .map_err(e)?;
                let sl = self.slots[s].as_mut().expect("slot checked");
                for i in first * WORDS_PER_PAGE..(first + count) * WORDS_PER_PAGE {
                    sl.model[i] = value(seed, i);
                }
            }
            Op::KernelRead {
                dev,
                slot,
                page,
                npages,
            } => {
                let s = self.slot_index(slot);
                let Some((sub, first, count)) = self.pages(s, page, npages) else {
                    return Ok(false);
                };
                let sl = self.slots[s].as_ref().expect("slot checked");
                let want =
                    sl.model[first * WORDS_PER_PAGE..(first + count) * WORDS_PER_PAGE].to_vec();
                self.kernel_read(self.dev(dev), sub, want, first * WORDS_PER_PAGE)?;
                self.tally.bytes_checked += count as u64 * PAGE_SIZE;
            }
            Op::Prefetch {
                slot,
                page,
                npages,
                to,
            } => {
                let s = self.slot_index(slot);
                let Some((sub, _, _)) = self.pages(s, page, npages) else {
                    return Ok(false);
                };
                let p = self.processor(to);
                self.ctx.prefetch(sub, p).map_err(e)?.wait().map_err(e)?;
                if p == Processor::Cpu {
                    let away: u64 = self
                        .ctx
                        .residency(sub)
                        .iter()
                        .filter(|(_, q)| *q != Processor::Cpu)
                        .map(|(r, _)| r.npages())
                        .sum();
                    if away > 0 {
                        return Err(format!(
                            "{away} pages still on devices after a prefetch home"
                        ));
                    }
                }
            }
            Op::Advise {
                slot,
                page,
                npages,
                advice,
            } => {
                let s = self.slot_index(slot);
                let Some((sub, _, _)) = self.pages(s, page, npages) else {
                    return Ok(false);
                };
                let a = match advice {
                    AdviceOp::Preferred(t) => Advice::SetPreferredLocation(self.processor(t)),
                    AdviceOp::UnsetPreferred => Advice::UnsetPreferredLocation,
                    AdviceOp::AccessedBy(n) => {
                        Advice::SetAccessedBy(Processor::Device(self.dev(n)))
                    }
                    AdviceOp::UnsetAccessedBy(n) => {
                        Advice::UnsetAccessedBy(Processor::Device(self.dev(n)))
                    }
                    AdviceOp::ReadMostly => Advice::SetReadMostly,
                    AdviceOp::UnsetReadMostly => Advice::UnsetReadMostly,
                    AdviceOp::Granularity(n) => Advice::SetGranularity(PAGE_SIZE << (n % 10)),
                    AdviceOp::UnsetGranularity => Advice::UnsetGranularity,
                };
                self.ctx.advise(sub, a).map_err(e)?;
            }
            Op::Suspend => {
                self.ctx.suspend().map_err(e)?;
                for d in &self.devs {
                    let used = self.ctx.memory_in_use(*d).map_err(e)?;
                    if used != 0 {
                        return Err(format!("{used} bytes still in use on {d:?} after suspend"));
                    }
                }
            }
            Op::Discard {
                slot,
                page,
                npages,
                behind_back,
            } => {
                let s = self.slot_index(slot);
                let Some((sub, first, count)) = self.pages(s, page, npages) else {
                    return Ok(false);
                };
                // No view of the slot is alive (they are only made inside an op) and no launch
                // or prefetch is in flight (each op waits for its own).
                if behind_back {
                    raw::madvise_dontneed(sub)?;
                } else {
                    raw::discard(sub)?;
                }
                let sl = self.slots[s].as_mut().expect("slot checked");
                sl.model[first * WORDS_PER_PAGE..(first + count) * WORDS_PER_PAGE].fill(0);
            }
            Op::Unmap { slot } => {
                let s = self.slot_index(slot);
                match self.slots[s].take() {
                    None => return Ok(false),
                    Some(Slot {
                        mem: Mem::Managed(m),
                        ..
                    }) => raw::munmap_behind_back(m)?,
                    Some(other) => {
                        self.slots[s] = Some(other);
                        self.release(s)?;
                    }
                }
            }
            Op::ReadOnly {
                dev,
                slot,
                page,
                npages,
            } => {
                let s = self.slot_index(slot);
                let Some((sub, first, count)) = self.pages(s, page, npages) else {
                    return Ok(false);
                };
                let d = self.dev(dev);
                raw::protect(sub, Prot::READ)?;
                let refused = self.kernel_write(d, sub, first * WORDS_PER_PAGE, 0xbad);
                let want = self.slots[s].as_ref().expect("slot checked").model
                    [first * WORDS_PER_PAGE..(first + count) * WORDS_PER_PAGE]
                    .to_vec();
                let read = self.kernel_read(d, sub, want, first * WORDS_PER_PAGE);
                raw::protect(sub, Prot::READ | Prot::WRITE)?;
                match refused {
                    Err(RuntimeError::Accel(_)) => self.tally.refused_writes += 1,
                    Err(other) => return Err(format!("write to read-only memory: {other}")),
                    Ok(()) => return Err("a kernel wrote read-only memory".into()),
                }
                read?;
            }
        }
        Ok(true)
    }

    fn kernel_write(
        &self,
        dev: DeviceId,
        sub: PageRange,
        first_word: usize,
        seed: u32,
    ) -> Result<(), RuntimeError> {
        let base = sub.start().0;
        let k = move |tid: u64, th: &mut Thread<'_>| -> Result<(), Miss> {
            for j in 0..LANE_WORDS {
                let i = tid * LANE_WORDS + j;
                th.store_u32(base + 4 * i, value(seed, first_word + i as usize))?;
            }
            Ok(())
        };
        let threads = sub.npages() * (WORDS_PER_PAGE as u64 / LANE_WORDS);
        self.ctx.launch(dev, Arc::new(k), threads)?.wait()
    }

    /// A kernel on `dev` reads `sub` and compares every word with `want`.
    fn kernel_read(
        &self,
        dev: DeviceId,
        sub: PageRange,
        want: Vec<u32>,
        first_word: usize,
    ) -> Result<(), String> {
        let base = sub.start().0;
        let want = Arc::new(want);
        let bad = Arc::new(AtomicU64::new(u64::MAX));
        let (w, b) = (Arc::clone(&want), Arc::clone(&bad));
        let k = move |tid: u64, th: &mut Thread<'_>| -> Result<(), Miss> {
            for j in 0..LANE_WORDS {
                let i = tid * LANE_WORDS + j;
                let v = th.load_u32(base + 4 * i)?;
                if v != w[i as usize] {
                    b.fetch_min(i, Ordering::Relaxed);
                }
            }
            Ok(())
        };
        let threads = sub.npages() * (WORDS_PER_PAGE as u64 / LANE_WORDS);
        self.ctx
            .launch(dev, Arc::new(k), threads)
            .and_then(|l| l.wait())
            .map_err(|e| format!("kernel read on {dev:?}: {e}"))?;
        match bad.load(Ordering::Relaxed) {
            u64::MAX => Ok(()),
            i => Err(format!(
                "kernel read on {dev:?}: word {} differs from the model (want {:#x})",
                first_word + i as usize,
                want[i as usize]
            )),
        }
    }

    /// Releases slot `s`: drops an allocation, unregisters a registration and checks the `Vec`
    /// it hands back.
    fn release(&mut self, s: usize) -> Result<(), String> {
        let Some(slot) = self.slots[s].take() else {
            return Ok(());
        };
        match slot.mem {
            Mem::Managed(m) => drop(m),
            Mem::Registered(r) => {
                let buf = r.unregister().map_err(|e| e.error.to_string())?;
                let got: Vec<u32> = buf
                    .iter()
                    .flat_map(|p| p.0.chunks_exact(4))
                    .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                    .collect();
                compare(&got, &slot.model, 0, "unregistered buffer")?;
                self.tally.bytes_checked += got.len() as u64 * 4;
            }
        }
        Ok(())
    }

    /// Checks the invariants, every byte of every slot where it lives (moving nothing), and that
    /// every device frame in use belongs to a page of a live slot or a read copy.
    pub fn check(&mut self) -> Result<(), String> {
        self.tally.checks += 1;
        let mm = AddressSpace::current().map_err(|e| e.to_string())?;
        // A madvise behind hetmem's back returned once its event was read: what the program can
        // observe next (a CPU fault, a launch, a migration) waits for the event to be handled
        // first, and so does the peek.
        mm.sync_events();
        self.ctx.check_invariants()?;
        for (s, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            let n = self.peek(mm, slot).map_err(|e| format!("slot {s}: {e}"))?;
            self.tally.bytes_checked += n;
        }
        self.check_frames()
    }

    /// Compares every page of `slot` with the model where it lives: system pages through a CPU
    /// view (which faults nothing home: they are home), device pages in their frames.
    fn peek(&self, mm: &AddressSpace, slot: &Slot) -> Result<u64, String> {
        let range = slot.mem.range();
        let mut frame = vec![0u8; PAGE_SIZE as usize];
        let mut checked = 0;
        let cpu: Vec<(usize, Location)> = range
            .pages()
            .enumerate()
            .map(|(k, a)| {
                let r = mm.region_of(a).ok_or(format!("page {a} is not managed"))?;
                Ok((k, r.states.get(r.index(a)).location))
            })
            .collect::<Result<_, String>>()?;
        let mut system = Vec::new();
        for (k, loc) in cpu {
            let want = &slot.model[k * WORDS_PER_PAGE..(k + 1) * WORDS_PER_PAGE];
            match loc {
                Location::System | Location::Device { coherent: true, .. } => system.push(k),
                Location::Device { dev, frame: f, .. } | Location::Exclusive { dev, frame: f } => {
                    let d = self
                        .ctx
                        .device(dev)
                        .map_err(|e| format!("page {k} on {dev:?}: {e}"))?;
                    let mem: &DeviceMemory = d.memory();
                    mem.arena()
                        .read(DeviceMemory::frame_offset(f), &mut frame)
                        .map_err(|e| format!("reading {dev:?}'s frame {f:?}: {e}"))?;
                    let got: Vec<u32> = frame
                        .chunks_exact(4)
                        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                        .collect();
                    compare(&got, want, k * WORDS_PER_PAGE, &format!("{dev:?}'s frame"))?;
                    checked += PAGE_SIZE;
                }
            }
        }
        if !system.is_empty() {
            let words = match &slot.mem {
                Mem::Managed(m) => m.view::<u32>(),
                Mem::Registered(r) => r.view::<u32>(),
            };
            for k in system {
                let (a, b) = (k * WORDS_PER_PAGE, (k + 1) * WORDS_PER_PAGE);
                compare(&words[a..b], &slot.model[a..b], a, "system memory")?;
                checked += PAGE_SIZE;
            }
        }
        Ok(checked)
    }

    /// Every frame in use on each device is a page of a live slot or one of its read copies.
    /// Memory unmapped behind hetmem's back gives its frames back when the event thread handles
    /// the UNMAP event, shortly after the system call: wait up to two seconds for that.
    fn check_frames(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.frames_accounted() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    fn frames_accounted(&self) -> Result<(), String> {
        for &d in &self.devs {
            let used = self.ctx.memory_in_use(d).map_err(|e| e.to_string())? / PAGE_SIZE;
            let copies = self
                .ctx
                .device(d)
                .map_err(|e| e.to_string())?
                .stats()
                .copies_held;
            let mut held = 0;
            for slot in self.slots.iter().flatten() {
                held += self
                    .ctx
                    .residency(slot.mem.range())
                    .iter()
                    .filter(|(_, p)| *p == Processor::Device(d))
                    .map(|(r, _)| r.npages())
                    .sum::<u64>();
            }
            if used != held + copies {
                return Err(format!(
                    "{d:?}: {used} frames in use, but live slots hold {held} pages and {copies} \
                     read copies"
                ));
            }
        }
        Ok(())
    }

    /// The end of a run: the CPU reads every slot (every device page faults home), everything
    /// is released, and no device frame stays in use.
    pub fn finish(mut self) -> Result<Tally, String> {
        for s in 0..self.slots.len() {
            let Some(slot) = self.slots[s].as_ref() else {
                continue;
            };
            let got = slot.mem.words();
            compare(&got, &slot.model, 0, &format!("slot {s} at the end"))?;
            self.tally.bytes_checked += got.len() as u64 * 4;
            self.release(s)?;
        }
        self.check()?;
        let stats = self.ctx.stats();
        self.tally.pages_spilled = stats.pages_spilled;
        self.tally.spill_revocations = stats.spill_revocations;
        self.tally.counter_notifications = stats.counter_notifications;
        self.tally.launch_restores = stats.pages_launch_restore;
        self.tally.launch_bounce_pins = stats.pages_launch_bounce_pins;
        self.tally.launch_readbacks = stats.pages_launch_readback;
        for &d in &self.devs {
            let used = self.ctx.memory_in_use(d).map_err(|e| e.to_string())?;
            if used != 0 {
                return Err(format!("{d:?}: {used} bytes in use with nothing allocated"));
            }
        }
        Ok(self.tally.clone())
    }

    /// Runs `ops` (stepping and checking each), then [`Machine::finish`].
    pub fn run(config: ModelConfig, ops: &[Op]) -> Result<Tally, String> {
        let mut m = Machine::new(config.clone())?;
        let trace = std::env::var_os("HETMEM_MODEL_TRACE").is_some();
        if trace {
            eprintln!("--- a new machine: {config:?}");
        }
        for (i, op) in ops.iter().enumerate() {
            if trace {
                eprintln!("step {i}: {op:?}");
            }
            m.step(op).map_err(|e| format!("step {i}: {e}"))?;
        }
        m.finish()
    }
}

/// `Err` naming the first word of `got` that differs from `want` (word `base` is the first).
fn compare(got: &[u32], want: &[u32], base: usize, what: &str) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} words, the model has {}",
            got.len(),
            want.len()
        ));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: word {} is {:#x}, the model says {:#x}",
            base + i,
            got[i],
            want[i]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reads_back_what_encode_wrote() {
        let ops = [
            Op::Alloc { slot: 1, pages: 7 },
            Op::Register {
                slot: 2,
                pages: 3,
                seed: 0xdead_beef,
            },
            Op::CpuWrite {
                slot: 1,
                word: 300,
                len: 9,
                seed: 4,
            },
            Op::KernelWrite {
                dev: 1,
                slot: 1,
                page: 2,
                npages: 3,
                seed: 5,
            },
            Op::Prefetch {
                slot: 0,
                page: 1,
                npages: 2,
                to: Target::Dev(1),
            },
            Op::Advise {
                slot: 3,
                page: 0,
                npages: 1,
                advice: AdviceOp::Preferred(Target::Cpu),
            },
            Op::Suspend,
            Op::Discard {
                slot: 0,
                page: 0,
                npages: 4,
                behind_back: true,
            },
            Op::Unmap { slot: 2 },
            Op::ReadOnly {
                dev: 0,
                slot: 1,
                page: 0,
                npages: 1,
            },
            Op::Release { slot: 1 },
            Op::CpuRead {
                slot: 0,
                page: 0,
                npages: 1,
            },
            Op::KernelRead {
                dev: 0,
                slot: 0,
                page: 3,
                npages: 1,
            },
        ];
        let mut bytes = Vec::new();
        for op in &ops {
            op.encode(&mut bytes);
        }
        assert_eq!(Op::decode(&bytes), ops);
        // A truncated op is dropped, not misread.
        assert_eq!(Op::decode(&bytes[..bytes.len() - 1]), ops[..ops.len() - 1]);
    }
}
