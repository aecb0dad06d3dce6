//! One decode call on a CUDA device ([`CudaBatch`]): the engine's q, k and v read in place
//! from its candle tensors (device addresses; the tensors are held until the next call), the
//! output written by the decode kernels into a tensor candle allocated, and each row's decode
//! descriptor staged in pinned memory so that its upload is queued, not waited for.
//!
//! All of a batch's work runs on the engine's stream (candle's), so it is ordered with the
//! engine's own kernels without events: q, k and v are complete before the first decode reads
//! them, and the output is complete before the next candle operation reads it. The host's copy
//! of q, k and v ([`CudaStaged`]) is queued there too, and waited for by an event only when
//! the host reads it.

use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Storage, Tensor};
use cudarc::driver::{result, CudaContext, CudaStream, DevicePtr};
use half::{bf16, f16};

use super::kernels::{as_bytes, SeqDesc};
use super::mem::{DeviceBuffer, PinnedBuffer};
use super::recall::RawEvent;

/// Alignment of each staged part (bytes).
const ALIGN: usize = 16;

/// A decode call's tensors on the device and their addresses.
#[derive(Default)]
pub struct CudaBatch {
    /// q `(B, Hq, D)`, k and v `(B, Hkv, D)` in the KV dtype, contiguous; held so that queued
    /// kernels read live memory.
    pub(super) inputs: Option<[Tensor; 3]>,
    /// The output `(B, Hq, D)` in the KV dtype, zero until a decode writes a row.
    pub(super) out: Option<Tensor>,
    pub(super) rows: usize,
    /// Device addresses of q, k, v and the output.
    pub(super) q: u64,
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) out_ptr: u64,
    /// The rows' decode descriptors, staged for upload.
    arena: Option<DescArena>,
    /// The correction test's output, `[rows][n_kv]` cosines (f32) then as many flags (i32).
    pub(super) drift: Option<DeviceBuffer>,
}

/// Pinned host memory and its device twin for one call's decode descriptors (slot spans, a
/// dense layer's slot index, the [`SeqDesc`]): each row's part is written once and its copy
/// queued on the engine's stream; the next call reuses the memory once the copies are done.
struct DescArena {
    host: PinnedBuffer,
    dev: DeviceBuffer,
    used: usize,
    /// Recorded after each staged copy.
    done: RawEvent,
}

impl Drop for DescArena {
    fn drop(&mut self) {
        // Queued copies may still read the pinned memory.
        let _ = self.done.synchronize();
    }
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// One row of a decode launch as [`CudaBatch::stage_decode`] stages it.
#[derive(Clone, Copy)]
pub(super) struct StagedDecodeRow<'a> {
    /// `[n_slots][n_kv]` attended spans.
    pub lens: &'a [i32],
    /// A dense layer's stored slots.
    pub index: Option<&'a [u32]>,
    /// The row's descriptor (its `slot_len` and `slot_index` are set when staged).
    pub desc: SeqDesc,
}

impl CudaBatch {
    /// Starts a call: waits until the previous call's staged descriptor copies have run,
    /// before their memory is rewritten (in practice they have: that call was a whole step
    /// ago on this layer).
    pub(super) fn begin(&mut self) -> anyhow::Result<()> {
        if let Some(a) = &mut self.arena {
            a.done.synchronize()?;
            a.used = 0;
        }
        Ok(())
    }

    /// Stages the descriptors of one decode launch: each row's `lens` (`[n_slots][n_kv]`
    /// spans) and `index` (a dense layer's stored slots) go before the [`SeqDesc`] array, each
    /// descriptor pointed at its own; the upload is queued on `stream`. Returns the device
    /// address of the staged descriptor array.
    pub(super) fn stage_decode(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        rows: &[StagedDecodeRow<'_>],
    ) -> anyhow::Result<u64> {
        let mut offsets = Vec::with_capacity(rows.len());
        let mut total = 0;
        for &StagedDecodeRow { lens, index, .. } in rows {
            let lens_off = total;
            total += align(as_bytes(lens).len());
            let index_off = total;
            total += align(index.map_or(0, |ix| as_bytes(ix).len()));
            offsets.push((lens_off, index_off));
        }
        let desc_off = total;
        let desc_bytes = std::mem::size_of::<SeqDesc>();
        total += rows.len() * desc_bytes;
        let dev = self.stage(ctx, stream, total, |host, dev| {
            for (i, (&StagedDecodeRow { lens, index, desc }, &(lens_off, index_off))) in
                rows.iter().zip(&offsets).enumerate()
            {
                let lens_b = as_bytes(lens);
                host[lens_off..lens_off + lens_b.len()].copy_from_slice(lens_b);
                let mut desc = desc;
                desc.slot_len = dev + lens_off as u64;
                desc.slot_index = match index {
                    Some(ix) => {
                        let index_b = as_bytes(ix);
                        host[index_off..index_off + index_b.len()].copy_from_slice(index_b);
                        dev + index_off as u64
                    }
                    None => 0,
                };
                let at = desc_off + i * desc_bytes;
                host[at..at + desc_bytes].copy_from_slice(as_bytes(std::slice::from_ref(&desc)));
            }
        })?;
        Ok(dev + desc_off as u64)
    }

    /// Stages `addrs` (device addresses a kernel reads) like a decode descriptor. Returns the
    /// device address of the staged array.
    pub(super) fn stage_addresses(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        addrs: &[u64],
    ) -> anyhow::Result<u64> {
        let bytes = as_bytes(addrs);
        self.stage(ctx, stream, bytes.len(), |host, _| {
            host.copy_from_slice(bytes)
        })
    }

    /// Stages `total` bytes in the arena: `fill` writes them (given the device address they
    /// will have), then their upload is queued on `stream`. Returns that device address.
    fn stage(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        total: usize,
        fill: impl FnOnce(&mut [u8], u64),
    ) -> anyhow::Result<u64> {
        let arena = self.reserve(ctx, stream, total)?;
        let base = arena.used;
        let dev = arena.dev.ptr() + base as u64;
        let host = &mut arena.host.as_mut_slice()[base..base + total];
        fill(host, dev);
        // SAFETY: the pinned range is not rewritten before the call's `done` event (`begin`),
        // and the device range is this part's alone.
        unsafe {
            arena
                .dev
                .copy_from_host_async(base, &*host, stream.cu_stream())
        }?;
        // After every part, so that a call cut short by an error still guards its copies.
        arena.done.record(stream.cu_stream())?;
        arena.used = align(base + total);
        Ok(dev)
    }

    /// Device memory for the correction test's output of `n` (row, KV head) pairs, grown (after
    /// the stream has drained the last use) if needed.
    pub(super) fn drift_buffer(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        n: usize,
    ) -> anyhow::Result<&DeviceBuffer> {
        let bytes = 8 * n;
        if self.drift.as_ref().is_none_or(|b| b.bytes() < bytes) {
            if self.drift.is_some() {
                stream.synchronize()?;
            }
            self.drift = Some(DeviceBuffer::new(ctx, bytes.max(8 * 64))?);
        }
        Ok(self.drift.as_ref().expect("allocated above"))
    }

    /// Records the arena's event after the work queued on `stream` so far (the kernels that
    /// read the staged descriptors), so that neither reuse nor drop comes before them.
    pub(super) fn guard_descriptors(
        &self,
        stream: cudarc::driver::sys::CUstream,
    ) -> anyhow::Result<()> {
        match &self.arena {
            Some(a) => a.done.record(stream),
            None => Ok(()),
        }
    }

    /// The arena with `bytes` free, grown (after the stream has drained its copies) if needed.
    fn reserve(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        bytes: usize,
    ) -> anyhow::Result<&mut DescArena> {
        let fits = self
            .arena
            .as_ref()
            .is_some_and(|a| a.used + bytes <= a.host.bytes());
        if !fits {
            let cap = self.arena.as_ref().map_or(0, |a| a.host.bytes());
            let cap = (2 * cap).max(bytes * self.rows.max(1)).max(4096);
            if self.arena.is_some() {
                stream.synchronize()?;
            }
            self.arena = Some(DescArena {
                host: PinnedBuffer::new(ctx, cap)?,
                dev: DeviceBuffer::new(ctx, cap)?,
                used: 0,
                done: RawEvent::new(ctx)?,
            });
        }
        Ok(self.arena.as_mut().expect("allocated above"))
    }
}

/// The device address of the first element of a contiguous f16/bf16 CUDA tensor.
pub(super) fn tensor_ptr(t: &Tensor, stream: &CudaStream) -> anyhow::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        anyhow::bail!(
            "FreeKV's CUDA backend got a tensor on {:?}",
            t.device().location()
        );
    };
    anyhow::ensure!(
        layout.is_contiguous(),
        "a non-contiguous tensor read in place"
    );
    let (base, elem) = match t.dtype() {
        DType::F16 => (cuda.as_cuda_slice::<f16>()?.device_ptr(stream).0, 2),
        DType::BF16 => (cuda.as_cuda_slice::<bf16>()?.device_ptr(stream).0, 2),
        d => anyhow::bail!("FreeKV's CUDA kernels read f16 or bf16 tensors, got {d:?}"),
    };
    Ok(base + (layout.start_offset() * elem) as u64)
}

/// A decode call's q, k and v copied to pinned host memory on the engine's stream, behind the
/// work that produced them; `done` is recorded after the copies, and the host waits on it
/// only when it reads them.
pub struct CudaStaged {
    host: PinnedBuffer,
    done: RawEvent,
    /// Shapes of q, k and v and each one's byte offset in `host`.
    parts: [(Vec<usize>, usize); 3],
    dtype: DType,
}

impl Drop for CudaStaged {
    fn drop(&mut self) {
        // The copies may still write into the pinned memory.
        let _ = self.done.synchronize();
    }
}

impl CudaStaged {
    /// Queues the copies of `batch`'s inputs on `stream`, into `reuse`'s memory where it is
    /// large enough.
    pub(super) fn start(
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        batch: &CudaBatch,
        reuse: Option<CudaStaged>,
    ) -> anyhow::Result<Self> {
        let inputs = batch
            .inputs
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no decode batch is loaded"))?;
        let dtype = inputs[0].dtype();
        let elem = dtype.size_in_bytes();
        let mut offset = 0;
        let parts = [0, 1, 2].map(|i| {
            let at = offset;
            offset = align(offset + inputs[i].elem_count() * elem);
            (inputs[i].dims().to_vec(), at)
        });
        let mut staged = match reuse {
            Some(mut s) if s.host.bytes() >= offset => {
                // Its last copies are long done (read, or a step behind); never rewrite early.
                s.done.synchronize()?;
                s.parts = parts;
                s.dtype = dtype;
                s
            }
            _ => CudaStaged {
                host: PinnedBuffer::new(ctx, offset)?,
                done: RawEvent::new(ctx)?,
                parts,
                dtype,
            },
        };
        let src = [batch.q, batch.k, batch.v];
        let mut queued = Ok(());
        for (i, t) in inputs.iter().enumerate() {
            let (at, n) = (staged.parts[i].1, t.elem_count() * elem);
            let dst = &mut staged.host.as_mut_slice()[at..at + n];
            // SAFETY: `src[i]` is the live input tensor's contiguous storage (held by `batch`
            // until its next call, which comes after this copy in stream order); the pinned
            // range is not read or rewritten before `done` (read_staged, Drop, reuse).
            queued = unsafe { result::memcpy_dtoh_async(dst, src[i], stream.cu_stream()) };
            if queued.is_err() {
                break;
            }
        }
        // Recorded whether or not every copy was queued: dropping `staged` (on an error too)
        // waits for the copies that were, before the pinned memory is freed or reused.
        if let Err(e) = staged.done.record(stream.cu_stream()) {
            let _ = stream.synchronize();
            return Err(e.context("recording the end of a decode step's copy to host memory"));
        }
        queued.context("queueing the copy of a decode step's q, k and v to host memory")?;
        Ok(staged)
    }

    /// Waits for the copies and returns q, k and v as host tensors.
    pub(super) fn read(&self) -> anyhow::Result<[Tensor; 3]> {
        self.done.synchronize()?;
        let elem = self.dtype.size_in_bytes();
        let bytes = self.host.as_slice();
        let part = |i: usize| -> anyhow::Result<Tensor> {
            let (dims, at) = &self.parts[i];
            let n: usize = dims.iter().product();
            Ok(Tensor::from_raw_buffer(
                &bytes[*at..*at + n * elem],
                self.dtype,
                dims,
                &candle_core::Device::Cpu,
            )?)
        };
        Ok([part(0)?, part(1)?, part(2)?])
    }
}
