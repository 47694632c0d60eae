//! A paged key-value cache, LLM decoding style (vLLM's PagedAttention; ARIADNE's Llama decode):
//! 16 sequences grow by a chunk of tokens per step; their 4 KiB blocks (16 tokens × 64
//! words) come from one pool in the order they are needed, so a sequence's blocks are scattered
//! among the others'. Each step the device appends the new tokens' keys through the block table
//! the CPU updated, then every sequence's whole cache is read against its query (attention
//! scores per block). The working set grows step by step; every step rereads all of it.

use std::sync::Arc;

use hetmem_core::PAGE_SIZE;
use hetmem_sim::accel::{Miss, Thread};

use super::{fill, fit, read, too_small, whole_pages};
use crate::exec::Exec;
use crate::model::Work;
use crate::workload::{hash, load, store, Workload, WorkloadKind};
use crate::WorkloadError;

/// Sequences.
pub const SEQS: u64 = 16;
/// Decode steps.
pub const STEPS: u64 = 16;
/// Tokens per block.
const TOKENS: u64 = 16;
/// Words per token.
const DIM: u64 = 64;

/// Managed memory of a pool of `blocks` blocks: the pool, the block table, the queries and the
/// scores.
fn footprint(blocks: u64) -> u64 {
    let table = 4 * SEQS * (blocks / SEQS);
    blocks * PAGE_SIZE + 2 * whole_pages(table) + whole_pages(4 * SEQS * DIM)
}

/// A cache of `blocks` pool blocks.
#[derive(Debug)]
pub struct KvCache {
    blocks: u64,
}

impl KvCache {
    /// A pool, its block table, the queries and the scores in at most `bytes`: per pool block,
    /// the block, its table entry and its score; the queries on top.
    pub fn new(bytes: u64) -> Result<Self, WorkloadError> {
        let per_block = PAGE_SIZE + 4 * 2;
        let queries = 4 * SEQS * DIM;
        let step = SEQS * STEPS;
        let blocks = bytes.saturating_sub(queries) / per_block / step * step;
        let blocks = fit(blocks, step, bytes, footprint);
        if blocks == 0 {
            return Err(too_small(
                WorkloadKind::Kvcache,
                bytes,
                SEQS * STEPS * per_block + queries,
            ));
        }
        Ok(KvCache { blocks })
    }

    /// Blocks each sequence has after `step` steps.
    fn per_seq(&self, steps: u64) -> u64 {
        self.blocks / SEQS / STEPS * steps
    }

    fn max_blocks(&self) -> u64 {
        self.blocks / SEQS
    }

    /// The pool block of sequence `s`'s block `b`: blocks are handed out step by step,
    /// sequence by sequence.
    fn table(&self, s: u64, b: u64) -> u64 {
        let grow = self.per_seq(1);
        let (step, k) = (b / grow, b % grow);
        step * SEQS * grow + s * grow + k
    }

    fn key(s: u64, pos: u64, d: u64) -> u32 {
        hash((s << 40) ^ (pos << 8) ^ d)
    }

    fn query(s: u64, d: u64) -> u32 {
        hash((1 << 60) ^ (s << 8) ^ d)
    }
}

impl Workload for KvCache {
    fn kind(&self) -> WorkloadKind {
        WorkloadKind::Kvcache
    }
    fn footprint(&self) -> u64 {
        footprint(self.blocks)
    }
    fn launches(&self) -> u64 {
        2 * STEPS
    }
    fn shape(&self) -> String {
        format!("seqs={SEQS} steps={STEPS} blocks={}", self.blocks)
    }

    fn run(&self, ex: &mut Exec<'_, '_>) -> Result<Vec<u32>, WorkloadError> {
        let maxb = self.max_blocks();
        let pool = ex.alloc("pool", self.blocks * PAGE_SIZE)?;
        let mut table = ex.alloc("block-table", 4 * SEQS * maxb)?;
        let mut q = ex.alloc("queries", 4 * SEQS * DIM)?;
        let scores = ex.alloc("scores", 4 * SEQS * maxb)?;
        fill(&mut q, |i| Self::query(i / DIM, i % DIM));
        ex.input(&q)?;
        ex.on_device(&pool)?;
        ex.on_device(&scores)?;
        let (pp, pt, pq, ps) = (pool.addr(), table.addr(), q.addr(), scores.addr());
        let grow = self.per_seq(1);
        for step in 1..=STEPS {
            let (old, now) = (self.per_seq(step - 1), self.per_seq(step));
            // The CPU extends the block table (with explicit copies, its copy comes back first).
            ex.output(&table)?;
            {
                let mut v = table.view_mut::<u32>();
                for s in 0..SEQS {
                    for b in old..now {
                        v[(s * maxb + b) as usize] = self.table(s, b) as u32;
                    }
                }
            }
            ex.input(&table)?;
            // Append: one lane per new token, writing its key into its block.
            let new_tokens = grow * TOKENS;
            let append = move |l: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
                let (s, k) = (l / new_tokens, l % new_tokens);
                let pos = old * TOKENS + k;
                let blk = t.load_u32(pt + 4 * (s * maxb + pos / TOKENS))? as u64;
                let mut row = [0u32; DIM as usize];
                for (d, r) in row.iter_mut().enumerate() {
                    *r = Self::key(s, pos, d as u64);
                }
                store(t, pp + blk * PAGE_SIZE + (pos % TOKENS) * DIM * 4, &row)
            };
            let n = SEQS * new_tokens;
            ex.launch("kv-append", Arc::new(append), n, Work::new(4 * DIM * n, n))?;
            // Attend: one lane per (sequence, block), over all blocks so far.
            let attend = move |l: u64, t: &mut Thread<'_>| -> Result<(), Miss> {
                let (s, b) = (l / now, l % now);
                // The table entry and the query are independent loads; the pool's depends on
                // the entry.
                let (entry, query) = (pt + 4 * (s * maxb + b), pq + 4 * s * DIM);
                t.issue_loads(&[(entry, 4), (query, 4 * DIM as usize)])?;
                let blk = t.load_u32(entry)? as u64;
                let mut qs = [0u32; DIM as usize];
                load(t, query, &mut qs)?;
                let mut row = [0u32; DIM as usize];
                let mut score = 0u32;
                for tok in 0..TOKENS {
                    load(t, pp + blk * PAGE_SIZE + tok * DIM * 4, &mut row)?;
                    for (k, qd) in row.iter().zip(qs) {
                        score = score.wrapping_add(k.wrapping_mul(qd));
                    }
                }
                store(t, ps + 4 * (s * maxb + b), &[score])
            };
            let n = SEQS * now;
            let w = Work::new(n * PAGE_SIZE, 2 * n * TOKENS * DIM);
            ex.launch("kv-attend", Arc::new(attend), n, w)?;
        }
        ex.output(&scores)?;
        Ok(read(&scores, (SEQS * maxb) as usize))
    }

    fn cpu(&self) -> Vec<u32> {
        let maxb = self.max_blocks();
        let mut out = vec![0u32; (SEQS * maxb) as usize];
        for s in 0..SEQS {
            for b in 0..maxb {
                let mut score = 0u32;
                for tok in 0..TOKENS {
                    let pos = b * TOKENS + tok;
                    for d in 0..DIM {
                        score = score
                            .wrapping_add(Self::key(s, pos, d).wrapping_mul(Self::query(s, d)));
                    }
                }
                out[(s * maxb + b) as usize] = score;
            }
        }
        out
    }
}
