//! The probe against brute force: the group oracle's captured mass is the best over every
//! k-subset of candidates, no estimator captures more, the per-head oracle bounds both; and a
//! probe on a live instance measures every sparse step of every retrieving layer.

use std::sync::Arc;

use super::*;
use crate::{Pooling, SummaryKind};

struct Lcg(u64);

impl Lcg {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn geo(budget: usize) -> Geometry {
    Geometry::for_test(budget, 8, 8, (2, 6, 2, 4))
}

/// Every k-subset of `0..n`.
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![vec![]];
    }
    if n < k {
        return vec![];
    }
    let mut out = subsets(n - 1, k);
    for mut s in subsets(n - 1, k - 1) {
        s.push(n - 1);
        out.push(s);
    }
    out
}

fn estimators() -> Vec<Estimator> {
    let quest = Estimator::quest(8);
    vec![
        quest,
        Estimator {
            scaled: true,
            ..quest
        },
        Estimator {
            sub: 4,
            scaled: true,
            ..quest
        },
        Estimator {
            sub: 2,
            scaled: true,
            combine: Combine::Mass,
            ..quest
        },
        Estimator {
            pooling: Pooling::Max,
            summary: SummaryKind::CentreMad,
            ..quest
        },
        Estimator {
            proxy_bits: 2,
            ..quest
        },
        Estimator {
            proxy_bits: 1,
            shortlist: 2,
            ..quest
        },
    ]
}

#[test]
fn the_oracle_captures_the_most_mass_of_any_subset_and_bounds_every_estimator() {
    for seed in 0..40u64 {
        let mut rng = Lcg(seed * 7919 + 1);
        let g = geo(40);
        let len = 60 + (seed as usize * 13) % 50;
        let spec = Arc::new(ProbeSpec {
            estimators: estimators(),
            splits: vec![
                Split { sink: 8, window: 8 },
                Split {
                    sink: 0,
                    window: 16,
                },
            ],
            watch: vec![3, 4],
        });
        let geos = spec.geometries(&g).unwrap();
        let mut lp = LayerProbe::new(spec.clone(), geos.clone(), 2);
        lp.m.q = (0..12).map(|_| rng.f() * 2.0).collect();
        lp.m.keys = (0..len * 4).map(|_| rng.f() * 3.0).collect();
        let params = AttnParams {
            softmax_scale: 0.5,
            softcap: None,
            sliding_window: (seed % 3 == 0).then_some(40),
        };
        measure_head(&mut lp, &params, len, 1, 1, Some(&[0, 3, 7]));
        let stats = &lp.heads[1];
        assert_eq!(stats.steps, 1);
        // Brute force: the exact masses, every subset.
        let (mut masses, mut logits) = (Vec::new(), Vec::new());
        page_masses(
            &g,
            &params,
            &lp.m.q,
            &lp.m.keys,
            len,
            &mut masses,
            &mut logits,
        );
        let pages = g.pages(len);
        for (s, sg) in geos.iter().enumerate() {
            let cand = sg.candidates(len, &params);
            let k = sg.sel_pages.min(cand.len());
            let group = |j: usize| (0..3).map(|h| masses[h * pages + j] as f64).sum::<f64>() / 3.0;
            let fixed: f64 = sg.fixed_pages(len).map(|(j, _)| group(j)).sum();
            let best = subsets(cand.len(), k)
                .iter()
                .map(|set| set.iter().map(|&c| group(cand.start + c)).sum::<f64>())
                .fold(f64::NEG_INFINITY, f64::max);
            let st = &stats.splits[s];
            assert!((st.fixed - fixed).abs() < 1e-5, "seed {seed} split {s}");
            assert!(
                (st.oracle - (fixed + best)).abs() < 1e-5,
                "seed {seed} split {s}"
            );
            assert!(st.oracle_per_head >= st.oracle - 1e-6);
            assert!(st.oracle_per_head <= 1.0 + 1e-5);
            for (e, (&m, &r)) in st.mass.iter().zip(&st.recall).enumerate() {
                assert!(
                    m <= st.oracle + 1e-6,
                    "seed {seed}: estimator {e} beats the oracle"
                );
                assert!(m >= st.fixed - 1e-9);
                assert!((0.0..=1.0).contains(&r));
            }
        }
        // Watched pages: one record per candidate or fixed page below the context.
        assert_eq!(lp.watch.len(), 2);
        for w in &lp.watch {
            assert_eq!(w.resident, Some(w.page == 3));
            if let Some(r) = w.oracle_rank {
                assert!(r >= 1);
            }
            assert_eq!(w.ranks.len(), spec.estimators.len());
        }
    }
}

#[test]
fn splits_and_estimators_are_checked() {
    let g = geo(40);
    let bad = |splits: Vec<Split>, estimators: Vec<Estimator>| {
        ProbeSpec {
            estimators,
            splits,
            watch: vec![],
        }
        .geometries(&g)
        .unwrap_err()
    };
    let q = Estimator::quest(8);
    assert!(bad(vec![Split { sink: 4, window: 8 }], vec![]).contains("whole pages"));
    assert!(bad(vec![Split { sink: 8, window: 0 }], vec![]).contains("window"));
    assert!(bad(
        vec![Split {
            sink: 16,
            window: 24
        }],
        vec![]
    )
    .contains("selected page"));
    assert!(bad(vec![], vec![Estimator { sub: 3, ..q }]).contains("divide"));
    assert!(bad(
        vec![],
        vec![Estimator {
            combine: Combine::Mass,
            pooling: Pooling::Max,
            ..q
        }]
    )
    .contains("softmax-mean"));
}
