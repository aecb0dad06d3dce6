//! The device work of the CUDA [`Backend`](crate::backend::Backend): moving host-tier chunks into
//! slots (through the streamed [`RecallPipeline`]), appending a token to a window slot, and decode
//! attention over a working set with `freekv_decode_partial` / `freekv_decode_combine`.
//!
//! Every function here returns only once its device work has completed, so a backend call never
//! leaves queued work behind that a later call (possibly on another thread) could race with.

use std::sync::Arc;

use cudarc::driver::{result, CudaContext, CudaStream};

use crate::backend::cpu::elem::KvElem;
use crate::geometry::{Geometry, NO_PAGE};

use super::kernels::{as_bytes, Kernels};
use super::mem::DeviceBuffer;
use super::recall::{ChunkCopy, RawEvent, RecallMode, RecallPipeline};
use super::tier::{CudaDeviceTier, CudaScratch, DecodeBuffers};

/// One host-tier chunk (one KV head's K+V of one page, HND) bound for a slot.
#[derive(Clone, Copy, Debug)]
pub struct ChunkMove {
    /// Host address of the chunk (`2 p d` elements).
    pub host: *const u8,
    pub slot: usize,
    pub head: usize,
}

/// Copies `moves` into the slots of `tier` with the double-buffered pipeline and waits until
/// they have landed.
pub fn move_chunks<T: KvElem>(
    ctx: &Arc<CudaContext>,
    pipeline: &RecallPipeline,
    tier: &CudaDeviceTier<T>,
    moves: &[ChunkMove],
) -> anyhow::Result<()> {
    if moves.is_empty() {
        return Ok(());
    }
    let chunks: Vec<ChunkCopy> = moves
        .iter()
        .map(|m| ChunkCopy {
            host: m.host,
            slots: tier.gpu.slots.ptr(),
            slot_len: tier.gpu.slot_len.ptr(),
            slot: m.slot as i32,
            head: m.head as i32,
        })
        .collect();
    let done = Arc::new(RawEvent::new(ctx)?);
    // The host chunks are pageable memory borrowed for this call: the copy engines stage them,
    // and we wait for the request to finish before returning.
    let ticket = pipeline.submit(chunks, RecallMode::CopyEngine, None, done.clone());
    ticket.wait_enqueued()?;
    done.synchronize()
}

/// Writes one token's K and V rows of every head (`[n_kv][d]` each) at `token` of `slot`.
pub fn append_token<T: KvElem>(
    stream: &Arc<CudaStream>,
    tier: &CudaDeviceTier<T>,
    slot: usize,
    token: usize,
    k: &[T],
    v: &[T],
) -> anyhow::Result<()> {
    let shape = &tier.gpu.shape;
    let row_bytes = shape.n_kv * shape.head_dim * 2;
    anyhow::ensure!(
        std::mem::size_of::<T>() == 2 && k.len() * 2 == row_bytes && v.len() * 2 == row_bytes,
        "append of a {}-element row with {}-byte elements into a {row_bytes}-byte slot row",
        k.len(),
        std::mem::size_of::<T>()
    );
    // NHD: token `token`'s K rows of all heads are one contiguous run, its V rows another.
    let k_off = (slot * 2 * shape.page_size + token) * row_bytes;
    let v_off = ((slot * 2 + 1) * shape.page_size + token) * row_bytes;
    let s = stream.cu_stream();
    // SAFETY: `k`/`v` outlive the copies: the stream is synchronized before returning.
    unsafe {
        tier.gpu.slots.copy_from_host_async(k_off, k, s)?;
        tier.gpu.slots.copy_from_host_async(v_off, v, s)?;
    }
    stream.synchronize()?;
    Ok(())
}

/// Decode attention of one query (`q`: `[n_q][d]` f32) over the working set of a sequence of `len`
/// tokens, `out`: `[n_q][d]` f32. Slots whose page is [`NO_PAGE`] are empty; every other slot
/// holds `valid_tokens(page, len)` tokens for its head (the table decides, as on CPU).
#[allow(clippy::too_many_arguments)]
pub fn decode<T: KvElem>(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    geo: &Geometry,
    sm_count: usize,
    tier: &CudaDeviceTier<T>,
    len: usize,
    q: &[f32],
    scale: f32,
    softcap: f32,
    scratch: &mut CudaScratch<T>,
) -> anyhow::Result<()> {
    let (n_kv, n_q, d) = (geo.num_kv_heads, geo.num_q_heads(), geo.head_dim);
    anyhow::ensure!(
        q.len() == n_q * d,
        "decode query has {} values, expected {}",
        q.len(),
        n_q * d
    );
    if scratch.decode.is_none() {
        scratch.decode = Some(DecodeBuffers::new(ctx, geo, sm_count)?);
    }
    let CudaScratch {
        decode: Some(bufs),
        slot_len,
        rows,
        out,
        ..
    } = scratch
    else {
        unreachable!("decode buffers were allocated above")
    };
    // The valid-token table, from the slot tables (the scatter kernel's own marks are ignored).
    slot_len.clear();
    slot_len.resize(geo.slots * n_kv, 0);
    for h in 0..n_kv {
        for (slot, &page) in tier.tables.slots(h).iter().enumerate() {
            if page != NO_PAGE {
                slot_len[slot * n_kv + h] = geo.valid_tokens(page as usize, len) as i32;
            }
        }
    }
    rows.clear();
    rows.resize(n_q * d, T::default());
    T::from_f32s(q, rows);
    let desc = [tier.desc()];
    let s = stream.cu_stream();
    // SAFETY: the host slices live until the stream is synchronized below.
    unsafe {
        tier.gpu.slot_len.copy_from_host_async(0, slot_len, s)?;
        bufs.q.copy_from_host_async(0, rows, s)?;
        bufs.desc.copy_from_host_async(0, as_bytes(&desc), s)?;
    }
    kernels.decode(
        s,
        bufs.q.ptr(),
        (n_q * d) as i64,
        bufs.desc.ptr(),
        1,
        n_kv,
        geo.slots,
        bufs.slots_per_chunk,
        bufs.part_o.ptr(),
        bufs.part_ml.ptr(),
        bufs.out.ptr(),
        (n_q * d) as i64,
        scale,
        softcap,
    )?;
    download(&bufs.out, rows, stream)?;
    out.clear();
    out.resize(n_q * d, 0.0);
    T::to_f32s(rows, out);
    Ok(())
}

/// Copies the start of `src` into `dst` on `stream` and waits for it.
fn download<T>(src: &DeviceBuffer, dst: &mut [T], stream: &Arc<CudaStream>) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::mem::size_of_val(dst) <= src.bytes(),
        "download of {} bytes from a {}-byte buffer",
        std::mem::size_of_val(dst),
        src.bytes()
    );
    // SAFETY: bounds checked above; `dst` is borrowed until the stream is synchronized.
    unsafe { result::memcpy_dtoh_async(dst, src.ptr(), stream.cu_stream()) }?;
    stream.synchronize()?;
    Ok(())
}
