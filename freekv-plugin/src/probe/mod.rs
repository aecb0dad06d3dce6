//! Selection diagnostics on real queries: how much of a step's exact attention the pages a
//! selector picks hold, against an oracle at the same budget.
//!
//! With a probe set ([`crate::AnyInstance::set_probe`]), every decode step of a retrieving
//! layer (one not in `dense_layers`) whose context exceeds the budget is measured, per KV
//! head, with the step's own query (the query the model computed; the step's attention is
//! not changed: run in mode `dense`, the probe sees the dense model's queries):
//! - the share of the step's attention each page holds ([`page_masses`]);
//! - per budget split (sink / window / selected pages at the instance's slots): what the
//!   sink and window pages alone capture, what the **oracle** captures (the candidate pages
//!   with the largest exact mass, pooled over the GQA group as FreeKV's selection must be;
//!   and per query head, which a group-consistent working set cannot do: an upper bound),
//!   and for each [`Estimator`] what its selection captures and its page recall against the
//!   group oracle's pages;
//! - for the watched pages (a needle's): their rank under the oracle and each estimator, and
//!   whether the step attended them.
//!
//! The probe reads every key of the context at every probed step (dense cost and more): a
//! diagnostic, off unless asked for.

pub mod estimators;
mod hook;
mod mass;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use estimators::{top_k, Combine, EstScratch, Estimator, Pairs, EXACT_KEYS};
pub(crate) use hook::probe_decode;
pub use mass::page_masses;

use crate::geometry::Geometry;
use crate::AttnParams;

/// A budget split to measure: sink and window tokens (multiples of the page size); the
/// selected pages are the rest of the instance's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Sink tokens.
    pub sink: usize,
    /// Window tokens (at least one page).
    pub window: usize,
}

/// What to measure.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeSpec {
    /// The estimators compared (e.g. [`Estimator::quest`], the product's).
    pub estimators: Vec<Estimator>,
    /// Budget splits besides the instance's own, which is always measured first.
    pub splits: Vec<Split>,
    /// Logical pages traced at every probed step (e.g. the pages holding a needle).
    pub watch: Vec<usize>,
}

impl ProbeSpec {
    /// The geometry of each split for an instance of geometry `geo`, the instance's own first
    /// (added when the spec does not list it first: the watched pages and the first row of
    /// every table are measured against what the instance attends); an error names a split
    /// or estimator the instance cannot measure.
    pub fn geometries(&self, geo: &Geometry) -> Result<Vec<Geometry>, String> {
        for e in &self.estimators {
            e.check(geo.page_size)?;
        }
        let p = geo.page_size;
        let own = Split {
            sink: geo.sink_pages * p,
            window: geo.window_pages * p,
        };
        let mut splits = self.splits.clone();
        if splits.first() != Some(&own) {
            splits.insert(0, own);
        }
        splits
            .iter()
            .map(|s| {
                let (sink, window) = (s.sink / p, s.window / p);
                if s.sink % p != 0 || s.window % p != 0 || window == 0 || sink + window >= geo.slots
                {
                    return Err(format!(
                        "split sink {} / window {}: whole pages of {p}, a window of at least one \
                         page, and at least one selected page of the {} slots",
                        s.sink, s.window, geo.slots
                    ));
                }
                Ok(Geometry {
                    sink_pages: sink,
                    window_pages: window,
                    sel_pages: geo.slots - sink - window,
                    ..*geo
                })
            })
            .collect()
    }
}

/// Sums over probed steps of one KV head and one split (divide by [`HeadStats::steps`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Attention mass of the sink and window pages (mean over the group's query heads).
    pub fixed: f64,
    /// Mass of sink + window + the group oracle's pages.
    pub oracle: f64,
    /// Mass of sink + window + each query head's own best pages (an upper bound).
    pub oracle_per_head: f64,
    /// Per estimator: mass of sink + window + its pages.
    pub mass: Vec<f64>,
    /// Per estimator: share of the group oracle's pages it selected.
    pub recall: Vec<f64>,
}

/// One KV head of one layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadStats {
    /// Probed steps.
    pub steps: u64,
    /// Per split.
    pub splits: Vec<SplitStats>,
}

impl HeadStats {
    fn add(&mut self, o: &HeadStats) {
        self.steps += o.steps;
        if self.splits.is_empty() {
            self.splits = o.splits.clone();
            return;
        }
        for (a, b) in self.splits.iter_mut().zip(&o.splits) {
            a.fixed += b.fixed;
            a.oracle += b.oracle;
            a.oracle_per_head += b.oracle_per_head;
            for (x, y) in a.mass.iter_mut().zip(&b.mass) {
                *x += y;
            }
            for (x, y) in a.recall.iter_mut().zip(&b.recall) {
                *x += y;
            }
        }
    }
}

/// A watched page at one probed step of one layer and KV head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WatchRecord {
    /// Context length of the step.
    pub len: usize,
    /// The layer.
    pub layer: usize,
    /// The KV head.
    pub head: usize,
    /// The watched logical page.
    pub page: usize,
    /// Its exact attention mass, mean over the group.
    pub mass: f32,
    /// Its rank among the candidates (1 = best) by exact mass; None when not a candidate
    /// (sink, window or hidden).
    pub oracle_rank: Option<usize>,
    /// Its rank under each estimator.
    pub ranks: Vec<Option<usize>>,
    /// Whether the step attended it (None for a dense step).
    pub resident: Option<bool>,
}

/// What a probe measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The estimators' labels.
    pub estimators: Vec<String>,
    /// Per split: (sink pages, window pages, selected pages).
    pub splits: Vec<(usize, usize, usize)>,
    /// Per layer (empty for layers not probed), per KV head.
    pub layers: Vec<Vec<HeadStats>>,
    /// The watched pages, step by step.
    pub watch: Vec<WatchRecord>,
    /// Why the probe stopped on some layers (a device error while reading keys).
    #[serde(default)]
    pub failures: Vec<String>,
}

impl ProbeReport {
    /// Adds `other`'s measurements (same spec) to these.
    pub fn merge(&mut self, other: &ProbeReport) {
        if self.estimators.is_empty() {
            self.estimators = other.estimators.clone();
            self.splits = other.splits.clone();
        }
        if self.layers.len() < other.layers.len() {
            self.layers.resize(other.layers.len(), Vec::new());
        }
        for (a, b) in self.layers.iter_mut().zip(&other.layers) {
            if a.len() < b.len() {
                a.resize(b.len(), HeadStats::default());
            }
            for (x, y) in a.iter_mut().zip(b) {
                x.add(y);
            }
        }
        self.watch.extend(other.watch.iter().cloned());
        self.failures.extend(other.failures.iter().cloned());
    }

    /// Means over every probed (step, head) of `layers` (all when None), for split `split`:
    /// (steps, fixed, oracle, oracle per head, estimator masses, estimator recalls).
    pub fn means(&self, layers: Option<&[usize]>, split: usize) -> Means {
        let mut m = Means {
            mass: vec![0.0; self.estimators.len()],
            recall: vec![0.0; self.estimators.len()],
            ..Default::default()
        };
        for (l, heads) in self.layers.iter().enumerate() {
            if layers.is_some_and(|ls| !ls.contains(&l)) {
                continue;
            }
            for h in heads {
                let Some(s) = h.splits.get(split) else {
                    continue;
                };
                m.steps += h.steps;
                m.fixed += s.fixed;
                m.oracle += s.oracle;
                m.oracle_per_head += s.oracle_per_head;
                for (a, b) in m.mass.iter_mut().zip(&s.mass) {
                    *a += b;
                }
                for (a, b) in m.recall.iter_mut().zip(&s.recall) {
                    *a += b;
                }
            }
        }
        let n = m.steps.max(1) as f64;
        m.fixed /= n;
        m.oracle /= n;
        m.oracle_per_head /= n;
        m.mass.iter_mut().for_each(|x| *x /= n);
        m.recall.iter_mut().for_each(|x| *x /= n);
        m
    }
}

/// Means of a [`ProbeReport`] over (step, head) samples.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Means {
    /// (step, layer, KV head) samples.
    pub steps: u64,
    /// Attention mass of the sink and window pages.
    pub fixed: f64,
    /// Mass of sink + window + the group oracle's pages.
    pub oracle: f64,
    /// Mass of sink + window + each query head's own best pages.
    pub oracle_per_head: f64,
    /// Per estimator: mass of sink + window + its pages.
    pub mass: Vec<f64>,
    /// Per estimator: share of the group oracle's pages it selected.
    pub recall: Vec<f64>,
}

/// A probe's state on one layer: the spec, what it measured so far, its working memory.
pub(crate) struct LayerProbe {
    spec: Arc<ProbeSpec>,
    geos: Vec<Geometry>,
    heads: Vec<HeadStats>,
    watch: Vec<WatchRecord>,
    m: Measure,
    /// Why the probe stopped on this layer.
    pub failure: Option<String>,
}

impl LayerProbe {
    pub fn new(spec: Arc<ProbeSpec>, geos: Vec<Geometry>, num_kv_heads: usize) -> Self {
        Self {
            spec,
            geos,
            heads: vec![HeadStats::default(); num_kv_heads],
            watch: Vec::new(),
            m: Measure::default(),
            failure: None,
        }
    }

    /// Stops measuring on this layer, keeping `why` for the report.
    pub fn fail(&mut self, why: String) {
        self.failure.get_or_insert(why);
    }

    /// What it measures.
    pub fn spec(&self) -> &ProbeSpec {
        &self.spec
    }

    /// Its splits as (sink pages, window pages, selected pages).
    pub fn splits(&self) -> Vec<(usize, usize, usize)> {
        self.geos
            .iter()
            .map(|g| (g.sink_pages, g.window_pages, g.sel_pages))
            .collect()
    }

    /// Hands over what was measured and starts again.
    pub fn take(&mut self) -> (Vec<HeadStats>, Vec<WatchRecord>) {
        let n = self.heads.len();
        (
            std::mem::replace(&mut self.heads, vec![HeadStats::default(); n]),
            std::mem::take(&mut self.watch),
        )
    }
}

/// Working memory of one measurement.
#[derive(Default)]
struct Measure {
    q: Vec<f32>,
    keys: Vec<f32>,
    masses: Vec<f32>,
    logits: Vec<f32>,
    pooled: Vec<f32>,
    scores: Vec<Vec<f32>>,
    est: EstScratch,
}

/// One step of one KV head: `q` is the group's query `[G][d]`, `keys` its keys `[len][d]`,
/// `resident` the pages the step attended (None: dense).
fn measure_head(
    lp: &mut LayerProbe,
    params: &AttnParams,
    len: usize,
    layer: usize,
    head: usize,
    resident: Option<&[u32]>,
) {
    let LayerProbe {
        spec,
        geos,
        heads,
        watch,
        m,
        ..
    } = lp;
    let geo = geos[0];
    let (g, pages) = (geo.group, geo.pages(len));
    page_masses(
        &geo,
        params,
        &m.q,
        &m.keys,
        len,
        &mut m.masses,
        &mut m.logits,
    );
    let stats = &mut heads[head];
    if stats.splits.is_empty() {
        stats.splits = vec![
            SplitStats {
                mass: vec![0.0; spec.estimators.len()],
                recall: vec![0.0; spec.estimators.len()],
                ..Default::default()
            };
            geos.len()
        ];
    }
    stats.steps += 1;
    let masses = &m.masses;
    let captured = |set: &mut dyn Iterator<Item = usize>, h: usize| -> f64 {
        set.map(|j| masses[h * pages + j] as f64).sum()
    };
    m.scores.resize(spec.estimators.len(), Vec::new());
    for (si, sg) in geos.iter().enumerate() {
        let cand = sg.candidates(len, params);
        let k = sg.sel_pages.min(cand.len());
        let fixed: Vec<usize> = sg.fixed_pages(len).map(|(j, _)| j).collect();
        let fixed_mass: f64 = (0..g)
            .map(|h| captured(&mut fixed.iter().copied(), h))
            .sum::<f64>()
            / g as f64;
        m.pooled.clear();
        m.pooled.extend(
            cand.clone()
                .map(|j| (0..g).map(|h| masses[h * pages + j]).sum::<f32>() / g as f32),
        );
        let oracle = top_k(&m.pooled, k);
        let in_oracle = |c: usize| oracle.contains(&c);
        let mass_of = |set: &[usize]| -> f64 {
            set.iter()
                .map(|&c| {
                    (0..g)
                        .map(|h| masses[h * pages + cand.start + c] as f64)
                        .sum::<f64>()
                })
                .sum::<f64>()
                / g as f64
        };
        let s = &mut stats.splits[si];
        s.fixed += fixed_mass;
        s.oracle += fixed_mass + mass_of(&oracle);
        let mut per_head = 0.0;
        for h in 0..g {
            let own: Vec<f32> = cand.clone().map(|j| masses[h * pages + j]).collect();
            per_head += top_k(&own, k)
                .iter()
                .map(|&c| masses[h * pages + cand.start + c] as f64)
                .sum::<f64>();
        }
        s.oracle_per_head += fixed_mass + per_head / g as f64;
        for (e, est) in spec.estimators.iter().enumerate() {
            let scores = &mut m.scores[e];
            let job = estimators::HeadScoring {
                geo: sg,
                params,
                q: &m.q,
                keys: &m.keys,
                cand: cand.clone(),
                k,
            };
            estimators::page_scores(est, &job, &mut m.est, scores);
            let chosen = top_k(scores, k);
            s.mass[e] += fixed_mass + mass_of(&chosen);
            if k > 0 {
                s.recall[e] += chosen.iter().filter(|&&c| in_oracle(c)).count() as f64 / k as f64;
            } else {
                s.recall[e] += 1.0;
            }
        }
        if si != 0 {
            continue;
        }
        // The watched pages, against the instance's own split.
        let rank = |scores: &[f32], c: usize| {
            1 + scores
                .iter()
                .enumerate()
                .filter(|&(i, &x)| x > scores[c] || (x == scores[c] && i < c))
                .count()
        };
        for &page in spec.watch.iter().filter(|&&p| p < pages) {
            let c = cand.contains(&page).then(|| page - cand.start);
            watch.push(WatchRecord {
                len,
                layer,
                head,
                page,
                mass: (0..g).map(|h| masses[h * pages + page]).sum::<f32>() / g as f32,
                oracle_rank: c.map(|c| rank(&m.pooled, c)),
                ranks: m.scores.iter().map(|s| c.map(|c| rank(s, c))).collect(),
                resident: resident.map(|r| r.contains(&(page as u32))),
            });
        }
    }
}

#[cfg(test)]
mod tests;
