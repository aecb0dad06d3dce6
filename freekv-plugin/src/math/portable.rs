//! Plain loops: the reference for the SIMD versions and the path without AVX2 + FMA + F16C.
//! Every function here has the signature of its public wrapper in the parent module.

use super::{exp, fmadd, RowsRef, LANES};

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

pub fn dots_indexed(q: &[f32], base: &[f32], offsets: &[usize], out: &mut [f32]) {
    let d = q.len();
    for (o, &off) in out.iter_mut().zip(offsets) {
        *o = dot(q, &base[off..off + d]);
    }
}

pub fn dots_indexed_16(q: &[f32], base: &[u16], offsets: &[usize], out: &mut [f32], bf16: bool) {
    let d = q.len();
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

pub fn dots_indexed_group(
    qs: &[f32],
    g: usize,
    base: RowsRef<'_>,
    offsets: &[usize],
    out: &mut [f32],
) {
    super::each_query(qs, g, base, offsets, out, dots_indexed, dots_indexed_16)
}

pub fn weighted_sum_rows(acc: &mut [f32], w: &[f32], v: &[f32], rows: usize, d: usize) {
    let n = w.len() / rows.max(1);
    for r in 0..rows {
        weighted_sum(&mut acc[r * d..(r + 1) * d], &w[r * n..(r + 1) * n], v);
    }
}
