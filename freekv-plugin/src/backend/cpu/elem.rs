//! Storage element types of the CPU tiers (f32, f16, bf16) and their conversions to the f32
//! the kernels compute in.

use half::{bf16, f16};

use crate::math::RowsRef;
use crate::KvDType;

/// Types whose all-zero bit pattern is a valid value (here: 0.0), so zeroed memory from the
/// allocator is an initialised buffer of them.
///
/// # Safety
/// Implementors must be plain data for which every all-zero byte pattern is a valid value.
pub unsafe trait ZeroBits: Copy {}
// SAFETY: all-zero bits are 0.0 / 0 for each of these.
unsafe impl ZeroBits for f32 {}
unsafe impl ZeroBits for f16 {}
unsafe impl ZeroBits for bf16 {}
unsafe impl ZeroBits for u8 {}

/// A KV storage element.
pub trait KvElem:
    ZeroBits + Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static
{
    /// The dtype this element stores.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    const DTYPE: KvDType;
    /// Converts `src` into `dst` (same length).
    fn to_f32s(src: &[Self], dst: &mut [f32]);
    /// Converts (rounds) `src` into `dst` (same length).
    fn from_f32s(src: &[f32], dst: &mut [Self]);
    /// `src` itself when the storage is already f32 (no conversion needed).
    fn as_f32s(src: &[Self]) -> Option<&[f32]>;
    /// One element as f32.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn to_f32(self) -> f32;
    /// The rows as [`RowsRef`] for the grouped kernels.
    fn rows_ref(rows: &[Self]) -> RowsRef<'_>;
}

impl KvElem for f32 {
    const DTYPE: KvDType = KvDType::F32;
    #[inline]
    fn to_f32s(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline]
    fn from_f32s(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline]
    fn as_f32s(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn rows_ref(rows: &[f32]) -> RowsRef<'_> {
        RowsRef::F32(rows)
    }
}

impl KvElem for f16 {
    const DTYPE: KvDType = KvDType::F16;
    #[inline]
    fn to_f32s(src: &[f16], dst: &mut [f32]) {
        // half converts with F16C instructions when the target has them.
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
    #[inline]
    fn from_f32s(src: &[f32], dst: &mut [f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
    }
    #[inline]
    fn as_f32s(_: &[f16]) -> Option<&[f32]> {
        None
    }
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn rows_ref(rows: &[f16]) -> RowsRef<'_> {
        RowsRef::F16(half::slice::HalfFloatSliceExt::reinterpret_cast(rows))
    }
}

impl KvElem for bf16 {
    const DTYPE: KvDType = KvDType::BF16;
    #[inline]
    fn to_f32s(src: &[bf16], dst: &mut [f32]) {
        // bf16 is the top half of an f32: a shift.
        crate::math::bf16_to_f32(half::slice::HalfFloatSliceExt::reinterpret_cast(src), dst);
    }
    #[inline]
    fn from_f32s(src: &[f32], dst: &mut [bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(*s);
        }
    }
    #[inline]
    fn as_f32s(_: &[bf16]) -> Option<&[f32]> {
        None
    }
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn rows_ref(rows: &[bf16]) -> RowsRef<'_> {
        RowsRef::Bf16(half::slice::HalfFloatSliceExt::reinterpret_cast(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: KvElem>(tol: f32) {
        let src: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let mut mid = vec![T::default(); src.len()];
        T::from_f32s(&src, &mut mid);
        let mut back = vec![0.0; src.len()];
        T::to_f32s(&mid, &mut back);
        for ((a, b), m) in src.iter().zip(&back).zip(&mid) {
            assert!((a - b).abs() <= tol * a.abs().max(1e-3), "{a} vs {b}");
            assert_eq!(m.to_f32(), *b);
        }
    }

    #[test]
    fn conversions_round_trip() {
        round_trip::<f32>(0.0);
        round_trip::<f16>(1e-3);
        round_trip::<bf16>(8e-3);
        assert!(f32::as_f32s(&[1.0]).is_some());
        assert!(bf16::as_f32s(&[bf16::ONE]).is_none());
    }
}
