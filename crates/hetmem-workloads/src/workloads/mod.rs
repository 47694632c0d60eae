//! The workloads, one module each, after the access-pattern classes of perf-anchors.md §5.
//! Every kernel computes in wrapping `u32` arithmetic, so the device's result equals the CPU's
//! bit for bit whatever order lanes run in.

mod atax;
mod bfs;
mod conv2d;
mod gemm;
mod kvcache;
mod random;
mod stream;

pub use atax::Atax;
pub use bfs::Bfs;
pub use conv2d::Conv2d;
pub use gemm::Gemm;
pub use kvcache::KvCache;
pub use random::RandomAccess;
pub use stream::Stream;

use hetmem_runtime::Managed;

use crate::workload::{Workload, WorkloadKind};
use crate::WorkloadError;

/// Managed memory an allocation of `bytes` takes: whole pages. Footprints count these, so that
/// a workload sized at device memory fits it (three partial pages put `bfs` at 1x over).
fn whole_pages(bytes: u64) -> u64 {
    bytes.next_multiple_of(hetmem_core::PAGE_SIZE)
}

/// The largest size from `n` down, in steps of `step` (which `n` is a multiple of), whose
/// `footprint` fits `bytes`; zero if none does. The estimate a workload starts from ignores
/// partial pages, so at most a few steps come off.
fn fit(mut n: u64, step: u64, bytes: u64, footprint: impl Fn(u64) -> u64) -> u64 {
    while n > 0 && footprint(n) > bytes {
        n -= step;
    }
    n
}

/// The largest footprint a workload takes (the simulator runs kernels on host threads).
pub const MAX_BYTES: u64 = 4 << 30;

/// The workload `kind` of about `bytes` of managed memory.
pub fn build(kind: WorkloadKind, bytes: u64) -> Result<Box<dyn Workload>, WorkloadError> {
    if bytes > MAX_BYTES {
        return Err(WorkloadError::TooLarge {
            workload: kind,
            bytes,
            max: MAX_BYTES,
        });
    }
    Ok(match kind {
        WorkloadKind::Stream => Box::new(Stream::new(bytes)?),
        WorkloadKind::Conv2d => Box::new(Conv2d::new(bytes)?),
        WorkloadKind::Gemm => Box::new(Gemm::new(bytes)?),
        WorkloadKind::Atax => Box::new(Atax::new(bytes)?),
        WorkloadKind::Random => Box::new(RandomAccess::new(bytes)?),
        WorkloadKind::Bfs => Box::new(Bfs::new(bytes)?),
        WorkloadKind::Kvcache => Box::new(KvCache::new(bytes)?),
    })
}

/// Fills `m` with `f(i)` from the CPU.
fn fill(m: &mut Managed, f: impl Fn(u64) -> u32) {
    let mut v = m.view_mut::<u32>();
    for (i, e) in v.iter_mut().enumerate() {
        *e = f(i as u64);
    }
}

/// The first `n` words of `m`, read by the CPU.
fn read(m: &Managed, n: usize) -> Vec<u32> {
    m.view::<u32>()[..n].to_vec()
}

fn too_small(kind: WorkloadKind, bytes: u64, min: u64) -> WorkloadError {
    WorkloadError::TooSmall {
        workload: kind,
        bytes,
        min,
    }
}
