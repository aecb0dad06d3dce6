//! The selection probe on a live instance, on both device tiers: in mode `dense` it measures
//! every step of every retrieving layer past the budget without changing the output (the
//! harness checks it against dense attention), and in mode `sync` its estimator for the
//! product's selector ranks exactly the pages the step attended.

use freekv_plugin::probe::{Estimator, ProbeSpec};
use freekv_plugin::{DeviceTierLayout, Mode, Policy, Pooling, Selector, SummaryKind};

use crate::equivalence::{cycled_setup, ALL, FAST_DIMS};
use crate::harness::{Harness, Limits, Queries};
use crate::rng::Rng;

#[test]
fn a_probe_measures_every_sparse_step_and_its_quest_estimator_is_the_products_selection() {
    for i in 0..24 {
        let seed = 70_000 + i as u64;
        let mut rng = Rng::new(seed);
        let lim = Limits {
            modes: &[Mode::Sync],
            head_dims: &FAST_DIMS,
            ..ALL
        };
        let mut s = cycled_setup(i, &mut rng, &lim);
        // The probe reads keys on either tier (the copy tier after settling the step's tokens).
        s.cfg.device_tier = [DeviceTierLayout::InPlace, DeviceTierLayout::Copy][i % 2];
        // The product's selector as the probe's first estimator computes it.
        s.cfg.summary = SummaryKind::MinMax;
        s.cfg.pooling = Pooling::SoftmaxMean;
        s.params.sliding_window = None;
        let (p, budget, layers) = (s.p(), s.cfg.budget, s.shape.num_layers);
        let dense: Vec<usize> = s.cfg.dense_layers.clone();
        let sel = s.sel_pages();
        let mut h = Harness::new(s, seed);
        let len = budget + rng.range(2 * p, 6 * p);
        h.prefill(&[(1, len, None)], false);
        let pages = (len + 8).div_ceil(p);
        h.fk.set_probe(Some(ProbeSpec {
            estimators: vec![
                Estimator::quest(p),
                Estimator {
                    scaled: true,
                    ..Estimator::quest(p)
                },
            ],
            splits: vec![],
            watch: (0..pages).collect(),
        }))
        .unwrap();
        // Dense mode: measured, outputs still dense (the harness checks every step).
        h.fk.set_policy(Policy {
            mode: Mode::Dense,
            selector: Selector::Quest,
            shortlist: 2,
        })
        .unwrap();
        h.s.cfg.mode = Mode::Dense;
        for _ in 0..3 {
            h.decode(&[1], Queries::Random, false);
        }
        let report = h.fk.take_probe();
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert_eq!(report.estimators.len(), 2);
        for l in 0..layers {
            if dense.contains(&l) {
                assert!(report.layers[l].is_empty(), "dense layer {l} was probed");
                continue;
            }
            for head in &report.layers[l] {
                assert_eq!(head.steps, 3, "layer {l}");
                let s = &head.splits[0];
                assert!(s.fixed <= s.oracle + 1e-9 && s.oracle <= s.oracle_per_head + 1e-9);
                // Sums over the 3 steps of shares of 1.
                assert!(s.oracle_per_head <= 3.0 * (1.0 + 1e-5), "{s:?}");
            }
        }
        assert!(report.watch.iter().all(|w| w.resident.is_none()));
        // Sync mode: each step attends sink + window + the top-k of the product's scores.
        h.fk.set_policy(Policy {
            mode: Mode::Sync,
            selector: Selector::Quest,
            shortlist: 2,
        })
        .unwrap();
        h.s.cfg.mode = Mode::Sync;
        for _ in 0..3 {
            h.decode(&[1], Queries::Random, false);
        }
        let report = h.fk.take_probe();
        let mut checked = 0;
        for w in &report.watch {
            let Some(resident) = w.resident else { continue };
            // Candidates: attended iff among the k best (ties are broken alike).
            if let Some(rank) = w.ranks[0] {
                assert_eq!(resident, rank <= sel, "seed {seed}: {w:?}");
            }
            checked += 1;
        }
        assert!(checked > 0, "seed {seed}");
    }
}
