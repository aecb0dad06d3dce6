//! A replacement plan by brute force, written from the spec: every candidate sorted (score
//! descending in `f32::total_cmp` order, ties to the lower page), the best `k` taken, the
//! resident winners kept (a page held twice: by its first slot), the other selected slots
//! refilled lowest (score, slot) first (empty slots and pages that are no longer candidates
//! score -inf) with the missing winners best first, the slots left over emptied. The one
//! reference for the CPU backend's `plan_replacement` (its unit tests) and the GPU's
//! `freekv_plan_pages` (`tests/cuda_kernels/plan.rs`).

/// An empty slot.
pub const NO_PAGE: u32 = u32::MAX;

/// One (sequence, KV head)'s selection: candidate `j` is page `first + j` with score
/// `scores[j]`; selected slot `i` holds `resident[i]`.
pub struct Case {
    pub first: u32,
    pub scores: Vec<f32>,
    pub resident: Vec<u32>,
}

/// The plan of `c` for `k` pages when selected slot `i` is slot `slot0 + i`: the `(slot, page)`
/// pairs in order and the margin (as the CPU backend's `margin`).
pub fn brute_plan(c: &Case, k: usize, slot0: u32) -> (Vec<(u32, u32)>, f32) {
    let n = c.scores.len();
    let k = k.min(n).min(c.resident.len());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| c.scores[b].total_cmp(&c.scores[a]).then(a.cmp(&b)));
    let winners = &order[..k];
    let is_winner = |j: usize| winners.contains(&j);
    let worst = winners
        .iter()
        .map(|&j| c.scores[j])
        .fold(f32::INFINITY, f32::min);
    let best_loser = (0..n)
        .filter(|&j| !is_winner(j))
        .map(|j| c.scores[j])
        .fold(f32::NEG_INFINITY, f32::max);
    let margin = if best_loser == f32::NEG_INFINITY && worst > best_loser {
        f32::INFINITY
    } else if worst.is_nan() || best_loser.is_nan() || worst <= best_loser {
        0.0
    } else if worst == f32::INFINITY {
        f32::INFINITY
    } else {
        (worst - best_loser) / worst.abs().max(best_loser.abs()).max(f32::MIN_POSITIVE)
    };
    let cand = |p: u32| p != NO_PAGE && p >= c.first && ((p - c.first) as usize) < n;
    let mut evict: Vec<(f32, u32)> = Vec::new();
    for (i, &p) in c.resident.iter().enumerate() {
        let slot = slot0 + i as u32;
        if cand(p) {
            let j = (p - c.first) as usize;
            if is_winner(j) && !c.resident[..i].contains(&p) {
                continue;
            }
            evict.push((c.scores[j], slot));
        } else {
            evict.push((f32::NEG_INFINITY, slot));
        }
    }
    let mut missing: Vec<(f32, u32)> = winners
        .iter()
        .map(|&j| (c.scores[j], c.first + j as u32))
        .filter(|&(_, p)| !c.resident.contains(&p))
        .collect();
    evict.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    missing.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut pairs = Vec::new();
    for (r, &(_, slot)) in evict.iter().enumerate() {
        let page = missing.get(r).map_or(NO_PAGE, |m| m.1);
        if page != c.resident[(slot - slot0) as usize] {
            pairs.push((slot, page));
        }
    }
    (pairs, margin)
}

/// A random case of `n` candidates from page `first` and `n_sel` selected slots, from `draw`
/// (a uniform integer in `lo..=hi`): scores from a few values (ties) or spread out, some
/// infinite, NaN (either sign) or -0.0; resident pages among the candidates (winners or not),
/// outside them, empty, or (rarely) held twice.
pub fn random_case(
    draw: &mut impl FnMut(usize, usize) -> usize,
    first: u32,
    n: usize,
    n_sel: usize,
) -> Case {
    let levels = [0, 2, 5][draw(0, 2)];
    let scores = (0..n)
        .map(|_| match draw(0, 60) {
            0 => f32::NEG_INFINITY,
            1 => f32::INFINITY,
            2 => f32::NAN,
            3 => -f32::NAN,
            4 => -0.0,
            5 => 0.0,
            _ if levels > 0 => draw(0, levels) as f32 * 0.5 - 1.0,
            _ => (draw(0, 1 << 20) as f32 - (1 << 19) as f32) / 65536.0,
        })
        .collect();
    let resident = (0..n_sel)
        .map(|_| match draw(0, 9) {
            0 | 1 => NO_PAGE,
            2 => draw(0, first as usize + n + 20) as u32,
            _ if n > 0 => first + draw(0, n - 1) as u32,
            _ => NO_PAGE,
        })
        .collect();
    Case {
        first,
        scores,
        resident,
    }
}
