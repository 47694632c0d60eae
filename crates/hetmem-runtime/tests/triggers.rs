//! Migration triggers (seed 003: prefetch, device fault, CPU fault, eviction, suspend; and access
//! counters, explicit calls): every page the migration engine commits is counted under the
//! trigger in scope, per device and per context, and each migration's trace event names it.

use std::collections::BTreeMap;
use std::sync::Arc;

use hetmem_core::{link::LinkModel, DeviceId, PageRange, PAGE_SIZE};
use hetmem_runtime::{Context, Managed, MigrationCounts, Processor, Trigger, TriggerCounts};
use hetmem_sim::accel::{AccelConfig, Kernel, Miss, Thread};
use parking_lot::Mutex;

fn device(mib: u64) -> AccelConfig {
    AccelConfig {
        memory_bytes: mib << 20,
        compute_units: 2,
        link: LinkModel::off(),
        ..AccelConfig::default()
    }
}

/// `x[i] += 1` over every u32 of `x`.
fn bump(x: &Managed) -> (Arc<dyn Kernel>, u64) {
    let base = x.addr();
    let k = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
        let v = t.load_u32(base + 4 * i)?;
        t.store_u32(base + 4 * i, v.wrapping_add(1))
    };
    (Arc::new(k), x.len() / 4)
}

fn run(c: &Context, dev: DeviceId, k: (Arc<dyn Kernel>, u64)) {
    c.launch(dev, k.0, k.1).unwrap().wait().unwrap();
}

fn on(c: &Context, r: PageRange, p: Processor) -> u64 {
    c.residency(r)
        .iter()
        .filter(|(_, q)| *q == p)
        .map(|(r, _)| r.npages())
        .sum()
}

/// The counts of `t`, and nothing under any other trigger.
fn only(m: &TriggerCounts, t: Trigger) -> MigrationCounts {
    for (other, c) in m.iter() {
        if other != t {
            assert_eq!(c, MigrationCounts::default(), "{other} in {m:?}");
        }
    }
    m.get(t)
}

fn since(now: &TriggerCounts, before: &TriggerCounts, t: Trigger) -> MigrationCounts {
    let (a, b) = (now.get(t), before.get(t));
    MigrationCounts {
        from_system: a.from_system - b.from_system,
        from_peer: a.from_peer - b.from_peer,
        to_system: a.to_system - b.to_system,
        to_peer: a.to_peer - b.to_peer,
    }
}

#[test]
fn each_trigger_counts_the_pages_it_moved_and_nothing_else() {
    let c = Context::builder()
        .device(device(8))
        .prefetcher(None)
        .build()
        .unwrap();
    let d = c.devices()[0];
    let mut x = c.alloc(64 * PAGE_SIZE).unwrap();
    x.view_mut::<u32>().fill(1);
    let n = x.range().npages();

    // Device faults: the kernel's touches bring every page in.
    run(&c, d, bump(&x));
    let m = c.stats().migrations;
    let fault = only(&m, Trigger::DeviceFault);
    assert_eq!(fault.from_system, n, "{m:?}");
    assert_eq!(c.device_stats(d).unwrap().migrations, m);

    // CPU faults: reading the first 8 pages brings them back (one at a time: 4 KiB pieces).
    let v = x.view::<u32>();
    let per_page = (PAGE_SIZE / 4) as usize;
    assert!(v[..8 * per_page].iter().all(|&e| e == 2));
    drop(v);
    let after_cpu = c.stats().migrations;
    let cpu = since(&after_cpu, &m, Trigger::CpuFault);
    assert_eq!(cpu.to_system, n - on(&c, x.range(), Processor::Device(d)));
    assert!(cpu.to_system >= 8, "{after_cpu:?}");

    // A prefetch to the device takes the rest back in; one to the CPU empties it.
    let back = n - on(&c, x.range(), Processor::Device(d));
    c.prefetch(x.range(), Processor::Device(d))
        .unwrap()
        .wait()
        .unwrap();
    c.prefetch(x.range(), Processor::Cpu)
        .unwrap()
        .wait()
        .unwrap();
    let after_prefetch = c.stats().migrations;
    let p = since(&after_prefetch, &after_cpu, Trigger::Prefetch);
    assert_eq!(
        (p.from_system, p.to_system),
        (back, n),
        "{after_prefetch:?}"
    );

    // Suspend: whatever the device holds.
    run(&c, d, bump(&x));
    let before = c.stats().migrations;
    let resident = on(&c, x.range(), Processor::Device(d));
    assert_eq!(c.suspend().unwrap(), resident);
    let s = since(&c.stats().migrations, &before, Trigger::Suspend);
    assert_eq!(s.to_system, resident);
    assert_eq!(s.from_system + s.from_peer + s.to_peer, 0);
    assert!(x.view::<u32>().iter().all(|&e| e == 3));
    c.check_invariants().unwrap();
}

#[test]
fn eviction_under_oversubscription_counts_as_eviction() {
    // 4 MiB of device memory, 12 MiB touched twice.
    let c = Context::builder().device(device(4)).build().unwrap();
    let d = c.devices()[0];
    let mut x = c.alloc(12 << 20).unwrap();
    x.view_mut::<u32>().fill(7);
    run(&c, d, bump(&x));
    run(&c, d, bump(&x));
    let rs = c.stats();
    let ev = rs.migrations.get(Trigger::Eviction);
    assert!(ev.to_system > 0, "{:?}", rs.migrations);
    assert_eq!(ev.to_system, rs.pages_evicted);
    assert_eq!(ev.from_system + ev.from_peer + ev.to_peer, 0);
    let fault = rs.migrations.get(Trigger::DeviceFault);
    // Everything that came in, came in on faults; what left went on evictions (nothing else ran).
    let total = rs.migrations.total();
    assert_eq!(total.from_system, fault.from_system);
    assert_eq!(total.to_system, ev.to_system + fault.to_system);
    assert_eq!(
        fault.from_system - total.to_system,
        on(&c, x.range(), Processor::Device(d))
    );
    assert!(x.view::<u32>().iter().all(|&e| e == 9));
}

#[test]
fn device_to_device_counts_each_side() {
    let c = Context::builder()
        .device(device(8))
        .device(device(8))
        .build()
        .unwrap();
    let (d0, d1) = (c.devices()[0], c.devices()[1]);
    let mut x = c.alloc(1 << 20).unwrap();
    x.view_mut::<u32>().fill(0);
    run(&c, d0, bump(&x));
    run(&c, d1, bump(&x));
    let (s0, s1) = (c.device_stats(d0).unwrap(), c.device_stats(d1).unwrap());
    let n = x.range().npages();
    assert_eq!(s0.migrations.get(Trigger::DeviceFault).to_peer, n);
    assert_eq!(s1.migrations.get(Trigger::DeviceFault).from_peer, n);
    assert_eq!(s1.migrations.get(Trigger::DeviceFault).from_system, 0);
    let mut sum = s0.migrations;
    sum.add(&s1.migrations);
    assert_eq!(c.stats().migrations, sum);
    assert!(x.view::<u32>().iter().all(|&e| e == 2));
}

/// Records the `trigger` of every `migration` event, with its pages.
#[derive(Default)]
struct Recorder(Mutex<BTreeMap<String, u64>>);

struct Visit {
    trigger: Option<String>,
    pages: u64,
}

impl tracing::field::Visit for Visit {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "trigger" {
            self.trigger = Some(value.to_string());
        }
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if ["from_system", "from_peer", "to_system", "to_peer"].contains(&field.name()) {
            self.pages += value;
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        if e.metadata().fields().field("trigger").is_none()
            || !e.metadata().target().starts_with("hetmem::migrate")
        {
            return;
        }
        let mut v = Visit {
            trigger: None,
            pages: 0,
        };
        e.record(&mut v);
        let t = v.trigger.expect("a migration event names its trigger");
        *self.0.lock().entry(t).or_default() += v.pages;
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn every_migration_event_names_its_trigger_and_agrees_with_the_counts() {
    let rec = Arc::new(Recorder::default());
    // Events come from the service threads too: the subscriber must be global.
    tracing::subscriber::set_global_default(Arc::clone(&rec)).unwrap();
    let c = Context::builder().device(device(4)).build().unwrap();
    let d = c.devices()[0];
    let mut x = c.alloc(8 << 20).unwrap();
    x.view_mut::<u32>().fill(0);
    run(&c, d, bump(&x));
    // The last pages touched are still on the device (the first ones were evicted).
    let v = x.view::<u32>();
    assert!(v[v.len() - 1024..].iter().all(|&e| e == 1));
    drop(v);
    c.prefetch(x.range(), Processor::Device(d))
        .unwrap()
        .wait()
        .unwrap();
    c.suspend().unwrap();
    let counts = c.stats().migrations;
    let seen = rec.0.lock().clone();
    for (t, m) in counts.iter() {
        assert_eq!(
            seen.get(t.name()).copied().unwrap_or(0),
            m.total(),
            "{t}: events {seen:?}, counts {counts:?}"
        );
    }
    for t in [
        "device_fault",
        "cpu_fault",
        "eviction",
        "prefetch",
        "suspend",
    ] {
        assert!(seen.get(t).copied().unwrap_or(0) > 0, "{t}: {seen:?}");
    }
}
