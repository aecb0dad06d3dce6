//! The [`Backend`] methods of [`CudaBackend`]: host-side work delegated to the CPU backend,
//! device work through [`ops`].

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::backend::{Backend, RecallStats, Role};
use crate::geometry::{Geometry, NO_PAGE};
use crate::AttnParams;

use super::super::ops::{self, ChunkMove};
use super::super::tier::{layer_tier_bytes, tier_shape, CudaBatch, CudaDeviceTier, CudaScratch};
use super::CudaBackend;
use anyhow::Context;

impl<T: KvElem> Backend for CudaBackend<T> {
    type HostTier = HostTier<T>;
    type DeviceTier = CudaDeviceTier<T>;
    type Scratch = CudaScratch<T>;
    type Batch = CudaBatch;

    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn alloc_host_tier(&self, num_blocks: usize) -> anyhow::Result<HostTier<T>> {
        self.cpu.alloc_host_tier(num_blocks)
    }

    fn alloc_device_tier(&self) -> anyhow::Result<CudaDeviceTier<T>> {
        self.bind()?;
        CudaDeviceTier::new(&self.ctx, self.geo).context("allocating a device tier")
    }

    fn alloc_scratch(&self, role: Role) -> CudaScratch<T> {
        CudaScratch {
            cpu: self.cpu.alloc_scratch(role),
            decode: None,
            slot_len: Vec::new(),
            rows: Vec::new(),
            out: Vec::new(),
        }
    }

    fn alloc_batch(&self) -> CudaBatch {
        CudaBatch::default()
    }

    fn host_tier_bytes(&self, num_blocks: usize) -> usize {
        self.cpu.host_tier_bytes(num_blocks)
    }

    fn device_tier_bytes(&self) -> usize {
        self.cpu.device_tier_bytes() + layer_tier_bytes(&tier_shape(&self.geo))
    }

    fn load_decode(
        &self,
        batch: &mut CudaBatch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> anyhow::Result<()> {
        let (q, k, v) = (
            q.to_device(&Device::Cpu)?,
            k.to_device(&Device::Cpu)?,
            v.to_device(&Device::Cpu)?,
        );
        self.cpu.load_decode(&mut batch.cpu, &q, &k, &v)
    }

    fn load_prefill(
        &self,
        batch: &mut CudaBatch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        last_only: Option<&[usize]>,
    ) -> anyhow::Result<()> {
        let (q, k, v) = (
            q.to_device(&Device::Cpu)?,
            k.to_device(&Device::Cpu)?,
            v.to_device(&Device::Cpu)?,
        );
        self.cpu.load_prefill(&mut batch.cpu, &q, &k, &v, last_only)
    }

    fn take_output(&self, batch: &mut CudaBatch, dtype: DType) -> anyhow::Result<Tensor> {
        Ok(self
            .cpu
            .take_output(&mut batch.cpu, dtype)?
            .to_device(&self.device)?)
    }

    fn write_tokens(
        &self,
        host: &mut HostTier<T>,
        table: &[u32],
        batch: &CudaBatch,
        row: usize,
        first_pos: usize,
        n: usize,
        scratch: &mut CudaScratch<T>,
    ) -> anyhow::Result<()> {
        self.cpu
            .write_tokens(host, table, &batch.cpu, row, first_pos, n, &mut scratch.cpu)
    }

    fn ensure_summaries(
        &self,
        host: &mut HostTier<T>,
        table: &[u32],
        full_pages: usize,
        scratch: &mut CudaScratch<T>,
    ) -> anyhow::Result<usize> {
        self.cpu
            .ensure_summaries(host, table, full_pages, &mut scratch.cpu)
    }

    fn reset_working_set(
        &self,
        host: &HostTier<T>,
        table: &[u32],
        dev: &mut CudaDeviceTier<T>,
        len: usize,
    ) -> anyhow::Result<RecallStats> {
        let g = &self.geo;
        let mut stats = self
            .cpu
            .reset_working_set(host, table, &mut dev.tables, len)?;
        let mut moves = Vec::new();
        for h in 0..g.num_kv_heads {
            for (slot, &page) in dev.tables.slots(h).iter().enumerate() {
                if page == NO_PAGE {
                    continue;
                }
                let page = page as usize;
                moves.push(ChunkMove {
                    host: host.chunk(table[page], h).as_ptr() as *const u8,
                    slot,
                    head: h,
                });
                // As the CPU copy tier counts: the page's valid tokens.
                stats.bytes +=
                    2 * g.valid_tokens(page, len) * g.head_dim * std::mem::size_of::<T>();
            }
        }
        self.bind()?;
        ops::move_chunks(&self.ctx, &self.pipeline, dev, &moves)
            .context("installing the sink and window pages")?;
        Ok(stats)
    }

    fn advance_window(
        &self,
        table: &[u32],
        dev: &mut CudaDeviceTier<T>,
        len: usize,
        batch: &CudaBatch,
        row: usize,
    ) -> anyhow::Result<()> {
        let g = &self.geo;
        self.cpu
            .advance_window(table, &mut dev.tables, len, &batch.cpu, row)?;
        let pos = len - 1;
        let slot = g.window_slot(pos / g.page_size);
        let width = g.num_kv_heads * g.head_dim;
        let mut k = vec![T::default(); width];
        let mut v = vec![T::default(); width];
        for h in 0..g.num_kv_heads {
            let (kr, vr) = batch.cpu.kv_row(row, h, 0);
            let r = h * g.head_dim..(h + 1) * g.head_dim;
            T::from_f32s(kr, &mut k[r.clone()]);
            T::from_f32s(vr, &mut v[r]);
        }
        self.bind()?;
        ops::append_token(&self.stream, dev, slot, pos % g.page_size, &k, &v)
            .context("appending the new token to its window slot")
    }

    fn store_query(
        &self,
        dev: &mut CudaDeviceTier<T>,
        batch: &CudaBatch,
        row: usize,
        token: usize,
    ) -> anyhow::Result<()> {
        self.cpu
            .store_query(&mut dev.tables, &batch.cpu, row, token)
    }

    fn query_similarity(
        &self,
        dev: &CudaDeviceTier<T>,
        batch: &CudaBatch,
        row: usize,
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        self.cpu.query_similarity(&dev.tables, &batch.cpu, row, out)
    }

    fn select(
        &self,
        host: &HostTier<T>,
        table: &[u32],
        dev: &mut CudaDeviceTier<T>,
        candidates: Range<usize>,
        heads: &[bool],
        scratch: &mut CudaScratch<T>,
    ) -> anyhow::Result<()> {
        self.cpu.select(
            host,
            table,
            &mut dev.tables,
            candidates,
            heads,
            &mut scratch.cpu,
        )
    }

    fn recall(
        &self,
        host: &HostTier<T>,
        table: &[u32],
        dev: &mut CudaDeviceTier<T>,
        heads: &[bool],
        scratch: &mut CudaScratch<T>,
    ) -> anyhow::Result<RecallStats> {
        let g = &self.geo;
        let mut moves = Vec::new();
        for h in (0..g.num_kv_heads).filter(|&h| heads[h]) {
            for e in dev.tables.plan(h) {
                if e.page != NO_PAGE {
                    moves.push(ChunkMove {
                        host: host.chunk(table[e.page as usize], h).as_ptr() as *const u8,
                        slot: e.slot as usize,
                        head: h,
                    });
                }
            }
        }
        self.bind()?;
        ops::move_chunks(&self.ctx, &self.pipeline, dev, &moves)
            .context("recalling the selected pages")?;
        // The tables follow the data (and the plans are consumed), as on CPU.
        let mut stats = self
            .cpu
            .recall(host, table, &mut dev.tables, heads, &mut scratch.cpu)?;
        debug_assert_eq!(stats.pages, moves.len());
        stats.bytes = stats.pages * self.chunk_bytes();
        Ok(stats)
    }

    fn resident_pages(
        &self,
        dev: &CudaDeviceTier<T>,
        head: usize,
        len: usize,
    ) -> anyhow::Result<Vec<u32>> {
        self.cpu.resident_pages(&dev.tables, head, len)
    }

    fn attend_decode(
        &self,
        host: &HostTier<T>,
        table: &[u32],
        len: usize,
        dev: Option<&CudaDeviceTier<T>>,
        batch: &mut CudaBatch,
        row: usize,
        params: &AttnParams,
        scratch: &mut CudaScratch<T>,
    ) -> anyhow::Result<()> {
        let dev = match dev {
            Some(dev) if Self::decode_on_device(params) => dev,
            // Host tier (dense) or host chunks named by the tables (sliding window).
            other => {
                return self.cpu.attend_decode(
                    host,
                    table,
                    len,
                    other.map(|d| &d.tables),
                    &mut batch.cpu,
                    row,
                    params,
                    &mut scratch.cpu,
                )
            }
        };
        let n_q = self.geo.num_q_heads();
        let d = self.geo.head_dim;
        let q = batch.cpu.q_heads(row, 0..n_q).to_vec();
        self.bind()?;
        ops::decode(
            &self.ctx,
            &self.stream,
            &self.kernels,
            &self.geo,
            self.sm_count,
            dev,
            len,
            &q,
            params.softmax_scale,
            params.softcap.unwrap_or(0.0),
            scratch,
        )
        .context("decode attention over the working set")?;
        for h in 0..n_q {
            batch
                .cpu
                .out_row(row, h, 0)
                .copy_from_slice(&scratch.out[h * d..(h + 1) * d]);
        }
        Ok(())
    }

    fn attend_prefill(
        &self,
        host: &HostTier<T>,
        table: &[u32],
        cached_len: usize,
        new_len: usize,
        batch: &mut CudaBatch,
        row: usize,
        params: &AttnParams,
        scratch: &mut CudaScratch<T>,
    ) -> anyhow::Result<()> {
        self.cpu.attend_prefill(
            host,
            table,
            cached_len,
            new_len,
            &mut batch.cpu,
            row,
            params,
            &mut scratch.cpu,
        )
    }
}
