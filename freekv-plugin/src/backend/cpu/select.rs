//! Selection for one KV head: Quest upper-bound scores from the page summaries, GQA pooling,
//! the rerank of a shortlist by token-level attention mass, exact top-k, and the replacement
//! plan (resident winners stay; missing winners go into the selected slots whose current
//! pages score lowest).

use std::cmp::Ordering;
use std::ops::Range;

use crate::backend::Selection;
use crate::geometry::{Geometry, NO_PAGE};
use crate::Pooling;

use super::elem::KvElem;
use super::host_tier::HostTier;
use crate::math;
use crate::plan::PlanEntry;

/// Working memory of selection, reused between calls.
#[derive(Default)]
pub struct SelectScratch {
    /// `[G][2d]`: per query head, `max(q, 0)` then `min(q, 0)`.
    qq: Vec<f32>,
    /// `[G][n_cand]` raw scores.
    raw: Vec<f32>,
    /// `[n_cand]` pooled scores.
    pub pooled: Vec<f32>,
    order: Vec<u32>,
    /// Per candidate: `stamp` when a winner not (yet) found resident.
    mark: Vec<u32>,
    stamp: u32,
    evict: Vec<(f32, u32)>,
    missing: Vec<(f32, u32)>,
    pub plan: Vec<PlanEntry>,
    /// The last selection's margin (see [`margin`]).
    pub margin: f32,
    /// The rerank's token offsets in a page, shortlist and logits.
    token_offsets: Vec<usize>,
    shortlist: Vec<u32>,
    logits: Vec<f32>,
}

/// Descending score, then ascending index: a total order, so ties pick lower pages.
#[inline]
fn better(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The indices of the `k` best of `scores` ([`better`] order; unsorted) into `out`.
fn best_of(scores: &[f32], k: usize, out: &mut Vec<u32>) {
    let n = scores.len();
    out.clear();
    out.extend(0..n as u32);
    if k < n && k > 0 {
        out.select_nth_unstable_by(k - 1, |&a, &b| {
            better((scores[a as usize], a), (scores[b as usize], b))
        });
    }
    out.truncate(k.min(n));
}

/// Pooled scores of the candidates for one KV head.
///
/// `group_q` is the group's queries `[G][d]`; candidate `j`'s summary (upper `[d]` then lower
/// `[d]`) is `summaries[offsets[j]..offsets[j] + 2d]`. The Quest bound
/// `sum_c max(q_c * upper_c, q_c * lower_c)` equals `q+ . upper + q- . lower` with
/// `q+ = max(q, 0)`, `q- = min(q, 0)` (upper >= lower): one dot product of length `2d` per
/// page and query head.
pub fn pooled_scores<T: KvElem>(
    group_q: &[f32],
    d: usize,
    summaries: &[T],
    offsets: &[usize],
    pooling: Pooling,
    sc: &mut SelectScratch,
) {
    pooled_box_scores(group_q, d, summaries, offsets, pooling, 1.0, sc)
}

/// [`pooled_scores`] over each summary's box shrunk around its centre to `shrink` of its
/// half-width (1: the bound itself). With centre `c = (upper + lower) / 2` and half-width
/// `h = (upper - lower) / 2`, the shrunk box's bound `q . c + shrink |q| . h` is
/// `(a q+ + b q-) . upper + (b q+ + a q-) . lower` with `a = (1 + shrink) / 2` and
/// `b = (1 - shrink) / 2`: the same one dot product per page and query head.
pub fn pooled_box_scores<T: KvElem>(
    group_q: &[f32],
    d: usize,
    summaries: &[T],
    offsets: &[usize],
    pooling: Pooling,
    shrink: f32,
    sc: &mut SelectScratch,
) {
    let n_cand = offsets.len();
    let g = group_q.len() / d;
    let (a, b) = ((1.0 + shrink) / 2.0, (1.0 - shrink) / 2.0);
    sc.qq.resize(g * 2 * d, 0.0);
    for h in 0..g {
        let q = &group_q[h * d..(h + 1) * d];
        let (upper, lower) = sc.qq[h * 2 * d..(h + 1) * 2 * d].split_at_mut(d);
        for c in 0..d {
            let (pos, neg) = (q[c].max(0.0), q[c].min(0.0));
            upper[c] = a * pos + b * neg;
            lower[c] = b * pos + a * neg;
        }
    }
    sc.raw.resize(g * n_cand, 0.0);
    math::dots_indexed_group(&sc.qq, g, T::rows_ref(summaries), offsets, &mut sc.raw);
    pool_scores(&mut sc.raw[..g * n_cand], g, pooling, &mut sc.pooled);
}

/// Pools per-query-head page scores `raw` (`[g][n]`; overwritten) over the group into `out`
/// (`[n]`): softmax over the pages per head then the mean, the mean, or the max.
pub fn pool_scores(raw: &mut [f32], g: usize, pooling: Pooling, out: &mut Vec<f32>) {
    let n = raw.len() / g.max(1);
    out.clear();
    match pooling {
        Pooling::SoftmaxMean => {
            out.resize(n, 0.0);
            for h in 0..g {
                let raw = &mut raw[h * n..(h + 1) * n];
                let m = math::max(raw);
                let z = math::exp_sub_sum(raw, m);
                let w = 1.0 / (z * g as f32);
                for (p, e) in out.iter_mut().zip(raw.iter()) {
                    *p += e * w;
                }
            }
        }
        Pooling::Mean => {
            out.resize(n, 0.0);
            for h in 0..g {
                math::axpy(out, 1.0 / g as f32, &raw[h * n..(h + 1) * n]);
            }
        }
        Pooling::Max => {
            out.resize(n, f32::NEG_INFINITY);
            for h in 0..g {
                for (p, r) in out.iter_mut().zip(&raw[h * n..(h + 1) * n]) {
                    *p = p.max(*r);
                }
            }
        }
    }
}

/// The rerank's first stage scores each page by its min/max box shrunk to half its width
/// around the centre (a typical, not a bounding, box): at equal shortlists it lets more needle
/// pages through than the bound (docs/results.md, section 1c). Centre +/- mean deviation
/// summaries (`--freekv-summary centre-mad`) are such a box already, used as they are, and do a
/// little better still.
pub const RERANK_SHRINK: f32 = 0.5;

/// The rerank selector's second stage for KV head `head`, whose group queries times the
/// softmax scale are `scaled_q` (`[G][d]`, as its first stage pooled them): `sc.pooled` holds
/// the first-stage scores of the selection's candidates; the best
/// `shortlist x k` of them are scored again by their tokens' exact attention weight (per
/// query head, the softmax over every shortlisted token of the selection's context, with the
/// layer's scale, soft-cap and window; then the mean over the group), and every other
/// candidate scores `-inf`. Candidate pages are full pages, so every token read is in the host
/// tier.
pub fn rerank<T: KvElem>(
    geo: &Geometry,
    host: &HostTier<T>,
    table: &[u32],
    head: usize,
    scaled_q: &[f32],
    selection: &Selection,
    sc: &mut SelectScratch,
) {
    let Selection {
        ref params,
        len,
        candidates: ref cand,
        shortlist,
        ..
    } = *selection;
    let (p, d) = (geo.page_size, geo.head_dim);
    let g = scaled_q.len() / d;
    let n = cand.len();
    let m = (shortlist * geo.sel_pages).min(n);
    // The shortlist: the m best by the page bound (the same order as the top-k).
    best_of(&sc.pooled, m, &mut sc.shortlist);
    sc.token_offsets.clear();
    sc.token_offsets.extend((0..p).map(|t| t * d));
    // Logits `[G][m][p]` of every shortlisted token.
    sc.logits.clear();
    sc.logits.resize(g * m * p, f32::NEG_INFINITY);
    sc.raw.resize(g * p, 0.0);
    let first = params.first_visible(len.saturating_sub(1));
    for (i, &c) in sc.shortlist.iter().enumerate() {
        let page = cand.start + c as usize;
        let chunk = host.chunk(table[page], head);
        math::dots_indexed_group(
            scaled_q,
            g,
            T::rows_ref(&chunk[..p * d]),
            &sc.token_offsets,
            &mut sc.raw,
        );
        for h in 0..g {
            for t in 0..p {
                if page * p + t < first {
                    continue;
                }
                sc.logits[(h * m + i) * p + t] = params.cap(sc.raw[h * p + t]);
            }
        }
    }
    sc.pooled.clear();
    sc.pooled.resize(n, f32::NEG_INFINITY);
    for &c in &sc.shortlist {
        sc.pooled[c as usize] = 0.0;
    }
    // Hidden tokens stay at -inf, whose clamped exponential (~1e-38) weighs nothing.
    for h in 0..g {
        let row = &mut sc.logits[h * m * p..(h + 1) * m * p];
        let max = math::max(row);
        let z = math::exp_sub_sum(row, max);
        let w = 1.0 / (z * g as f32);
        for (i, &c) in sc.shortlist.iter().enumerate() {
            let mass: f32 = row[i * p..(i + 1) * p].iter().sum();
            sc.pooled[c as usize] += mass * w;
        }
    }
}

/// How far a selection's worst winner scored above the best candidate left out, relative to
/// the larger magnitude: +inf when nothing was left out (or only finite scores below an
/// infinite winner), 0 at a tie. Two backends whose scores differ in rounding may pick
/// differently only where this is below their rounding. Never NaN.
pub fn margin(worst_winner: f32, best_loser: f32) -> f32 {
    if best_loser == f32::NEG_INFINITY && worst_winner > best_loser {
        return f32::INFINITY;
    }
    if worst_winner.is_nan() || best_loser.is_nan() || worst_winner <= best_loser {
        return 0.0;
    }
    if worst_winner == f32::INFINITY {
        return f32::INFINITY;
    }
    let scale = worst_winner
        .abs()
        .max(best_loser.abs())
        .max(f32::MIN_POSITIVE);
    (worst_winner - best_loser) / scale
}

/// Top-k of `sc.pooled` over the candidates `cand` and the replacement plan for one head
/// whose selected slots currently hold `sel_slots` (pages, [`NO_PAGE`] when empty; slot `i`
/// here is geometry slot `geo.selected_slots().start + i`). Leaves the plan in `sc.plan`.
pub fn plan_replacement(
    geo: &Geometry,
    cand: Range<usize>,
    sel_slots: &[u32],
    sc: &mut SelectScratch,
) {
    let n_cand = cand.len();
    let k = geo.sel_pages.min(n_cand);
    best_of(&sc.pooled, k, &mut sc.order);
    // Mark the winners.
    sc.stamp = sc.stamp.wrapping_add(1);
    if sc.stamp == 0 || sc.mark.len() < n_cand {
        sc.mark.clear();
        sc.mark.resize(n_cand.max(sc.mark.len()), 0);
        sc.stamp = 1;
    }
    for &w in &sc.order {
        sc.mark[w as usize] = sc.stamp;
    }
    let worst_winner = sc
        .order
        .iter()
        .map(|&w| sc.pooled[w as usize])
        .fold(f32::INFINITY, f32::min);
    let best_loser = (0..n_cand)
        .filter(|&c| sc.mark[c] != sc.stamp)
        .map(|c| sc.pooled[c])
        .fold(f32::NEG_INFINITY, f32::max);
    sc.margin = margin(worst_winner, best_loser);
    // Resident winners stay (unmarked); every other selected slot may be replaced.
    let slot0 = geo.selected_slots().start as u32;
    sc.evict.clear();
    for (i, &page) in sel_slots.iter().enumerate() {
        let slot = slot0 + i as u32;
        let j = page as usize;
        if page != NO_PAGE && cand.contains(&j) {
            let c = j - cand.start;
            if sc.mark[c] == sc.stamp {
                sc.mark[c] = 0;
                continue;
            }
            sc.evict.push((sc.pooled[c], slot));
        } else {
            // Empty, or a page that is no longer a candidate: lowest possible score.
            sc.evict.push((f32::NEG_INFINITY, slot));
        }
    }
    sc.missing.clear();
    for &w in &sc.order {
        if sc.mark[w as usize] == sc.stamp {
            sc.missing
                .push((sc.pooled[w as usize], (cand.start + w as usize) as u32));
        }
    }
    // Lowest-scored slots first (empty ones before any page); best missing pages first.
    sc.evict
        .sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    sc.missing.sort_unstable_by(|&a, &b| better(a, b));
    debug_assert!(sc.missing.len() <= sc.evict.len());
    sc.plan.clear();
    for (i, &(_, slot)) in sc.evict.iter().enumerate() {
        let page = sc.missing.get(i).map_or(NO_PAGE, |m| m.1);
        let current = sel_slots[(slot - slot0) as usize];
        if page != current {
            sc.plan.push(PlanEntry { slot, page });
        }
    }
}

/// The brute-force plan the GPU's plan kernel is tested against too (tests/cuda_kernels).
#[cfg(test)]
#[path = "../../../tests/support/brute_plan.rs"]
mod brute_plan;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AttnParams, Selector};

    fn geo(sel_budget: usize) -> Geometry {
        Geometry::for_test(16 + 16 + 8 * sel_budget, 16, 16, (1, 2, 1, 2))
    }

    fn apply(sel: &mut [u32], plan: &[PlanEntry], slot0: u32) {
        for e in plan {
            sel[(e.slot - slot0) as usize] = e.page;
        }
    }

    #[test]
    fn quest_bound_and_pooling() {
        // Two query heads, d = 2; two pages.
        let q = [1.0, -2.0, 0.5, 0.5];
        let summaries = [3.0f32, 1.0, /* lower */ -1.0, -4.0, 0.0, 0.0, 0.0, 0.0];
        let offsets = [0, 4];
        let mut sc = SelectScratch::default();
        // Head 0, page 0: max(1*3, 1*-1) + max(-2*1, -2*-4) = 3 + 8 = 11.
        // Head 1, page 0: max(.5*3, .5*-1) + max(.5*1, .5*-4) = 1.5 + .5 = 2.
        pooled_scores(&q, 2, &summaries, &offsets, Pooling::Mean, &mut sc);
        assert_eq!(sc.pooled, vec![6.5, 0.0]);
        pooled_scores(&q, 2, &summaries, &offsets, Pooling::Max, &mut sc);
        assert_eq!(sc.pooled, vec![11.0, 0.0]);
        pooled_scores(&q, 2, &summaries, &offsets, Pooling::SoftmaxMean, &mut sc);
        let sm = |a: f32, b: f32| a.exp() / (a.exp() + b.exp());
        let want0 = (sm(11.0, 0.0) + sm(2.0, 0.0)) / 2.0;
        assert!((sc.pooled[0] - want0).abs() < 1e-6);
        assert!((sc.pooled[0] + sc.pooled[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_shrunk_box_scores_its_centre_plus_a_share_of_its_width() {
        // One query head, d = 2, one page: upper (3, 1), lower (-1, -4).
        let q = [1.0, -2.0];
        let summaries = [3.0f32, 1.0, -1.0, -4.0];
        let mut sc = SelectScratch::default();
        for shrink in [1.0f32, 0.5, 0.0] {
            pooled_box_scores(&q, 2, &summaries, &[0], Pooling::Mean, shrink, &mut sc);
            // centre (1, -1.5), half-width (2, 2.5): q.c + shrink |q|.h = 4 + shrink * 7.
            assert!(
                (sc.pooled[0] - (4.0 + shrink * 7.0)).abs() < 1e-6,
                "{shrink}"
            );
        }
    }

    #[test]
    fn rerank_scores_the_shortlist_by_its_tokens_weight_and_drops_the_rest() {
        use crate::backend::cpu::host_tier::HostTier;
        let g = Geometry::for_test(24, 0, 8, (1, 2, 1, 2));
        let mut host = HostTier::<f32>::try_new(g, 8).unwrap();
        let key = |t: usize| [((t * 7) % 5) as f32 - 2.0, ((t * 3) % 4) as f32 - 1.5];
        for t in 0..64 {
            host.write_row((t / 8) as u32, 0, t % 8, &key(t), &[0.0, 0.0]);
        }
        let table: Vec<u32> = (0..8).collect();
        let q = [0.8f32, -0.6, 0.3, 0.9];
        for params in [
            AttnParams::scaled(0.7),
            AttnParams {
                softmax_scale: 0.7,
                softcap: Some(2.0),
                sliding_window: Some(50),
            },
        ] {
            let scaled: Vec<f32> = q.iter().map(|x| x * 0.7).collect();
            // First-stage scores: pages 1 and 4 best; shortlist 1 x 2 selected pages.
            let mut sc = SelectScratch {
                pooled: vec![0.1, 0.9, 0.2, 0.3, 0.8, 0.0, 0.4],
                ..Default::default()
            };
            let selection = Selection {
                candidates: 0..7,
                len: 64,
                params,
                selector: Selector::Rerank,
                shortlist: 1,
            };
            rerank(&g, &host, &table, 0, &scaled, &selection, &mut sc);
            let logit = |h: usize, t: usize| {
                let k = key(t);
                params.cap((q[2 * h] * k[0] + q[2 * h + 1] * k[1]) * 0.7) as f64
            };
            let first = params.first_visible(63);
            let tokens: Vec<usize> = (8..16).chain(32..40).filter(|&t| t >= first).collect();
            for (i, &score) in sc.pooled.iter().enumerate() {
                if i != 1 && i != 4 {
                    assert_eq!(score, f32::NEG_INFINITY, "page {i} is not shortlisted");
                    continue;
                }
                let want: f64 = (0..2)
                    .map(|h| {
                        let z: f64 = tokens.iter().map(|&t| logit(h, t).exp()).sum();
                        let page: f64 = tokens
                            .iter()
                            .filter(|&&t| t / 8 == i)
                            .map(|&t| logit(h, t).exp())
                            .sum();
                        page / z / 2.0
                    })
                    .sum();
                assert!(
                    (score as f64 - want).abs() < 1e-5,
                    "page {i}: {score} vs {want}"
                );
            }
        }
    }

    #[test]
    fn replacement_keeps_resident_winners_and_evicts_lowest() {
        let g = geo(3);
        let slot0 = g.selected_slots().start as u32;
        // Candidates are pages 2..8 (6 of them); scores by candidate index.
        let mut sc = SelectScratch {
            pooled: vec![0.1, 0.9, 0.5, 0.8, 0.2, 0.7],
            ..Default::default()
        };
        // Resident: page 3 (score .9, winner), page 6 (score .2), empty.
        let mut sel = vec![3, 6, NO_PAGE];
        plan_replacement(&g, 2..8, &sel, &mut sc);
        // Winners: pages 3 (.9), 5 (.8), 7 (.7). Page 3 stays; 5 goes to the empty slot,
        // 7 replaces page 6.
        assert_eq!(
            sc.plan,
            vec![
                PlanEntry {
                    slot: slot0 + 2,
                    page: 5
                },
                PlanEntry {
                    slot: slot0 + 1,
                    page: 7
                }
            ]
        );
        apply(&mut sel, &sc.plan, slot0);
        assert_eq!(sel, vec![3, 7, 5]);
        // Same scores again: nothing to do.
        plan_replacement(&g, 2..8, &sel, &mut sc);
        assert!(sc.plan.is_empty());
        // Fewer candidates than slots: all are selected, stale pages are emptied.
        sc.pooled = vec![0.3, 0.4];
        let mut sel = vec![9, 2, NO_PAGE];
        plan_replacement(&g, 2..4, &sel, &mut sc);
        apply(&mut sel, &sc.plan, slot0);
        let mut got: Vec<u32> = sel.iter().copied().filter(|&p| p != NO_PAGE).collect();
        got.sort();
        assert_eq!(got, vec![2, 3]);
    }

    /// `plan_replacement` is the brute-force plan written from the spec, pair for pair and
    /// margin bit for bit, on seeded random cases: ties, infinities, NaN and -0.0 scores,
    /// resident pages among the candidates, outside them, empty or held twice.
    #[test]
    fn plans_match_a_brute_force_plan() {
        use rand::{Rng as _, SeedableRng};
        let mut failures = Vec::new();
        for seed in 0..300u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut draw = |lo: usize, hi: usize| rng.random_range(lo..=hi);
            let n_sel = [1, 3, 8, 56][draw(0, 3)];
            let n = [0, 1, n_sel - 1, n_sel, n_sel + 1, 3 * n_sel + 5, 400][draw(0, 6)];
            let first = draw(0, 40) as u32;
            let case = brute_plan::random_case(&mut draw, first, n, n_sel);
            let g = geo(n_sel);
            let slot0 = g.selected_slots().start as u32;
            let mut sc = SelectScratch {
                pooled: case.scores.clone(),
                ..Default::default()
            };
            let cand = first as usize..first as usize + n;
            plan_replacement(&g, cand, &case.resident, &mut sc);
            let got: Vec<(u32, u32)> = sc.plan.iter().map(|e| (e.slot, e.page)).collect();
            let (want, margin) = brute_plan::brute_plan(&case, g.sel_pages, slot0);
            if got != want || sc.margin.to_bits() != margin.to_bits() {
                failures.push(format!(
                    "seed {seed} (n {n}, n_sel {n_sel}): got {got:?} margin {}, want {want:?} \
                     margin {margin}",
                    sc.margin
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn ties_pick_lower_pages() {
        let g = geo(2);
        let mut sc = SelectScratch {
            pooled: vec![1.0; 5],
            ..Default::default()
        };
        let mut sel = vec![NO_PAGE, NO_PAGE];
        plan_replacement(&g, 2..7, &sel, &mut sc);
        apply(&mut sel, &sc.plan, g.selected_slots().start as u32);
        sel.sort();
        assert_eq!(sel, vec![2, 3]);
    }

    #[test]
    fn the_margin_is_the_relative_gap_between_the_last_winner_and_the_first_loser() {
        let g = geo(3);
        let mut sc = SelectScratch {
            pooled: vec![0.5, 4.0, 2.0, 1.999, 3.0, -1.0],
            ..Default::default()
        };
        let sel = vec![NO_PAGE; g.sel_pages];
        plan_replacement(&g, 2..8, &sel, &mut sc);
        // Winners 4.0, 3.0, 2.0; the best left out 1.999.
        assert!((sc.margin - 0.001 / 2.0).abs() < 1e-6, "{}", sc.margin);
        sc.pooled = vec![2.0, 2.0, 2.0, 2.0, 0.0, 0.0];
        plan_replacement(&g, 2..8, &sel, &mut sc);
        assert_eq!(sc.margin, 0.0, "a tie at the boundary");
        sc.pooled = vec![1.0, 2.0];
        plan_replacement(&g, 2..4, &sel, &mut sc);
        assert_eq!(sc.margin, f32::INFINITY, "every candidate wins");
        assert_eq!(margin(-1.0, f32::NEG_INFINITY), f32::INFINITY);
        assert_eq!(margin(f32::NEG_INFINITY, f32::NEG_INFINITY), 0.0);
        // An infinite winner over a finite loser: not inf / inf.
        assert_eq!(margin(f32::INFINITY, 1.0), f32::INFINITY);
        assert_eq!(margin(f32::INFINITY, f32::INFINITY), 0.0);
        assert_eq!(margin(f32::INFINITY, f32::NAN), 0.0);
    }
}
