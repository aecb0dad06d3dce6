//! The CPU host tier of one layer: every engine block's KV page, head-major (HND), and the
//! page summaries, indexed by block id.
//!
//! Page layout `[n_kv][2][p][d]`: one KV head's K rows then V rows of one page form one
//! contiguous chunk (`2 p d` elements), the unit of per-head recall and of in-place
//! attention. Summaries are kept per block id beside the pages (f32, head-major
//! `[n_kv][block][2][d]`: upper bound then lower bound), so sequences that share blocks (prefix cache) share summaries; a
//! write into a block invalidates its summary, and a page that becomes full is summarised
//! again: a reused block id can never serve a stale summary.

use crate::geometry::Geometry;
use crate::SummaryKind;

use super::alloc::try_zeroed_vec;
use super::elem::KvElem;

/// One layer's pages and summaries.
pub struct HostTier<T> {
    geo: Geometry,
    num_blocks: usize,
    pages: Vec<T>,
    summaries: Vec<T>,
    /// Per block: 1 when its summary matches its (full) contents.
    summarised: Vec<u8>,
}

/// Element counts of one block's page and summary.
fn page_elems(geo: &Geometry) -> usize {
    geo.num_kv_heads * 2 * geo.page_size * geo.head_dim
}

fn summary_elems(geo: &Geometry) -> usize {
    geo.num_kv_heads * 2 * geo.head_dim
}

impl<T: KvElem> HostTier<T> {
    /// Bytes of a host tier of `num_blocks` blocks.
    pub fn bytes(geo: &Geometry, num_blocks: usize) -> usize {
        num_blocks
            .saturating_mul((page_elems(geo) + summary_elems(geo)) * std::mem::size_of::<T>() + 1)
    }

    /// Allocates a zeroed host tier (lazily committed); `None` when the allocator refuses.
    pub fn try_new(geo: Geometry, num_blocks: usize) -> Option<Self> {
        Some(Self {
            geo,
            num_blocks,
            pages: try_zeroed_vec(num_blocks.checked_mul(page_elems(&geo))?)?,
            summaries: try_zeroed_vec(num_blocks.checked_mul(summary_elems(&geo))?)?,
            summarised: try_zeroed_vec(num_blocks)?,
        })
    }

    /// Every block's page, `[block][n_kv][2][p][d]` (what a device page-locks for its copies).
    pub fn pages(&self) -> &[T] {
        &self.pages
    }

    /// Number of blocks.
    #[cfg(feature = "cuda")]
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn chunk_offset(&self, block: u32, head: usize) -> usize {
        let g = &self.geo;
        assert!(
            (block as usize) < self.num_blocks,
            "block id {block} outside the host tier's {} blocks",
            self.num_blocks
        );
        ((block as usize * g.num_kv_heads + head) * 2 * g.page_size) * g.head_dim
    }

    /// One KV head's chunk of one block: K rows `[p][d]` then V rows `[p][d]`.
    #[inline]
    pub fn chunk(&self, block: u32, head: usize) -> &[T] {
        let o = self.chunk_offset(block, head);
        &self.pages[o..o + 2 * self.geo.page_size * self.geo.head_dim]
    }

    /// Writes one token's K and V rows of one head at `offset` in `block`, converting from f32.
    /// Invalidates the block's summary.
    #[inline]
    pub fn write_row(&mut self, block: u32, head: usize, offset: usize, k: &[f32], v: &[f32]) {
        let (p, d) = (self.geo.page_size, self.geo.head_dim);
        let o = self.chunk_offset(block, head);
        T::from_f32s(k, &mut self.pages[o + offset * d..o + (offset + 1) * d]);
        T::from_f32s(
            v,
            &mut self.pages[o + (p + offset) * d..o + (p + offset + 1) * d],
        );
        self.summarised[block as usize] = 0;
    }

    /// Whether `block` carries a summary of its current (full) contents.
    pub fn is_summarised(&self, block: u32) -> bool {
        self.summarised[block as usize] != 0
    }

    /// The summary of `block` for `head`: upper bound `[d]` then lower bound `[d]`.
    #[inline]
    pub fn summary(&self, block: u32, head: usize) -> &[T] {
        let o = self.summary_offset(block, head);
        &self.summaries[o..o + 2 * self.geo.head_dim]
    }

    /// Where [`Self::summary`] starts in [`Self::summaries`]. Head-major, so one head's
    /// selection scans one contiguous region.
    #[inline]
    pub fn summary_offset(&self, block: u32, head: usize) -> usize {
        (head * self.num_blocks + block as usize) * 2 * self.geo.head_dim
    }

    /// Every summary, `[head][block][upper d | lower d]`.
    pub fn summaries(&self) -> &[T] {
        &self.summaries
    }

    /// Summarises the (full) page in `block`, every head. `scratch` is working memory.
    /// Bounds are computed in f32 and stored in the KV dtype: min/max of stored keys are
    /// stored keys, so exact; the centre +/- deviation box is rounded to nearest.
    pub fn summarise(&mut self, block: u32, kind: SummaryKind, scratch: &mut Vec<f32>) {
        let (p, d, n_kv) = (self.geo.page_size, self.geo.head_dim, self.geo.num_kv_heads);
        scratch.resize(4 * d, 0.0);
        let (row, rest) = scratch.split_at_mut(d);
        let (mad, bounds) = rest.split_at_mut(d);
        let (upper, lower) = bounds.split_at_mut(d);
        for h in 0..n_kv {
            let o = self.chunk_offset(block, h);
            upper.fill(f32::NEG_INFINITY);
            lower.fill(f32::INFINITY);
            for t in 0..p {
                T::to_f32s(&self.pages[o + t * d..o + (t + 1) * d], row);
                for c in 0..d {
                    upper[c] = upper[c].max(row[c]);
                    lower[c] = lower[c].min(row[c]);
                }
            }
            if kind == SummaryKind::CentreMad {
                // centre +/- mean absolute deviation from the centre, per channel.
                mad.fill(0.0);
                for t in 0..p {
                    T::to_f32s(&self.pages[o + t * d..o + (t + 1) * d], row);
                    for c in 0..d {
                        mad[c] += (row[c] - 0.5 * (upper[c] + lower[c])).abs();
                    }
                }
                for c in 0..d {
                    let centre = 0.5 * (upper[c] + lower[c]);
                    let r = mad[c] / p as f32;
                    upper[c] = centre + r;
                    lower[c] = centre - r;
                }
            }
            let so = self.summary_offset(block, h);
            T::from_f32s(upper, &mut self.summaries[so..so + d]);
            T::from_f32s(lower, &mut self.summaries[so + d..so + 2 * d]);
        }
        self.summarised[block as usize] = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn geo() -> Geometry {
        Geometry::for_test(64, 16, 16, (1, 4, 2, 4))
    }

    /// A tiny deterministic value per (block, head, token, channel, k/v).
    fn val(b: u32, h: usize, t: usize, c: usize, kv: usize) -> f32 {
        ((b as usize * 131 + h * 31 + t * 7 + c * 3 + kv * 17) % 23) as f32 - 11.0
    }

    #[test]
    fn layout_round_trip_is_hnd() {
        let g = geo();
        let mut host = HostTier::<f32>::try_new(g, 5).unwrap();
        for b in [4u32, 0, 2] {
            for h in 0..2 {
                for t in 0..8 {
                    let k: Vec<f32> = (0..4).map(|c| val(b, h, t, c, 0)).collect();
                    let v: Vec<f32> = (0..4).map(|c| val(b, h, t, c, 1)).collect();
                    host.write_row(b, h, t, &k, &v);
                }
            }
        }
        for b in [4u32, 0, 2] {
            for h in 0..2 {
                let chunk = host.chunk(b, h);
                assert_eq!(chunk.len(), 2 * 8 * 4);
                for t in 0..8 {
                    for c in 0..4 {
                        assert_eq!(chunk[t * 4 + c], val(b, h, t, c, 0));
                        assert_eq!(chunk[(8 + t) * 4 + c], val(b, h, t, c, 1));
                    }
                }
                // The raw layout: [block][head][k/v][token][channel].
                let o = ((b as usize * 2 + h) * 2 * 8) * 4;
                assert_eq!(host.pages[o + 3 * 4 + 1], val(b, h, 3, 1, 0));
            }
        }
        // Untouched blocks stay zero.
        assert!(host.chunk(1, 0).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn summaries_bound_keys_and_are_invalidated_by_writes() {
        let g = geo();
        let mut host = HostTier::<bf16>::try_new(g, 3).unwrap();
        let mut row = Vec::new();
        for kind in [SummaryKind::MinMax, SummaryKind::CentreMad] {
            for h in 0..2 {
                for t in 0..8 {
                    let k: Vec<f32> = (0..4).map(|c| val(1, h, t, c, 0) * 0.5).collect();
                    host.write_row(1, h, t, &k, &k);
                }
            }
            assert!(!host.is_summarised(1));
            host.summarise(1, kind, &mut row);
            assert!(host.is_summarised(1));
            for h in 0..2 {
                let s: Vec<f32> = host.summary(1, h).iter().map(|x| x.to_f32()).collect();
                for c in 0..4 {
                    let keys: Vec<f32> = (0..8).map(|t| val(1, h, t, c, 0) * 0.5).collect();
                    let mx = keys.iter().cloned().fold(f32::MIN, f32::max);
                    let mn = keys.iter().cloned().fold(f32::MAX, f32::min);
                    assert!(s[c] >= s[4 + c]);
                    match kind {
                        SummaryKind::MinMax => assert_eq!((s[c], s[4 + c]), (mx, mn)),
                        SummaryKind::CentreMad => {
                            let centre = (mx + mn) / 2.0;
                            let mad = keys.iter().map(|k| (k - centre).abs()).sum::<f32>() / 8.0;
                            // Stored as bf16: rounded to nearest.
                            let r = |x: f32| bf16::from_f32(x).to_f32();
                            assert_eq!(s[c], r(centre + mad));
                            assert_eq!(s[4 + c], r(centre - mad));
                            // The box lies inside the min/max range.
                            assert!(s[c] <= mx + 1e-6 && s[4 + c] >= mn - 1e-6);
                        }
                    }
                }
            }
            // Any write (a reused block id starting over) drops the summary.
            host.write_row(1, 0, 0, &[0.0; 4], &[0.0; 4]);
            assert!(!host.is_summarised(1));
        }
    }

    #[test]
    fn allocation_failure_is_reported() {
        assert!(HostTier::<f32>::try_new(geo(), usize::MAX / 64).is_none());
    }
}
