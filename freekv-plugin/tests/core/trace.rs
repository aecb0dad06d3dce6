//! A small deterministic trace kept as an insta snapshot: per step, the pages each KV head
//! attended and which heads were corrected. The prompt ends below the budget, so the trace
//! shows the dense steps, the first (blocking) sparse step, speculative steps, corrections of
//! drifting heads and window shifts at page boundaries.

use freekv_plugin::{FreeKvConfig, KvDType, Mode, ModelShape};
use serde::Serialize;

use crate::harness::{Harness, Queries, Setup};

#[derive(Serialize)]
struct Step {
    step: usize,
    len: usize,
    /// dense | blocking | speculative
    kind: &'static str,
    /// Per KV head, the pages attended.
    pages: Vec<String>,
    /// KV heads corrected before attention.
    corrected: Vec<usize>,
}

#[test]
fn speculative_timeline_trace() {
    let s = Setup {
        cfg: FreeKvConfig {
            page_size: 8,
            budget: 40,
            sink: 8,
            window: 16,
            tau: 0.9,
            dense_layers: vec![],
            mode: Mode::FreeKv,
            ..Default::default()
        },
        shape: ModelShape {
            num_layers: 1,
            num_q_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
        },
        dtype: KvDType::F32,
        num_blocks: 32,
        params: freekv_plugin::AttnParams::scaled(0.35),
    };
    let mut h = Harness::new(s, 2024);
    h.prefill(&[(1, 37, None)], false);
    // Bit h set: KV head h's queries jump (cosine ~0); otherwise they repeat.
    let masks = [
        0u64, 0b01, 0, 0b10, 0b11, 0, 0, 0b01, 0, 0, 0b10, 0, 0, 0b01, 0, 0b11, 0, 0, 0b10, 0,
    ];
    let mut steps = Vec::new();
    for (i, mask) in masks.into_iter().enumerate() {
        h.decode(&[1], Queries::Drifting(mask), false);
        let t = &h.last_traces[0][0];
        steps.push(Step {
            step: i + 1,
            len: t.len,
            kind: match (t.sparse, t.blocking) {
                (false, _) => "dense",
                (true, true) => "blocking",
                (true, false) => "speculative",
            },
            pages: t
                .pages
                .iter()
                .enumerate()
                .map(|(h, p)| format!("h{h}: {p:?}"))
                .collect(),
            corrected: t
                .corrected
                .iter()
                .enumerate()
                .filter(|(_, c)| **c)
                .map(|(h, _)| h)
                .collect(),
        });
    }
    insta::assert_yaml_snapshot!(steps);
}
