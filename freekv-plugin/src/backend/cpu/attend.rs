//! CPU attention: online softmax over segments of keys/values, f32 accumulation.
//!
//! A segment is a run of up to one page of one KV head's keys and values (a host-tier chunk,
//! or a slot of the copy device tier), with a row stride and the position of its first token.
//! Token order does not matter (keys are already rotated), so decode attends over the
//! working set's slots in any order. The same kernel serves decode (the G query heads of a
//! group, one position) and blocked prefill (a block of tokens x G heads, causal mask).

use crate::AttnParams;

use super::elem::KvElem;
use crate::math;

/// Keys and values of up to one page of one KV head.
#[derive(Clone, Copy)]
pub struct Segment<'a, T> {
    /// Row `t` of the keys starts at `k[t * stride]` (`d` elements).
    pub k: &'a [T],
    pub v: &'a [T],
    pub stride: usize,
    /// Tokens in the segment.
    pub n: usize,
    /// Position of the first token.
    pub pos0: usize,
}

impl<T> Segment<'_, T> {
    /// Starts loading the segment's rows into the cache (call for the next segment while
    /// computing the current one: pages are scattered, so hardware prefetchers stop at each).
    #[inline]
    pub fn prefetch(&self, d: usize) {
        let size = std::mem::size_of::<T>();
        if self.n == 0 {
            return;
        }
        if self.stride == d {
            math::prefetch(self.k.as_ptr() as *const u8, self.n * d * size);
            math::prefetch(self.v.as_ptr() as *const u8, self.n * d * size);
        } else {
            for t in 0..self.n {
                math::prefetch(self.k[t * self.stride..].as_ptr() as *const u8, d * size);
                math::prefetch(self.v[t * self.stride..].as_ptr() as *const u8, d * size);
            }
        }
    }
}

/// Working memory of the kernel, reused between calls.
#[derive(Default)]
pub struct AttnScratch {
    kf: Vec<f32>,
    vf: Vec<f32>,
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    /// Prefill: gathered queries of a block and their positions.
    pub q: Vec<f32>,
    pub qpos: Vec<usize>,
}

/// Online-softmax attention of `rows` query rows (`q[r * d..]`, at positions `qpos[r]`).
pub struct Attention<'s> {
    scratch: &'s mut AttnScratch,
    rows: usize,
    d: usize,
    min_pos: usize,
    max_pos: usize,
    /// The earliest key position any row may see.
    first_visible_min: usize,
    /// The latest first-visible position over rows (keys from here on are visible to all rows
    /// that are at or after them).
    first_visible_max: usize,
}

impl<'s> Attention<'s> {
    /// Starts attention for the query rows already in `scratch.q` / `scratch.qpos`.
    pub fn begin(scratch: &'s mut AttnScratch, rows: usize, d: usize, params: &AttnParams) -> Self {
        scratch.m.clear();
        scratch.m.resize(rows, f32::NEG_INFINITY);
        scratch.l.clear();
        scratch.l.resize(rows, 0.0);
        scratch.acc.clear();
        scratch.acc.resize(rows * d, 0.0);
        let min_pos = scratch.qpos[..rows].iter().copied().min().unwrap_or(0);
        let max_pos = scratch.qpos[..rows].iter().copied().max().unwrap_or(0);
        Self {
            rows,
            d,
            min_pos,
            max_pos,
            first_visible_min: params.first_visible(min_pos),
            first_visible_max: params.first_visible(max_pos),
            scratch,
        }
    }

    /// Whether any row can see any key of `[pos0, pos0 + n)`.
    pub fn any_visible(&self, pos0: usize, n: usize) -> bool {
        n > 0 && pos0 <= self.max_pos && pos0 + n > self.first_visible_min
    }

    /// Adds one segment.
    #[inline]
    pub fn add<T: KvElem>(&mut self, seg: Segment<'_, T>, params: &AttnParams) {
        if !self.any_visible(seg.pos0, seg.n) {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if math::CpuKernels::active() == math::CpuKernels::Avx2 {
            // SAFETY: the AVX2 kernels are active only on a CPU that has these features.
            return unsafe { self.add_avx2(seg, params) };
        }
        self.add_body(seg, params)
    }

    /// [`Attention::add`] compiled for AVX2 + FMA + F16C: the masking, scaling and softcap
    /// loops between the kernels vectorise as in a `target-cpu=native` build.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn add_avx2<T: KvElem>(&mut self, seg: Segment<'_, T>, params: &AttnParams) {
        self.add_body(seg, params)
    }

    #[inline(always)]
    fn add_body<T: KvElem>(&mut self, seg: Segment<'_, T>, params: &AttnParams) {
        let (rows, d, n) = (self.rows, self.d, seg.n);
        let sc = &mut *self.scratch;
        // Keys as f32 rows of `d` (no copy when stored as contiguous f32).
        let direct = if seg.stride == d {
            T::as_f32s(&seg.k[..n * d])
        } else {
            None
        };
        let kf: &[f32] = match direct {
            Some(k) => k,
            None => {
                sc.kf.resize(n * d, 0.0);
                for t in 0..n {
                    T::to_f32s(
                        &seg.k[t * seg.stride..t * seg.stride + d],
                        &mut sc.kf[t * d..(t + 1) * d],
                    );
                }
                &sc.kf[..n * d]
            }
        };
        sc.s.resize(rows * n, 0.0);
        for r in 0..rows {
            let q = &sc.q[r * d..(r + 1) * d];
            let s = &mut sc.s[r * n..(r + 1) * n];
            math::dots(q, kf, params.softmax_scale, s);
            if let Some(c) = params.softcap {
                for st in s.iter_mut() {
                    *st = c * (*st / c).tanh();
                }
            }
        }
        // Rows that cannot see every key of the segment get a mask.
        let needs_mask = seg.pos0 + n - 1 > self.min_pos || seg.pos0 < self.first_visible_max;
        for r in 0..rows {
            let s = &mut sc.s[r * n..(r + 1) * n];
            let (lo, hi) = if needs_mask {
                let qpos = sc.qpos[r];
                let first = params.first_visible(qpos);
                // Visible tokens t: first <= pos0 + t <= qpos.
                let lo = first.saturating_sub(seg.pos0).min(n);
                let hi = (qpos + 1).saturating_sub(seg.pos0).min(n);
                (lo, hi.max(lo))
            } else {
                (0, n)
            };
            if lo == hi {
                s.fill(0.0);
                continue;
            }
            let mx = math::max(&s[lo..hi]);
            let m_old = sc.m[r];
            let m_new = m_old.max(mx);
            let alpha = if m_old == f32::NEG_INFINITY {
                0.0
            } else {
                math::exp(m_old - m_new)
            };
            let sum = math::exp_sub_sum(&mut s[lo..hi], m_new);
            s[..lo].fill(0.0);
            s[hi..].fill(0.0);
            sc.l[r] = sc.l[r] * alpha + sum;
            sc.m[r] = m_new;
            if alpha != 1.0 {
                math::scale(&mut sc.acc[r * d..(r + 1) * d], alpha);
            }
        }
        // Values.
        let direct = if seg.stride == d {
            T::as_f32s(&seg.v[..n * d])
        } else {
            None
        };
        let vf: &[f32] = match direct {
            Some(v) => v,
            None => {
                sc.vf.resize(n * d, 0.0);
                for t in 0..n {
                    T::to_f32s(
                        &seg.v[t * seg.stride..t * seg.stride + d],
                        &mut sc.vf[t * d..(t + 1) * d],
                    );
                }
                &sc.vf[..n * d]
            }
        };
        math::weighted_sum_rows(&mut sc.acc[..rows * d], &sc.s[..rows * n], vf, rows, d);
    }

    /// Writes row `r`'s normalised output.
    pub fn finish_row(&self, r: usize, out: &mut [f32]) {
        let d = self.d;
        let l = self.scratch.l[r];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for (o, a) in out.iter_mut().zip(&self.scratch.acc[r * d..(r + 1) * d]) {
            *o = a * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Naive softmax attention of one query over explicit keys/values (f64).
    fn naive(
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        scale: f32,
        cap: Option<f32>,
    ) -> Vec<f32> {
        let logits: Vec<f64> = keys
            .iter()
            .map(|k| {
                let s = q
                    .iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64;
                match cap {
                    Some(c) => c as f64 * (s / c as f64).tanh(),
                    None => s,
                }
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
        let w: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = w.iter().sum();
        (0..q.len())
            .map(|c| {
                (w.iter()
                    .zip(vals)
                    .map(|(w, v)| w * v[c] as f64)
                    .sum::<f64>()
                    / z) as f32
            })
            .collect()
    }

    #[test]
    fn segments_in_any_order_equal_naive_softmax() {
        let d = 8;
        let n_tok = 21;
        let val = |i: usize, c: usize, s: usize| (((i * 37 + c * 11 + s) % 17) as f32 - 8.0) / 8.0;
        let keys: Vec<Vec<f32>> = (0..n_tok)
            .map(|i| (0..d).map(|c| val(i, c, 1)).collect())
            .collect();
        let vals: Vec<Vec<f32>> = (0..n_tok)
            .map(|i| (0..d).map(|c| val(i, c, 5)).collect())
            .collect();
        let q: Vec<f32> = (0..d).map(|c| val(3, c, 9)).collect();
        for cap in [None, Some(0.7)] {
            let params = AttnParams {
                softmax_scale: 0.4,
                softcap: cap,
                sliding_window: None,
            };
            let want = naive(&q, &keys, &vals, 0.4, cap);
            // Strided bf16 storage split into segments of 8, 8, 5 added in reverse order.
            let stride = 3 * d;
            let mut kbuf = vec![bf16::ZERO; n_tok * stride];
            let mut vbuf = vec![bf16::ZERO; n_tok * stride];
            for i in 0..n_tok {
                for c in 0..d {
                    kbuf[i * stride + d + c] = bf16::from_f32(keys[i][c]);
                    vbuf[i * stride + d + c] = bf16::from_f32(vals[i][c]);
                }
            }
            let mut sc = AttnScratch {
                q: q.clone(),
                qpos: vec![100],
                ..Default::default()
            };
            let mut att = Attention::begin(&mut sc, 1, d, &params);
            for start in [16, 8, 0] {
                let n = (n_tok - start).min(8);
                att.add(
                    Segment {
                        k: &kbuf[start * stride + d..],
                        v: &vbuf[start * stride + d..],
                        stride,
                        n,
                        pos0: start,
                    },
                    &params,
                );
            }
            let mut out = vec![0.0; d];
            att.finish_row(0, &mut out);
            for c in 0..d {
                // bf16 keys/values (values are exact multiples of 1/8).
                assert!((out[c] - want[c]).abs() < 2e-2, "{out:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn causal_and_sliding_masks() {
        let d = 4;
        let keys: Vec<f32> = (0..10 * d).map(|i| ((i * 7 % 5) as f32) * 0.3).collect();
        let vals: Vec<f32> = (0..10 * d).map(|i| ((i * 3 % 7) as f32) * 0.2).collect();
        let q: Vec<f32> = vec![0.5, -0.25, 1.0, 0.1, 0.3, 0.3, -0.7, 0.2];
        let params = AttnParams {
            softmax_scale: 1.0,
            softcap: None,
            sliding_window: Some(3),
        };
        let mut sc = AttnScratch {
            q: q.clone(),
            qpos: vec![4, 8],
            ..Default::default()
        };
        let mut att = Attention::begin(&mut sc, 2, d, &params);
        att.add(
            Segment {
                k: &keys[..],
                v: &vals[..],
                stride: d,
                n: 10,
                pos0: 0,
            },
            &params,
        );
        for (r, pos) in [(0usize, 4usize), (1, 8)] {
            let mut out = vec![0.0; d];
            att.finish_row(r, &mut out);
            // Sees keys pos-2 ..= pos.
            let ks: Vec<Vec<f32>> = (pos - 2..=pos)
                .map(|t| keys[t * d..(t + 1) * d].to_vec())
                .collect();
            let vs: Vec<Vec<f32>> = (pos - 2..=pos)
                .map(|t| vals[t * d..(t + 1) * d].to_vec())
                .collect();
            let want = naive(&q[r * d..(r + 1) * d], &ks, &vs, 1.0, None);
            for c in 0..d {
                assert!(
                    (out[c] - want[c]).abs() < 1e-5,
                    "row {r}: {out:?} vs {want:?}"
                );
            }
        }
    }
}
