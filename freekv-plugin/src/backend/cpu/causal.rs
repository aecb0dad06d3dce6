//! Causal attention of a prompt chunk (every prompt the engine sends, cached prefix or not):
//! the new queries over the cached prefix and the new keys, read from the host tier.
//!
//! Tiled as the FlashAttention family is: a query tile (about 32 rows = tokens x the group's
//! query heads, so GQA shares each key page without repeating K/V) against key tiles of one
//! page, online softmax in f32 ([`Attention`]). Pages no row of the tile can see (after the
//! last query, before the sliding window) are never visited; a page that some rows see only
//! in part is masked by position, so no mask tensor is read. Work items are (KV head, query
//! tile) pairs, spread over rayon's pool (the one candle's CPU kernels use, so nothing is
//! oversubscribed); the latest tiles, which see the most keys, are queued first.

use rayon::prelude::*;

use crate::geometry::Geometry;
use crate::AttnParams;

use super::attend::{Attention, AttnScratch, Segment};
use super::elem::KvElem;
use super::host_tier::HostTier;

/// Multiply-adds of one call below which it runs on the calling thread alone.
const PARALLEL_WORK: usize = 1 << 22;

/// Query rows (tokens x group) per tile: enough to reuse each key page from L1 many times,
/// few enough that the tile's accumulators stay in L1 (32 x 128 f32 = 16 KiB).
const TILE_ROWS: usize = 32;

/// Causal attention of one prompt row of the batch.
pub struct PrefillJob<'a, T> {
    pub geo: &'a Geometry,
    pub host: &'a HostTier<T>,
    /// The row's block table, covering `cached_len + new_len` tokens.
    pub table: &'a [u32],
    pub cached_len: usize,
    pub new_len: usize,
    pub params: &'a AttnParams,
    /// The row's queries `[Hq][q_tokens][d]` (`q_tokens >= new_len`: the batch's padded length).
    pub q: &'a [f32],
    pub q_tokens: usize,
}

impl<T: KvElem> PrefillJob<'_, T> {
    /// Tokens per query tile.
    fn tile_tokens(&self) -> usize {
        (TILE_ROWS / self.geo.group).max(1)
    }

    /// Multiply-adds of the whole row: q.k and p.v of every query head over every key its
    /// position sees (causal, sliding window).
    pub fn work(&self) -> usize {
        let pairs: usize = (self.cached_len..self.cached_len + self.new_len)
            .map(|pos| pos + 1 - self.params.first_visible(pos))
            .sum();
        pairs * self.geo.num_q_heads() * self.geo.head_dim * 2
    }

    /// Computes the row into `out` = `[Hq][q_tokens][d]` (positions past `new_len` untouched).
    pub fn run(&self, out: &mut [f32], scratch: &mut AttnScratch, tile_out: &mut Vec<f32>) {
        let (n_kv, bt) = (self.geo.num_kv_heads, self.tile_tokens());
        let tiles = self.new_len.div_ceil(bt);
        if self.work() < PARALLEL_WORK || rayon::current_num_threads() < 2 {
            for h in 0..n_kv {
                for tile in 0..tiles {
                    let t0 = tile * bt;
                    self.tile(h, t0, scratch, tile_out);
                    self.scatter(h, t0, tile_out, out);
                }
            }
            return;
        }
        // Latest tiles first: they see the most keys, so the pool ends with the cheap ones.
        let items: Vec<(usize, usize)> = (0..tiles)
            .rev()
            .flat_map(|tile| (0..n_kv).map(move |h| (h, tile * bt)))
            .collect();
        let done: Vec<(usize, usize, Vec<f32>)> = items
            .into_par_iter()
            .map_init(AttnScratch::default, |sc, (h, t0)| {
                let mut buf = Vec::new();
                self.tile(h, t0, sc, &mut buf);
                (h, t0, buf)
            })
            .collect();
        for (h, t0, buf) in done {
            self.scatter(h, t0, &buf, out);
        }
    }

    /// The tile of tokens `t0..` of KV head `h`'s query heads into `tile_out`, row
    /// `(t - t0) * group + r` for query head `h * group + r`.
    fn tile(&self, h: usize, t0: usize, sc: &mut AttnScratch, tile_out: &mut Vec<f32>) {
        let g = self.geo;
        let (p, d, gs) = (g.page_size, g.head_dim, g.group);
        let t1 = (t0 + self.tile_tokens()).min(self.new_len);
        sc.q.clear();
        sc.qpos.clear();
        for t in t0..t1 {
            for r in 0..gs {
                let o = ((h * gs + r) * self.q_tokens + t) * d;
                sc.q.extend_from_slice(&self.q[o..o + d]);
                sc.qpos.push(self.cached_len + t);
            }
        }
        let rows = (t1 - t0) * gs;
        let first = self.params.first_visible(self.cached_len + t0);
        let last = self.cached_len + t1 - 1;
        let mut att = Attention::begin(sc, rows, d, self.params);
        for page in first / p..=last / p {
            let chunk = self.host.chunk(self.table[page], h);
            att.add(
                Segment {
                    k: &chunk[..p * d],
                    v: &chunk[p * d..],
                    stride: d,
                    n: g.valid_tokens(page, last + 1),
                    pos0: page * p,
                },
                self.params,
            );
        }
        tile_out.clear();
        tile_out.resize(rows * d, 0.0);
        for (row, o) in tile_out.chunks_exact_mut(d).enumerate() {
            att.finish_row(row, o);
        }
    }

    /// Copies a computed tile to its places in the row's output.
    fn scatter(&self, h: usize, t0: usize, tile_out: &[f32], out: &mut [f32]) {
        let (d, gs) = (self.geo.head_dim, self.geo.group);
        for (row, src) in tile_out.chunks_exact(d).enumerate() {
            let (t, r) = (t0 + row / gs, row % gs);
            let o = ((h * gs + r) * self.q_tokens + t) * d;
            out[o..o + d].copy_from_slice(src);
        }
    }
}
