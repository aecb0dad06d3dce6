//! Brute-force references, written independently of the crate: plain loops in f64 over
//! explicit token lists. Nothing here calls into `freekv_plugin` except for its plain types.

use freekv_plugin::{AttnParams, Pooling, SummaryKind};

/// One KV head's keys and values of a whole sequence: `k[pos][c]`.
pub struct HeadKv<'a> {
    pub k: &'a [Vec<f32>],
    pub v: &'a [Vec<f32>],
}

/// Whether a query at `qpos` sees the key at `kpos` (causal + sliding window).
pub fn visible(params: &AttnParams, qpos: usize, kpos: usize) -> bool {
    if kpos > qpos {
        return false;
    }
    match params.sliding_window {
        Some(w) => kpos + w > qpos,
        None => true,
    }
}

/// Softmax attention of one query at `qpos` over the keys at `positions`.
pub fn attend(
    q: &[f32],
    kv: &HeadKv<'_>,
    positions: &[usize],
    qpos: usize,
    params: &AttnParams,
) -> Vec<f64> {
    let d = q.len();
    let mut logits = Vec::new();
    let mut used = Vec::new();
    for &t in positions {
        if !visible(params, qpos, t) {
            continue;
        }
        let kt = &kv.k[t];
        let mut s = 0f64;
        for (a, b) in q.iter().zip(kt) {
            s += *a as f64 * *b as f64;
        }
        s *= params.softmax_scale as f64;
        if let Some(cap) = params.softcap {
            s = cap as f64 * (s / cap as f64).tanh();
        }
        logits.push(s);
        used.push(t);
    }
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut out = vec![0f64; d];
    for (wi, &t) in w.iter().zip(&used) {
        let f = wi / z;
        for (o, v) in out.iter_mut().zip(&kv.v[t]) {
            *o += f * *v as f64;
        }
    }
    out
}

/// Upper and lower bound of one page of one head's keys, as stored: rounded by `store` (the
/// KV dtype; exact for min/max, whose values are stored keys).
pub fn summary(
    kv: &HeadKv<'_>,
    page: usize,
    p: usize,
    kind: SummaryKind,
    store: &dyn Fn(f64) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let d = kv.k[0].len();
    let mut mx = vec![f64::NEG_INFINITY; d];
    let mut mn = vec![f64::INFINITY; d];
    for kt in &kv.k[page * p..(page + 1) * p] {
        for ((x, n), k) in mx.iter_mut().zip(mn.iter_mut()).zip(kt) {
            *x = x.max(*k as f64);
            *n = n.min(*k as f64);
        }
    }
    match kind {
        SummaryKind::MinMax => (mx, mn),
        SummaryKind::CentreMad => {
            let mut up = vec![0.0; d];
            let mut lo = vec![0.0; d];
            for c in 0..d {
                let centre = (mx[c] + mn[c]) / 2.0;
                let mut mad = 0.0;
                for t in page * p..(page + 1) * p {
                    mad += (kv.k[t][c] as f64 - centre).abs();
                }
                mad /= p as f64;
                up[c] = store(centre + mad);
                lo[c] = store(centre - mad);
            }
            (up, lo)
        }
    }
}

/// How pages are summarised and scored.
pub struct Scoring<'a> {
    /// Tokens per page.
    pub page_size: usize,
    pub kind: SummaryKind,
    pub pooling: Pooling,
    /// The rounding of a summary value to its stored dtype.
    pub store: &'a dyn Fn(f64) -> f64,
}

/// Pooled scores of the candidate pages for one KV head whose group queries are `qs`.
pub fn page_scores(
    qs: &[&[f32]],
    kv: &HeadKv<'_>,
    candidates: std::ops::Range<usize>,
    scoring: &Scoring,
) -> Vec<f64> {
    page_scores_shrunk(qs, kv, candidates, scoring, 1.0)
}

/// [`page_scores`] over each summary's box shrunk around its centre to `shrink` of its
/// half-width.
pub fn page_scores_shrunk(
    qs: &[&[f32]],
    kv: &HeadKv<'_>,
    candidates: std::ops::Range<usize>,
    scoring: &Scoring,
    shrink: f64,
) -> Vec<f64> {
    let (p, kind, pooling, store) = (
        scoring.page_size,
        scoring.kind,
        scoring.pooling,
        scoring.store,
    );
    let sums: Vec<(Vec<f64>, Vec<f64>)> = candidates
        .clone()
        .map(|j| {
            let (up, lo) = summary(kv, j, p, kind, store);
            let c: Vec<f64> = up.iter().zip(&lo).map(|(u, l)| (u + l) / 2.0).collect();
            let h: Vec<f64> = up.iter().zip(&lo).map(|(u, l)| (u - l) / 2.0).collect();
            (
                c.iter().zip(&h).map(|(c, h)| c + shrink * h).collect(),
                c.iter().zip(&h).map(|(c, h)| c - shrink * h).collect(),
            )
        })
        .collect();
    // raw[h][j] = sum_c max(q_c * upper_c, q_c * lower_c)
    let raw: Vec<Vec<f64>> = qs
        .iter()
        .map(|q| {
            sums.iter()
                .map(|(up, lo)| {
                    (0..q.len())
                        .map(|c| (q[c] as f64 * up[c]).max(q[c] as f64 * lo[c]))
                        .sum()
                })
                .collect()
        })
        .collect();
    let n = sums.len();
    let g = qs.len() as f64;
    (0..n)
        .map(|j| match pooling {
            Pooling::Mean => raw.iter().map(|r| r[j]).sum::<f64>() / g,
            Pooling::Max => raw.iter().map(|r| r[j]).fold(f64::NEG_INFINITY, f64::max),
            Pooling::SoftmaxMean => {
                raw.iter()
                    .map(|r| {
                        let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = r.iter().map(|s| (s - m).exp()).sum();
                        (r[j] - m).exp() / z
                    })
                    .sum::<f64>()
                    / g
            }
        })
        .collect()
}

/// The scaled, soft-capped logit of query `q` and key `k`.
fn logit(q: &[f32], k: &[f32], params: &AttnParams) -> f64 {
    let s: f64 = q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
    let s = s * params.softmax_scale as f64;
    match params.softcap {
        Some(cap) => cap as f64 * (s / cap as f64).tanh(),
        None => s,
    }
}

/// The oracle's scores of the candidate pages for one KV head whose group queries are `qs`,
/// each at position `len - 1` over the keys `0..len`: per query head, the softmax weight of
/// the page's tokens (every visible key in the softmax), then the mean over the group.
pub fn oracle_scores(
    qs: &[&[f32]],
    kv: &HeadKv<'_>,
    candidates: std::ops::Range<usize>,
    p: usize,
    len: usize,
    params: &AttnParams,
) -> Vec<f64> {
    let mut pooled = vec![0f64; candidates.len()];
    for q in qs {
        let logit = |t: usize| logit(q, &kv.k[t], params);
        let seen: Vec<usize> = (0..len).filter(|&t| visible(params, len - 1, t)).collect();
        let m = seen
            .iter()
            .map(|&t| logit(t))
            .fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = seen.iter().map(|&t| (logit(t) - m).exp()).sum();
        for (i, j) in candidates.clone().enumerate() {
            let mass: f64 = (j * p..((j + 1) * p).min(len))
                .filter(|&t| visible(params, len - 1, t))
                .map(|t| (logit(t) - m).exp() / z)
                .sum();
            pooled[i] += mass / qs.len() as f64;
        }
    }
    pooled
}

/// The rerank selector's scores of the candidate pages for one KV head whose group queries
/// are `qs`, at position `len - 1`: the page summaries (min/max boxes shrunk to half their
/// width around their centre), pooled with the queries times the softmax scale, shortlist the
/// `shortlisted` best candidates; each shortlisted page then scores the mean over the group of
/// its tokens' softmax weight among every shortlisted (visible) token; the other candidates
/// score -inf.
pub fn rerank_scores(
    qs: &[&[f32]],
    kv: &HeadKv<'_>,
    candidates: std::ops::Range<usize>,
    len: usize,
    params: &AttnParams,
    scoring: &Scoring,
    shortlisted: usize,
) -> Vec<f64> {
    let p = scoring.page_size;
    let scaled: Vec<Vec<f32>> = qs
        .iter()
        .map(|q| q.iter().map(|x| x * params.softmax_scale).collect())
        .collect();
    let scaled: Vec<&[f32]> = scaled.iter().map(|q| &q[..]).collect();
    // Min/max boxes shrunk to half their width; centre +/- deviation boxes as they are.
    let shrink = match scoring.kind {
        SummaryKind::MinMax => 0.5,
        SummaryKind::CentreMad => 1.0,
    };
    let bounds = page_scores_shrunk(&scaled, kv, candidates.clone(), scoring, shrink);
    let short = top_k(&bounds, candidates.start, shortlisted.min(candidates.len()));
    let mut out = vec![f64::NEG_INFINITY; candidates.len()];
    for &j in &short {
        out[j - candidates.start] = 0.0;
    }
    let tokens: Vec<usize> = short
        .iter()
        .flat_map(|&j| j * p..(j + 1) * p)
        .filter(|&t| visible(params, len - 1, t))
        .collect();
    for q in qs {
        let logit = |t: usize| logit(q, &kv.k[t], params);
        let m = tokens
            .iter()
            .map(|&t| logit(t))
            .fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = tokens.iter().map(|&t| (logit(t) - m).exp()).sum();
        for &t in &tokens {
            out[t / p - candidates.start] += (logit(t) - m).exp() / z / qs.len() as f64;
        }
    }
    out
}

/// The `k` best candidates (page numbers) by score, ties to the lower page.
pub fn top_k(scores: &[f64], first_page: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let mut out: Vec<usize> = idx.into_iter().take(k).map(|i| first_page + i).collect();
    out.sort();
    out
}

/// Mean over the group of cos(a_h, b_h).
pub fn mean_cosine(a: &[&[f32]], b: &[&[f32]]) -> f64 {
    let mut sum = 0.0;
    for (x, y) in a.iter().zip(b) {
        let dot: f64 = x
            .iter()
            .zip(y.iter())
            .map(|(p, q)| *p as f64 * *q as f64)
            .sum();
        let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        sum += if nx * ny > 0.0 { dot / (nx * ny) } else { 1.0 };
    }
    sum / a.len() as f64
}

#[test]
fn reference_attention_is_a_convex_combination() {
    let k = vec![vec![1.0f32, 0.0], vec![0.0, 1.0], vec![1.0, 1.0]];
    let v = vec![vec![1.0f32, 0.0], vec![0.0, 1.0], vec![5.0, 5.0]];
    let kv = HeadKv { k: &k, v: &v };
    let params = AttnParams::scaled(1.0);
    // Causal: a query at 1 cannot see position 2.
    let out = attend(&[1.0, 0.0], &kv, &[0, 1, 2], 1, &params);
    let e = std::f64::consts::E;
    assert!((out[0] - e / (e + 1.0)).abs() < 1e-12);
    assert!((out[1] - 1.0 / (e + 1.0)).abs() < 1e-12);
    // Window 1: only itself.
    let w = AttnParams {
        sliding_window: Some(1),
        ..params
    };
    assert_eq!(attend(&[1.0, 0.0], &kv, &[0, 1, 2], 2, &w), vec![5.0, 5.0]);
    assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3, 2), vec![4, 5]);
}
