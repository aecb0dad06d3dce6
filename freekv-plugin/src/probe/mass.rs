//! The exact attention of one query group over a context, summed per page: what the oracle
//! selects by, and what every selection is measured against.

use crate::geometry::Geometry;
use crate::AttnParams;

/// Per query head of one KV group, the share of its attention (softmax over every visible
/// key of the context, with the layer's scale, soft-cap and sliding window) that each page
/// holds.
///
/// `q` is the group's queries `[G][d]`; `keys` the KV head's keys in position order
/// (`[len][d]`, the query at position `len - 1`). Writes `out[h * pages + j]` for every page
/// `j < geo.pages(len)` (0 for pages the window hides); each head's row sums to 1.
pub fn page_masses(
    geo: &Geometry,
    params: &AttnParams,
    q: &[f32],
    keys: &[f32],
    len: usize,
    out: &mut Vec<f32>,
    logits: &mut Vec<f32>,
) {
    let (d, p) = (geo.head_dim, geo.page_size);
    let g = q.len() / d;
    let pages = geo.pages(len);
    debug_assert!(keys.len() >= len * d);
    let first = params.first_visible(len - 1);
    out.clear();
    out.resize(g * pages, 0.0);
    logits.resize(len, 0.0);
    for h in 0..g {
        let qh = &q[h * d..(h + 1) * d];
        let mut max = f32::NEG_INFINITY;
        for t in first..len {
            let k = &keys[t * d..(t + 1) * d];
            let s = params
                .cap(qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * params.softmax_scale);
            logits[t] = s;
            max = max.max(s);
        }
        let mut z = 0.0f64;
        let row = &mut out[h * pages..(h + 1) * pages];
        for t in first..len {
            let e = ((logits[t] - max) as f64).exp();
            z += e;
            row[t / p] += e as f32;
        }
        let inv = (1.0 / z) as f32;
        for m in row.iter_mut() {
            *m *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masses_match_a_naive_softmax_and_respect_the_window() {
        let geo = Geometry::for_test(48, 8, 8, (1, 2, 1, 3));
        let len = 21;
        let keys: Vec<f32> = (0..len * 3)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let q = [0.5, -1.0, 0.25, 1.5, 0.0, -0.5];
        for window in [None, Some(10)] {
            let params = AttnParams {
                softmax_scale: 0.7,
                softcap: Some(3.0),
                sliding_window: window,
            };
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            page_masses(&geo, &params, &q, &keys, len, &mut out, &mut scratch);
            for h in 0..2 {
                let first = params.first_visible(len - 1);
                let logit = |t: usize| {
                    let s: f32 = (0..3).map(|c| q[h * 3 + c] * keys[t * 3 + c]).sum::<f32>() * 0.7;
                    3.0 * (s / 3.0).tanh()
                };
                let z: f64 = (first..len).map(|t| (logit(t) as f64).exp()).sum();
                for j in 0..3 {
                    let want: f64 = (j * 8..(j * 8 + 8).min(len))
                        .filter(|&t| t >= first)
                        .map(|t| (logit(t) as f64).exp() / z)
                        .sum();
                    assert!(
                        (out[h * 3 + j] as f64 - want).abs() < 1e-6,
                        "{window:?} {h} {j}"
                    );
                }
                let total: f32 = out[h * 3..h * 3 + 3].iter().sum();
                assert!((total - 1.0).abs() < 1e-5);
            }
        }
    }
}
