//! Device MMU: the page table a device walks, the TLBs of its compute units, and the batched TLB
//! invalidation that sits between "the mapping changed" and "the frame may be reused" (issue 3,
//! item 2; seed 002 on the GPU MMU, its replayable faults and why a device needs its own page
//! table; reference/uvm-svm.md A.2 for the 4 KiB / 2 MiB page sizes, A.3 and A.5 for the fault
//! kinds; seed 000 for `invalidate_range_start` flushing the device TLB and `clear_flush_young`).
//!
//! The device mirrors the CPU's address space (DESIGN.md, concept map: "GPU MMU, TLB"): a
//! [`VirtAddr`] means the same thing on both sides, and the device page table is a radix tree of
//! the CPU's shape, 9 bits per level over 4 KiB pages. Its depth follows the configured address
//! width (`va_bits`, [`MIN_VA_BITS`]`..=`[`MAX_VA_BITS`]); the root may use fewer than 512 entries:
//!
//! ```text
//!   va_bits = 48: four levels             va_bits = 39: three   57: five   40: four, root of 2
//!   47      39 38      30 29      21 20      12 11          0
//!  +----------+----------+----------+----------+-------------+
//!  | level 3  | level 2  | level 1  | level 0  | byte offset |
//!  |  (root)  |          |  (PMD)   |  (PTE)   |             |
//!  +----------+----------+----------+----------+-------------+
//!  level 0 entries: empty or a 4 KiB leaf
//!  level 1 entries: empty, a table of 512 4 KiB leaves, or one 2 MiB leaf
//!  levels >= 2:     empty or a table
//!
//!  one u64 word per entry (a table pointer when LEAF is clear):
//!  63             32 31   24 23      16 15   10 9    8 7  6   5   4    3   2   1      0
//! +-----------------+-------+----------+-------+------+--+---+---+----+---+---+------+-------+
//! | frame / table id|   0   | peer dev |   0   | aper | 0| D | A | At | W | R | LEAF | VALID |
//! +-----------------+-------+----------+-------+------+--+---+---+----+---+---+------+-------+
//!  aperture (NVIDIA's PTE APERTURE field): 1 local video memory, 2 system memory, 3 peer memory
//! ```
//!
//! A leaf points at a frame of this device ([`PteTarget::Local`]), at system memory
//! ([`PteTarget::System`]: user space cannot know the host physical page, so the leaf says
//! "system memory at this same virtual address"), or at a peer device's frame
//! ([`PteTarget::Peer`]). Page `i` of a 2 MiB leaf is frame `base + i`; a 2 MiB leaf of device
//! memory therefore needs a 512-aligned run of frames, which is what [`DevicePool::alloc_huge`]
//! hands out. Mapping or unmapping part of a 2 MiB leaf, or changing its permissions, splits it
//! into 512 4 KiB leaves first; mapping a whole block with [`DevicePageTable::map_huge`] collapses
//! the block back into one leaf. A walk ([`DevicePageTable::translate`]) sets the accessed bit, and
//! the dirty bit for writes and atomics, as the CPU's MMU does.
//!
//! Every compute unit caches translations in its own [`Tlb`]. A TLB entry goes stale the moment the
//! table removes, retargets or narrows a leaf, so every such change is followed by an invalidation
//! of its range, and frames that a stale entry could still reach are released only with it, in
//! three steps (STYLE.md rule 9; Asterinas `TlbFlusher`'s issue / dispatch / sync):
//!
//! ```text
//!   unmap(range) ──► TlbInvalidator::queue(range)        coalesced with what is already queued
//!                    TlbInvalidator::defer_release(frames)   frames ride on the same batch
//!   dispatch()   ──► every compute unit's TLB drops the queued ranges, once ──► TlbFence(n)
//!   complete(n)  ──► the frames deferred in batches <= n come back: now, and only now, they may
//!                    return to the pool
//! ```
//!
//! [`DeviceMmu`] ties the three together and runs that protocol itself; the parts stay public for
//! tests and for a device that wants its own arrangement. The core is single-threaded; a
//! multi-threaded device wraps it and waits on a fence by comparing it with
//! [`TlbInvalidator::last_completed`] (a sequence counter: dispatched vs completed).
//!
//! Neighbours: [`crate::pool`] allocates the frames local leaves point at and gets them back from
//! [`MmuCore::complete`]; the notifier ([`crate::notifier`]) invalidation callback of a mirroring
//! device calls [`MmuCore::unmap`] / [`MmuCore::protect`]; the fault ring (next) records each
//! [`MmuFault`] a warp takes; the simulated accelerator (hetmem-sim) owns one `DeviceMmu` and
//! translates every warp access through [`CuMmu::translate`].
//!
//! Invariants defended, checked by the `check_invariants` of each type after every step in tests:
//! - DESIGN.md 1 (coherence): once a batch is dispatched, no TLB holds a translation the table no
//!   longer grants (same target, at least the same permissions); only ranges queued and not yet
//!   dispatched may be stale.
//! - DESIGN.md 3 (a page is never freed while a mapping refers to it): a frame pending release is
//!   not mapped, a dispatched one is in no TLB, and none is pending twice.
//! - DESIGN.md 5 (isolation): an access beyond the address width is a fatal fault, an unmapped or
//!   forbidden one a fault; a walk never yields anything but what was mapped. No leaf lies beyond
//!   the width, table counts match their contents, and no empty table stays linked.
//!
//! [`DevicePool::alloc_huge`]: crate::pool::DevicePool::alloc_huge

use std::collections::{HashMap, VecDeque};
use std::fmt;

use bitflags::bitflags;

use crate::addr::{
    AddrError, DevPfn, DeviceId, PageRange, VirtAddr, HUGE_PAGE_SIZE, PAGES_PER_HUGE, PAGE_SHIFT,
    PAGE_SIZE,
};

/// Address bits each level of the table resolves.
const LEVEL_BITS: u32 = 9;
/// Entries of a full table (every level but possibly the root).
pub const ENTRIES_PER_TABLE: usize = 1 << LEVEL_BITS;
/// Narrowest address width: three levels, the root with 4 entries.
pub const MIN_VA_BITS: u32 = 32;
/// Widest address width: five levels, the CPU's LA57 paging.
pub const MAX_VA_BITS: u32 = 57;
/// Deepest table ([`MAX_VA_BITS`] needs five levels).
const MAX_LEVELS: usize = 5;
/// Past this many disjoint ranges a batch drops whole TLBs instead: one big flush beats many small
/// ones (UVM's `tlb_batch_should_invalidate_all`, uvm_tlb_batch.c, does the same past
/// `UVM_TLB_BATCH_MAX_ENTRIES`).
pub const BATCH_RANGES_MAX: usize = 32;

/// The root table always sits in slot 0 of the table arena.
const ROOT: u32 = 0;

const PTE_VALID: u64 = 1 << 0;
const PTE_LEAF: u64 = 1 << 1;
const PTE_PERM_SHIFT: u32 = 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_APERTURE_SHIFT: u32 = 8;
const PTE_PEER_SHIFT: u32 = 16;
const PTE_FRAME_SHIFT: u32 = 32;
const APERTURE_LOCAL: u64 = 1;
const APERTURE_SYSTEM: u64 = 2;
const APERTURE_PEER: u64 = 3;
/// Every bit a leaf may have set.
const PTE_LEAF_BITS: u64 = PTE_VALID
    | PTE_LEAF
    | (0x7 << PTE_PERM_SHIFT)
    | PTE_ACCESSED
    | PTE_DIRTY
    | (0x3 << PTE_APERTURE_SHIFT)
    | (0xff << PTE_PEER_SHIFT)
    | (0xffff_ffff << PTE_FRAME_SHIFT);

bitflags! {
    /// Permissions of a device mapping: UVM's read-only / read-write / read-write-atomic PTE kinds
    /// as independent bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PtePerms: u8 {
        /// Loads.
        const READ = 1 << 0;
        /// Stores.
        const WRITE = 1 << 1;
        /// Atomic read-modify-write operations (which also need READ and WRITE).
        const ATOMIC = 1 << 2;
    }
}

/// What an access does, from least to most intrusive (UVM's fault access types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// A load.
    Read,
    /// A store.
    Write,
    /// An atomic read-modify-write.
    Atomic,
}

impl Access {
    /// The permissions a leaf needs for this access.
    pub fn required(self) -> PtePerms {
        match self {
            Access::Read => PtePerms::READ,
            Access::Write => PtePerms::WRITE,
            Access::Atomic => PtePerms::READ | PtePerms::WRITE | PtePerms::ATOMIC,
        }
    }

    /// Does it modify memory (and so set the dirty bit)?
    pub fn writes(self) -> bool {
        !matches!(self, Access::Read)
    }
}

/// The two leaf sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// A 4 KiB leaf in a level-0 table.
    Base,
    /// A 2 MiB leaf in a level-1 (PMD) table.
    Huge,
}

impl PageSize {
    /// Bytes covered.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Base => PAGE_SIZE,
            PageSize::Huge => HUGE_PAGE_SIZE,
        }
    }

    /// Base pages covered.
    pub fn pages(self) -> u64 {
        self.bytes() >> PAGE_SHIFT
    }
}

/// Where a leaf points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PteTarget {
    /// A frame of this device's memory (its [`crate::pool::DevicePool`]).
    Local(DevPfn),
    /// System memory at the same virtual address, reached over the link (a remote mapping). User
    /// space cannot learn the host physical page, so the virtual address stands for it.
    System,
    /// A frame of another device's memory, reached over a peer link (NVLink, XGMI).
    Peer {
        /// The device owning the frame.
        dev: DeviceId,
        /// The frame in that device's pool.
        frame: DevPfn,
    },
}

impl PteTarget {
    /// The target `pages` base pages further on (system memory stays system memory), or `None`
    /// when the frame number would overflow.
    pub fn offset(self, pages: u64) -> Option<PteTarget> {
        let add = |f: DevPfn| {
            u32::try_from(pages)
                .ok()
                .and_then(|p| f.0.checked_add(p))
                .map(DevPfn)
        };
        match self {
            PteTarget::Local(f) => add(f).map(PteTarget::Local),
            PteTarget::System => Some(PteTarget::System),
            PteTarget::Peer { dev, frame } => {
                add(frame).map(|frame| PteTarget::Peer { dev, frame })
            }
        }
    }

    /// The device frame, if it points at device memory.
    pub fn frame(self) -> Option<DevPfn> {
        match self {
            PteTarget::Local(f) | PteTarget::Peer { frame: f, .. } => Some(f),
            PteTarget::System => None,
        }
    }

    /// `offset` for targets already validated at map time: the frame run fits, so no overflow.
    fn nth(self, pages: u64) -> PteTarget {
        debug_assert!(self.offset(pages).is_some(), "{self:?} + {pages}");
        let add = |f: DevPfn| DevPfn(f.0.wrapping_add(pages as u32));
        match self {
            PteTarget::Local(f) => PteTarget::Local(add(f)),
            PteTarget::System => PteTarget::System,
            PteTarget::Peer { dev, frame } => PteTarget::Peer {
                dev,
                frame: add(frame),
            },
        }
    }

    /// `(owning device, first frame)`, with `local` naming this device.
    fn owned_frame(self, local: DeviceId) -> Option<(DeviceId, DevPfn)> {
        match self {
            PteTarget::Local(f) => Some((local, f)),
            PteTarget::Peer { dev, frame } => Some((dev, frame)),
            PteTarget::System => None,
        }
    }
}

/// A device frame (of this device or a peer) that a removed leaf pointed at. A `Huge` one is the
/// first of 512 frames released together ([`crate::pool::DevicePool::free_huge`]); a `Base` one is
/// a single frame ([`crate::pool::DevicePool::free_page`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MappedFrame {
    /// The device whose pool owns the frame.
    pub dev: DeviceId,
    /// The frame (the first one, for `Huge`).
    pub frame: DevPfn,
    /// How many frames: one, or a 2 MiB block.
    pub size: PageSize,
}

impl MappedFrame {
    /// Every single frame it covers.
    pub fn frames(&self) -> impl Iterator<Item = DevPfn> {
        let first = self.frame.0;
        (0..self.size.pages() as u32).map(move |i| DevPfn(first.wrapping_add(i)))
    }
}

/// Frames that a TLB may still reach: taken out of the page table, not yet safe to reuse. The only
/// way to turn them into reusable frames is [`TlbInvalidator::defer_release`] followed by a
/// completed fence.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeferredFrames(Vec<MappedFrame>);

impl DeferredFrames {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }
    /// The frames, for inspection.
    pub fn as_slice(&self) -> &[MappedFrame] {
        &self.0
    }
    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// None?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Errors of the device MMU: a malformed request, refused before anything changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmuError {
    /// A range that could not be built.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// The address width asked of a page table is not supported.
    #[error("address width of {va_bits} bits is outside {MIN_VA_BITS}..={MAX_VA_BITS}")]
    InvalidAddressWidth {
        /// The width asked for.
        va_bits: u32,
    },
    /// The range reaches past the device's address width.
    #[error("range [{start:#x}, {end:#x}) reaches beyond the {va_bits}-bit device address width")]
    BeyondAddressWidth {
        /// First address of the range.
        start: u64,
        /// One past its last address.
        end: u64,
        /// The width.
        va_bits: u32,
    },
    /// A 2 MiB mapping over a range that is not made of whole, aligned 2 MiB blocks.
    #[error("address or length {addr:#x} is not 2 MiB aligned")]
    UnalignedHuge {
        /// The offending address or length.
        addr: u64,
    },
    /// A 2 MiB leaf needs a run of 512 frames starting at a multiple of 512.
    #[error("frame {frame:?} cannot start a 2 MiB leaf: not a multiple of 512")]
    UnalignedHugeFrame {
        /// The first frame.
        frame: DevPfn,
    },
    /// The run of frames from `first` is longer than the frame numbers go.
    #[error("{pages} frames from {first:?} overflow the frame number")]
    FrameOverflow {
        /// The first frame.
        first: DevPfn,
        /// How many were needed.
        pages: u64,
    },
    /// `map_pages` got a number of targets other than the number of pages.
    #[error("{given} targets for a range of {pages} pages")]
    TargetCount {
        /// Pages in the range.
        pages: u64,
        /// Targets given.
        given: usize,
    },
    /// A peer mapping that names this device: use [`PteTarget::Local`].
    #[error("peer mapping names this device ({dev:?}) itself")]
    PeerIsSelf {
        /// This device.
        dev: DeviceId,
    },
    /// A mapping without any permission; unmap instead.
    #[error("a mapping needs at least one permission (unmap instead)")]
    NoPermissions,
    /// A TLB needs room for at least one entry.
    #[error("a TLB needs at least one entry")]
    EmptyTlb,
    /// A device needs at least one compute unit.
    #[error("a device MMU needs at least one compute unit")]
    NoComputeUnits,
    /// There is no such compute unit.
    #[error("no compute unit {cu} (the device has {units})")]
    NoSuchUnit {
        /// The unit asked for.
        cu: usize,
        /// How many the device has.
        units: usize,
    },
    /// A fence that was never dispatched cannot complete.
    #[error("fence {fence:?} was not dispatched (the last one was {dispatched:?})")]
    FenceNotDispatched {
        /// The fence.
        fence: TlbFence,
        /// The last fence dispatched.
        dispatched: TlbFence,
    },
}

/// What a walk ran into: the fault a warp takes (the fault ring records it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmuFault {
    /// The address is beyond the device's address width: fatal, never replayed (UVM's "limit
    /// violation"; DESIGN.md 5).
    #[error("{va} is beyond the {va_bits}-bit device address width")]
    AddressWidth {
        /// The address.
        va: VirtAddr,
        /// The width.
        va_bits: u32,
    },
    /// Nothing is mapped there: replayable once the page is mapped.
    #[error("no device mapping at {va}")]
    NotPresent {
        /// The address.
        va: VirtAddr,
    },
    /// The leaf does not allow the access: replayable if the CPU's mapping allows it and the
    /// servicer upgrades the leaf, fatal otherwise (the servicer decides).
    #[error("{access:?} at {va} denied: the mapping allows {perms:?}")]
    Permission {
        /// The address.
        va: VirtAddr,
        /// What was attempted.
        access: Access,
        /// What the leaf allows.
        perms: PtePerms,
    },
}

impl MmuFault {
    /// The faulting address.
    pub fn va(&self) -> VirtAddr {
        match *self {
            MmuFault::AddressWidth { va, .. }
            | MmuFault::NotPresent { va }
            | MmuFault::Permission { va, .. } => va,
        }
    }

    /// Is it fatal whatever the servicer does?
    pub fn is_fatal(&self) -> bool {
        matches!(self, MmuFault::AddressWidth { .. })
    }
}

/// A leaf as a walk found it: what a TLB caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// First address the leaf maps (4 KiB or 2 MiB aligned).
    pub leaf: VirtAddr,
    /// Its size.
    pub size: PageSize,
    /// Where its first page points; page `i` points at `base.offset(i)`.
    pub base: PteTarget,
    /// Its permissions.
    pub perms: PtePerms,
    /// Its accessed bit, as of the walk that produced this.
    pub accessed: bool,
    /// Its dirty bit, as of the walk that produced this. A TLB entry that is not dirty does not
    /// serve writes: the write walks the table again to set the bit, as x86 does.
    pub dirty: bool,
}

impl Translation {
    /// One past the last address of the leaf.
    pub fn end(&self) -> VirtAddr {
        VirtAddr(self.leaf.0.saturating_add(self.size.bytes()))
    }

    /// Does the leaf map `va`?
    pub fn covers(&self, va: VirtAddr) -> bool {
        self.leaf <= va && va < self.end()
    }

    /// Where the base page holding `va` points, if the leaf covers `va`.
    pub fn target(&self, va: VirtAddr) -> Option<PteTarget> {
        if !self.covers(va) {
            return None;
        }
        self.base.offset((va.0 - self.leaf.0) >> PAGE_SHIFT)
    }

    fn overlaps(&self, range: &PageRange) -> bool {
        range.overlaps(self.leaf, self.end())
    }
}

/// What [`DevicePageTable::unmap`] took away (also what a `map` displaced).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnmapReport {
    /// Base pages no longer mapped to what they were.
    pub pages: u64,
    /// 2 MiB leaves removed whole.
    pub huge_leaves: u64,
    /// Pages among them that pointed at system memory.
    pub system_pages: u64,
    /// Pages among them that pointed at device memory (this device's or a peer's); their frames
    /// went to the [`DeferredFrames`].
    pub device_pages: u64,
    /// Pages among them whose leaf was dirty.
    pub dirty_pages: u64,
}

/// What [`DevicePageTable::map`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapReport {
    /// Base pages that were not mapped before.
    pub mapped: u64,
    /// Base pages a TLB may now hold a wrong translation for: retargeted, or left with fewer
    /// permissions. Non-zero means the range must be invalidated.
    pub stale: u64,
    /// The mappings that were replaced by ones to a different target.
    pub displaced: UnmapReport,
}

/// What [`DevicePageTable::protect`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectReport {
    /// Base pages whose permissions changed.
    pub changed: u64,
    /// Base pages among them that lost a permission: non-zero means the range must be invalidated.
    pub stale: u64,
}

/// Counters of a page table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageTableStats {
    /// Base pages mapped now (a 2 MiB leaf counts 512).
    pub mapped_pages: u64,
    /// 2 MiB leaves now.
    pub huge_leaves: u64,
    /// Tables linked now, the root included.
    pub tables: u64,
    /// Tables ever allocated (the root included).
    pub tables_allocated: u64,
    /// Tables freed because they became empty, or because a 2 MiB leaf replaced them.
    pub tables_freed: u64,
    /// 2 MiB leaves split into 512 4 KiB leaves.
    pub splits: u64,
    /// Tables of 4 KiB leaves collapsed into a 2 MiB leaf.
    pub collapses: u64,
    /// Walks ([`DevicePageTable::translate`] calls).
    pub walks: u64,
    /// Walks that found nothing mapped.
    pub faults_not_present: u64,
    /// Walks that found a leaf without the needed permission.
    pub faults_permission: u64,
    /// Walks beyond the address width.
    pub faults_address_width: u64,
    /// Leaves whose accessed bit [`DevicePageTable::clear_accessed`] cleared.
    pub accessed_cleared: u64,
}

/// One page-table entry word (layout in the module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Pte(u64);

impl Pte {
    const EMPTY: Pte = Pte(0);

    fn leaf(target: PteTarget, perms: PtePerms) -> Pte {
        let (aperture, dev, frame) = match target {
            PteTarget::Local(f) => (APERTURE_LOCAL, 0, f.0),
            PteTarget::System => (APERTURE_SYSTEM, 0, 0),
            PteTarget::Peer { dev, frame } => (APERTURE_PEER, dev.0, frame.0),
        };
        Pte(PTE_VALID
            | PTE_LEAF
            | (u64::from(perms.bits()) << PTE_PERM_SHIFT)
            | (aperture << PTE_APERTURE_SHIFT)
            | (u64::from(dev) << PTE_PEER_SHIFT)
            | (u64::from(frame) << PTE_FRAME_SHIFT))
    }

    fn table(id: u32) -> Pte {
        Pte(PTE_VALID | (u64::from(id) << PTE_FRAME_SHIFT))
    }

    fn is_valid(self) -> bool {
        self.0 & PTE_VALID != 0
    }
    fn is_leaf(self) -> bool {
        self.is_valid() && self.0 & PTE_LEAF != 0
    }
    fn table_id(self) -> u32 {
        (self.0 >> PTE_FRAME_SHIFT) as u32
    }
    fn perms(self) -> PtePerms {
        PtePerms::from_bits_truncate((self.0 >> PTE_PERM_SHIFT) as u8 & 0x7)
    }
    fn with_perms(self, perms: PtePerms) -> Pte {
        Pte((self.0 & !(0x7 << PTE_PERM_SHIFT)) | (u64::from(perms.bits()) << PTE_PERM_SHIFT))
    }
    fn aperture(self) -> u64 {
        (self.0 >> PTE_APERTURE_SHIFT) & 0x3
    }
    fn target(self) -> PteTarget {
        let frame = DevPfn((self.0 >> PTE_FRAME_SHIFT) as u32);
        match self.aperture() {
            APERTURE_LOCAL => PteTarget::Local(frame),
            APERTURE_PEER => PteTarget::Peer {
                dev: DeviceId((self.0 >> PTE_PEER_SHIFT) as u8),
                frame,
            },
            _ => PteTarget::System,
        }
    }
    fn accessed(self) -> bool {
        self.0 & PTE_ACCESSED != 0
    }
    fn dirty(self) -> bool {
        self.0 & PTE_DIRTY != 0
    }
    /// `self` with the accessed and dirty bits of `other` added.
    fn with_history_of(self, other: Pte) -> Pte {
        Pte(self.0 | (other.0 & (PTE_ACCESSED | PTE_DIRTY)))
    }
}

impl fmt::Debug for Pte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_valid() {
            write!(f, "Pte(empty)")
        } else if self.is_leaf() {
            write!(f, "Pte({:?} {:?}", self.target(), self.perms())?;
            if self.accessed() {
                write!(f, " A")?;
            }
            if self.dirty() {
                write!(f, " D")?;
            }
            write!(f, ")")
        } else {
            write!(f, "Pte(table {})", self.table_id())
        }
    }
}

/// Index of `va` in a table of `level`.
fn index(va: u64, level: u32) -> usize {
    ((va >> (PAGE_SHIFT + LEVEL_BITS * level)) as usize) & (ENTRIES_PER_TABLE - 1)
}

/// Does `new` lack a permission that `old` had?
fn narrows(old: PtePerms, new: PtePerms) -> bool {
    !old.difference(new).is_empty()
}

/// One table of the radix tree. A slot of the arena whose table was freed has no entries.
struct Table {
    level: u32,
    present: u32,
    entries: Box<[u64]>,
}

impl Table {
    fn new(level: u32) -> Self {
        Table {
            level,
            present: 0,
            entries: vec![0; ENTRIES_PER_TABLE].into_boxed_slice(),
        }
    }
    fn is_free(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Appends `[start, end)` to a list of young ranges, merging with the last when adjacent.
fn push_run(runs: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    match runs.last_mut() {
        Some(last) if last.1 == start => last.1 = end,
        _ => runs.push((start, end)),
    }
}

/// Appends the pages a removed leaf pointed at to `report` and its frames to `release`.
fn record_removed(
    local: DeviceId,
    e: Pte,
    size: PageSize,
    report: &mut UnmapReport,
    release: &mut DeferredFrames,
) {
    let n = size.pages();
    report.pages += n;
    if size == PageSize::Huge {
        report.huge_leaves += 1;
    }
    if e.dirty() {
        report.dirty_pages += n;
    }
    match e.target().owned_frame(local) {
        None => report.system_pages += n,
        Some((dev, frame)) => {
            report.device_pages += n;
            release.0.push(MappedFrame { dev, frame, size });
        }
    }
}

/// The device page table: a radix tree mirroring the CPU's, with 4 KiB and 2 MiB leaves.
///
/// Tables live in an arena (`Vec`) and directory entries hold the index of the next table, as a
/// hardware PDE holds its physical address. Every operation takes a validated range and either
/// fails before changing anything or completes.
pub struct DevicePageTable {
    dev: DeviceId,
    va_bits: u32,
    levels: u32,
    tables: Vec<Table>,
    free_tables: Vec<u32>,
    stats: PageTableStats,
}

impl fmt::Debug for DevicePageTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePageTable")
            .field("dev", &self.dev)
            .field("va_bits", &self.va_bits)
            .field("levels", &self.levels)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl DevicePageTable {
    /// An empty table of device `dev` for addresses below `2^va_bits`.
    pub fn new(dev: DeviceId, va_bits: u32) -> Result<Self, MmuError> {
        if !(MIN_VA_BITS..=MAX_VA_BITS).contains(&va_bits) {
            return Err(MmuError::InvalidAddressWidth { va_bits });
        }
        let levels = (va_bits - PAGE_SHIFT).div_ceil(LEVEL_BITS);
        let mut pt = DevicePageTable {
            dev,
            va_bits,
            levels,
            tables: Vec::new(),
            free_tables: Vec::new(),
            stats: PageTableStats::default(),
        };
        let root = pt.alloc_table(levels - 1);
        debug_assert_eq!(root, ROOT);
        Ok(pt)
    }

    /// The device this table belongs to ([`PteTarget::Local`] frames are its).
    pub fn dev(&self) -> DeviceId {
        self.dev
    }
    /// The address width.
    pub fn va_bits(&self) -> u32 {
        self.va_bits
    }
    /// Levels of tables, the root's included.
    pub fn levels(&self) -> u32 {
        self.levels
    }
    /// Entries the root uses (512, or fewer when the width is not a multiple of 9 above 12).
    pub fn root_entries(&self) -> usize {
        1 << (self.va_bits - PAGE_SHIFT - LEVEL_BITS * (self.levels - 1))
    }
    /// Base pages mapped (a 2 MiB leaf counts 512).
    pub fn mapped_pages(&self) -> u64 {
        self.stats.mapped_pages
    }
    /// 2 MiB leaves.
    pub fn huge_leaves(&self) -> u64 {
        self.stats.huge_leaves
    }
    /// Counters.
    pub fn stats(&self) -> PageTableStats {
        self.stats
    }

    fn check_range(&self, range: &PageRange) -> Result<(), MmuError> {
        if range.end().0 > 1u64 << self.va_bits {
            return Err(MmuError::BeyondAddressWidth {
                start: range.start().0,
                end: range.end().0,
                va_bits: self.va_bits,
            });
        }
        Ok(())
    }

    fn check_perms(perms: PtePerms) -> Result<(), MmuError> {
        if perms.is_empty() {
            return Err(MmuError::NoPermissions);
        }
        Ok(())
    }

    /// Checks that `pages` frames from `base` exist and that a peer target is not this device.
    fn check_target(&self, base: PteTarget, pages: u64) -> Result<(), MmuError> {
        match base {
            PteTarget::Peer { dev, .. } if dev == self.dev => {
                return Err(MmuError::PeerIsSelf { dev });
            }
            _ => {}
        }
        if let Some(first) = base.frame() {
            if base.offset(pages - 1).is_none() {
                return Err(MmuError::FrameOverflow { first, pages });
            }
        }
        Ok(())
    }

    fn alloc_table(&mut self, level: u32) -> u32 {
        self.stats.tables += 1;
        self.stats.tables_allocated += 1;
        if let Some(id) = self.free_tables.pop() {
            self.tables[id as usize] = Table::new(level);
            return id;
        }
        self.tables.push(Table::new(level));
        (self.tables.len() - 1) as u32
    }

    fn free_table(&mut self, id: u32) {
        let t = &mut self.tables[id as usize];
        debug_assert!(id != ROOT && t.present == 0 && t.entries.iter().all(|&w| w == 0));
        t.entries = Box::default();
        self.free_tables.push(id);
        self.stats.tables -= 1;
        self.stats.tables_freed += 1;
    }

    fn entry(&self, t: u32, i: usize) -> Pte {
        Pte(self.tables[t as usize].entries[i])
    }

    /// Writes entry `i` of table `t`, keeping the table's present count and the leaf counters.
    fn set(&mut self, t: u32, i: usize, new: Pte) -> Pte {
        let tab = &mut self.tables[t as usize];
        let old = Pte(tab.entries[i]);
        tab.entries[i] = new.0;
        tab.present = tab.present + u32::from(new.is_valid()) - u32::from(old.is_valid());
        let level = tab.level;
        let pages = if level == 0 { 1 } else { PAGES_PER_HUGE };
        if old.is_leaf() {
            self.stats.mapped_pages -= pages;
            self.stats.huge_leaves -= u64::from(level == 1);
        }
        if new.is_leaf() {
            self.stats.mapped_pages += pages;
            self.stats.huge_leaves += u64::from(level == 1);
        }
        old
    }

    /// The level-1 table and index for `va`, creating the directories on the way.
    fn pmd_slot(&mut self, va: u64) -> (u32, usize) {
        let mut t = ROOT;
        for level in (2..self.levels).rev() {
            let i = index(va, level);
            let e = self.entry(t, i);
            t = if e.is_valid() {
                debug_assert!(!e.is_leaf(), "leaf at level {level}");
                e.table_id()
            } else {
                let child = self.alloc_table(level - 1);
                self.set(t, i, Pte::table(child));
                child
            };
        }
        (t, index(va, 1))
    }

    /// The first 2 MiB chunk of `[at, end)` whose level-1 table exists, with its slot there. An
    /// empty directory entry skips its whole span at once, so an operation over a huge, sparse
    /// range costs what is mapped in it, not its length (DESIGN.md, Scale).
    fn next_pmd(&self, mut at: u64, end: u64) -> Option<(PageRange, u32, usize)> {
        'search: while at < end {
            let mut t = ROOT;
            for level in (2..self.levels).rev() {
                let e = self.entry(t, index(at, level));
                if !e.is_valid() {
                    let span = 1u64 << (PAGE_SHIFT + LEVEL_BITS * level);
                    at = (at | (span - 1)).saturating_add(1);
                    continue 'search;
                }
                t = e.table_id();
            }
            let chunk_end = ((at | (HUGE_PAGE_SIZE - 1)) + 1).min(end);
            // Both ends are page aligned and ordered: this cannot fail.
            let chunk = PageRange::from_bounds(at, chunk_end).ok()?;
            return Some((chunk, t, index(at, 1)));
        }
        None
    }

    /// The table of 4 KiB leaves under PMD entry `i` of `pmd`, creating it, or splitting a 2 MiB
    /// leaf into it.
    fn pte_table(&mut self, pmd: u32, i: usize) -> u32 {
        let e = self.entry(pmd, i);
        if !e.is_valid() {
            let pt = self.alloc_table(0);
            self.set(pmd, i, Pte::table(pt));
            pt
        } else if e.is_leaf() {
            self.split(pmd, i)
        } else {
            e.table_id()
        }
    }

    /// Replaces the 2 MiB leaf at PMD entry `i` of `pmd` by a table of 512 4 KiB leaves with the
    /// same targets, permissions and history: every translation stays what it was.
    fn split(&mut self, pmd: u32, i: usize) -> u32 {
        let huge = self.entry(pmd, i);
        let pt = self.alloc_table(0);
        let (base, perms) = (huge.target(), huge.perms());
        for k in 0..ENTRIES_PER_TABLE {
            let leaf = Pte::leaf(base.nth(k as u64), perms).with_history_of(huge);
            self.set(pt, k, leaf);
        }
        self.set(pmd, i, Pte::table(pt));
        self.stats.splits += 1;
        tracing::trace!(dev = ?self.dev, ?base, "device pte: split 2 MiB leaf");
        pt
    }

    /// Unlinks and frees the tables on the way to `va` that no longer hold anything, bottom up.
    fn prune(&mut self, va: u64) {
        let mut path = [(0u32, 0usize); MAX_LEVELS];
        let mut depth = 0;
        let mut t = ROOT;
        for level in (1..self.levels).rev() {
            let i = index(va, level);
            let e = self.entry(t, i);
            if !e.is_valid() || e.is_leaf() {
                break;
            }
            path[depth] = (t, i);
            depth += 1;
            t = e.table_id();
        }
        while depth > 0 {
            depth -= 1;
            let (parent, i) = path[depth];
            let child = self.entry(parent, i).table_id();
            if self.tables[child as usize].present != 0 {
                break;
            }
            self.set(parent, i, Pte::EMPTY);
            self.free_table(child);
        }
    }

    /// The table, index and level of the leaf mapping `va`.
    fn find_leaf(&self, va: u64) -> Option<(u32, usize, u32)> {
        if va >> self.va_bits != 0 {
            return None;
        }
        let mut t = ROOT;
        let mut level = self.levels - 1;
        loop {
            let i = index(va, level);
            let e = self.entry(t, i);
            if !e.is_valid() {
                return None;
            }
            if e.is_leaf() {
                return Some((t, i, level));
            }
            if level == 0 {
                return None;
            }
            t = e.table_id();
            level -= 1;
        }
    }

    fn translation(e: Pte, level: u32, va: u64) -> Translation {
        let size = if level == 0 {
            PageSize::Base
        } else {
            PageSize::Huge
        };
        Translation {
            leaf: VirtAddr(va & !(size.bytes() - 1)),
            size,
            base: e.target(),
            perms: e.perms(),
            accessed: e.accessed(),
            dirty: e.dirty(),
        }
    }

    /// The leaf mapping `va`, without touching its accessed or dirty bit (`None` beyond the
    /// address width too).
    pub fn lookup(&self, va: VirtAddr) -> Option<Translation> {
        let (t, i, level) = self.find_leaf(va.0)?;
        Some(Self::translation(self.entry(t, i), level, va.0))
    }

    /// The hardware walk of a TLB miss: the leaf mapping `va` if it allows `access`; sets its
    /// accessed bit, and its dirty bit when `access` writes.
    pub fn translate(&mut self, va: VirtAddr, access: Access) -> Result<Translation, MmuFault> {
        self.stats.walks += 1;
        if va.0 >> self.va_bits != 0 {
            self.stats.faults_address_width += 1;
            return Err(MmuFault::AddressWidth {
                va,
                va_bits: self.va_bits,
            });
        }
        let Some((t, i, level)) = self.find_leaf(va.0) else {
            self.stats.faults_not_present += 1;
            return Err(MmuFault::NotPresent { va });
        };
        let e = self.entry(t, i);
        if !e.perms().contains(access.required()) {
            self.stats.faults_permission += 1;
            return Err(MmuFault::Permission {
                va,
                access,
                perms: e.perms(),
            });
        }
        let mut bits = PTE_ACCESSED;
        if access.writes() {
            bits |= PTE_DIRTY;
        }
        let e = Pte(e.0 | bits);
        self.set(t, i, e);
        Ok(Self::translation(e, level, va.0))
    }

    /// Maps `range` with 4 KiB leaves to consecutive frames from `base` (or to system memory),
    /// splitting any 2 MiB leaf it cuts into. A page already mapped to the same target keeps its
    /// accessed and dirty bits and gets `perms`; one mapped elsewhere is replaced, and its frame
    /// goes to `release`. A device frame backs one page: mapping it at a second address is the
    /// caller's bug, and [`DeviceMmu::check_invariants`] reports it once either copy is unmapped.
    pub fn map(
        &mut self,
        range: PageRange,
        base: PteTarget,
        perms: PtePerms,
        release: &mut DeferredFrames,
    ) -> Result<MapReport, MmuError> {
        self.check_range(&range)?;
        Self::check_perms(perms)?;
        self.check_target(base, range.npages())?;
        Ok(self.map_with(range, perms, |k| base.nth(k), release))
    }

    /// [`DevicePageTable::map`] with one target per page (frames of a migration's destination
    /// array need not be consecutive).
    pub fn map_pages(
        &mut self,
        range: PageRange,
        targets: &[PteTarget],
        perms: PtePerms,
        release: &mut DeferredFrames,
    ) -> Result<MapReport, MmuError> {
        self.check_range(&range)?;
        Self::check_perms(perms)?;
        if targets.len() as u64 != range.npages() {
            return Err(MmuError::TargetCount {
                pages: range.npages(),
                given: targets.len(),
            });
        }
        for &t in targets {
            self.check_target(t, 1)?;
        }
        Ok(self.map_with(range, perms, |k| targets[k as usize], release))
    }

    fn map_with(
        &mut self,
        range: PageRange,
        perms: PtePerms,
        target: impl Fn(u64) -> PteTarget,
        release: &mut DeferredFrames,
    ) -> MapReport {
        let mut report = MapReport::default();
        let mut k = 0u64;
        for chunk in range.chunks(HUGE_PAGE_SIZE) {
            let (pmd, i) = self.pmd_slot(chunk.start().0);
            let pt = self.pte_table(pmd, i);
            for va in chunk.pages() {
                let new_target = target(k);
                k += 1;
                let j = index(va.0, 0);
                let old = self.entry(pt, j);
                let mut new = Pte::leaf(new_target, perms);
                if !old.is_valid() {
                    report.mapped += 1;
                } else if old.target() == new_target {
                    new = new.with_history_of(old);
                    report.stale += u64::from(narrows(old.perms(), perms));
                } else {
                    report.stale += 1;
                    record_removed(
                        self.dev,
                        old,
                        PageSize::Base,
                        &mut report.displaced,
                        release,
                    );
                }
                self.set(pt, j, new);
            }
        }
        report
    }

    /// Maps `range`, whole aligned 2 MiB blocks, with 2 MiB leaves: block `n` to frames from
    /// `base + 512 n` (`base` a multiple of 512), or to system memory. A table of 4 KiB leaves
    /// already there is collapsed: pages that pointed at the same frames keep them (and their
    /// history), the others are replaced and their frames go to `release`.
    pub fn map_huge(
        &mut self,
        range: PageRange,
        base: PteTarget,
        perms: PtePerms,
        release: &mut DeferredFrames,
    ) -> Result<MapReport, MmuError> {
        for addr in [range.start().0, range.len_bytes()] {
            if !addr.is_multiple_of(HUGE_PAGE_SIZE) {
                return Err(MmuError::UnalignedHuge { addr });
            }
        }
        self.check_range(&range)?;
        Self::check_perms(perms)?;
        if let Some(frame) = base.frame() {
            if !u64::from(frame.0).is_multiple_of(PAGES_PER_HUGE) {
                return Err(MmuError::UnalignedHugeFrame { frame });
            }
        }
        self.check_target(base, range.npages())?;
        let mut report = MapReport::default();
        for (n, block) in range.chunks(HUGE_PAGE_SIZE).enumerate() {
            let new_target = base.nth(n as u64 * PAGES_PER_HUGE);
            let (pmd, i) = self.pmd_slot(block.start().0);
            let old = self.entry(pmd, i);
            let mut new = Pte::leaf(new_target, perms);
            if !old.is_valid() {
                report.mapped += PAGES_PER_HUGE;
            } else if old.is_leaf() {
                if old.target() == new_target {
                    new = new.with_history_of(old);
                    if narrows(old.perms(), perms) {
                        report.stale += PAGES_PER_HUGE;
                    }
                } else {
                    report.stale += PAGES_PER_HUGE;
                    record_removed(
                        self.dev,
                        old,
                        PageSize::Huge,
                        &mut report.displaced,
                        release,
                    );
                }
            } else {
                let pt = old.table_id();
                for k in 0..ENTRIES_PER_TABLE {
                    let e = self.set(pt, k, Pte::EMPTY);
                    if !e.is_valid() {
                        report.mapped += 1;
                    } else if e.target() == new_target.nth(k as u64) {
                        new = new.with_history_of(e);
                        report.stale += u64::from(narrows(e.perms(), perms));
                    } else {
                        report.stale += 1;
                        record_removed(self.dev, e, PageSize::Base, &mut report.displaced, release);
                    }
                }
                self.free_table(pt);
                self.stats.collapses += 1;
            }
            self.set(pmd, i, new);
        }
        Ok(report)
    }

    /// Unmaps every page of `range`, splitting a 2 MiB leaf it only partly covers and freeing the
    /// tables left empty. The frames the leaves pointed at go to `release`: they may be reused only
    /// after the TLB invalidation of `range` completed.
    pub fn unmap(
        &mut self,
        range: PageRange,
        release: &mut DeferredFrames,
    ) -> Result<UnmapReport, MmuError> {
        self.check_range(&range)?;
        let mut report = UnmapReport::default();
        let mut at = range.start().0;
        while let Some((chunk, pmd, i)) = self.next_pmd(at, range.end().0) {
            at = chunk.end().0;
            let e = self.entry(pmd, i);
            if !e.is_valid() {
                continue;
            }
            let pt = if e.is_leaf() {
                if chunk.npages() == PAGES_PER_HUGE {
                    self.set(pmd, i, Pte::EMPTY);
                    record_removed(self.dev, e, PageSize::Huge, &mut report, release);
                    self.prune(chunk.start().0);
                    continue;
                }
                self.split(pmd, i)
            } else {
                e.table_id()
            };
            for va in chunk.pages() {
                let old = self.set(pt, index(va.0, 0), Pte::EMPTY);
                if old.is_valid() {
                    record_removed(self.dev, old, PageSize::Base, &mut report, release);
                }
            }
            if self.tables[pt as usize].present == 0 {
                self.prune(chunk.start().0);
            }
        }
        Ok(report)
    }

    /// Sets the permissions of every mapped page of `range` to `perms` (unmapped pages stay
    /// unmapped), splitting a 2 MiB leaf it only partly covers when its permissions change.
    pub fn protect(
        &mut self,
        range: PageRange,
        perms: PtePerms,
    ) -> Result<ProtectReport, MmuError> {
        self.check_range(&range)?;
        Self::check_perms(perms)?;
        let mut report = ProtectReport::default();
        let mut at = range.start().0;
        while let Some((chunk, pmd, i)) = self.next_pmd(at, range.end().0) {
            at = chunk.end().0;
            let e = self.entry(pmd, i);
            if !e.is_valid() || (e.is_leaf() && e.perms() == perms) {
                continue;
            }
            let pt = if e.is_leaf() {
                if chunk.npages() == PAGES_PER_HUGE {
                    self.set(pmd, i, e.with_perms(perms));
                    report.changed += PAGES_PER_HUGE;
                    if narrows(e.perms(), perms) {
                        report.stale += PAGES_PER_HUGE;
                    }
                    continue;
                }
                self.split(pmd, i)
            } else {
                e.table_id()
            };
            for va in chunk.pages() {
                let j = index(va.0, 0);
                let old = self.entry(pt, j);
                if old.is_valid() && old.perms() != perms {
                    self.set(pt, j, old.with_perms(perms));
                    report.changed += 1;
                    report.stale += u64::from(narrows(old.perms(), perms));
                }
            }
        }
        Ok(report)
    }

    /// The `clear_flush_young` of seed 000: clears the accessed bit of every leaf of `range` and
    /// returns the ranges of the leaves that had it (whole 2 MiB leaves, even when `range` covers
    /// part of one: the bit is per leaf), coalesced. A TLB keeps serving the leaves it holds without
    /// setting the bit again, so the caller flushes these ranges ([`MmuCore::clear_accessed`]
    /// queues them) before the next sample means anything.
    pub fn clear_accessed(&mut self, range: PageRange) -> Result<Vec<PageRange>, MmuError> {
        self.check_range(&range)?;
        let mut runs = Vec::new();
        let mut at = range.start().0;
        while let Some((chunk, pmd, i)) = self.next_pmd(at, range.end().0) {
            at = chunk.end().0;
            let e = self.entry(pmd, i);
            if e.is_leaf() {
                if e.accessed() {
                    self.set(pmd, i, Pte(e.0 & !PTE_ACCESSED));
                    self.stats.accessed_cleared += 1;
                    let block = chunk.start().huge_down().0;
                    push_run(&mut runs, block, block + HUGE_PAGE_SIZE);
                }
                continue;
            }
            if !e.is_valid() {
                continue;
            }
            let pt = e.table_id();
            for va in chunk.pages() {
                let j = index(va.0, 0);
                let old = self.entry(pt, j);
                if old.is_valid() && old.accessed() {
                    self.set(pt, j, Pte(old.0 & !PTE_ACCESSED));
                    self.stats.accessed_cleared += 1;
                    push_run(&mut runs, va.0, va.0 + PAGE_SIZE);
                }
            }
        }
        Ok(runs
            .into_iter()
            .filter_map(|(s, e)| PageRange::from_bounds(s, e).ok())
            .collect())
    }

    /// Calls `f` with every leaf, in address order.
    pub fn for_each_leaf(&self, mut f: impl FnMut(Translation)) {
        let mut stack = vec![(ROOT, 0u64)];
        while let Some((t, prefix)) = stack.pop() {
            let tab = &self.tables[t as usize];
            let shift = PAGE_SHIFT + LEVEL_BITS * tab.level;
            // Reverse so the stack pops the lowest address first.
            for (i, &w) in tab.entries.iter().enumerate().rev() {
                let e = Pte(w);
                let va = prefix | ((i as u64) << shift);
                if e.is_leaf() {
                    f(Self::translation(e, tab.level, va));
                } else if e.is_valid() {
                    stack.push((e.table_id(), va));
                }
            }
        }
    }

    /// Verifies the tree: every linked table is reached once at the right level, present counts
    /// match contents, no empty table stays linked, freed slots are unreachable, leaves are
    /// well-formed (2 MiB ones only at level 1, on 512-aligned frames) and none lies beyond the
    /// address width, and the counters match.
    pub fn check_invariants(&self) -> Result<(), String> {
        let root = self
            .tables
            .first()
            .ok_or_else(|| "no root table".to_string())?;
        if root.is_free() || root.level != self.levels - 1 {
            return Err(format!(
                "root is free or at level {} of {}",
                root.level, self.levels
            ));
        }
        let mut reached = vec![false; self.tables.len()];
        reached[ROOT as usize] = true;
        let mut stack = vec![ROOT];
        let (mut pages, mut huge, mut live) = (0u64, 0u64, 0u64);
        while let Some(t) = stack.pop() {
            live += 1;
            let tab = &self.tables[t as usize];
            let present = tab.entries.iter().filter(|&&w| w != 0).count() as u32;
            if present != tab.present {
                return Err(format!(
                    "table {t} counts {} entries, holds {present}",
                    tab.present
                ));
            }
            if t != ROOT && present == 0 {
                return Err(format!(
                    "empty table {t} (level {}) still linked",
                    tab.level
                ));
            }
            for (i, &w) in tab.entries.iter().enumerate() {
                let e = Pte(w);
                if w == 0 {
                    continue;
                }
                if !e.is_valid() {
                    return Err(format!("table {t}[{i}]: bits {w:#x} without VALID"));
                }
                if t == ROOT && i >= self.root_entries() {
                    return Err(format!(
                        "root entry {i} lies beyond the {}-bit width",
                        self.va_bits
                    ));
                }
                if e.is_leaf() {
                    match tab.level {
                        0 => pages += 1,
                        1 => {
                            pages += PAGES_PER_HUGE;
                            huge += 1;
                            if let Some(f) = e.target().frame() {
                                if !u64::from(f.0).is_multiple_of(PAGES_PER_HUGE) {
                                    return Err(format!("2 MiB leaf {e:?} on unaligned frame"));
                                }
                            }
                        }
                        l => return Err(format!("leaf {e:?} at level {l}")),
                    }
                    if w & !PTE_LEAF_BITS != 0 || e.aperture() == 0 || e.perms().is_empty() {
                        return Err(format!("malformed leaf {w:#x}"));
                    }
                    let extra = match e.aperture() {
                        APERTURE_LOCAL => w & (0xff << PTE_PEER_SHIFT),
                        APERTURE_SYSTEM => w & (0xffff_ffff_00ff_0000),
                        _ => 0,
                    };
                    if extra != 0 {
                        return Err(format!("leaf {w:#x} carries bits its aperture has not"));
                    }
                    if let PteTarget::Peer { dev, .. } = e.target() {
                        if dev == self.dev {
                            return Err(format!("peer leaf {e:?} names this device"));
                        }
                    }
                } else {
                    if tab.level == 0 {
                        return Err(format!("table pointer {e:?} in a level-0 table {t}"));
                    }
                    if w & !(PTE_VALID | (0xffff_ffff << PTE_FRAME_SHIFT)) != 0 {
                        return Err(format!("malformed table pointer {w:#x}"));
                    }
                    let c = e.table_id() as usize;
                    if c >= self.tables.len() || reached[c] {
                        return Err(format!("table {c} out of the arena or linked twice"));
                    }
                    reached[c] = true;
                    let child = &self.tables[c];
                    if child.is_free() || child.level + 1 != tab.level {
                        return Err(format!(
                            "table {c} is free or at level {} under level {}",
                            child.level, tab.level
                        ));
                    }
                    stack.push(c as u32);
                }
            }
        }
        for &f in &self.free_tables {
            if reached[f as usize] || !self.tables[f as usize].is_free() {
                return Err(format!("free slot {f} is linked or still holds a table"));
            }
        }
        if live + self.free_tables.len() as u64 != self.tables.len() as u64 {
            return Err(format!(
                "{live} linked + {} free != {} slots: a table leaked",
                self.free_tables.len(),
                self.tables.len()
            ));
        }
        if (pages, huge, live)
            != (
                self.stats.mapped_pages,
                self.stats.huge_leaves,
                self.stats.tables,
            )
        {
            return Err(format!(
                "counted {pages} pages, {huge} huge leaves, {live} tables; stats say {:?}",
                self.stats
            ));
        }
        Ok(())
    }
}

/// Counters of a TLB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlbStats {
    /// Lookups served from the TLB.
    pub hits: u64,
    /// Lookups that must walk the table (no entry, or one without the permission or dirty bit).
    pub misses: u64,
    /// Translations inserted.
    pub fills: u64,
    /// Entries dropped to make room (least recently used first).
    pub evictions: u64,
    /// Entries dropped by invalidations.
    pub invalidated: u64,
}

#[derive(Clone, Copy, Debug)]
struct TlbSlot {
    tr: Translation,
    last_use: u64,
}

/// The TLB of one compute unit: a small fully associative cache of 4 KiB and 2 MiB translations
/// with least-recently-used replacement. Entries never overlap.
#[derive(Debug)]
pub struct Tlb {
    capacity: usize,
    slots: Vec<TlbSlot>,
    /// Index of the slot that served the last hit, tried first (a hint: whatever slot sits there
    /// now is checked like any other, so it needs no upkeep when slots move).
    mru: usize,
    clock: u64,
    stats: TlbStats,
}

impl Tlb {
    /// A TLB of `capacity` entries.
    pub fn new(capacity: usize) -> Result<Self, MmuError> {
        if capacity == 0 {
            return Err(MmuError::EmptyTlb);
        }
        Ok(Tlb {
            capacity,
            slots: Vec::with_capacity(capacity),
            mru: 0,
            clock: 0,
            stats: TlbStats::default(),
        })
    }

    /// Entries it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Entries it holds.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// Holds nothing?
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// Counters.
    pub fn stats(&self) -> TlbStats {
        self.stats
    }
    /// The cached translations, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &Translation> {
        self.slots.iter().map(|s| &s.tr)
    }

    /// The cached translation of `va` if it serves `access`: it allows the access and, for a
    /// write, is already dirty. Anything else is a miss, and the caller walks the table.
    pub fn lookup(&mut self, va: VirtAddr, access: Access) -> Option<Translation> {
        let need = access.required();
        let slot = match self.slots.get(self.mru) {
            Some(s) if s.tr.covers(va) => Some(self.mru),
            _ => self.slots.iter().position(|s| s.tr.covers(va)),
        };
        if let Some(i) = slot {
            self.mru = i;
        }
        let hit = slot.map(|i| &mut self.slots[i]).and_then(|s| {
            let serves = s.tr.perms.contains(need) && (s.tr.dirty || !access.writes());
            serves.then(|| {
                self.clock += 1;
                s.last_use = self.clock;
                s.tr
            })
        });
        if hit.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        hit
    }

    /// Caches `tr`, replacing entries it overlaps and evicting the least recently used one when
    /// full.
    pub fn fill(&mut self, tr: Translation) {
        self.slots
            .retain(|s| !(s.tr.leaf < tr.end() && tr.leaf < s.tr.end()));
        if self.slots.len() == self.capacity {
            if let Some(lru) = (0..self.slots.len()).min_by_key(|&i| self.slots[i].last_use) {
                self.slots.swap_remove(lru);
                self.stats.evictions += 1;
            }
        }
        self.clock += 1;
        self.slots.push(TlbSlot {
            tr,
            last_use: self.clock,
        });
        self.stats.fills += 1;
    }

    /// Drops every entry overlapping `range`; returns how many.
    pub fn invalidate(&mut self, range: &PageRange) -> usize {
        let before = self.slots.len();
        self.slots.retain(|s| !s.tr.overlaps(range));
        let dropped = before - self.slots.len();
        self.stats.invalidated += dropped as u64;
        dropped
    }

    /// Drops every entry; returns how many.
    pub fn invalidate_all(&mut self) -> usize {
        let dropped = self.slots.len();
        self.slots.clear();
        self.stats.invalidated += dropped as u64;
        dropped
    }

    /// Applies a whole batch in one pass over the entries; returns how many it dropped.
    pub fn apply(&mut self, batch: &InvalidationBatch) -> usize {
        if batch.all {
            return self.invalidate_all();
        }
        let before = self.slots.len();
        self.slots
            .retain(|s| !batch.overlaps(s.tr.leaf, s.tr.end()));
        let dropped = before - self.slots.len();
        self.stats.invalidated += dropped as u64;
        dropped
    }

    /// Verifies: within capacity, no two entries overlap, entries are aligned and allow something,
    /// use stamps are distinct and not in the future.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.slots.len() > self.capacity {
            return Err(format!(
                "{} entries in a TLB of {}",
                self.slots.len(),
                self.capacity
            ));
        }
        let mut sorted: Vec<&TlbSlot> = self.slots.iter().collect();
        sorted.sort_by_key(|s| s.tr.leaf);
        for w in sorted.windows(2) {
            if w[1].tr.leaf < w[0].tr.end() {
                return Err(format!("entries {:?} and {:?} overlap", w[0].tr, w[1].tr));
            }
        }
        let mut stamps: Vec<u64> = self.slots.iter().map(|s| s.last_use).collect();
        stamps.sort_unstable();
        stamps.dedup();
        if stamps.len() != self.slots.len() || stamps.last().is_some_and(|&s| s > self.clock) {
            return Err("use stamps repeat or lie in the future".into());
        }
        for s in &self.slots {
            if !s.tr.leaf.0.is_multiple_of(s.tr.size.bytes()) || s.tr.perms.is_empty() {
                return Err(format!("malformed entry {:?}", s.tr));
            }
        }
        Ok(())
    }
}

/// A sequence number of dispatched invalidation batches. Fences complete in order: completing one
/// completes every earlier one. `TlbFence::default()` (0) is complete from the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TlbFence(u64);

impl TlbFence {
    /// Its sequence number.
    pub fn seq(self) -> u64 {
        self.0
    }
}

/// The ranges queued for the next dispatch, coalesced (sorted, disjoint, never adjacent), or
/// "everything", and the frames that ride on them.
#[derive(Debug, Default)]
pub struct InvalidationBatch {
    ranges: Vec<PageRange>,
    all: bool,
    frames: Vec<MappedFrame>,
}

impl InvalidationBatch {
    /// The queued ranges (empty when [`InvalidationBatch::is_all`]).
    pub fn ranges(&self) -> &[PageRange] {
        &self.ranges
    }
    /// Does it invalidate whole TLBs?
    pub fn is_all(&self) -> bool {
        self.all
    }
    /// The frames released once it completes.
    pub fn frames(&self) -> &[MappedFrame] {
        &self.frames
    }
    /// Nothing queued and nothing to release?
    pub fn is_empty(&self) -> bool {
        !self.all && self.ranges.is_empty() && self.frames.is_empty()
    }
    /// Will it invalidate `va`?
    pub fn covers(&self, va: VirtAddr) -> bool {
        self.overlaps(va, VirtAddr(va.0.saturating_add(1)))
    }

    /// Will it invalidate anything of `[start, end)`?
    fn overlaps(&self, start: VirtAddr, end: VirtAddr) -> bool {
        if self.all {
            return true;
        }
        let i = self.ranges.partition_point(|r| r.end() <= start);
        self.ranges.get(i).is_some_and(|r| r.start() < end)
    }

    /// Adds `range`, merging it with every queued range it overlaps or touches.
    fn queue(&mut self, range: PageRange) {
        if self.all {
            return;
        }
        let lo = self.ranges.partition_point(|r| r.end() < range.start());
        let hi = self.ranges.partition_point(|r| r.start() <= range.end());
        let (start, end) = if hi > lo {
            (
                self.ranges[lo].start().min(range.start()),
                self.ranges[hi - 1].end().max(range.end()),
            )
        } else {
            (range.start(), range.end())
        };
        match PageRange::from_bounds(start.0, end.0) {
            Ok(merged) if lo <= hi => {
                self.ranges.splice(lo..hi, [merged]);
            }
            // Cannot happen (both ends come from valid ranges); invalidating everything is the safe
            // way to be wrong.
            _ => self.all = true,
        }
        if self.ranges.len() > BATCH_RANGES_MAX {
            self.all = true;
        }
        if self.all {
            self.ranges.clear();
        }
    }
}

/// Counters of the invalidation protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvalidatorStats {
    /// Ranges queued (before coalescing).
    pub ranges_queued: u64,
    /// Batches dispatched.
    pub dispatches: u64,
    /// Batches dispatched as whole-TLB invalidations.
    pub full_flushes: u64,
    /// Frames (entries) deferred.
    pub frames_deferred: u64,
    /// Frames (entries) handed back by completed fences.
    pub frames_released: u64,
}

/// The batched TLB invalidation protocol: queue, dispatch once, complete the fence, release the
/// frames. Frames handed to [`TlbInvalidator::defer_release`] come back only from
/// [`TlbInvalidator::complete`] of a fence at or after the batch they rode on.
#[derive(Debug, Default)]
pub struct TlbInvalidator {
    open: InvalidationBatch,
    in_flight: VecDeque<(TlbFence, Vec<MappedFrame>)>,
    dispatched: TlbFence,
    completed: TlbFence,
    stats: InvalidatorStats,
}

impl TlbInvalidator {
    /// Nothing queued, nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `range` for the next dispatch.
    pub fn queue(&mut self, range: PageRange) {
        self.stats.ranges_queued += 1;
        self.open.queue(range);
    }

    /// Queues a whole-TLB invalidation.
    pub fn queue_all(&mut self) {
        self.stats.ranges_queued += 1;
        self.open.all = true;
        self.open.ranges.clear();
    }

    /// Attaches `frames` to the batch being built: they come back when its fence completes. The
    /// caller queues the ranges that mapped them first (or in the same batch).
    pub fn defer_release(&mut self, frames: DeferredFrames) {
        self.stats.frames_deferred += frames.0.len() as u64;
        self.open.frames.extend(frames.0);
    }

    /// What the next dispatch will send.
    pub fn pending(&self) -> &InvalidationBatch {
        &self.open
    }

    /// Sends the queued batch to every TLB, once, and returns its fence. With nothing queued it
    /// sends nothing and returns the last fence.
    pub fn dispatch(&mut self, tlbs: &mut [Tlb]) -> TlbFence {
        match self.dispatch_detached() {
            Some((fence, batch)) => {
                let dropped: usize = tlbs.iter_mut().map(|t| t.apply(&batch)).sum();
                tracing::trace!(fence = fence.0, dropped, "device tlb entries dropped");
                fence
            }
            None => self.dispatched,
        }
    }

    /// Dispatches the queued batch for a caller that reaches the TLBs itself (each behind its own
    /// lock, as in [`crate::shared_mmu::SharedMmu`]): returns the fence and the ranges to drop
    /// from every TLB, or `None` with nothing queued. The frames stay in flight until
    /// [`TlbInvalidator::complete`]; the caller completes the fence only after every TLB applied
    /// the batch ([`Tlb::apply`]).
    pub fn dispatch_detached(&mut self) -> Option<(TlbFence, InvalidationBatch)> {
        if self.open.is_empty() {
            return None;
        }
        let mut batch = std::mem::take(&mut self.open);
        self.dispatched = TlbFence(self.dispatched.0 + 1);
        self.stats.dispatches += 1;
        self.stats.full_flushes += u64::from(batch.all);
        tracing::debug!(
            fence = self.dispatched.0,
            ranges = batch.ranges.len(),
            all = batch.all,
            frames = batch.frames.len(),
            "device tlb invalidation dispatched"
        );
        let frames = std::mem::take(&mut batch.frames);
        if !frames.is_empty() {
            self.in_flight.push_back((self.dispatched, frames));
        }
        Some((self.dispatched, batch))
    }

    /// Marks `fence` (and every earlier one) complete: every compute unit acknowledged, no access
    /// through an old translation is in flight. Returns the frames now safe to reuse.
    pub fn complete(&mut self, fence: TlbFence) -> Result<Vec<MappedFrame>, MmuError> {
        if fence > self.dispatched {
            return Err(MmuError::FenceNotDispatched {
                fence,
                dispatched: self.dispatched,
            });
        }
        self.completed = self.completed.max(fence);
        let mut released = Vec::new();
        while let Some((f, _)) = self.in_flight.front() {
            if *f > self.completed {
                break;
            }
            if let Some((_, frames)) = self.in_flight.pop_front() {
                released.extend(frames);
            }
        }
        self.stats.frames_released += released.len() as u64;
        Ok(released)
    }

    /// Has `fence` completed? (What a waiter polls or sleeps on.)
    pub fn is_complete(&self, fence: TlbFence) -> bool {
        fence <= self.completed
    }
    /// The last fence dispatched.
    pub fn last_dispatched(&self) -> TlbFence {
        self.dispatched
    }
    /// The last fence completed.
    pub fn last_completed(&self) -> TlbFence {
        self.completed
    }
    /// Frames of dispatched batches whose fence has not completed.
    pub fn in_flight_frames(&self) -> impl Iterator<Item = &MappedFrame> {
        self.in_flight.iter().flat_map(|(_, f)| f.iter())
    }
    /// Counters.
    pub fn stats(&self) -> InvalidatorStats {
        self.stats
    }

    /// Verifies: queued ranges sorted, disjoint, not adjacent and within the limit; fences in
    /// flight increasing, after the last completed and not after the last dispatched; no frame
    /// pending release twice.
    pub fn check_invariants(&self) -> Result<(), String> {
        let r = &self.open.ranges;
        if self.open.all && !r.is_empty() {
            return Err("a full invalidation also lists ranges".into());
        }
        if r.len() > BATCH_RANGES_MAX {
            return Err(format!("{} ranges queued", r.len()));
        }
        if r.windows(2).any(|w| w[0].end() >= w[1].start()) {
            return Err(format!("queued ranges not coalesced: {r:?}"));
        }
        if self.completed > self.dispatched {
            return Err("a fence completed before it was dispatched".into());
        }
        let mut last = self.completed;
        for (f, frames) in &self.in_flight {
            if *f <= last || *f > self.dispatched || frames.is_empty() {
                return Err(format!("in-flight fence {f:?} out of order or empty"));
            }
            last = *f;
        }
        let mut seen = HashMap::new();
        for m in self.open.frames.iter().chain(self.in_flight_frames()) {
            for f in m.frames() {
                if seen.insert((m.dev, f), ()).is_some() {
                    return Err(format!("frame {f:?} of {:?} pending release twice", m.dev));
                }
            }
        }
        Ok(())
    }
}

/// What a device MMU is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuConfig {
    /// The device.
    pub dev: DeviceId,
    /// Its address width.
    pub va_bits: u32,
    /// Compute units, each with its own TLB.
    pub compute_units: usize,
    /// Entries of each TLB.
    pub tlb_entries: usize,
}

impl Default for MmuConfig {
    /// Device 0, the CPU's 48-bit width, one compute unit with a 64-entry TLB.
    fn default() -> Self {
        MmuConfig {
            dev: DeviceId(0),
            va_bits: 48,
            compute_units: 1,
            tlb_entries: 64,
        }
    }
}

/// The page table and the invalidation protocol, without the TLBs: every mapping change goes
/// through here and queues the invalidation of what it left stale, with the frames it took out of
/// the table riding on that batch. [`DeviceMmu`] adds the TLBs for a single-threaded device;
/// [`crate::shared_mmu::SharedMmu`] keeps this behind one lock and each TLB behind its own.
#[derive(Debug)]
pub struct MmuCore {
    table: DevicePageTable,
    invalidator: TlbInvalidator,
}

impl MmuCore {
    /// An empty table of `va_bits` for `dev`, nothing queued.
    pub fn new(dev: DeviceId, va_bits: u32) -> Result<Self, MmuError> {
        Ok(MmuCore {
            table: DevicePageTable::new(dev, va_bits)?,
            invalidator: TlbInvalidator::new(),
        })
    }

    /// The device.
    pub fn dev(&self) -> DeviceId {
        self.table.dev()
    }
    /// The page table.
    pub fn page_table(&self) -> &DevicePageTable {
        &self.table
    }
    /// The invalidation protocol's state.
    pub fn invalidator(&self) -> &TlbInvalidator {
        &self.invalidator
    }

    /// Queues the invalidation of `range` if the change left anything stale, with the frames it
    /// took out of the table.
    fn after_change(&mut self, range: PageRange, stale: u64, release: DeferredFrames) {
        debug_assert!(stale > 0 || release.is_empty());
        if stale > 0 {
            self.invalidator.queue(range);
        }
        if !release.is_empty() {
            self.invalidator.defer_release(release);
        }
    }

    /// [`DevicePageTable::map`], queueing the invalidation of what it replaced or narrowed.
    pub fn map(
        &mut self,
        range: PageRange,
        base: PteTarget,
        perms: PtePerms,
    ) -> Result<MapReport, MmuError> {
        let mut release = DeferredFrames::new();
        let report = self.table.map(range, base, perms, &mut release)?;
        self.after_change(range, report.stale, release);
        Ok(report)
    }

    /// [`DevicePageTable::map_pages`], queueing the invalidation of what it replaced or narrowed.
    pub fn map_pages(
        &mut self,
        range: PageRange,
        targets: &[PteTarget],
        perms: PtePerms,
    ) -> Result<MapReport, MmuError> {
        let mut release = DeferredFrames::new();
        let report = self.table.map_pages(range, targets, perms, &mut release)?;
        self.after_change(range, report.stale, release);
        Ok(report)
    }

    /// [`DevicePageTable::map_huge`], queueing the invalidation of what it replaced or narrowed.
    pub fn map_huge(
        &mut self,
        range: PageRange,
        base: PteTarget,
        perms: PtePerms,
    ) -> Result<MapReport, MmuError> {
        let mut release = DeferredFrames::new();
        let report = self.table.map_huge(range, base, perms, &mut release)?;
        self.after_change(range, report.stale, release);
        Ok(report)
    }

    /// [`DevicePageTable::unmap`], queueing the invalidation of `range` with the frames it
    /// unmapped; they come back when the fence of the batch they ride on completes.
    pub fn unmap(&mut self, range: PageRange) -> Result<UnmapReport, MmuError> {
        let mut release = DeferredFrames::new();
        let report = self.table.unmap(range, &mut release)?;
        self.after_change(range, report.pages, release);
        Ok(report)
    }

    /// Unmaps the pages of `range` whose target `pred` accepts, leaving the others mapped (a driver's own migration into its memory drops its
    /// remote mappings of the pages that move and keeps its local ones). Returns the pages
    /// unmapped; their invalidation is queued like [`MmuCore::unmap`]'s.
    pub fn unmap_where(
        &mut self,
        range: PageRange,
        pred: impl Fn(PteTarget) -> bool,
    ) -> Result<u64, MmuError> {
        let mut unmapped = 0;
        let mut k = 0;
        let n = range.npages();
        while k < n {
            let hit = |k: u64| {
                let va = range.page(k);
                self.table
                    .lookup(va)
                    .and_then(|tr| tr.target(va))
                    .is_some_and(&pred)
            };
            if !hit(k) {
                k += 1;
                continue;
            }
            let mut end = k + 1;
            while end < n && hit(end) {
                end += 1;
            }
            let run = PageRange::from_pages(range.page(k).0, end - k)?;
            unmapped += self.unmap(run)?.pages;
            k = end;
        }
        Ok(unmapped)
    }

    /// [`DevicePageTable::protect`], queueing the invalidation of `range` if a permission was lost.
    pub fn protect(
        &mut self,
        range: PageRange,
        perms: PtePerms,
    ) -> Result<ProtectReport, MmuError> {
        let report = self.table.protect(range, perms)?;
        self.after_change(range, report.stale, DeferredFrames::new());
        Ok(report)
    }

    /// [`DevicePageTable::clear_accessed`], queueing the invalidation of the young ranges so that
    /// the next access walks the table and sets the bit again (the "flush" of
    /// `clear_flush_young`).
    pub fn clear_accessed(&mut self, range: PageRange) -> Result<Vec<PageRange>, MmuError> {
        let young = self.table.clear_accessed(range)?;
        for r in &young {
            self.invalidator.queue(*r);
        }
        Ok(young)
    }

    /// A table walk for a TLB miss ([`DevicePageTable::translate`]: sets the accessed bit, and the
    /// dirty bit for writes).
    pub fn walk(&mut self, va: VirtAddr, access: Access) -> Result<Translation, MmuFault> {
        self.table.translate(va, access)
    }

    /// [`TlbInvalidator::dispatch_detached`].
    pub fn dispatch_detached(&mut self) -> Option<(TlbFence, InvalidationBatch)> {
        self.invalidator.dispatch_detached()
    }

    /// Completes `fence`: returns the frames now safe to give back to their pools.
    pub fn complete(&mut self, fence: TlbFence) -> Result<Vec<MappedFrame>, MmuError> {
        self.invalidator.complete(fence)
    }

    /// Verifies the table, the protocol and `tlbs` (one per compute unit), then what ties them
    /// together: outside the ranges queued and not yet
    /// dispatched, every TLB entry translates each of its pages to what the table maps there, with
    /// no permission the table lacks; no frame pending release is mapped; no frame of a dispatched
    /// batch is in a TLB.
    pub fn check_with_tlbs(&self, tlbs: &[&Tlb]) -> Result<(), String> {
        self.table.check_invariants()?;
        for (cu, tlb) in tlbs.iter().enumerate() {
            tlb.check_invariants()
                .map_err(|e| format!("cu {cu}: {e}"))?;
        }
        self.invalidator.check_invariants()?;
        let queued = self.invalidator.pending();
        for (cu, tlb) in tlbs.iter().enumerate() {
            for tr in tlb.entries() {
                if let Some(now) = self.table.lookup(tr.leaf) {
                    if now.leaf == tr.leaf
                        && now.size == tr.size
                        && now.base == tr.base
                        && now.perms.contains(tr.perms)
                    {
                        continue;
                    }
                }
                for i in 0..tr.size.pages() {
                    let va = VirtAddr(tr.leaf.0 + (i << PAGE_SHIFT));
                    if queued.covers(va) {
                        continue;
                    }
                    let now = self.table.lookup(va);
                    let agrees = now.is_some_and(|now| {
                        now.target(va) == tr.target(va) && now.perms.contains(tr.perms)
                    });
                    if !agrees {
                        return Err(format!(
                            "cu {cu}: stale TLB entry {tr:?} at {va}, table has {now:?}, and no \
                             queued invalidation covers it"
                        ));
                    }
                }
            }
        }
        // Frame -> dispatched? for every frame pending release.
        let local = self.dev();
        let mut pending: HashMap<(DeviceId, DevPfn), bool> = HashMap::new();
        for m in queued.frames() {
            pending.extend(m.frames().map(|f| ((m.dev, f), false)));
        }
        for m in self.invalidator.in_flight_frames() {
            pending.extend(m.frames().map(|f| ((m.dev, f), true)));
        }
        if pending.is_empty() {
            return Ok(());
        }
        let mut err = None;
        self.table.for_each_leaf(|tr| {
            if let Some((dev, first)) = tr.base.owned_frame(local) {
                for i in 0..tr.size.pages() as u32 {
                    let f = DevPfn(first.0.wrapping_add(i));
                    if err.is_none() && pending.contains_key(&(dev, f)) {
                        err = Some(format!(
                            "frame {f:?} of {dev:?} is mapped and pending release"
                        ));
                    }
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        for (cu, tlb) in tlbs.iter().enumerate() {
            for tr in tlb.entries() {
                if let Some((dev, first)) = tr.base.owned_frame(local) {
                    for i in 0..tr.size.pages() as u32 {
                        let f = DevPfn(first.0.wrapping_add(i));
                        if pending.get(&(dev, f)) == Some(&true) {
                            return Err(format!(
                                "cu {cu}: TLB still reaches frame {f:?} of {dev:?} after its \
                                 invalidation was dispatched"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A device's MMU for a single-threaded device: its page table and invalidation protocol
/// ([`MmuCore`], reached through `Deref`), and the TLB of each compute unit. Every change that can
/// leave a TLB stale queues the invalidation of its range, with the frames it took out of the
/// table riding on that batch, so a frame can come back (from [`MmuCore::complete`]) only after
/// every TLB dropped it.
#[derive(Debug)]
pub struct DeviceMmu {
    core: MmuCore,
    tlbs: Vec<Tlb>,
}

impl std::ops::Deref for DeviceMmu {
    type Target = MmuCore;
    fn deref(&self) -> &MmuCore {
        &self.core
    }
}

impl std::ops::DerefMut for DeviceMmu {
    fn deref_mut(&mut self) -> &mut MmuCore {
        &mut self.core
    }
}

impl DeviceMmu {
    /// An MMU with an empty table and empty TLBs.
    pub fn new(config: MmuConfig) -> Result<Self, MmuError> {
        if config.compute_units == 0 {
            return Err(MmuError::NoComputeUnits);
        }
        let core = MmuCore::new(config.dev, config.va_bits)?;
        let tlbs = (0..config.compute_units)
            .map(|_| Tlb::new(config.tlb_entries))
            .collect::<Result<_, _>>()?;
        Ok(DeviceMmu { core, tlbs })
    }

    /// The TLBs, one per compute unit.
    pub fn tlbs(&self) -> &[Tlb] {
        &self.tlbs
    }

    /// Compute unit `cu`'s view of the MMU, through which it translates.
    pub fn unit(&mut self, cu: usize) -> Result<CuMmu<'_>, MmuError> {
        if cu >= self.tlbs.len() {
            return Err(MmuError::NoSuchUnit {
                cu,
                units: self.tlbs.len(),
            });
        }
        Ok(CuMmu { mmu: self, cu })
    }

    /// Sends the queued invalidations to every compute unit's TLB, once.
    pub fn dispatch(&mut self) -> TlbFence {
        self.core.invalidator.dispatch(&mut self.tlbs)
    }

    /// Verifies each part and what ties them together ([`MmuCore::check_with_tlbs`]).
    pub fn check_invariants(&self) -> Result<(), String> {
        let tlbs: Vec<&Tlb> = self.tlbs.iter().collect();
        self.core.check_with_tlbs(&tlbs)
    }
}

/// One compute unit's view of a [`DeviceMmu`]: its TLB in front of the shared page table.
#[derive(Debug)]
pub struct CuMmu<'a> {
    mmu: &'a mut DeviceMmu,
    cu: usize,
}

impl CuMmu<'_> {
    /// Translates an access: from the TLB on a hit, else by walking the table (which sets the
    /// accessed and dirty bits) and filling the TLB. A fault leaves the TLB as it was.
    pub fn translate(&mut self, va: VirtAddr, access: Access) -> Result<Translation, MmuFault> {
        if let Some(tr) = self.mmu.tlbs[self.cu].lookup(va, access) {
            return Ok(tr);
        }
        let tr = self.mmu.core.walk(va, access)?;
        self.mmu.tlbs[self.cu].fill(tr);
        Ok(tr)
    }

    /// This unit's TLB.
    pub fn tlb(&self) -> &Tlb {
        &self.mmu.tlbs[self.cu]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use proptest::prelude::*;

    use super::*;
    use crate::addr::Owner;
    use crate::pool::{DevicePool, MemoryKind};

    const DEV: DeviceId = DeviceId(0);
    const PEER: DeviceId = DeviceId(1);
    const RW: PtePerms = PtePerms::READ.union(PtePerms::WRITE);
    const RWA: PtePerms = RW.union(PtePerms::ATOMIC);
    /// A 2 MiB-aligned address away from zero, in the middle of a level-1 table.
    const BASE: u64 = 0x7f00_0000_0000 + 64 * HUGE_PAGE_SIZE;

    #[track_caller]
    fn pages(start: u64, n: u64) -> PageRange {
        PageRange::from_pages(start, n).unwrap()
    }

    #[track_caller]
    fn table(va_bits: u32) -> DevicePageTable {
        DevicePageTable::new(DEV, va_bits).unwrap()
    }

    #[track_caller]
    fn mmu(compute_units: usize, tlb_entries: usize) -> DeviceMmu {
        DeviceMmu::new(MmuConfig {
            dev: DEV,
            va_bits: 48,
            compute_units,
            tlb_entries,
        })
        .unwrap()
    }

    #[track_caller]
    fn ok(pt: &DevicePageTable) {
        pt.check_invariants().unwrap();
    }

    #[track_caller]
    fn ok_mmu(m: &DeviceMmu) {
        m.check_invariants().unwrap();
    }

    fn local(f: u32) -> PteTarget {
        PteTarget::Local(DevPfn(f))
    }

    fn va(page: u64) -> VirtAddr {
        VirtAddr(BASE + page * PAGE_SIZE)
    }

    #[test]
    fn table_depth_follows_address_width() {
        for (bits, levels, root) in [
            (32, 3, 4),
            (39, 3, 512),
            (40, 4, 2),
            (48, 4, 512),
            (57, 5, 512),
        ] {
            let pt = table(bits);
            assert_eq!(
                (pt.levels(), pt.root_entries()),
                (levels, root),
                "{bits} bits"
            );
            ok(&pt);
        }
        for bits in [31, 58, 64] {
            assert_eq!(
                DevicePageTable::new(DEV, bits).unwrap_err(),
                MmuError::InvalidAddressWidth { va_bits: bits }
            );
        }
    }

    #[test]
    fn map_then_translate_reaches_each_frame() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        let r = pt.map(pages(BASE, 3), local(10), RW, &mut rel).unwrap();
        assert_eq!((r.mapped, r.stale), (3, 0));
        assert!(rel.is_empty());
        for i in 0..3 {
            let tr = pt.translate(VirtAddr(va(i).0 + 123), Access::Read).unwrap();
            assert_eq!(tr.size, PageSize::Base);
            assert_eq!(tr.leaf, va(i));
            assert_eq!(
                tr.target(VirtAddr(va(i).0 + 123)),
                Some(local(10 + i as u32))
            );
        }
        assert_eq!(pt.mapped_pages(), 3);
        // Root, two directories, one table of 4 KiB leaves.
        assert_eq!(pt.stats().tables, 4);
        ok(&pt);
    }

    #[test]
    fn system_and_peer_targets_translate_as_mapped() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        pt.map(pages(BASE, 2), PteTarget::System, PtePerms::READ, &mut rel)
            .unwrap();
        let peer = PteTarget::Peer {
            dev: PEER,
            frame: DevPfn(7),
        };
        pt.map(pages(BASE + 2 * PAGE_SIZE, 2), peer, RW, &mut rel)
            .unwrap();
        let tr = pt.translate(va(1), Access::Read).unwrap();
        assert_eq!(tr.target(va(1)), Some(PteTarget::System));
        let tr = pt.translate(va(3), Access::Write).unwrap();
        assert_eq!(
            tr.target(va(3)),
            Some(PteTarget::Peer {
                dev: PEER,
                frame: DevPfn(8)
            })
        );
        let report = pt.unmap(pages(BASE, 4), &mut rel).unwrap();
        assert_eq!((report.system_pages, report.device_pages), (2, 2));
        assert_eq!(
            rel.as_slice(),
            &[
                MappedFrame {
                    dev: PEER,
                    frame: DevPfn(7),
                    size: PageSize::Base
                },
                MappedFrame {
                    dev: PEER,
                    frame: DevPfn(8),
                    size: PageSize::Base
                },
            ]
        );
        ok(&pt);
    }

    #[test]
    fn translate_beyond_address_width_is_fatal() {
        let mut pt = table(39);
        let fault = pt.translate(VirtAddr(1 << 39), Access::Read).unwrap_err();
        assert_eq!(
            fault,
            MmuFault::AddressWidth {
                va: VirtAddr(1 << 39),
                va_bits: 39
            }
        );
        assert!(fault.is_fatal());
        assert_eq!(pt.lookup(VirtAddr(u64::MAX)), None);
        let mut rel = DeferredFrames::new();
        let across = pages((1 << 39) - PAGE_SIZE, 2);
        assert!(matches!(
            pt.map(across, local(0), RW, &mut rel),
            Err(MmuError::BeyondAddressWidth { va_bits: 39, .. })
        ));
        assert!(matches!(
            pt.unmap(across, &mut rel),
            Err(MmuError::BeyondAddressWidth { .. })
        ));
        assert!(matches!(
            pt.protect(across, RW),
            Err(MmuError::BeyondAddressWidth { .. })
        ));
        assert!(matches!(
            pt.clear_accessed(across),
            Err(MmuError::BeyondAddressWidth { .. })
        ));
        // The last page below the width is fine.
        pt.map(pages((1 << 39) - PAGE_SIZE, 1), local(0), RW, &mut rel)
            .unwrap();
        assert!(pt.translate(VirtAddr((1 << 39) - 1), Access::Write).is_ok());
        assert_eq!(pt.stats().faults_address_width, 1);
        ok(&pt);
    }

    #[test]
    fn unmapped_address_is_not_present() {
        let mut pt = table(48);
        let fault = pt.translate(va(0), Access::Read).unwrap_err();
        assert_eq!(fault, MmuFault::NotPresent { va: va(0) });
        assert!(!fault.is_fatal());
        assert_eq!(fault.va(), va(0));
        assert_eq!(pt.stats().faults_not_present, 1);
    }

    #[test]
    fn permission_faults_name_the_access() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        pt.map(pages(BASE, 1), local(0), PtePerms::READ, &mut rel)
            .unwrap();
        pt.map(pages(BASE + PAGE_SIZE, 1), local(1), RW, &mut rel)
            .unwrap();
        pt.map(pages(BASE + 2 * PAGE_SIZE, 1), local(2), RWA, &mut rel)
            .unwrap();
        assert!(pt.translate(va(0), Access::Read).is_ok());
        assert_eq!(
            pt.translate(va(0), Access::Write),
            Err(MmuFault::Permission {
                va: va(0),
                access: Access::Write,
                perms: PtePerms::READ
            })
        );
        assert!(matches!(
            pt.translate(va(1), Access::Atomic),
            Err(MmuFault::Permission {
                access: Access::Atomic,
                ..
            })
        ));
        assert!(pt.translate(va(2), Access::Atomic).is_ok());
        // A failed access marks nothing.
        let tr = pt.lookup(va(1)).unwrap();
        assert!(!tr.accessed && !tr.dirty);
        assert_eq!(pt.stats().faults_permission, 2);
    }

    #[test]
    fn translate_sets_accessed_and_write_sets_dirty() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        pt.map(pages(BASE, 1), local(0), RWA, &mut rel).unwrap();
        let tr = pt.lookup(va(0)).unwrap();
        assert!(!tr.accessed && !tr.dirty);
        assert!(
            !pt.lookup(va(0)).unwrap().accessed,
            "lookup has no side effect"
        );
        pt.translate(va(0), Access::Read).unwrap();
        let tr = pt.lookup(va(0)).unwrap();
        assert!(tr.accessed && !tr.dirty);
        pt.translate(va(0), Access::Atomic).unwrap();
        assert!(pt.lookup(va(0)).unwrap().dirty);
        // Remapping the same frame keeps the history; another frame starts clean.
        pt.map(pages(BASE, 1), local(0), PtePerms::READ, &mut rel)
            .unwrap();
        let tr = pt.lookup(va(0)).unwrap();
        assert!(tr.accessed && tr.dirty && tr.perms == PtePerms::READ);
        let r = pt.unmap(pages(BASE, 1), &mut rel).unwrap();
        assert_eq!(r.dirty_pages, 1);
    }

    #[test]
    fn map_huge_installs_one_leaf_at_the_pmd_level() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        let r = pt
            .map_huge(pages(BASE, 1024), local(512), RW, &mut rel)
            .unwrap();
        assert_eq!((r.mapped, r.stale), (1024, 0));
        assert_eq!((pt.huge_leaves(), pt.mapped_pages()), (2, 1024));
        // Root and two directories: no table of 4 KiB leaves.
        assert_eq!(pt.stats().tables, 3);
        let probe = VirtAddr(BASE + HUGE_PAGE_SIZE + 5 * PAGE_SIZE + 17);
        let tr = pt.translate(probe, Access::Write).unwrap();
        assert_eq!(tr.size, PageSize::Huge);
        assert_eq!(tr.leaf, VirtAddr(BASE + HUGE_PAGE_SIZE));
        assert_eq!(tr.target(probe), Some(local(1024 + 5)));
        assert_eq!(tr.target(VirtAddr(BASE)), None);
        ok(&pt);
    }

    #[test]
    fn mapping_a_page_inside_a_huge_leaf_splits_it() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        pt.map_huge(pages(BASE, 512), local(512), RW, &mut rel)
            .unwrap();
        pt.translate(va(0), Access::Write).unwrap();
        let r = pt
            .map(pages(BASE + 5 * PAGE_SIZE, 1), local(9), RW, &mut rel)
            .unwrap();
        assert_eq!((r.mapped, r.stale, r.displaced.pages), (0, 1, 1));
        assert_eq!(
            rel.as_slice(),
            &[MappedFrame {
                dev: DEV,
                frame: DevPfn(517),
                size: PageSize::Base
            }]
        );
        assert_eq!((pt.huge_leaves(), pt.mapped_pages()), (0, 512));
        assert_eq!(pt.stats().splits, 1);
        assert_eq!(pt.lookup(va(5)).unwrap().base, local(9));
        // The other 511 pages keep their frames and the leaf's history.
        for i in [0, 4, 6, 511] {
            let tr = pt.lookup(va(i)).unwrap();
            assert_eq!((tr.size, tr.base), (PageSize::Base, local(512 + i as u32)));
            assert!(tr.accessed && tr.dirty);
        }
        ok(&pt);
    }

    #[test]
    fn unmapping_part_of_a_huge_leaf_splits_it_and_reports_single_frames() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        pt.map_huge(pages(BASE, 512), local(0), RW, &mut rel)
            .unwrap();
        let r = pt.unmap(pages(BASE + 3 * PAGE_SIZE, 2), &mut rel).unwrap();
        assert_eq!((r.pages, r.huge_leaves, r.device_pages), (2, 0, 2));
        let frames: Vec<_> = rel.as_slice().iter().map(|m| (m.frame, m.size)).collect();
        assert_eq!(
            frames,
            [(DevPfn(3), PageSize::Base), (DevPfn(4), PageSize::Base)]
        );
        assert_eq!(pt.mapped_pages(), 510);
        assert_eq!(pt.lookup(va(3)), None);
        assert_eq!(pt.lookup(va(5)).unwrap().base, local(5));
        ok(&pt);
    }

    #[test]
    fn unmapping_a_whole_huge_leaf_reports_one_huge_frame_and_frees_the_tables() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        pt.map_huge(pages(BASE, 512), local(1536), RW, &mut rel)
            .unwrap();
        let r = pt.unmap(pages(BASE, 512), &mut rel).unwrap();
        assert_eq!((r.pages, r.huge_leaves), (512, 1));
        assert_eq!(
            rel.as_slice(),
            &[MappedFrame {
                dev: DEV,
                frame: DevPfn(1536),
                size: PageSize::Huge
            }]
        );
        assert_eq!(rel.as_slice()[0].frames().count(), 512);
        assert_eq!(
            (pt.stats().tables, pt.mapped_pages(), pt.huge_leaves()),
            (1, 0, 0)
        );
        ok(&pt);
    }

    #[test]
    fn map_huge_over_matching_pages_collapses_without_releasing_them() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        // 510 of the block's pages on the right frames, one on a wrong frame, one unmapped.
        pt.map(pages(BASE, 510), local(1024), RW, &mut rel).unwrap();
        pt.map(pages(BASE + 510 * PAGE_SIZE, 1), local(7), RW, &mut rel)
            .unwrap();
        pt.translate(va(100), Access::Write).unwrap();
        let r = pt
            .map_huge(pages(BASE, 512), local(1024), PtePerms::READ, &mut rel)
            .unwrap();
        // Every page narrowed from RW to R: all the mapped ones are stale.
        assert_eq!((r.mapped, r.stale, r.displaced.pages), (1, 511, 1));
        assert_eq!(
            rel.as_slice(),
            &[MappedFrame {
                dev: DEV,
                frame: DevPfn(7),
                size: PageSize::Base
            }]
        );
        let tr = pt.lookup(va(0)).unwrap();
        assert_eq!(
            (tr.size, tr.base, tr.perms),
            (PageSize::Huge, local(1024), PtePerms::READ)
        );
        assert!(
            tr.accessed && tr.dirty,
            "the collapsed leaf keeps the pages' history"
        );
        assert_eq!(pt.stats().collapses, 1);
        assert_eq!(pt.stats().tables, 3);
        ok(&pt);
    }

    #[test]
    fn protect_reports_stale_pages_only_when_permissions_shrink() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        pt.map(pages(BASE, 4), local(0), RWA, &mut rel).unwrap();
        let r = pt.protect(pages(BASE, 8), PtePerms::READ).unwrap();
        assert_eq!(
            r,
            ProtectReport {
                changed: 4,
                stale: 4
            }
        );
        let r = pt.protect(pages(BASE, 8), RW).unwrap();
        assert_eq!(
            r,
            ProtectReport {
                changed: 4,
                stale: 0
            }
        );
        assert_eq!(
            pt.protect(pages(BASE, 8), RW).unwrap(),
            ProtectReport::default()
        );
        assert_eq!(pt.lookup(va(4)), None, "protect maps nothing");
        // Part of a 2 MiB leaf: split; all of it: no split.
        let block = BASE + HUGE_PAGE_SIZE;
        pt.map_huge(pages(block, 512), local(512), RW, &mut rel)
            .unwrap();
        assert_eq!(pt.protect(pages(block, 512), RW).unwrap().changed, 0);
        assert_eq!(pt.protect(pages(block, 512), RWA).unwrap().changed, 512);
        assert_eq!(pt.stats().splits, 0);
        let r = pt
            .protect(pages(block + PAGE_SIZE, 1), PtePerms::READ)
            .unwrap();
        assert_eq!(
            r,
            ProtectReport {
                changed: 1,
                stale: 1
            }
        );
        assert_eq!(pt.stats().splits, 1);
        assert_eq!(pt.lookup(VirtAddr(block)).unwrap().perms, RWA);
        ok(&pt);
    }

    #[test]
    fn empty_tables_are_freed() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        // Two far-apart regions: separate directories all the way up.
        pt.map(pages(BASE, 3), local(0), RW, &mut rel).unwrap();
        pt.map(pages(0x1000_0000, 600), local(100), RW, &mut rel)
            .unwrap();
        let busy = pt.stats().tables;
        assert!(busy >= 7, "{busy}");
        pt.unmap(pages(BASE, 1), &mut rel).unwrap();
        assert_eq!(pt.stats().tables, busy, "a table with entries left stays");
        pt.unmap(pages(BASE, 3), &mut rel).unwrap();
        pt.unmap(pages(0x1000_0000, 600), &mut rel).unwrap();
        assert_eq!(pt.stats().tables, 1);
        assert_eq!(pt.stats().tables_freed, pt.stats().tables_allocated - 1);
        ok(&pt);
        // Slots are reused.
        pt.map(pages(BASE, 1), local(0), RW, &mut rel).unwrap();
        ok(&pt);
    }

    #[test]
    fn operations_over_a_huge_sparse_range_cost_what_is_mapped() {
        // 2^36 blocks in the range: stepping through them one by one would not finish.
        let mut pt = table(57);
        let mut rel = DeferredFrames::new();
        pt.map(pages(BASE, 2), local(0), RW, &mut rel).unwrap();
        pt.map_huge(pages(1 << 50, 512), local(512), RW, &mut rel)
            .unwrap();
        pt.translate(va(0), Access::Read).unwrap();
        let everything = PageRange::new(0, 1 << 57).unwrap();
        assert_eq!(pt.clear_accessed(everything).unwrap(), [pages(BASE, 1)]);
        assert_eq!(
            pt.protect(everything, PtePerms::READ).unwrap(),
            ProtectReport {
                changed: 514,
                stale: 514
            }
        );
        let r = pt.unmap(everything, &mut rel).unwrap();
        assert_eq!((r.pages, r.huge_leaves, rel.len()), (514, 1, 3));
        assert_eq!(pt.stats().tables, 1);
        ok(&pt);
    }

    #[test]
    fn bad_input_is_a_typed_error_and_changes_nothing() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        let r = pages(BASE, 2);
        assert_eq!(
            pt.map(r, local(0), PtePerms::empty(), &mut rel),
            Err(MmuError::NoPermissions)
        );
        assert_eq!(
            pt.protect(r, PtePerms::empty()),
            Err(MmuError::NoPermissions)
        );
        assert_eq!(
            pt.map(r, local(u32::MAX), RW, &mut rel),
            Err(MmuError::FrameOverflow {
                first: DevPfn(u32::MAX),
                pages: 2
            })
        );
        assert_eq!(
            pt.map(
                r,
                PteTarget::Peer {
                    dev: DEV,
                    frame: DevPfn(0)
                },
                RW,
                &mut rel
            ),
            Err(MmuError::PeerIsSelf { dev: DEV })
        );
        assert_eq!(
            pt.map_pages(r, &[local(0)], RW, &mut rel),
            Err(MmuError::TargetCount { pages: 2, given: 1 })
        );
        assert_eq!(
            pt.map_huge(pages(BASE + PAGE_SIZE, 512), local(0), RW, &mut rel),
            Err(MmuError::UnalignedHuge {
                addr: BASE + PAGE_SIZE
            })
        );
        assert_eq!(
            pt.map_huge(pages(BASE, 256), local(0), RW, &mut rel),
            Err(MmuError::UnalignedHuge {
                addr: 256 * PAGE_SIZE
            })
        );
        assert_eq!(
            pt.map_huge(pages(BASE, 512), local(1), RW, &mut rel),
            Err(MmuError::UnalignedHugeFrame { frame: DevPfn(1) })
        );
        assert_eq!(
            pt.map_huge(pages(BASE, 1024), local(u32::MAX - 511), RW, &mut rel),
            Err(MmuError::FrameOverflow {
                first: DevPfn(u32::MAX - 511),
                pages: 1024
            })
        );
        // The last aligned block of frames is fine.
        let mut other = table(48);
        other
            .map_huge(pages(BASE, 512), local(u32::MAX - 511), RW, &mut rel)
            .unwrap();
        assert_eq!(
            other
                .lookup(VirtAddr(BASE + HUGE_PAGE_SIZE - 1))
                .unwrap()
                .target(VirtAddr(BASE + HUGE_PAGE_SIZE - 1)),
            Some(local(u32::MAX))
        );
        // Range construction errors convert.
        let e: MmuError = PageRange::new(1, PAGE_SIZE).unwrap_err().into();
        assert_eq!(e, MmuError::Addr(AddrError::Unaligned { addr: 1 }));
        assert!(rel.is_empty());
        assert_eq!((pt.mapped_pages(), pt.stats().tables), (0, 1));
        ok(&pt);
        assert_eq!(Tlb::new(0).unwrap_err(), MmuError::EmptyTlb);
        assert_eq!(
            DeviceMmu::new(MmuConfig {
                compute_units: 0,
                ..MmuConfig::default()
            })
            .unwrap_err(),
            MmuError::NoComputeUnits
        );
    }

    #[test]
    fn clear_accessed_reports_young_leaves_once() {
        let mut pt = table(48);
        let mut rel = DeferredFrames::new();
        pt.map(pages(BASE, 4), local(0), RW, &mut rel).unwrap();
        let block = BASE + HUGE_PAGE_SIZE;
        pt.map_huge(pages(block, 512), local(512), RW, &mut rel)
            .unwrap();
        for i in [0, 1, 3] {
            pt.translate(va(i), Access::Read).unwrap();
        }
        pt.translate(VirtAddr(block + 77 * PAGE_SIZE), Access::Read)
            .unwrap();
        // Part of the block is asked for; the whole leaf is reported.
        let young = pt.clear_accessed(pages(BASE, 513)).unwrap();
        assert_eq!(
            young,
            [
                pages(BASE, 2),
                pages(BASE + 3 * PAGE_SIZE, 1),
                pages(block, 512)
            ]
        );
        assert!(pt.clear_accessed(pages(BASE, 1024)).unwrap().is_empty());
        assert!(!pt.lookup(va(0)).unwrap().accessed);
        assert_eq!(pt.stats().accessed_cleared, 4);
        ok(&pt);
    }

    #[test]
    fn tlb_hits_after_fill() {
        let mut m = mmu(1, 8);
        m.map(pages(BASE, 1), local(3), RW).unwrap();
        let mut cu = m.unit(0).unwrap();
        let a = cu.translate(va(0), Access::Read).unwrap();
        let b = cu.translate(VirtAddr(va(0).0 + 8), Access::Read).unwrap();
        assert_eq!(a, b);
        let s = cu.tlb().stats();
        assert_eq!((s.misses, s.hits, s.fills), (1, 1, 1));
        assert_eq!(m.page_table().stats().walks, 1);
        ok_mmu(&m);
    }

    #[test]
    fn tlb_evicts_the_least_recently_used_entry() {
        let mut tlb = Tlb::new(2).unwrap();
        let tr = |page: u64| Translation {
            leaf: va(page),
            size: PageSize::Base,
            base: local(page as u32),
            perms: RW,
            accessed: true,
            dirty: false,
        };
        tlb.fill(tr(0));
        tlb.fill(tr(1));
        assert!(tlb.lookup(va(0), Access::Read).is_some());
        tlb.fill(tr(2));
        assert_eq!(tlb.stats().evictions, 1);
        assert!(
            tlb.lookup(va(1), Access::Read).is_none(),
            "1 was least recently used"
        );
        assert!(tlb.lookup(va(0), Access::Read).is_some());
        assert!(tlb.lookup(va(2), Access::Read).is_some());
        assert_eq!(tlb.len(), tlb.capacity());
        tlb.check_invariants().unwrap();
        // A 2 MiB entry replaces the 4 KiB ones it covers.
        tlb.fill(Translation {
            leaf: VirtAddr(BASE),
            size: PageSize::Huge,
            ..tr(0)
        });
        assert_eq!(tlb.len(), 1);
        tlb.check_invariants().unwrap();
    }

    #[test]
    fn one_huge_tlb_entry_serves_its_whole_block() {
        let mut m = mmu(1, 4);
        m.map_huge(pages(BASE, 512), local(0), RW).unwrap();
        let mut cu = m.unit(0).unwrap();
        for off in [0, 4096 * 100, HUGE_PAGE_SIZE - 1] {
            let tr = cu.translate(VirtAddr(BASE + off), Access::Read).unwrap();
            assert_eq!(tr.size, PageSize::Huge);
        }
        let s = cu.tlb().stats();
        assert_eq!((s.misses, s.hits), (1, 2));
        assert_eq!(cu.tlb().len(), 1);
        ok_mmu(&m);
    }

    #[test]
    fn a_write_through_a_clean_tlb_entry_walks_to_set_dirty() {
        let mut m = mmu(1, 4);
        m.map(pages(BASE, 1), local(0), RW).unwrap();
        let mut cu = m.unit(0).unwrap();
        assert!(!cu.translate(va(0), Access::Read).unwrap().dirty);
        assert!(cu.translate(va(0), Access::Write).unwrap().dirty);
        assert!(cu.translate(va(0), Access::Write).unwrap().dirty);
        let s = cu.tlb().stats();
        assert_eq!((s.misses, s.hits), (2, 1));
        assert!(m.page_table().lookup(va(0)).unwrap().dirty);
        ok_mmu(&m);
    }

    #[test]
    fn more_permissions_need_no_flush_and_a_permission_miss_refills() {
        let mut m = mmu(1, 4);
        m.map(pages(BASE, 1), local(0), PtePerms::READ).unwrap();
        m.unit(0).unwrap().translate(va(0), Access::Read).unwrap();
        let r = m.map(pages(BASE, 1), local(0), RW).unwrap();
        assert_eq!((r.mapped, r.stale), (0, 0));
        assert!(m.invalidator().pending().is_empty());
        ok_mmu(&m);
        let tr = m.unit(0).unwrap().translate(va(0), Access::Write).unwrap();
        assert_eq!(tr.perms, RW);
        ok_mmu(&m);
    }

    #[test]
    fn queued_ranges_coalesce() {
        let mut inv = TlbInvalidator::new();
        inv.queue(pages(BASE + 4 * PAGE_SIZE, 2));
        inv.queue(pages(BASE, 1));
        inv.queue(pages(BASE + 10 * PAGE_SIZE, 1));
        assert_eq!(inv.pending().ranges().len(), 3);
        // Touches the first and overlaps the second: one range.
        inv.queue(pages(BASE + PAGE_SIZE, 4));
        assert_eq!(
            inv.pending().ranges(),
            &[pages(BASE, 6), pages(BASE + 10 * PAGE_SIZE, 1)]
        );
        inv.queue(pages(BASE, 20));
        assert_eq!(inv.pending().ranges(), &[pages(BASE, 20)]);
        assert!(inv.pending().covers(va(19)) && !inv.pending().covers(va(20)));
        assert_eq!(inv.stats().ranges_queued, 5);
        inv.check_invariants().unwrap();
    }

    #[test]
    fn too_many_ranges_fall_back_to_a_full_invalidation() {
        let mut m = mmu(2, 64);
        m.map(pages(BASE, 200), local(0), RW).unwrap();
        for cu in 0..2 {
            let mut u = m.unit(cu).unwrap();
            for i in 0..40 {
                u.translate(va(i * 2), Access::Read).unwrap();
            }
        }
        for i in 0..=BATCH_RANGES_MAX as u64 {
            m.protect(pages(va(i * 2).0, 1), PtePerms::READ).unwrap();
        }
        assert!(m.invalidator().pending().is_all());
        assert!(m.invalidator().pending().covers(VirtAddr(0)));
        ok_mmu(&m);
        m.dispatch();
        assert!(m.tlbs().iter().all(Tlb::is_empty));
        assert_eq!(m.invalidator().stats().full_flushes, 1);
        ok_mmu(&m);
    }

    #[test]
    fn a_fence_completes_only_after_dispatch_and_fences_complete_in_order() {
        let mut m = mmu(1, 8);
        assert!(m.invalidator().is_complete(TlbFence::default()));
        assert_eq!(
            m.dispatch(),
            TlbFence::default(),
            "nothing queued, nothing sent"
        );
        m.map(pages(BASE, 2), local(0), RW).unwrap();
        m.unmap(pages(BASE, 1)).unwrap();
        let f1 = m.dispatch();
        m.unmap(pages(BASE + PAGE_SIZE, 1)).unwrap();
        let f2 = m.dispatch();
        assert_eq!((f1.seq(), f2.seq()), (1, 2));
        assert_eq!(
            m.complete(TlbFence(3)),
            Err(MmuError::FenceNotDispatched {
                fence: TlbFence(3),
                dispatched: f2
            })
        );
        assert_eq!(m.invalidator().in_flight_frames().count(), 2);
        let both = m.complete(f2).unwrap();
        assert_eq!(both.len(), 2);
        assert!(m.invalidator().is_complete(f1));
        assert!(
            m.complete(f1).unwrap().is_empty(),
            "each frame comes back once"
        );
        assert_eq!(m.invalidator().last_completed(), f2);
        ok_mmu(&m);
    }

    #[test]
    fn stale_tlb_entry_is_removed_by_dispatch() {
        let mut m = mmu(2, 8);
        m.map(pages(BASE, 2), local(40), RW).unwrap();
        for cu in 0..2 {
            m.unit(cu).unwrap().translate(va(0), Access::Write).unwrap();
        }
        m.unmap(pages(BASE, 1)).unwrap();
        // Queued, not dispatched: the TLBs may still serve the old translation, and may: its frame
        // is held back until the flush.
        let stale = m.unit(1).unwrap().translate(va(0), Access::Read).unwrap();
        assert_eq!(stale.target(va(0)), Some(local(40)));
        ok_mmu(&m);
        m.dispatch();
        for cu in 0..2 {
            let fault = m
                .unit(cu)
                .unwrap()
                .translate(va(0), Access::Read)
                .unwrap_err();
            assert_eq!(fault, MmuFault::NotPresent { va: va(0) });
        }
        assert_eq!(
            m.tlbs().iter().map(|t| t.stats().invalidated).sum::<u64>(),
            2
        );
        ok_mmu(&m);
    }

    #[test]
    fn frames_go_back_to_the_pool_only_after_their_fence_completes() {
        let mut pool = DevicePool::new(DEV, Owner(1), MemoryKind::DevicePrivate, 2048);
        let mut m = mmu(2, 16);
        let small: Vec<_> = (0..3).map(|_| pool.alloc_page().unwrap()).collect();
        let targets: Vec<_> = small.iter().map(|&f| PteTarget::Local(f)).collect();
        m.map_pages(pages(BASE, 3), &targets, RW).unwrap();
        let huge = pool.alloc_huge().unwrap();
        m.map_huge(
            pages(BASE + HUGE_PAGE_SIZE, 512),
            PteTarget::Local(huge),
            RW,
        )
        .unwrap();
        m.unit(0).unwrap().translate(va(1), Access::Read).unwrap();
        m.unit(1)
            .unwrap()
            .translate(VirtAddr(BASE + HUGE_PAGE_SIZE), Access::Read)
            .unwrap();

        let r = m.unmap(pages(BASE, 1024)).unwrap();
        assert_eq!((r.pages, r.huge_leaves), (515, 1));
        // Nothing dispatched: completing what was dispatched gives nothing back.
        let last = m.invalidator().last_dispatched();
        assert!(m.complete(last).unwrap().is_empty());
        assert_eq!(m.invalidator().pending().frames().len(), 4);
        ok_mmu(&m);

        let fence = m.dispatch();
        assert!(!m.invalidator().is_complete(fence));
        assert_eq!(m.invalidator().in_flight_frames().count(), 4);
        ok_mmu(&m);
        for f in m.complete(fence).unwrap() {
            assert_eq!(f.dev, DEV);
            match f.size {
                PageSize::Base => pool.free_page(f.frame).unwrap(),
                PageSize::Huge => pool.free_huge(f.frame).unwrap(),
            }
        }
        assert_eq!(pool.stats().pages_in_use, 0);
        pool.check_invariants().unwrap();
        ok_mmu(&m);
    }

    #[test]
    fn a_released_frame_is_never_held_by_any_tlb() {
        let mut m = mmu(4, 8);
        m.map(pages(BASE, 64), local(0), RW).unwrap();
        m.map_huge(pages(BASE + HUGE_PAGE_SIZE, 512), local(512), RW)
            .unwrap();
        for cu in 0..4 {
            let mut u = m.unit(cu).unwrap();
            for i in 0..12 {
                u.translate(va(cu as u64 * 7 + i), Access::Read).unwrap();
            }
            u.translate(VirtAddr(BASE + HUGE_PAGE_SIZE), Access::Read)
                .unwrap();
        }
        m.unmap(pages(BASE + 8 * PAGE_SIZE, 16)).unwrap();
        m.unmap(pages(BASE + HUGE_PAGE_SIZE + 7 * PAGE_SIZE, 1))
            .unwrap();
        let fence = m.dispatch();
        let released = m.complete(fence).unwrap();
        assert_eq!(released.len(), 17);
        for f in &released {
            for tlb in m.tlbs() {
                for tr in tlb.entries() {
                    let first = tr.base.frame().unwrap().0;
                    let held = first..first + tr.size.pages() as u32;
                    assert!(
                        !held.contains(&f.frame.0),
                        "{f:?} still reachable through {tr:?}"
                    );
                }
            }
        }
        ok_mmu(&m);
    }

    #[test]
    fn check_invariants_catches_a_change_nobody_invalidated() {
        let mut m = mmu(1, 8);
        m.map(pages(BASE, 2), local(10), RW).unwrap();
        m.unit(0).unwrap().translate(va(0), Access::Read).unwrap();
        // Behind the invalidator's back: the TLB entry goes stale with nothing queued.
        let mut rel = DeferredFrames::new();
        m.table.unmap(pages(BASE, 1), &mut rel).unwrap();
        let e = m.check_invariants().unwrap_err();
        assert!(e.contains("stale TLB entry"), "{e}");
        // A frame pending release and mapped again is caught too.
        let mut m = mmu(1, 8);
        m.map(pages(BASE, 1), local(10), RW).unwrap();
        m.unmap(pages(BASE, 1)).unwrap();
        m.table
            .map(pages(BASE + PAGE_SIZE, 1), local(10), RW, &mut rel)
            .unwrap();
        let e = m.check_invariants().unwrap_err();
        assert!(e.contains("mapped and pending release"), "{e}");
    }

    #[test]
    fn clear_accessed_flushes_so_the_next_access_marks_it_again() {
        let mut m = mmu(1, 8);
        m.map(pages(BASE, 1), local(0), RW).unwrap();
        m.unit(0).unwrap().translate(va(0), Access::Read).unwrap();
        assert_eq!(m.clear_accessed(pages(BASE, 1)).unwrap(), [pages(BASE, 1)]);
        assert!(m.invalidator().pending().covers(va(0)));
        m.dispatch();
        m.unit(0).unwrap().translate(va(0), Access::Read).unwrap();
        assert!(m.page_table().lookup(va(0)).unwrap().accessed);
        ok_mmu(&m);
    }

    #[test]
    fn an_unknown_compute_unit_is_an_error() {
        let mut m = mmu(2, 8);
        assert_eq!(
            m.unit(2).unwrap_err(),
            MmuError::NoSuchUnit { cu: 2, units: 2 }
        );
    }

    #[test]
    fn every_counter_moves() {
        let mut m = mmu(1, 1);
        m.map(pages(BASE, 2), local(0), RW).unwrap();
        m.map_huge(pages(BASE + HUGE_PAGE_SIZE, 512), local(512), RW)
            .unwrap();
        {
            let mut u = m.unit(0).unwrap();
            u.translate(va(0), Access::Read).unwrap();
            u.translate(va(0), Access::Read).unwrap();
            u.translate(va(1), Access::Read).unwrap();
            assert!(u.translate(va(2), Access::Read).is_err());
            assert!(u.translate(va(0), Access::Atomic).is_err());
            assert!(u.translate(VirtAddr(1 << 48), Access::Read).is_err());
        }
        m.clear_accessed(pages(BASE, 2)).unwrap();
        m.map(pages(BASE + HUGE_PAGE_SIZE, 1), local(512), RW)
            .unwrap();
        m.map_huge(pages(BASE + HUGE_PAGE_SIZE, 512), local(512), RW)
            .unwrap();
        m.unmap(pages(BASE, 1)).unwrap();
        let f = m.dispatch();
        m.complete(f).unwrap();
        for _ in 0..=BATCH_RANGES_MAX {
            m.unit(0).unwrap().translate(va(1), Access::Read).unwrap();
            m.invalidator.queue_all();
            m.dispatch();
        }
        let p = m.page_table().stats();
        let t = m.tlbs()[0].stats();
        let i = m.invalidator().stats();
        let all = [
            p.mapped_pages,
            p.huge_leaves,
            p.tables,
            p.tables_allocated,
            p.tables_freed,
            p.splits,
            p.collapses,
            p.walks,
            p.faults_not_present,
            p.faults_permission,
            p.faults_address_width,
            p.accessed_cleared,
            t.hits,
            t.misses,
            t.fills,
            t.evictions,
            t.invalidated,
            i.ranges_queued,
            i.dispatches,
            i.full_flushes,
            i.frames_deferred,
            i.frames_released,
        ];
        assert!(all.iter().all(|&c| c > 0), "{p:?} {t:?} {i:?}");
        ok_mmu(&m);
    }

    // ---- model test ----------------------------------------------------------------------------

    /// Region 0 straddles a 1 GiB boundary (two level-1 tables); region 1 ends one 2 MiB block
    /// beyond the 39-bit width.
    const REGIONS: [(u64, u64); 2] = [
        ((1 << 30) - 2 * HUGE_PAGE_SIZE, 4 * PAGES_PER_HUGE),
        ((1 << 39) - 2 * HUGE_PAGE_SIZE, 3 * PAGES_PER_HUGE),
    ];
    const MODEL_VA_BITS: u32 = 39;

    #[derive(Clone, Debug)]
    enum Op {
        Map {
            region: usize,
            start: u64,
            len: u64,
            kind: u8,
            perms: u8,
        },
        MapHuge {
            region: usize,
            block: u64,
            kind: u8,
            perms: u8,
        },
        Unmap {
            region: usize,
            start: u64,
            len: u64,
        },
        Protect {
            region: usize,
            start: u64,
            len: u64,
            perms: u8,
        },
        Translate {
            cu: usize,
            region: usize,
            page: u64,
            access: u8,
        },
        ClearAccessed {
            region: usize,
            start: u64,
            len: u64,
        },
        Dispatch,
        Complete,
    }

    fn op() -> impl Strategy<Value = Op> {
        let region = 0..2usize;
        let start = 0..2048u64;
        let len = prop_oneof![1..8u64, 1..700u64];
        let perms = 1..8u8;
        prop_oneof![
            3 => (region.clone(), start.clone(), len.clone(), 0..3u8, perms.clone())
                .prop_map(|(region, start, len, kind, perms)| Op::Map { region, start, len, kind, perms }),
            2 => (region.clone(), 0..4u64, 0..3u8, perms.clone())
                .prop_map(|(region, block, kind, perms)| Op::MapHuge { region, block, kind, perms }),
            2 => (region.clone(), start.clone(), len.clone())
                .prop_map(|(region, start, len)| Op::Unmap { region, start, len }),
            2 => (region.clone(), start.clone(), len.clone(), perms)
                .prop_map(|(region, start, len, perms)| Op::Protect { region, start, len, perms }),
            6 => (0..3usize, region.clone(), start.clone(), 0..3u8)
                .prop_map(|(cu, region, page, access)| Op::Translate { cu, region, page, access }),
            1 => (region, start, len)
                .prop_map(|(region, start, len)| Op::ClearAccessed { region, start, len }),
            2 => Just(Op::Dispatch),
            2 => Just(Op::Complete),
        ]
    }

    /// The page range an op names, clipped to its region.
    fn model_range(region: usize, start: u64, len: u64) -> PageRange {
        let (base, npages) = REGIONS[region];
        let start = start % npages;
        let len = len.min(npages - start);
        pages(base + start * PAGE_SIZE, len)
    }

    struct Model {
        pages: BTreeMap<u64, (PteTarget, PtePerms)>,
        next_local: u32,
        next_peer: u32,
        /// Frames taken out of the model's mappings, not yet handed back.
        awaiting: HashSet<(DeviceId, DevPfn)>,
    }

    impl Model {
        fn fresh(&mut self, kind: u8, n: u64, align: u32) -> PteTarget {
            let next = if kind == 0 {
                &mut self.next_local
            } else {
                &mut self.next_peer
            };
            let first = next.div_ceil(align) * align;
            *next = first + n as u32;
            match kind {
                0 => PteTarget::Local(DevPfn(first)),
                _ => PteTarget::Peer {
                    dev: PEER,
                    frame: DevPfn(first),
                },
            }
        }

        fn set(&mut self, va: VirtAddr, entry: Option<(PteTarget, PtePerms)>) {
            let old = match entry {
                Some(e) => self.pages.insert(va.0, e),
                None => self.pages.remove(&va.0),
            };
            if let Some((old, _)) = old {
                if entry.map(|e| e.0) != Some(old) {
                    if let Some(f) = old.owned_frame(DEV) {
                        assert!(self.awaiting.insert(f), "{f:?} taken out twice");
                    }
                }
            }
        }
    }

    fn beyond(range: &PageRange) -> bool {
        range.end().0 > 1 << MODEL_VA_BITS
    }

    fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut m = DeviceMmu::new(MmuConfig {
            dev: DEV,
            va_bits: MODEL_VA_BITS,
            compute_units: 3,
            tlb_entries: 6,
        })
        .unwrap();
        let mut model = Model {
            pages: BTreeMap::new(),
            next_local: 0,
            next_peer: 0,
            awaiting: HashSet::new(),
        };
        let accesses = [Access::Read, Access::Write, Access::Atomic];
        for op in ops {
            match op {
                Op::Map {
                    region,
                    start,
                    len,
                    kind,
                    perms,
                } => {
                    let r = model_range(region, start, len);
                    let perms = PtePerms::from_bits_truncate(perms);
                    let base = if kind == 2 {
                        PteTarget::System
                    } else {
                        model.fresh(kind, r.npages(), 1)
                    };
                    let res = m.map(r, base, perms);
                    if beyond(&r) {
                        prop_assert!(
                            matches!(res, Err(MmuError::BeyondAddressWidth { .. })),
                            "{:?}",
                            res
                        );
                    } else {
                        res.unwrap();
                        for (k, p) in r.pages().enumerate() {
                            model.set(p, Some((base.offset(k as u64).unwrap(), perms)));
                        }
                    }
                }
                Op::MapHuge {
                    region,
                    block,
                    kind,
                    perms,
                } => {
                    let (rbase, npages) = REGIONS[region];
                    let block = block % (npages / PAGES_PER_HUGE);
                    let r = pages(rbase + block * HUGE_PAGE_SIZE, PAGES_PER_HUGE);
                    let perms = PtePerms::from_bits_truncate(perms);
                    let base = if kind == 2 {
                        PteTarget::System
                    } else {
                        model.fresh(kind, 512, 512)
                    };
                    let res = m.map_huge(r, base, perms);
                    if beyond(&r) {
                        prop_assert!(
                            matches!(res, Err(MmuError::BeyondAddressWidth { .. })),
                            "{:?}",
                            res
                        );
                    } else {
                        res.unwrap();
                        for (k, p) in r.pages().enumerate() {
                            model.set(p, Some((base.offset(k as u64).unwrap(), perms)));
                        }
                    }
                }
                Op::Unmap { region, start, len } => {
                    let r = model_range(region, start, len);
                    let res = m.unmap(r);
                    if beyond(&r) {
                        prop_assert!(res.is_err());
                    } else {
                        let report = res.unwrap();
                        let before = model.pages.len();
                        for p in r.pages() {
                            model.set(p, None);
                        }
                        prop_assert_eq!(report.pages, (before - model.pages.len()) as u64);
                    }
                }
                Op::Protect {
                    region,
                    start,
                    len,
                    perms,
                } => {
                    let r = model_range(region, start, len);
                    let perms = PtePerms::from_bits_truncate(perms);
                    let res = m.protect(r, perms);
                    if beyond(&r) {
                        prop_assert!(res.is_err());
                    } else {
                        res.unwrap();
                        for p in r.pages() {
                            if let Some(e) = model.pages.get_mut(&p.0) {
                                e.1 = perms;
                            }
                        }
                    }
                }
                Op::Translate {
                    cu,
                    region,
                    page,
                    access,
                } => {
                    let (base, npages) = REGIONS[region];
                    let va = VirtAddr(base + (page % npages) * PAGE_SIZE + 8);
                    let access = accesses[access as usize];
                    let pending = m.invalidator().pending().covers(va);
                    let got = m.unit(cu).unwrap().translate(va, access);
                    if va.0 >> MODEL_VA_BITS != 0 {
                        prop_assert!(
                            matches!(got, Err(MmuFault::AddressWidth { .. })),
                            "{:?}",
                            got
                        );
                    } else if !pending {
                        // No invalidation queued here: the TLB must answer as the table does.
                        let want = model.pages.get(&va.page_down().0);
                        match (want, got) {
                            (Some(&(t, p)), Ok(tr)) => {
                                prop_assert!(p.contains(access.required()));
                                prop_assert_eq!(tr.target(va), Some(t));
                                let now = m.page_table().lookup(va).unwrap();
                                prop_assert!(now.accessed && (now.dirty || !access.writes()));
                            }
                            (Some(&(_, p)), Err(MmuFault::Permission { .. })) => {
                                prop_assert!(!p.contains(access.required()));
                            }
                            (None, Err(MmuFault::NotPresent { .. })) => {}
                            (want, got) => prop_assert!(false, "model {want:?}, mmu {got:?}"),
                        }
                    }
                }
                Op::ClearAccessed { region, start, len } => {
                    let r = model_range(region, start, len);
                    let res = m.clear_accessed(r);
                    prop_assert_eq!(res.is_err(), beyond(&r));
                }
                Op::Dispatch => {
                    m.dispatch();
                }
                Op::Complete => {
                    let fence = m.invalidator().last_dispatched();
                    for f in m.complete(fence).unwrap() {
                        for frame in f.frames() {
                            prop_assert!(
                                model.awaiting.remove(&(f.dev, frame)),
                                "{frame:?} of {:?} released but not taken out (or twice)",
                                f.dev
                            );
                            for tlb in m.tlbs() {
                                prop_assert!(
                                    !tlb.entries().any(|tr| {
                                        tr.base.owned_frame(DEV).is_some_and(|(d, first)| {
                                            d == f.dev
                                                && (first.0..first.0 + tr.size.pages() as u32)
                                                    .contains(&frame.0)
                                        })
                                    }),
                                    "released {frame:?} is still in a TLB"
                                );
                            }
                        }
                    }
                }
            }
            prop_assert!(m.check_invariants().is_ok(), "{:?}", m.check_invariants());
            prop_assert_eq!(m.page_table().mapped_pages(), model.pages.len() as u64);
            for (&p, &(t, perms)) in &model.pages {
                let tr = m.page_table().lookup(VirtAddr(p));
                prop_assert_eq!(
                    tr.map(|tr| (tr.target(VirtAddr(p)), tr.perms)),
                    Some((Some(t), perms))
                );
            }
        }
        // Flush everything: every frame taken out comes back, exactly once.
        let fence = m.dispatch();
        for f in m.complete(fence).unwrap() {
            for frame in f.frames() {
                prop_assert!(model.awaiting.remove(&(f.dev, frame)), "{:?} twice", frame);
            }
        }
        prop_assert!(m.invalidator().in_flight_frames().next().is_none());
        prop_assert!(
            model.awaiting.is_empty(),
            "never released: {:?}",
            model.awaiting
        );
        prop_assert!(m.check_invariants().is_ok(), "{:?}", m.check_invariants());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn random_operations_match_a_btreemap_model(ops in proptest::collection::vec(op(), 1..80)) {
            run_model(ops)?;
        }
    }
}
