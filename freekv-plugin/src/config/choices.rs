//! The knobs that take one of a few named values. Each enum's `ALL` table is the one list of
//! its configuration strings (serde's spelling too: a test checks they agree); parsing and
//! the error for an unknown name go through it (see `super::knobs`).

use serde::{Deserialize, Serialize};

/// Which parts of the method run. The "speculation on/off, correction on/off" knobs are
/// expressed by this one enum (correction needs speculation, since it corrects a speculative
/// selection, so no combination is left out):
///
/// | mode          | speculation | correction | selection + recall                          |
/// |---------------|-------------|------------|---------------------------------------------|
/// | `dense`       | -           | -          | none: full attention over every page         |
/// | `sync`        | off         | off        | with `q_i`, on the critical path every step  |
/// | `speculative` | on          | off        | with `q_{i-1}`, off the critical path        |
/// | `freekv`      | on          | on         | speculative, drifting heads corrected first  |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Full attention over all pages every step; no selection (the accuracy and speed baseline).
    Dense,
    /// Synchronous retrieval, as Quest/ArkVale do: select with the current query and recall the
    /// missing pages before attention, every step.
    Sync,
    /// Speculative retrieval without correction: step `i` attends over the pages selected with
    /// `q_{i-1}`; selection with `q_i` and recall run in the background after attention.
    Speculative,
    /// Speculative retrieval with fine-grained (per KV head) correction: the full method.
    #[default]
    #[serde(rename = "freekv")]
    FreeKv,
}

impl Mode {
    /// Every mode with its configuration string.
    pub const ALL: [(Mode, &'static str); 4] = [
        (Mode::Dense, "dense"),
        (Mode::Sync, "sync"),
        (Mode::Speculative, "speculative"),
        (Mode::FreeKv, "freekv"),
    ];

    /// Whether selection runs with the previous step's query, off the critical path.
    pub fn speculation(self) -> bool {
        matches!(self, Mode::Speculative | Mode::FreeKv)
    }

    /// Whether drifting heads are re-selected before attention.
    pub fn correction(self) -> bool {
        matches!(self, Mode::FreeKv)
    }
}

/// Page summary kept per full page and KV head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SummaryKind {
    /// Element-wise max and min of the page's post-RoPE keys (Quest; what the paper's accuracy
    /// results used).
    #[default]
    MinMax,
    /// ArkVale's box: centre `(max+min)/2` plus/minus the per-channel mean absolute deviation
    /// of the keys from that centre (what the authors' latency code used).
    CentreMad,
}

impl SummaryKind {
    /// Every kind with its configuration string.
    pub const ALL: [(SummaryKind, &'static str); 2] = [
        (SummaryKind::MinMax, "min-max"),
        (SummaryKind::CentreMad, "centre-mad"),
    ];
}

/// How the query heads of one GQA group pool their page scores into one score per page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// Softmax over the candidate pages per query head, then the mean over the group (the
    /// paper's best, "avgSM").
    #[default]
    SoftmaxMean,
    /// Mean of the raw scores over the group (the authors' latency code, "avgS").
    Mean,
    /// Max of the raw scores over the group ("maxS", Quest's GQA policy).
    Max,
}

impl Pooling {
    /// Every pooling with its configuration string.
    pub const ALL: [(Pooling, &'static str); 3] = [
        (Pooling::SoftmaxMean, "softmax-mean"),
        (Pooling::Mean, "mean"),
        (Pooling::Max, "max"),
    ];
}

/// How a selection scores the candidate pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selector {
    /// FreeKV's (Quest's) estimate: an upper bound of `q . k` over each page from its summary
    /// (`summary`), pooled over the GQA group (`pooling`).
    #[default]
    Quest,
    /// A diagnostic, never a default: each page's exact attention mass for the query (softmax
    /// over every key of the context), the mean over the group. It reads every key of the
    /// context at each selection (the cost of dense attention, and more), to show what the
    /// budget alone allows: the gap between it and dense is the budget's, the gap between a
    /// selector and it is the selector's.
    Oracle,
    /// Two stages: the page summaries, shrunk to a typical box and pooled with the query at
    /// the softmax's scale, shortlist `shortlist` x the selected pages; each shortlisted page
    /// is then scored by the exact attention weight of its tokens for the query (softmax over
    /// the shortlisted tokens, the mean over the group). Token-level evidence where the page
    /// bound is loose, reading only the shortlist's keys.
    Rerank,
}

impl Selector {
    /// Every selector with its configuration string.
    pub const ALL: [(Selector, &'static str); 3] = [
        (Selector::Quest, "quest"),
        (Selector::Oracle, "oracle"),
        (Selector::Rerank, "rerank"),
    ];
}

/// How the CPU device tier holds a sequence's working set.
///
/// Both keep per-head slot tables (which logical page each KV head's slice of a slot holds);
/// they differ in where attention reads the keys and values. `in-place` is the default: on a
/// CPU both tiers live in the same RAM, so copying recalled pages only adds work (see
/// `docs/benchmarks.md`, "CPU: one decode step of one layer", for the measurement).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceTierLayout {
    /// The working set in memory of its own: recalled pages are copied from the host tier
    /// (HND) into budget-sized NHD slots, through two staging buffers on the background
    /// worker, and decode attends over the slots; a dense layer's pages are copied too, as
    /// they are written, and decode attends over that copy. This is the CUDA backend's
    /// orchestration (`backend::offload`) with host memory as the device.
    Copy,
    /// Attention reads the host-tier pages named by the per-head slot tables; a recall only
    /// updates the tables.
    #[default]
    InPlace,
}

impl DeviceTierLayout {
    /// Every kind with its configuration string.
    pub const ALL: [(DeviceTierLayout, &'static str); 2] = [
        (DeviceTierLayout::Copy, "copy"),
        (DeviceTierLayout::InPlace, "in-place"),
    ];
}

/// Which attention computes a prompt's output (FreeKV writes the prompt's pages and makes the
/// first selection either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefillAttention {
    /// `engine` on a GPU, `freekv` on the CPU.
    #[default]
    Auto,
    /// The engine's own attention on the model's device, as its stock paged attention runs a
    /// prompt, for prompts without a cached prefix in full-attention layers; the others as
    /// `freekv`.
    Engine,
    /// FreeKV's causal attention over cached prefix and new tokens: on the CPU its kernel over
    /// the host tier, on a GPU the decode kernels, one query per row.
    #[serde(rename = "freekv")]
    FreeKv,
}

impl PrefillAttention {
    /// Every choice with its configuration string.
    pub const ALL: [(PrefillAttention, &'static str); 3] = [
        (PrefillAttention::Auto, "auto"),
        (PrefillAttention::Engine, "engine"),
        (PrefillAttention::FreeKv, "freekv"),
    ];
}
