//! Device-to-device migration through the copy engine (`hetmem_sim::copy`): two mirror devices in
//! one address space, pages moved to A, then A → B with `migrate_between`. Checks the data (via
//! the destination's arena, the destination's own reads, and the CPU after a fault brings pages
//! home), page locations, both pools' accounting, the 2 MiB block path, injected copy failures
//! (pages stay on A, intact; no frame leaked on B), the wait on the fence before a dropped
//! migration frees anything, and that another owner's pages are not selected (DESIGN.md
//! invariant 3: a migration commits or rolls back page by page).

use std::sync::Arc;

use hetmem::{
    migrate::{MigrateArgs, MigrateVma},
    AddressSpace, DeviceMemory, MigrateError, Prot,
};
use hetmem_core::{
    copy_engine::{
        CopyBackend, CopyDirection, CopyEngine, CopyEngineConfig, CopyFault, CopyWindow, Endpoint,
        FaultPlan,
    },
    link::DeviceClock,
    migrate::{SelectFlags, SkipReason},
    page_state::Location,
    pool::{MemoryKind, PoolStats},
    DevPfn, DeviceId, PageRange, VirtAddr, HUGE_PAGE_SIZE, PAGE_SIZE,
};
use hetmem_sim::{
    migrate_between, mirror::DEFAULT_CAPACITY_FOR_TESTS, DmirrorDevice, Mirror, PeerDriver,
    SimCopyBackend,
};
use parking_lot::{Condvar, Mutex};

fn mm() -> &'static Arc<AddressSpace> {
    AddressSpace::current().expect("hetmem address space")
}

/// A private mirror device and an open mirror on it.
fn device() -> (Arc<DmirrorDevice>, Mirror) {
    let dev = DmirrorDevice::new(MemoryKind::DevicePrivate, DEFAULT_CAPACITY_FOR_TESTS).unwrap();
    let m = dev.open().unwrap();
    (dev, m)
}

fn mem(dev: &DmirrorDevice) -> &DeviceMemory {
    use hetmem::Device;
    dev.memory()
}

/// The byte at offset `i` of a buffer filled with `seed`'s pattern.
fn byte(seed: u8, i: usize) -> u8 {
    (i / 7) as u8 ^ seed
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len as usize).map(|i| byte(seed, i)).collect()
}

/// `npages` of managed memory holding `seed`'s pattern.
fn buffer(npages: u64, seed: u8) -> PageRange {
    let mm = mm();
    let range = mm
        .map_anonymous(npages * PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    mm.cpu_write(range.start(), &pattern(seed, range.len_bytes()))
        .unwrap();
    range
}

fn location(a: VirtAddr) -> Location {
    let r = mm().region_of(a).unwrap();
    r.states.get(r.index(a)).location
}

/// The frame of `dev` holding page `a` (panics when it is elsewhere).
fn frame_on(a: VirtAddr, dev: DeviceId) -> DevPfn {
    match location(a) {
        Location::Device {
            dev: d,
            frame,
            coherent: false,
        } if d == dev => frame,
        other => panic!("{a} is at {other:?}, not on {dev:?}"),
    }
}

/// The bytes of `frame` in `mem`'s arena.
fn frame_bytes(mem: &DeviceMemory, frame: DevPfn) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    mem.arena()
        .read(DeviceMemory::frame_offset(frame), &mut buf)
        .unwrap();
    buf
}

/// Asserts that page `k` of `range` is on `dev`'s private memory with `seed`'s bytes.
fn page_on_device_intact(range: PageRange, k: u64, dev: &DmirrorDevice, seed: u8) {
    let frame = frame_on(range.page(k), dev.id());
    let off = (k * PAGE_SIZE) as usize;
    let want: Vec<u8> = (off..off + PAGE_SIZE as usize)
        .map(|i| byte(seed, i))
        .collect();
    assert!(
        frame_bytes(mem(dev), frame) == want,
        "page {k}: {dev:?}'s frame {frame:?} holds other bytes"
    );
}

/// Touches every page from the CPU (device pages fault home), then checks every byte.
fn cpu_sees_pattern(range: PageRange, seed: u8) {
    for a in range.pages() {
        hetmem::cpu_touch(a).unwrap();
    }
    let mut buf = vec![0u8; range.len_bytes() as usize];
    mm().cpu_read(range.start(), &mut buf).unwrap();
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(*b, byte(seed, i), "byte {i} lost");
    }
}

fn engine_with(config: CopyEngineConfig) -> CopyEngine {
    let backend: Arc<dyn CopyBackend> = Arc::new(SimCopyBackend::new(mm()));
    CopyEngine::new(config, backend, Arc::new(DeviceClock::new())).unwrap()
}

fn engine() -> CopyEngine {
    engine_with(CopyEngineConfig::default())
}

fn pool(dev: &DmirrorDevice) -> PoolStats {
    dev.pool_stats()
}

#[test]
fn pages_move_from_one_device_to_another_through_the_copy_engine() {
    let (a, ma) = device();
    let (b, mb) = device();
    let engine = engine();
    let range = buffer(16, 0x11);
    let (a0, b0) = (pool(&a), pool(&b));
    let mut scratch = vec![0u8; range.len_bytes() as usize];
    ma.migrate_to_dev(range.start().0, 16, &mut scratch)
        .unwrap();
    for k in 0..16 {
        page_on_device_intact(range, k, &a, 0x11);
    }
    assert_eq!(ma.pt_len(), 16, "A maps the pages it holds");
    let before = mm().stats();

    let (summary, entries) = migrate_between(mm(), range, mem(&a), mem(&b), &engine).unwrap();

    assert_eq!(summary.migrated, 16);
    assert_eq!(summary.migrated_valid, 16);
    assert!(entries.iter().all(|e| e.migrates() && e.skipped.is_none()));
    for k in 0..16 {
        page_on_device_intact(range, k, &b, 0x11);
        let r = mm().region_of(range.page(k)).unwrap();
        assert!(
            r.states.get(r.index(range.page(k))).write,
            "page {k} keeps its write bit"
        );
    }
    let (a1, b1) = (pool(&a), pool(&b));
    assert_eq!(
        a1.pages_in_use, a0.pages_in_use,
        "A's pool is back to its baseline"
    );
    assert_eq!(a1.page_out - a0.page_out, 16);
    assert_eq!(b1.pages_in_use - b0.pages_in_use, 16, "B holds the pages");
    assert_eq!(b1.page_in - b0.page_in, 16);
    assert_eq!(
        mm().stats().pages_device_to_device - before.pages_device_to_device,
        16
    );
    // The bytes went through the engine, as peer-to-peer windows.
    let stats = engine.stats().direction(CopyDirection::PeerToPeer);
    assert_eq!(stats.bytes, 16 * PAGE_SIZE);
    // The invalidation was tagged with B's owner: A's mirror dropped its stale mappings of
    // frames it no longer holds.
    assert_eq!(ma.pt_len(), 0, "A's mappings of the range are gone");
    mm().check_invariants().unwrap();

    // B reads its own pages where they are (no migration).
    let mut read = vec![0u8; range.len_bytes() as usize];
    mb.read(range.start().0, 16, &mut read).unwrap();
    assert!(read == pattern(0x11, range.len_bytes()), "B reads the data");
    assert_eq!(pool(&b).pages_in_use - b0.pages_in_use, 16);

    cpu_sees_pattern(range, 0x11);
    for a in range.pages() {
        assert_eq!(location(a), Location::System, "{a} came home through B");
    }
    assert_eq!(pool(&b).pages_in_use, b0.pages_in_use);
    mm().check_invariants().unwrap();
}

#[test]
fn a_2mib_block_moves_whole_between_devices() {
    let (a, ma) = device();
    let (b, _mb) = device();
    let engine = engine();
    let mm = mm();
    let range = mm
        .map_anonymous_aligned(HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, Prot::READ | Prot::WRITE)
        .unwrap();
    let n = range.npages();
    // An untouched block migrates whole (an empty PMD), then A's device writes the pattern.
    let mut scratch = vec![0u8; range.len_bytes() as usize];
    ma.migrate_to_dev(range.start().0, n, &mut scratch).unwrap();
    ma.write(range.start().0, n, &pattern(0x5a, range.len_bytes()))
        .unwrap();
    let r = mm.region_of(range.start()).unwrap();
    for p in range.pages() {
        assert!(
            r.states.get(r.index(p)).huge,
            "{p} is part of A's 2 MiB block"
        );
    }
    let b0 = pool(&b);

    let (summary, _) = migrate_between(mm, range, mem(&a), mem(&b), &engine).unwrap();

    assert_eq!(summary.migrated, n);
    let base = frame_on(range.start(), b.id());
    assert_eq!(base.0 % 512, 0, "B gave a whole 2 MiB block");
    for k in 0..n {
        assert_eq!(frame_on(range.page(k), b.id()), DevPfn(base.0 + k as u32));
        assert!(
            r.states.get(r.index(range.page(k))).huge,
            "page {k} stays huge"
        );
        page_on_device_intact(range, k, &b, 0x5a);
    }
    assert_eq!(
        engine.stats().direction(CopyDirection::PeerToPeer).windows,
        1,
        "one run, one window"
    );
    assert_eq!(pool(&a).pages_in_use, 0);
    assert_eq!(pool(&b).pages_in_use - b0.pages_in_use, n);
    mm.check_invariants().unwrap();

    // One CPU touch brings the whole block home from B.
    hetmem::cpu_touch(range.page(7)).unwrap();
    for p in range.pages() {
        assert_eq!(
            location(p),
            Location::System,
            "{p} came home with its block"
        );
    }
    cpu_sees_pattern(range, 0x5a);
    assert_eq!(pool(&b).pages_in_use, b0.pages_in_use);
    mm.check_invariants().unwrap();
}

#[test]
fn a_failed_copy_leaves_exactly_the_uncopied_pages_on_the_source_device() {
    let (a, ma) = device();
    let (b, _mb) = device();
    // One window per page; the fourth window of the peer queue fails.
    let config = CopyEngineConfig {
        window_bytes: PAGE_SIZE,
        ..CopyEngineConfig::default()
    };
    let engine = engine_with(config);
    let queue = engine.queue_for(CopyDirection::PeerToPeer);
    engine
        .set_fault_plan(FaultPlan::Nth { queue, n: 3 })
        .unwrap();
    let range = buffer(8, 0x33);
    let mut scratch = vec![0u8; range.len_bytes() as usize];
    ma.migrate_to_dev(range.start().0, 8, &mut scratch).unwrap();
    let frames: Vec<DevPfn> = range.pages().map(|p| frame_on(p, a.id())).collect();
    // A fresh pool hands out ascending frames: the eight pages are one run, one request.
    assert!(frames.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    let b0 = pool(&b);

    let (summary, entries) = migrate_between(mm(), range, mem(&a), mem(&b), &engine).unwrap();

    assert_eq!(summary.migrated, 3, "pages before the failed window moved");
    for (k, e) in entries.iter().enumerate() {
        if k < 3 {
            assert!(e.migrates(), "page {k} moved");
            page_on_device_intact(range, k as u64, &b, 0x33);
        } else {
            assert_eq!(e.skipped, Some(SkipReason::CopyFailed), "page {k}");
            assert_eq!(frame_on(range.page(k as u64), a.id()), frames[k]);
            page_on_device_intact(range, k as u64, &a, 0x33);
        }
    }
    let (a1, b1) = (pool(&a), pool(&b));
    assert_eq!(a1.pages_in_use, 5, "A keeps the pages that did not copy");
    assert_eq!(b1.pages_in_use - b0.pages_in_use, 3, "no frame leaked on B");
    assert_eq!(b1.calloc - b0.calloc, 8, "B had allocated a frame per page");
    mm().check_invariants().unwrap();

    // Every page fails now: nothing moves, nothing leaks.
    engine
        .set_fault_plan(FaultPlan::Fraction {
            seed: 1,
            per_million: 1_000_000,
        })
        .unwrap();
    let (summary, entries) = migrate_between(mm(), range, mem(&a), mem(&b), &engine).unwrap();
    assert_eq!(summary.migrated, 0);
    assert!(entries[3..]
        .iter()
        .all(|e| e.skipped == Some(SkipReason::CopyFailed)));
    assert!(
        entries[..3]
            .iter()
            .all(|e| e.skipped == Some(SkipReason::NotSelected)),
        "B's own pages are not A's to move"
    );
    assert_eq!(pool(&a).pages_in_use, 5);
    assert_eq!(pool(&b).pages_in_use - b0.pages_in_use, 3);
    mm().check_invariants().unwrap();

    cpu_sees_pattern(range, 0x33);
    assert_eq!(pool(&a).pages_in_use, 0);
    assert_eq!(pool(&b).pages_in_use, b0.pages_in_use);
    mm().check_invariants().unwrap();
}

#[test]
fn another_owners_pages_are_not_selected() {
    let (a, ma) = device();
    let (b, _mb) = device();
    let (c, mc) = device();
    assert_ne!(a.owner(), c.owner());
    let engine = engine();
    let range = buffer(12, 0x77);
    let mut scratch = vec![0u8; 4 * PAGE_SIZE as usize];
    mc.migrate_to_dev(range.start().0, 4, &mut scratch).unwrap();
    ma.migrate_to_dev(range.page(4).0, 4, &mut scratch).unwrap();

    let (summary, entries) = migrate_between(mm(), range, mem(&a), mem(&b), &engine).unwrap();

    assert_eq!(summary.migrated, 4);
    for (k, e) in entries.iter().enumerate() {
        let a_page = (4..8).contains(&k);
        assert_eq!(e.migrates(), a_page, "page {k}");
        if !a_page {
            assert_eq!(e.skipped, Some(SkipReason::NotSelected), "page {k}");
        }
    }
    for k in 0..4 {
        page_on_device_intact(range, k, &c, 0x77);
    }
    for k in 4..8 {
        page_on_device_intact(range, k, &b, 0x77);
    }
    for k in 8..12 {
        assert_eq!(location(range.page(k)), Location::System);
    }
    assert_eq!(pool(&a).pages_in_use, 0);
    mm().check_invariants().unwrap();
    cpu_sees_pattern(range, 0x77);
    mm().check_invariants().unwrap();
}

#[test]
fn migration_between_a_device_and_itself_or_a_detached_one_is_refused() {
    let (a, _ma) = device();
    let range = buffer(1, 0);
    let engine = engine();
    assert!(matches!(
        migrate_between(mm(), range, mem(&a), mem(&a), &engine),
        Err(MigrateError::PeerUnsupported { .. })
    ));
    let loose = DeviceMemory::new(
        DeviceId(200),
        hetmem_core::Owner(0x1005e),
        MemoryKind::DevicePrivate,
        2 << 20,
    )
    .unwrap();
    assert!(matches!(
        migrate_between(mm(), range, mem(&a), &loose, &engine),
        Err(MigrateError::NoDevice(DeviceId(200)))
    ));
}

/// A backend whose windows wait for a gate, recording whether each window's destination frames
/// were still allocated on the destination device when it wrote them.
struct GatedBackend {
    inner: SimCopyBackend,
    gate: Mutex<bool>,
    opened: Condvar,
    started: Mutex<u64>,
    start_seen: Condvar,
    freed_under_copy: Mutex<u64>,
}

impl GatedBackend {
    fn open(&self) {
        *self.gate.lock() = true;
        self.opened.notify_all();
    }
}

impl CopyBackend for GatedBackend {
    fn copy(&self, w: &CopyWindow) -> Result<(), CopyFault> {
        *self.started.lock() += 1;
        self.start_seen.notify_all();
        let mut open = self.gate.lock();
        while !*open {
            self.opened.wait(&mut open);
        }
        drop(open);
        let result = self.inner.copy(w);
        if let Endpoint::Device { dev, .. } = w.dst {
            let d = mm().device(dev).unwrap();
            let pool = d.memory().pool().lock();
            let first = (w.dst_addr() / PAGE_SIZE) as u32;
            let pages = w.len.div_ceil(PAGE_SIZE) as u32;
            if (first..first + pages).any(|f| !pool.is_allocated(DevPfn(f))) {
                *self.freed_under_copy.lock() += 1;
            }
        }
        result
    }
}

#[test]
fn a_dropped_migration_waits_for_its_copy_before_freeing_frames() {
    let (a, ma) = device();
    let (b, _mb) = device();
    let backend = Arc::new(GatedBackend {
        inner: SimCopyBackend::new(mm()),
        gate: Mutex::new(false),
        opened: Condvar::new(),
        started: Mutex::new(0),
        start_seen: Condvar::new(),
        freed_under_copy: Mutex::new(0),
    });
    let engine = CopyEngine::new(
        CopyEngineConfig::default(),
        backend.clone(),
        Arc::new(DeviceClock::new()),
    )
    .unwrap();
    let range = buffer(4, 0x42);
    let mut scratch = vec![0u8; range.len_bytes() as usize];
    ma.migrate_to_dev(range.start().0, 4, &mut scratch).unwrap();
    let b0 = pool(&b);
    let args = MigrateArgs {
        range,
        select: SelectFlags::DEVICE_PRIVATE,
        owner: a.owner(),
        fault_page: None,
    };
    let mut m = MigrateVma::setup_peer(mm(), args, b.owner()).unwrap();
    m.alloc_and_copy(&PeerDriver::new(mem(&a), mem(&b), &engine));
    assert_eq!(pool(&b).pages_in_use - b0.pages_in_use, 4);
    // The gate opens once the copy has started; the migration is dropped, not committed, while
    // the copy may still be waiting at the gate.
    let opener = {
        let backend = Arc::clone(&backend);
        std::thread::spawn(move || {
            let mut started = backend.started.lock();
            while *started == 0 {
                backend.start_seen.wait(&mut started);
            }
            drop(started);
            backend.open();
        })
    };
    drop(m);
    opener.join().unwrap();
    assert_eq!(
        engine.stats().direction(CopyDirection::PeerToPeer).bytes,
        4 * PAGE_SIZE,
        "the copy finished before the drop returned"
    );
    assert_eq!(
        *backend.freed_under_copy.lock(),
        0,
        "no frame freed under its copy"
    );
    assert_eq!(
        pool(&b).pages_in_use,
        b0.pages_in_use,
        "B's frames freed after"
    );
    for k in 0..4 {
        page_on_device_intact(range, k, &a, 0x42);
    }
    mm().check_invariants().unwrap();
    cpu_sees_pattern(range, 0x42);
}

#[test]
fn the_sim_backend_copies_between_system_memory_and_arenas() {
    use hetmem_core::copy_engine::{CopyBatch, CopyRequest, RequestOutcome};
    let (b, _mb) = device();
    let engine = engine_with(CopyEngineConfig {
        window_bytes: 3 * PAGE_SIZE,
        ..CopyEngineConfig::default()
    });
    let src = buffer(8, 0x3c);
    let dst = buffer(8, 0);
    let frame = mem(&b).pool().lock().alloc_huge().unwrap();
    let on_b = Endpoint::Device { dev: b.id(), frame };
    let len = src.len_bytes();
    // System → B, then B → system elsewhere: windows of three pages, the last one short.
    let fence = engine
        .submit(CopyBatch::new().with_request(CopyRequest::new(
            Endpoint::System(src.start()),
            on_b,
            len,
        )))
        .unwrap();
    assert!(fence.wait().unwrap().is_complete());
    for k in 0..8 {
        let off = (k * PAGE_SIZE) as usize;
        let want: Vec<u8> = (off..off + PAGE_SIZE as usize)
            .map(|i| byte(0x3c, i))
            .collect();
        assert!(
            frame_bytes(mem(&b), DevPfn(frame.0 + k as u32)) == want,
            "page {k}"
        );
    }
    let fence = engine
        .submit(CopyBatch::new().with_request(CopyRequest::new(
            on_b,
            Endpoint::System(dst.start()),
            len,
        )))
        .unwrap();
    assert!(fence.wait().unwrap().is_complete());
    let mut buf = vec![0u8; len as usize];
    mm().cpu_read(dst.start(), &mut buf).unwrap();
    assert!(buf == pattern(0x3c, len), "the bytes made the round trip");

    // An unmapped system address fails its request with the address that failed; the other
    // request of the batch completes.
    let hole = VirtAddr(PAGE_SIZE); // never mapped
    let mut batch = CopyBatch::new();
    batch.push(CopyRequest::new(Endpoint::System(hole), on_b, PAGE_SIZE));
    batch.push(CopyRequest::new(
        Endpoint::System(src.start()),
        Endpoint::Device {
            dev: b.id(),
            frame: DevPfn(frame.0 + 8),
        },
        PAGE_SIZE,
    ));
    let report = engine.submit(batch).unwrap().wait().unwrap();
    assert!(matches!(
        report.outcome(0),
        Some(RequestOutcome::Failed {
            offset: 0,
            fault: CopyFault::SystemAccess { addr, .. },
        }) if *addr == hole
    ));
    assert!(report.outcome(1).unwrap().is_done());
    // A device the address space does not know fails as such.
    let report = engine
        .submit(CopyBatch::new().with_request(CopyRequest::new(
            Endpoint::Device {
                dev: DeviceId(250),
                frame: DevPfn(0),
            },
            on_b,
            PAGE_SIZE,
        )))
        .unwrap()
        .wait()
        .unwrap();
    assert!(matches!(
        report.outcome(0),
        Some(RequestOutcome::Failed {
            fault: CopyFault::NoSuchDevice { .. },
            ..
        })
    ));
    mem(&b).pool().lock().free_huge(frame).unwrap();
}
