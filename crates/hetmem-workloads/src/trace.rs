//! Chrome trace events from a run, for Perfetto (ui.perfetto.dev) or `chrome://tracing`.
//!
//! A [`Collector`] hands out a `tracing-subscriber` layer that keeps what the runtime and the
//! simulator already say through `tracing` (libraries never print, STYLE.md 10): the fault
//! service's `fault batch` events and every `migration` event (with its trigger), the runtime's
//! evictions and thrashing decisions, and the workload driver's `kernel` and `copy` spans.
//! [`write_chrome`] writes them in the Trace Event Format (JSON object form): spans as complete
//! events (`ph: "X"`, with `dur`), events as thread-scoped instants (`ph: "i"`), the sampler's
//! residency and cumulative migrations as counters (`ph: "C"`), and thread names as metadata
//! (`ph: "M"`). Timestamps are microseconds since the collector was made.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{Filtered, Targets};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::run::Sample;
use crate::WorkloadError;

/// One recorded event or span.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceEvent {
    /// The event's message or the span's name.
    pub name: String,
    /// Where it came from (the `tracing` target).
    pub cat: String,
    /// `X` (span) or `i` (instant).
    pub ph: char,
    /// Start, microseconds since the collector was made.
    pub ts: f64,
    /// Duration of a span, microseconds.
    pub dur: Option<f64>,
    /// Thread (dense numbers, named in the metadata).
    pub tid: u64,
    /// The fields.
    pub args: BTreeMap<String, Value>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    events: Mutex<Vec<TraceEvent>>,
    threads: Mutex<HashMap<String, u64>>,
}

/// Collects trace events; clones share the same buffer.
#[derive(Clone, Debug)]
pub struct Collector {
    inner: Arc<Inner>,
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

/// The layer a [`Collector`] hands out.
#[derive(Clone, Debug)]
pub struct CollectorLayer {
    inner: Arc<Inner>,
}

/// The targets collected (at debug level and above): the simulator, the runtime, the workload
/// driver. The link model's per-charge trace events are left out (one per remote access).
pub fn targets() -> Targets {
    Targets::new()
        .with_target("hetmem_sim", Level::DEBUG)
        .with_target("hetmem_runtime", Level::DEBUG)
        .with_target("hetmem_workloads", Level::DEBUG)
}

impl Collector {
    /// An empty collector; its clock starts now.
    pub fn new() -> Self {
        Collector {
            inner: Arc::new(Inner {
                start: Instant::now(),
                events: Mutex::new(Vec::new()),
                threads: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The layer to add to a subscriber, filtered to [`targets`].
    pub fn layer<S>(&self) -> Filtered<CollectorLayer, Targets, S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        CollectorLayer {
            inner: Arc::clone(&self.inner),
        }
        .with_filter(targets())
    }

    /// When the collector's clock started.
    pub fn start(&self) -> Instant {
        self.inner.start
    }

    /// Takes what was collected so far.
    pub fn take(&self) -> Vec<TraceEvent> {
        std::mem::take(&mut *self.inner.events.lock())
    }

    /// Thread names by number.
    pub fn threads(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = self
            .inner
            .threads
            .lock()
            .iter()
            .map(|(n, &t)| (t, n.clone()))
            .collect();
        v.sort();
        v
    }
}

impl Inner {
    fn now_us(&self) -> f64 {
        self.start.elapsed().as_nanos() as f64 / 1e3
    }

    fn tid(&self) -> u64 {
        let t = std::thread::current();
        let name = t
            .name()
            .map_or_else(|| format!("{:?}", t.id()), str::to_owned);
        let mut m = self.threads.lock();
        let n = m.len() as u64 + 1;
        *m.entry(name).or_insert(n)
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, Value>);

impl Visit for Fields {
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), json!(format!("{v:?}")));
    }
}

/// A span's start and fields, kept in its extensions until it closes.
struct Open {
    ts: f64,
    tid: u64,
    args: BTreeMap<String, Value>,
}

impl<S> Layer<S> for CollectorLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Open {
                ts: self.inner.now_us(),
                tid: self.inner.tid(),
                args: f.0,
            });
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        let meta = span.metadata();
        let mut name = meta.name().to_owned();
        if let Some(Value::String(k)) = open.args.get("name") {
            name = format!("{name} {k}");
        }
        self.inner.events.lock().push(TraceEvent {
            name,
            cat: meta.target().into(),
            ph: 'X',
            ts: open.ts,
            dur: Some(self.inner.now_us() - open.ts),
            tid: open.tid,
            args: open.args,
        });
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let name = match f.0.remove("message") {
            Some(Value::String(s)) => s,
            Some(v) => v.to_string(),
            None => event.metadata().name().to_owned(),
        };
        let ev = TraceEvent {
            name,
            cat: event.metadata().target().into(),
            ph: 'i',
            ts: self.inner.now_us(),
            dur: None,
            tid: self.inner.tid(),
            args: f.0,
        };
        self.inner.events.lock().push(ev);
    }
}

/// The trace as a Chrome trace JSON value: `events` and `threads` from a [`Collector`],
/// `samples` from the run (whose clock started `offset_us` after the collector's).
pub fn chrome_json(
    events: &[TraceEvent],
    threads: &[(u64, String)],
    samples: &[Sample],
    offset_us: f64,
) -> Value {
    const PID: u64 = 1;
    let mut out: Vec<Value> = Vec::with_capacity(events.len() + 2 * samples.len() + 8);
    out.push(
        json!({"name": "process_name", "ph": "M", "pid": PID, "tid": 0,
        "args": {"name": "hetmem"}}),
    );
    for (tid, name) in threads {
        out.push(
            json!({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid,
            "args": {"name": name}}),
        );
    }
    for e in events {
        let mut v = json!({"name": e.name, "cat": e.cat, "ph": e.ph.to_string(), "ts": e.ts,
            "pid": PID, "tid": e.tid, "args": e.args});
        match e.dur {
            Some(d) => v["dur"] = json!(d),
            None => v["s"] = json!("t"),
        }
        out.push(v);
    }
    let mib = |pages: u64| pages as f64 * 4096.0 / 1048576.0;
    for s in samples {
        let ts = offset_us + s.t_us as f64;
        out.push(
            json!({"name": "device memory (MiB)", "ph": "C", "ts": ts, "pid": PID,
            "tid": 0, "args": {"resident": mib(s.resident_pages)}}),
        );
        out.push(
            json!({"name": "migrated (MiB, cumulative)", "ph": "C", "ts": ts,
            "pid": PID, "tid": 0,
            "args": {"to device": mib(s.pages_in), "to host": mib(s.pages_out)}}),
        );
        out.push(
            json!({"name": "device faults (cumulative)", "ph": "C", "ts": ts,
            "pid": PID, "tid": 0, "args": {"faults": s.faults}}),
        );
    }
    json!({"traceEvents": out, "displayTimeUnit": "ms"})
}

/// Writes [`chrome_json`] of `collector`'s events to `path`; `run_start` is when the samples'
/// clock started.
pub fn write_chrome(
    path: &Path,
    collector: &Collector,
    samples: &[Sample],
    run_start: Instant,
) -> Result<usize, WorkloadError> {
    let events = collector.take();
    let offset = run_start
        .checked_duration_since(collector.start())
        .unwrap_or_default()
        .as_nanos() as f64
        / 1e3;
    let v = chrome_json(&events, &collector.threads(), samples, offset);
    let io = |source| WorkloadError::Io {
        what: path.display().to_string(),
        source,
    };
    let text = serde_json::to_string(&v).map_err(|e| io(std::io::Error::other(e)))?;
    std::fs::write(path, text).map_err(io)?;
    Ok(events.len())
}
