//! 16-bit floats to f32: whole slices, and 8 lanes at a time inside the scoring loops.

use super::*;

/// How 8 row elements become 8 f32 lanes (`load8` reads 8 elements at `p`).
pub(super) trait Load8 {
    type E;
    unsafe fn load8(p: *const Self::E) -> __m256;
}
pub(super) struct F32;
pub(super) struct Bf16;
pub(super) struct F16;
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

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
