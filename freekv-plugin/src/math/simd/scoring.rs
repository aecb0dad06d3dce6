//! Logits of one or several queries over rows looked up by offset (page summaries, keys
//! scattered by block id), stored as f32, bf16 or f16.

use super::convert::{Bf16, Load8, F16, F32};
use super::*;

/// Logits over indexed rows of `8 * CH` elements, two rows at a time sharing each query
/// load; the row four ahead is prefetched (rows are scattered by block id).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_indexed_fixed<L: Load8, const CH: usize>(
    q: *const f32,
    base: *const L::E,
    offsets: &[usize],
    out: *mut f32,
) {
    let bytes = 8 * CH * std::mem::size_of::<L::E>();
    let prefetch = |j: usize| {
        if let Some(&ahead) = offsets.get(j) {
            let p = base.wrapping_add(ahead) as *const i8;
            let mut b = 0;
            while b < bytes {
                // A prefetch is a hint; it never faults.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(b));
                b += 64;
            }
        }
    };
    let n = offsets.len();
    let mut j = 0;
    while j + 2 <= n {
        prefetch(j + 4);
        prefetch(j + 5);
        let (r0, r1) = (base.add(offsets[j]), base.add(offsets[j + 1]));
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c + 1 < CH {
            let q0 = _mm256_loadu_ps(q.add(8 * c));
            let q1 = _mm256_loadu_ps(q.add(8 * (c + 1)));
            a0 = _mm256_fmadd_ps(q0, L::load8(r0.add(8 * c)), a0);
            b0 = _mm256_fmadd_ps(q0, L::load8(r1.add(8 * c)), b0);
            a1 = _mm256_fmadd_ps(q1, L::load8(r0.add(8 * (c + 1))), a1);
            b1 = _mm256_fmadd_ps(q1, L::load8(r1.add(8 * (c + 1))), b1);
            c += 2;
        }
        *out.add(j) = hsum(_mm256_add_ps(a0, a1));
        *out.add(j + 1) = hsum(_mm256_add_ps(b0, b1));
        j += 2;
    }
    if j < n {
        let r0 = base.add(offsets[j]);
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c + 1 < CH {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(8 * c)), L::load8(r0.add(8 * c)), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.add(8 * (c + 1))),
                L::load8(r0.add(8 * (c + 1))),
                a1,
            );
            c += 2;
        }
        *out.add(j) = hsum(_mm256_add_ps(a0, a1));
    }
}

/// Up to four queries over indexed rows of `dd` elements (a multiple of 64): each 64-wide
/// quarter of a row is loaded once and used by every query.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_indexed_group_l<L: Load8>(
    qs: *const f32,
    g: usize,
    dd: usize,
    base: *const L::E,
    offsets: &[usize],
    out: *mut f32,
) {
    let n = offsets.len();
    let bytes = dd * std::mem::size_of::<L::E>();
    for (j, &o) in offsets.iter().enumerate() {
        if let Some(&ahead) = offsets.get(j + 4) {
            let p = base.wrapping_add(ahead) as *const i8;
            let mut b = 0;
            while b < bytes {
                // A prefetch is a hint; it never faults.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(b));
                b += 64;
            }
        }
        let row = base.add(o);
        let mut g0 = 0;
        while g0 < g {
            let gn = (g - g0).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < dd {
                let mut rv = [_mm256_setzero_ps(); 8];
                for (i, r) in rv.iter_mut().enumerate() {
                    *r = L::load8(row.add(c + 8 * i));
                }
                for (gi, a) in acc.iter_mut().enumerate().take(gn) {
                    let q = qs.add((g0 + gi) * dd + c);
                    let mut x = _mm256_mul_ps(_mm256_loadu_ps(q), rv[0]);
                    let mut y = _mm256_mul_ps(_mm256_loadu_ps(q.add(8)), rv[1]);
                    for i in (2..8).step_by(2) {
                        x = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(8 * i)), rv[i], x);
                        y = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(8 * i + 8)), rv[i + 1], y);
                    }
                    *a = _mm256_add_ps(*a, _mm256_add_ps(x, y));
                }
                c += 64;
            }
            for (gi, a) in acc.iter().enumerate().take(gn) {
                *out.add((g0 + gi) * n + j) = hsum(*a);
            }
            g0 += gn;
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dots_indexed_group(
    qs: &[f32],
    g: usize,
    base: RowsRef<'_>,
    offsets: &[usize],
    out: &mut [f32],
) {
    let dd = qs.len() / g.max(1);
    if !dd.is_multiple_of(64) {
        // Closures inherit this function's target features.
        return each_query(
            qs,
            g,
            base,
            offsets,
            out,
            |q, b, o, out| dots_indexed(q, b, o, out),
            |q, b, o, out, bf| dots_indexed_16(q, b, o, out, bf),
        );
    }
    assert!(qs.len() >= g * dd && out.len() >= g * offsets.len());
    // SAFETY: the public wrapper checked `offsets[j] + dd <= base.len()`; queries are
    // `g` rows of `dd` floats, `out` holds `g * n` floats.
    unsafe {
        match base {
            RowsRef::F32(b) => dots_indexed_group_l::<F32>(
                qs.as_ptr(),
                g,
                dd,
                b.as_ptr(),
                offsets,
                out.as_mut_ptr(),
            ),
            RowsRef::Bf16(b) => dots_indexed_group_l::<Bf16>(
                qs.as_ptr(),
                g,
                dd,
                b.as_ptr(),
                offsets,
                out.as_mut_ptr(),
            ),
            RowsRef::F16(b) => dots_indexed_group_l::<F16>(
                qs.as_ptr(),
                g,
                dd,
                b.as_ptr(),
                offsets,
                out.as_mut_ptr(),
            ),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dots_indexed(q: &[f32], base: &[f32], offsets: &[usize], out: &mut [f32]) {
    let d = q.len();
    let n = offsets.len().min(out.len());
    let (pq, pb, po, offs) = (q.as_ptr(), base.as_ptr(), out.as_mut_ptr(), &offsets[..n]);
    // SAFETY: the caller checked `offsets[j] + d <= base.len()` for every row; `q` has
    // `d = 8 * CH` floats; `out[..n]` is written.
    unsafe {
        match d {
            128 => return dots_indexed_fixed::<F32, 16>(pq, pb, offs, po),
            256 => return dots_indexed_fixed::<F32, 32>(pq, pb, offs, po),
            _ => {}
        }
    }
    for (o, &off) in out.iter_mut().zip(offs) {
        *o = dot(q, &base[off..off + d]);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn dots_indexed_16(q: &[f32], base: &[u16], offsets: &[usize], out: &mut [f32], bf16: bool) {
    let d = q.len();
    let n = offsets.len().min(out.len());
    let (pq, pb, po, offs) = (q.as_ptr(), base.as_ptr(), out.as_mut_ptr(), &offsets[..n]);
    // SAFETY: as `dots_indexed`: rows were bounds-checked by the caller.
    unsafe {
        match (d, bf16) {
            (128, true) => return dots_indexed_fixed::<Bf16, 16>(pq, pb, offs, po),
            (256, true) => return dots_indexed_fixed::<Bf16, 32>(pq, pb, offs, po),
            (128, false) => return dots_indexed_fixed::<F16, 16>(pq, pb, offs, po),
            (256, false) => return dots_indexed_fixed::<F16, 32>(pq, pb, offs, po),
            _ => {}
        }
    }
    // Other head dims: the plain loop.
    super::portable::dots_indexed_16(q, base, offs, &mut out[..n], bf16)
}
