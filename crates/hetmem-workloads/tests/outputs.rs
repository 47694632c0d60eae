//! What `hetmem run` writes besides its table: the Chrome trace parses as JSON with the fields
//! Perfetto needs, the SVG holds the samples it claims, the JSON report round-trips through
//! serde, the range dump names every allocation, and bad input is a typed error.

use std::time::Duration;

use hetmem_core::link::LinkPreset;
use hetmem_workloads::{
    inspect, plot,
    run::{run, RunConfig},
    trace::{write_chrome, Collector},
    Mode, Preset, WorkloadError, WorkloadKind, WorkloadSpec,
};
use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt as _;

fn cfg(kind: WorkloadKind, bytes: u64) -> RunConfig {
    RunConfig {
        compute_units: 2,
        link: LinkPreset::Pcie3X16,
        sample_every: Duration::from_micros(200),
        ..RunConfig::new(WorkloadSpec { kind, bytes }, 8 << 20, Preset::UvmDefault)
    }
}

#[test]
fn the_trace_is_chrome_json_with_kernels_fault_batches_migrations_and_counters() {
    let c = Collector::new();
    let subscriber = tracing_subscriber::registry().with(c.layer());
    // Global: the fault service and the prefetch workers log from their own threads.
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let out = run(&cfg(WorkloadKind::Stream, 4 << 20), None).unwrap();
    let events = c.take();
    let path = std::env::temp_dir().join(format!("hetmem-trace-{}.json", std::process::id()));
    write_chrome(&path, &c, &events, &out.samples, out.started).unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    let ev = v["traceEvents"].as_array().unwrap();
    for e in ev {
        assert!(e["name"].is_string() && e["ph"].is_string(), "{e}");
        assert!(e["pid"].is_u64() && e["tid"].is_u64(), "{e}");
        if e["ph"] != "M" {
            assert!(e["ts"].as_f64().is_some_and(|t| t >= 0.0), "{e}");
        }
    }
    let named = |ph: &str, name: &str| {
        ev.iter()
            .filter(|e| e["ph"] == ph && e["name"].as_str().unwrap().starts_with(name))
            .collect::<Vec<_>>()
    };
    let kernels = named("X", "kernel");
    assert_eq!(
        kernels.len() as u64,
        out.report.launches,
        "one span per launch"
    );
    assert!(kernels[0]["dur"].as_f64().unwrap() > 0.0);
    assert_eq!(kernels[0]["args"]["name"], "triad");
    let batches = named("i", "fault batch");
    assert_eq!(
        batches.len() as u64,
        out.report.batches,
        "one event per batch"
    );
    let faults: u64 = batches
        .iter()
        .map(|b| b["args"]["faults"].as_u64().unwrap())
        .sum();
    assert!(faults > 0 && faults <= out.report.faults + out.report.duplicates);
    assert!(!named("i", "migration").is_empty());
    let counters = named("C", "device memory");
    assert_eq!(counters.len(), out.samples.len());
    assert!(counters
        .iter()
        .any(|c| c["args"]["resident"].as_f64().unwrap() > 0.0));
    assert!(!named("M", "thread_name").is_empty());
}

#[test]
fn the_plot_draws_every_sample_and_the_capacity() {
    let out = run(&cfg(WorkloadKind::Stream, 16 << 20), None).unwrap();
    assert!(out.samples.len() > 2, "{}", out.samples.len());
    let svg = plot::svg(&out.report, &out.samples);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 3, "in, out, faults");
    for line in svg.lines().filter(|l| l.starts_with("<polyline")) {
        let pts = line.split('"').nth(1).unwrap().split(' ').count();
        assert_eq!(pts, out.samples.len());
    }
    // Resident never exceeds capacity and reaches it under oversubscription.
    let cap = (8 << 20) / 4096;
    assert!(out.samples.iter().all(|s| s.resident_pages <= cap));
    assert!(out.samples.iter().any(|s| s.resident_pages > cap / 2));
    assert!(svg.contains("device memory capacity"));
    assert!(svg.contains("2.00x"), "oversubscription in the title");
}

#[test]
fn the_json_report_has_the_report_fields() {
    let r = run(&cfg(WorkloadKind::Random, 2 << 20), None)
        .unwrap()
        .report;
    let v: Value = serde_json::to_value(&r).unwrap();
    for k in [
        "wall_ns",
        "modelled_ns",
        "faults",
        "batches",
        "mean_batch",
        "duplicates",
        "migrations",
        "evictions",
        "thrashing_detected",
        "pages_spilled",
        "counter_notifications",
        "latency",
    ] {
        assert!(!v[k].is_null(), "{k} missing: {v}");
    }
    assert_eq!(v["workload"], "random");
    assert_eq!(v["preset"], "uvm-default");
    assert_eq!(v["faults"].as_u64().unwrap(), r.faults);
    assert!(v["latency"]["modelled_p50_us"].as_f64().unwrap() > 0.0);
}

#[test]
fn inspect_names_every_allocation_with_its_residency() {
    let mut seen = None;
    let mut obs = |s: &hetmem_workloads::exec::Step<'_>| {
        seen = Some(inspect::ranges(s.ctx, s.allocs).unwrap());
    };
    run(&cfg(WorkloadKind::Atax, 2 << 20), Some(&mut obs)).unwrap();
    let ranges = seen.unwrap();
    let names: Vec<&str> = ranges.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["A", "x", "tmp", "partials", "y"]);
    for r in &ranges {
        let pages: u64 = r.resident.iter().map(|(_, n)| n).sum();
        assert_eq!(pages, r.pages, "{r:?}");
        assert!(r.resident.iter().any(|(p, _)| p == "gpu0"), "{r:?}");
    }
    let text = inspect::render(&ranges, 2);
    assert_eq!(
        text.lines().filter(|l| !l.starts_with(' ')).count(),
        1 + ranges.len()
    );
}

#[test]
fn bad_input_is_a_typed_error_not_a_panic() {
    assert!(matches!(
        "matmul".parse::<WorkloadKind>(),
        Err(WorkloadError::UnknownWorkload { .. })
    ));
    assert!(matches!(
        "uvm".parse::<Preset>(),
        Err(WorkloadError::UnknownPreset { .. })
    ));
    assert!(matches!(
        "gpu".parse::<Mode>(),
        Err(WorkloadError::UnknownMode { .. })
    ));
    for kind in WorkloadKind::ALL {
        assert!(
            matches!(kind.build(100), Err(WorkloadError::TooSmall { .. })),
            "{kind}"
        );
        assert!(matches!(
            kind.build(1 << 40),
            Err(WorkloadError::TooLarge { .. })
        ));
    }
    let mut c = cfg(WorkloadKind::Stream, 1 << 20);
    c.device_memory = 1 << 20;
    assert!(matches!(
        run(&c, None),
        Err(WorkloadError::DeviceTooSmall { .. })
    ));
}
