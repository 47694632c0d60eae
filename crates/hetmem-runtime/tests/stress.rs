//! The runtime under concurrent load (issue 6, item 3): CPU threads storing to and loading from
//! managed memory, kernels on two devices, prefetches, advice changes and evictions, all at once
//! for a bounded time (`HETMEM_STRESS_SECS`, default 5), on 4 MiB of managed memory of which each
//! device may hold a quarter (the context's memory limit): faults and prefetches evict, pages
//! bounce between the CPU and both devices, device to device included.
//!
//! Every thread owns its own words of every page and writes values it can predict:
//!
//! ```text
//!   page (1024 u32 words):  0..8     CPU thread 0      (random words, distinct values)
//!                           8..16    CPU thread 1
//!                           64..72   device 0's kernel (each launch adds 1 to each)
//!                           72..80   device 1's kernel
//!                           512+d    page 0 only: device d's atomic counter (+1 per lane)
//!                           the rest stays zero
//! ```
//!
//! so at the end every byte of the allocation has one expected value: it is compared word by
//! word and by checksum, after the context's invariant checkers have run and every device frame
//! in use has been matched with a page resident on that device (nothing leaked), and again after
//! the comparison brought every page home (no frame left in use). CPU threads also check their
//! own stores as they go: a store read back at once, and an earlier one, whose page may have
//! moved since.
//!
//! Every advice is in: preferred location, accessed-by, read-mostly (read copies on both
//! devices, collapsed by the CPU's and the kernels' stores), granularity, and their unsets.
//!
//! The CPU-fault backend is the environment's (`HETMEM_CPU_FAULT_BACKEND`): `scripts/test.sh`
//! runs this test under both.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem::AddressSpace;
use hetmem_core::{link::LinkModel, DeviceId, PageRange, PAGE_SIZE};
use hetmem_runtime::{Advice, Context, Processor};
use hetmem_sim::accel::{AccelConfig, Kernel, Miss, Thread};
use hetmem_testkit::stress_budget;

/// Managed memory: 4 MiB, over several 2 MiB blocks (eviction takes whole blocks, never the one
/// a fault is filling).
const PAGES: u64 = 1024;
/// What each device may hold (the context's memory limit): a quarter of the data.
const LIMIT_PAGES: u64 = 256;
/// u32 words in a page.
const WORDS: u64 = PAGE_SIZE / 4;
/// CPU threads; thread `t` owns words `[t * CPU_WORDS, (t + 1) * CPU_WORDS)` of every page.
const CPU_THREADS: u64 = 2;
const CPU_WORDS: u64 = 8;
/// Device `d`'s kernel owns words `[DEV_BASE + d * DEV_WORDS, ..+ DEV_WORDS)` of every page.
const DEV_BASE: u64 = 64;
const DEV_WORDS: u64 = 8;
/// Word `COUNTER + d` of page 0: device `d`'s atomic counter.
const COUNTER: u64 = 512;

/// The CPU threads' loads and stores: plain accesses through raw pointers while kernels run
/// (a CPU view would wait for the launches, and a launch would be refused while it is open). A
/// page on a device faults back transparently, in the accessing thread.
mod raw {
    /// Stores `v` at `addr`.
    pub fn store(addr: u64, v: u32) {
        // SAFETY: `addr` is a 4-aligned word of the test's managed allocation, alive until every
        // thread is joined; the word is owned by the calling thread (no kernel, no other thread
        // touches it), so the store races with nothing; a device-resident page is brought back
        // by hetmem's CPU fault handler, transparently.
        unsafe { (addr as *mut u32).write_volatile(v) }
    }

    /// Loads the word at `addr`.
    pub fn load(addr: u64) -> u32 {
        // SAFETY: as in `store`: an aligned word of the live allocation, owned by the caller.
        unsafe { (addr as *const u32).read_volatile() }
    }
}

/// xorshift64*: each thread's choices, from a fixed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// 1 to 64 pages of `range` at a random place.
    fn sub(&mut self, range: PageRange) -> PageRange {
        let first = self.below(range.npages());
        let n = 1 + self.below(64.min(range.npages() - first));
        PageRange::from_pages(range.page(first).0, n).expect("inside the range")
    }
}

fn device() -> AccelConfig {
    AccelConfig {
        memory_bytes: 4 << 20,
        compute_units: 2,
        link: LinkModel::off(),
        ..AccelConfig::default()
    }
}

/// FNV-1a over the bytes of `v`.
fn checksum(v: &[u32]) -> u64 {
    v.iter()
        .flat_map(|x| x.to_ne_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// The value CPU thread `t` stores the `n`th time: distinct for every (thread, store).
fn cpu_value(t: u64, n: u64) -> u32 {
    ((t << 30) | (n & 0x3fff_ffff)) as u32 | 1
}

/// What one CPU thread did: its words' final values (page-major) and its stores and loads.
struct CpuResult {
    words: Vec<u32>,
    stores: u64,
    loads: u64,
}

fn cpu_thread(t: u64, base: u64, stop: &AtomicBool) -> CpuResult {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
    let mut words = vec![0u32; (PAGES * CPU_WORDS) as usize];
    let addr = |k: u64| base + (k / CPU_WORDS) * PAGE_SIZE + 4 * (t * CPU_WORDS + k % CPU_WORDS);
    let (mut stores, mut loads) = (0u64, 0u64);
    while !stop.load(Relaxed) {
        let k = rng.below(PAGES * CPU_WORDS);
        let v = cpu_value(t, stores);
        raw::store(addr(k), v);
        words[k as usize] = v;
        stores += 1;
        assert_eq!(
            raw::load(addr(k)),
            v,
            "cpu {t}: store to word {k} lost at once"
        );
        // An earlier store, to a page that may have been to a device and back since.
        let j = rng.below(PAGES * CPU_WORDS);
        assert_eq!(
            raw::load(addr(j)),
            words[j as usize],
            "cpu {t}: word {j} lost its value"
        );
        loads += 2;
        if stores % 64 == 0 {
            // Two cores for a dozen threads: let the others run.
            std::thread::yield_now();
        }
    }
    CpuResult {
        words,
        stores,
        loads,
    }
}

/// Launches on device number `d` until `stop`; returns the launches and lanes per launch.
fn launcher(ctx: &Context, dev: DeviceId, d: u64, base: u64, stop: &AtomicBool) -> (u64, u64) {
    let kernel = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let va =
            base + (i / DEV_WORDS) * PAGE_SIZE + 4 * (DEV_BASE + d * DEV_WORDS + i % DEV_WORDS);
        let v = t.load_u32(va)?;
        t.atomic_add_u32(base + 4 * (COUNTER + d), 1)?;
        t.store_u32(va, v + 1)
    };
    let kernel: Arc<dyn Kernel> = Arc::new(kernel);
    let lanes = PAGES * DEV_WORDS;
    let mut launches = 0;
    while !stop.load(Relaxed) {
        ctx.launch(dev, Arc::clone(&kernel), lanes)
            .unwrap()
            .wait()
            .unwrap_or_else(|e| panic!("device {d}: launch {launches}: {e}"));
        launches += 1;
    }
    (launches, lanes)
}

fn prefetcher(ctx: &Context, range: PageRange, stop: &AtomicBool) -> u64 {
    let devs = ctx.devices();
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let mut n = 0;
    while !stop.load(Relaxed) {
        let r = rng.sub(range);
        let to = match rng.below(3) {
            0 => Processor::Cpu,
            k => Processor::Device(devs[k as usize - 1]),
        };
        ctx.prefetch(r, to).unwrap().wait().unwrap();
        n += 1;
    }
    n
}

fn advisor(ctx: &Context, range: PageRange, stop: &AtomicBool) -> u64 {
    let devs = ctx.devices();
    let mut rng = Rng(0x1405_7b7e_f767_814f);
    let mut n = 0;
    while !stop.load(Relaxed) {
        let r = rng.sub(range);
        let dev = Processor::Device(devs[rng.below(2) as usize]);
        let advice = match rng.below(10) {
            0 => Advice::SetPreferredLocation(dev),
            1 => Advice::SetPreferredLocation(Processor::Cpu),
            2 => Advice::UnsetPreferredLocation,
            3 => Advice::SetAccessedBy(dev),
            4 => Advice::UnsetAccessedBy(dev),
            5 => Advice::SetGranularity(PAGE_SIZE << (4 * rng.below(3))),
            6 => Advice::UnsetGranularity,
            7 => Advice::SetReadMostly,
            8 => Advice::UnsetReadMostly,
            _ => Advice::UnsetPreferredLocation,
        };
        ctx.advise(r, advice).unwrap();
        n += 1;
        std::thread::sleep(Duration::from_micros(500));
    }
    n
}

/// Memory pressure besides the memory limit: a range sent home now and then, and now and then
/// everything (suspend). Returns (evictions of a range, suspends, pages they moved).
fn evictor(ctx: &Context, range: PageRange, stop: &AtomicBool) -> (u64, u64, u64) {
    let mut rng = Rng(0xd1b5_4a32_d192_ed03);
    let (mut ranges, mut suspends, mut pages) = (0, 0, 0);
    while !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
        if rng.below(8) == 0 {
            pages += ctx.suspend().unwrap();
            suspends += 1;
        } else {
            pages += ctx
                .prefetch(rng.sub(range), Processor::Cpu)
                .unwrap()
                .wait()
                .unwrap();
            ranges += 1;
        }
    }
    (ranges, suspends, pages)
}

/// Every frame in use on each device is a page of `range` resident there or a read copy it
/// holds, so nothing leaked.
fn check_frames(ctx: &Context, range: PageRange) {
    for d in ctx.devices() {
        let used = ctx.memory_in_use(d).unwrap() / PAGE_SIZE;
        let copies = ctx.device(d).unwrap().stats().copies_held;
        let held: u64 = ctx
            .residency(range)
            .iter()
            .filter(|(_, p)| *p == Processor::Device(d))
            .map(|(r, _)| r.npages())
            .sum();
        assert_eq!(
            used,
            held + copies,
            "{d:?}: {used} frames in use, {held} pages resident, {copies} read copies"
        );
        assert!(held <= LIMIT_PAGES, "{d:?}: {held} pages past the limit");
    }
}

#[test]
fn cpu_threads_kernels_prefetch_advice_and_eviction_together_lose_nothing() {
    let budget = stress_budget(5);
    let ctx = Context::builder()
        .device(device())
        .device(device())
        .memory_limit(LIMIT_PAGES * PAGE_SIZE)
        .build()
        .unwrap();
    let devs = ctx.devices();
    let x = ctx.alloc(PAGES * PAGE_SIZE).unwrap();
    let (base, range) = (x.addr(), x.range());
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (cpus, launches, prefetches, advice, evictions) = std::thread::scope(|s| {
        let (ctx, stop) = (&ctx, &stop);
        let cpus: Vec<_> = (0..CPU_THREADS)
            .map(|t| s.spawn(move || cpu_thread(t, base, stop)))
            .collect();
        let launchers: Vec<_> = devs
            .iter()
            .enumerate()
            .map(|(d, &dev)| s.spawn(move || launcher(ctx, dev, d as u64, base, stop)))
            .collect();
        let prefetches = s.spawn(move || prefetcher(ctx, range, stop));
        let advice = s.spawn(move || advisor(ctx, range, stop));
        let evictions = s.spawn(move || evictor(ctx, range, stop));
        std::thread::sleep(budget);
        stop.store(true, Relaxed);
        let cpus: Vec<CpuResult> = cpus.into_iter().map(|h| h.join().unwrap()).collect();
        let launches: Vec<(u64, u64)> = launchers.into_iter().map(|h| h.join().unwrap()).collect();
        (
            cpus,
            launches,
            prefetches.join().unwrap(),
            advice.join().unwrap(),
            evictions.join().unwrap(),
        )
    });
    let elapsed = started.elapsed();

    // Quiet now: every checker, and every frame accounted for, before anything moves.
    ctx.check_invariants().unwrap();
    AddressSpace::current().unwrap().check_invariants().unwrap();
    check_frames(&ctx, range);
    let stats: Vec<_> = devs.iter().map(|&d| ctx.device_stats(d).unwrap()).collect();

    // What every byte must hold.
    let mut want = vec![0u32; (PAGES * WORDS) as usize];
    for (t, c) in cpus.iter().enumerate() {
        for (k, &v) in c.words.iter().enumerate() {
            let (p, j) = (k as u64 / CPU_WORDS, k as u64 % CPU_WORDS);
            want[(p * WORDS + t as u64 * CPU_WORDS + j) as usize] = v;
        }
    }
    for (d, &(n, lanes)) in launches.iter().enumerate() {
        let d = d as u64;
        for p in 0..PAGES {
            for j in 0..DEV_WORDS {
                want[(p * WORDS + DEV_BASE + d * DEV_WORDS + j) as usize] = n as u32;
            }
        }
        want[(COUNTER + d) as usize] = (n * lanes) as u32;
    }
    let owner = |i: usize| -> String {
        let w = i as u64 % WORDS;
        match w {
            w if w < CPU_THREADS * CPU_WORDS => format!("cpu {}", w / CPU_WORDS),
            w if (DEV_BASE..DEV_BASE + 2 * DEV_WORDS).contains(&w) => {
                format!("device {}", (w - DEV_BASE) / DEV_WORDS)
            }
            w if i < WORDS as usize && (COUNTER..COUNTER + 2).contains(&w) => {
                format!("device {} counter", w - COUNTER)
            }
            _ => "nobody".into(),
        }
    };
    {
        // The CPU reads every byte (device pages fault home).
        let got = x.view::<u32>();
        let wrong: Vec<String> = (0..want.len())
            .filter(|&i| got[i] != want[i])
            .take(16)
            .map(|i| {
                format!(
                    "page {} word {} ({}): {:#x}, want {:#x}",
                    i as u64 / WORDS,
                    i as u64 % WORDS,
                    owner(i),
                    got[i],
                    want[i]
                )
            })
            .collect();
        assert!(wrong.is_empty(), "words lost or corrupted: {wrong:?}");
        assert_eq!(checksum(&got), checksum(&want), "checksum");
    }
    // Everything came home to be read, and unsetting read-mostly collapses the read copies
    // that reading left: no device frame may stay in use.
    ctx.advise(range, Advice::UnsetReadMostly).unwrap();
    check_frames(&ctx, range);
    for &d in &devs {
        assert_eq!(ctx.memory_in_use(d).unwrap(), 0, "{d:?}: frames leaked");
    }
    ctx.check_invariants().unwrap();

    let rt = ctx.stats();
    let (stores, loads): (u64, u64) = cpus
        .iter()
        .fold((0, 0), |(s, l), c| (s + c.stores, l + c.loads));
    let backend = AddressSpace::current().unwrap().backend();
    eprintln!(
        "runtime stress ({backend:?}): {elapsed:.1?}, {} threads ({CPU_THREADS} cpu, 2 launchers, \
         prefetcher, advisor, evictor); cpu: {stores} stores, {loads} loads; launches {:?} of {} \
         lanes; {prefetches} prefetches, {advice} advice calls, {} range evictions, {} suspends \
         ({} pages); runtime evictions {} ({} pages); device faults {:?}, pages in from system \
         {:?}, from peers {:?}, cpu faults {:?}; {} bytes checked",
        CPU_THREADS + 5,
        launches.iter().map(|l| l.0).collect::<Vec<_>>(),
        launches[0].1,
        evictions.0,
        evictions.1,
        evictions.2,
        rt.evictions,
        rt.pages_evicted,
        stats.iter().map(|s| s.faults).collect::<Vec<_>>(),
        stats
            .iter()
            .map(|s| s.pages_from_system)
            .collect::<Vec<_>>(),
        stats.iter().map(|s| s.pages_from_peers).collect::<Vec<_>>(),
        stats.iter().map(|s| s.cpu_faults).collect::<Vec<_>>(),
        want.len() * 4,
    );
    // The run exercised what it claims to.
    assert!(launches.iter().all(|l| l.0 > 0), "a device never ran");
    assert!(
        stores > 0 && prefetches > 0 && advice > 0,
        "an actor never ran"
    );
    assert!(
        stats.iter().all(|s| s.faults > 0 && s.cpu_faults > 0),
        "pages never moved both ways: {stats:?}"
    );
    drop(x);
    for &d in &devs {
        assert_eq!(ctx.memory_in_use(d).unwrap(), 0);
    }
}
