//! The inner loops: dot products, scaled accumulation, a branch-free exp, max.
//!
//! Each public function dispatches at compile time: with AVX2 + FMA + F16C (the repo builds
//! with `target-cpu=native`) to explicit intrinsics in `simd`, which the decode benchmark
//! measured about 4x faster than what LLVM made of the portable loops; otherwise to
//! [`portable`], plain chunk loops LLVM vectorises as it can. Both are tested against each
//! other and against naive sums.

const LANES: usize = 16;

#[inline(always)]
fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `sum_i a[i] * b[i]` (same lengths).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::dot(a, b)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        portable::dot(a, b)
    }
}

/// `y[i] += a * x[i]`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::axpy(y, a, x)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        portable::axpy(y, a, x)
    }
}

/// `acc[c] += sum_t w[t] * v[t * d + c]` for `c < d = acc.len()`: the value side of attention.
#[inline]
pub fn weighted_sum(acc: &mut [f32], w: &[f32], v: &[f32]) {
    debug_assert!(v.len() >= w.len() * acc.len());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::weighted_sum(acc, w, v)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        portable::weighted_sum(acc, w, v)
    }
}

/// `out[t] = scale * (q . k[t * d..(t + 1) * d])` for `t < out.len()`, `d = q.len()`: the
/// logits of one query over a run of contiguous key rows.
#[inline]
pub fn dots(q: &[f32], k: &[f32], scale: f32, out: &mut [f32]) {
    debug_assert!(k.len() >= out.len() * q.len());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::dots(q, k, scale, out)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        portable::dots(q, k, scale, out)
    }
}

/// `out[j] = q . base[offsets[j]..offsets[j] + q.len()]`: logits over rows that are not
/// contiguous (page summaries looked up by block id).
#[inline]
pub fn dots_indexed(q: &[f32], base: &[f32], offsets: &[usize], out: &mut [f32]) {
    let d = q.len();
    for &o in offsets {
        assert!(
            o + d <= base.len(),
            "row at {o} outside {} elements",
            base.len()
        );
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::dots_indexed(q, base, offsets, out)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        for (o, &off) in out.iter_mut().zip(offsets) {
            *o = dot(q, &base[off..off + d]);
        }
    }
}

/// [`dots_indexed`] over rows stored as 16-bit floats (`bf16 = true`: bfloat16, else IEEE
/// half), converted on the fly.
#[inline]
pub fn dots_indexed_16(q: &[f32], base: &[u16], offsets: &[usize], out: &mut [f32], bf16: bool) {
    let d = q.len();
    for &o in offsets {
        assert!(
            o + d <= base.len(),
            "row at {o} outside {} elements",
            base.len()
        );
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::dots_indexed_16(q, base, offsets, out, bf16)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        for (o, &off) in out.iter_mut().zip(offsets) {
            *o = base[off..off + d]
                .iter()
                .zip(q)
                .map(|(b, q)| {
                    let x = if bf16 {
                        half::bf16::from_bits(*b).to_f32()
                    } else {
                        half::f16::from_bits(*b).to_f32()
                    };
                    x * q
                })
                .sum();
        }
    }
}

/// [`dots_indexed`] for `g` queries at once (`qs` is `[g][D]`, `out` is `[g][offsets.len()]`),
/// rows stored as `f32`, bf16 or f16 bits (`kind` 0, 1, 2): each row is loaded (and
/// converted) once for up to four queries.
#[inline]
pub fn dots_indexed_group(
    qs: &[f32],
    g: usize,
    base: RowsRef<'_>,
    offsets: &[usize],
    out: &mut [f32],
) {
    let dd = qs.len() / g.max(1);
    let len = match base {
        RowsRef::F32(b) => b.len(),
        RowsRef::Bf16(b) | RowsRef::F16(b) => b.len(),
    };
    for &o in offsets {
        assert!(o + dd <= len, "row at {o} outside {len} elements");
    }
    assert!(out.len() >= g * offsets.len());
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        if dd.is_multiple_of(64) {
            simd::dots_indexed_group(qs, g, base, offsets, out);
            return;
        }
    }
    let n = offsets.len();
    for h in 0..g {
        let q = &qs[h * dd..(h + 1) * dd];
        let o = &mut out[h * n..(h + 1) * n];
        match base {
            RowsRef::F32(b) => dots_indexed(q, b, offsets, o),
            RowsRef::Bf16(b) => dots_indexed_16(q, b, offsets, o, true),
            RowsRef::F16(b) => dots_indexed_16(q, b, offsets, o, false),
        }
    }
}

/// Rows of f32, or of 16-bit float bits.
#[derive(Clone, Copy)]
pub enum RowsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

/// `acc[r][c] += sum_t w[r][t] * v[t][c]` for `rows` rows: `acc` is `[rows][d]`, `w` is
/// `[rows][n]`, `v` is `[n][d]`. Rows share each value row's loads.
#[inline]
pub fn weighted_sum_rows(acc: &mut [f32], w: &[f32], v: &[f32], rows: usize, d: usize) {
    let n = w.len() / rows.max(1);
    debug_assert!(acc.len() >= rows * d && v.len() >= n * d);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::weighted_sum_rows(acc, w, v, rows, d)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        for r in 0..rows {
            portable::weighted_sum(&mut acc[r * d..(r + 1) * d], &w[r * n..(r + 1) * n], v);
        }
    }
}

/// Asks the CPU to start loading `bytes` bytes at `ptr` into the cache (a hint: it never
/// faults, whatever the address).
#[inline]
pub fn prefetch(ptr: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut o = 0;
        while o < bytes {
            // SAFETY: a prefetch is a hint; it does not access memory architecturally.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    ptr.wrapping_add(o) as *const i8,
                )
            };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ptr, bytes);
    }
}

/// `y[i] *= a`.
#[inline]
pub fn scale(y: &mut [f32], a: f32) {
    for yi in y.iter_mut() {
        *yi *= a;
    }
}

/// `e^x` for one value, branch-free (relative error below 2e-7 on `[-87, 88]`; clamps
/// outside, so `-inf` gives about 1e-38, never NaN).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Round-to-nearest by the 1.5 * 2^23 trick: the integer lands in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = fmadd(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let e = exp_reduced(fmadd(n, -LN2_LO, fmadd(n, -LN2_HI, x)));
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    e * f32::from_bits(((k + 127) as u32) << 23)
}

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes expf coefficients for `e^r` on `|r| <= ln2 / 2`.
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_66,
    0.5,
];

#[inline(always)]
fn exp_reduced(r: f32) -> f32 {
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = fmadd(p, r, *c);
    }
    fmadd(p, r * r, r) + 1.0
}

/// `x[i] = e^(x[i] - m)` and returns the sum.
#[inline]
pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::exp_sub_sum(x, m)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        portable::exp_sub_sum(x, m)
    }
}

/// The largest element (`-inf` for an empty slice).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::max(x)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        portable::max(x)
    }
}

/// bf16 bit patterns to f32 (a 16-bit shift).
#[inline]
pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        simd::bf16_to_f32(src, dst)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        portable::bf16_to_f32(src, dst)
    }
}

/// Plain loops: the reference for the SIMD versions and the path without AVX-512.
pub mod portable {
    use super::{exp, fmadd, LANES};

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (ac, ar) = a[..n].as_chunks::<LANES>();
        let (bc, br) = b[..n].as_chunks::<LANES>();
        let mut acc = [0f32; LANES];
        for (x, y) in ac.iter().zip(bc) {
            for j in 0..LANES {
                acc[j] = fmadd(x[j], y[j], acc[j]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (x, y) in ar.iter().zip(br) {
            s = fmadd(*x, *y, s);
        }
        s
    }

    pub fn dots(q: &[f32], k: &[f32], scale: f32, out: &mut [f32]) {
        let d = q.len();
        for (t, o) in out.iter_mut().enumerate() {
            *o = dot(q, &k[t * d..(t + 1) * d]) * scale;
        }
    }

    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi = fmadd(a, *xi, *yi);
        }
    }

    pub fn weighted_sum(acc: &mut [f32], w: &[f32], v: &[f32]) {
        let d = acc.len();
        for (t, wt) in w.iter().enumerate() {
            if *wt != 0.0 {
                axpy(acc, *wt, &v[t * d..(t + 1) * d]);
            }
        }
    }

    pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let mut s = 0.0;
        for xi in x.iter_mut() {
            let e = exp(*xi - m);
            *xi = e;
            s += e;
        }
        s
    }

    pub fn max(x: &[f32]) -> f32 {
        x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }

    pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((*s as u32) << 16);
        }
    }
}

/// AVX2 + FMA + F16C intrinsics (stable since Rust 1.27, within the workspace MSRV; on Zen 4
/// 256-bit FMAs have the same throughput as AVX-512). Every function reads and writes only
/// inside the slices it is given: vector loops run over whole 8-lane chunks below the slice
/// lengths, tails are scalar.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub mod simd {
    use std::arch::x86_64::*;

    use super::{exp, EXP_P, LN2_HI, LN2_LO};

    /// Sum of the 8 lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
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
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
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
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
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
    #[inline(always)]
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

    /// How 8 row elements become 8 f32 lanes (`load8` reads 8 elements at `p`).
    trait Load8 {
        type E;
        unsafe fn load8(p: *const Self::E) -> __m256;
    }
    struct F32;
    struct Bf16;
    struct F16;
    impl Load8 for F32 {
        type E = f32;
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }
    impl Load8 for Bf16 {
        type E = u16;
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            let w = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(w)))
        }
    }
    impl Load8 for F16 {
        type E = u16;
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    /// Logits over indexed rows of `8 * CH` elements, two rows at a time sharing each query
    /// load; the row four ahead is prefetched (rows are scattered by block id).
    #[inline(always)]
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
    #[inline(always)]
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
    pub fn dots_indexed_group(
        qs: &[f32],
        g: usize,
        base: super::RowsRef<'_>,
        offsets: &[usize],
        out: &mut [f32],
    ) {
        let dd = qs.len() / g.max(1);
        assert!(dd.is_multiple_of(64) && qs.len() >= g * dd && out.len() >= g * offsets.len());
        // SAFETY: the public wrapper checked `offsets[j] + dd <= base.len()`; queries are
        // `g` rows of `dd` floats, `out` holds `g * n` floats.
        unsafe {
            match base {
                super::RowsRef::F32(b) => dots_indexed_group_l::<F32>(
                    qs.as_ptr(),
                    g,
                    dd,
                    b.as_ptr(),
                    offsets,
                    out.as_mut_ptr(),
                ),
                super::RowsRef::Bf16(b) => dots_indexed_group_l::<Bf16>(
                    qs.as_ptr(),
                    g,
                    dd,
                    b.as_ptr(),
                    offsets,
                    out.as_mut_ptr(),
                ),
                super::RowsRef::F16(b) => dots_indexed_group_l::<F16>(
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
    pub fn dots_indexed_16(
        q: &[f32],
        base: &[u16],
        offsets: &[usize],
        out: &mut [f32],
        bf16: bool,
    ) {
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
        for (o, &off) in out.iter_mut().zip(offs) {
            *o = base[off..off + d]
                .iter()
                .zip(q)
                .map(|(b, q)| {
                    let x = if bf16 {
                        half::bf16::from_bits(*b).to_f32()
                    } else {
                        half::f16::from_bits(*b).to_f32()
                    };
                    x * q
                })
                .sum();
        }
    }

    #[inline]
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
    #[inline(always)]
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

    /// `e^x` on 8 lanes: the scalar algorithm, `2^n` built in the exponent bits.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let e = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        // n is in [-126, 127] after the clamp: 2^n is a normal float.
        let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(e, _mm256_castsi256_ps(pow))
    }

    #[inline]
    pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let n = x.len();
        let px = x.as_mut_ptr();
        let mut i = 0;
        // SAFETY: 8-float accesses at `i + 8 <= n`; the tail is scalar.
        unsafe {
            let vm = _mm256_set1_ps(m);
            let mut sum = _mm256_setzero_ps();
            while i + 8 <= n {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(px.add(i)), vm));
                _mm256_storeu_ps(px.add(i), e);
                sum = _mm256_add_ps(sum, e);
                i += 8;
            }
            let mut s = hsum(sum);
            while i < n {
                let e = exp(*px.add(i) - m);
                *px.add(i) = e;
                s += e;
                i += 1;
            }
            s
        }
    }

    #[inline]
    pub fn max(x: &[f32]) -> f32 {
        let n = x.len();
        let px = x.as_ptr();
        let mut i = 0;
        // SAFETY: 8-float loads at `i + 8 <= n`.
        unsafe {
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            while i + 8 <= n {
                m = _mm256_max_ps(m, _mm256_loadu_ps(px.add(i)));
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let mut s = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            while i < n {
                s = s.max(*px.add(i));
                i += 1;
            }
            s
        }
    }

    #[inline]
    pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        // SAFETY: reads of 8 u16 and writes of 8 f32 at `i + 8 <= n`, inside both slices.
        unsafe {
            while i + 8 <= n {
                let w = _mm_loadu_si128(ps.add(i) as *const __m128i);
                let f = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(w));
                _mm256_storeu_ps(pd.add(i), _mm256_castsi256_ps(f));
                i += 8;
            }
            while i < n {
                *pd.add(i) = f32::from_bits((*ps.add(i) as u32) << 16);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_all_lengths() {
        for n in 0..150 {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.3).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn exp_is_accurate_and_total() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(f32::NEG_INFINITY) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn simd_paths_equal_the_portable_loops() {
        for n in [0usize, 1, 7, 16, 33, 64, 100, 128, 130, 256, 300] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.3).collect();
            assert!((dot(&a, &b) - portable::dot(&a, &b)).abs() < 1e-4);
            for d in [16usize, 64, 128, 256] {
                if n >= 2 * d {
                    let mut o1 = vec![0.0; n / d];
                    let mut o2 = vec![0.0; n / d];
                    dots(&b[..d], &a, 0.5, &mut o1);
                    portable::dots(&b[..d], &a, 0.5, &mut o2);
                    for (x, y) in o1.iter().zip(&o2) {
                        assert!((x - y).abs() < 1e-4, "d {d}: {x} vs {y}");
                    }
                }
            }
            assert_eq!(max(&a), portable::max(&a));
            let mut y1 = b.clone();
            let mut y2 = b.clone();
            axpy(&mut y1, 0.7, &a);
            portable::axpy(&mut y2, 0.7, &a);
            assert_eq!(y1, y2);
            let mut e1 = a.clone();
            let mut e2 = a.clone();
            let s1 = exp_sub_sum(&mut e1, 0.3);
            let s2 = portable::exp_sub_sum(&mut e2, 0.3);
            assert!((s1 - s2).abs() <= 1e-5 * s2.abs().max(1.0), "{s1} vs {s2}");
            for (x, y) in e1.iter().zip(&e2) {
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-30), "{x} vs {y}");
            }
            let bits: Vec<u16> = a
                .iter()
                .map(|x| half::bf16::from_f32(*x).to_bits())
                .collect();
            let mut f1 = vec![0.0; n];
            let mut f2 = vec![0.0; n];
            bf16_to_f32(&bits, &mut f1);
            portable::bf16_to_f32(&bits, &mut f2);
            assert_eq!(f1, f2);
        }
        for d in [16usize, 24, 64, 128, 136] {
            let tokens = 5;
            let v: Vec<f32> = (0..tokens * d).map(|i| (i % 9) as f32 - 4.0).collect();
            let w = [0.5f32, 0.0, 1.5, -0.25, 2.0];
            let mut acc1: Vec<f32> = (0..d).map(|c| c as f32).collect();
            let mut acc2 = acc1.clone();
            weighted_sum(&mut acc1, &w, &v);
            portable::weighted_sum(&mut acc2, &w, &v);
            for (x, y) in acc1.iter().zip(&acc2) {
                assert!((x - y).abs() < 1e-4, "d {d}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn row_kernels_equal_naive() {
        for (rows, d, n) in [
            (1usize, 64usize, 5usize),
            (3, 128, 32),
            (4, 64, 7),
            (7, 128, 3),
            (9, 64, 32),
            (2, 48, 4),
        ] {
            let v: Vec<f32> = (0..n * d).map(|i| ((i * 13) % 7) as f32 - 3.0).collect();
            let w: Vec<f32> = (0..rows * n).map(|i| ((i * 5) % 11) as f32 * 0.1).collect();
            let mut acc: Vec<f32> = (0..rows * d).map(|i| i as f32 * 0.01).collect();
            let mut want = acc.clone();
            for r in 0..rows {
                for t in 0..n {
                    for c in 0..d {
                        want[r * d + c] += w[r * n + t] * v[t * d + c];
                    }
                }
            }
            weighted_sum_rows(&mut acc, &w, &v, rows, d);
            for (x, y) in acc.iter().zip(&want) {
                assert!((x - y).abs() < 1e-3, "rows {rows} d {d}: {x} vs {y}");
            }
        }
        for d in [64usize, 128, 256, 512] {
            let base: Vec<f32> = (0..10 * d).map(|i| ((i * 3) % 17) as f32 - 8.0).collect();
            let q: Vec<f32> = (0..d).map(|i| (i % 5) as f32 - 2.0).collect();
            let offsets = [3 * d, 0, 9 * d, d + 1];
            let mut out = [0.0; 4];
            dots_indexed(&q, &base, &offsets, &mut out);
            for (o, off) in out.iter().zip(offsets) {
                let want: f32 = (0..d).map(|c| q[c] * base[off + c]).sum();
                assert!((o - want).abs() < 1e-2, "d {d}: {o} vs {want}");
            }
            // The same rows stored as bf16 / f16 (small integers: exact in both).
            let b16: Vec<u16> = base
                .iter()
                .map(|x| half::bf16::from_f32(*x).to_bits())
                .collect();
            let h16: Vec<u16> = base
                .iter()
                .map(|x| half::f16::from_f32(*x).to_bits())
                .collect();
            for (bits, is_bf16) in [(&b16, true), (&h16, false)] {
                let mut out16 = [0.0; 4];
                dots_indexed_16(&q, bits, &offsets, &mut out16, is_bf16);
                assert_eq!(out16, out, "d {d}, bf16 {is_bf16}");
            }
            // Groups of 1..=6 queries (the second is the first negated, and so on).
            for g in 1..=6usize {
                let qs: Vec<f32> = (0..g)
                    .flat_map(|h| q.iter().map(move |x| x * (h as f32 - 1.5)))
                    .collect();
                for rows in [RowsRef::F32(&base), RowsRef::Bf16(&b16), RowsRef::F16(&h16)] {
                    let mut og = vec![0.0; g * 4];
                    dots_indexed_group(&qs, g, rows, &offsets, &mut og);
                    for h in 0..g {
                        for j in 0..4 {
                            let want = out[j] * (h as f32 - 1.5);
                            assert!(
                                (og[h * 4 + j] - want).abs() <= 1e-3 * want.abs().max(1.0),
                                "d {d} g {g}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn axpy_scale_max_sum() {
        let mut y = vec![1.0; 19];
        let x: Vec<f32> = (0..19).map(|i| i as f32).collect();
        axpy(&mut y, 2.0, &x);
        assert_eq!(y[18], 37.0);
        scale(&mut y, 0.5);
        assert_eq!(y[18], 18.5);
        assert_eq!(max(&x), 18.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut z = vec![0.0, 1.0];
        let s = exp_sub_sum(&mut z, 1.0);
        assert!((s - (1.0 + (-1f32).exp())).abs() < 1e-6);
    }
}
