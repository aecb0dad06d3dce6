//! One FreeKV instance over a backend: per-layer state behind per-layer locks, and the
//! background workers that run the speculative selections.
//!
//! Threading: the engine calls a layer's prefill/decode from its thread; each call locks that
//! layer only. A decode step that scheduled background work marks the layer pending and sends
//! its index to the workers (`workers` threads sharing one queue); the one that takes it locks
//! the layer, runs
//! [`background::background_selection`] and clears the mark. Every call that touches a layer
//! first joins its pending work (waits for the mark to clear), so the next step's attention
//! always sees the recalled pages, and then completes the host-tier writes the backend left
//! from the layer's last step (`Backend::settle`; the worker does so first too). A worker holds
//! one layer at a time, so a layer's work runs in order; the calling thread meanwhile works on
//! the other layers (that is the overlap), and layers queued behind each other go to the idle
//! workers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::Tensor;

use crate::backend::{Backend, Inputs, Role};
use crate::background;
use crate::correction::Threshold;
use crate::counters::{Counters, LayerCounters};
use crate::geometry::Geometry;
use crate::plan::SlotPlan;
use crate::probe::{self, LayerProbe, ProbeReport, ProbeSpec};
use crate::state::{LayerState, StepTrace};
use crate::timeline::{self, LayerCtx};
use crate::{prefill, AttnParams, DecodeRow, FreeKvConfig, ModelShape, Policy, PrefillRow, Qkv};

/// FreeKV's operations on one loaded model, whatever its backend and dtype: what the engine
/// glue calls on a [`FreeKv`](crate::FreeKv), which dereferences to this.
pub trait AnyInstance: Send + Sync {
    /// A prompt batch on one layer, `qkv` of shape `(B, H, Lmax, D)`. Writes every
    /// new token to the host tier (and the summaries of pages that became full), builds the
    /// sequence's state on this layer (replacing any earlier one) and makes the first
    /// selection with the last prompt query. With `want_output`, returns the causal attention
    /// output `(B, Hq, Lmax, D)` in q's dtype (new queries attend over cached + new keys;
    /// padding positions hold zeros); otherwise `None`.
    fn prefill(
        &self,
        layer: usize,
        rows: &[PrefillRow<'_>],
        qkv: Qkv<'_>,
        params: &AttnParams,
        want_output: bool,
    ) -> anyhow::Result<Option<Tensor>>;
    /// One decode step of one layer, `qkv` of shape `(B, H, D)`; returns `(B, Hq, D)` in q's
    /// dtype. A row whose sequence has no state on this layer is an error naming it; a
    /// row whose `context_len` is not the state's length + 1 (the engine trimmed or re-fed the
    /// sequence) rebuilds the state from the host tier (blocking selection).
    fn decode(
        &self,
        layer: usize,
        rows: &[DecodeRow<'_>],
        qkv: Qkv<'_>,
        params: &AttnParams,
    ) -> anyhow::Result<Tensor>;
    /// Drops all state of a sequence (every layer) and returns what FreeKV did for it since
    /// its prefill, summed over layers (None for an unknown id, which is a no-op). Its blocks
    /// stay in the host tier until the engine reuses them.
    fn free_sequence(&self, seq_id: u64) -> Option<LayerCounters>;
    /// Sequences that have FreeKV state on some layer (0 when the engine is idle).
    fn live_sequences(&self) -> usize;
    /// Counters per layer and in total.
    fn counters(&self) -> Counters;
    /// Bytes of the host tier, all layers (KV pages and summaries; committed lazily).
    fn host_tier_bytes(&self) -> usize;
    /// Bytes of one sequence's device tier over all sparse layers (O(budget)).
    fn device_tier_bytes_per_sequence(&self) -> usize;
    /// Bytes the device keeps for the whole pool, over all layers, whatever the sequences (its
    /// mirror of the sparse layers' page summaries and the dense layers' pages; 0 on the CPU
    /// in place).
    fn device_pool_bytes(&self) -> usize;
    /// Decode calls (of any layer) that waited for their own device work before returning:
    /// the host synchronisations on the decode critical path (0 without a device).
    fn device_waits(&self) -> u64;
    /// Layers whose host tier the device could not page-lock (their recalls copy from
    /// pageable memory, more slowly); 0 without a device.
    fn unpinned_host_tiers(&self) -> u64;
    /// Turns per-step traces on or off (for tests and debugging; off by default).
    fn set_tracing(&self, on: bool);
    /// What the last decode step of `seq_id` on `layer` did (with tracing on).
    fn step_trace(&self, layer: usize, seq_id: u64) -> Option<StepTrace>;
    /// The pages each KV head of `seq_id` will attend over at its next step on `layer`
    /// (after the background work; `None` while the sequence attends densely).
    fn resident_pages(&self, layer: usize, seq_id: u64) -> Option<Vec<Vec<u32>>>;
    /// Per KV head of `seq_id` on `layer`, the margin of the selection behind its
    /// [resident pages](AnyInstance::resident_pages): how far its last selected page scored
    /// above the best page left out, relative to their magnitude (0 at a tie, +inf when every
    /// candidate was selected). Two backends whose scores round differently may select
    /// differently only where it is that small.
    fn selection_margins(&self, layer: usize, seq_id: u64) -> Option<Vec<f32>>;
    /// Waits for all background work (e.g. before measuring or tearing down).
    fn join_background(&self) -> anyhow::Result<()>;
    /// The mode and selector in force.
    fn policy(&self) -> Policy;
    /// Switches the mode, selector and shortlist once the background work queued so far is
    /// done. Meant for the time between requests (evaluations that answer one prompt under
    /// several policies): a sequence in flight continues under the new policy from each
    /// layer's next call (a dense step forgets its selection, a first sparse step selects for
    /// every head), so one forward pass may mix them. An error names a policy the instance was
    /// not built for (see [`Policy::check`]).
    fn set_policy(&self, policy: Policy) -> anyhow::Result<()>;
    /// Starts measuring selection on every decode step (see [`crate::probe`]), or stops
    /// (`None`); what was measured before is dropped. An error names an estimator or split
    /// this instance cannot measure. The probe reads every key of a probed context at every
    /// step (and, on a device, waits for the step's values): a diagnostic.
    fn set_probe(&self, spec: Option<ProbeSpec>) -> anyhow::Result<()>;
    /// What the probe measured since it was set or last taken (empty without a probe),
    /// with the failures that stopped it on some layer.
    fn take_probe(&self) -> ProbeReport;
}

/// Whether a layer's background work is outstanding, and how the last one ended.
#[derive(Default)]
struct JobStatus {
    pending: bool,
    failure: Option<String>,
}

/// One layer: its state and its background-work status.
struct LayerCell<B: Backend> {
    state: Mutex<LayerState<B>>,
    job: Mutex<JobStatus>,
    done: Condvar,
}

/// What the calling thread and the worker share.
struct Shared<B: Backend> {
    backend: B,
    config: FreeKvConfig,
    policy: RwLock<Policy>,
    geo: Geometry,
    num_blocks: usize,
    layers: Vec<LayerCell<B>>,
    tracing: AtomicBool,
}

impl<B: Backend> Shared<B> {
    fn ctx(&self, layer: usize) -> LayerCtx<'_, B> {
        let policy = *self.policy.read().unwrap_or_else(|e| e.into_inner());
        LayerCtx {
            backend: &self.backend,
            config: &self.config,
            policy,
            geo: self.geo,
            layer,
            dense_layer: policy.dense_layer(&self.config, layer),
            num_blocks: self.num_blocks,
            tracing: self.tracing.load(Ordering::Relaxed),
        }
    }
}

/// An error of one call, with the call and its layer in its message (once), so that its
/// `Display` alone says everything.
fn in_layer(e: anyhow::Error, call: &str, layer: usize) -> anyhow::Error {
    let msg = format!("{e:#}");
    let named = format!("layer {layer}");
    match msg.strip_prefix(&named) {
        Some(rest) => anyhow::anyhow!("{call} of {named}{rest}"),
        None => anyhow::anyhow!("{call} of {named}: {msg}"),
    }
}

fn lock_status(cell: &Mutex<JobStatus>) -> MutexGuard<'_, JobStatus> {
    // The status is two plain fields updated together; a panic cannot leave it half-written.
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

/// A FreeKV instance over backend `B`.
pub struct Instance<B: Backend> {
    shared: Arc<Shared<B>>,
    jobs: Option<Sender<usize>>,
    workers: Vec<JoinHandle<()>>,
}

impl<B: Backend> Instance<B> {
    /// Layers that retrieve (not dense).
    fn sparse_layers(&self) -> usize {
        (0..self.shared.layers.len())
            .filter(|&l| !self.shared.config.is_dense_layer(l))
            .count()
    }

    /// Allocates the host tier of every layer and starts the workers.
    pub fn new(
        backend: B,
        config: FreeKvConfig,
        shape: &ModelShape,
        num_blocks: usize,
        dtype_name: &str,
    ) -> anyhow::Result<Self> {
        let geo = *backend.geometry();
        let per_layer = backend.host_tier_bytes(num_blocks);
        let mut layers = Vec::with_capacity(shape.num_layers);
        for layer in 0..shape.num_layers {
            let host = backend
                .alloc_host_tier(num_blocks, !config.is_dense_layer(layer))
                .map_err(|e| {
                    anyhow::anyhow!(
                    "FreeKV host tier: {e} for layer {layer} ({num_blocks} blocks x {} KV heads x \
                     2 x {} tokens x {} dims of {dtype_name}, plus summaries; {} bytes for all {} \
                     layers). Lower --pa-memory-mb or --pa-context-len so the engine allocates \
                     fewer blocks",
                    geo.num_kv_heads,
                    geo.page_size,
                    geo.head_dim,
                    per_layer.saturating_mul(shape.num_layers),
                    shape.num_layers
                )
                })?;
            layers.push(LayerCell {
                state: Mutex::new(LayerState::new(
                    &backend,
                    host,
                    Threshold::new(geo.num_kv_heads, config.tau, config.correction_rate),
                )),
                job: Mutex::new(JobStatus::default()),
                done: Condvar::new(),
            });
        }
        let shared = Arc::new(Shared {
            backend,
            policy: RwLock::new(config.policy()),
            config,
            geo,
            num_blocks,
            layers,
            tracing: AtomicBool::new(false),
        });
        let (jobs, queue) = channel();
        let queue = Arc::new(Mutex::new(queue));
        let n_workers = match shared.config.workers {
            0 => shared.backend.default_workers().max(1),
            n => n,
        };
        let mut workers = Vec::with_capacity(n_workers);
        for i in 0..n_workers {
            let (shared, queue) = (shared.clone(), queue.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("freekv-worker-{i}"))
                .spawn(move || worker_loop(shared, queue));
            match spawned {
                Ok(w) => workers.push(w),
                // The queue closes with `jobs`: the workers started so far end.
                Err(e) => anyhow::bail!("starting FreeKV worker thread {i}: {e}"),
            }
        }
        Ok(Self {
            shared,
            jobs: Some(jobs),
            workers,
        })
    }

    fn cell(&self, layer: usize) -> anyhow::Result<&LayerCell<B>> {
        self.shared.layers.get(layer).ok_or_else(|| {
            anyhow::anyhow!(
                "layer {layer} is out of range: the model has {} layers",
                self.shared.layers.len()
            )
        })
    }

    /// Waits for the layer's background work without consuming its outcome.
    fn wait_idle<'a>(&self, cell: &'a LayerCell<B>) -> (MutexGuard<'a, JobStatus>, u64) {
        let mut status = lock_status(&cell.job);
        let mut waited = 0;
        if status.pending {
            let t = Instant::now();
            while status.pending {
                status = cell.done.wait(status).unwrap_or_else(|e| e.into_inner());
            }
            waited = t.elapsed().as_nanos() as u64;
        }
        (status, waited)
    }

    /// Waits for the layer's background work; returns the nanoseconds waited, or the
    /// background work's failure.
    fn join(&self, layer: usize) -> anyhow::Result<u64> {
        let (mut status, waited) = self.wait_idle(self.cell(layer)?);
        if let Some(failure) = status.failure.take() {
            anyhow::bail!("layer {layer}: the background selection failed: {failure}");
        }
        Ok(waited)
    }

    /// Joins the layer's background work and locks its state.
    fn enter(&self, layer: usize) -> anyhow::Result<(MutexGuard<'_, LayerState<B>>, u64)> {
        let waited = self.join(layer)?;
        let state = self.cell(layer)?.state.lock().map_err(|_| {
            anyhow::anyhow!("layer {layer}: FreeKV state is unusable after an earlier panic")
        })?;
        Ok((state, waited))
    }

    /// Marks the layer's background work outstanding. Called with the layer's state locked,
    /// so that no later call of the layer (on any thread) enters before the worker has run on
    /// the state this call left.
    fn mark_pending(&self, layer: usize) {
        lock_status(&self.shared.layers[layer].job).pending = true;
    }

    /// Hands the layer to the worker, once its job was marked pending ([`Self::mark_pending`]).
    fn submit(&self, layer: usize) {
        let cell = &self.shared.layers[layer];
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(layer).is_ok());
        if !sent {
            let mut status = lock_status(&cell.job);
            status.pending = false;
            status.failure = Some("the FreeKV worker threads are gone".into());
        }
    }
}

/// One worker: takes layers from the shared queue until it closes.
fn worker_loop<B: Backend>(shared: Arc<Shared<B>>, queue: Arc<Mutex<Receiver<usize>>>) {
    let mut scratch = shared.backend.alloc_scratch(Role::Worker);
    loop {
        // Held while waiting: the idle workers queue on the lock, one waits on the channel.
        let next = match queue.lock() {
            Ok(q) => q.recv(),
            Err(_) => return,
        };
        let Ok(layer) = next else { return };
        let cell = &shared.layers[layer];
        let result = catch_unwind(AssertUnwindSafe(|| match cell.state.lock() {
            Ok(mut state) => {
                background::background_selection(&shared.ctx(layer), &mut state, &mut scratch);
                None
            }
            Err(_) => Some("the layer's state is unusable after an earlier panic".to_string()),
        }));
        let failure = match result {
            Ok(f) => f,
            Err(panic) => {
                scratch = shared.backend.alloc_scratch(Role::Worker);
                Some(
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()),
                )
            }
        };
        let mut status = lock_status(&cell.job);
        status.pending = false;
        if failure.is_some() {
            status.failure = failure;
        }
        cell.done.notify_all();
    }
}

#[cfg(test)]
mod faults;
#[cfg(test)]
mod waits;

impl<B: Backend> Instance<B> {
    /// `f` of each KV head's slot tables for `seq_id` on `layer`, once the background work is
    /// done; None while the sequence has no selection there.
    fn per_head_of_selection<R>(
        &self,
        layer: usize,
        seq_id: u64,
        f: impl Fn(&SlotPlan, usize) -> R,
    ) -> Option<Vec<R>> {
        let cell = self.cell(layer).ok()?;
        drop(self.wait_idle(cell));
        let state = cell.state.lock().ok()?;
        let seq = state.seqs.get(&seq_id)?;
        let dev = seq.dev.as_ref().filter(|_| seq.has_selection())?;
        let plan = B::slot_plan(dev);
        Some(
            (0..self.shared.geo.num_kv_heads)
                .map(|h| f(plan, h))
                .collect(),
        )
    }
}

impl<B: Backend> Drop for Instance<B> {
    fn drop(&mut self) {
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl<B: Backend> AnyInstance for Instance<B> {
    fn prefill(
        &self,
        layer: usize,
        rows: &[PrefillRow<'_>],
        qkv: Qkv<'_>,
        params: &AttnParams,
        want_output: bool,
    ) -> anyhow::Result<Option<Tensor>> {
        let Qkv { q, k, v } = qkv;
        let (b, _, l, _) = q.dims4()?;
        anyhow::ensure!(
            rows.len() == b,
            "prefill of layer {layer}: {} rows for a batch of {b}",
            rows.len()
        );
        let cx = self.shared.ctx(layer);
        for row in rows {
            prefill::check_row(&cx, row, l)?;
        }
        let (mut guard, waited) = self.enter(layer)?;
        let st = &mut *guard;
        st.counters.wait_ns += waited;
        let new_lens: Vec<usize> = rows.iter().map(|r| r.new_len).collect();
        let last_only = (!want_output).then_some(&new_lens[..]);
        let backend = &self.shared.backend;
        let step = backend
            .settle(&mut st.host, &mut st.batch, &mut st.scratch)
            .and_then(|()| backend.load(&mut st.batch, Inputs::Prefill { q, k, v, last_only }))
            .and_then(|()| prefill::prefill_step(&cx, st, rows, params, want_output))
            .and_then(|()| {
                want_output
                    .then(|| backend.take_output(&mut st.batch, q.dtype()))
                    .transpose()
            });
        step.map_err(|e| {
            st.forget_sequences(rows.iter().map(|r| r.seq_id));
            in_layer(e, "prefill", layer)
        })
    }

    fn decode(
        &self,
        layer: usize,
        rows: &[DecodeRow<'_>],
        qkv: Qkv<'_>,
        params: &AttnParams,
    ) -> anyhow::Result<Tensor> {
        let Qkv { q, k, v } = qkv;
        let b = q.dim(0)?;
        anyhow::ensure!(
            rows.len() == b,
            "decode of layer {layer}: {} rows for a batch of {b}",
            rows.len()
        );
        let cx = self.shared.ctx(layer);
        let (mut guard, waited) = self.enter(layer)?;
        let st = &mut *guard;
        st.counters.wait_ns += waited;
        let backend = &self.shared.backend;
        let step = backend
            .settle(&mut st.host, &mut st.batch, &mut st.scratch)
            .and_then(|()| backend.load(&mut st.batch, Inputs::Decode { q, k, v }))
            .and_then(|()| timeline::decode_step(&cx, st, rows, params))
            .inspect(|_| probe::probe_decode(&cx, st, rows))
            .and_then(|scheduled| Ok((scheduled, backend.take_output(&mut st.batch, q.dtype())?)));
        let (scheduled, out) = match step {
            Ok(done) => done,
            Err(e) => {
                st.forget_sequences(rows.iter().map(|r| r.seq_id));
                return Err(in_layer(e, "decode step", layer));
            }
        };
        if scheduled {
            self.mark_pending(layer);
        }
        drop(guard);
        if scheduled {
            self.submit(layer);
        }
        Ok(out)
    }

    fn free_sequence(&self, seq_id: u64) -> Option<LayerCounters> {
        let mut freed: Option<LayerCounters> = None;
        for cell in &self.shared.layers {
            drop(self.wait_idle(cell));
            let mut state = match cell.state.lock() {
                Ok(s) => s,
                Err(e) => e.into_inner(),
            };
            if let Some(c) = state.remove_sequence(seq_id) {
                freed.get_or_insert_with(LayerCounters::default).add(&c);
            }
        }
        freed
    }

    fn live_sequences(&self) -> usize {
        let mut ids = std::collections::HashSet::new();
        for cell in &self.shared.layers {
            let state = cell.state.lock().unwrap_or_else(|e| e.into_inner());
            ids.extend(state.seqs.keys().copied());
        }
        ids.len()
    }

    fn counters(&self) -> Counters {
        Counters::from_layers(
            self.shared
                .layers
                .iter()
                .map(|cell| match cell.state.lock() {
                    Ok(s) => s.totals(),
                    Err(e) => e.into_inner().totals(),
                })
                .collect::<Vec<LayerCounters>>(),
        )
    }

    fn host_tier_bytes(&self) -> usize {
        self.shared
            .backend
            .host_tier_bytes(self.shared.num_blocks)
            .saturating_mul(self.shared.layers.len())
    }

    fn device_tier_bytes_per_sequence(&self) -> usize {
        self.shared.backend.device_tier_bytes() * self.sparse_layers()
    }

    fn device_pool_bytes(&self) -> usize {
        let (backend, n) = (&self.shared.backend, self.shared.num_blocks);
        let sparse = self.sparse_layers();
        let dense = self.shared.layers.len() - sparse;
        let summaries = backend.device_pool_bytes(n, true).saturating_mul(sparse);
        summaries.saturating_add(backend.device_pool_bytes(n, false).saturating_mul(dense))
    }

    fn device_waits(&self) -> u64 {
        self.shared.backend.device_waits()
    }

    fn unpinned_host_tiers(&self) -> u64 {
        self.shared.backend.unpinned_host_tiers()
    }

    fn set_tracing(&self, on: bool) {
        self.shared.tracing.store(on, Ordering::Relaxed);
    }

    fn step_trace(&self, layer: usize, seq_id: u64) -> Option<StepTrace> {
        let state = self.cell(layer).ok()?.state.lock().ok()?;
        state.seqs.get(&seq_id)?.trace.clone()
    }

    fn resident_pages(&self, layer: usize, seq_id: u64) -> Option<Vec<Vec<u32>>> {
        self.per_head_of_selection(layer, seq_id, SlotPlan::resident_pages)
    }

    fn selection_margins(&self, layer: usize, seq_id: u64) -> Option<Vec<f32>> {
        self.per_head_of_selection(layer, seq_id, SlotPlan::margin)
    }

    fn join_background(&self) -> anyhow::Result<()> {
        for layer in 0..self.shared.layers.len() {
            self.join(layer)?;
        }
        Ok(())
    }

    fn policy(&self) -> Policy {
        *self.shared.policy.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set_policy(&self, policy: Policy) -> anyhow::Result<()> {
        policy.check(&self.shared.config)?;
        // Background work queued under the old policy finishes under it.
        for cell in &self.shared.layers {
            drop(self.wait_idle(cell));
        }
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner()) = policy;
        Ok(())
    }

    fn set_probe(&self, spec: Option<ProbeSpec>) -> anyhow::Result<()> {
        let geo = self.shared.geo;
        let spec = match spec {
            Some(spec) => {
                let geos = spec
                    .geometries(&geo)
                    .map_err(|e| anyhow::anyhow!("selection probe: {e}"))?;
                Some((Arc::new(spec), geos))
            }
            None => None,
        };
        for layer in 0..self.shared.layers.len() {
            let (mut state, _) = self.enter(layer)?;
            state.probe = spec
                .as_ref()
                .map(|(s, g)| LayerProbe::new(s.clone(), g.clone(), geo.num_kv_heads));
        }
        Ok(())
    }

    fn take_probe(&self) -> ProbeReport {
        let mut report = ProbeReport::default();
        for cell in &self.shared.layers {
            let mut state = cell.state.lock().unwrap_or_else(|e| e.into_inner());
            let (heads, watch) = match state.probe.as_mut() {
                Some(lp) => {
                    if report.estimators.is_empty() {
                        report.estimators =
                            lp.spec().estimators.iter().map(|e| e.label()).collect();
                        report.splits = lp.splits();
                    }
                    report.failures.extend(lp.failure.take());
                    lp.take()
                }
                None => Default::default(),
            };
            let probed = heads.iter().any(|h| h.steps > 0);
            report.layers.push(if probed { heads } else { Vec::new() });
            report.watch.extend(watch);
        }
        report
    }
}
