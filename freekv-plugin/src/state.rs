//! What FreeKV keeps per layer and per (sequence, layer), and the per-layer lock around it.
//!
//! Three kinds of state, kept apart (vLLM's lesson): *which pages a sequence owns* is the
//! engine's block table (copied here each step); *which pages are resident for this step* is
//! the device tier's selection state; *how attention is computed* is the backend's business.

use std::collections::HashMap;

use crate::backend::{Backend, Role};
use crate::correction::Threshold;
use crate::counters::LayerCounters;
use crate::probe::LayerProbe;
use crate::step_plan::StepPlan;
use crate::AttnParams;

/// The working set and bookkeeping of one sequence on one layer.
pub struct SeqLayer<B: Backend> {
    /// Tokens written (the context of the last step, including its token).
    pub len: usize,
    /// The sequence's block table as of the last call (page `j` in block `table[j]`).
    pub table: Vec<u32>,
    /// The working set; `None` until the sequence first attends sparsely.
    pub dev: Option<B::DeviceTier>,
    /// Where the sequence's selection stands (see [`Phase`]).
    pub phase: Phase,
    /// Attention parameters of the last step (the worker's selection needs the window).
    pub params: AttnParams,
    /// The last step, when traces are on.
    pub trace: Option<StepTrace>,
    /// Why the worker's selection for the next step failed (reported by that step).
    pub failure: Option<String>,
    /// The row of the layer's last batch whose query the worker stores before it selects
    /// (mode `speculative`, where the step itself never reads the query).
    pub query_row: Option<usize>,
    /// What FreeKV did for this sequence on this layer since its prefill (the per-request
    /// counters; folded into the layer's when the sequence is freed).
    pub counters: LayerCounters,
    /// Per KV head: selected this step with the stored query, over `fresh_candidates` (a
    /// corrected head, or every head of a blocking step). The worker's selection for the next
    /// step would repeat it where the candidates are the same.
    pub fresh: Vec<bool>,
    pub fresh_candidates: std::ops::Range<usize>,
}

impl<B: Backend> SeqLayer<B> {
    pub fn new() -> Self {
        Self {
            len: 0,
            table: Vec::new(),
            dev: None,
            phase: Phase::Unselected,
            params: AttnParams::scaled(1.0),
            trace: None,
            failure: None,
            query_row: None,
            counters: LayerCounters::default(),
            fresh: Vec::new(),
            fresh_candidates: 0..0,
        }
    }
}

/// Where a sequence's selection stands on one layer. Every transition is a method here:
///
/// ```text
/// Unselected --select()--> Selected --speculate()--> Speculating --select()--> Selected
///      ^                                                                          |
///      +------------------------ forget() (rebuild, dense step) -----------------+
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No selection is installed: the next sparse step selects for every head on the critical
    /// path (a first sparse step, or after a rebuild or a dense step).
    Unselected,
    /// The working set holds the selection made for the next step (sink, window and selected
    /// pages installed).
    Selected,
    /// The worker owes the sequence the selection for its next step, made with the stored
    /// query; the calling thread joins it before the layer's next call.
    Speculating,
}

impl<B: Backend> SeqLayer<B> {
    /// A selection for the next step is installed.
    pub fn select(&mut self) {
        self.phase = Phase::Selected;
    }

    /// The next step's selection is left to the worker.
    pub fn speculate(&mut self) {
        self.phase = Phase::Speculating;
    }

    /// The installed selection no longer applies (the context was rebuilt, or the step was
    /// dense).
    pub fn forget(&mut self) {
        self.phase = Phase::Unselected;
    }

    /// Whether the working set holds a selection (made, or being made by the worker).
    pub fn has_selection(&self) -> bool {
        self.phase != Phase::Unselected
    }
}

/// What one decode step of one sequence on one layer did (recorded when traces are on).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepTrace {
    /// Context length of the step (including its token).
    pub len: usize,
    /// Whether the step attended over a selection (false: densely over every page).
    pub sparse: bool,
    /// Whether the selection ran on the critical path for every head (first sparse step,
    /// rebuild, or mode `sync`).
    pub blocking: bool,
    /// Per KV head: the logical pages attended (sorted; empty for dense steps).
    pub pages: Vec<Vec<u32>>,
    /// Per KV head: corrected at this step (mode `freekv`).
    pub corrected: Vec<bool>,
}

/// How a row's step goes, decided when the step is planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowStep {
    /// Attend over every page.
    Dense,
    /// Attend over every page, which the working set holds (a context within the budget, on
    /// a backend that attends over working sets on its device; see
    /// [`Memory::holds_short_contexts`](crate::backend::Memory::holds_short_contexts)).
    Whole,
    /// Attend over the working set, which holds a selection made for this step.
    Speculated,
    /// Attend over the working set after a blocking selection for every head (first sparse
    /// step, rebuild).
    Fresh,
}

/// Everything of one layer, behind its lock.
pub struct LayerState<B: Backend> {
    pub host: B::HostTier,
    pub seqs: HashMap<u64, SeqLayer<B>>,
    pub batch: B::Batch,
    /// The calling thread's scratch for this layer.
    pub scratch: B::Scratch,
    /// The layer's own counts (waits for background work) and those of freed sequences; live
    /// sequences count in their [`SeqLayer::counters`] (see [`LayerState::totals`]).
    pub counters: LayerCounters,
    /// The plan of the current (or last) decode step.
    pub plan: StepPlan,
    /// The correction test's similarities of the current call (`[tested row][n_kv]`), reused.
    pub similarity: Vec<f32>,
    /// Per-KV-head buffers of the current row.
    pub heads: Vec<bool>,
    pub all_heads: Vec<bool>,
    /// The correction test's per-head thresholds (fixed, or adapting).
    pub threshold: Threshold,
    /// The selection probe, while one is set.
    pub(crate) probe: Option<LayerProbe>,
}

impl<B: Backend> LayerState<B> {
    pub fn new(backend: &B, host: B::HostTier, threshold: Threshold) -> Self {
        let n_kv = backend.geometry().num_kv_heads;
        Self {
            host,
            seqs: HashMap::new(),
            batch: backend.alloc_batch(),
            scratch: backend.alloc_scratch(Role::Caller),
            counters: LayerCounters::default(),
            plan: StepPlan::default(),
            similarity: Vec::new(),
            heads: vec![false; n_kv],
            all_heads: vec![true; n_kv],
            threshold,
            probe: None,
        }
    }

    /// Everything this layer counted: its own counts plus those of its live sequences.
    pub fn totals(&self) -> LayerCounters {
        let mut t = self.counters;
        for seq in self.seqs.values() {
            t.add(&seq.counters);
        }
        t
    }

    /// After a failed call: the selections of these sequences no longer apply (their working
    /// sets may be half-updated); their next sparse step rebuilds them from the host tier.
    pub fn forget_sequences(&mut self, seq_ids: impl IntoIterator<Item = u64>) {
        for id in seq_ids {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.forget();
            }
        }
    }

    /// Drops a sequence's state, folding its counters into the layer's; returns them.
    pub fn remove_sequence(&mut self, seq_id: u64) -> Option<LayerCounters> {
        let seq = self.seqs.remove(&seq_id)?;
        self.counters.add(&seq.counters);
        Some(seq.counters)
    }
}
