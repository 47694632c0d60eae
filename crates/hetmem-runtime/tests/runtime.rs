//! The unified memory runtime end to end: managed memory through CPU views and kernels, advice
//! and prefetch read back through range attributes (CUDA's semantics), eviction under
//! oversubscription, the per-context memory limit, and suspend.

use std::sync::Arc;

use hetmem_core::{link::LinkModel, DeviceId, PageRange, HUGE_PAGE_SIZE, PAGE_SIZE};
use hetmem_runtime::{Advice, Attr, Context, EvictionOrder, Managed, Processor, RuntimeError};
use hetmem_sim::accel::{AccelConfig, Kernel, Miss, Thread};

fn device(mib: u64) -> AccelConfig {
    AccelConfig {
        memory_bytes: mib << 20,
        compute_units: 2,
        link: LinkModel::off(),
        ..AccelConfig::default()
    }
}

fn ctx(mib: u64) -> Context {
    Context::builder().device(device(mib)).build().unwrap()
}

fn dev0(c: &Context) -> DeviceId {
    c.devices()[0]
}

/// `x[i] = 2 * x[i] + 1` over `n` u32.
fn scale(x: &Managed) -> (Arc<dyn Kernel>, u64) {
    let base = x.addr();
    let n = x.len() / 4;
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let v = t.load_u32(base + 4 * i)?;
        t.store_u32(base + 4 * i, v.wrapping_mul(2).wrapping_add(1))
    };
    (Arc::new(k), n)
}

fn fill(x: &mut Managed, f: impl Fn(usize) -> u32) {
    let mut v = x.view_mut::<u32>();
    for (i, e) in v.iter_mut().enumerate() {
        *e = f(i);
    }
}

fn run(c: &Context, k: (Arc<dyn Kernel>, u64)) {
    c.launch(dev0(c), k.0, k.1).unwrap().wait().unwrap();
}

fn on(c: &Context, r: PageRange, p: Processor) -> u64 {
    c.residency(r)
        .iter()
        .filter(|(_, q)| *q == p)
        .map(|(r, _)| r.npages())
        .sum()
}

#[test]
fn kernels_and_cpu_views_share_managed_memory() {
    let c = ctx(32);
    let n = 64 * 1024u64;
    let mut a = c.alloc(4 * n).unwrap();
    let mut b = c.alloc(4 * n).unwrap();
    let out = c.alloc(4 * n).unwrap();
    fill(&mut a, |i| i as u32);
    fill(&mut b, |i| 7 * i as u32 + 3);
    let (pa, pb, po) = (a.addr(), b.addr(), out.addr());
    let add = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(pa + 4 * i)?;
        let y = t.load_u32(pb + 4 * i)?;
        t.store_u32(po + 4 * i, x.wrapping_add(y))
    };
    {
        // A launch while a CPU view is open is refused, not a data race.
        let _v = a.view::<u32>();
        let e = c.launch(dev0(&c), Arc::new(add), n).unwrap_err();
        assert!(matches!(e, RuntimeError::ViewsOpen { views: 1 }), "{e}");
    }
    c.launch(dev0(&c), Arc::new(add), n)
        .unwrap()
        .wait()
        .unwrap();
    assert!(on(&c, out.range(), Processor::Device(dev0(&c))) > 0);
    let v = out.view::<u32>();
    for (i, &x) in v.iter().enumerate() {
        assert_eq!(x, (i as u32).wrapping_add(7 * i as u32 + 3), "out[{i}]");
    }
    drop(v);
    // The CPU writes between launches; the next launch sees it.
    fill(&mut a, |i| 2 * i as u32);
    run(&c, scale(&a));
    let v = a.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &x)| x == 4 * i as u32 + 1));
    drop(v);
    c.check_invariants().unwrap();
}

#[test]
fn a_working_set_twice_device_memory_completes_by_evicting_least_recently_used_chunks() {
    // 8 MiB of device memory, 16 MiB of data, whole-block migrations.
    let c = Context::builder()
        .device(device(8))
        .granularity(HUGE_PAGE_SIZE)
        .build()
        .unwrap();
    let mut x = c.alloc(16 << 20).unwrap();
    fill(&mut x, |i| i as u32);
    for _ in 0..2 {
        run(&c, scale(&x));
        let used = c.memory_in_use(dev0(&c)).unwrap();
        assert!(used <= 8 << 20, "device memory over capacity: {used}");
    }
    let s = c.stats();
    assert!(s.evictions > 0 && s.pages_evicted > 0, "{s:?}");
    let acc = c.device(dev0(&c)).unwrap().stats();
    assert!(
        acc.pages_to_device > (8 << 20) / PAGE_SIZE,
        "more migrated in than fits: eviction made room ({acc:?})"
    );
    let v = x.view::<u32>();
    for (i, &e) in v.iter().enumerate() {
        let want = (i as u32).wrapping_mul(4).wrapping_add(3);
        assert_eq!(e, want, "x[{i}] after two launches");
    }
    drop(v);
    c.check_invariants().unwrap();
}

#[test]
fn the_memory_limit_holds_and_eviction_to_system_memory_never_fails_for_it() {
    let limit = 4u64 << 20;
    let c = Context::builder()
        .device(device(32))
        .memory_limit(limit)
        .granularity(64 << 10)
        .build()
        .unwrap();
    let mut x = c.alloc(12 << 20).unwrap();
    fill(&mut x, |i| i as u32);
    let d = dev0(&c);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(c.memory_in_use(d).unwrap());
                std::thread::yield_now();
            }
            peak
        });
        run(&c, scale(&x));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap()
    });
    assert!(peak <= limit, "peak {peak} over the limit {limit}");
    assert!(peak > 0, "the device used its memory");
    assert!(c.stats().evictions > 0);
    // Everything comes back, however much the device holds.
    let back = c.suspend().unwrap();
    assert!(back > 0);
    assert_eq!(on(&c, x.range(), Processor::Cpu), x.range().npages());
    let v = x.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &e)| e == 2 * i as u32 + 1));
}

#[test]
fn prefetch_moves_the_range_and_records_its_location() {
    let c = ctx(32);
    let d = Processor::Device(dev0(&c));
    let mut x = c.alloc(4 << 20).unwrap();
    fill(&mut x, |i| i as u32);
    let r = x.range();
    assert_eq!(c.attributes(r).unwrap().last_prefetch_location, Attr::Unset);
    let moved = c.prefetch(r, d).unwrap().wait().unwrap();
    assert_eq!(moved, r.npages());
    let a = c.attributes(r).unwrap();
    assert_eq!(a.last_prefetch_location, Attr::Same(d));
    assert_eq!(a.residency, vec![(r, d)]);
    // Prefetched and mapped: the kernel takes no fault.
    let acc = c.device(dev0(&c)).unwrap();
    let before = acc.stats();
    run(&c, scale(&x));
    let after = acc.stats();
    assert_eq!(
        after.faults_read + after.faults_write,
        before.faults_read + before.faults_write,
        "a prefetched range does not fault"
    );
    // Back to the CPU.
    let half = PageRange::from_pages(r.start().0, r.npages() / 2).unwrap();
    assert_eq!(
        c.prefetch(half, Processor::Cpu).unwrap().wait().unwrap(),
        half.npages()
    );
    let a = c.attributes(r).unwrap();
    assert_eq!(a.last_prefetch_location, Attr::Mixed);
    assert_eq!(a.residency[0], (half, Processor::Cpu));
    let s = c.stats();
    assert_eq!(s.prefetches, 2);
    assert_eq!(s.pages_prefetched_to_device, r.npages());
    assert_eq!(s.pages_prefetched_to_cpu, half.npages());
    let v = x.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &e)| e == 2 * i as u32 + 1));
}

#[test]
fn preferred_location_elsewhere_maps_remotely_instead_of_migrating() {
    let c = ctx(32);
    let d = dev0(&c);
    let mut x = c.alloc(1 << 20).unwrap();
    fill(&mut x, |i| i as u32);
    c.advise(x.range(), Advice::SetPreferredLocation(Processor::Cpu))
        .unwrap();
    assert_eq!(
        c.attributes(x.range()).unwrap().preferred_location,
        Attr::Same(Processor::Cpu)
    );
    run(&c, scale(&x));
    let acc = c.device(d).unwrap();
    assert_eq!(acc.stats().pages_to_device, 0, "nothing migrated");
    assert!(acc.stats().pages_mapped_remote > 0);
    assert!(c.stats().pages_advised_remote > 0);
    assert_eq!(on(&c, x.range(), Processor::Cpu), x.range().npages());
    // Preferred here: the next faults migrate.
    c.advise(
        x.range(),
        Advice::SetPreferredLocation(Processor::Device(d)),
    )
    .unwrap();
    hetmem::ComputeDevice::unmap(acc, x.range()).unwrap();
    run(&c, scale(&x));
    assert!(acc.stats().pages_to_device > 0);
    let v = x.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &e)| e == 4 * i as u32 + 3));
}

#[test]
fn accessed_by_maps_the_range_at_once_so_kernels_do_not_fault() {
    let c = ctx(32);
    let d = dev0(&c);
    let mut x = c.alloc(1 << 20).unwrap();
    fill(&mut x, |i| i as u32);
    c.advise(x.range(), Advice::SetAccessedBy(Processor::Device(d)))
        .unwrap();
    assert_eq!(
        c.attributes(x.range()).unwrap().accessed_by,
        vec![Processor::Device(d)]
    );
    let acc = c.device(d).unwrap();
    run(&c, scale(&x));
    let s = acc.stats();
    assert_eq!(
        s.faults_read + s.faults_write,
        0,
        "mapped before the launch"
    );
    assert_eq!(s.pages_to_device, 0, "accessed-by migrates nothing");
    c.advise(x.range(), Advice::UnsetAccessedBy(Processor::Device(d)))
        .unwrap();
    assert!(c.attributes(x.range()).unwrap().accessed_by.is_empty());
}

#[test]
fn a_granularity_advice_widens_what_one_fault_migrates() {
    let c = ctx(32);
    let d = dev0(&c);
    let x = c.alloc(2 * HUGE_PAGE_SIZE).unwrap();
    let first = PageRange::new(x.addr() & !(HUGE_PAGE_SIZE - 1), HUGE_PAGE_SIZE).unwrap();
    let block = if first.start().0 == x.addr() {
        first
    } else {
        PageRange::new(first.end().0, HUGE_PAGE_SIZE).unwrap()
    };
    c.advise(block, Advice::SetGranularity(HUGE_PAGE_SIZE))
        .unwrap();
    assert_eq!(
        c.attributes(block).unwrap().granularity,
        Attr::Same(HUGE_PAGE_SIZE)
    );
    let a = block.start().0;
    let one = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> { t.load_u32(a).map(|_| ()) };
    c.launch(d, Arc::new(one), 1).unwrap().wait().unwrap();
    assert_eq!(
        on(&c, block, Processor::Device(d)),
        block.npages(),
        "one fault took the whole 2 MiB window"
    );
}

#[test]
fn bad_input_gets_typed_errors() {
    let c = ctx(8);
    let x = c.alloc(PAGE_SIZE).unwrap();
    assert!(matches!(c.alloc(0), Err(RuntimeError::EmptyAllocation)));
    assert!(matches!(
        c.advise(
            x.range(),
            Advice::SetPreferredLocation(Processor::Device(DeviceId(99)))
        ),
        Err(RuntimeError::NoSuchDevice(DeviceId(99)))
    ));
    assert!(matches!(
        c.advise(x.range(), Advice::SetGranularity(3 * PAGE_SIZE)),
        Err(RuntimeError::BadGranularity(_))
    ));
    let outside = PageRange::new(x.range().end().0 + (1 << 30), PAGE_SIZE).unwrap();
    assert!(matches!(
        c.prefetch(outside, Processor::Cpu),
        Err(RuntimeError::NotManaged(_))
    ));
    assert!(matches!(
        c.attributes(outside),
        Err(RuntimeError::NotManaged(_))
    ));
    assert!(matches!(
        Context::builder().build(),
        Err(RuntimeError::NoDevices)
    ));
    assert!(matches!(
        Context::builder().device(device(8)).granularity(0).build(),
        Err(RuntimeError::BadGranularity(0))
    ));
}

/// Reads one u32 of every page of `x` from `from` to `to` (bytes), one thread per page.
fn touch_pages(c: &Context, x: &Managed, from: u64, to: u64) {
    let base = x.addr() + from;
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.load_u32(base + i * PAGE_SIZE).map(|_| ())
    };
    c.launch(dev0(c), Arc::new(k), (to - from) / PAGE_SIZE)
        .unwrap()
        .wait()
        .unwrap();
}

/// Bytes from `x`'s start to its first 2 MiB boundary (mappings need not be aligned).
fn to_block(x: &Managed) -> u64 {
    x.addr().next_multiple_of(HUGE_PAGE_SIZE) - x.addr()
}

/// Is `x`'s `chunk`-th whole block (counted from its first boundary) on the device?
fn chunk_on_device(c: &Context, x: &Managed, chunk: u64) -> bool {
    let r = PageRange::new(
        x.addr() + to_block(x) + chunk * HUGE_PAGE_SIZE,
        HUGE_PAGE_SIZE,
    )
    .unwrap();
    on(c, r, Processor::Device(dev0(c))) == HUGE_PAGE_SIZE / PAGE_SIZE
}

/// Four chunks fill an 8 MiB device, a fifth evicts chunk 0; the device then reads chunk 1
/// again, and a sixth chunk needs a victim: chunk 2 by use, chunk 1 by allocation.
fn victim_after_reuse(order: EvictionOrder) -> (bool, bool) {
    let c = Context::builder()
        .device(AccelConfig {
            link: LinkModel::pcie3_x16(),
            ..device(8)
        })
        .granularity(HUGE_PAGE_SIZE)
        .prefetcher(None)
        .thrashing(None)
        .eviction(order)
        .build()
        .unwrap();
    let mut x = c.alloc(7 * HUGE_PAGE_SIZE).unwrap();
    fill(&mut x, |i| i as u32);
    let o = to_block(&x);
    touch_pages(&c, &x, o, o + 4 * HUGE_PAGE_SIZE);
    let before = c.device(dev0(&c)).unwrap().clock();
    touch_pages(&c, &x, o + 4 * HUGE_PAGE_SIZE, o + 5 * HUGE_PAGE_SIZE);
    assert!(!chunk_on_device(&c, &x, 0), "chunk 0 was the first victim");
    // The eviction's copy back is on the device clock: a 2 MiB transfer over PCIe 3.
    let d = c.device(dev0(&c)).unwrap().clock().since(&before);
    assert!(
        d.get(hetmem_core::link::Cause::MigrateToHost).as_nanos() > 150_000,
        "{d:?}"
    );
    touch_pages(&c, &x, o + HUGE_PAGE_SIZE, o + 2 * HUGE_PAGE_SIZE);
    touch_pages(&c, &x, o + 5 * HUGE_PAGE_SIZE, o + 6 * HUGE_PAGE_SIZE);
    assert_eq!(c.stats().evictions, 2);
    c.check_invariants().unwrap();
    (chunk_on_device(&c, &x, 1), chunk_on_device(&c, &x, 2))
}

#[test]
fn eviction_by_use_keeps_a_chunk_the_device_read_again() {
    assert_eq!(
        victim_after_reuse(EvictionOrder::AccessedLru),
        (true, false)
    );
}

#[test]
fn eviction_by_allocation_order_evicts_the_oldest_chunk_even_if_it_was_just_read() {
    assert_eq!(
        victim_after_reuse(EvictionOrder::AllocationOrder),
        (false, true)
    );
}

#[test]
fn a_prefetch_back_to_the_cpu_is_charged_to_the_device_clock() {
    let c = Context::builder()
        .device(AccelConfig {
            link: LinkModel::pcie3_x16(),
            ..device(16)
        })
        .build()
        .unwrap();
    let x = c.alloc(4 << 20).unwrap();
    let gpu = Processor::Device(dev0(&c));
    c.prefetch(x.range(), gpu).unwrap().wait().unwrap();
    let clock = || c.device(dev0(&c)).unwrap().clock();
    let before = clock();
    assert_eq!(
        c.prefetch(x.range(), Processor::Cpu)
            .unwrap()
            .wait()
            .unwrap(),
        1024
    );
    let d = clock().since(&before);
    let cause = hetmem_core::link::Cause::MigrateToHost;
    assert_eq!(d.charges_of(cause), 2, "two 2 MiB transfers: {d:?}");
    let two = LinkModel::pcie3_x16()
        .transfer(hetmem_core::link::Direction::DeviceToHost, 2 << 20)
        .as_nanos();
    assert_eq!(d.get(cause).as_nanos(), 2 * two);
}

#[test]
fn a_cpu_fault_that_brings_back_a_whole_block_is_charged_for_the_whole_block() {
    let c = Context::builder()
        .device(AccelConfig {
            link: LinkModel::pcie3_x16(),
            ..device(16)
        })
        .granularity(HUGE_PAGE_SIZE)
        .build()
        .unwrap();
    // Never touched by the CPU: the device fills whole blocks of it, each moving as one.
    let x = c.alloc(6 << 20).unwrap();
    let base = x.addr();
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.store_u32(base + 4 * i, 2 * i as u32 + 1)
    };
    run(&c, (Arc::new(k), x.len() / 4));
    // A block of the allocation that lies wholly inside it moved as one.
    let block = x.addr().next_multiple_of(HUGE_PAGE_SIZE);
    let gpu = Processor::Device(dev0(&c));
    assert_eq!(
        on(&c, PageRange::new(block, HUGE_PAGE_SIZE).unwrap(), gpu),
        512
    );
    let before = c.device(dev0(&c)).unwrap().clock();
    let word = ((block - x.addr()) / 4) as usize;
    assert_eq!(x.view::<u32>()[word], 2 * word as u32 + 1);
    let d = c.device(dev0(&c)).unwrap().clock().since(&before);
    let cause = hetmem_core::link::Cause::MigrateToHost;
    assert_eq!(d.charges_of(cause), 1, "{d:?}");
    let whole =
        LinkModel::pcie3_x16().transfer(hetmem_core::link::Direction::DeviceToHost, HUGE_PAGE_SIZE);
    assert_eq!(d.get(cause), whole);
    assert_eq!(
        on(
            &c,
            PageRange::new(block, HUGE_PAGE_SIZE).unwrap(),
            Processor::Cpu
        ),
        512
    );
}

#[test]
fn a_cpu_fault_window_brings_back_the_aligned_window_in_one_fault() {
    for (window, pages) in [(PAGE_SIZE, 1), (64 << 10, 16)] {
        let c = Context::builder()
            .device(AccelConfig {
                link: LinkModel::pcie3_x16(),
                ..device(16)
            })
            .cpu_fault_window(window)
            .build()
            .unwrap();
        let mut x = c.alloc(1 << 20).unwrap();
        fill(&mut x, |i| i as u32);
        let gpu = Processor::Device(dev0(&c));
        c.prefetch(x.range(), gpu).unwrap().wait().unwrap();
        let before = c.device_stats(dev0(&c)).unwrap();
        // One word in the middle of a 64 KiB window.
        let win = (x.addr() + (256 << 10)).next_multiple_of(64 << 10);
        let word = ((win + (20 << 10) - x.addr()) / 4) as usize;
        assert_eq!(x.view::<u32>()[word], word as u32);
        let after = c.device_stats(dev0(&c)).unwrap();
        assert_eq!(after.cpu_faults - before.cpu_faults, 1, "window {window}");
        assert_eq!(on(&c, x.range(), Processor::Cpu), pages, "window {window}");
        let w = PageRange::new(win, 64 << 10).unwrap();
        assert_eq!(on(&c, w, Processor::Cpu), pages);
        c.check_invariants().unwrap();
    }
    assert!(matches!(
        Context::builder()
            .device(device(16))
            .cpu_fault_window(3 << 10)
            .build(),
        Err(RuntimeError::BadGranularity(_))
    ));
}

#[test]
fn a_cpu_fault_window_stops_at_the_faulting_allocation() {
    let c = Context::builder()
        .device(device(16))
        .cpu_fault_window(HUGE_PAGE_SIZE)
        .build()
        .unwrap();
    // Small allocations: some of them share a 2 MiB window with a neighbour.
    let mut xs: Vec<Managed> = (0..16).map(|_| c.alloc(64 << 10).unwrap()).collect();
    for (k, x) in xs.iter_mut().enumerate() {
        fill(x, |i| (k << 20 | i) as u32);
    }
    let window = |x: &Managed| x.addr() & !(HUGE_PAGE_SIZE - 1);
    let (k, x) = xs
        .iter()
        .enumerate()
        .find(|(k, x)| {
            xs.iter()
                .enumerate()
                .any(|(j, y)| j != *k && window(y) == window(x))
        })
        .expect("16 allocations of 64 KiB, none sharing a 2 MiB window with another");
    let gpu = Processor::Device(dev0(&c));
    for y in &xs {
        c.prefetch(y.range(), gpu).unwrap().wait().unwrap();
    }
    assert_eq!(x.view::<u32>()[3], (k << 20 | 3) as u32);
    // The faulting allocation came back whole; every other stayed on the device, the
    // neighbours in its window included.
    assert_eq!(on(&c, x.range(), Processor::Cpu), 16);
    for (j, y) in xs.iter().enumerate().filter(|(j, _)| *j != k) {
        assert_eq!(on(&c, y.range(), gpu), 16, "allocation {j}");
    }
    c.check_invariants().unwrap();
}

/// CPU faults a walk over `x` takes with 2 MiB CPU fault windows growing up to `max` (the
/// windows start at the faulting page's aligned 2 MiB and stop at the allocation's end).
fn walk_faults(x: &Managed, max: u64) -> u64 {
    let (mut at, end, mut size, mut faults) = (x.addr(), x.addr() + x.len(), HUGE_PAGE_SIZE, 0);
    while at < end {
        at = ((at & !(HUGE_PAGE_SIZE - 1)) + size).min(end);
        size = (size * 2).min(max);
        faults += 1;
    }
    faults
}

#[test]
fn cpu_readahead_doubles_the_window_while_the_cpu_walks_on() {
    const MAX: u64 = 8 << 20;
    for readahead in [None, Some(MAX)] {
        let c = Context::builder()
            .device(device(64))
            .cpu_fault_window(HUGE_PAGE_SIZE)
            .cpu_readahead(readahead)
            .build()
            .unwrap();
        let d = dev0(&c);
        let gpu = Processor::Device(d);
        let mut xs: Vec<Managed> = (0..3).map(|_| c.alloc(15 << 20).unwrap()).collect();
        for (k, x) in xs.iter_mut().enumerate() {
            fill(x, |i| (k << 24 | i) as u32);
            c.prefetch(x.range(), gpu).unwrap().wait().unwrap();
        }
        let words = (15 << 20) / 4;
        let step = PAGE_SIZE as usize / 4;
        let faults = |c: &Context| c.device_stats(d).unwrap().cpu_faults;
        // xs[0] forwards, page by page: the window doubles at each fault.
        let before = faults(&c);
        let v = xs[0].view::<u32>();
        for i in (0..words).step_by(step) {
            assert_eq!(v[i], i as u32);
        }
        drop(v);
        let want = walk_faults(&xs[0], readahead.unwrap_or(HUGE_PAGE_SIZE));
        assert_eq!(
            faults(&c) - before,
            want,
            "forwards, readahead {readahead:?}"
        );
        // xs[1] backwards: no fault continues a walk, each brings back one window.
        let before = faults(&c);
        let v = xs[1].view::<u32>();
        for i in (0..words).step_by(step).rev() {
            assert_eq!(v[i], (1 << 24 | i) as u32);
        }
        drop(v);
        let blocks =
            |x: &Managed| (x.addr() + x.len()).div_ceil(HUGE_PAGE_SIZE) - x.addr() / HUGE_PAGE_SIZE;
        assert_eq!(faults(&c) - before, blocks(&xs[1]), "backwards");
        // xs[2] and xs[0] (taken back to the device) side by side: each walk grows on its own.
        c.prefetch(xs[0].range(), gpu).unwrap().wait().unwrap();
        let before = faults(&c);
        let (a, b) = (xs[0].view::<u32>(), xs[2].view::<u32>());
        for i in (0..words).step_by(step) {
            assert_eq!(a[i], i as u32);
            assert_eq!(b[i], (2 << 24 | i) as u32);
        }
        drop((a, b));
        let max = readahead.unwrap_or(HUGE_PAGE_SIZE);
        assert_eq!(
            faults(&c) - before,
            walk_faults(&xs[0], max) + walk_faults(&xs[2], max),
            "side by side"
        );
        for x in &xs {
            assert_eq!(on(&c, x.range(), Processor::Cpu), (15 << 20) / PAGE_SIZE);
        }
        c.check_invariants().unwrap();
    }
    for bad in [3 << 20, 128 << 20, 0] {
        assert!(matches!(
            Context::builder()
                .device(device(16))
                .cpu_readahead(Some(bad))
                .build(),
            Err(RuntimeError::BadReadahead(b)) if b == bad
        ));
    }
}

#[test]
fn a_flag_the_cpu_reads_after_every_launch_is_read_back_as_each_launch_ends() {
    // The device counts launches in `flag` and in `half`; the CPU reads `flag` after every
    // launch, `half` after every other one. Thrashing detection is off: it runs on the wall
    // clock, and launches this short can make it pin the flag in system memory for a few
    // launches (no CPU fault there either), which this count of CPU faults is not about.
    for readback in [false, true] {
        let c = Context::builder()
            .device(device(16))
            .thrashing(None)
            .granularity(HUGE_PAGE_SIZE)
            .cpu_fault_window(HUGE_PAGE_SIZE)
            .restore_on_launch(true)
            .readback_after_launch(readback)
            .build()
            .unwrap();
        let d = dev0(&c);
        let (flag, half) = (c.alloc(4).unwrap(), c.alloc(4).unwrap());
        let (pf, ph) = (flag.addr(), half.addr());
        let k = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            for p in [pf, ph] {
                let v = t.load_u32(p)?;
                t.store_u32(p, v + 1)?;
            }
            Ok(())
        };
        let k: Arc<dyn Kernel> = Arc::new(k);
        let cpu_faults = |c: &Context| c.device_stats(d).unwrap().cpu_faults;
        let (mut flag_faults, mut half_faults) = (Vec::new(), Vec::new());
        for n in 1..=16u32 {
            c.launch(d, Arc::clone(&k), 1).unwrap().wait().unwrap();
            let before = cpu_faults(&c);
            assert_eq!(flag.view::<u32>()[0], n);
            flag_faults.push(cpu_faults(&c) - before);
            if n % 2 == 0 {
                let before = cpu_faults(&c);
                assert_eq!(half.view::<u32>()[0], n);
                half_faults.push(cpu_faults(&c) - before);
            }
        }
        // `half` is never taken after two launches in a row: it faults every time.
        assert_eq!(half_faults, [1; 8], "readback {readback}");
        let read_back = c.stats().pages_launch_readback;
        if !readback {
            assert_eq!(flag_faults, [1; 16]);
            assert_eq!(read_back, 0);
            continue;
        }
        // Taken after launches 1 and 2: read back after 3 to 6; launch 7 checks (the CPU takes
        // it again), then 8 readbacks and launch 16 checks.
        let want = [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(flag_faults, want);
        assert_eq!(read_back, 12);
        // The CPU stops reading the flag: 16 more readbacks (the grant doubled again at the
        // last check), a launch that checks, and none after it.
        for n in 17..=40u32 {
            c.launch(d, Arc::clone(&k), 1).unwrap().wait().unwrap();
            if n % 2 == 0 {
                assert_eq!(half.view::<u32>()[0], n);
            }
        }
        assert_eq!(c.stats().pages_launch_readback, 12 + 16);
        assert_eq!(flag.view::<u32>()[0], 40);
        c.check_invariants().unwrap();
    }
}

#[test]
fn a_device_fault_window_never_takes_another_contexts_pages() {
    // Two contexts share the process's address space; their allocations interleave, so some
    // 2 MiB blocks hold pages of both. A fault of one context's device with whole-block windows
    // took the other context's pages into its device: that context's explicit copies then
    // faulted to get them back (found by running the workloads' tests in one process).
    let ctx = || {
        Context::builder()
            .device(device(16))
            .granularity(HUGE_PAGE_SIZE)
            .prefetcher(Some(Default::default()))
            .build()
            .unwrap()
    };
    let (a, b) = (ctx(), ctx());
    let mut xs: Vec<(bool, Managed)> = Vec::new();
    for k in 0..32 {
        let owner = k % 2 == 0;
        let mut m = if owner { &a } else { &b }.alloc(64 << 10).unwrap();
        fill(&mut m, |i| (k << 20 | i) as u32);
        xs.push((owner, m));
    }
    let block = |m: &Managed| m.addr() & !(HUGE_PAGE_SIZE - 1);
    assert!(
        xs.iter()
            .any(|(o, x)| xs.iter().any(|(p, y)| o != p && block(x) == block(y))),
        "no 2 MiB block holds allocations of both contexts"
    );
    // Context a's pages go to its device; b's device then faults on each of b's allocations.
    for (_, x) in xs.iter().filter(|(o, _)| *o) {
        a.prefetch(x.range(), Processor::Device(dev0(&a)))
            .unwrap()
            .wait()
            .unwrap();
    }
    for (_, y) in xs.iter().filter(|(o, _)| !*o) {
        run(&b, scale(y));
    }
    for (k, (owner, x)) in xs.iter().enumerate() {
        let c = if *owner { &a } else { &b };
        assert_eq!(
            on(c, x.range(), Processor::Device(dev0(c))),
            16,
            "allocation {k} (context {})",
            if *owner { "a" } else { "b" }
        );
    }
    // Context a's device never faulted, b's faulted on its own allocations only.
    assert_eq!(a.device_stats(dev0(&a)).unwrap().faults, 0);
    a.check_invariants().unwrap();
    b.check_invariants().unwrap();
}

#[test]
fn a_launch_restores_what_cpu_faults_took_from_its_device_since_the_last() {
    for restore in [false, true] {
        let c = Context::builder()
            .device(device(16))
            .granularity(HUGE_PAGE_SIZE)
            .cpu_fault_window(64 << 10)
            .restore_on_launch(restore)
            .build()
            .unwrap();
        let mut x = c.alloc(1 << 20).unwrap();
        fill(&mut x, |i| i as u32);
        run(&c, scale(&x));
        let gpu = Processor::Device(dev0(&c));
        assert_eq!(on(&c, x.range(), gpu), 256);
        // The CPU rewrites one word: its 64 KiB window comes back to system memory.
        let win = (x.addr() + (256 << 10)).next_multiple_of(64 << 10);
        let word = ((win + (20 << 10) - x.addr()) / 4) as usize;
        x.view_mut::<u32>()[word] = 7;
        assert_eq!(on(&c, x.range(), Processor::Cpu), 16);
        let before = c.device_stats(dev0(&c)).unwrap();
        let restored = c.stats().pages_launch_restore;
        // A kernel that touches nothing: only the launch can have brought the window back.
        let idle = |_: u64, _: &mut Thread<'_>| -> Result<(), Miss> { Ok(()) };
        run(&c, (Arc::new(idle), 1));
        let after = c.device_stats(dev0(&c)).unwrap();
        assert_eq!(after.faults, before.faults, "restore {restore}");
        let (back, moved) = if restore { (256, 16) } else { (240, 0) };
        assert_eq!(on(&c, x.range(), gpu), back, "restore {restore}");
        assert_eq!(c.stats().pages_launch_restore - restored, moved);
        // The CPU's write went along.
        run(&c, scale(&x));
        assert_eq!(x.view::<u32>()[word], 15);
        assert_eq!(x.view::<u32>()[1], 7);
        c.check_invariants().unwrap();
    }
}

#[test]
fn a_full_device_gets_back_at_launch_what_cpu_faults_took_from_it() {
    // Device memory exactly the allocation: full once the kernel ran. The frames the CPU's
    // fault frees are all the device has free, and the restore must use them (a reserve of a
    // chunk left the window to a fault batch).
    let c = Context::builder()
        .device(device(4))
        .granularity(HUGE_PAGE_SIZE)
        .cpu_fault_window(64 << 10)
        .restore_on_launch(true)
        .build()
        .unwrap();
    let mut x = c.alloc(4 << 20).unwrap();
    fill(&mut x, |i| i as u32);
    run(&c, scale(&x));
    let gpu = Processor::Device(dev0(&c));
    assert_eq!(on(&c, x.range(), gpu), 1024);
    let word = ((x.addr().next_multiple_of(64 << 10) + (1 << 20) - x.addr()) / 4) as usize;
    x.view_mut::<u32>()[word] = 7;
    assert_eq!(on(&c, x.range(), Processor::Cpu), 16);
    let pool = c
        .device(dev0(&c))
        .unwrap()
        .memory()
        .pool()
        .lock()
        .available_frames();
    assert_eq!(
        pool, 16,
        "the CPU's window freed its frames and nothing else is free"
    );
    let before = c.device_stats(dev0(&c)).unwrap();
    let restored = c.stats().pages_launch_restore;
    let idle = |_: u64, _: &mut Thread<'_>| -> Result<(), Miss> { Ok(()) };
    run(&c, (Arc::new(idle), 1));
    assert_eq!(c.stats().pages_launch_restore - restored, 16);
    assert_eq!(on(&c, x.range(), gpu), 1024);
    run(&c, scale(&x));
    let after = c.device_stats(dev0(&c)).unwrap();
    assert_eq!(
        after.faults, before.faults,
        "the restored window did not fault"
    );
    assert_eq!(after.evictions, before.evictions);
    assert_eq!(x.view::<u32>()[word], 15);
    assert_eq!(x.view::<u32>()[3], 15);
    c.check_invariants().unwrap();
}

#[test]
fn a_table_the_cpu_rewrites_before_every_launch_stays_in_system_memory_mapped_remotely() {
    // The CPU writes a table before each launch and the device reads it (a block table): each
    // round trip is a CPU fault, a copy back and a restore. After three restores in a row the
    // table is mapped where it is, and the CPU's writes stop faulting. A flag the CPU only reads
    // back after each launch (the device writes it) keeps moving, as before.
    for cpu_writes in [true, false] {
        let c = Context::builder()
            .device(device(16))
            .granularity(HUGE_PAGE_SIZE)
            .cpu_fault_window(HUGE_PAGE_SIZE)
            .restore_on_launch(true)
            .build()
            .unwrap();
        let d = dev0(&c);
        let mut table = c.alloc(8 * PAGE_SIZE).unwrap();
        let out = c.alloc(8 * PAGE_SIZE).unwrap();
        let n = table.len() / 4;
        let (pt, po) = (table.addr(), out.addr());
        // The device adds each table entry into `out` (reads the table, writes `out`).
        let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let v = t.load_u32(pt + 4 * i)?;
            let o = t.load_u32(po + 4 * i)?;
            t.store_u32(po + 4 * i, o.wrapping_add(v))
        };
        let k: Arc<dyn Kernel> = Arc::new(k);
        let mut faults = Vec::new();
        for step in 1..=8u32 {
            let before = c.device_stats(d).unwrap().cpu_faults;
            if cpu_writes {
                table.view_mut::<u32>().fill(step);
            } else if step > 1 {
                // Reads a word of the device's output back (the table stays as it was).
                assert_eq!(out.view::<u32>()[5], step - 1);
            } else {
                table.view_mut::<u32>().fill(1);
            }
            faults.push(c.device_stats(d).unwrap().cpu_faults - before);
            c.launch(d, Arc::clone(&k), n).unwrap().wait().unwrap();
        }
        let pins = c.stats().pages_launch_bounce_pins;
        if cpu_writes {
            // Steps 2 to 4 fault the table back; the restore at step 4's launch is the third
            // in a row, so from then on it stays put and the CPU writes it in place.
            assert_eq!(&faults[1..4], &[1, 1, 1], "{faults:?}");
            assert_eq!(&faults[4..], &[0, 0, 0, 0], "{faults:?}");
            assert!(pins >= 8, "{pins}");
            assert_eq!(
                on(&c, table.range(), Processor::Cpu),
                8,
                "the table is in system memory"
            );
            assert!(c.device(d).unwrap().stats().remote_accesses > 0);
            let want = (1..=8u32).sum::<u32>();
            assert!(out.view::<u32>().iter().all(|&v| v == want));
        } else {
            assert_eq!(pins, 0, "a page the CPU only reads back is never pinned");
            assert_eq!(&faults[1..], &[1; 7], "{faults:?}");
            assert_eq!(out.view::<u32>()[5], 8);
        }
        c.check_invariants().unwrap();
    }
}

#[test]
fn once_device_memory_is_full_a_fault_brings_in_only_its_pressure_window() {
    for (pressure, expect) in [(None, 512), (Some(64 << 10), 16)] {
        let c = Context::builder()
            .device(device(8))
            .granularity(HUGE_PAGE_SIZE)
            .prefetcher(None)
            .thrashing(None)
            .pressure_window(pressure)
            .build()
            .unwrap();
        let mut x = c.alloc(7 * HUGE_PAGE_SIZE).unwrap();
        fill(&mut x, |i| i as u32);
        let o = to_block(&x);
        // Whole blocks while they fit.
        touch_pages(&c, &x, o, o + 4 * HUGE_PAGE_SIZE);
        assert!(chunk_on_device(&c, &x, 0));
        // One page past what fits.
        let at = o + 5 * HUGE_PAGE_SIZE + (100 << 10);
        touch_pages(&c, &x, at, at + PAGE_SIZE);
        let b = PageRange::new((x.addr() + at) & !(HUGE_PAGE_SIZE - 1), HUGE_PAGE_SIZE).unwrap();
        assert_eq!(
            on(&c, b, Processor::Device(dev0(&c))),
            expect,
            "pressure window {pressure:?}"
        );
        c.check_invariants().unwrap();
    }
}

/// What [`spill_phases`] saw.
#[derive(Debug)]
struct Phases {
    /// Evictions after the third launch, and after the fifth.
    third: u64,
    fifth: u64,
    spilled: u64,
    revoked: u64,
    /// Chunk 4 on the device after the fourth launch, and after the fifth.
    four: bool,
    four_at_last: bool,
    /// Chunk 7 on the device after the fourth launch.
    seven: bool,
}

/// Four chunks fill an 8 MiB device in one launch; the next two launches read two more
/// chunks, then one more; a fourth launch reads an eighth chunk, a fifth chunk 4 again.
fn spill_phases(spill: bool) -> Phases {
    let c = Context::builder()
        .device(device(8))
        .granularity(HUGE_PAGE_SIZE)
        .prefetcher(None)
        .stream_prefetcher(None)
        .thrashing(None)
        .spill_remote(spill)
        .build()
        .unwrap();
    let mut x = c.alloc(9 * HUGE_PAGE_SIZE).unwrap();
    fill(&mut x, |i| i as u32);
    let o = to_block(&x);
    let chunk = |k: u64| o + k * HUGE_PAGE_SIZE;
    touch_pages(&c, &x, chunk(0), chunk(4));
    assert!((0..4).all(|k| chunk_on_device(&c, &x, k)));
    // The four chunks were used by one of the two launches before: with spilling they stay,
    // and the new chunks are read where they are.
    touch_pages(&c, &x, chunk(4), chunk(6));
    touch_pages(&c, &x, chunk(6), chunk(7));
    let third = c.stats().evictions;
    // No launch used chunks 0-3 since three launches ago: the launch revokes the spilled
    // mappings, and a fault may evict them now.
    touch_pages(&c, &x, chunk(7), chunk(8));
    let (four, seven) = (chunk_on_device(&c, &x, 4), chunk_on_device(&c, &x, 7));
    // Chunk 4 faults again, and comes in.
    touch_pages(&c, &x, chunk(4), chunk(5));
    let s = c.stats();
    let four_at_last = chunk_on_device(&c, &x, 4);
    // Every word is still what the CPU wrote.
    let v = x.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &w)| w == i as u32));
    drop(v);
    c.check_invariants().unwrap();
    Phases {
        third,
        fifth: s.evictions,
        spilled: s.pages_spilled,
        revoked: s.spill_revocations,
        four,
        four_at_last,
        seven,
    }
}

#[test]
fn a_full_device_that_spills_keeps_its_working_set_and_maps_the_rest_remotely() {
    let p = spill_phases(true);
    let chunk = HUGE_PAGE_SIZE / PAGE_SIZE;
    assert_eq!(p.third, 0, "the working set was evicted: {p:?}");
    assert_eq!(p.spilled, 3 * chunk, "{p:?}");
    assert!(!p.four, "chunk 4 migrated in: {p:?}");
    assert!(
        p.seven,
        "chunk 7 did not migrate into the room made for it: {p:?}"
    );
    // Once the device had room, the spilled chunks' mappings went, and chunk 4 came in.
    assert_eq!(p.revoked, 3 * chunk, "{p:?}");
    assert!(p.four_at_last, "{p:?}");
    assert!(
        p.fifth >= 2,
        "chunks out of the working set were kept: {p:?}"
    );
}

#[test]
fn without_spilling_a_full_device_evicts_for_every_new_chunk() {
    let p = spill_phases(false);
    assert!(p.third >= 3, "{p:?}");
    assert_eq!((p.spilled, p.revoked), (0, 0));
    assert!(p.four && p.seven && p.four_at_last, "{p:?}");
}

#[test]
fn a_spilled_region_read_again_and_again_migrates_in_by_its_access_counts() {
    // Spilled pages are mapped where they are, so they never fault again: only their remote
    // accesses can show that they are reread, and the counters' notifications make room for
    // them even while every chunk is in use.
    let c = Context::builder()
        .device(device(8))
        .granularity(HUGE_PAGE_SIZE)
        .prefetcher(None)
        .stream_prefetcher(None)
        .thrashing(None)
        .spill_remote(true)
        .access_counters(Some(
            hetmem_core::policy::access_counters::AccessCounterConfig {
                threshold: 64,
                ..Default::default()
            },
        ))
        .build()
        .unwrap();
    let mut x = c.alloc(6 * HUGE_PAGE_SIZE).unwrap();
    fill(&mut x, |i| i as u32);
    let o = to_block(&x);
    let chunk = |k: u64| o + k * HUGE_PAGE_SIZE;
    let four = PageRange::new(x.addr() + chunk(4), HUGE_PAGE_SIZE).unwrap();
    let here = |c: &Context| on(c, four, Processor::Device(dev0(c)));
    // Each launch reads the working set and one word of every page of chunk 4 (16 accesses
    // per 64 KiB counter region and launch).
    touch_pages(&c, &x, chunk(0), chunk(4));
    touch_pages(&c, &x, chunk(4), chunk(5));
    assert_eq!(here(&c), 0, "chunk 4 was not spilled");
    assert!(c.stats().pages_spilled > 0);
    for _ in 0..6 {
        touch_pages(&c, &x, chunk(0), chunk(5));
    }
    // Notifications are serviced while a launch is in flight (those taken after one, during
    // the next): launches until a region came in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while here(&c) == 0 && std::time::Instant::now() < deadline {
        touch_pages(&c, &x, chunk(0), chunk(5));
    }
    let s = c.stats();
    assert!(s.counter_notifications > 0, "{s:?}");
    assert!(here(&c) > 0, "no counter region of chunk 4 came in: {s:?}");
    assert!(s.evictions > 0, "{s:?}");
    let v = x.view::<u32>();
    assert!(v.iter().enumerate().all(|(i, &w)| w == i as u32));
    drop(v);
    c.check_invariants().unwrap();
}

#[test]
fn a_lane_that_needs_more_blocks_than_device_memory_holds_still_completes() {
    // Two chunks of device memory, whole-block windows, no thrashing detection (whose pins would
    // map the pages remotely): each lane reads a word from three 2 MiB blocks and writes one in
    // a fourth. Every fault evicts a block another access of the same lane needs; a lane that
    // started over after each miss never completed (issue 5). A GPU replays the faulting access,
    // not the thread: the lane goes on from there.
    let c = Context::builder()
        .device(device(4))
        .granularity(HUGE_PAGE_SIZE)
        .prefetcher(None)
        .stream_prefetcher(None)
        .thrashing(None)
        .build()
        .unwrap();
    let mut x = c.alloc(4 * HUGE_PAGE_SIZE).unwrap();
    fill(&mut x, |i| i as u32);
    let base = x.addr();
    let words = HUGE_PAGE_SIZE / 4;
    let n = 4096;
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let a = t.load_u32(base + 4 * i)?;
        let b = t.load_u32(base + 4 * (i + words))?;
        let d = t.load_u32(base + 4 * (i + 2 * words))?;
        t.store_u32(
            base + 4 * (i + 3 * words),
            a.wrapping_add(b).wrapping_add(d),
        )
    };
    let launch = c.launch(dev0(&c), Arc::new(k), n).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(launch.wait().map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("the launch made no progress in 60 s: {:?}", c.stats()),
    }
    let v = x.view::<u32>();
    for i in 0..n as usize {
        let w = words as usize;
        let want = (i as u32)
            .wrapping_add((i + w) as u32)
            .wrapping_add((i + 2 * w) as u32);
        assert_eq!(v[i + 3 * w], want, "x[{}]", i + 3 * w);
    }
    drop(v);
    c.check_invariants().unwrap();
}
