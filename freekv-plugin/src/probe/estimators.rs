//! Page-score estimators the probe compares: Quest-style bounds over summaries of a page or
//! of finer runs of tokens inside it, pooled over the GQA group in several ways, and
//! token-level estimates from low-bit key proxies. Each is computed from the keys themselves
//! (the probe's diagnostic, not the product's path), through the product's own scoring
//! function where the product has one, so the product's selector is measured as it runs.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::backend::cpu::select::{pool_scores, pooled_scores, SelectScratch};
use crate::geometry::Geometry;
use crate::math;
use crate::{AttnParams, Pooling, SummaryKind};

/// `proxy_bits` of a token-level estimate from the keys themselves, unquantized.
pub const EXACT_KEYS: u8 = 32;

/// How the summaries of a page's runs of tokens combine into the page's score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Combine {
    /// The page scores as its best run (LServe's sub-chunks).
    #[default]
    Max,
    /// The page scores as the sum of its runs' softmax weights (an attention-mass estimate;
    /// with `softmax-mean` pooling only).
    Mass,
}

/// Rotary channel pairs whose keys' norm bounds `q . k` too (Cauchy-Schwarz: over a pair,
/// `q . k <= |q| max |k|`, tight where RoPE turns the pair through many angles inside a page).
/// Any pairing gives a valid bound; the model's rotary pairing gives a tight one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pairs {
    /// The plain per-channel bound.
    #[default]
    None,
    /// Channels `c` and `c + d/2` (rotate-half RoPE).
    Half,
    /// Channels `2i` and `2i + 1` (interleaved RoPE).
    Adjacent,
}

/// One way of scoring candidate pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimator {
    /// Tokens per summary: the page size (one summary per page, as FreeKV keeps them) or a
    /// divisor of it (finer summaries inside a transfer page).
    pub sub: usize,
    /// The summary's kind.
    pub summary: SummaryKind,
    /// Pooling over the group's query heads.
    pub pooling: Pooling,
    /// Bounds multiplied by the layer's softmax scale before pooling (the product pools raw
    /// bounds).
    pub scaled: bool,
    /// How a page's runs combine (when `sub` < page size).
    pub combine: Combine,
    /// Bits per key channel of a token-level proxy (0: no proxy): each key quantized within
    /// its page's min/max range; a page scores its estimated attention mass. [`EXACT_KEYS`]:
    /// the keys themselves (a rerank with exact keys).
    pub proxy_bits: u8,
    /// With a proxy: only the `shortlist x k` pages best by the scaled page bound are
    /// estimated token by token (0: every candidate).
    pub shortlist: usize,
    /// The shortlist takes each query head's best pages in turn (instead of the pooled best).
    #[serde(default)]
    pub per_head_shortlist: bool,
    /// Channel pairs whose norm bound tightens the page bound.
    #[serde(default)]
    pub pairs: Pairs,
    /// Min/max summaries shrunk around their centre to this percentage of their half-range
    /// (100: the bounds themselves; a "typical" box rather than a bound).
    #[serde(default = "full_range")]
    pub shrink_pct: u8,
}

fn full_range() -> u8 {
    100
}

impl Estimator {
    /// The product's selector today: min/max per page, softmax-mean over raw bounds.
    pub fn quest(page_size: usize) -> Self {
        Self {
            sub: page_size,
            summary: SummaryKind::MinMax,
            pooling: Pooling::SoftmaxMean,
            scaled: false,
            combine: Combine::Max,
            proxy_bits: 0,
            shortlist: 0,
            per_head_shortlist: false,
            pairs: Pairs::None,
            shrink_pct: 100,
        }
    }

    /// A short name for tables ("minmax/32 sm raw", "minmax/8 sm scaled mass", "proxy2 x4").
    pub fn label(&self) -> String {
        if self.proxy_bits > 0 {
            let norms = match self.pairs {
                Pairs::None => "",
                Pairs::Half => " +norm/half",
                Pairs::Adjacent => " +norm/adjacent",
            };
            let keys = match self.proxy_bits {
                EXACT_KEYS => "exact".to_string(),
                b => format!("proxy{b}"),
            };
            // The shortlist's page bound, where it is not min/max over whole pages.
            let mut base = String::new();
            if self.summary == SummaryKind::CentreMad {
                base.push_str(" box");
            }
            if self.shrink_pct != 100 {
                base.push_str(&format!(" shrink{}", self.shrink_pct));
            }
            if self.combine == Combine::Mass {
                base.push_str(&format!(" /{} mass", self.sub));
            }
            let norms = format!("{base}{norms}");
            let per_head = if self.per_head_shortlist {
                " per head"
            } else {
                ""
            };
            return match self.shortlist {
                0 => keys,
                s => format!("{keys} x{s}{per_head}{norms}"),
            };
        }
        let summary = match self.summary {
            SummaryKind::MinMax => "minmax",
            SummaryKind::CentreMad => "box",
        };
        let pooling = match self.pooling {
            Pooling::SoftmaxMean => "sm",
            Pooling::Mean => "mean",
            Pooling::Max => "max",
        };
        let mut s = format!(
            "{summary}/{} {pooling} {}",
            self.sub,
            if self.scaled { "scaled" } else { "raw" }
        );
        if self.combine == Combine::Mass {
            s.push_str(" mass");
        }
        match self.pairs {
            Pairs::None => {}
            Pairs::Half => s.push_str(" +norm/half"),
            Pairs::Adjacent => s.push_str(" +norm/adjacent"),
        }
        if self.shrink_pct != 100 {
            s.push_str(&format!(" shrink{}", self.shrink_pct));
        }
        s
    }

    /// Checks the estimator against a page size.
    pub fn check(&self, page_size: usize) -> Result<(), String> {
        if self.sub == 0 || !page_size.is_multiple_of(self.sub) {
            return Err(format!(
                "estimator {}: {} tokens per summary do not divide the page size {page_size}",
                self.label(),
                self.sub
            ));
        }
        if self.pairs != Pairs::None && self.combine == Combine::Mass {
            return Err(format!(
                "estimator {}: norm bounds combine runs by their best",
                self.label()
            ));
        }
        if self.combine == Combine::Mass && self.pooling != Pooling::SoftmaxMean {
            return Err(format!(
                "estimator {}: mass combination needs softmax-mean pooling",
                self.label()
            ));
        }
        if self.proxy_bits > 8 && self.proxy_bits != EXACT_KEYS {
            return Err(format!(
                "estimator {}: at most 8 proxy bits (or {EXACT_KEYS}: exact keys)",
                self.label()
            ));
        }
        Ok(())
    }
}

/// Working memory of the estimators.
#[derive(Default)]
pub struct EstScratch {
    summaries: Vec<f32>,
    offsets: Vec<usize>,
    q: Vec<f32>,
    raw: Vec<f32>,
    select: SelectScratch,
    logits: Vec<f32>,
    key: Vec<f32>,
    short: Vec<f32>,
    /// Per run, the largest key norm of each channel pair.
    norms: Vec<f32>,
}

/// One KV head's pages to score: its group's query, its keys and the candidates.
pub struct HeadScoring<'a> {
    /// The model's geometry.
    pub geo: &'a Geometry,
    /// The layer's attention parameters.
    pub params: &'a AttnParams,
    /// The group's query `[G][d]`.
    pub q: &'a [f32],
    /// The KV head's keys `[len][d]`.
    pub keys: &'a [f32],
    /// The candidate pages.
    pub cand: Range<usize>,
    /// Pages the selection keeps (for shortlists).
    pub k: usize,
}

/// Scores of the candidate pages of `job` (one per page, higher is better), into `out`.
pub fn page_scores(est: &Estimator, job: &HeadScoring, sc: &mut EstScratch, out: &mut Vec<f32>) {
    if est.proxy_bits > 0 {
        proxy_scores(est, job, sc, out);
    } else {
        bound_scores(est, job, sc, out);
    }
}

/// Summaries of every `sub`-token run of the candidate pages, `[page][run][upper d | lower d]`.
fn summarise(
    est: &Estimator,
    geo: &Geometry,
    keys: &[f32],
    cand: &Range<usize>,
    sc: &mut EstScratch,
) {
    let (p, d, sub) = (geo.page_size, geo.head_dim, est.sub);
    let runs = cand.len() * (p / sub);
    sc.summaries.clear();
    sc.summaries.resize(runs * 2 * d, 0.0);
    sc.offsets.clear();
    sc.offsets.extend((0..runs).map(|i| i * 2 * d));
    sc.norms.clear();
    sc.norms.resize(runs * d / 2, 0.0);
    for (i, s) in sc.summaries.chunks_exact_mut(2 * d).enumerate() {
        let first = cand.start * p + i * sub;
        let (upper, lower) = s.split_at_mut(d);
        upper.fill(f32::NEG_INFINITY);
        lower.fill(f32::INFINITY);
        for t in first..first + sub {
            for c in 0..d {
                let x = keys[t * d + c];
                upper[c] = upper[c].max(x);
                lower[c] = lower[c].min(x);
            }
        }
        if est.pairs != Pairs::None {
            for (i2, norm) in sc.norms[i * d / 2..(i + 1) * d / 2].iter_mut().enumerate() {
                let (a, b) = pair(est.pairs, d, i2);
                *norm = (first..first + sub)
                    .map(|t| (keys[t * d + a].powi(2) + keys[t * d + b].powi(2)).sqrt())
                    .fold(0.0, f32::max);
            }
        }
        if est.summary == SummaryKind::MinMax && est.shrink_pct != 100 {
            let f = est.shrink_pct as f32 / 100.0;
            for c in 0..d {
                let (centre, half) = (0.5 * (upper[c] + lower[c]), 0.5 * (upper[c] - lower[c]));
                upper[c] = centre + f * half;
                lower[c] = centre - f * half;
            }
        }
        if est.summary == SummaryKind::CentreMad {
            for c in 0..d {
                let centre = 0.5 * (upper[c] + lower[c]);
                let mad = (first..first + sub)
                    .map(|t| (keys[t * d + c] - centre).abs())
                    .sum::<f32>()
                    / sub as f32;
                upper[c] = centre + mad;
                lower[c] = centre - mad;
            }
        }
    }
}

fn bound_scores(est: &Estimator, job: &HeadScoring, sc: &mut EstScratch, out: &mut Vec<f32>) {
    let (geo, params, q, keys) = (job.geo, job.params, job.q, job.keys);
    let cand = job.cand.clone();
    let d = geo.head_dim;
    let g = q.len() / d;
    let runs_per_page = geo.page_size / est.sub;
    let n = cand.len();
    summarise(est, geo, keys, &cand, sc);
    sc.q.clear();
    let scale = if est.scaled {
        params.softmax_scale
    } else {
        1.0
    };
    sc.q.extend(q.iter().map(|x| x * scale));
    out.clear();
    if est.pairs != Pairs::None {
        let runs = n * runs_per_page;
        sc.raw.clear();
        sc.raw.resize(g * n, f32::NEG_INFINITY);
        for h in 0..g {
            let qh = &sc.q[h * d..(h + 1) * d];
            for r in 0..runs {
                let (upper, lower) = sc.summaries[r * 2 * d..(r + 1) * 2 * d].split_at(d);
                let bound: f32 = (0..d / 2)
                    .map(|i2| {
                        let (a, b) = pair(est.pairs, d, i2);
                        let box_bound = (qh[a] * upper[a]).max(qh[a] * lower[a])
                            + (qh[b] * upper[b]).max(qh[b] * lower[b]);
                        let norm_bound =
                            (qh[a].powi(2) + qh[b].powi(2)).sqrt() * sc.norms[r * d / 2 + i2];
                        box_bound.min(norm_bound)
                    })
                    .sum();
                let j = r / runs_per_page;
                sc.raw[h * n + j] = sc.raw[h * n + j].max(bound);
            }
        }
        pool_scores(&mut sc.raw, g, est.pooling, out);
        return;
    }
    if runs_per_page == 1 || est.combine == Combine::Mass {
        pooled_scores(
            &sc.q,
            d,
            &sc.summaries,
            &sc.offsets,
            est.pooling,
            &mut sc.select,
        );
        out.extend(
            sc.select
                .pooled
                .chunks_exact(runs_per_page)
                .map(|runs| runs.iter().sum::<f32>()),
        );
        return;
    }
    // Best run per page and head, then pooled over the group as the product pools.
    sc.raw.clear();
    sc.raw.resize(g * n, f32::NEG_INFINITY);
    for h in 0..g {
        pooled_scores(
            &sc.q[h * d..(h + 1) * d],
            d,
            &sc.summaries,
            &sc.offsets,
            Pooling::Mean,
            &mut sc.select,
        );
        for (j, runs) in sc.select.pooled.chunks_exact(runs_per_page).enumerate() {
            sc.raw[h * n + j] = runs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
    }
    pool_scores(&mut sc.raw, g, est.pooling, out);
}

/// The channels of pair `i` of `d` under `pairs`.
fn pair(pairs: Pairs, d: usize, i: usize) -> (usize, usize) {
    match pairs {
        Pairs::Half => (i, i + d / 2),
        _ => (2 * i, 2 * i + 1),
    }
}

/// Token-level estimates from keys quantized within each page's min/max range.
fn proxy_scores(est: &Estimator, job: &HeadScoring, sc: &mut EstScratch, out: &mut Vec<f32>) {
    let (geo, params, q, keys, k) = (job.geo, job.params, job.q, job.keys, job.k);
    let cand = job.cand.clone();
    let (p, d) = (geo.page_size, geo.head_dim);
    let g = q.len() / d;
    let n = cand.len();
    // Which pages get the estimate.
    let mut estimated = vec![true; n];
    if est.shortlist > 0 && est.shortlist * k < n {
        // The shortlist's page bound: this estimator's summaries, at the softmax's scale.
        let base = Estimator {
            scaled: true,
            proxy_bits: 0,
            shortlist: 0,
            per_head_shortlist: false,
            ..*est
        };
        let mut short = std::mem::take(&mut sc.short);
        estimated.fill(false);
        let m = est.shortlist * k;
        if est.per_head_shortlist {
            // Each query head's best pages by its own scaled bound, in turn.
            let mut ranked = Vec::new();
            for h in 0..g {
                let one_head = HeadScoring {
                    q: &q[h * d..(h + 1) * d],
                    cand: cand.clone(),
                    ..*job
                };
                let mean = Estimator {
                    pooling: Pooling::Mean,
                    ..base
                };
                bound_scores(&mean, &one_head, sc, &mut short);
                ranked.push(top_k(&short, m));
            }
            let mut taken = 0;
            'fill: for i in 0..m {
                for r in &ranked {
                    if let Some(&j) = r.get(i) {
                        if !estimated[j] {
                            estimated[j] = true;
                            taken += 1;
                            if taken == m {
                                break 'fill;
                            }
                        }
                    }
                }
            }
        } else {
            bound_scores(&base, job, sc, &mut short);
            for j in top_k(&short, m) {
                estimated[j] = true;
            }
        }
        sc.short = short;
    }
    let base = Estimator::quest(p);
    summarise(&base, geo, keys, &cand, sc);
    let exact = est.proxy_bits == EXACT_KEYS;
    let first = params.first_visible(keys.len() / d - 1);
    let levels = if exact {
        0.0
    } else {
        ((1u32 << est.proxy_bits) - 1) as f32
    };
    out.clear();
    out.resize(n, f32::NEG_INFINITY);
    sc.logits.clear();
    sc.logits.resize(g * n * p, f32::NEG_INFINITY);
    sc.key.resize(d, 0.0);
    for (j, _) in estimated.iter().enumerate().filter(|(_, &e)| e) {
        let (upper, lower) = sc.summaries[j * 2 * d..(j + 1) * 2 * d].split_at(d);
        for t in 0..p {
            let row = &keys[((cand.start + j) * p + t) * d..][..d];
            for c in 0..d {
                let span = upper[c] - lower[c];
                sc.key[c] = if exact {
                    row[c]
                } else if span > 0.0 {
                    lower[c] + ((row[c] - lower[c]) / span * levels).round() * span / levels
                } else {
                    lower[c]
                };
            }
            for h in 0..g {
                // Tokens the layer's window hides stay at -inf, as in the product's rerank.
                if (cand.start + j) * p + t < first {
                    continue;
                }
                let s = math::dot(&q[h * d..(h + 1) * d], &sc.key) * params.softmax_scale;
                sc.logits[(h * n + j) * p + t] = params.cap(s);
            }
        }
    }
    // Per head, softmax over every estimated token; a page scores its mass, mean over heads.
    for (j, o) in out.iter_mut().enumerate() {
        if estimated[j] {
            *o = 0.0;
        }
    }
    for h in 0..g {
        let row = &mut sc.logits[h * n * p..(h + 1) * n * p];
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = row.iter().map(|&s| ((s - m) as f64).exp()).sum();
        for (j, o) in out.iter_mut().enumerate().filter(|(j, _)| estimated[*j]) {
            let mass: f64 = row[j * p..(j + 1) * p]
                .iter()
                .map(|&s| ((s - m) as f64).exp())
                .sum();
            *o += (mass / z / g as f64) as f32;
        }
    }
}

/// The `k` best of `scores` (descending score, then ascending index: the product's order),
/// as indices.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    let better = |&a: &usize, &b: &usize| scores[b].total_cmp(&scores[a]).then(a.cmp(&b));
    let k = k.min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, better);
    }
    order.truncate(k);
    order.sort_unstable_by(better);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' scoring job: pages 1..9 of the keys, 2 kept.
    fn job<'a>(
        geo: &'a Geometry,
        params: &'a AttnParams,
        q: &'a [f32],
        keys: &'a [f32],
    ) -> HeadScoring<'a> {
        HeadScoring {
            geo,
            params,
            q,
            keys,
            cand: 1..9,
            k: 2,
        }
    }

    fn geo() -> Geometry {
        Geometry::for_test(48, 8, 8, (1, 2, 1, 4))
    }

    fn keys(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len * 4)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn the_page_bound_is_the_products_score_and_finer_runs_bound_it_tighter() {
        let g = geo();
        let params = AttnParams::scaled(0.5);
        let q = [0.3, -1.2, 0.8, 0.1, -0.4, 0.9, 0.2, -1.5];
        let ks = keys(80, 7);
        let mut sc = EstScratch::default();
        let mut out = Vec::new();
        // Quest over whole pages, raw, mean pooling: the mean over heads of the bound.
        let est = Estimator {
            pooling: Pooling::Mean,
            ..Estimator::quest(8)
        };
        page_scores(&est, &job(&g, &params, &q, &ks), &mut sc, &mut out);
        for (i, j) in (1..9).enumerate() {
            let bound = |h: usize, tokens: Range<usize>| -> f32 {
                (0..4)
                    .map(|c| {
                        let col = tokens.clone().map(|t| ks[t * 4 + c]);
                        let hi = col.clone().fold(f32::MIN, f32::max);
                        let lo = col.fold(f32::MAX, f32::min);
                        (q[h * 4 + c] * hi).max(q[h * 4 + c] * lo)
                    })
                    .sum()
            };
            let want = (bound(0, j * 8..j * 8 + 8) + bound(1, j * 8..j * 8 + 8)) / 2.0;
            assert!(
                (out[i] - want).abs() < 1e-5,
                "page {j}: {} vs {want}",
                out[i]
            );
            // Runs of 4, best run: never above the page's bound, never below any key's q.k.
            let fine = Estimator { sub: 4, ..est };
            let mut f = Vec::new();
            page_scores(&fine, &job(&g, &params, &q, &ks), &mut sc, &mut f);
            let best = |h: usize| bound(h, j * 8..j * 8 + 4).max(bound(h, j * 8 + 4..j * 8 + 8));
            assert!((f[i] - (best(0) + best(1)) / 2.0).abs() < 1e-5);
            assert!(f[i] <= out[i] + 1e-5);
        }
    }

    #[test]
    fn a_norm_bound_lies_between_the_best_key_and_the_page_bound() {
        let g = geo();
        let params = AttnParams::scaled(1.0);
        let ks = keys(80, 5);
        let (mut sc, mut plain, mut paired) = (EstScratch::default(), Vec::new(), Vec::new());
        for h in 0..2 {
            let q = [[0.3, -1.2, 0.8, 0.1], [-0.4, 0.9, 0.2, -1.5]][h];
            let quest = Estimator {
                pooling: Pooling::Mean,
                ..Estimator::quest(8)
            };
            page_scores(&quest, &job(&g, &params, &q, &ks), &mut sc, &mut plain);
            for pairs in [Pairs::Half, Pairs::Adjacent] {
                let est = Estimator { pairs, ..quest };
                page_scores(&est, &job(&g, &params, &q, &ks), &mut sc, &mut paired);
                for (i, j) in (1..9).enumerate() {
                    let best = (j * 8..j * 8 + 8)
                        .map(|t| (0..4).map(|c| q[c] * ks[t * 4 + c]).sum::<f32>())
                        .fold(f32::NEG_INFINITY, f32::max);
                    assert!(
                        paired[i] >= best - 1e-5,
                        "{pairs:?} page {j}: {} < {best}",
                        paired[i]
                    );
                    assert!(paired[i] <= plain[i] + 1e-5, "{pairs:?} page {j}");
                }
            }
        }
    }

    #[test]
    fn an_eight_bit_proxy_ranks_pages_as_their_exact_mass() {
        let g = geo();
        let params = AttnParams::scaled(0.5);
        let q = [0.3, -1.2, 0.8, 0.1, -0.4, 0.9, 0.2, -1.5];
        let ks = keys(80, 11);
        let (mut sc, mut out) = (EstScratch::default(), Vec::new());
        let est = Estimator {
            proxy_bits: 8,
            ..Estimator::quest(8)
        };
        page_scores(&est, &job(&g, &params, &q, &ks), &mut sc, &mut out);
        // The exact masses over the candidates only, mean over the two heads.
        let mut exact = vec![0.0f64; 8];
        for h in 0..2 {
            let logit =
                |t: usize| (0..4).map(|c| q[h * 4 + c] * ks[t * 4 + c]).sum::<f32>() as f64 * 0.5;
            let z: f64 = (8..72).map(|t| logit(t).exp()).sum();
            for (i, e) in exact.iter_mut().enumerate() {
                *e += ((i + 1) * 8..(i + 2) * 8)
                    .map(|t| logit(t).exp())
                    .sum::<f64>()
                    / z
                    / 2.0;
            }
        }
        for (o, e) in out.iter().zip(&exact) {
            assert!((*o as f64 - e).abs() < 0.01, "{o} vs {e}");
        }
        assert_eq!(top_k(&out, 3), {
            let e: Vec<f32> = exact.iter().map(|&x| x as f32).collect();
            top_k(&e, 3)
        });
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 0.5, 3.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![1, 0]);
        assert!(top_k(&[1.0], 0).is_empty());
    }
}
