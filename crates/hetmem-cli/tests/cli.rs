//! The `hetmem` binary as a user meets it: a run's JSON report, and bad input refused with a
//! message that says what was wrong and a failing exit status.

use std::process::{Command, Output};

fn hetmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hetmem"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("the hetmem binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `command workload` on 1 MiB of data and a 4 MiB device (a run of a few milliseconds),
/// then `rest`.
fn small<'a>(command: &'a str, workload: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        command,
        workload,
        "--size",
        "1MiB",
        "--device-memory",
        "4MiB",
    ];
    args.extend_from_slice(rest);
    args
}

/// Runs `args`, expects it to fail, and returns what it printed on stderr.
fn refused(args: &[&str]) -> String {
    let o = hetmem(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    stderr(&o)
}

#[test]
fn a_run_reports_json_with_its_configuration_and_counts() {
    let o = hetmem(&small("run", "random", &["--preset", "hetmem", "--json"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the report is JSON");
    assert_eq!(v["workload"], "random");
    assert_eq!(v["preset"], "hetmem");
    assert_eq!(v["footprint"], 1 << 20);
    assert_eq!(v["device_memory"], 4 << 20);
    assert_eq!(v["launches"], 1);
    // The preset's configuration is in the report: the whole-block windows of `hetmem`.
    assert_eq!(v["preset_config"]["granularity"], 2 << 20);
    // Against the explicit-copy run on the same model: demand paging costs something.
    let slowdown = v["slowdown"].as_f64().expect("a slowdown");
    assert!(slowdown >= 1.0, "slowdown {slowdown}");
    assert!(v["modelled_ns"].as_u64().expect("modelled time") > 0);
}

#[test]
fn unknown_names_are_refused_with_the_known_ones() {
    let e = refused(&["run", "foo"]);
    assert!(
        e.contains("unknown workload \"foo\"") && e.contains("kvcache"),
        "{e}"
    );
    let e = refused(&["run", "stream", "--preset", "bogus"]);
    assert!(
        e.contains("unknown preset \"bogus\"") && e.contains("uvm-default"),
        "{e}"
    );
    let e = refused(&["run", "stream", "--replay", "eager"]);
    assert!(
        e.contains("--replay") && e.contains("\"eager\"") && e.contains("batch-flush"),
        "{e}"
    );
}

#[test]
fn a_tuning_flag_changes_the_preset_and_the_report_says_so() {
    let o = hetmem(&small(
        "run",
        "random",
        &[
            "--preset",
            "hetmem",
            "--replay",
            "block",
            "--json",
            "--no-baseline",
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the report is JSON");
    assert_eq!(v["preset_config"]["replay"], "block");
    let o = hetmem(&small(
        "run",
        "random",
        &["--preset", "hetmem", "--json", "--no-baseline"],
    ));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the report is JSON");
    assert_eq!(v["preset_config"]["replay"], "batch-flush");
}

#[test]
fn sizes_out_of_range_are_refused() {
    let e = refused(&["run", "conv2d", "--size", "0x"]);
    assert!(e.contains("bad size \"0x\""), "{e}");
    let e = refused(&["run", "stream", "--device-memory", "0"]);
    assert!(e.contains("must be positive"), "{e}");
    // Too small for the workload's shape: the least it needs is named.
    let e = refused(&[
        "run",
        "kvcache",
        "--size",
        "0.1x",
        "--device-memory",
        "4MiB",
    ]);
    assert!(e.contains("too small") && e.contains("at least"), "{e}");
}

#[test]
fn inspecting_after_a_launch_the_run_never_made_is_refused() {
    let e = refused(&small("inspect", "random", &["--at", "5"]));
    assert!(
        e.contains("made 1 launches") && e.contains("no launch 5"),
        "{e}"
    );
    // Launches count from 1.
    let e = refused(&["inspect", "random", "--at", "0"]);
    assert!(e.contains("--at"), "{e}");
    // After the one launch there is: the ranges, by name.
    let o = hetmem(&small("inspect", "random", &["--at", "1"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("after launch 1"), "{out}");
}
