//! `fork()` of a process that uses hetmem.
//!
//! The kernel copies device-private entries into the child (copy_nonpresent_pte) and restores
//! device-exclusive ones first; the child then reaches those pages through the parent's device.
//! A user-space device has no such reach into the child, so hetmem makes the child's copy
//! complete before it is taken: in the forking thread, just before `fork()`,
//!
//! 1. the fork gate is taken for writing: no migration is in flight, none can start;
//! 2. every device-held page comes back to system memory (exclusive grants are revoked), so the
//!    child's copy of the address space holds every byte;
//! 3. the region and device tables and the per-process files are locked, so the child does not
//!    inherit a lock some other thread held at the instant of `fork()`.
//!
//! After `fork()` the parent unlocks and goes on (pages migrate again on demand). The child
//! reopens its own `/proc/self/pagemap` and `/proc/self/mem` (the inherited ones describe the
//! parent) and marks itself forked: its memory is plain memory, range faults and device reads and
//! writes through range faults work, but it never migrates and never touches the inherited
//! userfaultfd (which still belongs to the parent's address space).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::{atomic::Ordering, Arc, OnceLock};

use hetmem_sys::{
    dma::ProcMem,
    fork::{self, ForkHandlers},
    pagemap::PageMap,
};
use parking_lot::RwLockWriteGuard;

use crate::{device::Device, error::MmError, mm::AddressSpace, region::Region};

static MM: OnceLock<&'static AddressSpace> = OnceLock::new();

/// What the forking thread holds across `fork()`.
struct Held {
    _gate: RwLockWriteGuard<'static, ()>,
    _regions: RwLockWriteGuard<'static, BTreeMap<u64, Arc<Region>>>,
    _devices: RwLockWriteGuard<'static, Vec<Option<Arc<dyn Device>>>>,
    pagemap: RwLockWriteGuard<'static, PageMap>,
    procmem: RwLockWriteGuard<'static, ProcMem>,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
    static FORKING: Cell<bool> = const { Cell::new(false) };
}

/// True in the forking thread while it evicts (its migrations must not wait for the gate it
/// holds).
pub(crate) fn forking_thread() -> bool {
    FORKING.with(Cell::get)
}

pub(crate) fn install(mm: &'static AddressSpace) -> Result<(), MmError> {
    let _ = MM.set(mm);
    fork::register(ForkHandlers {
        prepare,
        parent,
        child,
    })?;
    Ok(())
}

fn prepare() {
    let Some(&mm) = MM.get() else { return };
    if mm.forked() {
        return;
    }
    let gate = mm.fork_gate.write();
    FORKING.with(|f| f.set(true));
    match mm.evict_all() {
        Ok(n) => tracing::debug!(pages = n, "fork: device pages brought back"),
        // Nothing better can be done here: the child will see those pages as holes.
        Err(e) => tracing::error!(error = %e, "fork: eviction failed"),
    }
    FORKING.with(|f| f.set(false));
    let held = Held {
        _gate: gate,
        _regions: mm.regions.write(),
        _devices: mm.devices.write(),
        pagemap: mm.pagemap.write(),
        procmem: mm.procmem.write(),
    };
    HELD.with(|h| *h.borrow_mut() = Some(held));
}

fn parent() {
    drop(HELD.with(|h| h.borrow_mut().take()));
}

fn child() {
    let Some(&mm) = MM.get() else { return };
    mm.forked.store(true, Ordering::Release);
    if let Some(mut held) = HELD.with(|h| h.borrow_mut().take()) {
        match PageMap::open() {
            Ok(p) => *held.pagemap = p,
            Err(e) => tracing::error!(error = %e, "fork child: reopening pagemap failed"),
        }
        match ProcMem::open() {
            Ok(p) => *held.procmem = p,
            Err(e) => tracing::error!(error = %e, "fork child: reopening /proc/self/mem failed"),
        }
    }
}
