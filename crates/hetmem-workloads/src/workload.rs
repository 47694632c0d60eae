//! The workload interface, the workload names, sizes (bytes or a fraction of device memory), and
//! the helpers kernels share (page-split loads and stores, a deterministic hash for data).

use std::fmt;
use std::str::FromStr;

use hetmem_core::PAGE_SIZE;
use hetmem_sim::accel::{Miss, Thread};
use serde::Serialize;

use crate::exec::Exec;
use crate::workloads;
use crate::WorkloadError;

/// A workload: a kernel (or a sequence of them) on the device over data the CPU prepares, and
/// the same computation in plain Rust.
pub trait Workload: Send + Sync + fmt::Debug {
    /// Which one.
    fn kind(&self) -> WorkloadKind;
    /// Managed memory it allocates, in bytes.
    fn footprint(&self) -> u64;
    /// Launches it makes (for progress bars).
    fn launches(&self) -> u64;
    /// Its shape, in words (`n=…`, `rows=…`).
    fn shape(&self) -> String;
    /// Prepares the data on the CPU, runs the kernels through `ex`, and returns the result as the
    /// CPU reads it back.
    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError>;
    /// The same result computed on the CPU alone.
    fn cpu(&self) -> Vec<u32>;
}

/// The workloads (perf-anchors.md §5's pattern classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Streaming triad `c = a + 3b` (BabelStream, UVMSmart's stream triad): each page once.
    Stream,
    /// 3×3 convolution stencil over an image (PolyBench 2DCONV): neighbour rows reused.
    Conv2d,
    /// Tiled GEMM `C = A·B` (cuBLAS sgemm, PolyBench GEMM): heavy reuse of both inputs.
    Gemm,
    /// ATAX `y = Aᵀ(A·x)`: a row walk, then a column walk touching every page at once.
    Atax,
    /// Random unique-page access: each page once, in a random order.
    Random,
    /// Level-synchronous BFS over a generated graph (Rodinia BFS): irregular, many launches.
    Bfs,
    /// A paged key-value cache (vLLM-style): sequences grow block by block, every step reads all
    /// of each sequence's blocks.
    Kvcache,
}

impl WorkloadKind {
    /// Every workload.
    pub const ALL: [WorkloadKind; 7] = [
        WorkloadKind::Stream,
        WorkloadKind::Conv2d,
        WorkloadKind::Gemm,
        WorkloadKind::Atax,
        WorkloadKind::Random,
        WorkloadKind::Bfs,
        WorkloadKind::Kvcache,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Stream => "stream",
            WorkloadKind::Conv2d => "conv2d",
            WorkloadKind::Gemm => "gemm",
            WorkloadKind::Atax => "atax",
            WorkloadKind::Random => "random",
            WorkloadKind::Bfs => "bfs",
            WorkloadKind::Kvcache => "kvcache",
        }
    }

    /// The workload of about `bytes` of managed memory.
    pub fn build(self, bytes: u64) -> Result<Box<dyn Workload>, WorkloadError> {
        workloads::build(self, bytes)
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WorkloadKind {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, WorkloadError> {
        WorkloadKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| WorkloadError::UnknownWorkload {
                name: s.into(),
                known: WorkloadKind::ALL.map(|k| k.name()).join(", "),
            })
    }
}

/// A size: bytes, or a fraction of device memory (the oversubscription factor).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// This many times device memory.
    Factor(f64),
}

impl Size {
    /// Bytes, given the device memory.
    pub fn bytes(self, device_memory: u64) -> u64 {
        match self {
            Size::Bytes(b) => b,
            Size::Factor(f) => (device_memory as f64 * f) as u64,
        }
    }
}

impl FromStr for Size {
    type Err = WorkloadError;
    /// `2x` or `0.5x` (times device memory), or bytes with an optional `K`, `M`, `G` suffix
    /// (`KiB`, `MiB`, `GiB`, `k`, `m`, `g`: all binary).
    fn from_str(s: &str) -> Result<Self, WorkloadError> {
        let bad = |why| WorkloadError::BadSize {
            text: s.into(),
            why,
        };
        let t = s.trim();
        if let Some(f) = t.strip_suffix(['x', 'X']) {
            let f: f64 = f.parse().map_err(|_| bad("not a number before x"))?;
            if !(f.is_finite() && f > 0.0 && f <= 64.0) {
                return Err(bad("factor must be in (0, 64]"));
            }
            return Ok(Size::Factor(f));
        }
        let lower = t.to_ascii_lowercase();
        let (num, mult) = [
            ("gib", 30),
            ("mib", 20),
            ("kib", 10),
            ("g", 30),
            ("m", 20),
            ("k", 10),
        ]
        .iter()
        .find_map(|&(suf, sh)| lower.strip_suffix(suf).map(|n| (n.to_owned(), 1u64 << sh)))
        .unwrap_or((lower.clone(), 1));
        let n: f64 = num.trim().parse().map_err(|_| bad("not a number"))?;
        if !(n.is_finite() && n > 0.0) {
            return Err(bad("must be positive"));
        }
        let b = n * mult as f64;
        if b > (1u64 << 40) as f64 {
            return Err(bad("larger than 1 TiB"));
        }
        Ok(Size::Bytes(b as u64))
    }
}

/// A workload and its size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadSpec {
    /// Which workload.
    pub kind: WorkloadKind,
    /// About how many bytes of managed memory.
    pub bytes: u64,
}

/// A deterministic 32-bit hash (splitmix64's finaliser), for data the CPU and the device both
/// compute.
pub fn hash(x: u64) -> u32 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// Words per piece a lane reads or writes at once (512 bytes, never across a page).
const PIECE: usize = 128;

/// Loads `out.len()` u32 from `va` (4-byte aligned), split at page boundaries.
pub fn load(t: &mut Thread<'_>, va: u64, out: &mut [u32]) -> Result<(), Miss> {
    // A vector load's pieces are independent: across pages, they fault together.
    let end = va + 4 * out.len() as u64;
    if !out.is_empty() && va / PAGE_SIZE != (end - 1) / PAGE_SIZE {
        t.issue_loads(&[(va, 4 * out.len())])?;
    }
    let mut buf = [0u8; PIECE * 4];
    let mut done = 0;
    while done < out.len() {
        let a = va + 4 * done as u64;
        let room = ((PAGE_SIZE - a % PAGE_SIZE) / 4) as usize;
        let n = room.min(out.len() - done).min(PIECE);
        t.read(a, &mut buf[..4 * n])?;
        for (k, w) in buf[..4 * n].chunks_exact(4).enumerate() {
            out[done + k] = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
        }
        done += n;
    }
    Ok(())
}

/// Stores `vals` at `va` (4-byte aligned), split at page boundaries.
pub fn store(t: &mut Thread<'_>, va: u64, vals: &[u32]) -> Result<(), Miss> {
    let mut buf = [0u8; PIECE * 4];
    let mut done = 0;
    while done < vals.len() {
        let a = va + 4 * done as u64;
        let room = ((PAGE_SIZE - a % PAGE_SIZE) / 4) as usize;
        let n = room.min(vals.len() - done).min(PIECE);
        for (k, v) in vals[done..done + n].iter().enumerate() {
            buf[4 * k..4 * k + 4].copy_from_slice(&v.to_ne_bytes());
        }
        t.write(a, &buf[..4 * n])?;
        done += n;
    }
    Ok(())
}

/// Checks `device` against `cpu`, naming the first word that differs.
pub fn check(kind: WorkloadKind, device: &[u32], cpu: &[u32]) -> Result<(), WorkloadError> {
    if device.len() != cpu.len() {
        return Err(WorkloadError::LengthMismatch {
            workload: kind,
            device: device.len(),
            cpu: cpu.len(),
        });
    }
    match device.iter().zip(cpu).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(index) => Err(WorkloadError::Mismatch {
            workload: kind,
            index,
            device: device[index],
            cpu: cpu[index],
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_bytes_or_factors_and_bad_ones_are_typed_errors() {
        assert_eq!("64MiB".parse::<Size>().unwrap(), Size::Bytes(64 << 20));
        assert_eq!("4k".parse::<Size>().unwrap(), Size::Bytes(4096));
        assert_eq!("1.5G".parse::<Size>().unwrap(), Size::Bytes(3 << 29));
        assert_eq!("123".parse::<Size>().unwrap(), Size::Bytes(123));
        assert_eq!("2x".parse::<Size>().unwrap(), Size::Factor(2.0));
        assert_eq!(Size::Factor(0.5).bytes(64 << 20), 32 << 20);
        for bad in ["", "x", "-1M", "0x", "abc", "2TiB0", "1e30"] {
            assert!(
                matches!(bad.parse::<Size>(), Err(WorkloadError::BadSize { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_typed_errors() {
        for k in WorkloadKind::ALL {
            assert_eq!(k.name().parse::<WorkloadKind>().unwrap(), k);
        }
        let e = "nope".parse::<WorkloadKind>().unwrap_err();
        assert!(matches!(e, WorkloadError::UnknownWorkload { .. }), "{e}");
        assert!(e.to_string().contains("kvcache"));
    }

    #[test]
    fn a_workload_fits_the_bytes_it_is_given_and_uses_most_of_them() {
        // `1x` must not oversubscribe: a footprint past the size asked turned a run at device
        // memory into one over it (atax and kvcache were 3 % and 0.2 % over).
        for bytes in [4 << 20, 16 << 20, 33_000_001, 32 << 20] {
            for k in WorkloadKind::ALL {
                let w = k.build(bytes).unwrap();
                let f = w.footprint();
                assert!(f <= bytes, "{k} at {bytes}: footprint {f}");
                // Sizes come in steps (kvcache's: 256 blocks, about 1 MiB).
                assert!(
                    f * 100 >= bytes * 90 || bytes - f < 1_100_000,
                    "{k} at {bytes}: footprint {f}"
                );
            }
        }
    }

    #[test]
    fn check_names_the_first_difference() {
        let k = WorkloadKind::Stream;
        assert!(check(k, &[1, 2, 3], &[1, 2, 3]).is_ok());
        assert!(matches!(
            check(k, &[1, 5, 3], &[1, 2, 3]),
            Err(WorkloadError::Mismatch { index: 1, .. })
        ));
        assert!(matches!(
            check(k, &[1], &[1, 2]),
            Err(WorkloadError::LengthMismatch { .. })
        ));
    }
}
