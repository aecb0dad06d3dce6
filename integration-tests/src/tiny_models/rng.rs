//! The tiny models' seeded generator: rand_chacha's ChaCha8, value-stable across platforms and
//! versions, with one stream per named tensor and a normal sampler in exact arithmetic, so a
//! model generated from a seed is bit-identical on every machine.

use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded ChaCha8 stream.
#[derive(Clone, Debug)]
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// The stream of one named tensor (e.g. `"model.layers.3.self_attn.q_proj.weight"`): the
    /// seed's generator on the stream numbered by the name's FNV-1a hash, so adding or removing
    /// a draw elsewhere never shifts the weights of unrelated tensors.
    pub fn for_name(seed: u64, name: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(h);
        Self(r)
    }

    /// `n` draws of N(0, std^2) as f32.
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Approximately standard normal: Irwin-Hall sum of four uniforms, rescaled to unit
    /// variance. Bounded by +-2*sqrt(3); uses only exact arithmetic (no libm, unlike a
    /// Ziggurat or Box-Muller sampler), so the result does not depend on the platform's
    /// `ln`/`exp`.
    pub fn normal(&mut self) -> f64 {
        let s: f64 = (0..4).map(|_| self.0.random::<f64>()).sum();
        (s - 2.0) * 1.732_050_807_568_877_2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_roughly_normal() {
        let mut a = Rng::for_name(7, "x");
        let mut b = Rng::for_name(7, "x");
        let mut c = Rng::for_name(7, "y");
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(a.next_u64(), c.next_u64());
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|_| a.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
