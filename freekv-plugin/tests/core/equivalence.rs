//! Budget >= context: FreeKV equals dense attention at every prefill and decode step; mode
//! `dense` and dense layers stay dense beyond the budget.

use freekv_plugin::{KvDType, Mode};

use crate::harness::{random_setup, tally, Checked, Harness, Limits, PromptSpec, Queries, Setup};
use crate::rng::Rng;

pub const GROUPS: [usize; 6] = [1, 2, 3, 4, 7, 8];
pub const HEAD_DIMS: [usize; 2] = [64, 128];
pub const PAGE_SIZES: [usize; 3] = [8, 16, 32];

/// Head dims of the retrieval campaigns: small ones keep the debug-build suite fast, 64 and 128
/// are the real models'.
pub const FAST_DIMS: [usize; 4] = [16, 64, 32, 128];

pub const ALL: Limits = Limits {
    groups: &GROUPS,
    head_dims: &HEAD_DIMS,
    page_sizes: &PAGE_SIZES,
    dtypes: &[KvDType::F32, KvDType::F16, KvDType::BF16],
    modes: &[Mode::Dense, Mode::Sync, Mode::Speculative, Mode::FreeKv],
    max_kv_heads: 2,
};

/// Case `i`'s setup: group size, head dim and page size cycle through every combination;
/// the rest is random.
pub fn cycled_setup(i: usize, rng: &mut Rng, lim: &Limits) -> Setup {
    let mut s = random_setup(rng, lim);
    let g = GROUPS[i % GROUPS.len()];
    let dims = lim.head_dims;
    let d = dims[(i / GROUPS.len()) % dims.len()];
    let p = PAGE_SIZES[(i / (GROUPS.len() * dims.len())) % PAGE_SIZES.len()];
    let old_p = s.cfg.page_size;
    s.cfg.page_size = p;
    s.cfg.sink = s.cfg.sink / old_p * p;
    s.cfg.window = s.cfg.window / old_p * p;
    s.cfg.budget = s.cfg.budget / old_p * p;
    if let Some(w) = s.params.sliding_window.as_mut() {
        *w = *w / old_p * p;
    }
    s.shape.num_q_heads = s.shape.num_kv_heads * g;
    s.shape.head_dim = d;
    s.params.softmax_scale = 1.0 / (d as f32).sqrt();
    s
}

#[test]
fn budget_covering_the_context_equals_dense_attention() {
    let mut all = Checked::default();
    let cases = 360;
    for i in 0..cases {
        let seed = 1000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &ALL);
        let p = s.p();
        let steps = rng.range(2, 4);
        let max_prompt = rng.range(1, 3 * p);
        // Enough slots for the longest sequence after its last step.
        let need = (max_prompt + steps).div_ceil(p) * p;
        s.cfg.budget = s.cfg.budget.max(need);
        s.cfg.validate(Some(&s.shape)).unwrap();
        let mut h = Harness::new(s, seed);
        let b = rng.range(1, 3);
        let rows: Vec<PromptSpec> = (0..b)
            .map(|r| (r as u64 + 1, rng.range(1, max_prompt), None))
            .collect();
        h.prefill(&rows, rng.chance(0.8));
        let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
        for _ in 0..steps {
            h.decode(&ids, Queries::Random, false);
        }
        assert_eq!(h.checked.sparse_steps, 0);
        assert_eq!(h.checked.dense_steps, b * steps);
        tally(&mut all, h.checked);
    }
    assert!(all.prefill_rows > cases);
}

/// Prefill attention alone, on prompts long enough for many query tiles and the parallel
/// path (up to ~9 pages), lengths that are no multiple of a tile or page, batches of rows with
/// and without a cached prefix of another sequence's pages: every output row equals naive
/// causal attention (f64) within the storage type's tolerance.
#[test]
fn prefill_of_long_prompts_and_cached_prefixes_equals_naive_attention() {
    let mut all = Checked::default();
    let (cases, mut want_rows) = (72, 0);
    for i in 0..cases {
        let seed = 5000 + i as u64;
        let mut rng = Rng::new(seed);
        let s = cycled_setup(i, &mut rng, &ALL);
        let p = s.p();
        s.cfg.validate(Some(&s.shape)).unwrap();
        let layers = s.shape.num_layers;
        let mut h = Harness::new(s, seed);
        let src_len = rng.range(p + 1, 4 * p + 7);
        h.prefill(&[(1, src_len, None)], true);
        let b = rng.range(1, 3);
        let rows: Vec<PromptSpec> = (0..b)
            .map(|r| {
                let prefix = rng.chance(0.6).then(|| (1, rng.range(1, src_len / p)));
                (r as u64 + 2, rng.range(1, 5 * p + 3), prefix)
            })
            .collect();
        h.prefill(&rows, true);
        want_rows += (1 + b) * layers;
        let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
        h.decode(&ids, Queries::Random, false);
        tally(&mut all, h.checked);
    }
    // Every row of every layer was compared.
    assert_eq!(all.prefill_rows, want_rows);
}

#[test]
fn dense_mode_stays_dense_beyond_the_budget() {
    let lim = Limits {
        modes: &[Mode::Dense],
        ..ALL
    };
    for i in 0..60 {
        let seed = 5000 + i as u64;
        let mut rng = Rng::new(seed);
        let s = cycled_setup(i, &mut rng, &lim);
        let p = s.p();
        let budget = s.cfg.budget;
        let mut h = Harness::new(s, seed);
        let prompt = budget + rng.range(1, 2 * p);
        h.prefill(&[(1, prompt, None)], false);
        for _ in 0..3 {
            h.decode(&[1], Queries::Random, false);
        }
        assert_eq!(h.checked.dense_steps, 3);
        assert_eq!(h.fk.counters().total.sparse_steps, 0);
        assert_eq!(h.fk.device_tier_bytes_per_sequence(), 0);
    }
}

/// Dense decode steps over contexts long enough that the CPU backend spreads the KV heads
/// over threads (context x KV heads >= 8192) equal naive attention.
#[test]
fn dense_steps_over_long_contexts_equal_naive_attention() {
    let lim = Limits {
        modes: &[Mode::Dense],
        ..ALL
    };
    for i in 0..6 {
        let seed = 7000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &lim);
        let g = s.group();
        s.shape.num_kv_heads = 2;
        s.shape.num_q_heads = 2 * g;
        s.shape.num_layers = 1;
        s.num_blocks = 1024;
        let mut h = Harness::new(s, seed);
        let prompt = rng.range(4100, 4700);
        h.prefill(&[(1, prompt, None)], false);
        for _ in 0..2 {
            h.decode(&[1], Queries::Random, false);
        }
        assert_eq!(h.checked.dense_steps, 2);
    }
}

#[test]
fn dense_layers_attend_densely_and_the_others_retrieve() {
    let lim = Limits {
        modes: &[Mode::Sync, Mode::FreeKv],
        ..ALL
    };
    for i in 0..24 {
        let seed = 6000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &lim);
        s.shape.num_layers = 3;
        s.cfg.dense_layers = vec![0, 2];
        let budget = s.cfg.budget;
        let mut h = Harness::new(s, seed);
        h.prefill(&[(7, budget + 3, None)], false);
        for _ in 0..3 {
            h.decode(&[7], Queries::Drift { lo: 0.6, hi: 0.99 }, false);
        }
        // Per step: layers 0 and 2 dense, layer 1 sparse.
        assert_eq!(h.checked.dense_steps, 6);
        assert_eq!(h.checked.sparse_steps, 3);
        let c = h.fk.counters();
        assert_eq!(c.per_layer[0].sparse_steps, 0);
        assert_eq!(c.per_layer[1].sparse_steps, 3);
        assert_eq!(c.per_layer[2].sparse_steps, 0);
        assert_eq!(c.total.decode_steps, 9);
        assert!(h.fk.device_tier_bytes_per_sequence() > 0);
    }
}
