//! Retrieval beyond the budget: sync equals the brute-force reference; speculation attends
//! over the pages selected with the previous query; correction re-selects exactly the
//! drifting heads; tau = 1 equals sync; both device tiers agree.

use freekv_plugin::{DeviceTierLayout, KvDType, Mode, Selector};

use crate::equivalence::{cycled_setup, ALL, FAST_DIMS};
use crate::harness::{tally, Checked, Harness, Limits, PromptSpec, Queries, Setup};
use crate::rng::Rng;

/// Sequences whose prompts end around and beyond the budget, decoded `steps` steps.
fn run(seed: u64, s: Setup, rng: &mut Rng, queries: Queries, steps: usize) -> Harness {
    let p = s.p();
    run_beyond(seed, s, rng, queries, steps, 0..5 * p)
}

/// Sequences whose prompts end `beyond` tokens past the budget minus two pages.
fn run_beyond(
    seed: u64,
    s: Setup,
    rng: &mut Rng,
    queries: Queries,
    steps: usize,
    beyond: std::ops::Range<usize>,
) -> Harness {
    let p = s.p();
    let budget = s.cfg.budget;
    let mut h = Harness::new(s, seed);
    let b = rng.range(1, 3);
    let rows: Vec<PromptSpec> = (0..b)
        .map(|r| {
            let len = (budget + rng.range(beyond.start, beyond.end))
                .saturating_sub(2 * p)
                .max(1);
            (r as u64 + 10, len, None)
        })
        .collect();
    h.prefill(&rows, rng.chance(0.3));
    let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
    for _ in 0..steps {
        h.decode(&ids, queries, false);
    }
    h
}

fn campaign(
    first_seed: u64,
    cases: usize,
    lim: &Limits,
    queries: Queries,
    steps: usize,
) -> Checked {
    let mut all = Checked::default();
    for i in 0..cases {
        let seed = first_seed + i as u64;
        let mut rng = Rng::new(seed);
        let s = cycled_setup(i, &mut rng, lim);
        let h = run(seed, s, &mut rng, queries, steps);
        tally(&mut all, h.checked);
    }
    all
}

#[test]
fn sync_mode_equals_the_brute_force_reference() {
    let lim = Limits {
        modes: &[Mode::Sync],
        head_dims: &FAST_DIMS,
        ..ALL
    };
    let all = campaign(20_000, 160, &lim, Queries::Random, 4);
    assert!(all.sparse_steps > 400, "{all:?}");
    assert!(
        all.dense_steps > 0,
        "some sequences cross the budget during decode: {all:?}"
    );
    // Ties are rare; most selections match the reference exactly.
    assert!(all.tie_resolved * 20 < all.heads_compared, "{all:?}");
}

/// The oracle selector (a diagnostic: pages by their exact attention mass, pooled over the
/// group) against its brute-force reference, in every retrieving mode and both device tiers:
/// the pages each head attends are the reference's top-k by mass of the query the mode
/// selects with (the current one, or the previous one over the context it was stored at).
#[test]
fn the_oracle_selects_the_pages_with_the_largest_exact_attention_mass() {
    let lim = Limits {
        modes: &[Mode::Sync, Mode::FreeKv, Mode::Speculative],
        head_dims: &FAST_DIMS,
        ..ALL
    };
    let mut all = Checked::default();
    for i in 0..90 {
        let seed = 25_000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &lim);
        s.cfg.selector = Selector::Oracle;
        s.cfg.device_tier = [DeviceTierLayout::InPlace, DeviceTierLayout::Copy][i % 2];
        let queries = Queries::Drift { lo: 0.5, hi: 1.0 };
        let h = run(seed, s, &mut rng, queries, 4);
        tally(&mut all, h.checked);
    }
    assert!(all.sparse_steps > 200, "{all:?}");
    assert!(all.tie_resolved * 20 < all.heads_compared, "{all:?}");
}

/// The rerank selector against its brute-force reference in every retrieving mode and both
/// device tiers, shortlists of 1 to 4 times the selected pages: the pages each head attends
/// are the reference's top-k by token-level attention weight within the page-bound shortlist.
#[test]
fn the_rerank_selects_the_shortlisted_pages_whose_tokens_weigh_most() {
    let lim = Limits {
        modes: &[Mode::Sync, Mode::FreeKv, Mode::Speculative],
        head_dims: &FAST_DIMS,
        ..ALL
    };
    let mut all = Checked::default();
    let mut both_stages = 0;
    for i in 0..120 {
        let seed = 27_000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &lim);
        s.cfg.selector = Selector::Rerank;
        s.cfg.shortlist = 1 + i % 4;
        s.cfg.device_tier = [DeviceTierLayout::InPlace, DeviceTierLayout::Copy][i % 2];
        // Contexts with more candidates than the shortlist, so both stages decide.
        let (p, k) = (s.p(), s.sel_pages());
        let reach = (s.cfg.shortlist + 2) * k * p;
        let h = run_beyond(
            seed,
            s,
            &mut rng,
            Queries::Drift { lo: 0.5, hi: 1.0 },
            4,
            reach..reach + 4 * p,
        );
        let cand = h.s.candidates(h.seqs[0].len).len();
        if h.s.cfg.shortlist > 1 && h.s.cfg.shortlist * k < cand {
            both_stages += 1;
        }
        tally(&mut all, h.checked);
    }
    assert!(all.sparse_steps > 250, "{all:?}");
    assert!(
        both_stages > 60,
        "cases where both stages decide: {both_stages}"
    );
    assert!(all.tie_resolved * 20 < all.heads_compared, "{all:?}");
}

#[test]
fn speculation_attends_over_the_pages_selected_with_the_previous_query() {
    let lim = Limits {
        modes: &[Mode::Speculative],
        head_dims: &FAST_DIMS,
        ..ALL
    };
    let all = campaign(30_000, 120, &lim, Queries::Random, 4);
    assert!(all.sparse_steps > 300, "{all:?}");
    assert_eq!(all.corrected, 0);
}

#[test]
fn correction_reselects_the_drifting_heads_before_attention() {
    let lim = Limits {
        modes: &[Mode::FreeKv],
        head_dims: &FAST_DIMS,
        ..ALL
    };
    let all = campaign(40_000, 120, &lim, Queries::Drift { lo: 0.4, hi: 1.0 }, 4);
    assert!(all.sparse_steps > 300, "{all:?}");
    assert!(
        all.corrected > 50 && all.corrected < all.heads_compared,
        "{all:?}"
    );
}

/// Adaptive correction: each step's corrected heads are those below the thresholds the spec's
/// rule has moved to (every layer and KV head on its own), and the rate follows the target.
#[test]
fn adaptive_correction_follows_its_thresholds_per_layer_and_head() {
    let lim = Limits {
        modes: &[Mode::FreeKv],
        head_dims: &FAST_DIMS,
        ..ALL
    };
    let mut all = Checked::default();
    let mut moved = 0usize;
    for (i, rate) in [0.1f32, 0.3, 0.6].into_iter().cycle().take(24).enumerate() {
        let seed = 45_000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &lim);
        s.cfg.correction_rate = rate;
        s.cfg.tau = 0.9;
        // Query cosines straddle the starting threshold, so its moves change decisions.
        let h = run(seed, s, &mut rng, Queries::Drift { lo: 0.75, hi: 1.0 }, 30);
        moved += h
            .taus
            .iter()
            .flatten()
            .filter(|&&t| (t - 0.9).abs() > 0.02)
            .count();
        tally(&mut all, h.checked);
    }
    assert!(all.sparse_steps > 500, "{all:?}");
    assert!(moved > 20, "thresholds barely moved: {moved}");
}

#[test]
fn crafted_drift_corrects_exactly_the_drifting_heads() {
    let mut rng = Rng::new(77);
    let mut s = cycled_setup(
        3,
        &mut rng,
        &Limits {
            modes: &[Mode::FreeKv],
            ..ALL
        },
    );
    s.shape.num_kv_heads = 4;
    s.shape.num_q_heads = 4 * 2;
    s.cfg.tau = 0.9;
    s.params.sliding_window = None;
    let budget = s.cfg.budget;
    let mut h = Harness::new(s, 77);
    h.prefill(&[(1, budget + 9, None)], false);
    h.decode(&[1], Queries::Drifting(0), false);
    for mask in [0b0000u64, 0b0101, 0b1000, 0b1111, 0b0110] {
        let before = h.fk.counters().total;
        h.decode(&[1], Queries::Drifting(mask), false);
        let trace = &h.last_traces[0][0];
        let want: Vec<bool> = (0..4).map(|b| mask & (1 << b) != 0).collect();
        assert_eq!(trace.corrected, want, "mask {mask:04b}");
        let after = h.fk.counters().total;
        assert_eq!(after.heads_checked - before.heads_checked, 4);
        assert_eq!(
            after.heads_corrected - before.heads_corrected,
            mask.count_ones() as u64
        );
        // tau = 0.9 is the lower edge of the last similarity bin: every head below it was
        // corrected, every head in it was not.
        let delta: Vec<u64> = (0..20)
            .map(|b| after.similarity_histogram[b] - before.similarity_histogram[b])
            .collect();
        assert_eq!(delta.iter().sum::<u64>(), 4, "{delta:?}");
        assert_eq!(
            delta[..19].iter().sum::<u64>(),
            mask.count_ones() as u64,
            "mask {mask:04b}: {delta:?}"
        );
    }
}

/// Runs the same inputs through two configurations and compares outputs and pages: at sparse
/// steps equal up to one unit of the output dtype (both attend the same pages, but after
/// different histories of replacements they may sit in other slots, so the f32 sums round
/// differently and a 16-bit output can move by one unit), within the reference's tolerance at
/// dense ones (a working set holding every page visits them in slot order, the host tier in
/// page order).
fn same_inputs(seed: u64, a: Setup, b: Setup, steps: usize) {
    let mut ra = Rng::new(seed);
    let mut rb = Rng::new(seed);
    let mut ha = run(seed, a, &mut ra, Queries::Drift { lo: 0.5, hi: 1.0 }, 0);
    let mut hb = run(seed, b, &mut rb, Queries::Drift { lo: 0.5, hi: 1.0 }, 0);
    let ids: Vec<u64> = ha.seqs.iter().map(|s| s.id).collect();
    for _ in 0..steps {
        ha.decode(&ids, Queries::Drift { lo: 0.5, hi: 1.0 }, false);
        hb.decode(&ids, Queries::Drift { lo: 0.5, hi: 1.0 }, false);
        let per_row = ha.s.shape.num_q_heads * ha.s.shape.head_dim;
        let rows = ha.last_outputs[0]
            .chunks(per_row)
            .zip(hb.last_outputs[0].chunks(per_row));
        for ((xs, ys), trace) in rows.zip(&ha.last_traces[0]) {
            for (&x, &y) in xs.iter().zip(ys) {
                let tol = if trace.sparse {
                    one_unit(ha.s.dtype, x)
                } else {
                    ha.s.tolerance() * (1.0 + x.abs())
                };
                assert!((x - y).abs() <= tol, "{x} vs {y}");
            }
        }
        for (ta, tb) in ha.last_traces[0].iter().zip(&hb.last_traces[0]) {
            assert_eq!(ta.pages, tb.pages);
            assert_eq!(ta.sparse, tb.sparse);
        }
    }
}

/// One unit in the last place of `dtype` around `x` (for f32, its rounding in sums: 1e-5
/// relative).
fn one_unit(dtype: KvDType, x: f32) -> f32 {
    let (mantissa_bits, min_exponent) = match dtype {
        KvDType::F32 => return 1e-5 * (1.0 + x.abs()),
        KvDType::F16 => (10, -14),
        KvDType::BF16 => (7, -126),
    };
    let exponent = x.abs().log2().floor().max(min_exponent as f32);
    2f32.powf(exponent - mantissa_bits as f32)
}

#[test]
fn one_unit_is_the_spacing_of_16_bit_values() {
    let next_f16 = |x: f32| half::f16::from_bits(half::f16::from_f32(x).to_bits() + 1).to_f32();
    let next_bf16 = |x: f32| half::bf16::from_bits(half::bf16::from_f32(x).to_bits() + 1).to_f32();
    for x in [0.055847168f32, 1.0, 1.5, 300.0, 1e-6] {
        let x16 = half::f16::from_f32(x).to_f32();
        assert_eq!(
            one_unit(KvDType::F16, x16),
            next_f16(x16) - x16,
            "f16 at {x}"
        );
        let xb = half::bf16::from_f32(x).to_f32();
        assert_eq!(
            one_unit(KvDType::BF16, xb),
            next_bf16(xb) - xb,
            "bf16 at {x}"
        );
    }
}

#[test]
fn tau_one_equals_sync() {
    for i in 0..30 {
        let seed = 50_000 + i as u64;
        let lim = Limits {
            modes: &[Mode::Sync],
            head_dims: &FAST_DIMS,
            ..ALL
        };
        let sync = cycled_setup(i, &mut Rng::new(seed), &lim);
        let mut freekv = sync.clone();
        freekv.cfg.mode = Mode::FreeKv;
        freekv.cfg.tau = 1.0;
        same_inputs(seed, sync, freekv, 4);
    }
}

/// The number of background workers changes when a layer's work runs, not what it does: one
/// worker and four give the same pages and outputs, step for step.
#[test]
fn the_worker_count_does_not_change_results() {
    for i in 0..8 {
        let seed = 51_000 + i as u64;
        let lim = Limits {
            modes: &[Mode::FreeKv, Mode::Speculative],
            head_dims: &FAST_DIMS,
            ..ALL
        };
        let mut one = cycled_setup(i, &mut Rng::new(seed), &lim);
        one.cfg.workers = 1;
        let mut four = one.clone();
        four.cfg.workers = 4;
        same_inputs(seed, one, four, 6);
    }
}

/// A head corrected on the critical path was selected with the query the worker would use
/// for the next step: over the same candidates the worker keeps that selection instead of
/// repeating it (the pages stay the reference's, as every step checks), so with every head
/// corrected (tau = 1) the worker selects only where a page boundary moved the candidates.
#[test]
fn the_worker_does_not_repeat_a_selection_made_on_the_critical_path() {
    let lim = Limits {
        modes: &[Mode::FreeKv],
        head_dims: &FAST_DIMS,
        ..ALL
    };
    for i in 0..12 {
        let seed = 52_000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &lim);
        s.cfg.tau = 1.0;
        let h = run(seed, s, &mut rng, Queries::Random, 24);
        let c = h.fk.counters().total;
        let worker = c.head_selections - c.heads_corrected;
        assert!(c.heads_corrected > 0, "{c:?}");
        assert!(
            worker * 3 < c.heads_corrected,
            "seed {seed}: the worker selected {worker} heads for {} corrected",
            c.heads_corrected
        );
    }
}

/// The copy layout is the offload backend (the CUDA backend's orchestration: plans, chunk
/// moves, appends, decode over the slots) on host memory: on 30 seeded cases it equals the CPU
/// backend, which reads the working set in place, step for step.
#[test]
fn the_offload_backend_on_host_memory_equals_the_cpu_backend() {
    for i in 0..30 {
        let seed = 60_000 + i as u64;
        let lim = Limits {
            modes: &[Mode::FreeKv, Mode::Speculative, Mode::Sync],
            head_dims: &FAST_DIMS,
            ..ALL
        };
        let mut copy = cycled_setup(i, &mut Rng::new(seed), &lim);
        copy.cfg.device_tier = DeviceTierLayout::Copy;
        let mut in_place = copy.clone();
        in_place.cfg.device_tier = DeviceTierLayout::InPlace;
        same_inputs(seed, copy, in_place, 4);
    }
}

/// Budgets large enough that the CPU backend spreads a sparse step's KV heads over threads
/// (budget x KV heads >= 8192): sync and FreeKV steps still equal the reference, in both
/// device tiers.
#[test]
fn large_budgets_attend_their_heads_in_parallel_and_equal_the_reference() {
    let lim = Limits {
        modes: &[Mode::Sync, Mode::FreeKv],
        head_dims: &[64],
        ..ALL
    };
    let mut all = Checked::default();
    for i in 0..4 {
        let seed = 9000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &lim);
        let p = s.p();
        let g = s.group();
        s.shape.num_kv_heads = 2;
        s.shape.num_q_heads = 2 * g;
        s.shape.num_layers = 1;
        s.num_blocks = 1024;
        s.cfg.budget = 4096 / p * p;
        s.cfg.device_tier = [DeviceTierLayout::InPlace, DeviceTierLayout::Copy][i % 2];
        s.cfg.validate(Some(&s.shape)).unwrap();
        let budget = s.cfg.budget;
        let mut h = Harness::new(s, seed);
        h.prefill(&[(1, budget + rng.range(p + 1, 4 * p), None)], false);
        for _ in 0..3 {
            h.decode(&[1], Queries::Random, false);
        }
        assert_eq!(h.checked.sparse_steps, 3);
        tally(&mut all, h.checked);
    }
    assert_eq!(all.sparse_steps, 12);
}
