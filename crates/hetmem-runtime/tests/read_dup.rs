//! Read duplication (read-mostly advice): readers on every processor get their own read-only
//! copy and nothing migrates; a write, from the CPU or a device, collapses the copies first, so
//! no reader ever sees a stale value.

use std::sync::Arc;

use hetmem::AddressSpace;
use hetmem_core::{link::LinkModel, DeviceId, PageRange};
use hetmem_runtime::{Advice, Context, Managed, Processor};
use hetmem_sim::accel::{AccelConfig, Miss, Thread};

fn device() -> AccelConfig {
    AccelConfig {
        memory_bytes: 16 << 20,
        compute_units: 2,
        link: LinkModel::off(),
        ..AccelConfig::default()
    }
}

/// A lookup table of `pages` pages of u32, `table[i] = f(i)`.
fn table(c: &Context, pages: u64, f: impl Fn(usize) -> u32) -> Managed {
    let mut t = c.alloc(pages * 4096).unwrap();
    for (i, e) in t.view_mut::<u32>().iter_mut().enumerate() {
        *e = f(i);
    }
    t
}

/// `out[i] = table[i] + 1` on `dev`: reads the whole table, writes `out`.
fn gather(c: &Context, dev: DeviceId, t: &Managed, out: &Managed) {
    let (tb, ob) = (t.addr(), out.addr());
    let n = t.len() / 4;
    let k = move |i: u64, th: &mut Thread<'_>| -> Result<(), Miss> {
        let v = th.load_u32(tb + 4 * i)?;
        th.store_u32(ob + 4 * i, v.wrapping_add(1))
    };
    c.launch(dev, Arc::new(k), n).unwrap().wait().unwrap();
}

fn check_out(t: &Managed, out: &Managed) {
    let tv = t.view::<u32>();
    let ov = out.view::<u32>();
    for (i, (a, b)) in tv.iter().zip(ov.iter()).enumerate() {
        assert_eq!(*b, a.wrapping_add(1), "out[{i}]");
    }
}

fn on(c: &Context, r: PageRange, p: Processor) -> u64 {
    c.residency(r)
        .iter()
        .filter(|(_, q)| *q == p)
        .map(|(r, _)| r.npages())
        .sum()
}

#[test]
fn readers_get_copies_and_nothing_migrates() {
    let mm = AddressSpace::current().ok();
    let _ = mm;
    for mostly in [false, true] {
        let c = Context::builder().device(device()).build().unwrap();
        let d = c.devices()[0];
        let t = table(&c, 64, |i| (i as u32).wrapping_mul(2654435761));
        let out = c.alloc(t.len()).unwrap();
        if mostly {
            c.advise(t.range(), Advice::SetReadMostly).unwrap();
        }
        let before = c.device(d).unwrap().stats();
        gather(&c, d, &t, &out);
        gather(&c, d, &t, &out);
        let s = c.device(d).unwrap().stats();
        c.check_invariants().unwrap();
        let migrated = s.pages_to_device - before.pages_to_device;
        let copied = s.pages_duplicated - before.pages_duplicated;
        eprintln!("read-mostly {mostly}: migrated {migrated} pages, copied {copied}");
        if mostly {
            // The table is copied, once; only `out` migrates.
            assert_eq!(copied, 64);
            assert_eq!(s.copies_held, 64);
            assert_eq!(migrated, 64, "only the output's pages migrate");
            assert_eq!(
                on(&c, t.range(), Processor::Cpu),
                64,
                "the table stays in system memory"
            );
        } else {
            assert_eq!(copied, 0);
            assert_eq!(migrated, 128, "table and output migrate");
        }
        // The CPU reads the table where it is: no fault brings anything back.
        let cpu_back = c.device(d).unwrap().stats().pages_to_host;
        let sum: u64 = t.view::<u32>().iter().map(|&v| u64::from(v)).sum();
        assert!(sum > 0);
        if mostly {
            assert_eq!(c.device(d).unwrap().stats().pages_to_host, cpu_back);
        }
        check_out(&t, &out);
    }
}

/// A context whose device holds read copies of a 16-page read-mostly table (`t[i] = i`), after
/// one gather into `out`: `(context, device, t, out)`.
fn copied_table() -> (Context, DeviceId, Managed, Managed) {
    let c = Context::builder().device(device()).build().unwrap();
    let d = c.devices()[0];
    let t = table(&c, 16, |i| i as u32);
    let out = c.alloc(t.len()).unwrap();
    c.advise(t.range(), Advice::SetReadMostly).unwrap();
    gather(&c, d, &t, &out);
    assert_eq!(c.device(d).unwrap().stats().copies_held, 16);
    (c, d, t, out)
}

#[test]
fn a_cpu_write_collapses_the_copies_before_it_lands() {
    let (c, d, mut t, out) = copied_table();
    let collapses = AddressSpace::current().unwrap().stats().dup_collapses;
    // One word of page 5 changes on the CPU: that page's copy goes, the others stay.
    t.view_mut::<u32>()[5 * 1024 + 7] = 0xdead_beef;
    let s = c.device(d).unwrap().stats();
    assert_eq!(s.copies_held, 15, "only the written page collapsed");
    assert!(AddressSpace::current().unwrap().stats().dup_collapses > collapses);
    c.check_invariants().unwrap();
    // The next launch reads the new value, through a fresh copy.
    gather(&c, d, &t, &out);
    assert_eq!(out.view::<u32>()[5 * 1024 + 7], 0xdead_bef0);
    check_out(&t, &out);
    assert_eq!(c.device(d).unwrap().stats().copies_held, 16);
}

#[test]
fn a_device_write_collapses_every_copy_and_the_page_migrates() {
    let c = Context::builder()
        .device(device())
        .device(device())
        .build()
        .unwrap();
    let (d0, d1) = (c.devices()[0], c.devices()[1]);
    let t = table(&c, 8, |i| 3 * i as u32);
    let out = c.alloc(t.len()).unwrap();
    c.advise(t.range(), Advice::SetReadMostly).unwrap();
    gather(&c, d0, &t, &out);
    gather(&c, d1, &t, &out);
    assert_eq!(c.device(d0).unwrap().stats().copies_held, 8);
    assert_eq!(c.device(d1).unwrap().stats().copies_held, 8);
    c.check_invariants().unwrap();
    // Device 1 writes page 2: every copy of it goes (both devices'), the page moves to device 1.
    let a = t.addr() + 2 * 4096 + 40;
    let k = move |_: u64, th: &mut Thread<'_>| -> Result<(), Miss> { th.store_u32(a, 777) };
    c.launch(d1, Arc::new(k), 1).unwrap().wait().unwrap();
    c.check_invariants().unwrap();
    assert_eq!(c.device(d0).unwrap().stats().copies_held, 7);
    assert_eq!(c.device(d1).unwrap().stats().copies_held, 7);
    let page = PageRange::new(t.addr() + 2 * 4096, 4096).unwrap();
    assert_eq!(on(&c, page, Processor::Device(d1)), 1);
    // Device 0 reads it again: it comes back to system memory and is copied.
    gather(&c, d0, &t, &out);
    assert_eq!(out.view::<u32>()[2 * 1024 + 10], 778);
    check_out(&t, &out);
    assert_eq!(t.view::<u32>()[2 * 1024 + 10], 777);
    c.check_invariants().unwrap();
}

#[test]
fn prefetching_a_read_mostly_range_copies_it() {
    let c = Context::builder().device(device()).build().unwrap();
    let d = c.devices()[0];
    let t = table(&c, 32, |i| i as u32 ^ 0x5a5a);
    let out = c.alloc(t.len()).unwrap();
    c.advise(t.range(), Advice::SetReadMostly).unwrap();
    // The output is made resident too, so the launch below faults on nothing.
    c.prefetch(out.range(), Processor::Device(d))
        .unwrap()
        .wait()
        .unwrap();
    let n = c
        .prefetch(t.range(), Processor::Device(d))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(n, 32);
    let s = c.device(d).unwrap().stats();
    assert_eq!(s.copies_held, 32);
    assert_eq!(on(&c, t.range(), Processor::Cpu), 32);
    gather(&c, d, &t, &out);
    let after = c.device(d).unwrap().stats();
    assert_eq!(after.faults_read, s.faults_read, "the reads hit the copies");
    check_out(&t, &out);
    // Suspend drops the copies; the data was never anywhere but system memory.
    c.suspend().unwrap();
    assert_eq!(c.device(d).unwrap().stats().copies_held, 0);
    c.check_invariants().unwrap();
}

/// A seeded random mix of CPU writes, kernel reads and writes on two devices, advice toggles,
/// prefetches and suspends over a read-mostly table, checked against a plain buffer after every
/// step, with the invariants.
#[test]
fn random_operations_never_read_a_stale_copy() {
    let c = Context::builder()
        .device(device())
        .device(device())
        .build()
        .unwrap();
    let devs = c.devices();
    let pages = 12u64;
    let words = (pages * 1024) as usize;
    let mut t = table(&c, pages, |i| i as u32);
    let out = c.alloc(t.len()).unwrap();
    let mut model: Vec<u32> = (0..words as u32).collect();
    c.advise(t.range(), Advice::SetReadMostly).unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for step in 0..120 {
        let op = next() % 7;
        let dev = devs[(next() % 2) as usize];
        let at = (next() % words as u64) as usize;
        let val = next() as u32;
        match op {
            0 | 1 => {
                t.view_mut::<u32>()[at] = val;
                model[at] = val;
            }
            2 | 3 => {
                gather(&c, dev, &t, &out);
                let o = out.view::<u32>();
                for (i, m) in model.iter().enumerate() {
                    assert_eq!(o[i], m.wrapping_add(1), "step {step}: out[{i}]");
                }
            }
            4 => {
                let a = t.addr() + 4 * at as u64;
                let k =
                    move |_: u64, th: &mut Thread<'_>| -> Result<(), Miss> { th.store_u32(a, val) };
                c.launch(dev, Arc::new(k), 1).unwrap().wait().unwrap();
                model[at] = val;
            }
            5 => {
                let advice = if next() % 2 == 0 {
                    Advice::SetReadMostly
                } else {
                    Advice::UnsetReadMostly
                };
                c.advise(t.range(), advice).unwrap();
            }
            _ => match next() % 3 {
                0 => {
                    c.prefetch(t.range(), Processor::Device(dev))
                        .unwrap()
                        .wait()
                        .unwrap();
                }
                1 => {
                    c.prefetch(t.range(), Processor::Cpu)
                        .unwrap()
                        .wait()
                        .unwrap();
                }
                _ => {
                    c.suspend().unwrap();
                }
            },
        }
        c.check_invariants()
            .unwrap_or_else(|e| panic!("step {step} (op {op}): {e}"));
        assert_eq!(&t.view::<u32>()[..], &model[..], "step {step}");
    }
}

/// `cudaMemAdviseUnsetReadMostly`: "any read-duplicated copies of the data will be collapsed
/// into a single copy". The copies go at once, their frames with them, and the CPU then writes
/// the pages without a collapse on the way.
#[test]
fn unsetting_read_mostly_collapses_the_copies() {
    let (c, d, mut t, out) = copied_table();
    let in_use = c.memory_in_use(d).unwrap();
    c.advise(t.range(), Advice::UnsetReadMostly).unwrap();
    let s = c.device(d).unwrap().stats();
    assert_eq!(s.copies_held, 0, "{s:?}");
    assert_eq!(c.memory_in_use(d).unwrap(), in_use - 16 * 4096);
    c.check_invariants().unwrap();
    let mm = AddressSpace::current().unwrap();
    let collapses = mm.stats().dup_collapses;
    for e in t.view_mut::<u32>().iter_mut() {
        *e = e.wrapping_mul(3);
    }
    assert_eq!(mm.stats().dup_collapses, collapses, "a write found a copy");
    // Without the advice the table migrates as any page does, and reads the new values.
    gather(&c, d, &t, &out);
    assert_eq!(c.device(d).unwrap().stats().copies_held, 0);
    check_out(&t, &out);
    c.check_invariants().unwrap();
}
