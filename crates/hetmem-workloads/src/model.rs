//! The device's own work in modelled time: a roofline over the bytes a kernel moves in device
//! memory and the operations it does, plus a launch overhead. The simulator runs kernels on
//! host threads and charges its clock only for the memory system (faults, migrations, remote
//! accesses); a kernel's compute time is what the explicit-copy baseline adds to its copies, so
//! it must be in both sides of every ratio (UVMBench's timings include kernel time).
//! [`crate::exec::Exec::launch`] places each launch's on the device clock's timeline
//! (`hetmem_core::link::DeviceClock::launch_computed`): after what held the launch's warps up,
//! beside the background work that did not.
//!
//! The default device is a GTX 1080 Ti, the GPU the PCIe 3 link model was measured on
//! (hetmem-core's `link.rs`, perf-anchors.md §2.1): 484 GB/s of GDDR5X, 11.3 Tops/s (its FP32
//! rate; integer multiply-add runs at a similar rate on Pascal). The launch overhead (5 µs) is
//! an assumption: real launches cost 3-10 µs; UVMSmart models 150 µs, which would swamp the
//! small kernels here.

use hetmem_core::link::ModelTime;
use serde::Serialize;

/// What one launch does on the device: bytes read and written in device memory and operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Work {
    /// Bytes moved between device memory and the compute units.
    pub bytes: u64,
    /// Arithmetic operations (a multiply-add counts as two).
    pub ops: u64,
}

impl Work {
    /// `bytes` moved, `ops` done.
    pub fn new(bytes: u64, ops: u64) -> Self {
        Work { bytes, ops }
    }
}

impl std::ops::AddAssign for Work {
    fn add_assign(&mut self, o: Work) {
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.ops = self.ops.saturating_add(o.ops);
    }
}

/// The device's throughput.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DeviceModel {
    /// Device memory bandwidth, bytes per second.
    pub memory_bandwidth: f64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Fixed cost of a launch.
    pub launch_ns: u64,
}

impl Default for DeviceModel {
    fn default() -> Self {
        DeviceModel::GTX_1080_TI
    }
}

impl DeviceModel {
    /// GTX 1080 Ti: 484 GB/s, 11.3 Tops/s, 5 µs per launch.
    pub const GTX_1080_TI: DeviceModel = DeviceModel {
        memory_bandwidth: 484e9,
        ops_per_sec: 11.3e12,
        launch_ns: 5_000,
    };

    /// Modelled time of a launch doing `w`: the launch overhead plus the slower of memory and
    /// arithmetic (a roofline).
    pub fn time(&self, w: Work) -> ModelTime {
        let mem = w.bytes as f64 / self.memory_bandwidth;
        let ops = w.ops as f64 / self.ops_per_sec;
        let ns = self.launch_ns as f64 + mem.max(ops) * 1e9;
        ModelTime::from_nanos(ns.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slower_roof_decides_and_more_work_never_costs_less() {
        let m = DeviceModel::GTX_1080_TI;
        let mem_bound = m.time(Work::new(484_000_000, 1));
        assert_eq!(mem_bound.as_nanos(), 1_000_000 + 5_000);
        let ops_bound = m.time(Work::new(1, 11_300_000_000));
        assert_eq!(ops_bound.as_nanos(), 1_000_000 + 5_000);
        assert!(m.time(Work::new(2, 2)) >= m.time(Work::new(1, 1)));
        assert_eq!(m.time(Work::default()).as_nanos(), m.launch_ns);
    }
}
