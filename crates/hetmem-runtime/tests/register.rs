//! Registration of the program's own memory (issue 4, user API: `cudaHostRegister`,
//! `hipHostRegister`, HMM's plain `malloc` memory): a `Vec` filled by the CPU is registered,
//! kernels on one device or two read and write it by its own address, and after unregistration
//! the program reads the devices' writes through its original pointer, every page back in system
//! memory. Bad buffers get typed errors and come back untouched; unregistration waits for
//! launches and prefetches in flight; released memory takes its advice with it.

use std::sync::Arc;

use hetmem::AddressSpace;
use hetmem_core::{link::LinkModel, DeviceId, PageRange, PAGE_SIZE};
use hetmem_runtime::{Advice, Attr, Context, Page, Processor, RuntimeError};
use hetmem_sim::accel::{AccelConfig, AccelError, Kernel, LaunchError, Miss, Thread};

fn device(mib: u64) -> AccelConfig {
    AccelConfig {
        memory_bytes: mib << 20,
        compute_units: 2,
        link: LinkModel::off(),
        ..AccelConfig::default()
    }
}

fn ctx(devices: usize) -> Context {
    let mut b = Context::builder();
    for _ in 0..devices {
        b = b.device(device(32));
    }
    b.build().unwrap()
}

/// `n` pages holding `f(i)` as the i-th u32.
fn pages_with(n: usize, f: impl Fn(usize) -> u32) -> Vec<Page> {
    let mut v = vec![Page::ZERO; n];
    for (k, p) in v.iter_mut().enumerate() {
        for (j, w) in p.0.chunks_exact_mut(4).enumerate() {
            w.copy_from_slice(&f(k * PAGE_SIZE as usize / 4 + j).to_ne_bytes());
        }
    }
    v
}

/// The u32s of `v`.
fn words(v: &[Page]) -> Vec<u32> {
    v.iter()
        .flat_map(|p| p.0.chunks_exact(4))
        .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
        .collect()
}

/// `x[i] = f(x[i])` over `n` u32 at `base`, on `dev`.
fn map_on(
    c: &Context,
    dev: DeviceId,
    base: u64,
    n: u64,
    f: impl Fn(u32) -> u32 + Send + Sync + 'static,
) {
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let v = t.load_u32(base + 4 * i)?;
        t.store_u32(base + 4 * i, f(v))
    };
    let k: Arc<dyn Kernel> = Arc::new(k);
    c.launch(dev, k, n).unwrap().wait().unwrap();
}

fn on(c: &Context, r: PageRange, p: Processor) -> u64 {
    c.residency(r)
        .iter()
        .filter(|(_, q)| *q == p)
        .map(|(r, _)| r.npages())
        .sum()
}

#[test]
fn a_registered_buffer_is_reached_by_kernels_and_comes_back_with_their_writes() {
    let c = ctx(1);
    let d = c.devices()[0];
    let npages = 96;
    let buf = pages_with(npages, |i| i as u32 ^ 0x1234_5678);
    let ptr = buf.as_ptr() as u64;
    let reg = c.register(buf).unwrap();
    let r = reg.range();
    assert_eq!(r, PageRange::from_pages(ptr, npages as u64).unwrap());
    assert_eq!((reg.addr(), reg.len()), (ptr, npages as u64 * PAGE_SIZE));
    assert_eq!(c.residency(r), vec![(r, Processor::Cpu)]);
    // A kernel reads what the CPU wrote and writes back, by the buffer's own address.
    let n = reg.len() / 4;
    map_on(&c, d, reg.addr(), n, |v| v.wrapping_mul(2).wrapping_add(1));
    assert_eq!(
        on(&c, r, Processor::Device(d)),
        r.npages(),
        "the pages moved in"
    );
    {
        // A launch while a view of registered memory is open is refused, as for allocations.
        let v = reg.view::<u32>();
        let k: Arc<dyn Kernel> =
            Arc::new(|_: u64, _: &mut Thread<'_>| -> Result<(), Miss> { Ok(()) });
        assert!(matches!(
            c.launch(d, k, 1),
            Err(RuntimeError::ViewsOpen { views: 1 })
        ));
        assert_eq!(v[1], (1 ^ 0x1234_5678u32).wrapping_mul(2).wrapping_add(1));
    }
    let before = c.device_stats(d).unwrap();
    // The view above faulted page 0 home; the device still holds the rest.
    let held = on(&c, r, Processor::Device(d));
    assert!(held >= r.npages() - 1, "{held}");
    let buf = reg.unregister().unwrap();
    // The same memory, every byte as the device left it, read through the original pointer.
    assert_eq!(buf.as_ptr() as u64, ptr);
    assert_eq!(buf.len(), npages);
    let got = words(&buf);
    for (i, &w) in got.iter().enumerate() {
        assert_eq!(
            w,
            (i as u32 ^ 0x1234_5678).wrapping_mul(2).wrapping_add(1),
            "word {i}"
        );
    }
    // Unregistration brought the device's pages home, counted as its own, and freed its frames.
    let after = c.device_stats(d).unwrap();
    assert_eq!(after.pages_to_system - before.pages_to_system, held);
    assert_eq!(after.pages_resident, 0);
    assert_eq!(c.memory_in_use(d).unwrap(), 0);
    // No longer managed: the runtime refuses the range, and a kernel that reaches it fails
    // instead of touching the program's memory.
    assert!(AddressSpace::current()
        .unwrap()
        .region_of(r.start())
        .is_none());
    assert!(matches!(c.attributes(r), Err(RuntimeError::NotManaged(_))));
    let base = ptr;
    let poke = move |_: u64, t: &mut Thread<'_>| -> Result<(), Miss> { t.store_u32(base, 0) };
    let e = c.launch(d, Arc::new(poke), 1).unwrap().wait().unwrap_err();
    assert!(
        matches!(
            e,
            RuntimeError::Accel(AccelError::Launch(LaunchError::Fatal { .. }))
        ),
        "{e}"
    );
    assert_eq!(
        words(&buf[..1])[0],
        0x1234_5678u32.wrapping_mul(2).wrapping_add(1)
    );
    c.check_invariants().unwrap();
}

#[test]
fn two_devices_share_a_registered_buffer_and_the_program_reads_the_last_writers_bytes() {
    let c = ctx(2);
    let (d0, d1) = (c.devices()[0], c.devices()[1]);
    let buf = pages_with(64, |i| i as u32);
    let ptr = buf.as_ptr() as u64;
    let mut reg = c.register(buf).unwrap();
    let (r, n) = (reg.range(), reg.len() / 4);
    map_on(&c, d0, reg.addr(), n, |v| v + 10);
    assert_eq!(on(&c, r, Processor::Device(d0)), r.npages());
    let s1 = c.device_stats(d1).unwrap();
    map_on(&c, d1, reg.addr(), n, |v| v * 3);
    let t1 = c.device_stats(d1).unwrap();
    assert_eq!(
        t1.pages_from_peers - s1.pages_from_peers,
        r.npages(),
        "device to device"
    );
    assert_eq!(t1.pages_from_system, s1.pages_from_system);
    // The CPU writes through a view between launches; device 0 sees it.
    reg.view_mut::<u32>()[5] = 1_000_000;
    map_on(&c, d0, reg.addr(), n, |v| v + 1);
    let buf = reg.unregister().unwrap();
    assert_eq!(buf.as_ptr() as u64, ptr);
    for (i, w) in words(&buf).into_iter().enumerate() {
        let want = if i == 5 {
            1_000_001
        } else {
            (i as u32 + 10) * 3 + 1
        };
        assert_eq!(w, want, "word {i}");
    }
    assert_eq!(
        c.memory_in_use(d0).unwrap() + c.memory_in_use(d1).unwrap(),
        0
    );
    c.check_invariants().unwrap();
}

#[test]
fn dropping_a_registration_brings_its_pages_home_and_ends_it() {
    let c = ctx(1);
    let d = c.devices()[0];
    let reg = c.register(pages_with(32, |i| i as u32)).unwrap();
    let r = reg.range();
    assert_eq!(
        c.prefetch(r, Processor::Device(d)).unwrap().wait().unwrap(),
        32
    );
    assert_eq!(c.memory_in_use(d).unwrap(), 32 * PAGE_SIZE);
    drop(reg);
    assert_eq!(c.memory_in_use(d).unwrap(), 0);
    assert_eq!(c.device_stats(d).unwrap().pages_to_system, 32);
    assert!(AddressSpace::current()
        .unwrap()
        .region_of(r.start())
        .is_none());
    c.check_invariants().unwrap();
}

#[test]
fn unregistration_waits_for_a_prefetch_in_flight() {
    let c = ctx(1);
    let d = c.devices()[0];
    // 8 MiB: the prefetch is still running when unregistration starts.
    let npages = 2048;
    let reg = c.register(pages_with(npages, |i| !(i as u32))).unwrap();
    let fence = c.prefetch(reg.range(), Processor::Device(d)).unwrap();
    let buf = reg.unregister().unwrap();
    // The prefetch finished before the range stopped being managed (all of it moved), and
    // unregistration brought all of it back.
    assert_eq!(fence.wait().unwrap(), npages as u64);
    assert_eq!(c.memory_in_use(d).unwrap(), 0);
    assert!(words(&buf)
        .iter()
        .enumerate()
        .all(|(i, &w)| w == !(i as u32)));
    c.check_invariants().unwrap();
}

#[test]
fn bad_buffers_get_typed_errors_and_come_back_untouched() {
    let c = ctx(1);
    let e = c.register(Vec::<Page>::new()).unwrap_err();
    assert!(matches!(e.error, RuntimeError::EmptyRegistration), "{e}");
    // Not whole pages (its length alone says so, wherever the allocator put it).
    let odd = vec![7u8; 5000];
    let p = odd.as_ptr();
    let e = c.register(odd).unwrap_err();
    assert!(
        matches!(e.error, RuntimeError::Unaligned { len: 5000, .. }),
        "{e}"
    );
    assert_eq!(e.buffer.as_ptr(), p);
    assert!(e.buffer.iter().all(|&b| b == 7));
    // Overlapping memory something already manages: part of it, then all of it.
    let mm = AddressSpace::current().unwrap();
    let buf = pages_with(8, |i| i as u32);
    let ptr = buf.as_ptr() as u64;
    let part = mm.register(ptr + 2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let e = c.register(buf).unwrap_err();
    let whole = PageRange::from_pages(ptr, 8).unwrap();
    assert!(
        matches!(e.error, RuntimeError::AlreadyManaged(r) if r == whole),
        "{e}"
    );
    mm.unregister(part).unwrap();
    let all = mm.register(ptr, 8 * PAGE_SIZE).unwrap();
    let e = c.register(e.buffer).unwrap_err();
    assert!(matches!(e.error, RuntimeError::AlreadyManaged(_)), "{e}");
    mm.unregister(all).unwrap();
    let buf = e.buffer;
    assert_eq!(buf.as_ptr() as u64, ptr);
    assert!(words(&buf).iter().enumerate().all(|(i, &w)| w == i as u32));
    // `?` turns a refusal into a RuntimeError; once nothing overlaps, the buffer registers.
    let again = || -> Result<Vec<Page>, RuntimeError> {
        let reg = c.register(buf)?;
        Ok(reg.unregister()?)
    };
    let back = again().unwrap();
    assert_eq!(back.as_ptr() as u64, ptr);
}

#[test]
fn released_memory_takes_its_advice_with_it() {
    let c = ctx(1);
    let d = Processor::Device(c.devices()[0]);
    // A registration: unregistered and registered again, the buffer starts with no advice.
    let reg = c.register(pages_with(16, |_| 0)).unwrap();
    let r = reg.range();
    c.advise(r, Advice::SetPreferredLocation(d)).unwrap();
    c.advise(r, Advice::SetReadMostly).unwrap();
    assert_eq!(c.attributes(r).unwrap().preferred_location, Attr::Same(d));
    let reg = c.register(reg.unregister().unwrap()).unwrap();
    assert_eq!(reg.range(), r);
    let a = c.attributes(r).unwrap();
    assert_eq!(a.preferred_location, Attr::Unset);
    assert!(!a.read_mostly);
    drop(reg);
    // An allocation: a new one given the same addresses does not inherit the old advice.
    let x = c.alloc(64 * PAGE_SIZE).unwrap();
    let rx = x.range();
    c.advise(rx, Advice::SetPreferredLocation(Processor::Cpu))
        .unwrap();
    drop(x);
    let y = c.alloc(64 * PAGE_SIZE).unwrap();
    if y.range() == rx {
        assert_eq!(
            c.attributes(rx).unwrap().preferred_location,
            Attr::Unset,
            "stale advice on a new allocation"
        );
    } else {
        eprintln!("the kernel placed the new allocation elsewhere: nothing to check");
    }
}

#[test]
fn a_registration_that_outlives_its_context_still_hands_the_buffer_back() {
    let c = ctx(2);
    let d1 = c.devices()[1];
    let reg = c.register(pages_with(16, |i| i as u32)).unwrap();
    map_on(&c, d1, reg.addr(), reg.len() / 4, |v| v + 3);
    // The devices go away first: their pages come home as they detach.
    drop(c);
    let buf = reg.unregister().unwrap();
    assert!(words(&buf)
        .iter()
        .enumerate()
        .all(|(i, &w)| w == i as u32 + 3));
}

#[test]
fn unregistering_read_copies_gives_back_a_writable_buffer() {
    let c = ctx(1);
    let d = c.devices()[0];
    let r = c.register(pages_with(16, |i| i as u32)).unwrap();
    c.advise(r.range(), Advice::SetReadMostly).unwrap();
    let out = c.alloc(PAGE_SIZE).unwrap();
    let (base, o) = (r.addr(), out.addr());
    let sum = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let v = t.load_u32(base + 4 * i)?;
        t.atomic_add_u32(o, v).map(|_| ())
    };
    let n = 16 * PAGE_SIZE / 4;
    c.launch(d, Arc::new(sum), n).unwrap().wait().unwrap();
    let want = (0..n as u32).fold(0u32, |a, b| a.wrapping_add(b));
    assert_eq!(out.view::<u32>()[0], want);
    // The device reads through copies: the pages are write-protected for the CPU.
    assert_eq!(c.device(d).unwrap().stats().copies_held, 16);
    let mut v = r.unregister().unwrap();
    assert_eq!(c.device(d).unwrap().stats().copies_held, 0);
    // Plain stores into the program's own buffer: a page left write-protected would fault
    // outside managed memory (a crash under the mprotect backend).
    for p in v.iter_mut() {
        for w in p.0.chunks_exact_mut(4) {
            w.copy_from_slice(&7u32.to_ne_bytes());
        }
    }
    assert!(words(&v).iter().all(|&w| w == 7));
    c.check_invariants().unwrap();
}
