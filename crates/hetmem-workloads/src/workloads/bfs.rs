//! Level-synchronous BFS over a generated directed graph in CSR form (Rodinia BFS, Kim et al.'s
//! GraphBIG BFS): one launch per level, one lane per vertex; lanes of the frontier walk their
//! edges and label unvisited neighbours. Between levels the CPU reads a flag (Rodinia's
//! `cudaMemcpy` of `stop`): a CPU fault in managed mode, a 4 KiB copy with explicit copies.
//! Accesses are irregular: neighbours are anywhere.

use std::collections::VecDeque;
use std::sync::Arc;

use hetmem_core::PAGE_SIZE;
use hetmem_sim::accel::{Miss, Thread};

use super::{fill, read, too_small, whole_pages};
use crate::exec::Exec;
use crate::model::Work;
use crate::workload::{hash, load, store, Workload, WorkloadKind};
use crate::WorkloadError;

/// A graph of `v` vertices with 2 to 14 out-edges each (8 on average).
#[derive(Debug)]
pub struct Bfs {
    v: u64,
    offsets: Vec<u32>,
    edges: Vec<u32>,
}

const UNSEEN: u32 = u32::MAX;

/// Managed memory of a graph of `v` vertices and `e` edges: offsets, edges, levels, the flag.
fn pages_of(v: u64, e: u64) -> u64 {
    whole_pages(4 * (v + 1)) + whole_pages(4 * e) + whole_pages(4 * v) + PAGE_SIZE
}
/// Bytes per vertex: an offset, eight edges on average, a level.
const PER_VERTEX: u64 = 4 * (1 + 8 + 1);

impl Bfs {
    /// A graph and its levels in about `bytes`.
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let v = bytes.saturating_sub(2 * PAGE_SIZE) / PER_VERTEX;
        if v < 64 {
            return Err(too_small(
                WorkloadKind::Bfs,
                bytes,
                64 * PER_VERTEX + 2 * PAGE_SIZE,
            ));
        }
        // Degrees average 8 but vary: drop the last vertices until the graph fits the bytes
        // (a vertex's degree does not depend on how many there are).
        let deg = |x: u64| 2 + hash(x << 8) % 13;
        let footprint = |v: u64, e: u64| pages_of(v, e);
        let mut e: u64 = (0..v).map(|x| u64::from(deg(x))).sum();
        let mut v = v;
        while v > 64 && footprint(v, e) > bytes {
            v -= 1;
            e -= u64::from(deg(v));
        }
        let mut offsets = Vec::with_capacity(v as usize + 1);
        let mut edges = Vec::with_capacity(e as usize);
        offsets.push(0);
        for x in 0..v {
            let deg = deg(x);
            for k in 0..deg {
                edges.push((hash((x << 8) + 1 + k as u64) as u64 % v) as u32);
            }
            offsets.push(edges.len() as u32);
        }
        Ok(Bfs { v, offsets, edges })
    }
}

impl Workload for Bfs {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Bfs
    }
    fn footprint(&self) -> u64 {
        pages_of(self.v, self.edges.len() as u64)
    }
    fn launches(&self) -> u64 {
        // About log8(v) levels, and one more that finds nothing.
        (self.v as f64).log(8.0).ceil() as u64 + 3
    }
    fn shape(&self) -> String {
        format!("v={} e={}", self.v, self.edges.len())
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let v = self.v;
        let mut off = ex.alloc("offsets", 4 * self.offsets.len() as u64)?;
        let mut edg = ex.alloc("edges", 4 * self.edges.len() as u64)?;
        let mut lvl = ex.alloc("levels", 4 * v)?;
        let mut flag = ex.alloc("flag", 4)?;
        fill(&mut off, |i| self.offsets[i as usize]);
        fill(&mut edg, |i| self.edges[i as usize]);
        fill(&mut lvl, |i| if i == 0 { 0 } else { UNSEEN });
        ex.input(&off)?;
        ex.input(&edg)?;
        ex.input(&lvl)?;
        let (po, pe, pl, pf) = (off.addr(), edg.addr(), lvl.addr(), flag.addr());
        let mut level = 0u32;
        loop {
            flag.view_mut::<u32>()[0] = 0;
            ex.input(&flag)?;
            let cur = level;
            let k = move |x: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
                if t.load_u32(pl + 4 * x)? != cur {
                    return Ok(());
                }
                let mut range = [0u32; 2];
                load(t, po + 4 * x, &mut range)?;
                let mut nb = vec![0u32; (range[1] - range[0]) as usize];
                load(t, pe + 4 * range[0] as u64, &mut nb)?;
                let mut found = false;
                for u in nb {
                    if t.load_u32(pl + 4 * u as u64)? == UNSEEN {
                        store(t, pl + 4 * u as u64, &[cur + 1])?;
                        found = true;
                    }
                }
                if found {
                    store(t, pf, &[1])?;
                }
                Ok(())
            };
            // Every lane reads its level; the frontier's lanes read their edges (8 on average).
            let w = Work::new(4 * v + 4 * 8 * 3 * v / 8, 8 * v / 8 + v);
            ex.launch("bfs-level", Arc::new(k), v, w)?;
            ex.output(&flag)?;
            if flag.view::<u32>()[0] == 0 {
                break;
            }
            level += 1;
        }
        ex.output(&lvl)?;
        Ok(read(&lvl, v as usize))
    }

    fn cpu(&self) -> Vec<u32> {
        let mut lvl = vec![UNSEEN; self.v as usize];
        lvl[0] = 0;
        let mut q = VecDeque::from([0usize]);
        while let Some(x) = q.pop_front() {
            for &u in &self.edges[self.offsets[x] as usize..self.offsets[x + 1] as usize] {
                if lvl[u as usize] == UNSEEN {
                    lvl[u as usize] = lvl[x] + 1;
                    q.push_back(u as usize);
                }
            }
        }
        lvl
    }
}
