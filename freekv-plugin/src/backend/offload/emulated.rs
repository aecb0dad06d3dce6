//! [`DeviceOps`] in host memory: the offload design's device emulated by the CPU, so that CI
//! runs the very orchestration the CUDA backend runs (tables, plans, chunk moves, appends,
//! decode over the slots) against the CPU backend and the reference, without a GPU. It is
//! also the CPU's `--freekv-device-tier copy` layout.
//!
//! Slots hold NHD data in a `Vec`; moves scatter HND chunks into them (the worker through the
//! double-buffered `StagedRecall`); decode is the CPU attention kernel over slot rows. The
//! summary mirror is a copy of its own, so a summary the orchestration forgets to upload
//! scores as zeros here, as it would on a GPU, and the plans differ from the CPU backend's.

use std::marker::PhantomData;

use candle_core::{DType, Device, Tensor};

use crate::backend::cpu::alloc::try_zeroed_vec;
use crate::backend::cpu::attend::{Attention, AttnScratch, Segment};
use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::backend::cpu::io::read_f32;
use crate::backend::cpu::select::{plan_replacement, pooled_scores, SelectScratch};
use crate::backend::cpu::PARALLEL_DECODE;
use crate::backend::Role;
use crate::correction::group_similarity;
use crate::geometry::Geometry;
use crate::AttnParams;

use super::ops::{
    decode_rows, span_tokens, ChunkMove, DecodeDesc, DeviceMemory, DeviceOps, NewToken,
    PageSelection, SelectQuery,
};
use super::page_plans::PagePlans;
use super::staged::StagedRecall;

/// The host-memory device for KV stored as `T`.
pub struct EmulatedDevice<T> {
    geo: Geometry,
    device: Device,
    _elem: PhantomData<fn() -> T>,
}

impl<T> EmulatedDevice<T> {
    /// A host-memory device for `geo`.
    pub fn new(geo: Geometry) -> Self {
        Self {
            geo,
            device: Device::Cpu,
            _elem: PhantomData,
        }
    }

    /// Elements of one slot.
    fn slot_elems(&self) -> usize {
        let g = &self.geo;
        2 * g.page_size * g.num_kv_heads * g.head_dim
    }
}

/// Per-thread memory of the host-memory device.
pub struct EmulatedScratch<T: KvElem> {
    role: Role,
    /// The worker's staged recall, started on its first multi-chunk move.
    staged: Option<StagedRecall<T>>,
    attn: AttnScratch,
    select: SelectScratch,
    offsets: Vec<usize>,
}

/// One layer's summary mirror in host memory, laid out as the host tier's.
pub struct EmulatedSummaries<T> {
    pub(super) num_blocks: usize,
    /// `[n_kv][block][upper d | lower d]`.
    pub(super) data: Vec<T>,
}

/// A decode batch in the host-memory device: q as f32, k and v as stored, and the output
/// (`[B][n_q][d]` f32; a row no decode wrote stays zero, as a CUDA batch's does).
#[derive(Default)]
pub struct EmulatedBatch<T> {
    q: Vec<f32>,
    k: Vec<T>,
    v: Vec<T>,
    out: Vec<f32>,
    rows: usize,
    /// The loaded tensors (the "staged copy" is these).
    inputs: Option<[Tensor; 3]>,
    /// Scratch for reading k and v.
    f32s: Vec<f32>,
}

/// HND chunk -> NHD slot: token `t`'s K row goes to `[slot][0][t][head]`, its V row to
/// `[slot][1][t][head]`. Shared by the direct moves and the staged recall's scatter thread.
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

/// The K and V rows of `head` in `slot` of NHD slot data: `(k, v, row stride)`; row `t` starts
/// at `t * stride`.
#[inline]
fn slot_rows<'a, T>(
    geo: &Geometry,
    data: &'a [T],
    slot: usize,
    head: usize,
) -> (&'a [T], &'a [T], usize) {
    let (p, d, nkv) = (geo.page_size, geo.head_dim, geo.num_kv_heads);
    let stride = nkv * d;
    let span = (p - 1) * stride + d;
    let k = ((slot * 2) * p * nkv + head) * d;
    let v = ((slot * 2 + 1) * p * nkv + head) * d;
    (&data[k..k + span], &data[v..v + span], stride)
}

impl<T: KvElem> EmulatedDevice<T> {
    /// Attention of KV head `h`'s query heads (`q`, `out`: `[G][d]`) over its logical slots
    /// (stored where `index` says, see [`DeviceOps::decode`]).
    fn decode_head(
        &self,
        data: &[T],
        (index, slot_len): (Option<&[u32]>, &[i32]),
        h: usize,
        (q, out): (&[f32], &mut [f32]),
        params: &AttnParams,
        sc: &mut AttnScratch,
    ) {
        let g = &self.geo;
        let (d, gs) = (g.head_dim, g.group);
        sc.q.clear();
        sc.q.extend_from_slice(q);
        sc.qpos.clear();
        // Every token of a slot's span is visible (the spans already cut the sliding window):
        // place the query after the last slot position, with no window.
        sc.qpos.resize(gs, g.page_size);
        let params = &AttnParams {
            sliding_window: None,
            ..*params
        };
        let mut att = Attention::begin(sc, gs, d, params);
        for (i, spans) in slot_len.chunks_exact(g.num_kv_heads).enumerate() {
            let (lo, hi) = span_tokens(spans[h]);
            if lo >= hi {
                continue;
            }
            let slot = index.map_or(i, |ix| ix[i] as usize);
            let (k, v, stride) = slot_rows(g, data, slot, h);
            let seg = Segment {
                k: &k[lo * stride..],
                v: &v[lo * stride..],
                stride,
                n: hi - lo,
                pos0: 0,
            };
            att.add(seg, params);
        }
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            att.finish_row(r, o);
        }
    }
}

impl<T: KvElem> DeviceMemory<T> for EmulatedDevice<T> {
    type Slots = Vec<T>;
    type Scratch = EmulatedScratch<T>;
    /// Host memory needs no registration.
    type HostPin = ();
    type Summaries = EmulatedSummaries<T>;
    type Batch = EmulatedBatch<T>;
    /// The engine's tensors themselves.
    type Staged = [Tensor; 3];
    /// As f32 (the plan's copy, which the host-memory device stores exactly).
    type Query = Vec<f32>;

    fn device(&self) -> &Device {
        &self.device
    }

    fn alloc_batch(&self) -> EmulatedBatch<T> {
        EmulatedBatch::default()
    }

    fn alloc_slots(&self, n_slots: usize) -> anyhow::Result<Vec<T>> {
        let n = n_slots.saturating_mul(self.slot_elems());
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| {
            anyhow::anyhow!(
                "could not allocate {} bytes of slot data",
                n * std::mem::size_of::<T>()
            )
        })?;
        v.resize(n, T::default());
        Ok(v)
    }

    fn slots_bytes(&self, n_slots: usize) -> usize {
        n_slots
            .saturating_mul(self.slot_elems())
            .saturating_mul(std::mem::size_of::<T>())
    }

    fn alloc_scratch(&self, role: Role) -> EmulatedScratch<T> {
        EmulatedScratch {
            role,
            staged: None,
            attn: AttnScratch::default(),
            select: SelectScratch::default(),
            offsets: Vec::new(),
        }
    }

    /// Host memory is the emulated device's own: always "registered".
    fn pin_host(&self, _pages: &[T]) -> Option<()> {
        Some(())
    }

    fn alloc_summaries(&self, num_blocks: usize) -> anyhow::Result<EmulatedSummaries<T>> {
        let n = num_blocks.saturating_mul(self.geo.num_kv_heads * 2 * self.geo.head_dim);
        let data = try_zeroed_vec(n).ok_or_else(|| {
            anyhow::anyhow!(
                "could not allocate {} bytes for the summary mirror of {num_blocks} blocks",
                self.summaries_bytes(num_blocks)
            )
        })?;
        Ok(EmulatedSummaries { num_blocks, data })
    }

    fn summaries_bytes(&self, num_blocks: usize) -> usize {
        num_blocks
            .saturating_mul(self.geo.num_kv_heads * 2 * self.geo.head_dim)
            .saturating_mul(std::mem::size_of::<T>())
    }

    fn upload_summaries(
        &self,
        host: &HostTier<T>,
        mirror: &mut EmulatedSummaries<T>,
        blocks: &[u32],
        _scratch: &mut EmulatedScratch<T>,
    ) -> anyhow::Result<()> {
        let w = 2 * self.geo.head_dim;
        for &b in blocks {
            anyhow::ensure!(
                (b as usize) < mirror.num_blocks,
                "summary upload of block {b} into a mirror of {} blocks",
                mirror.num_blocks
            );
            for h in 0..self.geo.num_kv_heads {
                let o = (h * mirror.num_blocks + b as usize) * w;
                mirror.data[o..o + w].copy_from_slice(host.summary(b, h));
            }
        }
        Ok(())
    }

    fn alloc_query(&self) -> anyhow::Result<Vec<f32>> {
        let n = self.geo.num_q_heads() * self.geo.head_dim;
        try_zeroed_vec(n).ok_or_else(|| anyhow::anyhow!("out of memory for a {n}-value query"))
    }

    fn query_bytes(&self) -> usize {
        self.geo.num_q_heads() * self.geo.head_dim * std::mem::size_of::<f32>()
    }

    fn upload_query(&self, query: &[f32], dst: &mut Vec<f32>) -> anyhow::Result<()> {
        anyhow::ensure!(
            query.len() == dst.len(),
            "a {}-value query stored into {} values",
            query.len(),
            dst.len()
        );
        dst.copy_from_slice(query);
        Ok(())
    }
}

impl<T: KvElem> DeviceOps<T> for EmulatedDevice<T> {
    fn load_batch(
        &self,
        batch: &mut EmulatedBatch<T>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> anyhow::Result<()> {
        let (n_q, d) = (self.geo.num_q_heads(), self.geo.head_dim);
        let b = decode_rows(&self.geo, q, k, v)?;
        batch.q.clear();
        read_f32(q, &mut batch.q)?;
        for (t, dst) in [(k, &mut batch.k), (v, &mut batch.v)] {
            batch.f32s.clear();
            read_f32(t, &mut batch.f32s)?;
            dst.clear();
            dst.resize(batch.f32s.len(), T::default());
            T::from_f32s(&batch.f32s, dst);
        }
        batch.rows = b;
        batch.out.clear();
        batch.out.resize(b * n_q * d, 0.0);
        batch.inputs = Some([q.clone(), k.clone(), v.clone()]);
        Ok(())
    }

    fn stage_batch(
        &self,
        batch: &EmulatedBatch<T>,
        _reuse: Option<[Tensor; 3]>,
    ) -> anyhow::Result<[Tensor; 3]> {
        batch
            .inputs
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no decode batch is loaded"))
    }

    fn read_staged(&self, staged: &[Tensor; 3]) -> anyhow::Result<[Tensor; 3]> {
        Ok(staged.clone())
    }

    fn finish_batch(
        &self,
        batch: &mut EmulatedBatch<T>,
        host_rows: &[usize],
        host_out: &[f32],
        dtype: DType,
    ) -> anyhow::Result<Tensor> {
        let w = self.geo.num_q_heads() * self.geo.head_dim;
        anyhow::ensure!(
            host_rows.is_empty() || host_out.len() == batch.out.len(),
            "a decode batch of {} values merged with {} host-computed values",
            batch.out.len(),
            host_out.len()
        );
        for &r in host_rows {
            anyhow::ensure!(r < batch.rows, "host row {r} of a {}-row batch", batch.rows);
            batch.out[r * w..(r + 1) * w].copy_from_slice(&host_out[r * w..(r + 1) * w]);
        }
        let out = std::mem::take(&mut batch.out);
        let shape = (batch.rows, self.geo.num_q_heads(), self.geo.head_dim);
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn select_pages(
        &self,
        mirror: &EmulatedSummaries<T>,
        batch: &EmulatedBatch<T>,
        jobs: &[PageSelection<'_>],
        out: &mut PagePlans,
        scratch: &mut EmulatedScratch<T>,
    ) -> anyhow::Result<()> {
        let g = &self.geo;
        let (d, n_kv, n_sel) = (g.head_dim, g.num_kv_heads, g.sel_pages);
        let w = g.num_q_heads() * d;
        out.reset(jobs.len() * n_kv, n_sel);
        for (s, job) in jobs.iter().enumerate() {
            let PageSelection {
                blocks,
                first,
                query,
                heads,
                pooling,
                resident,
            } = *job;
            let query = match query {
                SelectQuery::Host(q) => q,
                SelectQuery::Batch(row) => {
                    anyhow::ensure!(
                        row < batch.rows,
                        "a selection's query in row {row} of a {}-row batch",
                        batch.rows
                    );
                    &batch.q[row * w..(row + 1) * w]
                }
            };
            anyhow::ensure!(
                query.len() == w && resident.len() == n_kv * n_sel,
                "page selection got a {}-value query and {} resident pages",
                query.len(),
                resident.len()
            );
            for h in (0..n_kv).filter(|&h| heads[h]) {
                scratch.offsets.clear();
                scratch.offsets.extend(
                    blocks
                        .iter()
                        .map(|&b| (h * mirror.num_blocks + b as usize) * 2 * d),
                );
                let group_q = &query[h * g.group * d..(h + 1) * g.group * d];
                let sc = &mut scratch.select;
                pooled_scores(group_q, d, &mirror.data, &scratch.offsets, pooling, sc);
                let cand = first..first + blocks.len();
                plan_replacement(g, cand, &resident[h * n_sel..(h + 1) * n_sel], sc);
                out.set(s * n_kv + h, &sc.plan, sc.margin);
            }
        }
        Ok(())
    }

    fn query_similarities(
        &self,
        batch: &mut EmulatedBatch<T>,
        rows: &[(usize, &Vec<f32>)],
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        let (n_kv, d) = (self.geo.num_kv_heads, self.geo.head_dim);
        let w = self.geo.num_q_heads() * d;
        anyhow::ensure!(
            out.len() == rows.len() * n_kv,
            "{} similarities for {} rows",
            out.len(),
            rows.len()
        );
        for (&(row, stored), o) in rows.iter().zip(out.chunks_exact_mut(n_kv)) {
            anyhow::ensure!(
                row < batch.rows && stored.len() == w,
                "the correction test of row {row} of a {}-row batch",
                batch.rows
            );
            let q = &batch.q[row * w..(row + 1) * w];
            group_similarity(&self.geo, |h| &q[h * d..(h + 1) * d], stored, o);
        }
        Ok(())
    }

    fn move_chunks(
        &self,
        host: &HostTier<T>,
        slots: &mut Vec<T>,
        moves: &[ChunkMove],
        scratch: Option<&mut EmulatedScratch<T>>,
    ) -> anyhow::Result<()> {
        match scratch {
            Some(sc) if sc.role == Role::Worker && moves.len() > 1 => {
                if sc.staged.is_none() {
                    sc.staged = Some(StagedRecall::new(self.geo)?);
                }
                let staged = sc.staged.as_mut().expect("started above");
                staged.run(slots, host, moves)
            }
            _ => {
                for m in moves {
                    let chunk = host.chunk(m.block, m.head as usize);
                    let (slot, head) = (m.slot as usize, m.head as usize);
                    scatter_chunk(&self.geo, slots, chunk, slot, head, self.geo.page_size);
                }
                Ok(())
            }
        }
    }

    fn append_token(
        &self,
        slots: &mut Vec<T>,
        slot: usize,
        token: usize,
        rows: NewToken<'_, T, EmulatedBatch<T>>,
    ) -> anyhow::Result<()> {
        let g = &self.geo;
        let width = g.num_kv_heads * g.head_dim;
        let (k, v) = match rows {
            NewToken::Host { k, v } => (k, v),
            NewToken::Batch { batch, row } => {
                anyhow::ensure!(
                    row < batch.rows,
                    "append of row {row} of a {}-row batch",
                    batch.rows
                );
                let r = row * width..(row + 1) * width;
                (&batch.k[r.clone()], &batch.v[r])
            }
        };
        let stored = slots.len() / self.slot_elems();
        anyhow::ensure!(
            k.len() == width && v.len() == width && slot < stored && token < g.page_size,
            "append of {}/{} values at slot {slot} token {token}; expected {width} values, \
             {stored} slots of {} tokens",
            k.len(),
            v.len(),
            g.page_size
        );
        // NHD: one token's K rows of all heads are one run, its V rows another.
        let ko = (slot * 2 * g.page_size + token) * width;
        let vo = ((slot * 2 + 1) * g.page_size + token) * width;
        slots[ko..ko + width].copy_from_slice(k);
        slots[vo..vo + width].copy_from_slice(v);
        Ok(())
    }

    fn decode(
        &self,
        rows: &[DecodeDesc<'_, Vec<T>>],
        batch: &mut EmulatedBatch<T>,
        params: &AttnParams,
        scratch: &mut EmulatedScratch<T>,
    ) -> anyhow::Result<()> {
        for r in rows {
            self.decode_row(r, batch, params, scratch)?;
        }
        Ok(())
    }
}

impl<T: KvElem> EmulatedDevice<T> {
    /// One row of [`DeviceOps::decode`].
    fn decode_row(
        &self,
        r: &DecodeDesc<'_, Vec<T>>,
        batch: &mut EmulatedBatch<T>,
        params: &AttnParams,
        scratch: &mut EmulatedScratch<T>,
    ) -> anyhow::Result<()> {
        let (slots, index, slot_len, row) = (r.slots, r.index, r.slot_len, r.row);
        let g = &self.geo;
        let (n_q, d) = (g.num_q_heads(), g.head_dim);
        let stored = slots.len() / self.slot_elems();
        let logical = index.map_or(g.slots, <[u32]>::len);
        anyhow::ensure!(
            row < batch.rows && slot_len.len() == logical * g.num_kv_heads,
            "decode of row {row} of a {}-row batch over {logical} slots got {} slot lengths; \
             expected {}",
            batch.rows,
            slot_len.len(),
            logical * g.num_kv_heads
        );
        let w = n_q * d;
        let q = &batch.q[row * w..(row + 1) * w];
        let out = &mut batch.out[row * w..(row + 1) * w];
        let last = index.map_or(Some(logical.saturating_sub(1) as u32), |ix| {
            ix.iter().copied().max()
        });
        if let Some(bad) = last.filter(|&s| s as usize >= stored) {
            anyhow::bail!("decode reads slot {bad} of {stored}");
        }
        let per_head = g.group * d;
        let attended = logical * g.page_size;
        if attended * g.num_kv_heads >= PARALLEL_DECODE && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            out.par_chunks_mut(per_head)
                .zip(q.par_chunks(per_head))
                .enumerate()
                .for_each_init(AttnScratch::default, |sc, (h, (out, q))| {
                    self.decode_head(slots, (index, slot_len), h, (q, out), params, sc)
                });
            return Ok(());
        }
        for (h, (out, q)) in out.chunks_mut(per_head).zip(q.chunks(per_head)).enumerate() {
            self.decode_head(
                slots,
                (index, slot_len),
                h,
                (q, out),
                params,
                &mut scratch.attn,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::geo;

    #[test]
    fn moves_and_appends_land_token_major() {
        let g = geo();
        let ops = EmulatedDevice::<f32>::new(g);
        let mut host = HostTier::<f32>::try_new(g, 4).unwrap();
        for h in 0..3 {
            for t in 0..8 {
                let k: Vec<f32> = (0..4).map(|c| (h * 100 + t * 10 + c) as f32).collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                host.write_row(2, h, t, &k, &v);
            }
        }
        let mut slots = ops.alloc_slots(g.slots).unwrap();
        let moves: Vec<ChunkMove> = (0..3)
            .map(|h| ChunkMove {
                block: 2,
                head: h,
                slot: 1,
            })
            .collect();
        let mut worker = ops.alloc_scratch(Role::Worker);
        ops.move_chunks(&host, &mut slots, &moves, Some(&mut worker))
            .unwrap();
        for h in 0..3 {
            let (k, v, stride) = slot_rows(&g, &slots, 1, h);
            assert_eq!(stride, 12);
            for t in 0..8 {
                for c in 0..4 {
                    let want = (h * 100 + t * 10 + c) as f32;
                    assert_eq!(k[t * stride + c], want);
                    assert_eq!(v[t * stride + c], -want);
                    // The NHD layout itself: [slot][k/v][token][head][channel].
                    assert_eq!(slots[((2 * 8 + t) * 3 + h) * 4 + c], want);
                }
            }
        }
        // Slot 0 untouched; an append writes one token of every head.
        assert!(slots[..2 * 8 * 12].iter().all(|&x| x == 0.0));
        let k: Vec<f32> = (0..12).map(|i| i as f32 + 0.5).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        ops.append_token(&mut slots, 0, 3, NewToken::Host { k: &k, v: &v })
            .unwrap();
        for h in 0..3 {
            let (ks, vs, stride) = slot_rows(&g, &slots, 0, h);
            assert_eq!(&ks[3 * stride..3 * stride + 4], &k[h * 4..h * 4 + 4]);
            assert_eq!(&vs[3 * stride..3 * stride + 4], &v[h * 4..h * 4 + 4]);
        }
        let err = ops
            .append_token(&mut slots, 0, 8, NewToken::Host { k: &k, v: &v })
            .unwrap_err();
        assert!(err.to_string().contains("token 8"), "{err}");
    }
}
