//! `freekv_plan_pages` (the top-k and replacement plan on the device) against the brute-force
//! plan of `tests/support/brute_plan.rs` (which the CPU backend's `plan_replacement` is held to
//! as well). Exact: the same pooled scores must give the same pairs in the same order and the
//! same margin bits, ties, infinities, NaN and -0.0 included.

use freekv_plugin::cuda::kernels::{plan_work_bytes, PlanLaunch, SeqDesc};
use freekv_plugin::cuda::mem::DeviceBuffer;
use freekv_plugin::cuda::source::KernelDtype;

use super::brute_plan::{brute_plan, random_case, Case};
use super::rng::Rng;
use super::{cfg, device, download, kernels, stream, sync, upload};

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
                let mut draw = |lo: usize, hi: usize| rng.range(lo, hi);
                (0..n_kv)
                    .map(|_| random_case(&mut draw, first, n, n_sel))
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
                if r[0] as usize != want.len() || pairs != want || r[1] != margin.to_bits() {
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
