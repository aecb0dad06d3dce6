//! FreeKV's knobs: one declaration gives the [`FreeKvConfig`] struct (serde, defaults), each
//! knob's CLI flag, environment variable, value name and help ([`FreeKvConfig::KNOBS`]), and
//! one parser per value type ([`knobs`]); [`FreeKvConfig::validate`] is the one place where
//! values are checked against each other and the model.
//!
//! Every way of configuring FreeKV (the Rust API, the CLI flags, the environment) ends in a
//! [`FreeKvConfig`]. Errors name the knob, the value and what would be valid.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ModelShape;

mod choices;
pub mod knobs;

pub use choices::{DeviceTierLayout, Mode, Pooling, PrefillAttention, Selector, SummaryKind};
pub use knobs::{Knob, KnobValue};

/// Page sizes FreeKV supports (= the engine's paged-attention block sizes).
pub const PAGE_SIZES: [usize; 3] = [8, 16, 32];

/// Declares the configuration struct, its `Default` and its knob table from one list of
/// fields: doc comment, name, type, default, CLI flag, environment variable, value name.
macro_rules! declare_knobs {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident: $ty:ty = $default:expr, $flag:literal, $env:literal, $value_name:literal;
    )+) => {
        /// FreeKV's configuration. `Default` is the spec's: page 32, budget 2048 = sink 512 +
        /// window 512 + 32 selected pages, tau 0.9, min/max summaries, softmax-then-mean
        /// pooling, layer 0 dense, mode `freekv`, in-place device tier. Partial JSON fills the
        /// rest from the defaults.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct FreeKvConfig {
            $($(#[doc = $doc])+ pub $field: $ty,)+
        }

        impl Default for FreeKvConfig {
            fn default() -> Self {
                Self { $($field: $default,)+ }
            }
        }

        impl FreeKvConfig {
            /// Every knob, in declaration order.
            pub const KNOBS: &'static [Knob] = &[$(Knob {
                name: stringify!($field),
                flag: $flag,
                env: $env,
                value_name: $value_name,
                help: concat!($($doc, "\n"),+),
                set: |c, text| {
                    c.$field = knobs::parse(stringify!($field), text)?;
                    Ok(())
                },
                show: |c| KnobValue::show(&c.$field),
            },)+];
        }
    };
}

declare_knobs! {
    /// Tokens per page: the selection unit, the transfer unit and the engine's block size
    /// (8, 16 or 32).
    page_size: usize = 32, "freekv-page-size", "FREEKV_PAGE_SIZE", "TOKENS";
    /// Tokens attended per layer and KV head at a sparse step: sink + window + selected pages.
    /// It bounds each sequence's working set (on a GPU, its device memory); the engine's
    /// `--pa-memory-mb` / `--pa-context-len` size the host tier, which holds every token's KV
    /// in host memory on CPU and CUDA alike.
    budget: usize = 2048, "freekv-budget", "FREEKV_BUDGET", "TOKENS";
    /// First tokens of every sequence, always attended (a multiple of the page size).
    sink: usize = 512, "freekv-sink", "FREEKV_SINK", "TOKENS";
    /// Most recent tokens (whole pages, including the partial last one), always attended (a
    /// positive multiple of the page size).
    window: usize = 512, "freekv-window", "FREEKV_WINDOW", "TOKENS";
    /// Correction threshold in [-1, 1]: a KV head whose mean query cosine (over its group,
    /// step `i` vs `i-1`) falls below `tau` is re-selected before attention. 0.8 suits long
    /// input, 0.9 long generation; `tau = 1` corrects every head every step (the result
    /// equals `sync`), `tau = -1` never corrects.
    tau: f32 = 0.9, "freekv-tau", "FREEKV_TAU", "TAU";
    /// Adaptive correction (beyond the paper; off at 0): a target share of KV heads to correct
    /// per step, in (0, 1]. Each layer's per-head threshold then starts at `tau` and follows
    /// that quantile of the head's running query similarity.
    correction_rate: f32 = 0.0, "freekv-correction-rate", "FREEKV_CORRECTION_RATE", "RATE";
    /// Page summary: min-max (Quest) or centre-mad (ArkVale's box).
    summary: SummaryKind = SummaryKind::MinMax, "freekv-summary", "FREEKV_SUMMARY", "KIND";
    /// How a GQA group's query heads pool their page scores: softmax-mean, mean or max.
    pooling: Pooling = Pooling::SoftmaxMean, "freekv-pooling", "FREEKV_POOLING", "KIND";
    /// How selection scores pages: quest (FreeKV's page bounds, with `summary` and
    /// `pooling`), rerank (the page bounds shortlist `shortlist` x the selected pages, then the
    /// exact attention weight of each shortlisted page's tokens decides) or oracle (a
    /// diagnostic: each page's exact attention mass for the query, which reads every key at
    /// every selection; it shows what the budget alone allows).
    selector: Selector = Selector::Quest, "freekv-selector", "FREEKV_SELECTOR", "KIND";
    /// Selector `rerank`: pages shortlisted by the page bounds per selected page, 1 to 16 (the
    /// keys of `shortlist` x the selected pages are read at each selection).
    shortlist: usize = 4, "freekv-shortlist", "FREEKV_SHORTLIST", "PAGES";
    /// Layers that always attend densely, comma separated ("" for none). On a GPU a dense
    /// layer keeps its whole pool in device memory too (1/L of the host tier per layer).
    dense_layers: Vec<usize> = vec![0], "freekv-dense-layers", "FREEKV_DENSE_LAYERS", "LIST";
    /// Which parts of the method run: freekv (speculation + correction), speculative (no
    /// correction), sync (select and recall on the critical path, like Quest/ArkVale) or
    /// dense.
    mode: Mode = Mode::FreeKv, "freekv-mode", "FREEKV_MODE", "MODE";
    /// How the CPU device tier holds the working set: in-place (attend over host pages) or
    /// copy (recall pages into budget-sized slots, and dense layers' pages into a copy of
    /// their own, as on a GPU).
    device_tier: DeviceTierLayout = DeviceTierLayout::InPlace, "freekv-device-tier", "FREEKV_DEVICE_TIER", "KIND";
    /// Background threads per model that run the selections and recalls behind the decode,
    /// 0 to 16: layers queued behind each other are served in parallel (each layer's work
    /// still runs in order, on one thread at a time). 0: the backend's choice, 2 on a GPU
    /// (a worker mostly waits for the device) and 1 on the CPU (workers compute on the
    /// engine's cores).
    workers: usize = 0, "freekv-workers", "FREEKV_WORKERS", "THREADS";
    /// Which attention computes a prompt's output: engine (the engine's own, on the model's
    /// device, for prompts without a cached prefix in full-attention layers), freekv (FreeKV's
    /// over cached prefix and new tokens, on FreeKV's device) or auto (engine on a GPU, freekv
    /// on the CPU).
    prefill_attention: PrefillAttention = PrefillAttention::Auto, "freekv-prefill-attention", "FREEKV_PREFILL_ATTENTION", "KIND";
}

/// An invalid knob: which one, the value given and what would be valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The knob's configuration name (`budget`, `tau`, ...).
    pub knob: &'static str,
    /// The offending value, as given.
    pub value: String,
    /// What would be valid.
    pub valid: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid FreeKV {} = {}: {}",
            self.knob, self.value, self.valid
        )
    }
}

impl std::error::Error for ConfigError {}

fn err(knob: &'static str, value: impl fmt::Display, valid: impl Into<String>) -> ConfigError {
    ConfigError {
        knob,
        value: value.to_string(),
        valid: valid.into(),
    }
}

/// Parses a comma-separated list of layer indices: `"0,1,5"` -> `[0, 1, 5]`, `""` -> `[]`
/// (the `dense_layers` knob's syntax).
pub fn parse_layer_list(s: &str) -> Result<Vec<usize>, String> {
    <Vec<usize>>::parse(s)
}

/// The knobs an instance can switch between requests ([`crate::AnyInstance::set_policy`]):
/// which parts of the method run and how pages are scored. Everything else shapes the
/// instance's memory (or its threads' decisions) and is fixed when it is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Which parts of the method run.
    pub mode: Mode,
    /// How pages are scored.
    pub selector: Selector,
    /// Selector `rerank`: pages shortlisted per selected page.
    pub shortlist: usize,
}

impl Policy {
    /// Whether `layer` of an instance built for `built` attends densely under this policy.
    pub fn dense_layer(&self, built: &FreeKvConfig, layer: usize) -> bool {
        self.mode == Mode::Dense || built.dense_layers.contains(&layer)
    }

    /// Whether an instance built for `built` can run this policy: one built for mode `dense`
    /// keeps no summaries on a device, and one built without correction mirrors no stored
    /// queries there.
    pub fn check(&self, built: &FreeKvConfig) -> Result<(), ConfigError> {
        FreeKvConfig {
            shortlist: self.shortlist,
            ..FreeKvConfig::default()
        }
        .validate(None)?;
        if built.mode == Mode::Dense && self.mode != Mode::Dense {
            return Err(err(
                "mode",
                format!("{:?}", self.mode),
                "mode dense, as the instance was built (it keeps no page summaries); build it \
                 with a sparse mode to switch",
            ));
        }
        if self.mode.correction() && !built.mode.correction() {
            return Err(err(
                "mode",
                "freekv",
                format!(
                    "a mode without correction, as the instance was built with mode {:?}; build \
                     it with mode freekv to switch",
                    built.mode
                ),
            ));
        }
        Ok(())
    }
}

impl FreeKvConfig {
    /// The mode, selector and shortlist of this configuration.
    pub fn policy(&self) -> Policy {
        Policy {
            mode: self.mode,
            selector: self.selector,
            shortlist: self.shortlist,
        }
    }

    /// The budget in pages: (sink pages, window pages, selected pages, slots).
    pub fn pages(&self) -> (usize, usize, usize, usize) {
        let p = self.page_size.max(1);
        let slots = self.budget / p;
        let sink = self.sink / p;
        let window = self.window / p;
        (sink, window, slots.saturating_sub(sink + window), slots)
    }

    /// Whether `layer` always attends densely (listed, or mode `dense`).
    pub fn is_dense_layer(&self, layer: usize) -> bool {
        self.mode == Mode::Dense || self.dense_layers.contains(&layer)
    }

    /// Checks every knob (and, given the model's shape, the layer indices and head geometry).
    /// The error names the knob, the value and the valid range.
    pub fn validate(&self, shape: Option<&ModelShape>) -> Result<(), ConfigError> {
        let p = self.page_size;
        if !PAGE_SIZES.contains(&p) {
            return Err(err(
                "page_size",
                p,
                "one of 8, 16, 32 (the engine's paged-attention block sizes)",
            ));
        }
        if !self.sink.is_multiple_of(p) {
            return Err(err(
                "sink",
                self.sink,
                format!(
                    "a multiple of the page size {p} (e.g. {})",
                    self.sink / p * p
                ),
            ));
        }
        if self.window == 0 || !self.window.is_multiple_of(p) {
            return Err(err(
                "window",
                self.window,
                format!(
                    "a positive multiple of the page size {p} (the window holds the partial last page; e.g. {})",
                    (self.window / p).max(1) * p
                ),
            ));
        }
        if !self.budget.is_multiple_of(p) {
            return Err(err(
                "budget",
                self.budget,
                format!("a multiple of the page size {p}"),
            ));
        }
        let min_budget = self.sink + self.window + p;
        if self.budget < min_budget {
            return Err(err(
                "budget",
                self.budget,
                format!(
                    "at least sink + window + one page = {} + {} + {p} = {min_budget}",
                    self.sink, self.window
                ),
            ));
        }
        if !(-1.0..=1.0).contains(&self.tau) {
            return Err(err(
                "tau",
                self.tau,
                "a number in [-1, 1] (0.8 suits long input, 0.9 long generation)",
            ));
        }
        if !(1..=16).contains(&self.shortlist) {
            return Err(err(
                "shortlist",
                self.shortlist,
                "1 to 16 pages shortlisted per selected page (4: four times the selected pages)",
            ));
        }
        if self.workers > 16 {
            return Err(err(
                "workers",
                self.workers,
                "0 to 16 background threads per model (0: 2 on a GPU, 1 on the CPU)",
            ));
        }
        if !(0.0..=1.0).contains(&self.correction_rate) {
            return Err(err(
                "correction_rate",
                self.correction_rate,
                "a share in [0, 1] (0: fixed tau; e.g. 0.25: a quarter of the heads corrected)",
            ));
        }
        if let Some(shape) = shape {
            if shape.num_layers == 0 || shape.num_kv_heads == 0 || shape.head_dim == 0 {
                return Err(err(
                    "model shape",
                    format!("{shape:?}"),
                    "at least one layer, one KV head and a positive head dim",
                ));
            }
            if shape.num_q_heads == 0 || shape.num_q_heads % shape.num_kv_heads != 0 {
                return Err(err(
                    "model shape",
                    format!("{shape:?}"),
                    "a number of query heads that is a positive multiple of the KV heads",
                ));
            }
            if let Some(&bad) = self.dense_layers.iter().find(|&&l| l >= shape.num_layers) {
                return Err(err(
                    "dense_layers",
                    format!("{:?} (layer {bad})", self.dense_layers),
                    format!(
                        "layer indices below the model's {} layers (0..={})",
                        shape.num_layers,
                        shape.num_layers - 1
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
