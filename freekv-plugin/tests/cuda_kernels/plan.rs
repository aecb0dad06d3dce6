//! `freekv_plan_pages` (the top-k and replacement plan on the device) against a brute-force
//! plan written from the spec: every candidate sorted, the best k taken, the resident winners
//! kept, the other selected slots refilled lowest score first with the missing winners best
//! first. Exact: the same pooled scores must give the same pairs in the same order, ties and
//! infinities included.

use freekv_plugin::cuda::kernels::{plan_work_bytes, PlanLaunch, SeqDesc};
use freekv_plugin::cuda::mem::DeviceBuffer;
use freekv_plugin::cuda::source::KernelDtype;

use super::rng::Rng;
use super::{cfg, device, download, kernels, stream, sync, upload};

const NO_PAGE: u32 = u32::MAX;

/// One (sequence, KV head)'s selection: candidate `j` is page `first + j` with score
/// `scores[j]`; selected slot `i` (index `slot0 + i`) holds `resident[i]`.
struct Case {
    first: u32,
    scores: Vec<f32>,
    resident: Vec<u32>,
}

/// The plan by sorting: `(slot, page)` pairs and the margin.
fn brute_plan(c: &Case, k: usize, slot0: u32) -> (Vec<(u32, u32)>, f32) {
    let n = c.scores.len();
    let k = k.min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| c.scores[b].total_cmp(&c.scores[a]).then(a.cmp(&b)));
    let winners: Vec<usize> = order[..k].to_vec();
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

/// A random case: scores drawn from a few values (ties) or continuous, some infinite; resident
/// pages among the candidates (winners or not), outside them, empty, or (rarely) held twice.
fn random_case(rng: &mut Rng, first: u32, n: usize, n_sel: usize) -> Case {
    let levels = rng.pick(&[0usize, 2, 5]);
    let scores = (0..n)
        .map(|_| match rng.range(0, 40) {
            0 => f32::NEG_INFINITY,
            1 => f32::INFINITY,
            _ if levels > 0 => rng.range(0, levels) as f32 * 0.5 - 1.0,
            _ => rng.normal(),
        })
        .collect();
    let resident = (0..n_sel)
        .map(|_| match rng.range(0, 9) {
            0 | 1 => NO_PAGE,
            2 => rng.range(0, first as usize + n + 20) as u32,
            _ if n > 0 => first + rng.range(0, n - 1) as u32,
            _ => NO_PAGE,
        })
        .collect();
    Case {
        first,
        scores,
        resident,
    }
}

#[test]
fn page_plans_match_a_brute_force_plan() {
    let Some(ctx) = device("page_plans_match_a_brute_force_plan") else {
        return;
    };
    let s = stream(&ctx);
    // The plan kernel does not depend on the specialisation; one module serves.
    let k = kernels(&ctx, cfg(KernelDtype::Bf16, 128, 32, 4));
    let mut failures = Vec::new();
    let mut cases_run = 0;
    for seed in 0..24u64 {
        let mut rng = Rng::new(1000 + seed);
        let n_kv = rng.range(1, 4);
        let n_sel = rng.pick(&[1usize, 3, 8, 56, 300]);
        let slot0 = rng.range(0, 20);
        // Two sequences of different candidate counts: zero, fewer than the slots, more.
        let counts = [
            rng.pick(&[0usize, 1, n_sel.saturating_sub(1), n_sel, n_sel + 1]),
            rng.pick(&[2 * n_sel + 7, 1000, 5000]),
        ];
        let stride = counts[1] + 5;
        // Every head of a sequence shares its first candidate page (as the product's do).
        let cases: Vec<Vec<Case>> = counts
            .iter()
            .map(|&n| {
                let first = rng.range(0, 40) as u32;
                (0..n_kv)
                    .map(|_| random_case(&mut rng, first, n, n_sel))
                    .collect()
            })
            .collect();
        let mut pooled = vec![f32::NAN; 2 * n_kv * stride];
        let mut resident = Vec::new();
        for (s_i, seq) in cases.iter().enumerate() {
            for (h, c) in seq.iter().enumerate() {
                let o = (s_i * n_kv + h) * stride;
                pooled[o..o + c.scores.len()].copy_from_slice(&c.scores);
                resident.extend_from_slice(&c.resident);
            }
        }
        let descs: Vec<SeqDesc> = counts
            .iter()
            .map(|&n| SeqDesc {
                cand_count: n as i32,
                ..Default::default()
            })
            .collect();
        let firsts: Vec<i32> = cases.iter().map(|seq| seq[0].first as i32).collect();
        let row = 2 + 2 * n_sel;
        let (pd, dd, fd, rd) = (
            upload(&ctx, &pooled),
            upload(&ctx, &descs),
            upload(&ctx, &firsts),
            upload(&ctx, &resident),
        );
        let plan = DeviceBuffer::zeroed(&ctx, 2 * n_kv * row * 4).unwrap();
        let work = DeviceBuffer::zeroed(&ctx, plan_work_bytes(2 * n_kv, n_sel)).unwrap();
        k.plan_pages(
            s.cu_stream(),
            &PlanLaunch {
                pooled: pd.ptr(),
                descs: dd.ptr(),
                cand_first: fd.ptr(),
                resident: rd.ptr(),
                plan: plan.ptr(),
                work: work.ptr(),
                n_seq: 2,
                n_kv,
                cand_stride: stride,
                n_sel,
                sel_k: n_sel,
                slot0,
            },
        )
        .unwrap();
        sync(&s);
        let got: Vec<u32> = download(&plan, 2 * n_kv * row);
        for (s_i, seq) in cases.iter().enumerate() {
            for (h, c) in seq.iter().enumerate() {
                cases_run += 1;
                let r = &got[(s_i * n_kv + h) * row..(s_i * n_kv + h + 1) * row];
                let count = (r[0] as usize).min(n_sel);
                let pairs: Vec<(u32, u32)> = r[2..2 + 2 * count]
                    .chunks(2)
                    .map(|p| (p[0], p[1]))
                    .collect();
                let (want, margin) = brute_plan(c, n_sel, slot0 as u32);
                let got_margin = f32::from_bits(r[1]);
                let same_margin = got_margin == margin || (got_margin.is_nan() && margin.is_nan());
                if r[0] as usize != want.len() || pairs != want || !same_margin {
                    failures.push(format!(
                        "seed {seed} seq {s_i} head {h} (n {}, n_sel {n_sel}): got {} pairs \
                         {pairs:?} margin {got_margin}, want {want:?} margin {margin}",
                        c.scores.len(),
                        r[0]
                    ));
                }
            }
        }
    }
    eprintln!("page plans: {cases_run} (sequence, head) cases");
    assert!(
        failures.is_empty(),
        "{} of {cases_run} plans differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
