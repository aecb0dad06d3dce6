//! FreeKV's knobs: one serde struct, its defaults (the spec's), the `FREEKV_*` environment
//! variables and the one place where every value is validated.
//!
//! Every way of configuring FreeKV (the Rust API, the CLI flags, the environment) ends in a
//! [`FreeKvConfig`], and [`FreeKvConfig::validate`] says whether it is usable. Errors name the
//! knob, the value and what would be valid.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ModelShape;

/// Page sizes FreeKV supports (= the engine's paged-attention block sizes).
pub const PAGE_SIZES: [usize; 3] = [8, 16, 32];

/// Which parts of the method run. The issue's "speculation on/off, correction on/off" knobs are
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

/// How the CPU device tier holds a sequence's working set.
///
/// Both keep per-head slot tables (which logical page each KV head's slice of a slot holds);
/// they differ in where attention reads the keys and values. `in-place` is the default: on a
/// CPU both tiers live in the same RAM, so copying recalled pages only adds work (see
/// `docs/benchmarks.md`, "CPU: one decode step of one layer", for the measurement).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceTier {
    /// Recalled pages are copied from the host tier (HND) into budget-sized NHD slots, through
    /// two staging buffers on the background worker (the GPU design, run on CPU).
    Copy,
    /// Attention reads the host-tier pages named by the per-head slot tables; a recall only
    /// updates the tables.
    #[default]
    InPlace,
}

impl DeviceTier {
    /// Every kind with its configuration string.
    pub const ALL: [(DeviceTier, &'static str); 2] = [
        (DeviceTier::Copy, "copy"),
        (DeviceTier::InPlace, "in-place"),
    ];
}

/// FreeKV's configuration. `Default` is the spec's: page 32, budget 2048 = sink 512 + window
/// 512 + 32 selected pages, tau 0.9, min/max summaries, softmax-then-mean pooling, layer 0
/// dense, mode `freekv`, in-place device tier. Partial JSON fills the rest from the defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FreeKvConfig {
    /// Tokens per page: the selection unit, the transfer unit and the engine's block size.
    pub page_size: usize,
    /// Tokens attended per layer and KV head at a sparse step: sink + window + selected pages.
    pub budget: usize,
    /// First tokens of every sequence, always attended.
    pub sink: usize,
    /// Most recent tokens (whole pages, including the partial last one), always attended.
    pub window: usize,
    /// Correction threshold: a KV head whose mean query cosine (over its group, step `i` vs
    /// `i-1`) falls below `tau` is re-selected before attention. `tau = 1` corrects every
    /// head every step (the result equals `sync`); `tau = -1` never corrects.
    pub tau: f32,
    /// Page summary.
    pub summary: SummaryKind,
    /// GQA pooling of page scores.
    pub pooling: Pooling,
    /// Layers that always attend densely.
    pub dense_layers: Vec<usize>,
    /// Which parts of the method run (speculation, correction).
    pub mode: Mode,
    /// How the CPU device tier holds the working set.
    pub device_tier: DeviceTier,
}

impl Default for FreeKvConfig {
    fn default() -> Self {
        Self {
            page_size: 32,
            budget: 2048,
            sink: 512,
            window: 512,
            tau: 0.9,
            summary: SummaryKind::MinMax,
            pooling: Pooling::SoftmaxMean,
            dense_layers: vec![0],
            mode: Mode::FreeKv,
            device_tier: DeviceTier::InPlace,
        }
    }
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

/// Parses a comma-separated list of layer indices: `"0,1,5"` -> `[0, 1, 5]`, `""` -> `[]`.
/// Spaces around entries are ignored; duplicates are removed and the list sorted.
pub fn parse_layer_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!(
                "empty entry in layer list {s:?} (expected comma-separated layer indices, e.g. \"0,1,5\")"
            ));
        }
        let layer = part.parse::<usize>().map_err(|_| {
            format!(
                "{part:?} is not a layer index (expected comma-separated non-negative integers, e.g. \"0,1,5\")"
            )
        })?;
        out.push(layer);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Parses one of an enum's configuration strings.
fn parse_choice<T: Copy>(
    knob: &'static str,
    value: &str,
    all: &[(T, &'static str)],
) -> Result<T, ConfigError> {
    all.iter()
        .find(|(_, name)| *name == value.trim())
        .map(|(v, _)| *v)
        .ok_or_else(|| {
            let names: Vec<_> = all.iter().map(|(_, n)| *n).collect();
            err(knob, value, format!("one of {}", names.join(", ")))
        })
}

fn parse_usize(knob: &'static str, value: &str) -> Result<usize, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| err(knob, value, "a non-negative integer number of tokens"))
}

impl FreeKvConfig {
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

    /// The defaults with the `FREEKV_*` environment variables applied (see [`Self::from_lookup`]).
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The defaults with variables from `lookup` applied: `FREEKV_BUDGET`, `FREEKV_SINK`,
    /// `FREEKV_WINDOW`, `FREEKV_TAU`, `FREEKV_PAGE_SIZE`, `FREEKV_SUMMARY`, `FREEKV_POOLING`,
    /// `FREEKV_DENSE_LAYERS` (comma list, empty = none), `FREEKV_MODE`,
    /// `FREEKV_DEVICE_TIER`. A value that does not parse is an error naming the variable and
    /// the valid values; the result is not validated as a whole (call [`Self::validate`]).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut c = Self::default();
        let with_var = |name: &str, e: ConfigError| anyhow::anyhow!("{name}: {e}");
        if let Some(v) = lookup("FREEKV_BUDGET") {
            c.budget = parse_usize("budget", &v).map_err(|e| with_var("FREEKV_BUDGET", e))?;
        }
        if let Some(v) = lookup("FREEKV_SINK") {
            c.sink = parse_usize("sink", &v).map_err(|e| with_var("FREEKV_SINK", e))?;
        }
        if let Some(v) = lookup("FREEKV_WINDOW") {
            c.window = parse_usize("window", &v).map_err(|e| with_var("FREEKV_WINDOW", e))?;
        }
        if let Some(v) = lookup("FREEKV_PAGE_SIZE") {
            c.page_size =
                parse_usize("page_size", &v).map_err(|e| with_var("FREEKV_PAGE_SIZE", e))?;
        }
        if let Some(v) = lookup("FREEKV_TAU") {
            c.tau = v.trim().parse().map_err(|_| {
                with_var(
                    "FREEKV_TAU",
                    err("tau", &v, "a number in [-1, 1] (e.g. 0.9)"),
                )
            })?;
        }
        if let Some(v) = lookup("FREEKV_SUMMARY") {
            c.summary = parse_choice("summary", &v, &SummaryKind::ALL)
                .map_err(|e| with_var("FREEKV_SUMMARY", e))?;
        }
        if let Some(v) = lookup("FREEKV_POOLING") {
            c.pooling = parse_choice("pooling", &v, &Pooling::ALL)
                .map_err(|e| with_var("FREEKV_POOLING", e))?;
        }
        if let Some(v) = lookup("FREEKV_MODE") {
            c.mode =
                parse_choice("mode", &v, &Mode::ALL).map_err(|e| with_var("FREEKV_MODE", e))?;
        }
        if let Some(v) = lookup("FREEKV_DEVICE_TIER") {
            c.device_tier = parse_choice("device_tier", &v, &DeviceTier::ALL)
                .map_err(|e| with_var("FREEKV_DEVICE_TIER", e))?;
        }
        if let Some(v) = lookup("FREEKV_DENSE_LAYERS") {
            c.dense_layers =
                parse_layer_list(&v).map_err(|e| anyhow::anyhow!("FREEKV_DENSE_LAYERS: {e}"))?;
        }
        Ok(c)
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
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn shape() -> ModelShape {
        ModelShape {
            num_layers: 4,
            num_q_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
        }
    }

    #[test]
    fn defaults_are_the_spec_and_valid() {
        let c = FreeKvConfig::default();
        assert_eq!(
            (c.page_size, c.budget, c.sink, c.window),
            (32, 2048, 512, 512)
        );
        assert_eq!(c.tau, 0.9);
        assert_eq!(c.dense_layers, vec![0]);
        assert_eq!(c.mode, Mode::FreeKv);
        assert_eq!(c.pages(), (16, 16, 32, 64));
        c.validate(Some(&shape())).unwrap();
        assert!(c.is_dense_layer(0) && !c.is_dense_layer(1));
        let dense = FreeKvConfig {
            mode: Mode::Dense,
            ..Default::default()
        };
        assert!(dense.is_dense_layer(3));
    }

    #[test]
    fn serde_names_and_partial_json() {
        let json = serde_json::to_value(FreeKvConfig::default()).unwrap();
        assert_eq!(json["mode"], "freekv");
        assert_eq!(json["summary"], "min-max");
        assert_eq!(json["pooling"], "softmax-mean");
        assert_eq!(json["device_tier"], "in-place");
        assert_eq!(json["dense_layers"], serde_json::json!([0]));
        let c: FreeKvConfig =
            serde_json::from_str(r#"{"budget": 1024, "mode": "sync", "summary": "centre-mad"}"#)
                .unwrap();
        assert_eq!(c.budget, 1024);
        assert_eq!(c.mode, Mode::Sync);
        assert_eq!(c.summary, SummaryKind::CentreMad);
        assert_eq!(c.sink, 512);
        for (m, name) in Mode::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), name);
        }
        for (m, name) in DeviceTier::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), name);
        }
        for (m, name) in Pooling::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), name);
        }
        for (m, name) in SummaryKind::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), name);
        }
        assert!(serde_json::from_str::<FreeKvConfig>(r#"{"mode": "fast"}"#).is_err());
        assert!(serde_json::from_str::<FreeKvConfig>(r#"{"budgett": 5}"#).is_err());
    }

    #[test]
    fn mode_flags() {
        assert!(!Mode::Dense.speculation() && !Mode::Dense.correction());
        assert!(!Mode::Sync.speculation() && !Mode::Sync.correction());
        assert!(Mode::Speculative.speculation() && !Mode::Speculative.correction());
        assert!(Mode::FreeKv.speculation() && Mode::FreeKv.correction());
    }

    #[test]
    fn layer_lists() {
        assert_eq!(parse_layer_list("0,1,5").unwrap(), vec![0, 1, 5]);
        assert_eq!(parse_layer_list("").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_layer_list("  ").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_layer_list(" 3 , 1,3").unwrap(), vec![1, 3]);
        assert!(parse_layer_list("1,,2")
            .unwrap_err()
            .contains("empty entry"));
        assert!(parse_layer_list("a").unwrap_err().contains("\"a\""));
        assert!(parse_layer_list("-1").is_err());
    }

    fn invalid(f: impl FnOnce(&mut FreeKvConfig)) -> ConfigError {
        let mut c = FreeKvConfig::default();
        f(&mut c);
        c.validate(Some(&shape())).unwrap_err()
    }

    #[test]
    fn every_bad_knob_is_named_with_value_and_range() {
        let e = invalid(|c| c.page_size = 12);
        assert_eq!((e.knob, e.value.as_str()), ("page_size", "12"));
        assert!(e.to_string().contains("8, 16, 32"));
        let e = invalid(|c| c.sink = 100);
        assert_eq!((e.knob, e.value.as_str()), ("sink", "100"));
        assert!(e.valid.contains("multiple of the page size 32"));
        let e = invalid(|c| c.window = 0);
        assert_eq!(e.knob, "window");
        let e = invalid(|c| c.window = 33);
        assert_eq!(e.knob, "window");
        let e = invalid(|c| c.budget = 2050);
        assert_eq!(e.knob, "budget");
        let e = invalid(|c| c.budget = 1024);
        assert_eq!((e.knob, e.value.as_str()), ("budget", "1024"));
        assert!(e.valid.contains("1056"), "{e}");
        let e = invalid(|c| c.tau = 1.5);
        assert_eq!((e.knob, e.value.as_str()), ("tau", "1.5"));
        assert!(e.valid.contains("[-1, 1]"));
        let e = invalid(|c| c.tau = f32::NAN);
        assert_eq!(e.knob, "tau");
        let e = invalid(|c| c.dense_layers = vec![0, 4]);
        assert_eq!(e.knob, "dense_layers");
        assert!(e.to_string().contains("layer 4") && e.to_string().contains("4 layers"));
        // Without a shape the layer list cannot be checked.
        let c = FreeKvConfig {
            dense_layers: vec![99],
            ..Default::default()
        };
        c.validate(None).unwrap();
        let bad_shape = ModelShape {
            num_q_heads: 6,
            num_kv_heads: 4,
            ..shape()
        };
        assert_eq!(
            FreeKvConfig::default()
                .validate(Some(&bad_shape))
                .unwrap_err()
                .knob,
            "model shape"
        );
        // Smallest valid budget: sink + window + one page.
        let c = FreeKvConfig {
            budget: 1056,
            ..Default::default()
        };
        c.validate(Some(&shape())).unwrap();
        // The error converts into anyhow with `?`.
        fn into_anyhow() -> anyhow::Result<()> {
            FreeKvConfig {
                tau: 2.0,
                ..Default::default()
            }
            .validate(None)?;
            Ok(())
        }
        assert!(into_anyhow().unwrap_err().to_string().contains("tau"));
    }

    #[test]
    fn environment_overrides_and_errors() {
        let vars: HashMap<&str, &str> = [
            ("FREEKV_BUDGET", "1024"),
            ("FREEKV_SINK", "128"),
            ("FREEKV_WINDOW", "128"),
            ("FREEKV_TAU", "0.8"),
            ("FREEKV_PAGE_SIZE", "16"),
            ("FREEKV_SUMMARY", "centre-mad"),
            ("FREEKV_POOLING", "max"),
            ("FREEKV_DENSE_LAYERS", ""),
            ("FREEKV_MODE", "speculative"),
            ("FREEKV_DEVICE_TIER", "copy"),
        ]
        .into_iter()
        .collect();
        let c = FreeKvConfig::from_lookup(|n| vars.get(n).map(|s| s.to_string())).unwrap();
        assert_eq!(
            c,
            FreeKvConfig {
                page_size: 16,
                budget: 1024,
                sink: 128,
                window: 128,
                tau: 0.8,
                summary: SummaryKind::CentreMad,
                pooling: Pooling::Max,
                dense_layers: vec![],
                mode: Mode::Speculative,
                device_tier: DeviceTier::Copy,
            }
        );
        c.validate(Some(&shape())).unwrap();
        let one = |name: &'static str, value: &'static str| {
            FreeKvConfig::from_lookup(|n| (n == name).then(|| value.to_string()))
                .unwrap_err()
                .to_string()
        };
        let e = one("FREEKV_MODE", "fast");
        assert!(e.contains("FREEKV_MODE") && e.contains("fast"), "{e}");
        assert!(e.contains("dense, sync, speculative, freekv"), "{e}");
        let e = one("FREEKV_TAU", "high");
        assert!(e.contains("FREEKV_TAU") && e.contains("[-1, 1]"), "{e}");
        let e = one("FREEKV_BUDGET", "-5");
        assert!(e.contains("FREEKV_BUDGET"), "{e}");
        let e = one("FREEKV_DENSE_LAYERS", "0;1");
        assert!(e.contains("FREEKV_DENSE_LAYERS"), "{e}");
        let e = one("FREEKV_DEVICE_TIER", "gpu");
        assert!(e.contains("copy, in-place"), "{e}");
        let e = one("FREEKV_POOLING", "avg");
        assert!(e.contains("softmax-mean, mean, max"), "{e}");
        let e = one("FREEKV_SUMMARY", "box");
        assert!(e.contains("min-max, centre-mad"), "{e}");
        assert_eq!(
            FreeKvConfig::from_lookup(|_| None).unwrap(),
            FreeKvConfig::default()
        );
    }
}
