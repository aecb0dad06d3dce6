//! The vectorisable inner loops: dot products, scaled accumulation and a branch-free exp.
//!
//! Written as fixed-width chunk loops that LLVM turns into SIMD (AVX2/AVX-512 with the repo's
//! `target-cpu=native`); no intrinsics, so they build everywhere.

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
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc0 = [0f32; LANES];
    let mut acc1 = [0f32; LANES];
    let mut ca = a.chunks_exact(2 * LANES);
    let mut cb = b.chunks_exact(2 * LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..LANES {
            acc0[j] = fmadd(x[j], y[j], acc0[j]);
            acc1[j] = fmadd(x[LANES + j], y[LANES + j], acc1[j]);
        }
    }
    for j in 0..LANES {
        acc0[j] += acc1[j];
    }
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            acc0[j] += acc0[j + w];
        }
        w /= 2;
    }
    let mut s = acc0[0];
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s = fmadd(*x, *y, s);
    }
    s
}

/// `y[i] += a * x[i]`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = fmadd(a, *xi, *yi);
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
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round-to-nearest by the 1.5 * 2^23 trick: the integer lands in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = fmadd(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = fmadd(n, -LN2_LO, fmadd(n, -LN2_HI, x));
    // e^r on |r| <= ln2/2: degree-6 polynomial (Cephes expf coefficients).
    let mut p = 1.987_569_1e-4f32;
    p = fmadd(p, r, 1.398_2e-3);
    p = fmadd(p, r, 8.333_452e-3);
    p = fmadd(p, r, 4.166_579_6e-2);
    p = fmadd(p, r, 0.166_666_66);
    p = fmadd(p, r, 0.5);
    let e = fmadd(p, r * r, r) + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    e * f32::from_bits(((k + 127) as u32) << 23)
}

/// `x[i] = e^(x[i] - m)` and returns the sum.
#[inline]
pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    let mut s = 0.0;
    for xi in x.iter_mut() {
        let e = exp(*xi - m);
        *xi = e;
        s += e;
    }
    s
}

/// The largest element (`-inf` for an empty slice).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut c = x.chunks_exact(LANES);
    for ch in &mut c {
        for j in 0..LANES {
            acc[j] = acc[j].max(ch[j]);
        }
    }
    let mut m = c
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for a in acc {
        m = m.max(a);
    }
    m
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
