//! Dot products, `y += a x` and the weighted sums of attention's value side.

use super::*;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: every load reads 8 floats at an offset `i` with `i + 8 <= n` (or
    // `i + 32 <= n` in the unrolled loop), inside both slices.
    unsafe {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        let mut acc3 = _mm256_setzero_ps();
        while i + 32 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            acc2 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 16)),
                _mm256_loadu_ps(pb.add(i + 16)),
                acc2,
            );
            acc3 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 24)),
                _mm256_loadu_ps(pb.add(i + 24)),
                acc3,
            );
            i += 32;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc0, acc1),
            _mm256_add_ps(acc2, acc3),
        ));
        while i < n {
            s = (*pa.add(i)).mul_add(*pb.add(i), s);
            i += 1;
        }
        s
    }
}

/// Logits with the query held in `CH` registers (`d = 8 * CH`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_fixed<const CH: usize>(
    q: *const f32,
    k: *const f32,
    n: usize,
    scale: f32,
    out: *mut f32,
) {
    let mut qv = [_mm256_setzero_ps(); CH];
    for (c, v) in qv.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(q.add(8 * c));
    }
    for t in 0..n {
        let row = k.add(t * 8 * CH);
        let mut a0 = _mm256_mul_ps(qv[0], _mm256_loadu_ps(row));
        let mut a1 = _mm256_mul_ps(qv[1], _mm256_loadu_ps(row.add(8)));
        let mut c = 2;
        while c + 1 < CH {
            a0 = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(row.add(8 * c)), a0);
            a1 = _mm256_fmadd_ps(qv[c + 1], _mm256_loadu_ps(row.add(8 * (c + 1))), a1);
            c += 2;
        }
        *out.add(t) = hsum(_mm256_add_ps(a0, a1)) * scale;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dots(q: &[f32], k: &[f32], scale: f32, out: &mut [f32]) {
    let d = q.len();
    let n = out.len().min(k.len() / d.max(1));
    // SAFETY: `dots_fixed` reads `d = 8 * CH` floats of `q` and rows `t * d..(t + 1) * d`
    // of `k` for `t < n <= k.len() / d`, and writes `out[..n]`.
    unsafe {
        match d {
            64 => return dots_fixed::<8>(q.as_ptr(), k.as_ptr(), n, scale, out.as_mut_ptr()),
            128 => return dots_fixed::<16>(q.as_ptr(), k.as_ptr(), n, scale, out.as_mut_ptr()),
            _ => {}
        }
    }
    for (t, o) in out.iter_mut().enumerate().take(n) {
        *o = dot(q, &k[t * d..(t + 1) * d]) * scale;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let mut i = 0;
    // SAFETY: 8-float accesses at `i + 8 <= n`, inside both slices; `y` is exclusive.
    unsafe {
        let va = _mm256_set1_ps(a);
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
            i += 8;
        }
        while i < n {
            *py.add(i) = a.mul_add(*px.add(i), *py.add(i));
            i += 1;
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn weighted_sum(acc: &mut [f32], w: &[f32], v: &[f32]) {
    let d = acc.len();
    let n = w.len().min(v.len() / d.max(1));
    let (pacc, pw, pv) = (acc.as_mut_ptr(), w.as_ptr(), v.as_ptr());
    let mut c = 0;
    // SAFETY: `acc` chunks at `c + 8 <= d` (or `c + 32 <= d`); `v` rows at `t * d + c`
    // with `t < n <= v.len() / d`, so every read ends inside `v`.
    unsafe {
        while c + 32 <= d {
            let mut a0 = _mm256_loadu_ps(pacc.add(c));
            let mut a1 = _mm256_loadu_ps(pacc.add(c + 8));
            let mut a2 = _mm256_loadu_ps(pacc.add(c + 16));
            let mut a3 = _mm256_loadu_ps(pacc.add(c + 24));
            for t in 0..n {
                let wt = _mm256_set1_ps(*pw.add(t));
                let row = pv.add(t * d + c);
                a0 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(row), a0);
                a1 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(row.add(8)), a1);
                a2 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(row.add(16)), a2);
                a3 = _mm256_fmadd_ps(wt, _mm256_loadu_ps(row.add(24)), a3);
            }
            _mm256_storeu_ps(pacc.add(c), a0);
            _mm256_storeu_ps(pacc.add(c + 8), a1);
            _mm256_storeu_ps(pacc.add(c + 16), a2);
            _mm256_storeu_ps(pacc.add(c + 24), a3);
            c += 32;
        }
        while c + 8 <= d {
            let mut a0 = _mm256_loadu_ps(pacc.add(c));
            for t in 0..n {
                a0 = _mm256_fmadd_ps(
                    _mm256_set1_ps(*pw.add(t)),
                    _mm256_loadu_ps(pv.add(t * d + c)),
                    a0,
                );
            }
            _mm256_storeu_ps(pacc.add(c), a0);
            c += 8;
        }
        while c < d {
            let mut s = *pacc.add(c);
            for t in 0..n {
                s = (*pw.add(t)).mul_add(*pv.add(t * d + c), s);
            }
            *pacc.add(c) = s;
            c += 1;
        }
    }
}

/// Up to `R` rows at once over one 32-channel group: `4 R` accumulators.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_group<const R: usize>(
    acc: *mut f32,
    w: *const f32,
    v: *const f32,
    n: usize,
    d: usize,
    c: usize,
) {
    let mut a = [[_mm256_setzero_ps(); 4]; R];
    for (r, ar) in a.iter_mut().enumerate() {
        for (i, x) in ar.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(acc.add(r * d + c + 8 * i));
        }
    }
    for t in 0..n {
        let row = v.add(t * d + c);
        let v0 = _mm256_loadu_ps(row);
        let v1 = _mm256_loadu_ps(row.add(8));
        let v2 = _mm256_loadu_ps(row.add(16));
        let v3 = _mm256_loadu_ps(row.add(24));
        for (r, ar) in a.iter_mut().enumerate() {
            let wt = _mm256_set1_ps(*w.add(r * n + t));
            ar[0] = _mm256_fmadd_ps(wt, v0, ar[0]);
            ar[1] = _mm256_fmadd_ps(wt, v1, ar[1]);
            ar[2] = _mm256_fmadd_ps(wt, v2, ar[2]);
            ar[3] = _mm256_fmadd_ps(wt, v3, ar[3]);
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (i, x) in ar.iter().enumerate() {
            _mm256_storeu_ps(acc.add(r * d + c + 8 * i), *x);
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn weighted_sum_rows(acc: &mut [f32], w: &[f32], v: &[f32], rows: usize, d: usize) {
    let n = w.len() / rows.max(1);
    if !d.is_multiple_of(32) {
        for r in 0..rows {
            weighted_sum(&mut acc[r * d..(r + 1) * d], &w[r * n..(r + 1) * n], v);
        }
        return;
    }
    assert!(acc.len() >= rows * d && v.len() >= n * d && w.len() >= rows * n);
    let (pa, pw, pv) = (acc.as_mut_ptr(), w.as_ptr(), v.as_ptr());
    // SAFETY: the assert bounds every access: rows `r < rows` of `acc` (`d` each) and of
    // `w` (`n` each), value rows `t < n` of `d`, channel groups `c + 32 <= d`.
    unsafe {
        let mut r0 = 0;
        while r0 < rows {
            let left = rows - r0;
            let (pa, pw) = (pa.add(r0 * d), pw.add(r0 * n));
            let mut c = 0;
            while c < d {
                match left {
                    1 => weighted_group::<1>(pa, pw, pv, n, d, c),
                    2 => weighted_group::<2>(pa, pw, pv, n, d, c),
                    3 => weighted_group::<3>(pa, pw, pv, n, d, c),
                    _ => weighted_group::<4>(pa, pw, pv, n, d, c),
                }
                c += 32;
            }
            r0 += left.min(4);
        }
    }
}
