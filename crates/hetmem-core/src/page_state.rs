//! Per-page state of managed memory: the user-space stand-in for a CPU page-table entry that
//! points at device memory (the kernel's device-private swap entry), plus the page lock.
//!
//! Eight bytes per 4 KiB page, two atomics, so that the CPU fault path (which runs in a signal
//! handler in the faulting thread) can read and lock a page without taking any lock or allocating:
//!
//! ```text
//!  state (u32):  bit 0 LOCKED   bit 1 WAITERS  bit 2 ON_DEVICE  bit 3 WRITE  bit 4 HUGE
//!                bit 5 COHERENT bit 6 EXCLUSIVE bit 7 DIRTY     bits 8..16 device id
//!                bits 16..19 the program's protection               bit 19 DUPLICATED
//!  frame (u32):  the device frame (DevPfn) while ON_DEVICE or EXCLUSIVE
//! ```
//!
//! A page is *system* when neither ON_DEVICE nor EXCLUSIVE is set: the kernel's page table is then
//! the truth about it. ON_DEVICE means its data lives in frame `frame` of device `dev`, and the
//! CPU cannot reach it (device-private) or reaches it directly (COHERENT). EXCLUSIVE means a device
//! holds atomic access (`make_device_exclusive`): the CPU's access is revoked until it touches the
//! page. WRITE records whether the mapping that was taken away was writable (MIGRATE_PFN_WRITE).
//! DUPLICATED marks a *system* page that devices may hold read-only copies of (read duplication,
//! UVM's read-mostly): the CPU's mapping of it is write-protected, and a CPU write first
//! invalidates every copy. Any change of location clears it.
//!
//! Invariant defended (DESIGN.md 3): every change of location happens under LOCKED; a page whose
//! location is not *system* always names a frame that is allocated to that device.

use std::sync::atomic::Ordering;

use crate::sync::AtomicU32;

use crate::addr::{DevPfn, DeviceId};

const LOCKED: u32 = 1 << 0;
const WAITERS: u32 = 1 << 1;
const ON_DEVICE: u32 = 1 << 2;
const WRITE: u32 = 1 << 3;
const HUGE: u32 = 1 << 4;
const COHERENT: u32 = 1 << 5;
const EXCLUSIVE: u32 = 1 << 6;
const DIRTY: u32 = 1 << 7;
const DEV_SHIFT: u32 = 8;
const PROT_SHIFT: u32 = 16;
const PROT_MASK: u32 = 0x7 << PROT_SHIFT;
const DUPLICATED: u32 = 1 << 19;

/// Where a page's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// In system memory, mapped (or not yet populated) by the kernel as usual.
    System,
    /// In a frame of a device's memory.
    Device {
        /// The device.
        dev: DeviceId,
        /// The frame.
        frame: DevPfn,
        /// Device-coherent memory (the CPU keeps direct access) rather than device-private.
        coherent: bool,
    },
    /// A device holds exclusive (atomic) access; the data waits in one of its frames.
    Exclusive {
        /// The device.
        dev: DeviceId,
        /// The frame holding the data.
        frame: DevPfn,
    },
}

/// A decoded snapshot of one page's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageState {
    /// Someone holds the page lock.
    pub locked: bool,
    /// Where the data is.
    pub location: Location,
    /// The mapping the data came from was writable.
    pub write: bool,
    /// Moved as part of a 2 MiB block (map order 9).
    pub huge: bool,
    /// Written since it last moved.
    pub dirty: bool,
    /// A system page devices may hold read-only copies of; the CPU's mapping is write-protected.
    pub duplicated: bool,
}

/// One page's slot.
#[derive(Debug, Default)]
pub struct PageSlot {
    state: AtomicU32,
    frame: AtomicU32,
}

/// The state table of one managed region: one slot per page.
#[derive(Debug)]
pub struct PageStates {
    slots: Box<[PageSlot]>,
}

/// How a page is to be recorded as not-in-system-memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevicePlacement {
    /// The device.
    pub dev: DeviceId,
    /// Its frame.
    pub frame: DevPfn,
    /// The mapping was writable.
    pub write: bool,
    /// Part of a 2 MiB block.
    pub huge: bool,
    /// Device-coherent.
    pub coherent: bool,
    /// Exclusive access rather than migration.
    pub exclusive: bool,
}

impl PageStates {
    /// A table of `npages` system pages.
    pub fn new(npages: usize) -> Self {
        PageStates {
            slots: (0..npages).map(|_| PageSlot::default()).collect(),
        }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Is the table empty?
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Metadata bytes per page.
    pub const BYTES_PER_PAGE: usize = std::mem::size_of::<PageSlot>();

    /// Decodes page `i`.
    pub fn get(&self, i: usize) -> PageState {
        let s = self.slots[i].state.load(Ordering::Acquire);
        let frame = DevPfn(self.slots[i].frame.load(Ordering::Acquire));
        let dev = DeviceId((s >> DEV_SHIFT) as u8);
        let location = if s & EXCLUSIVE != 0 {
            Location::Exclusive { dev, frame }
        } else if s & ON_DEVICE != 0 {
            Location::Device {
                dev,
                frame,
                coherent: s & COHERENT != 0,
            }
        } else {
            Location::System
        };
        PageState {
            locked: s & LOCKED != 0,
            location,
            write: s & WRITE != 0,
            huge: s & HUGE != 0,
            dirty: s & DIRTY != 0,
            duplicated: s & DUPLICATED != 0,
        }
    }

    /// The raw state word, for futex waits on the lock bit.
    pub fn word(&self, i: usize) -> &AtomicU32 {
        &self.slots[i].state
    }

    /// Tries to take page `i`'s lock. Never blocks.
    pub fn try_lock(&self, i: usize) -> bool {
        let w = &self.slots[i].state;
        let mut cur = w.load(Ordering::Relaxed);
        loop {
            if cur & LOCKED != 0 {
                return false;
            }
            match w.compare_exchange_weak(cur, cur | LOCKED, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Records that a thread is about to wait for page `i`'s lock. Returns the word value the
    /// waiter must pass to the futex wait, or `None` if the lock was released meanwhile.
    pub fn prepare_wait(&self, i: usize) -> Option<u32> {
        let w = &self.slots[i].state;
        let mut cur = w.load(Ordering::Relaxed);
        loop {
            if cur & LOCKED == 0 {
                return None;
            }
            if cur & WAITERS != 0 {
                return Some(cur);
            }
            match w.compare_exchange_weak(cur, cur | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(cur | WAITERS),
                Err(now) => cur = now,
            }
        }
    }

    /// Releases page `i`'s lock. Returns true if a waiter must be woken (futex wake on
    /// [`PageStates::word`]).
    pub fn unlock(&self, i: usize) -> bool {
        let prev = self.slots[i]
            .state
            .fetch_and(!(LOCKED | WAITERS), Ordering::Release);
        debug_assert!(prev & LOCKED != 0, "unlock of an unlocked page");
        prev & WAITERS != 0
    }

    /// Records page `i` (locked by the caller) as held by a device.
    pub fn set_device(&self, i: usize, p: DevicePlacement) {
        let w = &self.slots[i].state;
        let cur = w.load(Ordering::Relaxed);
        debug_assert!(cur & LOCKED != 0, "page state changed without its lock");
        self.slots[i].frame.store(p.frame.0, Ordering::Relaxed);
        let mut bits = (cur & (LOCKED | WAITERS)) | ((p.dev.0 as u32) << DEV_SHIFT);
        bits |= if p.exclusive { EXCLUSIVE } else { ON_DEVICE };
        if p.write {
            bits |= WRITE;
        }
        if p.huge {
            bits |= HUGE;
        }
        if p.coherent {
            bits |= COHERENT;
        }
        self.store_keeping_lock(i, bits);
    }

    /// Records page `i` (locked by the caller) as back in system memory.
    pub fn set_system(&self, i: usize) {
        debug_assert!(self.slots[i].state.load(Ordering::Relaxed) & LOCKED != 0);
        self.slots[i].frame.store(0, Ordering::Relaxed);
        self.store_keeping_lock(i, 0);
    }

    /// Clears the HUGE bit of page `i` (a 2 MiB block that is being split).
    pub fn clear_huge(&self, i: usize) {
        self.slots[i].state.fetch_and(!HUGE, Ordering::AcqRel);
    }

    /// Records the protection the program asked for page `i` (3 bits: read, write, exec). The
    /// mprotect CPU-fault backend needs it to restore access when a page comes back.
    pub fn set_prot(&self, i: usize, prot: u32) {
        let w = &self.slots[i].state;
        let mut cur = w.load(Ordering::Relaxed);
        loop {
            let new = (cur & !PROT_MASK) | ((prot & 0x7) << PROT_SHIFT);
            match w.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// The protection recorded for page `i`.
    pub fn prot(&self, i: usize) -> u32 {
        (self.slots[i].state.load(Ordering::Acquire) & PROT_MASK) >> PROT_SHIFT
    }

    /// Copies slot `j` of `other` into slot `i` (when a region is split or moved; the caller
    /// guarantees nobody changes either slot meanwhile).
    pub fn copy_from(&self, i: usize, other: &PageStates, j: usize) {
        let s = other.slots[j].state.load(Ordering::Acquire) & !(LOCKED | WAITERS);
        self.slots[i].frame.store(
            other.slots[j].frame.load(Ordering::Acquire),
            Ordering::Relaxed,
        );
        self.slots[i].state.store(s, Ordering::Release);
    }

    /// Marks page `i` (locked by the caller, in system memory) duplicated, or no longer.
    pub fn set_duplicated(&self, i: usize, on: bool) {
        let w = &self.slots[i].state;
        debug_assert!(
            w.load(Ordering::Relaxed) & LOCKED != 0,
            "page state changed without its lock"
        );
        debug_assert!(w.load(Ordering::Relaxed) & (ON_DEVICE | EXCLUSIVE) == 0);
        if on {
            w.fetch_or(DUPLICATED, Ordering::AcqRel);
        } else {
            w.fetch_and(!DUPLICATED, Ordering::AcqRel);
        }
    }

    /// Marks page `i` dirty.
    pub fn set_dirty(&self, i: usize) {
        self.slots[i].state.fetch_or(DIRTY, Ordering::Relaxed);
    }

    fn store_keeping_lock(&self, i: usize, bits: u32) {
        let w = &self.slots[i].state;
        let mut cur = w.load(Ordering::Relaxed);
        loop {
            let keep = LOCKED | WAITERS | PROT_MASK;
            let new = (bits & !keep) | (cur & keep);
            match w.compare_exchange_weak(cur, new, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Checks the table's invariants: returns a description of the first violation.
    /// `frame_allocated(dev, frame)` says whether the pool has that frame allocated.
    pub fn check_invariants(
        &self,
        mut frame_allocated: impl FnMut(DeviceId, DevPfn) -> bool,
    ) -> Result<(), String> {
        for i in 0..self.len() {
            let s = self.get(i);
            match s.location {
                Location::System => {}
                Location::Device { dev, frame, .. } | Location::Exclusive { dev, frame } => {
                    if s.duplicated {
                        return Err(format!("page {i} is duplicated but not in system memory"));
                    }
                    if !frame_allocated(dev, frame) {
                        return Err(format!(
                            "page {i} names frame {frame:?} of {dev:?}, which is not allocated"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_and_placement_round_trip() {
        let t = PageStates::new(4);
        assert_eq!(t.get(0).location, Location::System);
        assert!(t.try_lock(1));
        assert!(!t.try_lock(1));
        assert_eq!(t.prepare_wait(1), Some(t.word(1).load(Ordering::Relaxed)));
        t.set_device(
            1,
            DevicePlacement {
                dev: DeviceId(2),
                frame: DevPfn(77),
                write: true,
                huge: false,
                coherent: false,
                exclusive: false,
            },
        );
        let s = t.get(1);
        assert!(s.locked && s.write);
        assert_eq!(
            s.location,
            Location::Device {
                dev: DeviceId(2),
                frame: DevPfn(77),
                coherent: false
            }
        );
        assert!(t.unlock(1), "a waiter was recorded");
        assert!(!t.get(1).locked);
        assert!(t.try_lock(1));
        t.set_system(1);
        t.set_duplicated(1, true);
        assert!(t.get(1).duplicated);
        assert!(t.check_invariants(|_, _| true).is_ok());
        t.set_device(
            1,
            DevicePlacement {
                dev: DeviceId(1),
                frame: DevPfn(3),
                write: false,
                huge: false,
                coherent: false,
                exclusive: false,
            },
        );
        assert!(!t.get(1).duplicated, "a move ends the duplication");
        t.set_system(1);
        t.set_duplicated(1, true);
        t.set_duplicated(1, false);
        assert!(!t.get(1).duplicated);
        assert!(!t.unlock(1));
        assert_eq!(t.get(1).location, Location::System);
        assert_eq!(PageStates::BYTES_PER_PAGE, 8);
    }

    #[test]
    fn invariant_check_finds_dangling_frames() {
        let t = PageStates::new(2);
        assert!(t.try_lock(0));
        t.set_device(
            0,
            DevicePlacement {
                dev: DeviceId(0),
                frame: DevPfn(5),
                write: false,
                huge: false,
                coherent: false,
                exclusive: true,
            },
        );
        t.unlock(0);
        assert!(t.check_invariants(|_, f| f == DevPfn(5)).is_ok());
        assert!(t.check_invariants(|_, _| false).is_err());
    }
}
