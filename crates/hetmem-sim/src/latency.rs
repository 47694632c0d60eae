//! Fault-service latency histograms: how long a device fault waited, from the moment its warp
//! raised it to the end of the batch that serviced it, in wall-clock time and in modelled time.
//! The accelerator's fault service records every fault-buffer entry of a batch once the batch is
//! done ([`crate::accel::Accelerator::fault_latency`]); reports read percentiles from a snapshot.
//!
//! UVM's tools interface reports the same thing per fault (`UvmEventFaultReplay` timestamps
//! minus the fault's own, uvm-svm.md A.13); papers quote it as the "far-fault latency"
//! (perf-anchors.md §1.1: 20–50 µs).
//!
//! Buckets are log-linear (HdrHistogram's layout with 3 bits of mantissa): values below 16 ns
//! get a bucket each, every power of two above is split into 8 equal buckets, so a percentile
//! is exact to within 12.5 %. Recording is one relaxed atomic add: the service thread records a
//! batch at a time, never per page on a hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Mantissa bits of a bucket.
const SUB_BITS: u32 = 3;
/// Buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Values below this each get their own bucket.
const LINEAR: u64 = 2 * SUB;
/// Buckets in all: the linear ones, then `SUB` for each power of two from `LINEAR` to 2^63.
const BUCKETS: usize = (LINEAR + (64 - (SUB_BITS + 1) as u64) * SUB) as usize;

/// The bucket of `v` nanoseconds.
fn bucket(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let sub = (v >> (msb - SUB_BITS)) & (SUB - 1);
    (LINEAR + u64::from(msb - SUB_BITS - 1) * SUB + sub) as usize
}

/// The smallest value of bucket `i` (a percentile is reported as its bucket's lower bound).
fn bucket_floor(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let k = i - LINEAR;
    let msb = k / SUB + u64::from(SUB_BITS) + 1;
    let sub = k % SUB;
    (1u64 << msb) | (sub << (msb - u64::from(SUB_BITS)))
}

/// A histogram that threads record into through `&self`.
#[derive(Debug)]
pub struct LatencyRecorder {
    counts: Box<[AtomicU64]>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LatencyRecorder {
    /// Records one value in nanoseconds.
    pub fn record(&self, ns: u64) {
        self.counts[bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records `n` values of `ns` nanoseconds each.
    pub fn record_n(&self, ns: u64, n: u64) {
        if n > 0 {
            self.counts[bucket(ns)].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// What was recorded so far.
    pub fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// A snapshot of a [`LatencyRecorder`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
}

impl LatencyHistogram {
    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (`0.0..=1.0`): the lower bound of the bucket holding it; `None` when
    /// nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        // The rank of the value wanted, 1-based: at least the first, at most the last.
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_nanos(bucket_floor(i)));
            }
        }
        None
    }

    /// What was recorded since `earlier` (a snapshot of the same recorder).
    pub fn since(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        LatencyHistogram {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, &c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }
}

/// Fault-service latency of a device, both clocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultLatency {
    /// Wall-clock time from the fault's entry in the ring to the end of its batch.
    pub wall: LatencyHistogram,
    /// Modelled time of the service of the fault's batch (fault service, migrations, TLB
    /// invalidations and the replay charged while it was serviced).
    pub modelled: LatencyHistogram,
}

impl FaultLatency {
    /// What was recorded since `earlier`.
    pub fn since(&self, earlier: &FaultLatency) -> FaultLatency {
        FaultLatency {
            wall: self.wall.since(&earlier.wall),
            modelled: self.modelled.since(&earlier.modelled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_their_floors_fall_inside_them() {
        let mut last = 0;
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 12345, u64::MAX / 3, u64::MAX]) {
            let b = bucket(v);
            assert!(b < BUCKETS, "{v} -> {b}");
            assert!(bucket_floor(b) <= v, "{v}: floor {}", bucket_floor(b));
            assert_eq!(bucket(bucket_floor(b)), b, "{v}");
            if v < 5000 {
                assert!(b >= last);
                last = b;
            }
        }
    }

    #[test]
    fn quantiles_are_within_an_eighth_of_the_values_recorded() {
        let r = LatencyRecorder::default();
        for us in 1..=100u64 {
            r.record(us * 1000);
        }
        let h = r.snapshot();
        assert_eq!(h.count(), 100);
        let p50 = h.quantile(0.5).unwrap().as_nanos() as f64;
        let p99 = h.quantile(0.99).unwrap().as_nanos() as f64;
        assert!((50_000.0 * 0.875..=50_000.0).contains(&p50), "{p50}");
        assert!((99_000.0 * 0.875..=99_000.0).contains(&p99), "{p99}");
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn since_subtracts_an_earlier_snapshot() {
        let r = LatencyRecorder::default();
        r.record_n(10, 3);
        let a = r.snapshot();
        r.record_n(1_000_000, 2);
        let d = r.snapshot().since(&a);
        assert_eq!(d.count(), 2);
        assert!(d.quantile(0.0).unwrap() >= Duration::from_micros(875));
    }
}
