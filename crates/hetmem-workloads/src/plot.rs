//! An SVG of a run over wall-clock time, written by hand (no dependency): device memory in use
//! (filled), pages migrated to the device and back (cumulative), device faults (cumulative, on
//! the right axis), and the device's capacity as a dashed line. The sampler's points are plotted
//! as they are; nothing is smoothed.

use std::fmt::Write as _;

use crate::report::RunReport;
use crate::run::Sample;

const W: f64 = 900.0;
const H: f64 = 440.0;
const L: f64 = 70.0;
const R: f64 = 80.0;
const T: f64 = 78.0;
const B: f64 = 60.0;

fn mib(pages: u64) -> f64 {
    pages as f64 * 4096.0 / 1048576.0
}

/// A round step for about `n` ticks over `0..max`.
fn tick_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The plot of `samples` from the run `r`.
pub fn svg(r: &RunReport, samples: &[Sample]) -> String {
    let t_max = samples.iter().map(|s| s.t_us).max().unwrap_or(0).max(1) as f64 / 1e3;
    let cap = r.device_memory as f64 / 1048576.0;
    let y_max = samples
        .iter()
        .map(|s| {
            mib(s.resident_pages)
                .max(mib(s.pages_in))
                .max(mib(s.pages_out))
        })
        .fold(cap, f64::max)
        * 1.08;
    let f_max = samples.iter().map(|s| s.faults).max().unwrap_or(0).max(1) as f64 * 1.08;
    let (pw, ph) = (W - L - R, H - T - B);
    let x = |ms: f64| L + ms / t_max * pw;
    let y = |v: f64| T + ph - v / y_max * ph;
    let yf = |v: f64| T + ph - v / f_max * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let title = format!(
        "{} ({}), {:.1} MiB on {:.0} MiB device ({:.2}x), {} {}, {}",
        r.workload,
        r.shape,
        r.footprint as f64 / 1048576.0,
        r.device_memory_asked as f64 / 1048576.0,
        r.oversubscription,
        r.mode,
        if r.mode == crate::Mode::Managed {
            r.preset.name()
        } else {
            ""
        },
        r.link
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        W / 2.0,
        esc(&title)
    );
    // Axes and grid.
    let step = tick_step(y_max, 5.0);
    let mut v = 0.0;
    while v <= y_max {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            L + pw,
            L - 6.0,
            yy + 4.0
        );
        v += step;
    }
    let fstep = tick_step(f_max, 5.0);
    let mut v = 0.0;
    while v <= f_max {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{:.1}" fill="#8a5a00">{v}</text>"##,
            L + pw + 6.0,
            yf(v) + 4.0
        );
        v += fstep;
    }
    let tstep = tick_step(t_max, 8.0);
    let mut v = 0.0;
    while v <= t_max {
        let xx = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{}" x2="{xx:.1}" y2="{}" stroke="#999"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"##,
            T + ph,
            T + ph + 5.0,
            T + ph + 18.0,
            (v * 1000.0).round() / 1000.0
        );
        v += tstep;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">wall-clock time (ms)</text>"#,
        L + pw / 2.0,
        H - 22.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">MiB</text>"#,
        T + ph / 2.0,
        T + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#8a5a00" transform="rotate(90 {} {})">device faults</text>"##,
        W - 14.0,
        T + ph / 2.0,
        W - 14.0,
        T + ph / 2.0
    );
    // Capacity.
    let _ = writeln!(
        s,
        r##"<line x1="{L}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#000" stroke-dasharray="6 4"/>"##,
        y(cap),
        L + pw,
        y(cap)
    );
    // Resident, filled.
    if !samples.is_empty() {
        let mut d = format!("M{:.1},{:.1}", x(0.0), y(0.0));
        for p in samples {
            let _ = write!(
                d,
                " L{:.1},{:.1}",
                x(p.t_us as f64 / 1e3),
                y(mib(p.resident_pages))
            );
        }
        let last = samples.last().map_or(0.0, |p| p.t_us as f64 / 1e3);
        let _ = write!(d, " L{:.1},{:.1} Z", x(last), y(0.0));
        let _ = writeln!(
            s,
            r##"<path d="{d}" fill="#4a90d9" fill-opacity="0.35" stroke="#1f5fa8" stroke-width="1.5"/>"##
        );
    }
    let line = |s: &mut String, f: &dyn Fn(&Sample) -> f64, color: &str, dash: &str| {
        let pts: Vec<String> = samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.t_us as f64 / 1e3), f(p)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            pts.join(" ")
        );
    };
    line(&mut s, &|p| y(mib(p.pages_in)), "#2a9d3a", "none");
    line(&mut s, &|p| y(mib(p.pages_out)), "#d62728", "none");
    line(&mut s, &|p| yf(p.faults as f64), "#d08c00", "3 3");
    // Legend, between the title and the plot: inside it, it covered the capacity line and the
    // curves near the top.
    let items = [
        ("#4a90d9", "resident in device memory", "none"),
        ("#2a9d3a", "migrated to device (cumulative)", "none"),
        ("#d62728", "migrated to host (cumulative)", "none"),
        ("#d08c00", "device faults (cumulative, right axis)", "3 3"),
        ("#000", "device memory capacity", "6 4"),
    ];
    for (i, (c, label, dash)) in items.iter().enumerate() {
        let (lx, ly) = (
            L + 10.0 + (i % 3) as f64 * 260.0,
            T - 38.0 + (i / 3) as f64 * 16.0,
        );
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3" stroke-dasharray="{dash}"/><text x="{}" y="{}">{label}</text>"##,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0
        );
    }
    let summary = format!(
        "modelled {:.2} ms{}; {} faults in {} batches; {:.1} MiB in, {:.1} MiB out; {} evictions",
        r.modelled_ns as f64 / 1e6,
        r.slowdown
            .map_or(String::new(), |x| format!(" ({x:.2}x explicit copy)")),
        r.faults,
        r.batches,
        r.migrations.bytes_to_device() as f64 / 1048576.0,
        r.migrations.bytes_to_host() as f64 / 1048576.0,
        r.evictions
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" font-size="11" fill="#444">{}</text>"##,
        W / 2.0,
        H - 6.0,
        esc(&summary)
    );
    s.push_str("</svg>\n");
    s
}
