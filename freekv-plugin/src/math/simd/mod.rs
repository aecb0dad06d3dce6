//! AVX2 + FMA + F16C intrinsics (stable since Rust 1.27, within the workspace MSRV; on Zen 4
//! 256-bit FMAs have the same throughput as AVX-512), compiled for any x86-64 target: every
//! function carries `#[target_feature(enable = "avx2,fma,f16c")]`, so it is only called
//! (unsafely, through `math`'s dispatch point) once the CPU has been seen to have them. Every
//! function reads and writes only inside the slices it is given: vector loops run over whole
//! 8-lane chunks below the slice lengths, tails are scalar. By purpose: [`products`] (dot,
//! axpy, weighted sums), [`scoring`] (logits over rows looked up by offset, in any storage
//! type), [`softmax`] (exp, max), [`convert`] (16-bit floats to f32).

use std::arch::x86_64::*;

use super::{each_query, exp, portable, RowsRef, EXP_P, LN2_HI, LN2_LO};

mod convert;
mod products;
mod scoring;
mod softmax;

pub use convert::bf16_to_f32;
pub use products::{axpy, dot, dots, weighted_sum_rows};
pub use scoring::dots_indexed_group;
pub use softmax::{exp_sub_sum, max};
#[cfg(test)]
pub use {
    products::weighted_sum,
    scoring::{dots_indexed, dots_indexed_16},
};

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
