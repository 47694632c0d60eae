//! Each policy on and off on a workload built to need it, with the statistics that show it
//! acting (issue 4, "Must show"): the tree prefetcher cuts fault batches, the stream detector
//! migrates ahead of a streaming kernel, access counters pull a hot remote range into the device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem_core::{
    link::{Cause, LinkModel, ModelTime},
    policy::{access_counters::AccessCounterConfig, prefetch::StreamConfig},
    PageRange, HUGE_PAGE_SIZE, PAGE_SIZE,
};
use hetmem_runtime::{Advice, Context, ContextBuilder, Managed, Processor, Trigger};
use hetmem_sim::accel::{AccelConfig, AccelStats, Miss, Thread};

fn device() -> AccelConfig {
    AccelConfig {
        memory_bytes: 64 << 20,
        compute_units: 2,
        link: LinkModel::off(),
        ..AccelConfig::default()
    }
}

fn builder() -> ContextBuilder {
    Context::builder().device(device())
}

/// Sums every u32 of `x` into `out[0]`, one thread per 64 bytes, in address order.
fn stream_sum(c: &Context, x: &Managed, out: &Managed) -> AccelStats {
    let (base, o) = (x.addr(), out.addr());
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let mut s = 0u32;
        for w in 0..16 {
            s = s.wrapping_add(t.load_u32(base + 64 * i + 4 * w)?);
        }
        t.atomic_add_u32(o, s).map(|_| ())
    };
    let d = c.devices()[0];
    c.launch(d, Arc::new(k), x.len() / 64)
        .unwrap()
        .wait()
        .unwrap();
    c.device(d).unwrap().stats()
}

fn data(c: &Context, bytes: u64) -> (Managed, Managed, u32) {
    let mut x = c.alloc(bytes).unwrap();
    let mut v = x.view_mut::<u32>();
    for (i, e) in v.iter_mut().enumerate() {
        *e = (i as u32).wrapping_mul(2654435761);
    }
    let sum = v.iter().fold(0u32, |a, &b| a.wrapping_add(b));
    drop(v);
    (x, c.alloc(PAGE_SIZE).unwrap(), sum)
}

fn result(out: &Managed) -> u32 {
    out.view::<u32>()[0]
}

#[test]
fn the_tree_prefetcher_cuts_fault_batches() {
    let mut batches = Vec::new();
    for on in [false, true] {
        let b = builder();
        let c = if on { b } else { b.prefetcher(None) }.build().unwrap();
        let (x, out, sum) = data(&c, 8 << 20);
        let s = stream_sum(&c, &x, &out);
        assert_eq!(result(&out), sum, "prefetcher on: {on}");
        let rs = c.stats();
        if on {
            assert!(rs.pages_tree_prefetch > 0, "{rs:?}");
        } else {
            assert_eq!(rs.pages_tree_prefetch, 0);
        }
        eprintln!(
            "tree prefetcher {on}: {} batches, {} faults, {} pages prefetched",
            s.batches, s.faults_read, rs.pages_tree_prefetch
        );
        batches.push((s.batches, s.faults_read));
        c.check_invariants().unwrap();
    }
    let (off, on) = (batches[0], batches[1]);
    assert!(on.1 * 2 < off.1, "faults: off {off:?}, on {on:?}");
    assert!(on.0 < off.0, "batches: off {off:?}, on {on:?}");
}

#[test]
fn the_stream_detector_migrates_ahead_of_a_streaming_kernel() {
    let mut faults = Vec::new();
    for on in [false, true] {
        let b = builder().prefetcher(None);
        let b = if on {
            b.stream_prefetcher(Some(StreamConfig::default()))
        } else {
            b
        };
        let c = b.build().unwrap();
        let (x, out, sum) = data(&c, 8 << 20);
        let s = stream_sum(&c, &x, &out);
        assert_eq!(result(&out), sum, "stream detector on: {on}");
        let rs = c.stats();
        assert_eq!(rs.pages_stream_prefetch > 0, on, "{rs:?}");
        eprintln!(
            "stream detector {on}: {} batches, {} faults, {} pages ahead",
            s.batches, s.faults_read, rs.pages_stream_prefetch
        );
        faults.push(s.faults_read);
        c.check_invariants().unwrap();
    }
    assert!(faults[1] < faults[0], "faults off/on: {faults:?}");
}

#[test]
fn with_whole_block_windows_the_stream_detector_still_prefetches_ahead() {
    // Each fault migrates its whole 2 MiB block, so a sequential walk faults once per block,
    // each fault 512 pages past the last: the detector must see what the faults brought in,
    // not only the faulted pages, or it never recognises the walk (issue 5).
    let mut faults = Vec::new();
    for on in [false, true] {
        // Batches of the warps in flight, not of what a fixed wait caught: on a loaded host the
        // counts of the two runs otherwise overlap.
        let b = Context::builder()
            .device(AccelConfig {
                fault_coalesce: Duration::from_millis(50),
                coalesce_until_stalled: true,
                ..device()
            })
            .prefetcher(None)
            .granularity(HUGE_PAGE_SIZE);
        let b = if on {
            b.stream_prefetcher(Some(StreamConfig::default()))
        } else {
            b
        };
        let c = b.build().unwrap();
        let (x, out, sum) = data(&c, 16 << 20);
        let s = stream_sum(&c, &x, &out);
        assert_eq!(result(&out), sum, "stream detector on: {on}");
        let rs = c.stats();
        assert_eq!(rs.pages_stream_prefetch > 0, on, "{rs:?}");
        let d = c.device_stats(c.devices()[0]).unwrap();
        assert_eq!(
            d.migrations.get(Trigger::Prefetch).from_system > 0,
            on,
            "blocks ahead came in as prefetches: {d:?}"
        );
        faults.push(s.faults_read);
        c.check_invariants().unwrap();
    }
    assert!(faults[1] < faults[0], "faults off/on: {faults:?}");
}

/// A context whose faults bring in whole 2 MiB blocks and whose stream detector reads ahead (no
/// tree prefetcher).
fn whole_block_walker(config: AccelConfig) -> Context {
    Context::builder()
        .device(config)
        .prefetcher(None)
        .granularity(HUGE_PAGE_SIZE)
        .stream_prefetcher(Some(StreamConfig::default()))
        .build()
        .unwrap()
}

/// One thread loads the word at `at`: one fault, when it is not resident. Returns the device.
fn load_once(c: &Context, at: u64) -> hetmem_core::DeviceId {
    let k = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> { t.load_u32(at).map(|_| ()) };
    let d = c.devices()[0];
    c.launch(d, Arc::new(k), 1).unwrap().wait().unwrap();
    d
}

#[test]
fn a_block_the_detector_brings_in_costs_the_service_a_faulted_block_does() {
    // Only the per-block service costs anything: the fault service's modelled time counts the
    // blocks it serviced. One thread faults once on the allocation's first page; its block
    // comes in by the fault, those ahead by the detector, and each costs the populate, unmap
    // and map a faulted block costs (they were free, so readahead looked cheaper than it is).
    let per_block = ModelTime::from_micros(10);
    let mut link = LinkModel::off();
    link.faults.per_vablock = per_block;
    let c = whole_block_walker(AccelConfig { link, ..device() });
    let (x, _, _) = data(&c, 8 << 20);
    let d = load_once(&c, x.addr());
    let dev = c.device(d).unwrap();
    assert_eq!(dev.stats().batches, 1);
    assert!(dev.stats().policy_migrations > 0, "{:?}", dev.stats());
    // The 2 MiB blocks of `x` that hold device pages now, each moved once.
    let gpu = Processor::Device(d);
    let first = x.addr() & !(HUGE_PAGE_SIZE - 1);
    let moved = (first..x.addr() + x.len())
        .step_by(HUGE_PAGE_SIZE as usize)
        .filter(|&b| {
            let r = PageRange::new(b, HUGE_PAGE_SIZE)
                .unwrap()
                .intersect(&x.range())
                .unwrap();
            c.residency(r).iter().any(|(_, p)| *p == gpu)
        })
        .count() as u64;
    assert!(moved > 1, "the detector brought blocks ahead");
    let service = dev.clock().get(Cause::FaultService);
    assert_eq!(service, per_block.saturating_mul(moved), "{moved} blocks");
    c.check_invariants().unwrap();
}

#[test]
fn a_walk_from_an_allocations_first_page_reads_ahead_from_its_first_fault() {
    // One thread, one fault: from the allocation's first page the detector reads ahead at once
    // (a read at the start of a file gets the initial readahead window); from inside the
    // allocation it waits for the walk to be confirmed, as before.
    for from_head in [true, false] {
        let c = whole_block_walker(device());
        let (x, _, _) = data(&c, 8 << 20);
        let block_end = (x.addr() + 1).next_multiple_of(HUGE_PAGE_SIZE);
        let d = load_once(&c, if from_head { x.addr() } else { block_end });
        assert_eq!(c.device(d).unwrap().stats().batches, 1);
        let gpu = Processor::Device(d);
        let on = |r: PageRange| -> u64 {
            c.residency(r)
                .iter()
                .filter(|(_, p)| *p == gpu)
                .map(|(r, _)| r.npages())
                .sum()
        };
        // The faulted block (clipped to the allocation), and with a head the pages past it
        // that the detector handed out (each prefetched block comes in whole, and what it
        // brought advances the stream again).
        let block = if from_head {
            PageRange::from_bounds(x.addr(), block_end).unwrap()
        } else {
            PageRange::new(block_end, HUGE_PAGE_SIZE).unwrap()
        };
        assert_eq!(on(block), block.npages(), "head {from_head}");
        let ahead = c.stats().pages_stream_prefetch;
        if from_head {
            let next = PageRange::new(block_end, HUGE_PAGE_SIZE).unwrap();
            assert_eq!(on(next), next.npages(), "the next block came in ahead");
            assert!(ahead > 0);
        } else {
            assert_eq!(ahead, 0);
            assert_eq!(on(x.range()), block.npages());
        }
        c.check_invariants().unwrap();
    }
}

#[test]
fn the_stream_detectors_count_is_what_it_migrated_not_what_advice_kept_out() {
    // One warp walks 2 MiB in 4 KiB windows, so the detector is confirmed and reads ahead
    // deeper and deeper. Advised, pages 64..192 are preferred on the CPU: the detector's
    // readahead reaches into them and they stay put. The count must be what moved, not what
    // the detector asked for (it counted the kept pages too).
    for advised in [false, true] {
        let c = Context::builder()
            .device(AccelConfig {
                compute_units: 1,
                warps_per_cu: 1,
                ..device()
            })
            .prefetcher(None)
            .thrashing(None)
            .stream_prefetcher(Some(StreamConfig::default()))
            .build()
            .unwrap();
        let (x, out, sum) = data(&c, 2 << 20);
        if advised {
            let kept = PageRange::new(x.addr() + 64 * PAGE_SIZE, 128 * PAGE_SIZE).unwrap();
            c.advise(kept, Advice::SetPreferredLocation(Processor::Cpu))
                .unwrap();
        }
        stream_sum(&c, &x, &out);
        assert_eq!(result(&out), sum);
        let rs = c.stats();
        let d = c.device_stats(c.devices()[0]).unwrap();
        let kept = if advised { 128 } else { 0 };
        // Every page of x but the kept ones moved, and the output's page.
        assert_eq!(d.pages_from_system, 512 - kept + 1, "{d:?}");
        assert!(
            rs.pages_stream_prefetch > 0,
            "the detector read ahead: {rs:?}"
        );
        // What faulted moved too: the readahead's share is less than all that moved.
        assert!(
            rs.pages_stream_prefetch < 512 - kept,
            "advised {advised}: {} pages counted, {} moved",
            rs.pages_stream_prefetch,
            d.pages_from_system
        );
        c.check_invariants().unwrap();
    }
}

#[test]
fn access_counters_pull_a_hot_remote_range_into_the_device() {
    for on in [false, true] {
        let b = builder();
        let b = if on {
            b.access_counters(Some(AccessCounterConfig {
                threshold: 64,
                ..AccessCounterConfig::default()
            }))
        } else {
            b
        };
        let c = b.build().unwrap();
        let d = c.devices()[0];
        let (x, out, sum) = data(&c, 1 << 20);
        // Placed on the CPU: the device maps it remotely and counts its accesses.
        c.advise(x.range(), Advice::SetPreferredLocation(Processor::Cpu))
            .unwrap();
        let first = stream_sum(&c, &x, &out);
        assert!(first.remote_accesses > 0);
        if !on {
            assert_eq!(first.pages_to_device, 1, "only the output page migrates");
        }
        // Notifications are serviced while a launch is in flight, those taken after it during
        // the next one: launches until the range came in.
        let deadline = Instant::now() + Duration::from_secs(5);
        let on_device = || {
            c.residency(x.range())
                .iter()
                .filter(|(_, p)| *p == Processor::Device(d))
                .map(|(r, _)| r.npages())
                .sum::<u64>()
        };
        let mut launches = 2u32;
        while on && on_device() < x.range().npages() && Instant::now() < deadline {
            stream_sum(&c, &x, &out);
            launches += 1;
        }
        let before = c.device(d).unwrap().stats();
        let s = stream_sum(&c, &x, &out);
        let rs = c.stats();
        let counted = rs.migrations.get(Trigger::AccessCounter).from_system;
        if on {
            assert!(rs.counter_notifications > 0, "{rs:?}");
            assert!(s.policy_migrations > 0);
            // Every page of the range came in on the counters' account (the output page on the
            // fault's).
            assert_eq!(counted, x.range().npages(), "{:?}", rs.migrations);
            assert_eq!(on_device(), x.range().npages(), "the hot range moved in");
            assert!(
                s.remote_accesses - before.remote_accesses < first.remote_accesses,
                "fewer remote accesses once local: first {}, then {}",
                first.remote_accesses,
                s.remote_accesses - before.remote_accesses
            );
        } else {
            assert_eq!(rs.counter_notifications, 0);
            assert_eq!(s.policy_migrations, 0);
            assert_eq!(counted, 0);
            assert_eq!(on_device(), 0, "without counters the range stays remote");
        }
        assert_eq!(result(&out), sum.wrapping_mul(launches));
        c.check_invariants().unwrap();
    }
}

#[test]
fn an_access_counter_migration_moves_only_what_the_device_reached() {
    // A counter region is 64 KiB: small allocations share one. The notification for the one the
    // device reads remotely must not bring in its neighbours (another allocation's pages, maybe
    // another context's).
    let c = builder()
        .access_counters(Some(AccessCounterConfig {
            threshold: 64,
            ..AccessCounterConfig::default()
        }))
        .build()
        .unwrap();
    let d = c.devices()[0];
    let mut xs: Vec<Managed> = (0..32).map(|_| c.alloc(16 << 10).unwrap()).collect();
    for x in &mut xs {
        x.view_mut::<u32>().fill(3);
    }
    let region = |x: &Managed| x.addr() & !((64 << 10) - 1);
    let k = (0..xs.len())
        .find(|&k| (0..xs.len()).any(|j| j != k && region(&xs[j]) == region(&xs[k])))
        .expect("32 allocations of 16 KiB, none sharing a 64 KiB region with another");
    let out = c.alloc(PAGE_SIZE).unwrap();
    c.advise(xs[k].range(), Advice::SetPreferredLocation(Processor::Cpu))
        .unwrap();
    let on_device = |x: &Managed| {
        c.residency(x.range())
            .iter()
            .filter(|(_, p)| *p == Processor::Device(d))
            .map(|(r, _)| r.npages())
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut s = stream_sum(&c, &xs[k], &out);
    assert!(s.remote_accesses > 0);
    while on_device(&xs[k]) < 4 && Instant::now() < deadline {
        s = stream_sum(&c, &xs[k], &out);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(s.policy_migrations > 0, "{s:?}");
    assert_eq!(on_device(&xs[k]), 4, "the range the device reads moved in");
    for (j, x) in xs.iter().enumerate().filter(|(j, _)| *j != k) {
        assert_eq!(on_device(x), 0, "allocation {j} the device never touched");
    }
    c.check_invariants().unwrap();
}
