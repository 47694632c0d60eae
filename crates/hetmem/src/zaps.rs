//! hetmem's own discards (MADV_DONTNEED of pages that migrated away), told apart from the
//! program's in the userfaultfd REMOVE events they cause.
//!
//! The kernel reports a discard once per VMA it crosses (`madvise_walk_vmas` calls
//! `userfaultfd_remove` for each), and the mprotect backend splits VMAs wherever protections
//! differ, so one discard of ours can come back as several events. A mark therefore loses only
//! the part an event covers; what is left waits for the other events.
//!
//! `madvise` returns once each of its events has been *read*, not handled: the mark must outlive
//! the call. A part no event claims (a VMA the kernel did not report) would otherwise stay for
//! ever and swallow a later discard of the program's own; it goes stale once the event thread
//! has finished the batch in flight when the call returned, since every event of the call was
//! read by then (the batch sequence is odd while a batch is read and handled, see
//! `AddressSpace::sync_events`).

/// What is left of a discard of ours: `[start, end)`, the discard it belongs to, and the event
/// batch sequence after which it is stale (`u64::MAX` while the discard is still running).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark {
    id: u64,
    start: u64,
    end: u64,
    stale_after: u64,
}

/// The marks of hetmem's own discards.
#[derive(Debug, Default)]
pub(crate) struct SelfZaps {
    marks: Vec<Mark>,
    next_id: u64,
}

/// A discard of ours in progress, to finish when it returns.
#[derive(Debug)]
pub(crate) struct ZapId(u64);

impl SelfZaps {
    /// Marks `[start, end)` as being discarded by hetmem.
    pub(crate) fn begin(&mut self, start: u64, end: u64) -> ZapId {
        let id = self.next_id;
        self.next_id += 1;
        self.marks.push(Mark {
            id,
            start,
            end,
            stale_after: u64::MAX,
        });
        ZapId(id)
    }

    /// The discard of `id` returned; `batch` is the event batch sequence read after it returned.
    /// What no event has claimed yet is claimed by the batch in flight or by none (`failed`:
    /// the discard failed, so no event will come).
    pub(crate) fn finish(&mut self, id: ZapId, batch: u64, failed: bool) {
        // Odd: a batch is in flight, and the call's last events may be in it; even: they were
        // all handled.
        if failed {
            self.marks.retain(|m| m.id != id.0);
            return;
        }
        let stale_after = batch.next_multiple_of(2);
        for m in self.marks.iter_mut().filter(|m| m.id == id.0) {
            m.stale_after = stale_after;
        }
    }

    /// A REMOVE event for `[start, end)`, handled in the event batch `batch` (odd): true when it
    /// is hetmem's own, whose mark then loses that part. Marks gone stale are dropped first.
    pub(crate) fn claim(&mut self, start: u64, end: u64, batch: u64) -> bool {
        self.marks.retain(|m| m.stale_after >= batch);
        let Some(i) = self
            .marks
            .iter()
            .position(|m| m.start <= start && end <= m.end)
        else {
            return false;
        };
        let m = self.marks.swap_remove(i);
        if m.start < start {
            self.marks.push(Mark { end: start, ..m });
        }
        if end < m.end {
            self.marks.push(Mark { start: end, ..m });
        }
        true
    }

    /// Marks held (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.marks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_discard_reported_per_vma_is_claimed_piece_by_piece() {
        let mut z = SelfZaps::default();
        let id = z.begin(0x1000, 0x9000);
        // Three VMAs: three events, read while the discard runs (batch 1).
        assert!(z.claim(0x1000, 0x3000, 1));
        assert!(z.claim(0x6000, 0x9000, 1));
        z.finish(id, 1, false);
        assert!(z.claim(0x3000, 0x6000, 1));
        assert_eq!(z.len(), 0);
        // The program's own discard of the same pages afterwards is the program's.
        assert!(!z.claim(0x1000, 0x9000, 3));
    }

    #[test]
    fn an_event_outside_every_mark_is_the_programs() {
        let mut z = SelfZaps::default();
        let _id = z.begin(0x4000, 0x6000);
        assert!(!z.claim(0x3000, 0x5000, 1));
        assert!(!z.claim(0x8000, 0x9000, 1));
        assert!(z.claim(0x4000, 0x6000, 1));
    }

    #[test]
    fn what_no_event_claims_goes_stale_after_the_batch_in_flight() {
        let mut z = SelfZaps::default();
        let id = z.begin(0x1000, 0x5000);
        assert!(z.claim(0x1000, 0x2000, 5));
        // Returned while batch 5 was still being handled: its events may be in that batch.
        z.finish(id, 5, false);
        assert!(z.claim(0x2000, 0x3000, 5));
        // Batch 7 started after it: the rest was never reported, and a discard there now is
        // the program's.
        assert!(!z.claim(0x3000, 0x4000, 7));
        assert_eq!(z.len(), 0);
    }

    #[test]
    fn a_discard_still_running_keeps_its_mark_across_batches() {
        let mut z = SelfZaps::default();
        let id = z.begin(0x1000, 0x3000);
        assert!(z.claim(0x1000, 0x2000, 1));
        assert!(z.claim(0x2000, 0x3000, 9));
        z.finish(id, 10, false);
        assert_eq!(z.len(), 0);
    }

    #[test]
    fn a_failed_discard_leaves_no_mark() {
        let mut z = SelfZaps::default();
        let id = z.begin(0x1000, 0x3000);
        let other = z.begin(0x8000, 0x9000);
        z.finish(id, 2, true);
        assert_eq!(z.len(), 1);
        assert!(!z.claim(0x1000, 0x3000, 3));
        // The other discard, still running, keeps its mark.
        assert!(z.claim(0x8000, 0x9000, 3));
        z.finish(other, 4, false);
    }

    #[test]
    fn overlapping_discards_each_keep_their_own_mark() {
        let mut z = SelfZaps::default();
        let a = z.begin(0x1000, 0x3000);
        let b = z.begin(0x1000, 0x3000);
        assert!(z.claim(0x1000, 0x3000, 1));
        z.finish(a, 2, false);
        // b's mark is still running: a later batch does not make it stale.
        assert!(z.claim(0x1000, 0x3000, 5));
        z.finish(b, 6, false);
        assert_eq!(z.len(), 0);
    }
}
