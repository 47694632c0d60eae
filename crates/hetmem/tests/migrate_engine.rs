//! The migration engine through its public API (`MigrateVma::setup` → `alloc_and_copy` →
//! `pages` → `finalize`), against a minimal device defined here: rollback of a collected
//! migration that is dropped, and partial migration with a per-page report (DESIGN.md
//! invariant 3: a migration commits or rolls back page by page; pages that could not migrate stay
//! valid where they were).

use std::sync::Arc;

use hetmem::{
    migrate::{MigrateArgs, MigrateVma, ToSystem},
    region::Region,
    AddressSpace, Device, DeviceMemory, MigrateDriver, MigrateError, PeerCopy, Prot,
};
use hetmem_core::{
    migrate::{MigrateEntry, PageLoc, PeerRun, SelectFlags, SkipReason},
    page_state::Location,
    pool::MemoryKind,
    DeviceId, Owner, PageRange, VirtAddr, PAGE_SIZE,
};

const OWNER: Owner = Owner(0x7e57_0001);

/// The smallest device: memory, and `migrate_to_ram` through the common path.
struct TestDevice {
    mem: Arc<DeviceMemory>,
}

impl Device for TestDevice {
    fn memory(&self) -> &Arc<DeviceMemory> {
        &self.mem
    }
    fn migrate_to_ram_in(
        &self,
        mm: &AddressSpace,
        region: &Arc<Region>,
        addr: VirtAddr,
    ) -> Result<(), MigrateError> {
        hetmem::fault::migrate_to_ram(mm, region, &self.mem, addr, false, &ToSystem)
    }
}

/// Gives a destination frame to every migrating entry whose index `take` accepts.
struct Driver<'a> {
    mem: &'a DeviceMemory,
    take: fn(usize) -> bool,
}

impl MigrateDriver for Driver<'_> {
    fn alloc_and_copy(&self, _: PageRange, entries: &mut [MigrateEntry], _: &[bool]) {
        let mut pool = self.mem.pool().lock();
        for (k, e) in entries.iter_mut().enumerate() {
            if e.migrates() && (self.take)(k) {
                let frame = pool.alloc_page().expect("test device has room");
                e.dst = Some(PageLoc::Device {
                    dev: self.mem.id(),
                    frame,
                });
            }
        }
    }
    fn finalize(&self, _: PageRange, _: &[MigrateEntry]) {}
}

fn setup(npages: u64) -> (&'static Arc<AddressSpace>, Arc<TestDevice>, PageRange) {
    let mm = AddressSpace::current().unwrap();
    let dev = mm
        .attach_device(|id: DeviceId| {
            let mem = DeviceMemory::new(id, OWNER, MemoryKind::DevicePrivate, 8 << 20)
                .map_err(hetmem::MmError::from)?;
            Ok(Arc::new(TestDevice { mem: Arc::new(mem) }))
        })
        .unwrap();
    let range = mm
        .map_anonymous(npages * PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let pattern: Vec<u8> = (0..range.len_bytes()).map(|i| (i / 7) as u8).collect();
    mm.cpu_write(range.start(), &pattern).unwrap();
    (mm, dev, range)
}

fn pattern_intact(mm: &AddressSpace, range: PageRange) {
    let mut buf = vec![0u8; range.len_bytes() as usize];
    // Touch every page from the CPU first: device pages come back through the fault path.
    for a in range.pages() {
        hetmem::cpu_touch(a).unwrap();
    }
    mm.cpu_read(range.start(), &mut buf).unwrap();
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(*b, (i / 7) as u8, "byte {i} lost");
    }
}

fn location(mm: &AddressSpace, a: VirtAddr) -> Location {
    let r = mm.region_of(a).unwrap();
    r.states.get(r.index(a)).location
}

fn args(range: PageRange) -> MigrateArgs {
    MigrateArgs {
        range,
        select: SelectFlags::SYSTEM,
        owner: OWNER,
        fault_page: None,
    }
}

#[test]
fn dropping_a_collected_migration_rolls_every_page_back() {
    let (mm, dev, range) = setup(16);
    {
        let mut m = MigrateVma::setup(mm, args(range)).unwrap();
        assert_eq!(m.cpages(), 16, "every populated page is collected");
        m.alloc_and_copy(&Driver {
            mem: &dev.mem,
            take: |_| true,
        });
        assert_eq!(dev.mem.pool().lock().stats().pages_in_use, 16);
        // Dropped here, before `pages()`: nothing was committed.
    }
    assert_eq!(
        dev.mem.pool().lock().stats().pages_in_use,
        0,
        "destination frames freed by the rollback"
    );
    for a in range.pages() {
        assert_eq!(
            location(mm, a),
            Location::System,
            "{a} stayed in system memory"
        );
    }
    // Unlocked: the next migration collects every page again.
    let again = MigrateVma::setup(mm, args(range)).unwrap();
    assert_eq!(again.cpages(), 16);
    drop(again);
    mm.check_invariants().unwrap();
    pattern_intact(mm, range);
}

#[test]
fn partial_migration_reports_why_each_page_stayed() {
    let (mm, dev, range) = setup(16);
    // Pages 4..8 are held by another migration in flight: they are skipped as locked.
    let held = PageRange::from_pages(range.page(4).0, 4).unwrap();
    let other = MigrateVma::setup(mm, args(held)).unwrap();
    assert_eq!(other.cpages(), 4);

    let mut m = MigrateVma::setup(mm, args(range)).unwrap();
    // The driver declines odd pages (no destination: a failed device allocation).
    m.alloc_and_copy(&Driver {
        mem: &dev.mem,
        take: |k| k % 2 == 0,
    });
    let committed = m.pages();
    let entries = committed.entries().to_vec();
    let summary = committed.finalize();
    drop(other);

    for (k, e) in entries.iter().enumerate() {
        let a = range.page(k as u64);
        let want = if (4..8).contains(&k) {
            Some(SkipReason::Locked)
        } else if k % 2 == 1 {
            Some(SkipReason::NoDestination)
        } else {
            None
        };
        assert_eq!(e.skipped, want, "page {k}: reason");
        assert_eq!(e.migrates(), want.is_none(), "page {k}: MIGRATE flag");
        let on_device = matches!(location(mm, a), Location::Device { .. });
        assert_eq!(on_device, want.is_none(), "page {k}: location");
    }
    let moved = entries.iter().filter(|e| e.migrates()).count() as u64;
    assert_eq!(moved, 6, "pages 0, 2, 8, 10, 12, 14");
    assert_eq!(summary.migrated, moved);
    assert_eq!(dev.mem.pool().lock().stats().pages_in_use, moved);
    mm.check_invariants().unwrap();
    // Every byte is where the CPU can read it: device pages fault back.
    pattern_intact(mm, range);
    assert_eq!(dev.mem.pool().lock().stats().pages_in_use, 0);
    mm.check_invariants().unwrap();
}

#[test]
fn shared_pages_and_foreign_device_pages_are_not_collected() {
    let (mm, dev, range) = setup(4);
    let shared = mm
        .map_anonymous(4 * PAGE_SIZE, Prot::READ | Prot::WRITE, true)
        .unwrap();
    mm.cpu_write(shared.start(), &[1u8; 4 * PAGE_SIZE as usize])
        .unwrap();
    let m = MigrateVma::setup(mm, args(shared)).unwrap();
    assert_eq!(m.cpages(), 0);
    assert!(m
        .entries()
        .iter()
        .all(|e| e.skipped == Some(SkipReason::Shared)));
    drop(m);

    // Move the private range to the device, then ask for system pages only: nothing selected.
    let mut m = MigrateVma::setup(mm, args(range)).unwrap();
    m.alloc_and_copy(&Driver {
        mem: &dev.mem,
        take: |_| true,
    });
    m.pages().finalize();
    let m = MigrateVma::setup(mm, args(range)).unwrap();
    assert_eq!(m.cpages(), 0, "device pages are not SELECT_SYSTEM");
    assert!(m
        .entries()
        .iter()
        .all(|e| e.skipped == Some(SkipReason::NotSelected)));
    drop(m);
    // Another owner's private selection does not see them either.
    let m = MigrateVma::setup(
        mm,
        MigrateArgs {
            range,
            select: SelectFlags::DEVICE_PRIVATE,
            owner: Owner(0xdead),
            fault_page: None,
        },
    )
    .unwrap();
    assert_eq!(
        m.cpages(),
        0,
        "a foreign owner's device pages are not collected"
    );
    drop(m);
    pattern_intact(mm, range);
    mm.check_invariants().unwrap();
}

#[test]
fn migration_outside_managed_memory_is_a_typed_error() {
    let (mm, _dev, range) = setup(2);
    let outside = PageRange::new(range.end().0 + (1 << 30), PAGE_SIZE).unwrap();
    assert!(matches!(
        MigrateVma::setup(mm, args(outside)),
        Err(MigrateError::NotManaged { .. })
    ));
    // Straddling the end of a region is not inside one region either.
    let straddle = PageRange::new(range.start().0, range.len_bytes() + PAGE_SIZE).unwrap();
    assert!(matches!(
        MigrateVma::setup(mm, args(straddle)),
        Err(MigrateError::NotManaged { .. })
    ));
}

#[test]
fn devices_sharing_an_owner_each_get_their_pages_back_on_cpu_faults() {
    // Two devices of one driver share the owner cookie (the kernel's pgmap_owner): a CPU fault on
    // a page of either must bring it back (selecting by owner, not by "the" device of an owner).
    let (mm, first, range) = setup(8);
    let (_, second, _) = setup(1);
    assert_ne!(first.mem.id(), second.mem.id());
    let lower = PageRange::from_pages(range.start().0, 4).unwrap();
    let upper = PageRange::from_pages(range.page(4).0, 4).unwrap();
    for (dev, part) in [(&second, lower), (&first, upper)] {
        let mut m = MigrateVma::setup(mm, args(part)).unwrap();
        m.alloc_and_copy(&Driver {
            mem: &dev.mem,
            take: |_| true,
        });
        assert_eq!(m.pages().finalize().migrated, 4);
    }
    for a in range.pages() {
        assert!(matches!(location(mm, a), Location::Device { .. }));
    }
    pattern_intact(mm, range);
    for a in range.pages() {
        assert_eq!(location(mm, a), Location::System, "{a} came back");
    }
    mm.check_invariants().unwrap();
}

const OWNER_B: Owner = Owner(0x7e57_000b);

/// A second device, of another owner.
fn attach(owner: Owner) -> Arc<TestDevice> {
    AddressSpace::current()
        .unwrap()
        .attach_device(|id: DeviceId| {
            let mem = DeviceMemory::new(id, owner, MemoryKind::DevicePrivate, 8 << 20)
                .map_err(hetmem::MmError::from)?;
            Ok(Arc::new(TestDevice { mem: Arc::new(mem) }))
        })
        .unwrap()
}

/// Device pages of `OWNER` in `range`.
fn owned(range: PageRange) -> MigrateArgs {
    MigrateArgs {
        range,
        select: SelectFlags::DEVICE_PRIVATE,
        owner: OWNER,
        fault_page: None,
    }
}

/// Moves every page of `range` to `dev` (from system memory).
fn to_device(mm: &AddressSpace, dev: &TestDevice, range: PageRange) {
    let mut m = MigrateVma::setup(mm, args(range)).unwrap();
    m.alloc_and_copy(&Driver {
        mem: &dev.mem,
        take: |_| true,
    });
    assert_eq!(m.pages().finalize().migrated, range.npages());
}

/// The bytes of page `k` of the pattern `setup` writes.
fn pattern_page(k: u64) -> Vec<u8> {
    let off = (k * PAGE_SIZE) as usize;
    (off..off + PAGE_SIZE as usize)
        .map(|i| (i / 7) as u8)
        .collect()
}

fn frame_holds(mem: &DeviceMemory, frame: hetmem_core::DevPfn, want: &[u8]) -> bool {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    mem.arena()
        .read(DeviceMemory::frame_offset(frame), &mut buf)
        .unwrap();
    buf == want
}

#[test]
fn pages_move_between_devices_with_the_default_synchronous_copy() {
    let (mm, a, range) = setup(8);
    let b = attach(OWNER_B);
    to_device(mm, &a, range);
    let before = mm.stats();
    let (a0, b0) = (a.mem.pool().lock().stats(), b.mem.pool().lock().stats());

    // `Driver` does not override `copy_peer`: the default copies arena to arena.
    let mut m = MigrateVma::setup(mm, owned(range)).unwrap();
    assert_eq!(m.cpages(), 8);
    m.alloc_and_copy(&Driver {
        mem: &b.mem,
        take: |_| true,
    });
    let summary = m.pages().finalize();

    assert_eq!(summary.migrated, 8);
    for (k, p) in range.pages().enumerate() {
        let Location::Device {
            dev,
            frame,
            coherent: false,
        } = location(mm, p)
        else {
            panic!("page {k} is not on a device");
        };
        assert_eq!(dev, b.mem.id(), "page {k} is B's");
        assert!(
            frame_holds(&b.mem, frame, &pattern_page(k as u64)),
            "page {k}'s bytes"
        );
    }
    let (a1, b1) = (a.mem.pool().lock().stats(), b.mem.pool().lock().stats());
    assert_eq!(a1.pages_in_use, 0, "A's frames freed");
    assert_eq!(a1.page_out - a0.page_out, 8);
    assert_eq!(b1.pages_in_use, 8);
    assert_eq!(b1.page_in - b0.page_in, 8);
    assert_eq!(
        mm.stats().pages_device_to_device - before.pages_device_to_device,
        8
    );
    assert_eq!(mm.stats().pages_to_system, before.pages_to_system);
    mm.check_invariants().unwrap();
    pattern_intact(mm, range);
    assert_eq!(b.mem.pool().lock().stats().pages_in_use, 0);
    mm.check_invariants().unwrap();
}

/// `Driver`, whose device-to-device copy reports only the first `copied` pages of each run.
struct PartialCopy<'a> {
    inner: Driver<'a>,
    copied: u64,
}

impl MigrateDriver for PartialCopy<'_> {
    fn alloc_and_copy(&self, range: PageRange, entries: &mut [MigrateEntry], compound: &[bool]) {
        self.inner.alloc_and_copy(range, entries, compound);
    }
    fn finalize(&self, _: PageRange, _: &[MigrateEntry]) {}
    fn copy_peer(&self, mm: &AddressSpace, runs: &[PeerRun]) -> PeerCopy {
        let done = hetmem::migrate::copy_peer_runs(mm, runs);
        PeerCopy::Done(done.iter().map(|&n| n.min(self.copied)).collect())
    }
}

#[test]
fn pages_whose_copy_failed_stay_on_the_source_device() {
    let (mm, a, range) = setup(8);
    let b = attach(OWNER_B);
    to_device(mm, &a, range);
    let held: Vec<_> = range.pages().map(|p| location(mm, p)).collect();

    let mut m = MigrateVma::setup(mm, owned(range)).unwrap();
    m.alloc_and_copy(&PartialCopy {
        inner: Driver {
            mem: &b.mem,
            take: |_| true,
        },
        copied: 3,
    });
    let c = m.pages();
    let entries = c.entries().to_vec();
    let summary = c.finalize();

    assert_eq!(summary.migrated, 3, "one run, its first three pages copied");
    for (k, e) in entries.iter().enumerate() {
        let p = range.page(k as u64);
        if k < 3 {
            assert!(e.migrates(), "page {k} moved");
            assert!(matches!(location(mm, p), Location::Device { dev, .. } if dev == b.mem.id()));
        } else {
            assert_eq!(e.skipped, Some(SkipReason::CopyFailed), "page {k}");
            assert_eq!(
                location(mm, p),
                held[k],
                "page {k} stayed in its frame on A"
            );
            let Location::Device { frame, .. } = held[k] else {
                unreachable!()
            };
            assert!(
                frame_holds(&a.mem, frame, &pattern_page(k as u64)),
                "page {k} intact"
            );
        }
    }
    assert_eq!(a.mem.pool().lock().stats().pages_in_use, 5);
    assert_eq!(
        b.mem.pool().lock().stats().pages_in_use,
        3,
        "B's frames for the pages that did not copy were freed"
    );
    mm.check_invariants().unwrap();
    pattern_intact(mm, range);
    assert_eq!(a.mem.pool().lock().stats().pages_in_use, 0);
    assert_eq!(b.mem.pool().lock().stats().pages_in_use, 0);
    mm.check_invariants().unwrap();
}

/// Found by the fuzz smoke run (input 134, mprotect backend): the kernel reports one discard once
/// per VMA it crosses, and the mprotect backend leaves VMAs split where pages came back at
/// different times (their anonymous memory cannot merge). A migration's own discard of such a
/// range came back as two REMOVE events; the first used up the mark that says "hetmem's own",
/// the second was taken for the program's madvise and dropped the pages just migrated (they
/// read zero afterwards).
#[test]
fn a_migration_whose_discard_crosses_vmas_keeps_every_page() {
    let (mm, dev, _) = setup(1);
    // Untouched memory: its VMA has no anonymous memory yet.
    let range = mm
        .map_anonymous(6 * PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let part = |first: u64, n: u64| PageRange::from_pages(range.page(first).0, n).unwrap();
    // Through another device, so that `dev`'s frames for the whole range are one run.
    to_device(mm, &attach(OWNER), part(2, 2));
    // Both sides get anonymous memory of their own while the middle is away; the middle, back
    // through CPU faults, joins one of them, and the kernel keeps two VMAs.
    let pattern: Vec<u8> = (0..range.len_bytes()).map(|i| (i / 7) as u8).collect();
    let bytes = |p: PageRange| {
        let off = (p.start().0 - range.start().0) as usize;
        &pattern[off..off + p.len_bytes() as usize]
    };
    for p in [part(4, 2), part(0, 2), part(2, 2)] {
        mm.cpu_write(p.start(), bytes(p)).unwrap();
    }
    let vmas = hetmem_sys::maps::read_maps_range(range.start().as_usize(), range.end().as_usize())
        .unwrap()
        .len();
    let discards = mm.stats().program_discards;
    to_device(mm, &dev, range);
    mm.sync_events();
    // Whether the stray event reached the pages depended on timing (they were still locked
    // by the migration and not yet the device's); what it was taken for does not.
    assert_eq!(
        mm.stats().program_discards,
        discards,
        "the migration's own discard ({vmas} VMAs) was taken for the program's"
    );
    for a in range.pages() {
        assert!(
            matches!(location(mm, a), Location::Device { .. }),
            "{a} left the device ({vmas} VMAs): {:?}",
            location(mm, a)
        );
    }
    pattern_intact(mm, range);
    if mm.backend() == hetmem::CpuFaultBackend::Mprotect {
        assert!(
            vmas > 1,
            "the case this test is for: one VMA over the range"
        );
    }
}
