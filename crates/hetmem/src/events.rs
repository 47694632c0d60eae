//! The userfaultfd event thread: what the program does to managed memory behind hetmem's back,
//! as the kernel reports it (UNMAP, REMAP, REMOVE), turned into notifier invalidations — the
//! user-space stand-in for the kernel calling `invalidate_range_start` from munmap, mremap and
//! madvise.
//!
//! The unmapping thread waits until this thread has *read* the event, so this thread never takes
//! a page lock that a thread stuck in munmap might hold; it only invalidates and updates tables.

use std::sync::atomic::Ordering;

use hetmem_core::{notifier::NotifyEvent, PageRange};
use hetmem_sys::uffd::{PollResult, UffdEvent};

use crate::mm::AddressSpace;

pub(crate) fn run(mm: &'static AddressSpace) {
    let Some(uffd) = &mm.uffd else { return };
    let mut events = Vec::with_capacity(64);
    loop {
        if mm.stopping() {
            return;
        }
        match uffd.poll(Some(mm.shutdown_event().as_fd()), None) {
            Ok(PollResult::Shutdown) => return,
            Ok(PollResult::Timeout) => continue,
            Ok(PollResult::Readable) => {}
            Err(e) => {
                tracing::error!(error = %e, "userfaultfd poll failed; event thread stops");
                return;
            }
        }
        events.clear();
        if uffd.read_events(&mut events).is_err() {
            continue;
        }
        mm.events_read
            .fetch_add(events.len() as u64, Ordering::AcqRel);
        for ev in events.drain(..) {
            handle(mm, ev);
            mm.events_handled.fetch_add(1, Ordering::AcqRel);
            mm.stats.add(&mm.stats.uffd_events, 1);
        }
    }
}

fn handle(mm: &AddressSpace, ev: UffdEvent) {
    match ev {
        UffdEvent::Unmap { start, end } => {
            if let Ok(r) = PageRange::from_bounds(start as u64, end as u64) {
                tracing::debug!(?r, "munmap of managed memory");
                mm.forget(r, NotifyEvent::Unmap);
            }
        }
        UffdEvent::Remove { start, end } => {
            if mm.take_self_zap(start as u64, end as u64) {
                return;
            }
            if let Ok(r) = PageRange::from_bounds(start as u64, end as u64) {
                tracing::debug!(?r, "madvise discard of managed memory");
                mm.forget(r, NotifyEvent::Clear);
            }
        }
        UffdEvent::Remap { from, to, len } => {
            tracing::debug!(from, to, len, "mremap of managed memory");
            if let Ok(r) = PageRange::new(from as u64, len as u64) {
                mm.notifiers
                    .invalidate(hetmem_core::notifier::NotifierRange::new(
                        r.start(),
                        r.end(),
                        NotifyEvent::Unmap,
                        None,
                    ));
            }
            // hetmem's own `remap` has moved the states already.
            if mm.region_of(hetmem_core::VirtAddr(to as u64)).is_none() {
                mm.move_region_states(from as u64, to as u64, len as u64, false);
            }
        }
        UffdEvent::Fork { uffd } => drop(uffd),
        UffdEvent::Pagefault { .. } => {}
    }
}
