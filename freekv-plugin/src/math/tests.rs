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

#[test]
fn the_kernels_are_chosen_from_the_cpu() {
    // Nothing in the tests selects kernels: what runs is what the CPU can run best.
    assert_eq!(CpuKernels::active(), CpuKernels::detected());
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        CpuKernels::detected() == CpuKernels::Avx2,
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    );
    if CpuKernels::detected() == CpuKernels::Portable {
        assert!(CpuKernels::Avx2.select().is_err());
    }
    assert_eq!(CpuKernels::Avx2.name(), "avx2+fma+f16c");
}
