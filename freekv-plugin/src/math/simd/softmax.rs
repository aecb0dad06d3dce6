//! The exponentials and maximum of a softmax.

use super::*;

/// `e^x` on 8 lanes: the scalar algorithm, `2^n` built in the exponent bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
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
#[target_feature(enable = "avx2,fma,f16c")]
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
#[target_feature(enable = "avx2,fma,f16c")]
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
