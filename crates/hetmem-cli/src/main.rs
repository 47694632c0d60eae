//! The `hetmem` command: `demo` (pages moving between the CPU and a device, narrated) and
//! `bench` (the core micro-benchmarks, each as a ratio against its physical baseline measured in
//! the same run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hetmem::{AddressSpace, Config, CpuFaultBackend, Prot};
use hetmem_core::{pfn::HmmPfn, pool::MemoryKind, range_fault::HmmRange, PageRange, PAGE_SIZE};
use hetmem_sim::{DmirrorDevice, Mirror};

mod workloads;

#[derive(Parser)]
#[command(
    name = "hetmem",
    about = "Heterogeneous memory management in user space"
)]
struct Cli {
    /// CPU fault backend (default: userfaultfd when the kernel offers it).
    #[arg(long, value_enum, global = true)]
    backend: Option<Backend>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Uffd,
    Mprotect,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// A short end-to-end run: pages migrate to a device, the CPU faults them back.
    Demo {
        /// Pages in the demo buffer.
        #[arg(long, default_value_t = 64)]
        pages: u64,
    },
    /// Runs a workload on the simulated device and reports what the memory system did.
    Run(workloads::RunOpts),
    /// Runs a workload and prints the ranges of its context with their attributes and residency
    /// (AMD's svm_ranges), at the end or after a chosen launch.
    Inspect(workloads::InspectOpts),
    /// Micro-benchmarks as ratios against their baselines; with `--matrix`, the workloads ×
    /// presets × oversubscription matrix against explicit copies instead.
    Bench {
        /// Run the workload matrix (see `--matrix-*`) instead of the micro-benchmarks.
        #[arg(long)]
        matrix: bool,
        #[command(flatten)]
        m: workloads::MatrixOpts,
        /// MiB migrated to the device and back.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Pages for the fault benchmarks.
        #[arg(long, default_value_t = 4096)]
        fault_pages: u64,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Micro-benchmarks of the simulated accelerator (fault servicing rate, batching, TLB hit
    /// path), with the link model off.
    BenchDevice {
        /// MiB streamed through the device (one fault-driven pass).
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

fn main() -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let cli = Cli::parse();
    // `--trace` collects the runtime's events for the Chrome trace beside the usual log.
    let collector = match &cli.cmd {
        Some(Cmd::Run(o)) if o.trace.is_some() => Some(hetmem_workloads::trace::Collector::new()),
        _ => None,
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
        )
        .with(collector.as_ref().map(|c| c.layer()))
        .init();
    let backend = cli.backend.map(|b| match b {
        Backend::Uffd => CpuFaultBackend::Userfaultfd,
        Backend::Mprotect => CpuFaultBackend::Mprotect,
    });
    let mm = AddressSpace::init(Config { backend }).context("starting the address space")?;
    match cli.cmd.unwrap_or(Cmd::Demo { pages: 64 }) {
        Cmd::Demo { pages } => demo(mm, pages),
        Cmd::Bench {
            matrix: true, m, ..
        } => workloads::matrix_cmd(&m),
        Cmd::Bench {
            mib,
            fault_pages,
            reps,
            ..
        } => bench(mm, mib, fault_pages, reps),
        Cmd::Inspect(o) => workloads::inspect_cmd(&o),
        Cmd::BenchDevice { mib, reps } => bench_device(mm, mib, reps),
        Cmd::Run(o) => workloads::run_cmd(&o, collector.as_ref()),
    }
}

fn bench_device(mm: &AddressSpace, mib: u64, reps: usize) -> Result<()> {
    use hetmem_core::link::LinkModel;
    use hetmem_sim::accel::{AccelConfig, Accelerator, Miss, Thread};
    use hetmem_sim::placement::{Granularity, PlacementPolicy};
    println!(
        "hetmem bench-device: backend {:?}, link model off, {mib} MiB, median of {reps} runs",
        mm.backend()
    );
    let bytes = mib << 20;
    let words = bytes / 4;
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    use hetmem_core::fault_ring::ReplayPolicy;
    let window = |b: u64| -> Arc<dyn PlacementPolicy> {
        Arc::new(Granularity::new(b).expect("a valid window"))
    };
    // Placements at the default replay policy, then the replay policies at 64 KiB.
    let configs: Vec<(String, Arc<dyn PlacementPolicy>, ReplayPolicy)> = vec![
        (
            "4 KiB windows (demand paging), batch-flush".into(),
            window(4 << 10),
            ReplayPolicy::BatchFlush,
        ),
        (
            "64 KiB windows, batch-flush".into(),
            window(64 << 10),
            ReplayPolicy::BatchFlush,
        ),
        (
            "2 MiB windows (whole blocks), batch-flush".into(),
            window(2 << 20),
            ReplayPolicy::BatchFlush,
        ),
        (
            "64 KiB windows, replay block".into(),
            window(64 << 10),
            ReplayPolicy::Block,
        ),
        (
            "64 KiB windows, replay batch".into(),
            window(64 << 10),
            ReplayPolicy::Batch,
        ),
        (
            "64 KiB windows, replay once".into(),
            window(64 << 10),
            ReplayPolicy::Once,
        ),
    ];
    let mut hit = Vec::new();
    let mut plain = Vec::new();
    for (name, placement, replay) in configs {
        let (mut service, mut service_cpu, mut wall, mut batch, mut dups, mut nbatches) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for _ in 0..reps {
            // Enough warps in flight to fill a 256-fault batch with distinct pages, as the
            // thousands of resident warps of a GPU do (8 units x 64 warps = 512 pages a wave).
            let acc = Accelerator::new(AccelConfig {
                memory_bytes: 2 * bytes + (64 << 20),
                compute_units: 8,
                warps_per_cu: 64,
                link: LinkModel::off(),
                placement: Arc::clone(&placement),
                replay,
                ..AccelConfig::default()
            })?;
            let a = mm.map_anonymous(bytes, Prot::READ | Prot::WRITE, false)?;
            fill(a, 3)?;
            // 1. Streaming: one warp per page, each lane reads its 128-byte slice (a coalesced
            //    warp-wide load); every page faults once, in batches.
            let pa = a.start().0;
            let stream = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
                let mut line = [0u8; 128];
                t.read(pa + 128 * i, &mut line)?;
                std::hint::black_box(line);
                Ok(())
            };
            let before = acc.stats();
            let t = Instant::now();
            acc.launch(Arc::new(stream), bytes / 128)?.wait()?;
            let dt = t.elapsed();
            let s = acc.stats();
            let pages = s.pages_serviced - before.pages_serviced;
            let busy = (s.service_busy - before.service_busy).as_secs_f64();
            let cpu = (s.service_cpu - before.service_cpu).as_secs_f64();
            service.push(pages as f64 / busy.max(1e-9));
            service_cpu.push(pages as f64 / cpu.max(1e-9));
            wall.push(pages as f64 / dt.as_secs_f64());
            batch.push(s.batched_faults as f64 / s.batches.max(1) as f64);
            nbatches.push(s.batches as f64);
            dups.push(s.duplicates as f64 / s.batched_faults.max(1) as f64);
            // 2. TLB hit path: the same data again, resident now; 64 loads per thread.
            let loads = 64u64;
            let threads = (words / loads).max(1);
            let hits = move |i: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
                let mut x = 0u32;
                for k in 0..loads {
                    x = x.wrapping_add(t.load_u32(pa + 4 * ((i * loads + k) % words))?);
                }
                std::hint::black_box(x);
                Ok(())
            };
            let t = Instant::now();
            acc.launch(Arc::new(hits), threads)?.wait()?;
            hit.push(t.elapsed().as_secs_f64() / (threads * loads) as f64);
            let v: Vec<u32> = (0..words as u32).collect();
            let t = Instant::now();
            let mut x = 0u32;
            for w in &v {
                x = x.wrapping_add(std::hint::black_box(*w));
            }
            std::hint::black_box(x);
            plain.push(t.elapsed().as_secs_f64() / words as f64);
            drop(acc);
            #[allow(unsafe_code)]
            // SAFETY: the buffer is only reached through hetmem calls above, none of which holds
            // a reference.
            unsafe {
                mm.unmap(a)?
            };
        }
        println!("{name}:");
        println!(
            "  fault servicing, one service thread {:>10.0} pages/s while servicing (target >= 1,000,000)",
            med(service)
        );
        println!(
            "  per CPU second of the service thread {:>9.0} pages/s",
            med(service_cpu)
        );
        println!(
            "  end to end (launch wall time)       {:>10.0} pages/s",
            med(wall)
        );
        println!(
            "  mean batch size                     {:>10.1} faults ({:.0} batches), duplicates {:.0}% of faults",
            med(batch),
            med(nbatches),
            100.0 * med(dups)
        );
    }
    let (h, p) = (med(hit), med(plain));
    println!(
        "TLB hit path per access               {:>10.1} ns   plain load {:.2} ns   ratio {:.0}x",
        h * 1e9,
        p * 1e9,
        h / p
    );
    Ok(())
}

fn fill(range: PageRange, seed: u32) -> Result<()> {
    let words: Vec<u8> = (0..range.len_bytes() / 4)
        .flat_map(|i| (i as u32 ^ seed).to_ne_bytes())
        .collect();
    AddressSpace::current()?.cpu_write(range.start(), &words)?;
    Ok(())
}

fn check(range: PageRange, seed: u32) -> Result<()> {
    let mut buf = vec![0u8; range.len_bytes() as usize];
    cpu_read(range, &mut buf)?;
    for (i, w) in buf.chunks_exact(4).enumerate() {
        if u32::from_ne_bytes(w.try_into()?) != i as u32 ^ seed {
            bail!("word {i} lost");
        }
    }
    Ok(())
}

/// Reads managed memory the way a program does, touching every page from the CPU (device pages
/// fault back). `read_user` goes through the kernel, so first touch each page with a one-byte
/// read that takes the CPU fault path.
fn cpu_read(range: PageRange, buf: &mut [u8]) -> Result<()> {
    for a in range.pages() {
        hetmem::cpu_touch(a)?;
    }
    AddressSpace::current()?.cpu_read(range.start(), buf)?;
    Ok(())
}

fn demo(mm: &AddressSpace, pages: u64) -> Result<()> {
    println!("hetmem demo: backend {:?}", mm.backend());
    let range = mm.map_anonymous(pages * PAGE_SIZE, Prot::READ | Prot::WRITE, false)?;
    println!(
        "  mapped {} pages of managed memory at {}",
        pages,
        range.start()
    );
    fill(range, 0x5eed)?;
    println!("  the CPU wrote a pattern into every page");
    let dev = DmirrorDevice::new(MemoryKind::DevicePrivate, 64 << 20)?;
    let mirror = dev.open()?;
    println!(
        "  attached device {:?} (device-private memory, owner {:?})",
        dev.id(),
        dev.owner()
    );
    let mut buf = vec![0u8; range.len_bytes() as usize];
    let r = mirror
        .migrate_to_dev(range.start().0, pages, &mut buf)
        .map_err(|e| anyhow::anyhow!(e))?;
    let s = dev.pool_stats();
    println!(
        "  migrate to device: {} pages now in device memory ({} frames in use, page_in {})",
        r.cpages, s.pages_in_use, s.page_in
    );
    snapshot_line(&mirror, range, pages)?;
    let half = PageRange::from_pages(range.start().0, pages / 2)?;
    let before = mm.stats();
    let t = Instant::now();
    let mut tmp = vec![0u8; half.len_bytes() as usize];
    cpu_read(half, &mut tmp)?;
    let dt = t.elapsed();
    let after = mm.stats();
    println!(
        "  the CPU read the first half: {} CPU faults migrated pages back ({:.1} us per page)",
        after.cpu_fault_migrations - before.cpu_fault_migrations,
        dt.as_secs_f64() * 1e6 / (pages / 2) as f64
    );
    snapshot_line(&mirror, range, pages)?;
    let r = mirror
        .read(range.start().0, pages, &mut buf)
        .map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "  the device read all {} pages in {} fault round(s)",
        r.cpages, r.faults
    );
    check(range, 0x5eed)?;
    println!("  every word checked: nothing lost");
    let s = mm.stats();
    println!(
        "  totals: {} pages to device, {} to system, {} CPU faults, {} zero fills",
        s.pages_to_device,
        s.pages_to_system,
        s.cpu_faults + s.cpu_fault_migrations,
        s.zero_fills
    );
    drop(mirror);
    // SAFETY-free by construction: nothing references the demo buffer any more.
    #[allow(unsafe_code)]
    // SAFETY: the buffer is only reached through hetmem calls above, none of which holds a reference.
    unsafe {
        mm.unmap(range)?
    };
    Ok(())
}

fn snapshot_line(mirror: &Mirror, range: PageRange, pages: u64) -> Result<()> {
    let mut snap = vec![0u8; pages as usize];
    mirror
        .snapshot(range.start().0, pages, &mut snap)
        .map_err(|e| anyhow::anyhow!(e))?;
    let line: String = snap
        .iter()
        .map(|b| match b & 0xf0 {
            0x20 => 'D',
            0x10 => 'z',
            _ if b & 2 != 0 => 'W',
            _ if b & 1 != 0 => 'R',
            _ => '.',
        })
        .collect();
    println!("    residency (D device, W CPU writable, R CPU read-only, . unpopulated): {line}");
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(mm: &AddressSpace, mib: u64, fault_pages: u64, reps: usize) -> Result<()> {
    println!(
        "hetmem bench: backend {:?}, median of {reps} runs",
        mm.backend()
    );
    let fault_mib = (fault_pages * PAGE_SIZE).div_ceil(1 << 20);
    let dev = DmirrorDevice::new(MemoryKind::DevicePrivate, (mib.max(fault_mib) + 64) << 20)?;
    let mirror = dev.open()?;

    // 1. CPU fault on a device page vs a bare SIGSEGV + mprotect round trip.
    let range = mm.map_anonymous(fault_pages * PAGE_SIZE, Prot::READ | Prot::WRITE, false)?;
    fill(range, 1)?;
    let mut buf = vec![0u8; range.len_bytes() as usize];
    let mut fault = Vec::new();
    let mut base = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..reps {
        mirror
            .migrate_to_dev(range.start().0, fault_pages, &mut buf)
            .map_err(|e| anyhow::anyhow!(e))?;
        let t = Instant::now();
        for a in range.pages() {
            hetmem::cpu_touch(a)?;
        }
        fault.push(t.elapsed() / fault_pages as u32);
        base.push(
            hetmem_sys::signal::segv_mprotect_roundtrip(fault_pages as usize)? / fault_pages as u32,
        );
        if let Ok(d) = hetmem_sys::signal::sigbus_uffd_move_roundtrip(fault_pages as usize) {
            floor.push(d / fault_pages as u32);
        }
    }
    // Breakdown: the same migrations back called directly, without the trap and the signal.
    let mut direct = Vec::new();
    for _ in 0..reps {
        mirror
            .migrate_to_dev(range.start().0, fault_pages, &mut buf)
            .map_err(|e| anyhow::anyhow!(e))?;
        let d = Arc::clone(mirror.device());
        let t = Instant::now();
        for a in range.pages() {
            hetmem::Device::migrate_to_ram(&*d, mm, a)?;
        }
        direct.push(t.elapsed() / fault_pages as u32);
    }
    let (f, b) = (median(fault), median(base));
    println!(
        "cpu fault on a device page      {:>8.2} us   bare SIGSEGV+mprotect {:>6.2} us   ratio {:.2}x (target <= 2x)",
        f.as_secs_f64() * 1e6,
        b.as_secs_f64() * 1e6,
        f.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "  of which migrate_to_ram (called directly): {:>6.2} us",
        median(direct).as_secs_f64() * 1e6
    );
    if !floor.is_empty() {
        let u = median(floor);
        println!(
            "  floor of a userfaultfd fault:              bare SIGBUS+UFFDIO_MOVE {:>6.2} us   ({:.2}x the SIGSEGV+mprotect trip)",
            u.as_secs_f64() * 1e6,
            u.as_secs_f64() / b.as_secs_f64()
        );
    }

    // 2. Migrate mib MiB to the device and back vs memcpy of the same bytes (both ways).
    let bytes = mib << 20;
    let npages = bytes / PAGE_SIZE;
    let big = mm.map_anonymous(bytes, Prot::READ | Prot::WRITE, false)?;
    fill(big, 2)?;
    let mut out = vec![0u8; bytes as usize];
    let mut mig = Vec::new();
    let mut cpy = Vec::new();
    let src = vec![7u8; bytes as usize];
    let mut dst = vec![0u8; bytes as usize];
    for _ in 0..reps {
        let t = Instant::now();
        mirror
            .migrate_to_dev_no_readback(big.start().0, npages)
            .map_err(|e| anyhow::anyhow!(e))?;
        mirror
            .migrate_to_sys(big.start().0, npages)
            .map_err(|e| anyhow::anyhow!(e))?;
        mig.push(t.elapsed());
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        out.copy_from_slice(&dst);
        std::hint::black_box(&mut out);
        cpy.push(t.elapsed());
    }
    check(big, 2)?;
    let (m, c) = (median(mig), median(cpy));
    let gbs = |d: Duration| 2.0 * bytes as f64 / d.as_secs_f64() / 1e9;
    println!(
        "migrate {mib} MiB to device+back  {:>8.1} ms ({:.1} GB/s)   memcpy {:>6.1} ms ({:.1} GB/s)   ratio {:.0}% of memcpy (target >= 80%)",
        m.as_secs_f64() * 1e3,
        gbs(m),
        c.as_secs_f64() * 1e3,
        gbs(c),
        100.0 * c.as_secs_f64() / m.as_secs_f64()
    );

    // 3. Range fault per page on a populated range.
    let mut per_page = Vec::new();
    for _ in 0..reps {
        let sub = mirror.notifier();
        let t = Instant::now();
        let mut r = HmmRange::new(sub, big, HmmPfn::REQ_FAULT);
        r.notifier_seq = sub.read_begin();
        mm.range_fault(&mut r).map_err(|e| anyhow::anyhow!(e))?;
        per_page.push(t.elapsed() / npages as u32);
    }
    let rf = median(per_page);
    println!(
        "range fault, populated range    {:>8.1} ns per page",
        rf.as_secs_f64() * 1e9
    );

    // 4. Metadata per managed page.
    println!(
        "metadata per managed 4 KiB page {:>8} bytes (target <= 16)",
        hetmem_core::page_state::PageStates::BYTES_PER_PAGE
    );
    let s = mm.stats();
    println!(
        "counters: {} pages to device, {} to system, {} copy fallbacks, {} fault migrations",
        s.pages_to_device, s.pages_to_system, s.move_fallbacks, s.cpu_fault_migrations
    );
    Ok(())
}
