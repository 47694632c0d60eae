//! Migration vocabulary: `migrate_vma` (hmm.rst "Migration to and from device memory";
//! mm/migrate_device.c). The three phases run in `hetmem` (they move real memory); this module
//! holds what they speak: select flags, per-page source and destination entries, and the per-page
//! report of a partial migration.
//!
//! ```text
//!  setup     collect pages matching SELECT_*, lock them, invalidate other mirrors
//!            (Migrate event, owner = the migrating device), remove CPU access
//!  pages     the driver allocates destinations and copies; entries without one are skipped
//!  finalize  commit page by page: installed destinations, or the original restored
//! ```

use bitflags::bitflags;

use crate::{
    addr::{DevPfn, DeviceId, PAGE_SIZE},
    copy_engine::{CopyRequest, Endpoint},
};

bitflags! {
    /// `MIGRATE_VMA_SELECT_*`: which source pages a migration collects.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SelectFlags: u32 {
        /// System pages, the zero page and holes of anonymous private memory.
        const SYSTEM = 1 << 0;
        /// Device-private pages of the given owner.
        const DEVICE_PRIVATE = 1 << 1;
        /// Device-coherent pages of the given owner.
        const DEVICE_COHERENT = 1 << 2;
        /// Collect 2 MiB blocks whole (one COMPOUND entry) when aligned.
        const COMPOUND = 1 << 3;
    }
}

bitflags! {
    /// `MIGRATE_PFN_*` bits of a source or destination entry.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct MigrateFlags: u32 {
        /// A page is present (a hole has MIGRATE without VALID).
        const VALID = 1 << 0;
        /// The entry migrates.
        const MIGRATE = 1 << 1;
        /// The mapping was writable.
        const WRITE = 1 << 3;
        /// The entry stands for a whole 2 MiB block.
        const COMPOUND = 1 << 4;
    }
}

/// Where a source page is, or where a destination goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageLoc {
    /// Nothing there yet (a hole, or the zero page): the destination is zero-filled.
    Empty,
    /// A system page.
    System,
    /// A frame of device memory.
    Device {
        /// The device.
        dev: DeviceId,
        /// The frame.
        frame: DevPfn,
    },
}

/// Why a page did not migrate (the per-page report of a partial migration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// Not selected by the SELECT flags or owner (for example another device's page).
    NotSelected,
    /// Its lock is held by another migration or fault.
    Locked,
    /// It is pinned or otherwise referenced beyond its mapping.
    Pinned,
    /// It is shared (MAP_SHARED, copy-on-write shared after fork, or file-backed).
    Shared,
    /// A hole in memory that cannot be filled by migration (shared or file-backed mapping).
    Hole,
    /// The driver did not provide a destination (allocation failed).
    NoDestination,
    /// Installing the destination failed; the page stays where it was.
    InstallFailed,
    /// The copy of its data to the destination did not complete (a device-to-device copy that
    /// failed, was cancelled, or was never made): the page stays, intact, where it was.
    CopyFailed,
}

/// One page of a migration: its source, its destination once chosen, and its fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrateEntry {
    /// MIGRATE_PFN_* of the source.
    pub flags: MigrateFlags,
    /// Where the source is.
    pub src: PageLoc,
    /// Where it goes, once the driver allocated it.
    pub dst: Option<PageLoc>,
    /// Why it was skipped, when it was.
    pub skipped: Option<SkipReason>,
}

impl MigrateEntry {
    /// A page that does not take part.
    pub fn skipped(reason: SkipReason) -> Self {
        MigrateEntry {
            flags: MigrateFlags::empty(),
            src: PageLoc::Empty,
            dst: None,
            skipped: Some(reason),
        }
    }

    /// Does it (still) migrate?
    pub fn migrates(&self) -> bool {
        self.flags.contains(MigrateFlags::MIGRATE)
    }

    /// Drops it from the migration with `reason`.
    pub fn skip(&mut self, reason: SkipReason) {
        self.flags.remove(MigrateFlags::MIGRATE);
        self.skipped = Some(reason);
    }
}

/// Counts of a finished migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrateSummary {
    /// Pages in the range.
    pub npages: u64,
    /// Pages collected in setup (`cpages` after setup).
    pub collected: u64,
    /// Pages that moved.
    pub migrated: u64,
    /// Pages that were present (VALID) and moved.
    pub migrated_valid: u64,
}

/// A run of pages that a migration moves from one device's private memory to another's: entries
/// `first..first + npages`, whose source frames follow each other on `src_dev` from `src_frame`
/// and whose destination frames follow each other on `dst_dev` from `dst_frame`. One run is one
/// copy (one [`CopyRequest`]): seed 003 copies runs of contiguous frames with one SDMA command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRun {
    /// Index of its first entry in the migration.
    pub first: usize,
    /// Pages in the run (at least one).
    pub npages: u64,
    /// The device the pages leave.
    pub src_dev: DeviceId,
    /// The first source frame.
    pub src_frame: DevPfn,
    /// The device the pages go to (never `src_dev`).
    pub dst_dev: DeviceId,
    /// The first destination frame.
    pub dst_frame: DevPfn,
}

impl PeerRun {
    /// Bytes in the run.
    pub fn len_bytes(&self) -> u64 {
        self.npages.saturating_mul(PAGE_SIZE)
    }

    /// The copy request that moves the run's bytes (a peer-to-peer request of the copy engine).
    pub fn request(&self) -> CopyRequest {
        CopyRequest::pages(
            Endpoint::Device {
                dev: self.src_dev,
                frame: self.src_frame,
            },
            Endpoint::Device {
                dev: self.dst_dev,
                frame: self.dst_frame,
            },
            self.npages,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy_engine::CopyDirection;

    #[test]
    fn a_peer_run_is_one_peer_to_peer_request_of_its_pages() {
        let run = PeerRun {
            first: 3,
            npages: 4,
            src_dev: DeviceId(0),
            src_frame: DevPfn(10),
            dst_dev: DeviceId(1),
            dst_frame: DevPfn(512),
        };
        let r = run.request();
        assert_eq!(r.len, 4 * PAGE_SIZE);
        assert_eq!(r.direction(), CopyDirection::PeerToPeer);
        assert_eq!(r.src.base(), 10 * PAGE_SIZE);
        assert_eq!(r.dst.base(), 512 * PAGE_SIZE);
        assert_eq!(run.len_bytes(), r.len);
    }
}

/// What caused a migration: seed 003's triggers (AMD's `KFD_MIGRATE_TRIGGER_*`: prefetch, a
/// device fault, a CPU fault, eviction; suspend), UVM's access counters, and an explicit call.
/// Pages a prefetcher adds to a device fault's migration belong to the fault, as AMD counts them
/// (the runtime's statistics count the prefetched subset on its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Trigger {
    /// A user's prefetch request (`cudaMemPrefetchAsync`, `svm_range_set_attr` prefetch), or a
    /// prefetcher's migration ahead of the faults outside the faulting block.
    Prefetch,
    /// A device's fault (its replayable fault service, or its range fault on pages another
    /// device holds).
    DeviceFault,
    /// A CPU access to a page in device memory.
    CpuFault,
    /// Device memory ran out: pages went back to system memory to make room.
    Eviction,
    /// Everything back to system memory (seed 003's suspend: queues stopped, VRAM emptied).
    Suspend,
    /// Remote accesses crossed the access counters' threshold.
    AccessCounter,
    /// An explicit migration call with none of the above in scope (a driver's or test device's
    /// migrate request, unregistering memory, fork's bring-back).
    Explicit,
}

impl Trigger {
    /// Every trigger, in the order [`TriggerCounts`] keeps them.
    pub const ALL: [Trigger; 7] = [
        Trigger::Prefetch,
        Trigger::DeviceFault,
        Trigger::CpuFault,
        Trigger::Eviction,
        Trigger::Suspend,
        Trigger::AccessCounter,
        Trigger::Explicit,
    ];

    /// The name in statistics and trace events (`device_fault`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Prefetch => "prefetch",
            Trigger::DeviceFault => "device_fault",
            Trigger::CpuFault => "cpu_fault",
            Trigger::Eviction => "eviction",
            Trigger::Suspend => "suspend",
            Trigger::AccessCounter => "access_counter",
            Trigger::Explicit => "explicit",
        }
    }

    /// This trigger's place in [`Trigger::ALL`] (and in [`TriggerCounts`]).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl core::fmt::Display for Trigger {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Pages that migrations moved into and out of one device's memory (or, summed, a set of
/// devices').
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationCounts {
    /// From system memory into the device.
    pub from_system: u64,
    /// From another device into this one.
    pub from_peer: u64,
    /// From the device to system memory.
    pub to_system: u64,
    /// From the device to another device.
    pub to_peer: u64,
}

impl MigrationCounts {
    /// Every page counted, each direction once.
    pub fn total(&self) -> u64 {
        self.from_system + self.from_peer + self.to_system + self.to_peer
    }

    fn add(&mut self, o: &MigrationCounts) {
        self.from_system += o.from_system;
        self.from_peer += o.from_peer;
        self.to_system += o.to_system;
        self.to_peer += o.to_peer;
    }
}

/// [`MigrationCounts`] by [`Trigger`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TriggerCounts([MigrationCounts; Trigger::ALL.len()]);

impl TriggerCounts {
    /// The pages `trigger` moved.
    pub fn get(&self, trigger: Trigger) -> MigrationCounts {
        self.0[trigger.index()]
    }

    /// The pages `trigger` moved, for updating.
    pub fn get_mut(&mut self, trigger: Trigger) -> &mut MigrationCounts {
        &mut self.0[trigger.index()]
    }

    /// Each trigger with its pages, in [`Trigger::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (Trigger, MigrationCounts)> + '_ {
        Trigger::ALL.iter().map(|&t| (t, self.get(t)))
    }

    /// Every trigger's pages together.
    pub fn total(&self) -> MigrationCounts {
        let mut sum = MigrationCounts::default();
        for c in &self.0 {
            sum.add(c);
        }
        sum
    }

    /// Adds `other`'s pages, trigger by trigger.
    pub fn add(&mut self, other: &TriggerCounts) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            a.add(b);
        }
    }
}
