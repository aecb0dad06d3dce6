//! The attention paths the evaluation compares: the engine's dense eager path and FreeKV
//! configurations (budget, tau, mode).

use freekv_integration_tests::engine::Attention;
use freekv_plugin::{FreeKvConfig, Mode, Selector};

/// One configuration under test.
#[derive(Clone, Debug)]
pub struct Variant {
    /// Short name used in tables and plots ("dense", "b512 t0.9", "b512 sync", ...).
    pub name: String,
    /// FreeKV's configuration (None for the engine's dense eager path).
    pub config: Option<FreeKvConfig>,
}

impl Variant {
    /// The stock engine's eager attention over the whole KV cache.
    pub fn dense() -> Self {
        Self {
            name: "dense".into(),
            config: None,
        }
    }

    /// FreeKV with `budget` tokens: sink and window of a quarter budget each (at most 128
    /// tokens), the rest selected pages of 32 tokens.
    pub fn freekv(budget: usize, tau: f32, mode: Mode) -> Self {
        let edge = (budget / 4).min(128);
        let config = FreeKvConfig {
            budget,
            sink: edge,
            window: edge,
            tau,
            mode,
            ..FreeKvConfig::default()
        };
        let name = match mode {
            Mode::FreeKv => format!("b{budget} t{tau}"),
            Mode::Sync => format!("b{budget} sync"),
            Mode::Speculative => format!("b{budget} spec"),
            Mode::Dense => "FreeKV dense mode".to_string(),
        };
        Self {
            name,
            config: Some(config),
        }
    }

    /// This FreeKV variant with `change` applied to its configuration and `suffix` added to
    /// its name (settings studies).
    pub fn with(mut self, suffix: &str, change: impl FnOnce(&mut FreeKvConfig)) -> Self {
        if let Some(c) = self.config.as_mut() {
            change(c);
            self.name = format!("{} {suffix}", self.name);
        }
        self
    }

    /// The oracle at `budget` (pages by the exact attention mass of the current query, mode
    /// sync): what the budget alone allows.
    pub fn oracle(budget: usize) -> Self {
        let mut v = Self::freekv(budget, 0.9, Mode::Sync);
        if let Some(c) = v.config.as_mut() {
            c.selector = Selector::Oracle;
        }
        v.name = format!("b{budget} oracle");
        v
    }

    /// FreeKV with adaptive correction holding `rate` of the heads corrected (from tau 0.9).
    pub fn adaptive(budget: usize, rate: f32) -> Self {
        let mut v = Self::freekv(budget, 0.9, Mode::FreeKv);
        if let Some(c) = v.config.as_mut() {
            c.correction_rate = rate;
        }
        v.name = format!("b{budget} rate {rate}");
        v
    }

    /// The budget in tokens (None for dense).
    pub fn budget(&self) -> Option<usize> {
        self.config.as_ref().map(|c| c.budget)
    }

    /// How to load the engine for this variant, with room for `context` tokens.
    pub fn attention(&self, context: usize) -> Attention {
        match &self.config {
            None => Attention::Stock,
            Some(c) => Attention::FreeKv {
                config: c.clone(),
                // Whole pages, with room for the generated tokens.
                context_tokens: (context + 256).div_ceil(c.page_size) * c.page_size,
            },
        }
    }
}
