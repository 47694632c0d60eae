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

thread_local! {
    static EVENT_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True on the event thread (which must never wait for itself in `sync_events`).
pub(crate) fn on_event_thread() -> bool {
    EVENT_THREAD.with(std::cell::Cell::get)
}

pub(crate) fn run(mm: &'static AddressSpace) {
    let Some(uffd) = &mm.uffd else { return };
    EVENT_THREAD.with(|t| t.set(true));
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
        // Odd: a batch is in flight (the read below completes the kernel's events, releasing
        // the threads that caused them); even again once it is handled.
        mm.event_batch.fetch_add(1, Ordering::SeqCst);
        let _ = uffd.read_events(&mut events);
        for ev in events.drain(..) {
            tracing::trace!(?ev, "userfaultfd event");
            handle(mm, ev);
            mm.stats.add(&mm.stats.uffd_events, 1);
        }
        mm.event_batch.fetch_add(1, Ordering::SeqCst);
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
                mm.stats.add(&mm.stats.program_discards, 1);
                mm.forget(r, NotifyEvent::Clear);
            }
        }
        UffdEvent::Remap { from, to, len } => {
            // The program's own MREMAP_DONTUNMAP is not reported as such: its old range is
            // taken as unmapped (it stays mapped, empty and unmanaged).
            let keep_old = mm
                .take_self_remap(from as u64, to as u64, len as u64)
                .unwrap_or(false);
            tracing::debug!(from, to, len, keep_old, "mremap of managed memory");
            if let Ok(r) = PageRange::new(from as u64, len as u64) {
                mm.notifiers
                    .invalidate(hetmem_core::notifier::NotifierRange::new(
                        r.start(),
                        r.end(),
                        NotifyEvent::Unmap,
                        None,
                    ));
            }
            mm.move_region_states(from as u64, to as u64, len as u64, keep_old);
        }
        UffdEvent::Fork { uffd } => drop(uffd),
        UffdEvent::Pagefault { .. } => {}
    }
}
