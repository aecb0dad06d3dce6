//! Host-tier and lifecycle behaviour: prefix-cache hits, block-id reuse (no stale summaries),
//! rebuilds when the engine re-feeds a sequence, freeing, errors and counters.

use candle_core::{DType, Device, Tensor};
use freekv_plugin::{
    AttnParams, DecodeRow, DeviceTierLayout, FreeKv, FreeKvConfig, KvDType, Mode, ModelShape,
    PrefillRow, Qkv,
};

use crate::equivalence::{cycled_setup, ALL};
use crate::harness::{tally, Checked, Harness, Limits, Queries};
use crate::rng::Rng;

#[test]
fn prefix_cache_hits_equal_dense_and_decode_on() {
    let mut all = Checked::default();
    for i in 0..40 {
        let seed = 70_000 + i as u64;
        let mut rng = Rng::new(seed);
        let s = cycled_setup(i, &mut rng, &ALL);
        let (p, budget) = (s.p(), s.cfg.budget);
        let mut h = Harness::new(s, seed);
        let a_len = rng.range(2 * p, budget + 3 * p);
        h.prefill(&[(1, a_len, None)], false);
        h.decode(&[1], Queries::Random, false);
        // B shares A's first full pages; C is a plain prompt in the same batch.
        let shared = rng.range(1, a_len / p);
        let b_new = rng.range(1, 2 * p);
        h.prefill(
            &[
                (2, b_new, Some((1, shared))),
                (3, rng.range(1, 3 * p), None),
            ],
            true,
        );
        for _ in 0..3 {
            h.decode(&[1, 2, 3], Queries::Drift { lo: 0.5, hi: 1.0 }, false);
        }
        tally(&mut all, h.checked);
    }
    assert!(all.prefill_rows >= 80, "{all:?}");
    assert!(all.sparse_steps > 0, "{all:?}");
}

#[test]
fn reused_block_ids_get_fresh_summaries() {
    let lim = Limits {
        modes: &[Mode::Sync, Mode::FreeKv, Mode::Speculative],
        ..ALL
    };
    let mut all = Checked::default();
    for i in 0..40 {
        let seed = 80_000 + i as u64;
        let mut rng = Rng::new(seed);
        let mut s = cycled_setup(i, &mut rng, &lim);
        let budget = s.cfg.budget;
        s.num_blocks = (budget + 8 * s.p()).div_ceil(s.p()) + 2;
        let p = s.p();
        let mut h = Harness::new(s, seed);
        h.prefill(&[(1, budget + 3 * p, None)], false);
        h.decode(&[1], Queries::Random, false);
        h.free(1);
        // The pool is small: sequence 2 reuses sequence 1's block ids (in another order).
        h.prefill(&[(2, budget + 2 * p + 1, None)], false);
        for _ in 0..4 {
            h.decode(&[2], Queries::Random, false);
        }
        tally(&mut all, h.checked);
    }
    assert!(all.sparse_steps >= 160, "{all:?}");
}

/// Builds q/k/v tensors for one prompt of `n` tokens of 1 head of dim 4.
fn prompt(keys: &[[f32; 4]]) -> (Tensor, Tensor, Tensor) {
    let n = keys.len();
    let flat: Vec<f32> = keys.iter().flatten().copied().collect();
    let k = Tensor::from_vec(flat, (1, 1, n, 4), &Device::Cpu).unwrap();
    (k.clone(), k.clone(), k)
}

#[test]
fn a_stale_summary_cannot_attract_the_selection() {
    // One KV head, page 8, window 1 page, 1 selected page, no sink.
    let cfg = FreeKvConfig {
        page_size: 8,
        budget: 16,
        sink: 0,
        window: 8,
        dense_layers: vec![],
        mode: Mode::Sync,
        ..Default::default()
    };
    let shape = ModelShape {
        num_layers: 1,
        num_q_heads: 1,
        num_kv_heads: 1,
        head_dim: 4,
    };
    for tier in [DeviceTierLayout::Copy, DeviceTierLayout::InPlace] {
        let fk = FreeKv::new(
            FreeKvConfig {
                device_tier: tier,
                ..cfg.clone()
            },
            shape,
            8,
            KvDType::F32,
        )
        .unwrap();
        fk.set_tracing(true);
        let params = AttnParams::scaled(0.5);
        // Sequence A: block 1 holds huge keys.
        let mut keys = vec![[0.01f32; 4]; 24];
        for k in &mut keys[8..16] {
            *k = [100.0; 4];
        }
        let (q, k, v) = prompt(&keys);
        let row = PrefillRow {
            seq_id: 1,
            block_table: &[0, 1, 2],
            cached_len: 0,
            new_len: 24,
        };
        fk.prefill(0, &[row], Qkv::new(&q, &k, &v), &params, false)
            .unwrap();
        fk.free_sequence(1);
        // Sequence B reuses block 1 for its page 1 with small keys; its page 2 (block 0)
        // holds the keys that match the query.
        let mut keys = vec![[0.01f32; 4]; 32];
        for k in &mut keys[16..24] {
            *k = [1.0; 4];
        }
        let (q, k, v) = prompt(&keys);
        let table = [2u32, 1, 0, 3, 4];
        let row = PrefillRow {
            seq_id: 2,
            block_table: &table[..4],
            cached_len: 0,
            new_len: 32,
        };
        fk.prefill(0, &[row], Qkv::new(&q, &k, &v), &params, false)
            .unwrap();
        let one = Tensor::ones((1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let row = DecodeRow {
            seq_id: 2,
            block_table: &table,
            context_len: 33,
        };
        fk.decode(0, &[row], Qkv::new(&one, &one, &one), &params)
            .unwrap();
        let trace = fk.step_trace(0, 2).unwrap();
        assert!(trace.sparse);
        // Window = page 4; the selection must be page 2 (block 0), not page 1 (block 1,
        // whose old summary said 100).
        assert_eq!(trace.pages, vec![vec![2, 4]], "{tier:?}");
        // Page 2's bound is far above the other candidates': a clear, finite margin.
        let margins = fk.selection_margins(0, 2).unwrap();
        assert!(
            margins.iter().all(|m| m.is_finite() && *m > 1e-3),
            "{tier:?}: {margins:?}"
        );
    }
}

#[test]
fn a_context_that_does_not_continue_rebuilds_from_the_host_tier() {
    let lim = Limits {
        modes: &[Mode::Sync, Mode::FreeKv, Mode::Speculative],
        ..ALL
    };
    for i in 0..30 {
        let seed = 90_000 + i as u64;
        let mut rng = Rng::new(seed);
        let s = cycled_setup(i, &mut rng, &lim);
        let (p, budget) = (s.p(), s.cfg.budget);
        let mut h = Harness::new(s, seed);
        h.prefill(&[(4, budget + rng.range(1, 2 * p), None)], false);
        h.decode(&[4], Queries::Drift { lo: 0.7, hi: 1.0 }, false);
        // The engine re-feeds the last token: same context length again.
        h.decode(&[4], Queries::Random, true);
        assert!(h.last_traces[0][0].blocking);
        h.decode(&[4], Queries::Drift { lo: 0.7, hi: 1.0 }, false);
        h.decode(&[4], Queries::Drift { lo: 0.7, hi: 1.0 }, false);
        assert_eq!(h.fk.counters().total.rebuilds, 1);
    }
}

fn tiny() -> (FreeKvConfig, ModelShape) {
    (
        FreeKvConfig {
            page_size: 8,
            budget: 32,
            sink: 8,
            window: 8,
            dense_layers: vec![],
            ..Default::default()
        },
        ModelShape {
            num_layers: 2,
            num_q_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
        },
    )
}

fn tensors(b: usize, hq: usize, hkv: usize, d: usize) -> (Tensor, Tensor, Tensor) {
    (
        Tensor::ones((b, hq, d), DType::F32, &Device::Cpu).unwrap(),
        Tensor::ones((b, hkv, d), DType::F32, &Device::Cpu).unwrap(),
        Tensor::ones((b, hkv, d), DType::F32, &Device::Cpu).unwrap(),
    )
}

#[test]
fn errors_name_what_is_wrong() {
    let (cfg, shape) = tiny();
    let fk = FreeKv::new(cfg.clone(), shape, 16, KvDType::BF16).unwrap();
    let params = AttnParams::scaled(0.3);
    let (q, k, v) = tensors(1, 4, 2, 8);
    let table = [0u32, 1, 2];
    // Unknown sequence.
    let e = fk
        .decode(
            0,
            &[DecodeRow {
                seq_id: 99,
                block_table: &table,
                context_len: 3,
            }],
            Qkv::new(&q, &k, &v),
            &params,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sequence 99") && e.contains("no FreeKV state"),
        "{e}"
    );
    // A prompt, then bad rows.
    let pq = Tensor::ones((1, 4, 5, 8), DType::F32, &Device::Cpu).unwrap();
    let pk = Tensor::ones((1, 2, 5, 8), DType::F32, &Device::Cpu).unwrap();
    let row = PrefillRow {
        seq_id: 1,
        block_table: &table[..1],
        cached_len: 0,
        new_len: 5,
    };
    fk.prefill(0, &[row], Qkv::new(&pq, &pk, &pk), &params, false)
        .unwrap();
    let e = fk
        .decode(
            0,
            &[DecodeRow {
                seq_id: 1,
                block_table: &[0, 77],
                context_len: 9,
            }],
            Qkv::new(&q, &k, &v),
            &params,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("block id 77") && e.contains("16 blocks"), "{e}");
    let e = fk
        .decode(
            0,
            &[DecodeRow {
                seq_id: 1,
                block_table: &[0],
                context_len: 9,
            }],
            Qkv::new(&q, &k, &v),
            &params,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block table has 1 blocks") && e.contains("9 tokens need 2"),
        "{e}"
    );
    let (q3, k3, v3) = tensors(1, 3, 2, 8);
    let e = fk
        .decode(
            0,
            &[DecodeRow {
                seq_id: 1,
                block_table: &table,
                context_len: 6,
            }],
            Qkv::new(&q3, &k3, &v3),
            &params,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 query heads"), "{e}");
    let e = fk
        .decode(5, &[], Qkv::new(&q, &k, &v), &params)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rows for a batch of 1") || e.contains("layer 5"),
        "{e}"
    );
    let e = fk
        .decode(
            5,
            &[DecodeRow {
                seq_id: 1,
                block_table: &table,
                context_len: 6,
            }],
            Qkv::new(&q, &k, &v),
            &params,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 5") && e.contains("2 layers"), "{e}");
    let e = fk
        .prefill(
            0,
            &[PrefillRow {
                seq_id: 2,
                block_table: &[],
                cached_len: 0,
                new_len: 5,
            }],
            Qkv::new(&pq, &pk, &pk),
            &params,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("sequence 2") && e.contains("block table"), "{e}");
    // Decoding continues after errors; freeing drops the state; unknown ids are a no-op.
    fk.decode(
        0,
        &[DecodeRow {
            seq_id: 1,
            block_table: &table,
            context_len: 6,
        }],
        Qkv::new(&q, &k, &v),
        &params,
    )
    .unwrap();
    fk.free_sequence(1);
    fk.free_sequence(12345);
    let e = fk
        .decode(
            0,
            &[DecodeRow {
                seq_id: 1,
                block_table: &table,
                context_len: 7,
            }],
            Qkv::new(&q, &k, &v),
            &params,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no FreeKV state"), "{e}");
    // Invalid configuration and impossible host tier.
    let e = FreeKv::new(
        FreeKvConfig {
            budget: 20,
            ..cfg.clone()
        },
        shape,
        4,
        KvDType::F32,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("budget") && e.contains("20"), "{e}");
    let e = FreeKv::new(cfg, shape, usize::MAX / 1024, KvDType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("bytes") && e.contains("--pa-memory-mb") && e.contains("--pa-context-len"),
        "{e}"
    );
}

#[test]
fn sizes_and_thread_safety() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FreeKv>();
    let (cfg, shape) = tiny();
    let fk = FreeKv::new(cfg.clone(), shape, 10, KvDType::F16).unwrap();
    // Per layer and block: 2 heads x (K+V) x 8 tokens x 8 dims x 2 bytes, summaries (in the
    // KV dtype) 2 heads x 2 x 8 x 2 bytes, one flag byte.
    assert_eq!(
        fk.host_tier_bytes(),
        2 * 10 * (2 * 2 * 8 * 8 * 2 + 2 * 2 * 8 * 2 + 1)
    );
    let in_place = fk.device_tier_bytes_per_sequence();
    let copy = FreeKv::new(
        FreeKvConfig {
            device_tier: DeviceTierLayout::Copy,
            ..cfg.clone()
        },
        shape,
        10,
        KvDType::F16,
    )
    .unwrap()
    .device_tier_bytes_per_sequence();
    // The copy tier holds the budget's KV, 4 slots x 2 x 8 tokens x 2 heads x 8 dims x 2 B per
    // layer, and the correction test's stored query, 4 query heads x 8 dims x 4 B (f32).
    assert_eq!(copy - in_place, 2 * (4 * 2 * 8 * 2 * 8 * 2 + 4 * 8 * 4));
    let dense0 = FreeKv::new(
        FreeKvConfig {
            dense_layers: vec![0],
            ..cfg
        },
        shape,
        10,
        KvDType::F16,
    )
    .unwrap();
    assert_eq!(dense0.device_tier_bytes_per_sequence() * 2, in_place);
    assert_eq!(fk.config().page_size, 8);
    assert_eq!(fk.shape().num_layers, 2);
}

#[test]
fn counters_add_up() {
    for (mode, tier) in [
        (Mode::FreeKv, DeviceTierLayout::Copy),
        (Mode::Speculative, DeviceTierLayout::InPlace),
        (Mode::Sync, DeviceTierLayout::Copy),
    ] {
        let mut rng = Rng::new(3);
        let mut s = cycled_setup(8, &mut rng, &ALL);
        s.cfg.mode = mode;
        s.cfg.device_tier = tier;
        s.cfg.tau = 0.9;
        let budget = s.cfg.budget;
        let mut h = Harness::new(s, 3);
        h.prefill(&[(1, budget + 5, None), (2, 3, None)], false);
        for _ in 0..6 {
            h.decode(&[1, 2], Queries::Drift { lo: 0.6, hi: 1.0 }, false);
        }
        h.fk.join_background().unwrap();
        let c = h.fk.counters();
        assert_eq!(c.per_layer.len(), 1);
        let t = c.total;
        assert_eq!(t.decode_steps, 12);
        assert_eq!(t.sparse_steps as usize, h.checked.sparse_steps);
        assert_eq!(t.prefill_tokens as usize, budget + 5 + 3);
        assert!(t.pages_recalled > 0);
        assert_eq!(t.bytes_moved > 0, tier == DeviceTierLayout::Copy, "{t:?}");
        match mode {
            Mode::FreeKv => {
                assert_eq!(t.heads_corrected as usize, h.checked.corrected);
                assert_eq!(t.heads_checked as usize, 6 * h.s.shape.num_kv_heads);
                assert!(t.background_ns > 0);
            }
            Mode::Speculative => {
                assert_eq!(t.heads_checked, 0);
                assert!(t.background_ns > 0);
                assert_eq!(t.blocking_selections, 0);
            }
            _ => {
                assert_eq!(t.background_ns, 0);
                assert_eq!(t.blocking_selections, 6);
            }
        }
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["total"]["decode_steps"], 12);
        // Per request: each sequence's own counts, returned when it is freed; the totals keep
        // them.
        let one = h.fk.free_sequence(1).expect("sequence 1 has state");
        let two = h.fk.free_sequence(2).expect("sequence 2 has state");
        assert_eq!(h.fk.free_sequence(1), None);
        assert_eq!((one.decode_steps, two.decode_steps), (6, 6));
        assert_eq!(one.prefill_tokens as usize, budget + 5);
        assert_eq!(two.prefill_tokens, 3);
        assert_eq!(one.sparse_steps + two.sparse_steps, t.sparse_steps);
        assert!(one.sparse_steps > 0);
        assert_eq!(one.pages_recalled + two.pages_recalled, t.pages_recalled);
        assert_eq!(one.heads_corrected + two.heads_corrected, t.heads_corrected);
        // Waits are the layer's (one per call, not per request); background time is per
        // request.
        assert_eq!(one.wait_ns + two.wait_ns, 0);
        assert_eq!(one.background_ns + two.background_ns, t.background_ns);
        assert_eq!(h.fk.counters().total, t);
        assert_eq!(h.fk.live_sequences(), 0);
    }
}
