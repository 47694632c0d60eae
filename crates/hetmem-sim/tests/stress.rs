//! Bounded concurrent stress: CPU threads write managed pages while a device migrates them back
//! and forth; afterwards every word must hold the last value its writer stored (DESIGN.md
//! invariant 3: nothing lost). Runs for a fixed wall-clock budget (HETMEM_STRESS_SECS, default 2).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use hetmem::{AddressSpace, Config, CpuFaultBackend, Prot};
use hetmem_core::{pool::MemoryKind, PAGE_SIZE};
use hetmem_sim::{DmirrorDevice, DEFAULT_CAPACITY_FOR_TESTS};

const PAGES: u64 = 128;
const WRITERS: usize = 3;

mod common;

use common::stress_budget as budget;

#[test]
fn cpu_writers_and_device_migrations_lose_no_write_mprotect() {
    run(CpuFaultBackend::Mprotect);
}

#[test]
fn cpu_writers_and_device_migrations_lose_no_write_uffd() {
    run(CpuFaultBackend::Userfaultfd);
}

fn run(backend: CpuFaultBackend) {
    let mm = AddressSpace::init(Config {
        backend: Some(backend),
    })
    .unwrap();
    assert_eq!(mm.backend(), backend);
    let range = mm
        .map_anonymous(PAGES * PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let dev = DmirrorDevice::new(MemoryKind::DevicePrivate, DEFAULT_CAPACITY_FOR_TESTS).unwrap();
    let mirror = dev.open().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let base = range.start().0 as usize;
    let words_per_page = PAGE_SIZE as usize / 8;
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let stop = Arc::clone(&stop);
            let writes = Arc::clone(&writes);
            std::thread::spawn(move || {
                // Writer t owns word t of every page (and nothing else).
                let mut value = 0u64;
                let mut p = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    value += 1;
                    let w = (base + p * PAGE_SIZE as usize) as *mut u64;
                    // SAFETY: `w` points into the managed mapping, word `t` of page `p`, which only
                    // this thread writes; device-resident pages fault back transparently.
                    unsafe { w.add(t).write_volatile(value) };
                    // Read back immediately: a lost write would show here or at the end.
                    // SAFETY: as above.
                    let got = unsafe { w.add(t).read_volatile() };
                    assert_eq!(got, value, "writer {t} page {p}: write lost");
                    p = (p + 1) % PAGES as usize;
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                (value, p)
            })
        })
        .collect();
    let mut buf = vec![0u8; (PAGES * PAGE_SIZE) as usize];
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < budget() {
        // Partial migration is normal under contention (locked pages are skipped): ENOENT from the
        // verification read is then expected; any other error is a bug.
        match mirror.migrate_to_dev(range.start().0, PAGES, &mut buf) {
            Ok(r) => assert_eq!(r.cpages, PAGES),
            Err(e) => assert_eq!(e.errno(), libc::ENOENT, "migrate_to_dev: {e}"),
        }
        mirror.migrate_to_sys(range.start().0, PAGES).unwrap();
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let finals: Vec<(u64, usize)> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    // The last value each writer stored in each page: value - k for the page visited k steps back.
    for (t, &(value, next)) in finals.iter().enumerate() {
        for back in 0..PAGES as usize {
            if (back as u64) >= value {
                break;
            }
            let p = (next + PAGES as usize - 1 - back) % PAGES as usize;
            let w = (base + p * PAGE_SIZE as usize) as *const u64;
            // SAFETY: reading the managed mapping after every writer stopped.
            let got = unsafe { w.add(t).read_volatile() };
            assert_eq!(
                got,
                value - back as u64,
                "writer {t} page {p}: final value lost"
            );
        }
    }
    mm.check_invariants().unwrap();
    eprintln!(
        "stress: {} s, {WRITERS} writers, {} writes, {rounds} migration rounds each way, {} pages to device, {} back",
        budget().as_secs(),
        writes.load(Ordering::Relaxed),
        mm.stats().pages_to_device,
        mm.stats().pages_to_system
    );
    assert!(rounds > 0);
    let _ = words_per_page;
}
