//! The ranges of a running context with their attributes and residency: what AMD's debugfs
//! `svm_ranges` file shows for a process (uvm-svm.md C.7/C.9), for the allocations of a
//! workload, read at the end of a run or after a chosen launch (`hetmem inspect --at N`).

use std::fmt::Write as _;

use hetmem_core::{PageRange, PAGE_SIZE};
use hetmem_runtime::{Attr, Context, Processor, RuntimeError};
use serde::Serialize;

/// One allocation's attributes and residency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RangeInfo {
    /// The workload's name for it.
    pub name: String,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Pages.
    pub pages: u64,
    /// Preferred location (`-` unset, `mixed`).
    pub preferred: String,
    /// Processors advised to keep a mapping.
    pub accessed_by: Vec<String>,
    /// Read-mostly over the whole range.
    pub read_mostly: bool,
    /// Migration granularity, bytes, when advised.
    pub granularity: String,
    /// Where the last prefetch sent it.
    pub last_prefetch: String,
    /// Pages on each processor.
    pub resident: Vec<(String, u64)>,
    /// Maximal runs of pages on one processor: (start, end, where).
    pub runs: Vec<(u64, u64, String)>,
}

fn proc_name(p: Processor) -> String {
    match p {
        Processor::Cpu => "cpu".into(),
        Processor::Device(d) => format!("gpu{}", d.0),
    }
}

fn attr<T>(a: Attr<T>, f: impl Fn(T) -> String) -> String {
    match a {
        Attr::Unset => "-".into(),
        Attr::Same(v) => f(v),
        Attr::Mixed => "mixed".into(),
    }
}

/// The ranges of `allocs` in `ctx`.
pub fn ranges(
    ctx: &Context,
    allocs: &[(String, PageRange)],
) -> Result<Vec<RangeInfo>, RuntimeError> {
    let mut out = Vec::with_capacity(allocs.len());
    for (name, r) in allocs {
        let a = ctx.attributes(*r)?;
        let mut resident: Vec<(String, u64)> = Vec::new();
        for (run, p) in &a.residency {
            let n = proc_name(*p);
            match resident.iter_mut().find(|(k, _)| *k == n) {
                Some((_, c)) => *c += run.npages(),
                None => resident.push((n, run.npages())),
            }
        }
        out.push(RangeInfo {
            name: name.clone(),
            start: r.start().0,
            end: r.end().0,
            pages: r.npages(),
            preferred: attr(a.preferred_location, proc_name),
            accessed_by: a.accessed_by.iter().map(|&p| proc_name(p)).collect(),
            read_mostly: a.read_mostly,
            granularity: attr(a.granularity, |g| format!("{}K", g / 1024)),
            last_prefetch: attr(a.last_prefetch_location, proc_name),
            resident,
            runs: a
                .residency
                .iter()
                .map(|(r, p)| (r.start().0, r.end().0, proc_name(*p)))
                .collect(),
        });
    }
    Ok(out)
}

/// The ranges as text: one line per range, then its residency runs (at most `max_runs` of them).
pub fn render(ranges: &[RangeInfo], max_runs: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:>14}-{:<14} {:>8} {:>6} {:>11} {:>4} {:>6} {:>8}  resident",
        "name", "start", "end", "pages", "pref", "accessed-by", "rdmo", "gran", "prefetch"
    );
    for r in ranges {
        let acc = if r.accessed_by.is_empty() {
            "-".into()
        } else {
            r.accessed_by.join(",")
        };
        let res: Vec<String> = r
            .resident
            .iter()
            .map(|(p, n)| format!("{p} {n} ({:.1} MiB)", (n * PAGE_SIZE) as f64 / 1048576.0))
            .collect();
        let _ = writeln!(
            s,
            "{:<12} {:#014x}-{:<#014x} {:>8} {:>6} {:>11} {:>4} {:>6} {:>8}  {}",
            r.name,
            r.start,
            r.end,
            r.pages,
            r.preferred,
            acc,
            u8::from(r.read_mostly),
            r.granularity,
            r.last_prefetch,
            res.join(", ")
        );
        for (a, b, p) in r.runs.iter().take(max_runs) {
            let _ = writeln!(s, "    [{a:#x}-{b:#x}) {p} {} pages", (b - a) / PAGE_SIZE);
        }
        if r.runs.len() > max_runs {
            let _ = writeln!(s, "    ... {} more runs", r.runs.len() - max_runs);
        }
    }
    s
}
