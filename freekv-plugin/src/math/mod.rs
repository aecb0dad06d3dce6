//! The inner loops of the CPU backend, by purpose: products (dot, axpy, the weighted sums of
//! attention's value side), scoring (logits over rows looked up by offset, in f32, bf16 or
//! f16), softmax (a branch-free exp, max) and conversions.
//!
//! One dispatch point, at run time: [`CpuKernels::active`] is `simd` (AVX2 + FMA + F16C
//! intrinsics, which the decode benchmark measured about 4x faster than what LLVM made of the
//! portable loops) on a CPU that has those features, whatever the build's target, else
//! `portable` (plain chunk loops LLVM vectorises as it can). The CPU is asked once; the
//! public functions here check their arguments and forward through the `imp!` macro. Both
//! implementations are tested against each other and against naive sums (`tests`).

use std::sync::atomic::{AtomicU8, Ordering};

mod portable;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(test)]
mod tests;

/// The implementation of the CPU backend's inner loops, chosen for the whole process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKernels {
    /// Plain loops, vectorised by LLVM for the build's target (the fallback on any CPU).
    Portable,
    /// AVX2 + FMA + F16C intrinsics (x86-64 CPUs since Intel Haswell and AMD Zen).
    Avx2,
}

const UNSET: u8 = 0;
const PORTABLE: u8 = 1;
const AVX2: u8 = 2;
/// The active kernels (`UNSET` until the first call asks the CPU).
static ACTIVE: AtomicU8 = AtomicU8::new(UNSET);

impl CpuKernels {
    /// The fastest implementation this CPU can run.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Self::Avx2;
        }
        Self::Portable
    }

    /// What runs: [`CpuKernels::detected`] unless [`CpuKernels::select`] chose otherwise.
    pub fn active() -> Self {
        match ACTIVE.load(Ordering::Relaxed) {
            PORTABLE => Self::Portable,
            AVX2 => Self::Avx2,
            _ => {
                let k = Self::detected();
                ACTIVE.store(k.code(), Ordering::Relaxed);
                k
            }
        }
    }

    /// Makes `self` what every FreeKV instance of the process runs from now on (benchmarks
    /// and tests compare the two); an error, changing nothing, when this CPU cannot run it.
    /// Switch only while no FreeKV work is in flight.
    pub fn select(self) -> Result<(), String> {
        if self == Self::Avx2 && Self::detected() != Self::Avx2 {
            return Err(format!("this CPU cannot run the {} kernels", self.name()));
        }
        ACTIVE.store(self.code(), Ordering::Relaxed);
        Ok(())
    }

    /// A short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2+fma+f16c",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Portable => PORTABLE,
            Self::Avx2 => AVX2,
        }
    }
}

/// Whether the AVX2 kernels run (one relaxed load once the CPU has been asked).
#[inline(always)]
fn avx2_active() -> bool {
    match ACTIVE.load(Ordering::Relaxed) {
        AVX2 => true,
        PORTABLE => false,
        _ => CpuKernels::active() == CpuKernels::Avx2,
    }
}

/// The dispatch point: `imp!(f(args))` calls `simd::f` where the AVX2 kernels are active,
/// else `portable::f`.
macro_rules! imp {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if avx2_active() {
                // SAFETY: the AVX2 kernels are active only on a CPU with AVX2, FMA and F16C
                // (`CpuKernels::select` refuses them elsewhere).
                unsafe { simd::$f($($arg),*) }
            } else {
                portable::$f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            portable::$f($($arg),*)
        }
    }};
}

const LANES: usize = 16;

#[inline(always)]
fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

// ---- Products.

/// `sum_i a[i] * b[i]` (same lengths).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    imp!(dot(a, b))
}

/// `out[t] = scale * (q . k[t * d..(t + 1) * d])` for `t < out.len()`, `d = q.len()`: the
/// logits of one query over a run of contiguous key rows.
#[inline]
pub fn dots(q: &[f32], k: &[f32], scale: f32, out: &mut [f32]) {
    debug_assert!(k.len() >= out.len() * q.len());
    imp!(dots(q, k, scale, out))
}

/// `y[i] += a * x[i]`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    imp!(axpy(y, a, x))
}

/// `y[i] *= a`.
#[inline]
pub fn scale(y: &mut [f32], a: f32) {
    for yi in y.iter_mut() {
        *yi *= a;
    }
}

/// `acc[c] += sum_t w[t] * v[t * d + c]` for `c < d = acc.len()`: the value side of attention.
#[cfg(test)]
#[inline]
pub fn weighted_sum(acc: &mut [f32], w: &[f32], v: &[f32]) {
    debug_assert!(v.len() >= w.len() * acc.len());
    imp!(weighted_sum(acc, w, v))
}

/// `acc[r][c] += sum_t w[r][t] * v[t][c]` for `rows` rows: `acc` is `[rows][d]`, `w` is
/// `[rows][n]`, `v` is `[n][d]`. Rows share each value row's loads.
#[inline]
pub fn weighted_sum_rows(acc: &mut [f32], w: &[f32], v: &[f32], rows: usize, d: usize) {
    let n = w.len() / rows.max(1);
    debug_assert!(acc.len() >= rows * d && v.len() >= n * d);
    imp!(weighted_sum_rows(acc, w, v, rows, d))
}

// ---- Scoring.

/// Rows of f32, or of 16-bit float bits.
#[derive(Clone, Copy)]
pub enum RowsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl RowsRef<'_> {
    fn len(&self) -> usize {
        match self {
            RowsRef::F32(b) => b.len(),
            RowsRef::Bf16(b) | RowsRef::F16(b) => b.len(),
        }
    }
}

/// Panics unless every row `offsets[j]..offsets[j] + d` lies inside `len` elements (the SIMD
/// loops read rows through raw pointers).
fn check_rows(offsets: &[usize], d: usize, len: usize) {
    for &o in offsets {
        assert!(o + d <= len, "row at {o} outside {len} elements");
    }
}

/// `out[j] = q . base[offsets[j]..offsets[j] + q.len()]`: logits over rows that are not
/// contiguous (page summaries looked up by block id).
#[cfg(test)]
#[inline]
pub fn dots_indexed(q: &[f32], base: &[f32], offsets: &[usize], out: &mut [f32]) {
    check_rows(offsets, q.len(), base.len());
    imp!(dots_indexed(q, base, offsets, out))
}

/// [`dots_indexed`] over rows stored as 16-bit floats (`bf16 = true`: bfloat16, else IEEE
/// half), converted on the fly.
#[cfg(test)]
#[inline]
pub fn dots_indexed_16(q: &[f32], base: &[u16], offsets: &[usize], out: &mut [f32], bf16: bool) {
    check_rows(offsets, q.len(), base.len());
    imp!(dots_indexed_16(q, base, offsets, out, bf16))
}

/// [`dots_indexed`] for `g` queries at once (`qs` is `[g][D]`, `out` is `[g][offsets.len()]`),
/// rows of any [`RowsRef`] type: each row is loaded (and converted) once for up to four
/// queries where the implementation can.
#[inline]
pub fn dots_indexed_group(
    qs: &[f32],
    g: usize,
    base: RowsRef<'_>,
    offsets: &[usize],
    out: &mut [f32],
) {
    check_rows(offsets, qs.len() / g.max(1), base.len());
    assert!(out.len() >= g * offsets.len());
    imp!(dots_indexed_group(qs, g, base, offsets, out))
}

/// [`dots_indexed_group`] one query at a time, with an implementation's single-query kernels.
fn each_query(
    qs: &[f32],
    g: usize,
    base: RowsRef<'_>,
    offsets: &[usize],
    out: &mut [f32],
    f32_rows: impl Fn(&[f32], &[f32], &[usize], &mut [f32]),
    half_rows: impl Fn(&[f32], &[u16], &[usize], &mut [f32], bool),
) {
    let (dd, n) = (qs.len() / g.max(1), offsets.len());
    for h in 0..g {
        let q = &qs[h * dd..(h + 1) * dd];
        let o = &mut out[h * n..(h + 1) * n];
        match base {
            RowsRef::F32(b) => f32_rows(q, b, offsets, o),
            RowsRef::Bf16(b) => half_rows(q, b, offsets, o, true),
            RowsRef::F16(b) => half_rows(q, b, offsets, o, false),
        }
    }
}

// ---- Memory hints.

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

// ---- Softmax.

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
    imp!(exp_sub_sum(x, m))
}

/// The largest element (`-inf` for an empty slice).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    imp!(max(x))
}

// ---- Conversions.

/// bf16 bit patterns to f32 (a 16-bit shift).
#[inline]
pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    imp!(bf16_to_f32(src, dst))
}
