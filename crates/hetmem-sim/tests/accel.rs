//! The simulated accelerator end to end: kernels whose results equal the CPU's, on data that
//! starts on the CPU, with faults batched and replayed, a full fault ring, atomics, fatal faults
//! that name their address and access, and the no-retry mode.

use std::sync::Arc;

use hetmem::{AddressSpace, Prot};
use hetmem_core::{
    addr::PAGES_PER_HUGE, fault_ring::FaultAccess, link::Cause, PageRange, VirtAddr,
    HUGE_PAGE_SIZE, PAGE_SIZE,
};
use hetmem_sim::accel::{AccelConfig, Accelerator, LaunchError, Miss, Thread};
use hetmem_sim::placement::Granularity;

fn mm() -> &'static Arc<AddressSpace> {
    AddressSpace::current().unwrap()
}

fn alloc_u32(n: u64, f: impl Fn(u64) -> u32) -> PageRange {
    let bytes = (n * 4).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let r = mm()
        .map_anonymous(bytes, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let data: Vec<u8> = (0..n).flat_map(|i| f(i).to_ne_bytes()).collect();
    mm().cpu_write(r.start(), &data).unwrap();
    r
}

fn read_u32(r: PageRange, n: u64) -> Vec<u32> {
    for a in r.pages() {
        hetmem::cpu_touch(a).unwrap();
    }
    let mut buf = vec![0u8; (n * 4) as usize];
    mm().cpu_read(r.start(), &mut buf).unwrap();
    buf.chunks_exact(4)
        .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
        .collect()
}

/// Two compute units, 64 MiB, pure demand paging (each faulted page on its own), so that tests
/// see the faults their kernels make.
fn small() -> AccelConfig {
    AccelConfig {
        memory_bytes: 64 << 20,
        compute_units: 2,
        placement: Arc::new(Granularity::page()),
        ..AccelConfig::default()
    }
}

#[test]
fn vector_add_equals_the_cpu_result_and_faults_in_batches() {
    let n = 64 * 1024; // 256 KiB per array
    let a = alloc_u32(n, |i| i as u32);
    let b = alloc_u32(n, |i| 3 * i as u32 + 7);
    let c = alloc_u32(n, |_| 0);
    let acc = Accelerator::new(small()).unwrap();
    let (pa, pb, pc) = (a.start().0, b.start().0, c.start().0);
    let kernel = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(pa + 4 * i)?;
        let y = t.load_u32(pb + 4 * i)?;
        t.store_u32(pc + 4 * i, x.wrapping_add(y))
    };
    let report = acc.launch(Arc::new(kernel), n).unwrap().wait().unwrap();
    let s = acc.stats();
    assert!(s.faults_read > 0 && s.faults_write > 0, "{s:?}");
    assert!(s.batches > 0 && s.replays > 0, "{s:?}");
    assert!(
        s.batched_faults >= s.batches,
        "a batch holds at least one fault"
    );
    assert!(
        s.pages_to_device >= 3 * 64,
        "a, b and c moved into device memory: {s:?}"
    );
    assert!(report.modelled.get(Cause::FaultService).as_nanos() > 0);
    assert!(report.modelled.get(Cause::MigrateToDevice).as_nanos() > 0);
    acc.check_invariants().unwrap();
    // The CPU reads the result: device pages come back on CPU faults.
    let got = read_u32(c, n);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, (i as u32).wrapping_add(3 * i as u32 + 7), "c[{i}]");
    }
    assert!(acc.stats().pages_to_host >= 64, "{:?}", acc.stats());
    mm().check_invariants().unwrap();
}

#[test]
fn pages_to_host_counts_pages_and_cpu_faults_count_faults() {
    // An untouched, aligned 2 MiB block written by the device moves as one (2 MiB windows),
    // and one CPU touch brings it all back.
    let block = mm()
        .map_anonymous_aligned(HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, Prot::READ | Prot::WRITE)
        .unwrap();
    let acc = Accelerator::new(AccelConfig {
        placement: Arc::new(Granularity::default()),
        ..small()
    })
    .unwrap();
    let base = block.start().0;
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.store_u32(base + 4 * i, i as u32)
    });
    acc.launch(k, HUGE_PAGE_SIZE / 4).unwrap().wait().unwrap();
    let r = mm().region_of(block.start()).unwrap();
    assert!(r.states.get(r.index(block.start())).huge, "moved as one");
    let before = acc.stats();
    hetmem::cpu_touch(block.page(3)).unwrap();
    let s = acc.stats();
    assert_eq!(s.cpu_faults - before.cpu_faults, 1, "{s:?}");
    assert_eq!(
        s.pages_to_host - before.pages_to_host,
        PAGES_PER_HUGE,
        "the whole block came back: {s:?}"
    );
    assert_eq!(read_u32(block, HUGE_PAGE_SIZE / 4)[4097], 4097);
    assert_eq!(
        acc.stats().cpu_faults,
        s.cpu_faults,
        "nothing else was on the device"
    );
}

#[test]
fn every_serviced_fault_has_a_latency_and_the_modelled_one_is_its_batch_service() {
    let n = 32 * 1024;
    let a = alloc_u32(n, |i| i as u32);
    let out = alloc_u32(n, |_| 0);
    let acc = Accelerator::new(AccelConfig {
        link: hetmem_core::link::LinkModel::pcie3_x16(),
        ..small()
    })
    .unwrap();
    let (pa, po) = (a.start().0, out.start().0);
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(pa + 4 * i)?;
        t.store_u32(po + 4 * i, x + 1)
    });
    acc.launch(k, n).unwrap().wait().unwrap();
    let s = acc.stats();
    let l = acc.fault_latency();
    assert_eq!(l.wall.count(), s.batched_faults, "{s:?}");
    assert_eq!(l.modelled.count(), s.batched_faults);
    // A batch's service costs at least its fixed cost and a replay (link.rs FaultCosts::UVM),
    // and a fault waits at least that long in modelled time.
    let p50 = l.modelled.quantile(0.5).unwrap();
    assert!(p50 >= std::time::Duration::from_micros(20), "{p50:?}");
    assert!(l.modelled.quantile(0.99).unwrap() >= p50);
    assert!(l.wall.quantile(0.5).unwrap() > std::time::Duration::ZERO);
    // Charged from outside (a runtime's eviction): one transfer on the device clock.
    let before = acc.clock();
    acc.charge_migration(hetmem_core::link::Direction::DeviceToHost, 2 << 20);
    let d = acc.clock().since(&before);
    assert_eq!(d.charges_of(Cause::MigrateToHost), 1);
    assert!(d.get(Cause::MigrateToHost).as_nanos() > 100_000, "{d:?}");
}

#[test]
fn with_coalesce_until_stalled_a_batch_holds_every_warp_in_flight_and_no_more_waiting() {
    // 96 warps, all resident (2 units of 48), each reading its own page: the first batch holds
    // the 96 faults, every run. The limit is 10 s: only the units' stalls can end the wait
    // sooner. The second launch has the warps of one unit fault and the other unit's finish
    // without a fault: a finished unit no longer counts.
    let warps = 96u64;
    let n = warps * 32;
    for round in 0..3 {
        let a = alloc_u32(n * 1024, |i| i as u32);
        let acc = Accelerator::new(AccelConfig {
            fault_coalesce: std::time::Duration::from_secs(10),
            coalesce_until_stalled: true,
            ..small()
        })
        .unwrap();
        let pa = a.start().0;
        let started = std::time::Instant::now();
        let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            t.load_u32(pa + PAGE_SIZE * (i / 32)).map(drop)
        });
        acc.launch(k, n).unwrap().wait().unwrap();
        let s = acc.stats();
        assert_eq!(
            (s.batches, s.batched_faults),
            (1, warps),
            "round {round}: {s:?}"
        );
        // Odd warps run on unit 1 (warp w on unit w % 2) and touch pages already there.
        let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            let w = i / 32;
            let page = if w % 2 == 1 { w } else { warps + w };
            t.load_u32(pa + PAGE_SIZE * page).map(drop)
        });
        acc.launch(k, n).unwrap().wait().unwrap();
        let t = acc.stats();
        assert_eq!(
            (t.batches - s.batches, t.batched_faults - s.batched_faults),
            (1, warps / 2),
            "round {round}: {t:?}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "a batch waited for its limit: {:?}",
            started.elapsed()
        );
        acc.check_invariants().unwrap();
    }
}

#[test]
fn a_finished_launch_leaves_nothing_serviced_behind_its_wait() {
    // One page read by 32 warps: they all fault on it during the first batch's interrupt
    // moderation pause. Batches of 3 without a flush service one entry's page and replay; the
    // warps then hit and the launch finishes with the other 29 entries still in the ring, the
    // last 2 of which wait out another pause before they are read.
    let n = 1024;
    let a = alloc_u32(n, |i| i as u32);
    let acc = Accelerator::new(AccelConfig {
        batch_size: 3,
        fault_coalesce: std::time::Duration::from_millis(20),
        replay: hetmem_core::fault_ring::ReplayPolicy::Batch,
        ..small()
    })
    .unwrap();
    let pa = a.start().0;
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.load_u32(pa + 4 * i).map(drop)
    });
    acc.launch(k, n).unwrap().wait().unwrap();
    // Every fault the launch's wait saw serviced has its latency recorded.
    let s = acc.stats();
    assert_eq!(acc.fault_latency().wall.count(), s.batched_faults, "{s:?}");
    assert_eq!(s.pages_to_device, 1, "{s:?}");
    // The CPU takes the page back; the launch's leftovers have time to be read.
    hetmem::cpu_touch(a.start()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let t = acc.stats();
    assert_eq!(
        t.pages_to_device, s.pages_to_device,
        "a leftover fault of the finished launch pulled the page back: {t:?}"
    );
    assert_eq!(
        t.batched_faults, s.batched_faults,
        "serviced after the wait: {t:?}"
    );
    assert_eq!(read_u32(a, n)[77], 77);
    acc.check_invariants().unwrap();
}

#[test]
fn a_lane_resumes_after_a_miss_and_does_not_repeat_what_it_completed() {
    // Each lane bumps a counter, stores, then reads a page that is not resident: it misses
    // after its atomic and its store, and after the replay goes on from the read.
    let n = 1024;
    let counter = alloc_u32(1, |_| 0);
    let marks = alloc_u32(n, |_| 0);
    let far = alloc_u32(n, |i| 5 * i as u32);
    let acc = Accelerator::new(small()).unwrap();
    let (pc, pm, pf) = (counter.start().0, marks.start().0, far.start().0);
    // The counter's and the marks' pages first, so that only `far` misses below.
    let warm = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.load_u32(pc)?;
        t.store_u32(pm + 4 * i, 0)
    });
    acc.launch(warm, n).unwrap().wait().unwrap();
    let before = acc.stats();
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let ticket = t.atomic_add_u32(pc, 1)?;
        t.store_u32(pm + 4 * i, ticket + 1)?;
        let x = t.load_u32(pf + 4 * i)?;
        t.store_u32(pm + 4 * i, (ticket + 1) ^ x)
    });
    acc.launch(k, n).unwrap().wait().unwrap();
    let s = acc.stats();
    assert!(s.lane_retries > before.lane_retries, "lanes missed: {s:?}");
    assert_eq!(read_u32(counter, 1)[0], n as u32, "one atomic per lane");
    // Every lane kept its ticket across its miss: the tickets are 0..n, each once.
    let far_v = read_u32(far, n);
    let mut tickets: Vec<u32> = read_u32(marks, n)
        .iter()
        .zip(&far_v)
        .map(|(m, x)| (m ^ x) - 1)
        .collect();
    tickets.sort_unstable();
    assert_eq!(tickets, (0..n as u32).collect::<Vec<_>>());
    acc.check_invariants().unwrap();
}

#[test]
fn a_kernel_whose_replay_takes_other_accesses_fails_the_launch() {
    // Not a deterministic function of its thread index and what it read: its second execution
    // reads another word than its first did before the miss.
    let here = alloc_u32(1024, |i| i as u32);
    let far = alloc_u32(1024, |i| i as u32);
    let acc = Accelerator::new(small()).unwrap();
    let (ph, pf) = (here.start().0, far.start().0);
    let warm = Arc::new(move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.load_u32(ph).map(drop)
    });
    acc.launch(warm, 1).unwrap().wait().unwrap();
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let k = Arc::new(move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let run = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        t.load_u32(ph + 4 * (run % 1024))?;
        t.load_u32(pf).map(drop)
    });
    let err = acc.launch(k, 1).unwrap().wait().unwrap_err();
    let LaunchError::Fatal { addr, reason, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*addr, VirtAddr(ph + 4), "{err:?}");
    assert!(reason.contains("deterministic"), "{reason}");
}

#[test]
fn cpu_writes_between_launches_are_seen_by_the_next_launch() {
    let n = 8 * 1024;
    let a = alloc_u32(n, |i| i as u32);
    let out = alloc_u32(n, |_| 0);
    let acc = Accelerator::new(small()).unwrap();
    let (pa, po) = (a.start().0, out.start().0);
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(pa + 4 * i)?;
        t.store_u32(po + 4 * i, x * 2)
    });
    acc.launch(k.clone(), n).unwrap().wait().unwrap();
    assert_eq!(read_u32(out, n)[100], 200);
    // The CPU rewrites `a`, which lives in device memory now: its pages come back first, and
    // the device's mappings are invalidated.
    let data: Vec<u8> = (0..n)
        .flat_map(|i| (i as u32 + 1000).to_ne_bytes())
        .collect();
    for p in a.pages() {
        hetmem::cpu_touch(p).unwrap();
    }
    mm().cpu_write(a.start(), &data).unwrap();
    acc.launch(k, n).unwrap().wait().unwrap();
    let got = read_u32(out, n);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 2 * (i as u32 + 1000), "out[{i}]");
    }
    assert!(acc.stats().tlb_invalidations > 0);
    acc.check_invariants().unwrap();
}

#[test]
fn atomics_from_every_thread_sum_exactly() {
    let n = 4096;
    let counter = alloc_u32(1, |_| 5);
    let acc = Accelerator::new(small()).unwrap();
    let pc = counter.start().0;
    let k = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.atomic_add_u32(pc, 1)?;
        Ok(())
    };
    acc.launch(Arc::new(k), n).unwrap().wait().unwrap();
    assert_eq!(read_u32(counter, 1)[0], 5 + n as u32);
    assert!(acc.stats().faults_atomic > 0);
}

#[test]
fn non_replayable_faults_lost_to_a_full_ring_are_counted_and_fail_the_launch() {
    let n = 32 * 1024;
    let a = alloc_u32(n, |i| i as u32);
    let acc = Accelerator::new(AccelConfig {
        retry: false,
        ring_capacity: 2,
        batch_size: 1,
        compute_units: 4,
        // The service waits before it fetches, so the faults of many warps pile up first.
        fault_coalesce: std::time::Duration::from_millis(20),
        ..small()
    })
    .unwrap();
    let pa = a.start().0;
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let j = (i * 1021) % n;
        t.load_u32(pa + 4 * j).map(|_| ())
    };
    let err = acc.launch(Arc::new(k), n).unwrap().wait().unwrap_err();
    let LaunchError::Fatal { addr, reason, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        a.contains(*addr),
        "the error names a faulting address: {err:?}"
    );
    let s = acc.stats();
    assert!(s.nonreplayable >= 3, "{s:?}");
    assert!(
        s.faults_lost > 0,
        "a 2-entry ring lost non-replayable faults: {s:?}"
    );
    assert_eq!(s.faults_dropped, 0, "nothing replayable here: {s:?}");
    assert!(
        reason.contains("non-replayable"),
        "the reason says why: {reason}"
    );
    acc.check_invariants().unwrap();
}

#[test]
fn a_full_fault_ring_drops_faults_that_come_back_on_replay() {
    let n = 32 * 1024; // 128 KiB per array, 32 pages each: many warps fault at once
    let a = alloc_u32(n, |i| i as u32 ^ 0x55);
    let out = alloc_u32(n, |_| 0);
    let acc = Accelerator::new(AccelConfig {
        ring_capacity: 4,
        batch_size: 2,
        compute_units: 4,
        ..small()
    })
    .unwrap();
    let (pa, po) = (a.start().0, out.start().0);
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        // A strided walk so that every warp touches pages of its own.
        let j = (i * 1021) % n;
        let x = t.load_u32(pa + 4 * j)?;
        t.store_u32(po + 4 * j, x + 1)
    };
    acc.launch(Arc::new(k), n).unwrap().wait().unwrap();
    let got = read_u32(out, n);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, (i as u32 ^ 0x55) + 1, "out[{i}]");
    }
    let s = acc.stats();
    assert!(s.faults_dropped > 0, "the 4-entry ring overflowed: {s:?}");
    acc.check_invariants().unwrap();
}

#[test]
fn a_fault_on_unmapped_memory_fails_the_launch_with_its_address_and_access() {
    let acc = Accelerator::new(small()).unwrap();
    // A hole: mapped, then unmapped again.
    let r = mm()
        .map_anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    // SAFETY: nothing references the page.
    unsafe { mm().unmap(r).unwrap() };
    let bad = r.start().0 + 8;
    let k = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.store_u32(bad, 1)?;
        Ok(())
    };
    let err = acc.launch(Arc::new(k), 1).unwrap().wait().unwrap_err();
    match err {
        LaunchError::Fatal { addr, access, .. } => {
            assert_eq!(addr.page_down(), r.start());
            assert_eq!(access, FaultAccess::Write);
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(acc.stats().fatal, 1);
}

#[test]
fn an_access_beyond_the_address_width_is_fatal() {
    let acc = Accelerator::new(AccelConfig {
        va_bits: 39,
        ..small()
    })
    .unwrap();
    let far = 1u64 << 40;
    let k = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        t.load_u32(far)?;
        Ok(())
    };
    let err = acc.launch(Arc::new(k), 1).unwrap().wait().unwrap_err();
    assert!(
        matches!(err, LaunchError::Fatal { addr: VirtAddr(a), access: FaultAccess::Read, .. } if a == far),
        "{err:?}"
    );
    // A read-only mapping written by the device is fatal as well.
    let ro = alloc_u32(1024, |i| i as u32);
    // SAFETY: no Rust reference into `ro`.
    unsafe { mm().protect(ro, Prot::READ).unwrap() };
    let p = ro.start().0;
    let k = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> { t.store_u32(p, 9) };
    let err = acc.launch(Arc::new(k), 1).unwrap().wait().unwrap_err();
    assert!(
        matches!(
            err,
            LaunchError::Fatal {
                access: FaultAccess::Write,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn without_retry_ranges_must_be_resident_before_the_launch() {
    let n = 4096;
    let a = alloc_u32(n, |i| i as u32);
    let acc = Accelerator::new(AccelConfig {
        retry: false,
        ..small()
    })
    .unwrap();
    let pa = a.start().0;
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(pa + 4 * i)?;
        t.store_u32(pa + 4 * i, x + 1)
    });
    let err = acc.launch(k.clone(), n).unwrap().wait().unwrap_err();
    assert!(matches!(err, LaunchError::Fatal { .. }), "{err:?}");
    acc.make_resident(a, true).unwrap();
    let faults_before = acc.stats().faults_read + acc.stats().faults_write;
    acc.launch(k, n).unwrap().wait().unwrap();
    assert_eq!(
        acc.stats().faults_read + acc.stats().faults_write,
        faults_before,
        "no fault once resident"
    );
    let got = read_u32(a, n);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, i as u32 + 1, "a[{i}]");
    }
}

#[test]
fn a_kernel_cannot_reach_memory_hetmem_does_not_manage() {
    let acc = Accelerator::new(small()).unwrap();
    // Ordinary heap memory of the process: mapped, readable, but not managed.
    let secret = vec![0x5a5a_5a5au32; 4096];
    let p = secret.as_ptr() as u64;
    let out = alloc_u32(1, |_| 0);
    let po = out.start().0;
    let k = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(p)?;
        t.store_u32(po, x)
    };
    let err = acc.launch(Arc::new(k), 1).unwrap().wait().unwrap_err();
    match err {
        LaunchError::Fatal { addr, access, .. } => {
            assert_eq!(addr.0, p, "the fatal fault names the address");
            assert_eq!(access, FaultAccess::Read);
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(
        read_u32(out, 1)[0],
        0,
        "nothing was read from unmanaged memory"
    );
    assert_eq!(secret[0], 0x5a5a_5a5a);
}

#[test]
fn data_split_between_device_and_cpu_gives_the_cpu_result() {
    let n = 16 * 1024; // 16 pages per array
    let a = alloc_u32(n, |i| i as u32 * 7);
    let sum = alloc_u32(n, |_| 0);
    let acc = Accelerator::new(small()).unwrap();
    // The first half of `a` starts on the device, the second half on the CPU.
    let half = PageRange::from_pages(a.start().0, a.npages() / 2).unwrap();
    acc.make_resident(half, false).unwrap();
    let (pa, ps) = (a.start().0, sum.start().0);
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(pa + 4 * i)?;
        let y = t.load_u32(ps + 4 * i)?;
        t.store_u32(ps + 4 * i, y.wrapping_add(x))
    });
    let mut expect = vec![0u32; n as usize];
    for round in 0..3u32 {
        acc.launch(k.clone(), n).unwrap().wait().unwrap();
        for (i, e) in expect.iter_mut().enumerate() {
            *e = e.wrapping_add((i as u32 * 7).wrapping_add(round));
        }
        // Between launches the CPU reads the result and adds 1 to every element of `a`: the
        // pages it touches come back from the device, the next launch faults them in again.
        let got = read_u32(sum, n);
        assert_eq!(got, expect, "round {round}");
        let next: Vec<u32> = read_u32(a, n).iter().map(|v| v.wrapping_add(1)).collect();
        let bytes: Vec<u8> = next.iter().flat_map(|v| v.to_ne_bytes()).collect();
        mm().cpu_write(a.start(), &bytes).unwrap();
    }
    acc.check_invariants().unwrap();
    mm().check_invariants().unwrap();
}

#[test]
fn a_second_device_pulls_pages_from_the_first_device_to_device() {
    let n = 16 * 1024; // 64 KiB: 16 pages
    let a = alloc_u32(n, |i| i as u32);
    let out = alloc_u32(n, |_| 0);
    let dev_a = Accelerator::new(small()).unwrap();
    let dev_b = Accelerator::new(small()).unwrap();
    let (pa, po) = (a.start().0, out.start().0);
    // Device A doubles `a` in place: its pages move into A's memory.
    let double = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(pa + 4 * i)?;
        t.store_u32(pa + 4 * i, 2 * x)
    };
    dev_a.launch(Arc::new(double), n).unwrap().wait().unwrap();
    let on_a = dev_a.memory().pool().lock().stats().pages_in_use;
    assert!(on_a >= 16, "a lives on device A: {on_a} pages");
    let to_system_before = mm().stats().pages_to_system;
    // Device B reads `a` (on A) and writes `out`: A's pages come over device to device.
    let plus_one = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(pa + 4 * i)?;
        t.store_u32(po + 4 * i, x + 1)
    };
    dev_b.launch(Arc::new(plus_one), n).unwrap().wait().unwrap();
    let s = dev_b.stats();
    assert!(s.pages_from_peers >= 16, "{s:?}");
    assert_eq!(
        mm().stats().pages_to_system,
        to_system_before,
        "nothing went through system memory"
    );
    assert!(
        dev_a.memory().pool().lock().stats().pages_in_use <= on_a - 16,
        "A's frames of `a` were freed"
    );
    assert!(
        dev_b.copy_stats().bytes() >= 16 * PAGE_SIZE,
        "B's copy engines carried the pages: {:?}",
        dev_b.copy_stats()
    );
    dev_a.check_invariants().unwrap();
    dev_b.check_invariants().unwrap();
    let got = read_u32(out, n);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 2 * i as u32 + 1, "out[{i}]");
    }
    let got = read_u32(a, n);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 2 * i as u32, "a[{i}]");
    }
    mm().check_invariants().unwrap();
}

#[test]
fn a_dropped_read_copy_leaves_nothing_behind_for_a_page_that_migrates_in_as_zeros() {
    // Page `a` holds a pattern; the device copies it (read duplication), then drops the copy, and
    // its frame goes back to the pool. Page `b` was never touched (a hole): it migrates in as
    // zeros, into the frame the pool hands out first, the one just freed. Under userfaultfd a
    // hole moves without writing its destination, so that frame must have been scrubbed.
    let a = alloc_u32(1024, |_| 0xabab_abab);
    let b = mm()
        .map_anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let acc = Accelerator::new(small()).unwrap();
    assert_eq!(acc.read_duplicate(a), 1);
    assert_eq!(acc.drop_copies(a), 1);
    acc.make_resident(b, true).unwrap();
    let st = mm().region_of(b.start()).unwrap();
    assert!(matches!(
        st.states.get(st.index(b.start())).location,
        hetmem_core::page_state::Location::Device { .. }
    ));
    assert!(read_u32(b, 1024).iter().all(|&v| v == 0), "stale bytes");
    assert!(read_u32(a, 1024).iter().all(|&v| v == 0xabab_abab));
    acc.check_invariants().unwrap();
}

#[test]
fn migrating_pages_never_populated_copies_nothing_over_the_link() {
    let acc = Accelerator::new(AccelConfig {
        link: hetmem_core::link::LinkModel::pcie3_x16(),
        ..small()
    })
    .unwrap();
    let untouched = mm()
        .map_anonymous(64 * PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let written = alloc_u32(64 * PAGE_SIZE / 4, |i| i as u32);
    let before = acc.clock();
    acc.make_resident(untouched, true).unwrap();
    let d = acc.clock().since(&before);
    assert_eq!(d.get(Cause::MigrateToDevice).as_nanos(), 0, "{d:?}");
    acc.make_resident(written, true).unwrap();
    let d = acc.clock().since(&before);
    // One transfer per 2 MiB block the range touches (it may straddle a boundary).
    let link = hetmem_core::link::LinkModel::pcie3_x16();
    let expect = written
        .chunks(hetmem_core::HUGE_PAGE_SIZE)
        .map(|c| link.transfer(hetmem_core::link::Direction::HostToDevice, c.len_bytes()))
        .fold(hetmem_core::link::ModelTime::ZERO, |a, b| {
            a.saturating_add(b)
        });
    assert_eq!(d.get(Cause::MigrateToDevice), expect, "{d:?}");
    assert_eq!(acc.stats().pages_to_device, 128);
}

/// Maps each faulted page's whole 2 MiB block remotely (a full device's spill window).
#[derive(Debug)]
struct RemoteBlocks;

impl hetmem_sim::placement::PlacementPolicy for RemoteBlocks {
    fn place(
        &self,
        f: &hetmem_sim::placement::BlockFaults<'_>,
    ) -> hetmem_sim::placement::BlockPlan {
        let mut plan = Granularity::block().place(f);
        plan.action = hetmem_sim::placement::PlacementAction::MapRemote;
        plan
    }
}

#[test]
fn a_remote_window_populates_pages_never_touched_so_one_fault_maps_them_all() {
    let acc = Accelerator::new(AccelConfig {
        placement: Arc::new(RemoteBlocks),
        ..small()
    })
    .unwrap();
    // 64 pages inside one block, never touched by the CPU; one of them read-only.
    let r = mm()
        .map_anonymous(2 * HUGE_PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let base = r.start().0.next_multiple_of(HUGE_PAGE_SIZE);
    let pages = 64u64;
    assert!(base + pages * PAGE_SIZE <= r.end().0);
    let ro = PageRange::new(base + 10 * PAGE_SIZE, PAGE_SIZE).unwrap();
    // SAFETY: the mapping is this test's own and no Rust reference points into it.
    #[allow(unsafe_code)]
    unsafe {
        mm().protect(ro, Prot::READ).unwrap()
    };
    // One lane writes every page but the read-only one, in order: only the first write faults
    // when the window maps the rest (populated writable) at once.
    let k = Arc::new(move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        for p in (0..pages).filter(|&p| p != 10) {
            t.store_u32(base + p * PAGE_SIZE, p as u32 + 1)?;
        }
        Ok(())
    });
    acc.launch(k, 1).unwrap().wait().unwrap();
    let s = acc.stats();
    assert_eq!(s.faults_write, 1, "{s:?}");
    assert_eq!(s.pages_to_device, 0, "{s:?}");
    for p in (0..pages).filter(|&p| p != 10) {
        let mut b = [0u8; 4];
        mm().cpu_read(VirtAddr(base + p * PAGE_SIZE), &mut b)
            .unwrap();
        assert_eq!(u32::from_ne_bytes(b), p as u32 + 1, "page {p}");
    }
    acc.check_invariants().unwrap();
    mm().check_invariants().unwrap();
}

#[test]
fn a_warps_remote_accesses_to_one_line_cost_one_line_in_the_direction_data_moves() {
    use hetmem_core::link::{Direction, LinkModel, ModelTime};
    let link = LinkModel::pcie3_x16();
    let line = link.remote_line_bytes;
    let acc = Accelerator::new(AccelConfig {
        link: link.clone(),
        ..small()
    })
    .unwrap();
    let data = alloc_u32(PAGE_SIZE / 4, |i| i as u32);
    acc.map_remote(data, true).unwrap();
    let p = data.start().0;
    let remote = |k: Arc<dyn hetmem_sim::accel::Kernel>| {
        let (before, n) = (acc.clock(), acc.stats().remote_accesses);
        acc.launch(k, 32).unwrap().wait().unwrap();
        let d = acc.clock().since(&before).get(Cause::RemoteAccess);
        (d, acc.stats().remote_accesses - n)
    };
    let one = |dir| link.remote_access(dir, line);
    let times = |t: ModelTime, n: u64| ModelTime::from_nanos(t.as_nanos() * n);
    // A warp reading 32 consecutive words: one line into the device.
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| t.load_u32(p + 4 * i).map(|_| ()));
    assert_eq!(remote(k), (one(Direction::HostToDevice), 1));
    // A word from each of 32 lines: 32 lines.
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| t.load_u32(p + i * line).map(|_| ()));
    assert_eq!(remote(k), (times(one(Direction::HostToDevice), 32), 32));
    // Writes of 32 consecutive words: one line out of the device, at the other way's rate.
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| t.store_u32(p + 4 * i, 7));
    assert_eq!(remote(k), (one(Direction::DeviceToHost), 1));
    assert_ne!(one(Direction::DeviceToHost), one(Direction::HostToDevice));
    assert_eq!(read_u32(data, 33)[..32], [7; 32]);
    assert_eq!(read_u32(data, 33)[32], 32);
}

#[test]
fn a_batchs_blocks_are_serviced_while_the_copies_of_the_blocks_before_them_run() {
    use hetmem_core::link::LinkModel;
    let link = LinkModel::pcie3_x16();
    // The batch waits until the warp is stalled, so that it holds the four faults every run
    // (with the default 50 µs pause, a service thread woken by the first push could take it
    // alone).
    let acc = Accelerator::new(AccelConfig {
        link: link.clone(),
        placement: Arc::new(Granularity::block()),
        fault_coalesce: std::time::Duration::from_secs(10),
        coalesce_until_stalled: true,
        ..small()
    })
    .unwrap();
    // Four whole blocks of data the CPU wrote; one warp reads a word of each: one batch of
    // four blocks, each block's copy a whole 2 MiB.
    let blocks = 4u64;
    let r = alloc_u32((blocks + 1) * HUGE_PAGE_SIZE / 4, |i| i as u32);
    let base = r.start().0.next_multiple_of(HUGE_PAGE_SIZE);
    let k = Arc::new(move |i: u64, t: &mut Thread<'_>| {
        t.load_u32(base + i * HUGE_PAGE_SIZE).map(|_| ())
    });
    let before = acc.clock();
    acc.launch(k, blocks).unwrap().wait().unwrap();
    let s = acc.stats();
    assert_eq!((s.batches, s.faults_read), (1, blocks), "{s:?}");
    let d = acc.clock().since(&before);
    assert_eq!(d.charges_of(Cause::MigrateToDevice), blocks, "{d}");
    // The host's work on blocks 2 to 4 ran while block 1's and the next copies did: the
    // timeline is shorter than the sum of the charges by at least those blocks' service.
    let per_block = link.faults.per_vablock;
    let hidden = d.total.saturating_sub(d.elapsed);
    assert!(
        hidden.as_nanos() >= (blocks - 1) * per_block.as_nanos(),
        "{hidden} hidden of {d}"
    );
    acc.check_invariants().unwrap();
}

#[test]
fn loads_issued_together_fault_together() {
    // One lane loads a word from each of three arrays (three pages, each in a block of its
    // own). In program order it faults on one page per batch; issued together, the three fault
    // in one batch.
    let run = |issue: bool| {
        let arrays: Vec<PageRange> = (0..3)
            .map(|k| alloc_u32(HUGE_PAGE_SIZE / 4, move |i| (k << 24) as u32 + i as u32))
            .collect();
        let out = alloc_u32(1, |_| 0);
        // Batches wait until the lane is stalled: a service thread woken by the first of
        // three pushes must not take it alone.
        let acc = Accelerator::new(AccelConfig {
            fault_coalesce: std::time::Duration::from_secs(10),
            coalesce_until_stalled: true,
            ..small()
        })
        .unwrap();
        let (p, po) = (
            [
                arrays[0].start().0,
                arrays[1].start().0,
                arrays[2].start().0,
            ],
            out.start().0,
        );
        let k = Arc::new(move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
            if issue {
                t.issue_loads(&[(p[0], 4), (p[1], 4), (p[2], 4)])?;
            }
            let mut s = 0u32;
            for &a in &p {
                s = s.wrapping_add(t.load_u32(a)?);
            }
            t.store_u32(po, s)
        });
        acc.launch(k, 1).unwrap().wait().unwrap();
        let s = acc.stats();
        assert_eq!(
            read_u32(out, 1)[0],
            3u32 << 24,
            "the sum of the first words"
        );
        acc.check_invariants().unwrap();
        (s.batches, s.batched_faults)
    };
    // The store to `out` faults on its own after the loads, either way.
    assert_eq!(run(false), (4, 4));
    assert_eq!(run(true), (2, 4));
}

#[test]
fn a_batch_of_stale_faults_pays_for_its_entries_and_no_block_service() {
    use hetmem_core::link::LinkModel;
    let link = LinkModel::pcie3_x16();
    // The service thread waits a second after the first fault before it takes the batch: long
    // enough for the test to map the page meanwhile, as a readahead or an earlier batch would.
    let acc = Accelerator::new(AccelConfig {
        link: link.clone(),
        fault_coalesce: std::time::Duration::from_secs(1),
        coalesce_until_stalled: false,
        ..small()
    })
    .unwrap();
    let data = alloc_u32(1, |_| 41);
    let out = alloc_u32(1, |_| 0);
    // The output is mapped before the launch, so that the one fault is the read's.
    acc.make_resident(out, true).unwrap();
    let (p, po) = (data.start().0, out.start().0);
    let k = Arc::new(move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let v = t.load_u32(p)?;
        t.store_u32(po, v + 1)
    });
    let before = acc.clock();
    let launch = acc.launch(k, 1).unwrap();
    let t = std::time::Instant::now();
    while acc.stats().faults_read == 0 {
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "no fault");
        std::thread::yield_now();
    }
    let charged = acc.clock().since(&before);
    acc.make_resident(data, false).unwrap();
    launch.wait().unwrap();
    assert_eq!(read_u32(out, 1), [42]);
    let s = acc.stats();
    assert_eq!(
        (s.batches, s.faults_read, s.faults_stale),
        (1, 1, 1),
        "{s:?}"
    );
    // The batch cost its fixed part and its one entry; no block was serviced.
    let d = acc.clock().since(&before);
    assert_eq!(
        d.get(Cause::FaultService)
            .saturating_sub(charged.get(Cause::FaultService)),
        link.fault_service(1, 0),
        "{d}"
    );
    acc.check_invariants().unwrap();
}
