//! Several devices in one context (issue 4, "Several devices"): a device's faults pull pages
//! another device holds straight into its memory (device to device, never through system memory),
//! prefetch does the same, data survives pages ping-ponging between two devices and the CPU,
//! per-device statistics credit each device with its own work, an owner's pages are invisible to
//! another device's snapshot (as the kernel's `hmm_range_fault` hides another owner's
//! device-private pages: hmm-tests' `hmm2.snapshot`), suspend brings everything home, and the
//! per-device memory limit holds on both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use hetmem::AddressSpace;
use hetmem_core::{
    link::LinkModel,
    notifier::{IntervalNotifier, IntervalNotifierOps, NotifierRange},
    pfn::HmmPfn,
    range_fault::{HmmRange, RangeFaultError},
    DeviceId, Owner, PageRange, PAGE_SIZE,
};
use hetmem_runtime::{Attr, Context, DeviceStats, Managed, Processor};
use hetmem_sim::accel::{AccelConfig, Kernel, Miss, Thread};

fn device(mib: u64) -> AccelConfig {
    AccelConfig {
        memory_bytes: mib << 20,
        compute_units: 2,
        link: LinkModel::off(),
        ..AccelConfig::default()
    }
}

/// A context with two devices of `mib` MiB each.
fn two(mib: u64) -> (Context, DeviceId, DeviceId) {
    let c = Context::builder()
        .device(device(mib))
        .device(device(mib))
        .build()
        .unwrap();
    let d = c.devices();
    assert_eq!(d.len(), 2);
    assert_ne!(d[0], d[1]);
    (c, d[0], d[1])
}

fn on(c: &Context, r: PageRange, p: Processor) -> u64 {
    c.residency(r)
        .iter()
        .filter(|(_, q)| *q == p)
        .map(|(r, _)| r.npages())
        .sum()
}

fn stats(c: &Context, d: DeviceId) -> DeviceStats {
    c.device_stats(d).unwrap()
}

/// Runs `f(i, x[i]) -> x[i]` over every u32 of `x` on device `dev`.
fn map_on(
    c: &Context,
    dev: DeviceId,
    x: &Managed,
    f: impl Fn(u64, u32) -> u32 + Send + Sync + 'static,
) {
    let base = x.addr();
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let v = t.load_u32(base + 4 * i)?;
        t.store_u32(base + 4 * i, f(i, v))
    };
    let k: Arc<dyn Kernel> = Arc::new(k);
    c.launch(dev, k, x.len() / 4).unwrap().wait().unwrap();
}

/// Writes `f(i)` to every u32 of `x` on device `dev`, reading nothing.
fn write_on(
    c: &Context,
    dev: DeviceId,
    x: &Managed,
    f: impl Fn(u64) -> u32 + Send + Sync + 'static,
) {
    let base = x.addr();
    let k =
        move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> { t.store_u32(base + 4 * i, f(i)) };
    let k: Arc<dyn Kernel> = Arc::new(k);
    c.launch(dev, k, x.len() / 4).unwrap().wait().unwrap();
}

/// FNV-1a over the bytes of `v`.
fn checksum(v: &[u32]) -> u64 {
    v.iter()
        .flat_map(|x| x.to_ne_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// Asserts that `x` holds `want`, every byte, naming the first difference.
fn assert_holds(x: &Managed, want: &[u32], what: &str) {
    let v = x.view::<u32>();
    if let Some(i) = (0..want.len()).find(|&i| v[i] != want[i]) {
        panic!("{what}: x[{i}] = {:#x}, want {:#x}", v[i], want[i]);
    }
    assert_eq!(checksum(&v), checksum(want), "{what}: checksum");
}

#[test]
fn a_second_device_pulls_the_first_devices_pages_device_to_device_and_each_is_credited() {
    let (c, d0, d1) = two(64);
    let x = c.alloc(1 << 20).unwrap();
    let pages = x.range().npages();
    // Device 0 writes every element: the pages live on device 0.
    write_on(&c, d0, &x, |i| 3 * i as u32 + 1);
    assert_eq!(on(&c, x.range(), Processor::Device(d0)), pages);
    let (s0, s1) = (stats(&c, d0), stats(&c, d1));
    assert!(s0.faults > 0 && s0.batches > 0, "{s0:?}");
    assert_eq!(s1.faults, 0, "device 1 did nothing yet: {s1:?}");
    // Device 1 reads and rewrites every element.
    map_on(&c, d1, &x, |_, v| v.wrapping_mul(2).wrapping_add(5));
    assert_eq!(on(&c, x.range(), Processor::Device(d1)), pages);
    let (t0, t1) = (stats(&c, d0), stats(&c, d1));
    eprintln!("device 0 {t0:?}\ndevice 1 {t1:?}");
    // Device 1 took every page from device 0, device to device...
    assert_eq!(t1.pages_from_peers - s1.pages_from_peers, pages, "{t1:?}");
    assert_eq!(t0.pages_out - s0.pages_out, pages, "{t0:?}");
    // ... and nothing went through system memory: device 1 took nothing from there, device 0
    // sent nothing there (no CPU fault migrated its pages back, the runtime evicted nothing).
    assert_eq!(t1.pages_from_system, s1.pages_from_system, "{t1:?}");
    assert_eq!(t0.cpu_faults, s0.cpu_faults, "{t0:?}");
    assert_eq!(t0.pages_to_system, s0.pages_to_system, "{t0:?}");
    // The work is device 1's: its faults and batches, not device 0's; device 0's frames are free.
    assert!(t1.faults > 0 && t1.batches > 0, "{t1:?}");
    assert_eq!((t0.faults, t0.batches), (s0.faults, s0.batches));
    assert_eq!(s0.pages_resident - t0.pages_resident, pages);
    assert!(t1.pages_resident >= pages);
    // The CPU sees device 1's results.
    let want: Vec<u32> = (0..x.len() / 4)
        .map(|i| (3 * i as u32 + 1).wrapping_mul(2).wrapping_add(5))
        .collect();
    assert_holds(&x, &want, "after device 1");
    let u1 = stats(&c, d1);
    assert!(
        u1.cpu_faults > t1.cpu_faults,
        "the CPU's reads faulted device 1's pages home"
    );
    assert_eq!(on(&c, x.range(), Processor::Cpu), pages);
    c.check_invariants().unwrap();
}

#[test]
fn pages_ping_pong_between_two_devices_and_the_cpu_without_losing_a_byte() {
    let (c, d0, d1) = two(64);
    // 768 KiB: one 2 MiB block or two, depending on where the mapping lands.
    let n = 3 * 64 * 1024usize;
    let mut x = c.alloc(4 * n as u64).unwrap();
    let pages = x.range().npages() as usize;
    let per_page = PAGE_SIZE as usize / 4;
    let mut model: Vec<u32> = (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    x.view_mut::<u32>().copy_from_slice(&model);
    for round in 0..6u32 {
        // Device A rewrites everything, then the CPU touches a quarter of the pages (they come
        // home), then device B rewrites everything: the pages the CPU left on A come over
        // device to device, the others from system memory. A and B swap every round.
        let (a, b) = if round % 2 == 0 { (d0, d1) } else { (d1, d0) };
        map_on(&c, a, &x, move |i, v| {
            v.wrapping_mul(3).wrapping_add(round ^ i as u32)
        });
        for (i, m) in model.iter_mut().enumerate() {
            *m = m.wrapping_mul(3).wrapping_add(round ^ i as u32);
        }
        assert_eq!(
            on(&c, x.range(), Processor::Device(a)),
            pages as u64,
            "round {round}"
        );
        {
            let mut v = x.view_mut::<u32>();
            for p in (0..pages).filter(|p| p % 4 == round as usize % 4) {
                let i = p * per_page + (round as usize * 7) % per_page;
                v[i] ^= 0xdead_beef;
                model[i] ^= 0xdead_beef;
            }
        }
        let (sa, sb) = (stats(&c, a), stats(&c, b));
        map_on(&c, b, &x, move |i, v| {
            (v ^ (i as u32).wrapping_mul(round + 1)).wrapping_add(7)
        });
        for (i, m) in model.iter_mut().enumerate() {
            *m = (*m ^ (i as u32).wrapping_mul(round + 1)).wrapping_add(7);
        }
        let (ta, tb) = (stats(&c, a), stats(&c, b));
        let touched = (0..pages).filter(|p| p % 4 == round as usize % 4).count() as u64;
        assert_eq!(
            tb.pages_from_peers - sb.pages_from_peers,
            pages as u64 - touched,
            "round {round}: what the CPU left on A came over device to device ({tb:?})"
        );
        assert_eq!(
            tb.pages_from_system - sb.pages_from_system,
            touched,
            "round {round}: what the CPU touched came from system memory ({tb:?})"
        );
        assert_eq!(ta.pages_to_system, sa.pages_to_system, "round {round}");
        assert_holds(&x, &model, &format!("round {round}"));
    }
    let (s0, s1) = (stats(&c, d0), stats(&c, d1));
    eprintln!("device 0 {s0:?}\ndevice 1 {s1:?}");
    assert!(s0.pages_from_peers > 0 && s1.pages_from_peers > 0);
    c.check_invariants().unwrap();
}

/// A subscriber that only moves the sequence (a snapshot needs a notifier to validate against).
struct Snapshotter;

impl IntervalNotifierOps for Snapshotter {
    fn invalidate(&self, sub: &IntervalNotifier, _: &NotifierRange, cur_seq: u64) -> bool {
        sub.set_seq(cur_seq);
        true
    }
}

/// `range` as a device with owner `owner` sees it without faulting: `hmm_range_fault` with no
/// REQ_FAULT (the test device's SNAPSHOT command), retried while invalidations collide.
fn snapshot(range: PageRange, owner: Option<Owner>) -> Vec<HmmPfn> {
    let mm = AddressSpace::current().unwrap();
    let ops: Arc<dyn IntervalNotifierOps> = Arc::new(Snapshotter);
    let sub = mm
        .notifiers()
        .insert(range.start(), range.end(), Arc::downgrade(&ops) as Weak<_>);
    let pfns = loop {
        let mut r = HmmRange::new(&sub, range, 0);
        r.dev_private_owner = owner;
        r.notifier_seq = sub.read_begin();
        match mm.range_fault(&mut r) {
            Ok(_) => {}
            Err(RangeFaultError::Busy) => continue,
            Err(e) => panic!("snapshot: {e}"),
        }
        if !sub.read_retry(r.notifier_seq) {
            break r.hmm_pfns;
        }
    };
    mm.notifiers().remove(&sub);
    pfns
}

#[test]
fn an_owners_pages_are_invisible_to_another_devices_snapshot() {
    let (c, d0, d1) = two(32);
    let owner = |d: DeviceId| c.device(d).unwrap().memory().owner();
    let (o0, o1) = (owner(d0), owner(d1));
    assert_ne!(o0, o1, "each device owns its memory");
    let x = c.alloc(64 * PAGE_SIZE).unwrap();
    let r = x.range();
    write_on(&c, d0, &x, |i| i as u32);
    assert_eq!(on(&c, r, Processor::Device(d0)), r.npages());
    let cpu_faults = stats(&c, d0).cpu_faults;
    // The owner sees its own frames: valid, writable, device-private pages of device 0.
    let mine = snapshot(r, Some(o0));
    let mut frames = Vec::new();
    for (k, p) in mine.iter().enumerate() {
        assert!(p.is_valid() && p.is_write(), "page {k}: {p:?}");
        let (dev, frame, coherent) = p
            .device_frame()
            .unwrap_or_else(|| panic!("page {k}: {p:?}"));
        assert_eq!((dev, coherent), (d0, false), "page {k}");
        frames.push(frame);
    }
    frames.sort_unstable();
    frames.dedup();
    assert_eq!(frames.len() as u64, r.npages(), "one frame per page");
    // Device 1, and the CPU, see nothing there: not valid, not an error (a fault could make it
    // valid), no frame (hmm-tests' `hmm2.snapshot` expects PROT_NONE for the other device's page).
    for (who, o) in [("device 1", Some(o1)), ("no owner", None)] {
        for (k, p) in snapshot(r, o).iter().enumerate() {
            assert!(
                !p.is_valid() && !p.is_error() && p.device_frame().is_none(),
                "{who}, page {k}: {p:?}"
            );
        }
    }
    // Snapshots fault nothing: the pages are still on device 0.
    assert_eq!(on(&c, r, Processor::Device(d0)), r.npages());
    assert_eq!(stats(&c, d0).cpu_faults, cpu_faults);
    // Moved to device 1, the picture turns around.
    map_on(&c, d1, &x, |_, v| v + 1);
    assert_eq!(on(&c, r, Processor::Device(d1)), r.npages());
    assert!(snapshot(r, Some(o1))
        .iter()
        .all(|p| p.is_valid() && p.device_frame().is_some_and(|(d, _, _)| d == d1)));
    assert!(snapshot(r, Some(o0)).iter().all(|p| !p.is_valid()));
    let v = x.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &e)| e == i as u32 + 1));
    drop(v);
    c.check_invariants().unwrap();
}

#[test]
fn prefetch_to_a_device_takes_pages_another_device_holds_device_to_device() {
    let (c, d0, d1) = two(64);
    let mut x = c.alloc(4 << 20).unwrap();
    let r = x.range();
    {
        let mut v = x.view_mut::<u32>();
        for (i, e) in v.iter_mut().enumerate() {
            *e = i as u32 ^ 0x5a5a_5a5a;
        }
    }
    assert_eq!(
        c.prefetch(r, Processor::Device(d0))
            .unwrap()
            .wait()
            .unwrap(),
        r.npages()
    );
    assert_eq!(c.residency(r), vec![(r, Processor::Device(d0))]);
    let (s0, s1) = (stats(&c, d0), stats(&c, d1));
    let moved = c
        .prefetch(r, Processor::Device(d1))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(moved, r.npages());
    let (t0, t1) = (stats(&c, d0), stats(&c, d1));
    eprintln!("device 0 {t0:?}\ndevice 1 {t1:?}");
    assert_eq!(t1.pages_from_peers - s1.pages_from_peers, r.npages());
    assert_eq!(
        t1.pages_from_system, s1.pages_from_system,
        "nothing from system memory"
    );
    assert_eq!(t0.pages_out - s0.pages_out, r.npages());
    assert_eq!(t0.pages_to_system, s0.pages_to_system);
    assert_eq!(t0.cpu_faults, s0.cpu_faults);
    assert_eq!(t0.pages_resident, s0.pages_resident - r.npages());
    // Residency and attributes say device 1.
    let d = Processor::Device(d1);
    assert_eq!(c.residency(r), vec![(r, d)]);
    let a = c.attributes(r).unwrap();
    assert_eq!(a.residency, vec![(r, d)]);
    assert_eq!(a.last_prefetch_location, Attr::Same(d));
    // Prefetched and mapped: a kernel on device 1 takes no fault.
    map_on(&c, d1, &x, |_, v| v ^ 0xffff_ffff);
    assert_eq!(
        stats(&c, d1).faults,
        t1.faults,
        "a prefetched range does not fault"
    );
    let s = c.stats();
    assert_eq!(s.prefetches, 2);
    assert_eq!(s.pages_prefetched_to_device, 2 * r.npages());
    let v = x.view::<u32>();
    assert!(v
        .iter()
        .enumerate()
        .all(|(i, &e)| e == (i as u32 ^ 0x5a5a_5a5a) ^ 0xffff_ffff));
    drop(v);
    c.check_invariants().unwrap();
}

#[test]
fn prefetch_to_the_cpu_and_suspend_bring_both_devices_pages_home_each_counted_as_its_own() {
    let (c, d0, d1) = two(64);
    let mut x = c.alloc(2 << 20).unwrap();
    let mut y = c.alloc(3 << 20).unwrap();
    for (m, seed) in [(&mut x, 1u32), (&mut y, 2)] {
        let mut v = m.view_mut::<u32>();
        for (i, e) in v.iter_mut().enumerate() {
            *e = (i as u32).wrapping_mul(seed) ^ seed;
        }
    }
    // x on device 0; y half on device 0, half on device 1.
    let (rx, ry) = (x.range(), y.range());
    let half = ry.npages() / 2;
    let (y0, y1) = (
        PageRange::from_pages(ry.start().0, half).unwrap(),
        PageRange::from_bounds(ry.start().0 + half * PAGE_SIZE, ry.end().0).unwrap(),
    );
    for (r, d) in [(rx, d0), (y0, d0), (y1, d1)] {
        c.prefetch(r, Processor::Device(d)).unwrap().wait().unwrap();
    }
    assert_eq!(
        c.residency(ry),
        vec![(y0, Processor::Device(d0)), (y1, Processor::Device(d1))]
    );
    let (s0, s1) = (stats(&c, d0), stats(&c, d1));
    // A prefetch to the CPU over both devices' pages: each device is credited with its own.
    let quarter = PageRange::from_pages(y0.end().0 - PAGE_SIZE * 4, 8).unwrap();
    assert_eq!(
        c.prefetch(quarter, Processor::Cpu).unwrap().wait().unwrap(),
        8
    );
    let (t0, t1) = (stats(&c, d0), stats(&c, d1));
    assert_eq!(t0.pages_to_system - s0.pages_to_system, 4);
    assert_eq!(t1.pages_to_system - s1.pages_to_system, 4);
    // Suspend brings the rest home from both devices.
    let held = on(&c, rx, Processor::Device(d0)) + on(&c, ry, Processor::Device(d0));
    let held1 = on(&c, ry, Processor::Device(d1));
    assert_eq!(held, rx.npages() + half - 4);
    assert_eq!(held1, ry.npages() - half - 4);
    assert_eq!(c.suspend().unwrap(), held + held1);
    let (u0, u1) = (stats(&c, d0), stats(&c, d1));
    assert_eq!(u0.pages_to_system - t0.pages_to_system, held);
    assert_eq!(u1.pages_to_system - t1.pages_to_system, held1);
    assert_eq!((u0.pages_resident, u1.pages_resident), (0, 0));
    assert_eq!(
        c.memory_in_use(d0).unwrap() + c.memory_in_use(d1).unwrap(),
        0
    );
    assert_eq!(c.stats().pages_suspended, held + held1);
    for r in [rx, ry] {
        assert_eq!(c.residency(r), vec![(r, Processor::Cpu)]);
    }
    for (m, seed) in [(&x, 1u32), (&y, 2)] {
        let v = m.view::<u32>();
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, &e)| e == (i as u32).wrapping_mul(seed) ^ seed));
    }
    c.check_invariants().unwrap();
}

#[test]
fn the_memory_limit_holds_on_each_of_two_devices_and_evictions_are_credited_per_device() {
    let limit = 4u64 << 20;
    let c = Context::builder()
        .device(device(32))
        .device(device(32))
        .memory_limit(limit)
        .granularity(64 << 10)
        .build()
        .unwrap();
    let (d0, d1) = (c.devices()[0], c.devices()[1]);
    let mut x = c.alloc(12 << 20).unwrap();
    let mut y = c.alloc(12 << 20).unwrap();
    for m in [&mut x, &mut y] {
        let mut v = m.view_mut::<u32>();
        for (i, e) in v.iter_mut().enumerate() {
            *e = i as u32;
        }
    }
    let stop = AtomicBool::new(false);
    let peak = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                peak.0 = c.memory_in_use(d0).unwrap().max(peak.0);
                peak.1 = c.memory_in_use(d1).unwrap().max(peak.1);
                std::thread::yield_now();
            }
            peak
        });
        // Both devices at once, then each on the other's data (pages cross device to device
        // into a full device: it evicts to make room).
        std::thread::scope(|t| {
            t.spawn(|| map_on(&c, d0, &x, |_, v| v + 1));
            t.spawn(|| map_on(&c, d1, &y, |_, v| v + 2));
        });
        map_on(&c, d1, &x, |_, v| v * 2);
        map_on(&c, d0, &y, |_, v| v * 3);
        stop.store(true, Ordering::Relaxed);
        sampler.join().unwrap()
    });
    assert!(
        peak.0 <= limit && peak.1 <= limit,
        "peaks {peak:?} over the limit {limit}"
    );
    assert!(peak.0 > 0 && peak.1 > 0);
    let (s0, s1) = (stats(&c, d0), stats(&c, d1));
    eprintln!("device 0 {s0:?}\ndevice 1 {s1:?}");
    assert!(s0.evictions > 0 && s1.evictions > 0);
    assert_eq!(s0.evictions + s1.evictions, c.stats().evictions);
    assert_eq!(s0.pages_evicted + s1.pages_evicted, c.stats().pages_evicted);
    let v = x.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &e)| e == 2 * (i as u32 + 1)));
    drop(v);
    let v = y.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &e)| e == 3 * (i as u32 + 2)));
    drop(v);
    c.check_invariants().unwrap();
}

#[test]
fn device_stats_of_an_unknown_device_is_a_typed_error() {
    let (c, _, _) = two(8);
    assert!(matches!(
        c.device_stats(DeviceId(200)),
        Err(hetmem_runtime::RuntimeError::NoSuchDevice(DeviceId(200)))
    ));
}

#[test]
fn a_prefetch_moves_only_the_pages_it_names_even_inside_a_block_another_device_holds() {
    let (c, d0, d1) = two(64);
    let mut x = c.alloc(4 << 20).unwrap();
    x.view_mut::<u32>().fill(7);
    let r = x.range();
    c.prefetch(r, Processor::Device(d0))
        .unwrap()
        .wait()
        .unwrap();
    // 40 pages in the middle of the range, across a 2 MiB boundary or not.
    let mid = PageRange::from_pages(r.start().0 + 300 * PAGE_SIZE, 40).unwrap();
    let s1 = stats(&c, d1);
    assert_eq!(
        c.prefetch(mid, Processor::Device(d1))
            .unwrap()
            .wait()
            .unwrap(),
        40
    );
    let before = PageRange::from_bounds(r.start().0, mid.start().0).unwrap();
    let after = PageRange::from_bounds(mid.end().0, r.end().0).unwrap();
    assert_eq!(
        c.residency(r),
        vec![
            (before, Processor::Device(d0)),
            (mid, Processor::Device(d1)),
            (after, Processor::Device(d0)),
        ],
        "pages outside the prefetch stayed where they were"
    );
    assert_eq!(stats(&c, d1).pages_from_peers - s1.pages_from_peers, 40);
    // From system memory too: a prefetch of part of a CPU-resident range takes that part only.
    let y = c.alloc(4 << 20).unwrap();
    let part = PageRange::from_pages(y.addr() + 5 * PAGE_SIZE, 100).unwrap();
    assert_eq!(
        c.prefetch(part, Processor::Device(d1))
            .unwrap()
            .wait()
            .unwrap(),
        100
    );
    assert_eq!(on(&c, y.range(), Processor::Device(d1)), 100);
    assert_eq!(on(&c, part, Processor::Device(d1)), 100);
    c.check_invariants().unwrap();
}

#[test]
fn a_launch_restores_only_what_is_still_in_system_memory_not_a_peers_pages() {
    let c = Context::builder()
        .device(device(16))
        .device(device(16))
        .granularity(hetmem_core::HUGE_PAGE_SIZE)
        .cpu_fault_window(64 << 10)
        .restore_on_launch(true)
        .build()
        .unwrap();
    let (d0, d1) = (c.devices()[0], c.devices()[1]);
    let mut x = c.alloc(1 << 20).unwrap();
    map_on(&c, d0, &x, |i, _| i as u32);
    // The CPU takes a page (and its window) back from device 0, then device 1 takes them.
    x.view_mut::<u32>()[0] = 9;
    assert!(on(&c, x.range(), Processor::Cpu) >= 1);
    map_on(&c, d1, &x, |_, v| v.wrapping_add(1));
    let on_d1 = on(&c, x.range(), Processor::Device(d1));
    assert_eq!(on(&c, x.range(), Processor::Cpu), 0, "device 1 took them");
    let restored = c.stats().pages_launch_restore;
    // Device 0's next launch leaves device 1's pages where they are.
    let idle: Arc<dyn Kernel> =
        Arc::new(|_: u64, _: &mut Thread<'_>| -> Result<(), Miss> { Ok(()) });
    c.launch(d0, idle, 1).unwrap().wait().unwrap();
    assert_eq!(c.stats().pages_launch_restore, restored);
    assert_eq!(on(&c, x.range(), Processor::Device(d1)), on_d1);
    assert_eq!(x.view::<u32>()[0], 10);
    assert_eq!(x.view::<u32>()[5], 6);
    c.check_invariants().unwrap();
}
