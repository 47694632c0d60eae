//! Bounded concurrent stress of the simulated accelerator: CPU threads write their own words of
//! every page while kernels on three compute units increment theirs and add to one shared atomic
//! counter, so every page bounces between system and device memory (device faults pull it in,
//! CPU faults pull it back). At the end every word must hold exactly what its writer produced
//! (DESIGN.md invariant 3: nothing lost; invariant 1: no access through a stale translation, which
//! would lose a device store or a CPU store). Runs for HETMEM_STRESS_SECS (default 2) per placement.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hetmem::{AddressSpace, Config, CpuFaultBackend, Prot};
use hetmem_core::{link::LinkModel, PAGE_SIZE};
use hetmem_sim::{
    accel::{AccelConfig, Accelerator, Miss, Thread},
    placement::{Granularity, PlacementPolicy},
};

const PAGES: u64 = 64;
const CPU_WRITERS: usize = 2;
/// Device words (u32) per page, at byte offset DEV_OFF.
const DEV_WORDS: u64 = 16;
const DEV_OFF: u64 = 64;
/// The shared atomic counter: page 0, this byte offset.
const COUNTER_OFF: u64 = 2048;

mod common;

use common::stress_budget as budget;

#[test]
fn kernels_and_cpu_writers_lose_nothing_uffd() {
    run(CpuFaultBackend::Userfaultfd);
}

#[test]
fn kernels_and_cpu_writers_lose_nothing_mprotect() {
    run(CpuFaultBackend::Mprotect);
}

fn run(backend: CpuFaultBackend) {
    let mm = AddressSpace::init(Config {
        backend: Some(backend),
    })
    .unwrap();
    assert_eq!(mm.backend(), backend);
    let placements: [(&str, Arc<dyn PlacementPolicy>); 2] = [
        ("4 KiB", Arc::new(Granularity::page())),
        ("2 MiB", Arc::new(Granularity::block())),
    ];
    for (name, placement) in placements {
        round(mm, name, placement);
    }
    mm.check_invariants().unwrap();
}

fn round(mm: &AddressSpace, name: &str, placement: Arc<dyn PlacementPolicy>) {
    let range = mm
        .map_anonymous(PAGES * PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let acc = Accelerator::new(AccelConfig {
        memory_bytes: 16 << 20,
        compute_units: 3,
        warps_per_cu: 4,
        link: LinkModel::off(),
        placement,
        ..AccelConfig::default()
    })
    .unwrap();
    let base = range.start().0;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..CPU_WRITERS)
        .map(|t| {
            let stop = Arc::clone(&stop);
            let writes = Arc::clone(&writes);
            std::thread::spawn(move || {
                // Writer t owns u64 word t of every page (bytes 8t..8t+8), nothing else.
                let mut value = 0u64;
                let mut p = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    value += 1;
                    let w = (base + p * PAGE_SIZE) as *mut u64;
                    // SAFETY: `w` points into the managed mapping, word `t` of page `p`, which
                    // only this thread writes; device-resident pages fault back transparently.
                    unsafe { w.add(t).write_volatile(value) };
                    // SAFETY: as above.
                    let got = unsafe { w.add(t).read_volatile() };
                    assert_eq!(got, value, "cpu writer {t} page {p}: write lost");
                    p = (p + 1) % PAGES;
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                (value, p)
            })
        })
        .collect();
    // An evictor takes every page back from the device now and then (what memory pressure does),
    // so the kernels keep faulting and migrating.
    let dev = acc.id();
    let evictions = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mm = AddressSpace::current().unwrap();
            let mut pages = 0;
            while !stop.load(Ordering::Relaxed) {
                pages += mm.evict_device(dev).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
            pages
        })
    };
    // Thread i increments device word i % DEV_WORDS of page i / DEV_WORDS, and adds 1 to the
    // shared counter with an atomic.
    let threads = PAGES * DEV_WORDS;
    let kernel = Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let va = base + (i / DEV_WORDS) * PAGE_SIZE + DEV_OFF + 4 * (i % DEV_WORDS);
        let x = t.load_u32(va)?;
        t.atomic_add_u32(base + COUNTER_OFF, 1)?;
        t.store_u32(va, x + 1)
    });
    let start = Instant::now();
    let mut launches = 0u32;
    while start.elapsed() < budget() {
        acc.launch(kernel.clone(), threads).unwrap().wait().unwrap();
        launches += 1;
        acc.check_invariants().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let finals: Vec<(u64, u64)> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let evicted = evictions.join().unwrap();
    let read = |off: u64| -> u64 {
        let mut b = [0u8; 8];
        mm.cpu_read(hetmem_core::VirtAddr(base + off), &mut b)
            .unwrap();
        u64::from_ne_bytes(b)
    };
    for (t, &(value, next)) in finals.iter().enumerate() {
        for back in 0..PAGES.min(value) {
            let p = (next + PAGES - 1 - back) % PAGES;
            assert_eq!(
                read(p * PAGE_SIZE + 8 * t as u64),
                value - back,
                "{name}: cpu writer {t} page {p}: final value lost"
            );
        }
    }
    // Every wrong word, not just the first: the pattern tells a lost store from a lane that ran
    // twice or a page that read another page's frame.
    let wrong: Vec<String> = (0..threads)
        .filter_map(|i| {
            let off = (i / DEV_WORDS) * PAGE_SIZE + DEV_OFF + 4 * (i % DEV_WORDS);
            let got = read(off) as u32;
            (got != launches)
                .then(|| format!("page {} word {}: {got}", i / DEV_WORDS, i % DEV_WORDS))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{name}: device words wrong after {launches} launches: {wrong:?}"
    );
    assert_eq!(
        read(COUNTER_OFF) as u32,
        launches * threads as u32,
        "{name}: atomic counter"
    );
    let s = acc.stats();
    eprintln!(
        "accel stress ({name}): {:?}, {CPU_WRITERS} cpu writers ({} writes), {launches} launches \
         of {threads} threads on 3 units, {} faults in {} batches, {} pages to device, {} back \
         on cpu faults, {evicted} evicted, {} tlb shootdowns",
        budget(),
        writes.load(Ordering::Relaxed),
        s.faults_read + s.faults_write + s.faults_atomic,
        s.batches,
        s.pages_to_device,
        s.pages_to_host,
        s.tlb_invalidations,
    );
    assert!(launches > 0 && s.pages_to_device > 0);
    acc.check_invariants().unwrap();
    drop(acc);
    // SAFETY: every thread that used the range has been joined, the accelerator dropped.
    unsafe { mm.unmap(range).unwrap() };
}
