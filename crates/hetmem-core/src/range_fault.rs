//! Range fault: `hmm_range_fault` (seed 001, mm/hmm.c; hmm.rst "Address space mirroring").
//!
//! Given a range and per-page requests, produce one [`HmmPfn`] per page describing what the CPU
//! maps there, faulting pages in when asked. The decision logic is the kernel's
//! (`hmm_pte_need_fault`, `hmm_vma_walk_hole`, `hmm_vma_handle_pte`) and lives here, free of OS
//! calls; what the CPU side looks like and how a fault is carried out come from a [`CpuMm`]
//! (the process's real address space in `hetmem`, a fake in tests).
//!
//! Contract, as the kernel's:
//! - effective request of page i = `(pfns[i] & pfn_flags_mask) | default_flags`;
//! - no REQ_FAULT: never fault; REQ_WRITE on a non-writable entry: write fault; not VALID: fault;
//! - no mapping or no read permission: `Fault` if a fault was requested, else ERROR;
//! - write fault on a mapping without write permission: `Permission`;
//! - a device page of `dev_private_owner` is reported (never faulted, even for write);
//!   another owner's device-private page is "not present" and a requested fault brings it back;
//! - the notifier's `check_retry` is polled: a collision returns `Busy` and the caller restarts
//!   from `read_begin`.

use crate::addr::{DevPfn, DeviceId, Owner, PageRange, VirtAddr, HUGE_ORDER};
use crate::notifier::IntervalNotifier;
use crate::pfn::HmmPfn;

/// What the CPU side maps at one page, read without faulting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuPte {
    /// No mapping covers the address.
    NoVma,
    /// A mapping without read permission, or a special (IO / PFN) mapping.
    Inaccessible,
    /// Mapped but not populated (never touched, swapped out, or revoked).
    None {
        /// The mapping allows writes.
        vma_write: bool,
    },
    /// A present system page.
    Present {
        /// The page-table entry is writable.
        write: bool,
        /// It is the shared zero page.
        zero: bool,
        /// Mapping order: 0, or 9 for a PMD (THP).
        order: u32,
        /// The mapping allows writes.
        vma_write: bool,
    },
    /// A page in device memory.
    Device {
        /// The device.
        dev: DeviceId,
        /// Its owner cookie.
        owner: Owner,
        /// The frame.
        frame: DevPfn,
        /// The entry is writable.
        write: bool,
        /// Device-coherent (CPU-addressable) memory.
        coherent: bool,
        /// Mapping order.
        order: u32,
        /// The mapping allows writes.
        vma_write: bool,
    },
    /// A device holds exclusive access; the CPU must fault to get it back.
    Exclusive {
        /// The mapping allows writes.
        vma_write: bool,
    },
}

/// Errors of range fault (the kernel's return values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeFaultError {
    /// `-EBUSY`: the range was invalidated; restart from `read_begin`.
    #[error("range invalidated during the fault: retry")]
    Busy,
    /// `-EFAULT`: a requested page cannot be made valid (no mapping, PROT_NONE, fault failed).
    #[error("no valid mapping at {addr}")]
    Fault {
        /// The page.
        addr: VirtAddr,
    },
    /// `-EPERM`: write access asked on a read-only mapping.
    #[error("write access asked on read-only mapping at {addr}")]
    Permission {
        /// The page.
        addr: VirtAddr,
    },
    /// `-ENOMEM`.
    #[error("out of memory while faulting {addr}")]
    NoMemory {
        /// The page.
        addr: VirtAddr,
    },
    /// `-EINVAL`: the request itself is malformed.
    #[error("invalid range fault request: {0}")]
    Invalid(&'static str),
}

impl RangeFaultError {
    /// The kernel's errno for this error (negative values are what the ioctl returns).
    pub fn errno(&self) -> i32 {
        match self {
            RangeFaultError::Busy => 16,             // EBUSY
            RangeFaultError::Fault { .. } => 14,     // EFAULT
            RangeFaultError::Permission { .. } => 1, // EPERM
            RangeFaultError::NoMemory { .. } => 12,  // ENOMEM
            RangeFaultError::Invalid(_) => 22,       // EINVAL
        }
    }
}

/// The CPU side of an address space, as range fault needs it.
pub trait CpuMm {
    /// Describes every page of `range` without faulting (`out` is cleared first).
    fn snapshot(&self, range: PageRange, out: &mut Vec<CpuPte>) -> Result<(), RangeFaultError>;
    /// Makes every page of `range` present in system memory, writable if `write` (zero fill,
    /// copy-on-write break, bringing device pages back to RAM, revoking exclusive access).
    fn fault(&self, range: PageRange, write: bool) -> Result<(), RangeFaultError>;
}

/// The kernel's `struct hmm_range`.
#[derive(Debug)]
pub struct HmmRange<'a> {
    /// The subscription whose sequence validates the result.
    pub notifier: &'a IntervalNotifier,
    /// The value of `read_begin`.
    pub notifier_seq: u64,
    /// The pages.
    pub range: PageRange,
    /// One entry per page: requests in, results out.
    pub hmm_pfns: Vec<HmmPfn>,
    /// Requests for every page.
    pub default_flags: u64,
    /// Which per-page request bits count.
    pub pfn_flags_mask: u64,
    /// Device pages of this owner are reported rather than faulted.
    pub dev_private_owner: Option<Owner>,
}

impl<'a> HmmRange<'a> {
    /// A range with no per-page requests.
    pub fn new(notifier: &'a IntervalNotifier, range: PageRange, default_flags: u64) -> Self {
        HmmRange {
            notifier,
            notifier_seq: 0,
            range,
            hmm_pfns: vec![HmmPfn(0); range.npages() as usize],
            default_flags,
            pfn_flags_mask: 0,
            dev_private_owner: None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    None,
    Fault,
    WriteFault,
}

fn need_fault(req: u64, valid: bool, write: bool) -> Need {
    if req & HmmPfn::REQ_FAULT == 0 {
        Need::None
    } else if req & HmmPfn::REQ_WRITE != 0 && !write {
        Need::WriteFault
    } else if !valid {
        Need::Fault
    } else {
        Need::None
    }
}

/// Statistics of one range fault call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeFaultStats {
    /// Snapshot passes over (part of) the range.
    pub walks: u64,
    /// Fault calls made.
    pub faults: u64,
    /// Pages faulted.
    pub pages_faulted: u64,
}

/// `hmm_range_fault`: fills `range.hmm_pfns`. On error, entries before the failing page hold
/// outputs and the rest still hold their inputs.
pub fn range_fault(
    mm: &dyn CpuMm,
    range: &mut HmmRange<'_>,
) -> Result<RangeFaultStats, RangeFaultError> {
    let n = range.range.npages() as usize;
    if range.hmm_pfns.len() != n {
        return Err(RangeFaultError::Invalid(
            "hmm_pfns length does not match the range",
        ));
    }
    if range.default_flags & HmmPfn::REQ_WRITE != 0 && range.default_flags & HmmPfn::REQ_FAULT == 0
    {
        return Err(RangeFaultError::Invalid("REQ_WRITE without REQ_FAULT"));
    }
    let mut stats = RangeFaultStats::default();
    let mut ptes = Vec::with_capacity(n);
    let mut done = 0usize;
    // Guard against a CPU side that keeps losing what it just faulted in.
    let mut faults_at_same_place = 0u32;
    let mut last_fault_at = usize::MAX;
    while done < n {
        if range.notifier.check_retry(range.notifier_seq) {
            return Err(RangeFaultError::Busy);
        }
        let rest = PageRange::from_bounds(range.range.page(done as u64).0, range.range.end().0)
            .map_err(|_| RangeFaultError::Invalid("range"))?;
        mm.snapshot(rest, &mut ptes)?;
        stats.walks += 1;
        if ptes.len() != rest.npages() as usize {
            return Err(RangeFaultError::Invalid(
                "CpuMm::snapshot returned the wrong length",
            ));
        }
        // Walk until the first page that needs a fault, filling outputs.
        let mut fault_from = None;
        for (k, pte) in ptes.iter().enumerate() {
            let i = done + k;
            let addr = range.range.page(i as u64);
            let req = (range.hmm_pfns[i].0 & range.pfn_flags_mask) | range.default_flags;
            let (out, need, vma_write) = classify(*pte, req, addr, range.dev_private_owner)?;
            if need != Need::None {
                if need == Need::WriteFault && !vma_write {
                    return Err(RangeFaultError::Permission { addr });
                }
                fault_from = Some((k, need));
                break;
            }
            range.hmm_pfns[i] = out;
        }
        let Some((k, need)) = fault_from else {
            break;
        };
        // Fault the run of pages that need the same kind of fault, then walk again from there.
        let mut run = 1;
        while k + run < ptes.len() {
            let i = done + k + run;
            let addr = range.range.page(i as u64);
            let req = (range.hmm_pfns[i].0 & range.pfn_flags_mask) | range.default_flags;
            match classify(ptes[k + run], req, addr, range.dev_private_owner) {
                Ok((_, nd, vw)) if nd != Need::None && (nd != Need::WriteFault || vw) => run += 1,
                _ => break,
            }
        }
        // The first faulting page decides the kind; a write fault covers reads too.
        let write = need == Need::WriteFault
            || (0..run).any(|r| {
                let i = done + k + r;
                let req = (range.hmm_pfns[i].0 & range.pfn_flags_mask) | range.default_flags;
                req & HmmPfn::REQ_WRITE != 0
            });
        let start = range.range.page((done + k) as u64);
        let fr = PageRange::from_pages(start.0, run as u64)
            .map_err(|_| RangeFaultError::Invalid("range"))?;
        if last_fault_at == done + k {
            faults_at_same_place += 1;
            if faults_at_same_place > 64 {
                return Err(RangeFaultError::Busy);
            }
        } else {
            faults_at_same_place = 0;
            last_fault_at = done + k;
        }
        mm.fault(fr, write)?;
        stats.faults += 1;
        stats.pages_faulted += run as u64;
        done += k;
    }
    if range.notifier.check_retry(range.notifier_seq) {
        return Err(RangeFaultError::Busy);
    }
    Ok(stats)
}

/// Output entry, fault need, and whether the mapping allows writes, for one page.
fn classify(
    pte: CpuPte,
    req: u64,
    addr: VirtAddr,
    owner: Option<Owner>,
) -> Result<(HmmPfn, Need, bool), RangeFaultError> {
    Ok(match pte {
        CpuPte::NoVma | CpuPte::Inaccessible => {
            if req & HmmPfn::REQ_FAULT != 0 {
                return Err(RangeFaultError::Fault { addr });
            }
            (HmmPfn::error(), Need::None, false)
        }
        CpuPte::None { vma_write } | CpuPte::Exclusive { vma_write } => {
            (HmmPfn(0), need_fault(req, false, false), vma_write)
        }
        CpuPte::Present {
            write,
            zero,
            order,
            vma_write,
        } => {
            let out = if zero {
                HmmPfn::zero(addr)
            } else {
                HmmPfn::system(addr, write)
            };
            (
                out.with_order(order),
                need_fault(req, true, write),
                vma_write,
            )
        }
        CpuPte::Device {
            dev,
            owner: o,
            frame,
            write,
            coherent,
            order,
            vma_write,
        } => {
            if coherent {
                let out = HmmPfn::device(dev, frame, write, true).with_order(order);
                (out, need_fault(req, true, write), vma_write)
            } else if Some(o) == owner {
                // The caller's own device memory: reported, never faulted (hmm.c).
                (
                    HmmPfn::device(dev, frame, write, false).with_order(order),
                    Need::None,
                    vma_write,
                )
            } else {
                (HmmPfn(0), need_fault(req, false, false), vma_write)
            }
        }
    })
}

/// Map order of a PMD-mapped page.
pub const PMD_ORDER: u32 = HUGE_ORDER;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notifier::{IntervalNotifierOps, MmNotifiers, NotifierRange, NotifyEvent};
    use parking_lot::Mutex;
    use std::sync::{Arc, Weak};

    struct Nop;
    impl IntervalNotifierOps for Nop {
        fn invalidate(&self, sub: &IntervalNotifier, _: &NotifierRange, seq: u64) -> bool {
            sub.set_seq(seq);
            true
        }
    }

    /// A fake CPU side: a vector of ptes; `fault` makes pages present and records calls.
    struct FakeMm {
        base: u64,
        ptes: Mutex<Vec<CpuPte>>,
        calls: Mutex<Vec<(PageRange, bool)>>,
        on_fault: Option<Box<dyn Fn() + Send + Sync>>,
    }

    impl CpuMm for FakeMm {
        fn snapshot(&self, r: PageRange, out: &mut Vec<CpuPte>) -> Result<(), RangeFaultError> {
            out.clear();
            let p = self.ptes.lock();
            for a in r.pages() {
                out.push(p[((a.0 - self.base) / 4096) as usize]);
            }
            Ok(())
        }
        fn fault(&self, r: PageRange, write: bool) -> Result<(), RangeFaultError> {
            self.calls.lock().push((r, write));
            let mut p = self.ptes.lock();
            for a in r.pages() {
                let i = ((a.0 - self.base) / 4096) as usize;
                let vma_write = match p[i] {
                    CpuPte::None { vma_write } | CpuPte::Exclusive { vma_write } => vma_write,
                    CpuPte::Present { vma_write, .. } | CpuPte::Device { vma_write, .. } => {
                        vma_write
                    }
                    _ => return Err(RangeFaultError::Fault { addr: a }),
                };
                p[i] = CpuPte::Present {
                    write,
                    zero: false,
                    order: 0,
                    vma_write,
                };
            }
            if let Some(f) = &self.on_fault {
                f();
            }
            Ok(())
        }
    }

    fn setup(ptes: Vec<CpuPte>) -> (Arc<MmNotifiers>, Arc<IntervalNotifier>, FakeMm, Arc<Nop>) {
        let mm = MmNotifiers::new();
        let ops = Arc::new(Nop);
        let weak: Weak<dyn IntervalNotifierOps> = Arc::downgrade(&ops) as _;
        let sub = mm.insert(VirtAddr(0), VirtAddr(!4095), weak);
        let fake = FakeMm {
            base: 0x10000,
            ptes: Mutex::new(ptes),
            calls: Mutex::new(Vec::new()),
            on_fault: None,
        };
        (mm, sub, fake, ops)
    }

    #[test]
    fn snapshot_never_faults_and_reports_errors() {
        let (_mm, sub, fake, _o) = setup(vec![
            CpuPte::Inaccessible,
            CpuPte::NoVma,
            CpuPte::Present {
                write: false,
                zero: true,
                order: 0,
                vma_write: false,
            },
            CpuPte::None { vma_write: true },
            CpuPte::Present {
                write: true,
                zero: false,
                order: 9,
                vma_write: true,
            },
        ]);
        let mut r = HmmRange::new(&sub, PageRange::from_pages(0x10000, 5).unwrap(), 0);
        r.notifier_seq = sub.read_begin();
        range_fault(&fake, &mut r).unwrap();
        assert!(fake.calls.lock().is_empty());
        assert!(r.hmm_pfns[0].is_error() && r.hmm_pfns[1].is_error());
        assert!(r.hmm_pfns[2].is_zero() && !r.hmm_pfns[2].is_write());
        assert_eq!(r.hmm_pfns[3], HmmPfn(0));
        assert!(r.hmm_pfns[4].is_write());
        assert_eq!(r.hmm_pfns[4].map_order(), 9);
    }

    #[test]
    fn write_fault_on_read_only_mapping_is_permission_error() {
        let (_mm, sub, fake, _o) = setup(vec![CpuPte::Present {
            write: false,
            zero: true,
            order: 0,
            vma_write: false,
        }]);
        let mut r = HmmRange::new(
            &sub,
            PageRange::from_pages(0x10000, 1).unwrap(),
            HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        );
        r.notifier_seq = sub.read_begin();
        assert_eq!(
            range_fault(&fake, &mut r),
            Err(RangeFaultError::Permission {
                addr: VirtAddr(0x10000)
            })
        );
        r.default_flags = HmmPfn::REQ_FAULT;
        range_fault(&fake, &mut r).unwrap();
    }

    #[test]
    fn fault_on_inaccessible_is_fault_error() {
        let (_mm, sub, fake, _o) =
            setup(vec![CpuPte::None { vma_write: true }, CpuPte::Inaccessible]);
        let mut r = HmmRange::new(
            &sub,
            PageRange::from_pages(0x10000, 2).unwrap(),
            HmmPfn::REQ_FAULT,
        );
        r.notifier_seq = sub.read_begin();
        assert_eq!(
            range_fault(&fake, &mut r),
            Err(RangeFaultError::Fault {
                addr: VirtAddr(0x11000)
            })
        );
        assert!(
            r.hmm_pfns[0].is_valid(),
            "entries before the error hold outputs"
        );
    }

    #[test]
    fn own_device_pages_are_reported_foreign_ones_faulted() {
        let dev = |owner| CpuPte::Device {
            dev: DeviceId(owner as u8),
            owner: Owner(owner),
            frame: DevPfn(9),
            write: true,
            coherent: false,
            order: 0,
            vma_write: true,
        };
        let (_mm, sub, fake, _o) = setup(vec![dev(1), dev(2)]);
        let mut r = HmmRange::new(
            &sub,
            PageRange::from_pages(0x10000, 2).unwrap(),
            HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE,
        );
        r.dev_private_owner = Some(Owner(1));
        r.notifier_seq = sub.read_begin();
        range_fault(&fake, &mut r).unwrap();
        assert_eq!(
            r.hmm_pfns[0].device_frame(),
            Some((DeviceId(1), DevPfn(9), false))
        );
        assert_eq!(r.hmm_pfns[1].device_frame(), None);
        assert!(r.hmm_pfns[1].is_write());
        assert_eq!(fake.calls.lock().len(), 1);
    }

    #[test]
    fn per_page_requests_use_the_mask() {
        let (_mm, sub, fake, _o) = setup(vec![
            CpuPte::None { vma_write: true },
            CpuPte::None { vma_write: true },
        ]);
        let mut r = HmmRange::new(&sub, PageRange::from_pages(0x10000, 2).unwrap(), 0);
        r.pfn_flags_mask = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
        r.hmm_pfns[1] = HmmPfn(HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE);
        r.notifier_seq = sub.read_begin();
        range_fault(&fake, &mut r).unwrap();
        assert_eq!(r.hmm_pfns[0], HmmPfn(0));
        assert!(r.hmm_pfns[1].is_write());
        assert_eq!(
            *fake.calls.lock(),
            vec![(PageRange::from_pages(0x11000, 1).unwrap(), true)]
        );
    }

    #[test]
    fn invalidation_during_range_fault_forces_retry() {
        let (mm, sub, mut fake, _o) = setup(vec![CpuPte::None { vma_write: true }]);
        let mm2 = Arc::clone(&mm);
        fake.on_fault = Some(Box::new(move || {
            mm2.invalidate(NotifierRange::new(
                VirtAddr(0x10000),
                VirtAddr(0x11000),
                NotifyEvent::Clear,
                None,
            ))
        }));
        let mut r = HmmRange::new(
            &sub,
            PageRange::from_pages(0x10000, 1).unwrap(),
            HmmPfn::REQ_FAULT,
        );
        r.notifier_seq = sub.read_begin();
        assert_eq!(range_fault(&fake, &mut r), Err(RangeFaultError::Busy));
        // The caller's loop: read_begin again and retry; now nothing invalidates.
        fake.on_fault = None;
        r.notifier_seq = sub.read_begin();
        range_fault(&fake, &mut r).unwrap();
        assert!(r.hmm_pfns[0].is_valid());
    }
}
