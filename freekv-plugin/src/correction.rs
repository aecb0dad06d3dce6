//! The correction test's threshold: fixed (`tau`), or adapted online per (layer, KV head) to
//! hold a target correction rate (`correction_rate`, beyond the paper, which leaves a per-task
//! tau open).
//!
//! The adaptive threshold tracks the `correction_rate` quantile of the head's running query
//! similarity with a Robbins-Monro step: after each test, `tau += step * (rate - corrected)`.
//! A head corrected more often than the target lowers its threshold, one corrected less often
//! raises it; at equilibrium `P(similarity < tau) = rate`. Early layers, whose queries drift a
//! lot, thus stop being corrected nearly every step, and stable layers still get their share.

use crate::geometry::Geometry;
use crate::math;

/// The correction test's similarity of one sequence: per KV head (`out[h]`), the mean over its
/// group of cos(current query head, stored query head), each cosine clamped to `[-1, 1]` and 1
/// where either vector is zero (a query never stored does not drift). `current(qh)` is query
/// head `qh`'s current values, `stored` the stored query `[n_q][d]`. The CUDA kernel
/// `freekv_correction` computes the same.
pub fn group_similarity<'a>(
    geo: &Geometry,
    current: impl Fn(usize) -> &'a [f32],
    stored: &[f32],
    out: &mut [f32],
) {
    let (d, gs) = (geo.head_dim, geo.group);
    for (h, o) in out.iter_mut().enumerate().take(geo.num_kv_heads) {
        let mut sum = 0.0;
        for qh in h * gs..(h + 1) * gs {
            let a = current(qh);
            let b = &stored[qh * d..(qh + 1) * d];
            let norms = (math::dot(a, a) * math::dot(b, b)).sqrt();
            sum += if norms > 0.0 {
                (math::dot(a, b) / norms).clamp(-1.0, 1.0)
            } else {
                1.0
            };
        }
        *o = sum / gs as f32;
    }
}

/// Per-observation step of the adaptive threshold: about 60 tests move it by 0.1 at a 25%
/// target, small beside the spread of the similarities it tracks.
const STEP: f32 = 0.005;

/// The correction thresholds of one layer.
#[derive(Clone, Debug)]
pub struct Threshold {
    /// Per KV head.
    tau: Vec<f32>,
    /// Target share of corrected heads; `None`: fixed thresholds.
    rate: Option<f32>,
}

impl Threshold {
    /// `n_kv` heads starting at `tau`, adapting towards `rate` when it is positive.
    pub fn new(n_kv: usize, tau: f32, rate: f32) -> Self {
        Self {
            tau: vec![tau; n_kv],
            rate: (rate > 0.0).then_some(rate),
        }
    }

    /// Decides, per KV head, whether its similarity calls for a correction, and adapts.
    pub fn decide(&mut self, similarity: &[f32], corrected: &mut [bool]) {
        for ((c, &s), tau) in corrected.iter_mut().zip(similarity).zip(&mut self.tau) {
            // tau = 1 corrects every head (a cosine of identical queries may round to 1).
            *c = s < *tau || *tau >= 1.0;
            if let Some(rate) = self.rate {
                *tau = (*tau + STEP * (rate - *c as u8 as f32)).clamp(-1.0, 1.0);
            }
        }
    }

    /// The current threshold of each KV head.
    #[cfg(test)]
    pub fn taus(&self) -> &[f32] {
        &self.tau
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 uniforms in [0, 1).
    fn uniforms(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }

    #[test]
    fn group_similarity_matches_a_naive_mean_of_cosines() {
        for seed in 0..20u64 {
            let (n_kv, group, d) = (
                1 + seed as usize % 3,
                1 + seed as usize % 4,
                8 + 8 * (seed as usize % 3),
            );
            let geo = Geometry {
                page_size: 16,
                num_kv_heads: n_kv,
                group,
                head_dim: d,
                sink_pages: 1,
                window_pages: 1,
                sel_pages: 1,
                slots: 3,
            };
            let n = n_kv * group * d;
            let cur: Vec<f32> = uniforms(seed, n).iter().map(|x| x - 0.5).collect();
            let mut stored: Vec<f32> = uniforms(seed + 100, n).iter().map(|x| x - 0.5).collect();
            // Heads that equal, oppose or are zero.
            stored[..d].copy_from_slice(&cur[..d]);
            if group > 1 {
                stored[d..2 * d]
                    .iter_mut()
                    .zip(&cur[d..2 * d])
                    .for_each(|(s, c)| *s = -c);
            }
            if seed % 2 == 1 && n_kv > 1 {
                stored[n - d..].fill(0.0);
            }
            let mut got = vec![0.0; n_kv];
            group_similarity(&geo, |qh| &cur[qh * d..(qh + 1) * d], &stored, &mut got);
            for (h, &g) in got.iter().enumerate() {
                let mut want = 0.0f64;
                for qh in h * group..(h + 1) * group {
                    let (a, b) = (&cur[qh * d..(qh + 1) * d], &stored[qh * d..(qh + 1) * d]);
                    let dot: f64 = a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum();
                    let na: f64 = a.iter().map(|x| (x * x) as f64).sum();
                    let nb: f64 = b.iter().map(|x| (x * x) as f64).sum();
                    want += if na * nb > 0.0 {
                        dot / (na * nb).sqrt()
                    } else {
                        1.0
                    };
                }
                want /= group as f64;
                assert!(
                    (g as f64 - want).abs() < 1e-5,
                    "seed {seed} head {h}: {g} vs {want}"
                );
            }
            if group == 2 {
                // KV head 0's group is an equal and an opposite query head: 1 and -1 cancel.
                assert!(got[0].abs() < 1e-5, "seed {seed}: {}", got[0]);
            }
        }
    }

    #[test]
    fn fixed_thresholds_never_move() {
        let mut t = Threshold::new(2, 0.9, 0.0);
        let mut c = [false; 2];
        t.decide(&[0.5, 0.95], &mut c);
        assert_eq!(c, [true, false]);
        assert_eq!(t.taus(), &[0.9, 0.9]);
        let mut all = Threshold::new(1, 1.0, 0.0);
        let mut c = [false];
        all.decide(&[1.0], &mut c);
        assert!(c[0], "tau 1 corrects identical queries");
    }

    #[test]
    fn adaptive_thresholds_hold_the_target_rate_per_head() {
        // Head 0's similarities lie in [0.5, 0.7), head 1's in [0.9, 1.0): with a fixed tau of
        // 0.9 head 0 would be corrected always and head 1 never.
        for rate in [0.1f32, 0.25, 0.5] {
            let mut t = Threshold::new(2, 0.9, rate);
            let u = uniforms(rate.to_bits() as u64, 2 * 20_000);
            let mut hits = [0usize; 2];
            let mut c = [false; 2];
            for (i, pair) in u.chunks_exact(2).enumerate() {
                t.decide(&[0.5 + 0.2 * pair[0], 0.9 + 0.1 * pair[1]], &mut c);
                if i >= 5_000 {
                    hits[0] += c[0] as usize;
                    hits[1] += c[1] as usize;
                }
            }
            for (h, &n) in hits.iter().enumerate() {
                let got = n as f32 / 15_000.0;
                assert!(
                    (got - rate).abs() < 0.02,
                    "head {h}, rate {rate}: corrected {got}"
                );
            }
            // The thresholds sit at the target quantile of each head's distribution.
            assert!(
                (t.taus()[0] - (0.5 + 0.2 * rate)).abs() < 0.02,
                "{:?}",
                t.taus()
            );
            assert!(
                (t.taus()[1] - (0.9 + 0.1 * rate)).abs() < 0.02,
                "{:?}",
                t.taus()
            );
        }
    }
}
