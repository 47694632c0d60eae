//! Several devices in one context (issue 4, "Several devices").

use hetmem_core::{link::LinkModel, DeviceId, PageRange, PAGE_SIZE};
use hetmem_runtime::{Context, Processor};
use hetmem_sim::accel::AccelConfig;

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
