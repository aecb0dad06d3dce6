//! The CPU device tier of one (sequence, layer): the working set.
//!
//! Per KV head, the plan's slot table ([`crate::plan`]) says which logical page that head's
//! slice of each slot holds; heads may hold different pages in the same slot. With [`DeviceTierLayout::Copy`](crate::DeviceTierLayout) the slots
//! also hold the data, token-major (NHD, `[slot][k/v][p][n_kv][d]`); in place, attention reads
//! the host-tier chunk of the page instead. Everything here is O(budget), independent of the
//! context length.

use crate::geometry::Geometry;
use crate::plan::SlotPlan;

use super::elem::KvElem;
use super::host_tier::HostTier;

/// The working set of one (sequence, layer): the plan (slot tables, pending replacements,
/// stored query) and, for the copy tier, the slot data.
pub struct CpuDeviceTier<T> {
    geo: Geometry,
    plan: SlotPlan,
    /// Copy tier: `[slot][k/v][p][n_kv][d]`; empty in place.
    data: Vec<T>,
}

impl<T> std::ops::Deref for CpuDeviceTier<T> {
    type Target = SlotPlan;

    fn deref(&self) -> &SlotPlan {
        &self.plan
    }
}

impl<T> std::ops::DerefMut for CpuDeviceTier<T> {
    fn deref_mut(&mut self) -> &mut SlotPlan {
        &mut self.plan
    }
}

impl<T: KvElem> CpuDeviceTier<T> {
    /// An empty working set; `copy` allocates the NHD slot data.
    pub fn new(geo: Geometry, copy: bool) -> Self {
        let data_len = if copy {
            geo.slots * 2 * geo.page_size * geo.num_kv_heads * geo.head_dim
        } else {
            0
        };
        Self {
            geo,
            plan: SlotPlan::new(geo),
            data: vec![T::default(); data_len],
        }
    }

    /// Bytes held (tables, query, slot data).
    pub fn bytes(geo: &Geometry, copy: bool) -> usize {
        let data = if copy {
            geo.slots
                * 2
                * geo.page_size
                * geo.num_kv_heads
                * geo.head_dim
                * std::mem::size_of::<T>()
        } else {
            0
        };
        SlotPlan::bytes(geo) + data
    }

    /// Whether the slots hold data (copy tier).
    pub fn is_copy(&self) -> bool {
        !self.data.is_empty()
    }

    /// Element offset of (slot, k/v, token, head) in the slot data.
    #[inline]
    fn data_offset(&self, slot: usize, kv: usize, token: usize, head: usize) -> usize {
        let g = &self.geo;
        (((slot * 2 + kv) * g.page_size + token) * g.num_kv_heads + head) * g.head_dim
    }

    /// The K and V rows of `head` in `slot` (copy tier): `(k, v, row stride)`; row `t` starts
    /// at `t * stride`.
    #[inline]
    pub fn slot_rows(&self, slot: usize, head: usize) -> (&[T], &[T], usize) {
        let g = &self.geo;
        let stride = g.num_kv_heads * g.head_dim;
        let span = (g.page_size - 1) * stride + g.head_dim;
        let k = self.data_offset(slot, 0, 0, head);
        let v = self.data_offset(slot, 1, 0, head);
        (&self.data[k..k + span], &self.data[v..v + span], stride)
    }

    /// Raw slot data, for the staged recall's scatter thread.
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Copies the first `n` tokens of a host chunk (HND: K rows then V rows) into `head`'s
    /// slice of `slot` (NHD). Returns the bytes copied.
    pub fn copy_in(&mut self, chunk: &[T], slot: usize, head: usize, n: usize) -> usize {
        scatter_chunk(&self.geo, &mut self.data, chunk, slot, head, n);
        2 * n * self.geo.head_dim * std::mem::size_of::<T>()
    }

    /// Writes one token's K and V rows of `head` at `token` in `slot` (copy tier).
    pub fn write_token(&mut self, slot: usize, head: usize, token: usize, k: &[f32], v: &[f32]) {
        let d = self.geo.head_dim;
        let ko = self.data_offset(slot, 0, token, head);
        T::from_f32s(k, &mut self.data[ko..ko + d]);
        let vo = self.data_offset(slot, 1, token, head);
        T::from_f32s(v, &mut self.data[vo..vo + d]);
    }

    /// Installs `page` in `slot` for every head, copying its first `n` tokens when the slots
    /// hold data. Returns the bytes copied.
    pub fn install_for_all_heads(
        &mut self,
        host: &HostTier<T>,
        block: u32,
        page: usize,
        slot: usize,
        n: usize,
    ) -> usize {
        let mut bytes = 0;
        for h in 0..self.geo.num_kv_heads {
            self.slots_mut(h)[slot] = page as u32;
            if self.is_copy() {
                bytes += self.copy_in(host.chunk(block, h), slot, h, n);
            }
        }
        bytes
    }
}

/// HND chunk -> NHD slot: token `t`'s K row goes to `[slot][0][t][head]`, its V row to
/// `[slot][1][t][head]`. Shared by the direct recall and the staged recall's scatter thread.
#[inline]
pub fn scatter_chunk<T: Copy>(
    geo: &Geometry,
    data: &mut [T],
    chunk: &[T],
    slot: usize,
    head: usize,
    n: usize,
) {
    let (p, d, nkv) = (geo.page_size, geo.head_dim, geo.num_kv_heads);
    for kv in 0..2 {
        for t in 0..n {
            let src = &chunk[(kv * p + t) * d..(kv * p + t + 1) * d];
            let o = (((slot * 2 + kv) * p + t) * nkv + head) * d;
            data[o..o + d].copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::NO_PAGE;
    use crate::plan::tests::geo;

    #[test]
    fn hnd_to_nhd_round_trip() {
        let g = geo();
        let mut host = HostTier::<f32>::try_new(g, 4).unwrap();
        for h in 0..3 {
            for t in 0..8 {
                let k: Vec<f32> = (0..4).map(|c| (h * 100 + t * 10 + c) as f32).collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                host.write_row(2, h, t, &k, &v);
            }
        }
        let mut dev = CpuDeviceTier::<f32>::new(g, true);
        let bytes = dev.install_for_all_heads(&host, 2, 7, 1, 8);
        assert_eq!(bytes, 3 * 2 * 8 * 4 * 4);
        for h in 0..3 {
            assert_eq!(dev.slots(h)[1], 7);
            let (k, v, stride) = dev.slot_rows(1, h);
            assert_eq!(stride, 12);
            for t in 0..8 {
                for c in 0..4 {
                    let want = (h * 100 + t * 10 + c) as f32;
                    assert_eq!(k[t * stride + c], want);
                    assert_eq!(v[t * stride + c], -want);
                    // The NHD layout itself: [slot][k/v][token][head][channel].
                    assert_eq!(dev.data[((2 * 8 + t) * 3 + h) * 4 + c], want);
                }
            }
        }
        // Other slots untouched.
        assert!((0..3).all(|h| dev.slots(h)[0] == NO_PAGE && dev.slots(h)[2] == NO_PAGE));
        // In place: tables only.
        let mut inplace = CpuDeviceTier::<f32>::new(g, false);
        assert_eq!(inplace.install_for_all_heads(&host, 2, 7, 1, 8), 0);
        assert!(!inplace.is_copy());
        assert!(CpuDeviceTier::<f32>::bytes(&g, true) > CpuDeviceTier::<f32>::bytes(&g, false));
    }
}
