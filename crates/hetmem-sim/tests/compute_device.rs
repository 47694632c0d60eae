//! The accelerator driven only through the `ComputeDevice` trait, as a runtime that knows nothing
//! of the simulator would drive it: residency, remote mappings, unmapping and accessed bits per
//! range, each checked against what the device then does (faults, migrations, results).

use std::sync::Arc;

use hetmem::{AddressSpace, ComputeDevice, Prot};
use hetmem_core::{page_state::Location, PageRange, VirtAddr, PAGE_SIZE};
use hetmem_sim::accel::{AccelConfig, Accelerator, Kernel, Miss, Thread};
use hetmem_sim::placement::Granularity;

const PAGES: u64 = 16;

fn mm() -> &'static Arc<AddressSpace> {
    AddressSpace::current().unwrap()
}

/// `PAGES` pages whose u32 word `k` holds `k`.
fn data() -> PageRange {
    let r = mm()
        .map_anonymous(PAGES * PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let bytes: Vec<u8> = (0..PAGES * PAGE_SIZE / 4)
        .flat_map(|k| (k as u32).to_ne_bytes())
        .collect();
    mm().cpu_write(r.start(), &bytes).unwrap();
    r
}

fn on_device(r: PageRange, dev: hetmem_core::DeviceId) -> u64 {
    let region = mm().region_of(r.start()).unwrap();
    r.pages()
        .filter(|&a| {
            matches!(region.states.get(region.index(a)).location,
                Location::Device { dev: d, .. } if d == dev)
        })
        .count() as u64
}

/// A kernel that adds the first word of page `i` of `r` into `out` (thread `i`, one per page).
fn sum_kernel(r: PageRange, out: VirtAddr) -> Arc<dyn Kernel> {
    let base = r.start().0;
    Arc::new(move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let x = t.load_u32(base + i * PAGE_SIZE)?;
        t.atomic_add_u32(out.0, x)?;
        Ok(())
    })
}

/// What a runtime does, written against the trait alone: runs `kernel` and returns the faults
/// the device took for it.
fn run<D: ComputeDevice>(
    dev: &D,
    kernel: Arc<D::Kernel>,
    threads: u64,
    faults: impl Fn() -> u64,
) -> u64 {
    let before = faults();
    let l = dev.launch(kernel, threads).unwrap();
    dev.wait(l).unwrap();
    faults() - before
}

fn accel() -> Accelerator {
    Accelerator::new(AccelConfig {
        memory_bytes: 16 << 20,
        compute_units: 2,
        placement: Arc::new(Granularity::page()),
        ..AccelConfig::default()
    })
    .unwrap()
}

fn expected_sum() -> u32 {
    (0..PAGES).map(|i| (i * PAGE_SIZE / 4) as u32).sum()
}

fn read_out(out: VirtAddr) -> u32 {
    let mut b = [0u8; 4];
    mm().cpu_read(out, &mut b).unwrap();
    u32::from_ne_bytes(b)
}

#[test]
fn residency_remote_mapping_unmapping_and_accessed_bits_through_the_trait() {
    let r = data();
    let out_r = mm()
        .map_anonymous(PAGE_SIZE, Prot::READ | Prot::WRITE, false)
        .unwrap();
    let out = out_r.start();
    let acc = accel();
    let id = acc.memory().id();
    let faults = || {
        let s = acc.stats();
        s.faults_read + s.faults_write + s.faults_atomic
    };
    let kernel = sum_kernel(r, out);

    // Mapped remotely: the kernel faults only on `out`, and nothing of `r` moves.
    acc.map_remote(r, false).unwrap();
    assert_eq!(on_device(r, id), 0, "a remote mapping migrates nothing");
    let f = run(&acc, Arc::clone(&kernel), PAGES, faults);
    // One fault on `out`, or two when the warp re-raised it before its replay (a duplicate,
    // seen once under CI load); `r`'s pages would be one each, `PAGES` more.
    assert!((1..PAGES).contains(&f), "only the output page faults: {f}");
    assert_eq!(on_device(r, id), 0);
    assert_eq!(read_out(out), expected_sum());
    acc.check_invariants().unwrap();

    // Unmapped: every page faults again.
    acc.unmap(r).unwrap();
    mm().cpu_write(out, &0u32.to_ne_bytes()).unwrap();
    let f = run(&acc, Arc::clone(&kernel), PAGES, faults);
    assert!(f >= PAGES, "after unmap each page of r faults: {f}");
    assert_eq!(read_out(out), expected_sum());
    acc.check_invariants().unwrap();

    // Resident: the pages are in device memory and mapped; the kernel takes no fault on them.
    mm().cpu_write(out, &0u32.to_ne_bytes()).unwrap();
    acc.make_resident(r, false).unwrap();
    acc.make_resident(out_r, true).unwrap();
    assert_eq!(on_device(r, id), PAGES);
    assert_eq!(on_device(out_r, id), 1);
    // Accessed bits: cleared now, then a kernel that touches the first half only.
    acc.take_accessed(r).unwrap();
    let half = sum_kernel(r, out);
    let f = run(&acc, half, PAGES / 2, faults);
    assert_eq!(f, 0, "resident pages do not fault");
    let young = acc.take_accessed(r).unwrap();
    let used: u64 = young.iter().map(|y| y.npages()).sum();
    assert_eq!(
        used,
        PAGES / 2,
        "exactly the pages the kernel touched: {young:?}"
    );
    assert!(young
        .iter()
        .all(|y| y.end().0 <= r.start().0 + PAGES / 2 * PAGE_SIZE));
    assert!(
        acc.take_accessed(r).unwrap().is_empty(),
        "cleared by the last call"
    );
    let half_sum: u32 = (0..PAGES / 2).map(|i| (i * PAGE_SIZE / 4) as u32).sum();
    assert_eq!(read_out(out), half_sum);
    acc.check_invariants().unwrap();

    // Out of the device's reach: a typed error, not a panic.
    let beyond = PageRange::new(1 << 60, PAGE_SIZE).unwrap();
    assert!(acc.unmap(beyond).is_err());
    assert!(acc.take_accessed(beyond).is_err());
    drop(acc);
    // SAFETY: no thread uses the ranges any more; the accelerator is gone.
    unsafe {
        mm().unmap(r).unwrap();
        mm().unmap(out_r).unwrap();
    }
}
