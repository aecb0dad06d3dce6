//! Double-buffered streamed recall: host HND chunks -> device NHD slots, issued by a worker thread.
//!
//! Two copy streams, each with its own device staging buffer and pinned job table. A request's
//! chunks are cut into groups of at most `chunks_per_buffer`; group j goes to buffer j % 2: the
//! copy engine fills staging buffer A (one `cuMemcpyHtoDAsync` per run of host-contiguous chunks)
//! while `freekv_recall_scatter` spreads buffer B (group j-1) into the slots on the other stream.
//! A buffer is reused only after the host has seen its previous group's event.
//!
//! The pipeline's thread, not its caller, issues the copies: the caller hands over a request
//! (with the events its copies must wait for on the device first: "the slots' last reader has
//! run", "the slots' previous move has landed") and waits only until it is enqueued
//! ([`Ticket::wait_enqueued`]), not for the copies. The request's `done` event is recorded after
//! its last scatter; whatever reads or writes the slots next on the engine's stream waits on it
//! there (`cuStreamWaitEvent`), so no host thread waits for a recall's copies, a corrected head's
//! on the critical path included (a request larger than both staging buffers waits, while it is
//! enqueued, for the groups that reuse them).

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::kernels::{as_bytes, Kernels, RecallJob};
use super::mem::{DeviceBuffer, PinnedBuffer};

/// A CUDA event owned by us (timing disabled: cheapest to record and wait on).
pub struct RawEvent(sys::CUevent);

// SAFETY: CUDA events may be used from any thread of the process.
unsafe impl Send for RawEvent {}
unsafe impl Sync for RawEvent {}

impl RawEvent {
    /// Creates an event in `ctx` with timing disabled.
    pub fn new(ctx: &Arc<CudaContext>) -> anyhow::Result<Self> {
        ctx.bind_to_thread()?;
        Ok(Self(result::event::create(
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
        )?))
    }
    /// The raw event handle.
    pub fn raw(&self) -> sys::CUevent {
        self.0
    }
    /// Records the event on `stream`.
    pub fn record(&self, stream: sys::CUstream) -> anyhow::Result<()> {
        // SAFETY: valid event and stream.
        unsafe { result::event::record(self.0, stream) }?;
        Ok(())
    }
    /// Makes `stream` wait (on the device) for the last record of this event.
    pub fn wait_on(&self, stream: sys::CUstream) -> anyhow::Result<()> {
        // SAFETY: valid event and stream.
        unsafe {
            result::stream::wait_event(
                stream,
                self.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }?;
        Ok(())
    }
    /// Blocks the calling thread until the last record of this event has completed.
    pub fn synchronize(&self) -> anyhow::Result<()> {
        // SAFETY: valid event.
        unsafe { result::event::synchronize(self.0) }?;
        Ok(())
    }
}

impl Drop for RawEvent {
    fn drop(&mut self) {
        // SAFETY: we own the event.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// What a request moved, reported once its work is enqueued.
#[derive(Clone, Copy, Debug, Default)]
pub struct PipelineStats {
    /// Chunks moved.
    pub chunks: usize,
    /// Bytes copied from the host into the staging buffers.
    pub bytes: usize,
    /// Host->device copy calls issued (runs of host-contiguous chunks are merged).
    pub copy_calls: usize,
    /// Staging groups issued (at most `chunks_per_buffer` chunks each).
    pub groups: usize,
}

/// The jobs of a request: `src` is the host address of each chunk (HND, `chunk_bytes` long, in
/// memory that stays valid until `done` has fired), rewritten to its staging offset for the copy engines.
struct Request {
    chunks: Vec<RecallJob>,
    waits: Vec<Arc<RawEvent>>,
    done: Vec<Arc<RawEvent>>,
    reply: mpsc::Sender<anyhow::Result<PipelineStats>>,
}

/// Handle of a submitted request.
pub struct Ticket(mpsc::Receiver<anyhow::Result<PipelineStats>>);

impl Ticket {
    /// Blocks until the worker has enqueued all of the request's work and recorded its `done`
    /// event (not until the copies have run).
    pub fn wait_enqueued(self) -> anyhow::Result<PipelineStats> {
        self.0
            .recv()
            .map_err(|_| anyhow::anyhow!("the recall worker thread has stopped"))?
    }
}

struct Buffers {
    stream: Arc<CudaStream>,
    staging: DeviceBuffer,
    jobs_dev: DeviceBuffer,
    jobs_host: PinnedBuffer,
    reusable: RawEvent,
}

/// The recall pipeline (one per device).
pub struct RecallPipeline {
    tx: Option<mpsc::Sender<Request>>,
    worker: Option<JoinHandle<()>>,
    /// Bytes of one chunk (one page of one KV head, keys and values).
    pub chunk_bytes: usize,
    /// Chunks each staging buffer holds.
    pub chunks_per_buffer: usize,
}

impl RecallPipeline {
    /// Starts the worker thread with two copy streams, each with a staging buffer of
    /// `chunks_per_buffer` chunks of `chunk_bytes` bytes; `n_kv` is the KV heads of the slots.
    pub fn new(
        ctx: &Arc<CudaContext>,
        kernels: Arc<Kernels>,
        chunk_bytes: usize,
        chunks_per_buffer: usize,
        n_kv: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(chunks_per_buffer > 0, "chunks_per_buffer must be > 0");
        let mk = || -> anyhow::Result<Buffers> {
            Ok(Buffers {
                stream: ctx.new_stream()?,
                staging: DeviceBuffer::new(ctx, chunk_bytes * chunks_per_buffer)?,
                jobs_dev: DeviceBuffer::new(
                    ctx,
                    chunks_per_buffer * std::mem::size_of::<RecallJob>(),
                )?,
                jobs_host: PinnedBuffer::new(
                    ctx,
                    chunks_per_buffer * std::mem::size_of::<RecallJob>(),
                )?,
                reusable: RawEvent::new(ctx)?,
            })
        };
        let mut worker = Worker {
            kernels,
            bufs: [mk()?, mk()?],
            next: 0,
            chunk_bytes,
            per_buffer: chunks_per_buffer,
            elem_bytes: 2,
            n_kv,
        };
        let (tx, rx) = mpsc::channel::<Request>();
        let ctx2 = ctx.clone();
        let thread = std::thread::Builder::new()
            .name("freekv-recall".into())
            .spawn(move || {
                if let Err(e) = ctx2.bind_to_thread() {
                    for r in rx {
                        let _ = r.reply.send(Err(anyhow::anyhow!(
                            "recall worker could not bind the CUDA context: {e:?}"
                        )));
                    }
                    return;
                }
                for req in rx {
                    let r = worker.run(&req);
                    if r.is_err() {
                        // Part of the request may be queued without its `done` record: let it
                        // finish before anything else touches the slots or the host chunks.
                        for b in &worker.bufs {
                            let _ = b.stream.synchronize();
                        }
                    }
                    let _ = req.reply.send(r);
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            worker: Some(thread),
            chunk_bytes,
            chunks_per_buffer,
        })
    }

    /// Hands `chunks` to the worker (each job's `src`: the chunk's host address, in memory
    /// that stays allocated and registered until `done` has fired; its `slots`: any slot set's).
    /// `waits`: events the copies must wait for on the device (their last records at this
    /// call). Each event of `done` is recorded once everything has landed in the slots.
    pub fn submit(
        &self,
        chunks: Vec<RecallJob>,
        waits: Vec<Arc<RawEvent>>,
        done: Vec<Arc<RawEvent>>,
    ) -> Ticket {
        let (reply, rx) = mpsc::channel();
        let req = Request {
            chunks,
            waits,
            done,
            reply,
        };
        if let Some(tx) = &self.tx {
            if let Err(mpsc::SendError(req)) = tx.send(req) {
                let _ = req
                    .reply
                    .send(Err(anyhow::anyhow!("the recall worker thread has stopped")));
            }
        }
        Ticket(rx)
    }
}

impl Drop for RecallPipeline {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The worker thread's state: the kernels, both staging buffers and which one is next.
struct Worker {
    kernels: Arc<Kernels>,
    bufs: [Buffers; 2],
    /// The staging buffer the next group of chunks uses.
    next: usize,
    /// Bytes of one chunk.
    chunk_bytes: usize,
    /// Chunks each staging buffer holds.
    per_buffer: usize,
    /// Bytes of one element (16-bit KV).
    elem_bytes: usize,
    /// KV heads of the destination slots.
    n_kv: usize,
}

impl Worker {
    /// Queues one request's copies and scatters on the two copy streams, alternating buffers
    /// per group of chunks, and records its `done` event.
    fn run(&mut self, req: &Request) -> anyhow::Result<PipelineStats> {
        let Self {
            kernels,
            bufs,
            next,
            chunk_bytes,
            per_buffer,
            elem_bytes,
            n_kv,
        } = self;
        let (chunk_bytes, per_buffer, elem_bytes, n_kv) =
            (*chunk_bytes, *per_buffer, *elem_bytes, *n_kv);
        let mut stats = PipelineStats {
            chunks: req.chunks.len(),
            ..Default::default()
        };
        let mut used = [false, false];
        for group in req.chunks.chunks(per_buffer) {
            let b = *next;
            *next ^= 1;
            let buf = &mut bufs[b];
            let stream = buf.stream.cu_stream();
            // The job table and staging buffer of `b` may still be read by its previous group.
            buf.reusable.synchronize()?;
            if !used[b] {
                for w in &req.waits {
                    w.wait_on(stream)?;
                }
                used[b] = true;
            }
            let chunk_elems = (chunk_bytes / elem_bytes) as u64;
            let jobs: Vec<RecallJob> = group
                .iter()
                .enumerate()
                .map(|(i, c)| RecallJob {
                    src: i as u64 * chunk_elems,
                    ..*c
                })
                .collect();
            let bytes = as_bytes(&jobs);
            buf.jobs_host.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
            // SAFETY: the pinned job table stays untouched until `reusable` fires (checked above).
            unsafe {
                result::memcpy_htod_async(
                    buf.jobs_dev.ptr(),
                    &buf.jobs_host.as_slice()[..bytes.len()],
                    stream,
                )
            }?;
            // Merge runs of chunks that are contiguous on the host (same page, next head).
            let mut i = 0;
            while i < group.len() {
                let mut j = i + 1;
                while j < group.len() && group[j].src == group[j - 1].src + chunk_bytes as u64 {
                    j += 1;
                }
                let n = (j - i) * chunk_bytes;
                // SAFETY: the run lies in host memory valid until `done` fires (`submit`); the
                // destination lies inside staging.
                let src = unsafe { std::slice::from_raw_parts(group[i].src as *const u8, n) };
                unsafe {
                    result::memcpy_htod_async(
                        buf.staging.ptr() + (i * chunk_bytes) as u64,
                        src,
                        stream,
                    )
                }?;
                stats.copy_calls += 1;
                i = j;
            }
            kernels.recall_scatter(
                stream,
                buf.staging.ptr(),
                buf.jobs_dev.ptr(),
                group.len(),
                n_kv,
            )?;
            buf.reusable.record(stream)?;
            stats.bytes += group.len() * chunk_bytes;
            stats.groups += 1;
        }
        // The `done` events mark the whole request: join the other stream into the last used
        // one.
        let s0 = bufs[0].stream.cu_stream();
        let last = match used {
            [true, true] => {
                bufs[1].reusable.wait_on(s0)?;
                s0
            }
            [false, true] => bufs[1].stream.cu_stream(),
            [true, false] => s0,
            [false, false] => {
                for w in &req.waits {
                    w.wait_on(s0)?;
                }
                s0
            }
        };
        for done in &req.done {
            done.record(last)?;
        }
        Ok(stats)
    }
}
