//! The correction test on a CUDA device: each (sequence, layer)'s stored query in device
//! memory ([`CudaQuery`], written on the engine's stream whenever the plan's is stored) and
//! one `freekv_correction` launch per decode call over the rows it tests, reading each row's
//! query in place from the engine's q. Only the similarities come back to the host: one copy
//! and one wait per call.

use std::sync::Arc;

use cudarc::driver::{result, CudaContext, CudaStream};

use crate::backend::cpu::elem::KvElem;
use crate::geometry::Geometry;

use super::batch::CudaBatch;
use super::kernels::{CorrectionLaunch, Kernels};
use super::mem::DeviceBuffer;
use super::recall::RawEvent;

/// One stored query, `[n_q][d]` in the KV dtype, in device memory.
pub struct CudaQuery<T> {
    buf: DeviceBuffer,
    /// The last upload's source (pageable: the driver stages it when the copy is queued; kept
    /// unchanged until the next upload all the same).
    host: Vec<T>,
    /// Recorded after the last upload: the buffer is freed only once it has run.
    written: RawEvent,
}

impl<T> Drop for CudaQuery<T> {
    fn drop(&mut self) {
        let _ = self.written.synchronize();
    }
}

/// Bytes of one stored query.
pub fn query_bytes(geo: &Geometry) -> usize {
    geo.num_q_heads() * geo.head_dim * 2
}

impl<T: KvElem> CudaQuery<T> {
    /// A zero query, zeroed on `stream` (where its uploads and correction tests are queued).
    pub fn new(
        ctx: &Arc<CudaContext>,
        geo: &Geometry,
        stream: &CudaStream,
    ) -> anyhow::Result<Self> {
        let q = Self {
            buf: DeviceBuffer::new(ctx, query_bytes(geo))?,
            host: Vec::new(),
            written: RawEvent::new(ctx)?,
        };
        q.buf.zero_async(stream.cu_stream())?;
        q.written.record(stream.cu_stream())?;
        Ok(q)
    }

    /// Queues the copy of `query` (f32, converted to the KV dtype) into the buffer on
    /// `stream`, before any later correction test there.
    pub fn upload(&mut self, query: &[f32], stream: &CudaStream) -> anyhow::Result<()> {
        anyhow::ensure!(
            2 * query.len() == self.buf.bytes(),
            "a {}-value query stored into {} bytes",
            query.len(),
            self.buf.bytes()
        );
        // The previous copy has run before its source is rewritten.
        self.written.synchronize()?;
        self.host.clear();
        self.host.resize(query.len(), T::default());
        T::from_f32s(query, &mut self.host);
        // SAFETY: `host` is not touched again before `written` (next upload, Drop).
        unsafe {
            self.buf
                .copy_from_host_async(0, &self.host, stream.cu_stream())
        }?;
        self.written.record(stream.cu_stream())
    }
}

/// The correction test of `batch`'s rows `rows` (row, its stored query) on `stream` (the
/// engine's, where the batch's q is produced): per KV head the group's mean cosine into
/// `out[i * n_kv + head]`, waited for.
pub fn similarities<T: KvElem>(
    ctx: &Arc<CudaContext>,
    stream: &CudaStream,
    kernels: &Kernels,
    geo: &Geometry,
    batch: &mut CudaBatch,
    rows: &[(usize, &CudaQuery<T>)],
    out: &mut [f32],
) -> anyhow::Result<()> {
    let n_kv = geo.num_kv_heads;
    let n = rows.len();
    anyhow::ensure!(
        out.len() == n * n_kv,
        "{} similarities for {n} rows",
        out.len()
    );
    if n == 0 {
        return Ok(());
    }
    let row_bytes = query_bytes(geo) as u64;
    let mut addrs = Vec::with_capacity(2 * n);
    for &(row, stored) in rows {
        anyhow::ensure!(
            row < batch.rows,
            "the correction test of row {row} of a {}-row batch",
            batch.rows
        );
        addrs.extend([batch.q + row as u64 * row_bytes, stored.buf.ptr()]);
    }
    let queries = batch.stage_addresses(ctx, stream, &addrs)?;
    let res = batch.drift_buffer(ctx, stream, n * n_kv)?.ptr();
    let flags = res + (4 * n * n_kv) as u64;
    // The flags are not read: the host decides with its own (possibly adapting) thresholds.
    let launch = CorrectionLaunch {
        queries,
        n_seq: n,
        n_kv,
        tau: 0.0,
        cos_out: res,
        flags,
    };
    kernels.correction(stream.cu_stream(), &launch)?;
    batch.guard_descriptors(stream.cu_stream())?;
    // SAFETY: `res` holds `n * n_kv` f32 written by the kernel above, in stream order; the
    // copy into pageable `out` returns once done (then the stream is synchronised anyway).
    unsafe { result::memcpy_dtoh_async(out, res, stream.cu_stream()) }?;
    stream.synchronize()?;
    Ok(())
}
