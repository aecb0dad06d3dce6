//! `--freekv-*` command-line flags for the engine's CLI (`--features freekv`).
//!
//! Every flag can also be given as a `FREEKV_*` environment variable; a flag wins over its
//! variable. The values are validated (and the backend registered) before any model loads,
//! so a bad knob stops the command with a message that names it.

use clap::Args;
use serde_json::Value;

use crate::FreeKvConfig;

/// FreeKV knobs. Defaults: the spec's (page 32, budget 2048 = sink 512 + window 512 + 32
/// selected pages, tau 0.9, min/max summaries, softmax-then-mean pooling, layer 0 dense).
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "FreeKV KV-cache retrieval")]
pub struct FreeKvArgs {
    /// Tokens attended per layer and KV head at each decode step: sink + window + selected
    /// pages [env: FREEKV_BUDGET]
    #[arg(
        id = "freekv_budget",
        long = "freekv-budget",
        global = true,
        value_name = "TOKENS"
    )]
    pub budget: Option<usize>,
    /// First tokens of every sequence, always attended (multiple of the page size)
    /// [env: FREEKV_SINK]
    #[arg(
        id = "freekv_sink",
        long = "freekv-sink",
        global = true,
        value_name = "TOKENS"
    )]
    pub sink: Option<usize>,
    /// Most recent tokens, always attended (multiple of the page size) [env: FREEKV_WINDOW]
    #[arg(
        id = "freekv_window",
        long = "freekv-window",
        global = true,
        value_name = "TOKENS"
    )]
    pub window: Option<usize>,
    /// Correction threshold: a KV head whose mean query cosine to the previous step falls
    /// below it re-selects before attention; 0.8 suits long input, 0.9 long generation
    /// [env: FREEKV_TAU]
    #[arg(
        id = "freekv_tau",
        long = "freekv-tau",
        global = true,
        value_name = "TAU"
    )]
    pub tau: Option<f32>,
    /// Tokens per page = the engine's block size: 8, 16 or 32 [env: FREEKV_PAGE_SIZE]
    #[arg(
        id = "freekv_page_size",
        long = "freekv-page-size",
        global = true,
        value_name = "TOKENS"
    )]
    pub page_size: Option<usize>,
    /// Page summary: min-max (Quest) or centre-mad (ArkVale's box) [env: FREEKV_SUMMARY]
    #[arg(
        id = "freekv_summary",
        long = "freekv-summary",
        global = true,
        value_name = "KIND"
    )]
    pub summary: Option<String>,
    /// How a GQA group's query heads share one page set: softmax-mean, mean or max
    /// [env: FREEKV_POOLING]
    #[arg(
        id = "freekv_pooling",
        long = "freekv-pooling",
        global = true,
        value_name = "KIND"
    )]
    pub pooling: Option<String>,
    /// Layers that always attend densely, comma separated ("" for none) [env: FREEKV_DENSE_LAYERS]
    #[arg(
        id = "freekv_dense_layers",
        long = "freekv-dense-layers",
        global = true,
        value_name = "LIST"
    )]
    pub dense_layers: Option<String>,
    /// freekv (speculation + correction), speculative (no correction), sync (select and
    /// recall on the critical path, like Quest/ArkVale) or dense [env: FREEKV_MODE]
    #[arg(
        id = "freekv_mode",
        long = "freekv-mode",
        global = true,
        value_name = "MODE"
    )]
    pub mode: Option<String>,
    /// CPU device tier: copy (recall pages into budget-sized slots) or in-place (attend
    /// over host pages) [env: FREEKV_DEVICE_TIER]
    #[arg(
        id = "freekv_device_tier",
        long = "freekv-device-tier",
        global = true,
        value_name = "KIND"
    )]
    pub device_tier: Option<String>,
}

impl FreeKvArgs {
    /// The configuration: `FREEKV_*` variables over the defaults, flags over both. An invalid
    /// value is an error naming the flag, the value and what is valid.
    pub fn config(&self) -> anyhow::Result<FreeKvConfig> {
        let mut c = FreeKvConfig::from_env()?;
        if let Some(x) = self.budget {
            c.budget = x;
        }
        if let Some(x) = self.sink {
            c.sink = x;
        }
        if let Some(x) = self.window {
            c.window = x;
        }
        if let Some(x) = self.tau {
            c.tau = x;
        }
        if let Some(x) = self.page_size {
            c.page_size = x;
        }
        if let Some(x) = &self.summary {
            c.summary = parse_kind("--freekv-summary", x)?;
        }
        if let Some(x) = &self.pooling {
            c.pooling = parse_kind("--freekv-pooling", x)?;
        }
        if let Some(x) = &self.mode {
            c.mode = parse_kind("--freekv-mode", x)?;
        }
        if let Some(x) = &self.device_tier {
            c.device_tier = parse_kind("--freekv-device-tier", x)?;
        }
        if let Some(list) = &self.dense_layers {
            c.dense_layers = crate::config::parse_layer_list(list)
                .map_err(|e| anyhow::anyhow!("--freekv-dense-layers {list:?}: {e}"))?;
        }
        c.validate(None)?;
        Ok(c)
    }
}

/// One of a knob's named values (the config's serde spelling, e.g. `softmax-mean`).
fn parse_kind<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> anyhow::Result<T> {
    serde_json::from_value(Value::String(value.to_string()))
        .map_err(|e| anyhow::anyhow!("{flag} {value:?} is not valid: {e}"))
}

/// Validates the knobs and registers FreeKV with the engine (the CLI's start-up hook).
pub fn install(args: &FreeKvArgs) -> anyhow::Result<()> {
    crate::engine::register(args.config()?)
}
