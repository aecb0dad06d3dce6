//! A naive f32 forward pass of the tiny models, token by token with a KV cache, following
//! the 0.8.1 model files (pre-norm blocks, neox-style RoPE, GQA, qwen2 biases, qwen3 q/k
//! norms, phi3 fused projections, gemma2's scaled embeddings, (1 + w) norms, sandwich norms,
//! softcaps and tied lm_head). It reads the weights back from `model.safetensors`.
//!
//! It exists to measure what the FreeKV tests rely on: greedy decoding with wide top-1 /
//! top-2 margins, peaked attention, and no collapse into a short loop. The attention can sum
//! its keys in another order (blocked online softmax, blocks visited last to first) and take
//! a relative perturbation, to check that greedy tokens do not depend on such details.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use super::arch::{Arch, Spec};
use super::safetensors::{self, Tensor};

/// How the attention sums over the cached keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttnOrder {
    /// One pass, keys in order: max-subtracted softmax.
    Sequential,
    /// Online softmax over blocks of this many keys, last block first (as a split-K kernel
    /// merging partial results would).
    BlockedReverse(usize),
}

/// Attention statistics gathered over a run.
#[derive(Clone, Debug, Default)]
pub struct AttnStats {
    /// Sum over (decode step, layer, head) of the largest softmax weight.
    pub top1_sum: f64,
    /// Sum of the number of keys holding 90% of the softmax mass.
    pub mass90_sum: f64,
    /// Sum of the number of keys attended.
    pub keys_sum: f64,
    pub count: usize,
}

impl AttnStats {
    pub fn mean_top1(&self) -> f64 {
        self.top1_sum / self.count.max(1) as f64
    }
    pub fn mean_keys_for_90pct(&self) -> f64 {
        self.mass90_sum / self.count.max(1) as f64
    }
    pub fn mean_keys(&self) -> f64 {
        self.keys_sum / self.count.max(1) as f64
    }
}

pub struct Reference {
    pub spec: Spec,
    w: BTreeMap<String, Tensor>,
    /// Per layer: keys and values, [pos][kv_head * head_dim].
    k_cache: Vec<Vec<Vec<f32>>>,
    v_cache: Vec<Vec<Vec<f32>>>,
    inv_freq: Vec<f32>,
    pub order: AttnOrder,
    /// Relative perturbation applied to every attention output (0 = none).
    pub perturb: f32,
    perturb_state: u64,
    /// Gather attention statistics (costs a sort per head).
    pub collect_stats: bool,
    pub stats: AttnStats,
}

fn matvec(w: &Tensor, x: &[f32]) -> Vec<f32> {
    let cols = w.shape[1];
    debug_assert_eq!(cols, x.len());
    w.data
        .chunks_exact(cols)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f64, plus_one: bool) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps as f32).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, g)| v * r * if plus_one { g + 1.0 } else { *g })
        .collect()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn gelu_tanh(x: f32) -> f32 {
    let c = (2.0 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044_715 * x * x * x)).tanh())
}

impl Reference {
    pub fn load(spec: Spec, dir: &Path) -> Result<Self> {
        let w = safetensors::read(&dir.join("model.safetensors"))?;
        Ok(Self::new(spec, w))
    }

    pub fn new(spec: Spec, w: BTreeMap<String, Tensor>) -> Self {
        let d = spec.head_dim;
        let inv_freq = (0..d / 2)
            .map(|i| 1.0 / (spec.rope_theta as f32).powf(2.0 * i as f32 / d as f32))
            .collect();
        Self {
            k_cache: vec![Vec::new(); spec.layers],
            v_cache: vec![Vec::new(); spec.layers],
            spec,
            w,
            inv_freq,
            order: AttnOrder::Sequential,
            perturb: 0.0,
            perturb_state: 0x1234_5678,
            collect_stats: false,
            stats: AttnStats::default(),
        }
    }

    pub fn reset(&mut self) {
        self.k_cache.iter_mut().for_each(Vec::clear);
        self.v_cache.iter_mut().for_each(Vec::clear);
        self.stats = AttnStats::default();
    }

    pub fn pos(&self) -> usize {
        self.k_cache[0].len()
    }

    fn t(&self, name: &str) -> Result<&Tensor> {
        self.w
            .get(name)
            .with_context(|| format!("missing tensor {name}"))
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let d = self.spec.head_dim;
        for head in x.chunks_exact_mut(d) {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (s, c) = (pos as f32 * f).sin_cos();
                let (a, b) = (head[i], head[i + d / 2]);
                head[i] = a * c - b * s;
                head[i + d / 2] = b * c + a * s;
            }
        }
    }

    fn next_noise(&mut self) -> f32 {
        // xorshift; uniform in [-1, 1).
        let mut s = self.perturb_state;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.perturb_state = s;
        ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    /// Feeds one token; returns the logits for the next one.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let sp = self.spec.clone();
        let (h, d) = (sp.hidden, sp.head_dim);
        let gemma = sp.arch == Arch::Gemma2;
        let pos = self.pos();
        let emb = self.t("model.embed_tokens.weight")?;
        let mut x: Vec<f32> = emb.data[token as usize * h..(token as usize + 1) * h].to_vec();
        if gemma {
            let s = (h as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= s);
        }
        for l in 0..sp.layers {
            let p = format!("model.layers.{l}");
            let xn = rms_norm(
                &x,
                &self.t(&format!("{p}.input_layernorm.weight"))?.data,
                sp.rms_norm_eps,
                gemma,
            );
            let (q_out, kv_out) = (sp.heads * d, sp.kv_heads * d);
            let (mut q, mut k, mut v) = if sp.arch == Arch::Phi3 {
                let qkv = matvec(self.t(&format!("{p}.self_attn.qkv_proj.weight"))?, &xn);
                (
                    qkv[..q_out].to_vec(),
                    qkv[q_out..q_out + kv_out].to_vec(),
                    qkv[q_out + kv_out..].to_vec(),
                )
            } else {
                let f = |n: &str| -> Result<Vec<f32>> {
                    let mut y = matvec(self.t(&format!("{p}.self_attn.{n}.weight"))?, &xn);
                    if sp.arch == Arch::Qwen2 {
                        let b = self.t(&format!("{p}.self_attn.{n}.bias"))?;
                        y.iter_mut().zip(&b.data).for_each(|(a, b)| *a += b);
                    }
                    Ok(y)
                };
                (f("q_proj")?, f("k_proj")?, f("v_proj")?)
            };
            if sp.arch == Arch::Qwen3 {
                let qn = &self.t(&format!("{p}.self_attn.q_norm.weight"))?.data;
                let kn = &self.t(&format!("{p}.self_attn.k_norm.weight"))?.data;
                for hd in q.chunks_exact_mut(d) {
                    let y = rms_norm(hd, qn, sp.rms_norm_eps, false);
                    hd.copy_from_slice(&y);
                }
                for hd in k.chunks_exact_mut(d) {
                    let y = rms_norm(hd, kn, sp.rms_norm_eps, false);
                    hd.copy_from_slice(&y);
                }
            }
            self.rope(&mut q, pos);
            self.rope(&mut k, pos);
            self.k_cache[l].push(k);
            self.v_cache[l].push(std::mem::take(&mut v));

            // gemma2 scales by 1/sqrt(query_pre_attn_scalar), which the models set to head_dim.
            let scale = 1.0 / (d as f32).sqrt();
            let mut attn = vec![0f32; q_out];
            for hq in 0..sp.heads {
                let hk = hq / sp.group();
                let qh = &q[hq * d..(hq + 1) * d];
                let scores: Vec<f32> = self.k_cache[l]
                    .iter()
                    .map(|kk| {
                        let s = qh
                            .iter()
                            .zip(&kk[hk * d..(hk + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            * scale;
                        if gemma {
                            (s / sp.attn_softcap as f32).tanh() * sp.attn_softcap as f32
                        } else {
                            s
                        }
                    })
                    .collect();
                let out = &mut attn[hq * d..(hq + 1) * d];
                self.attend(&scores, l, hk, out);
                if self.collect_stats {
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let mut p: Vec<f64> = scores.iter().map(|s| ((s - m) as f64).exp()).collect();
                    let z: f64 = p.iter().sum();
                    p.iter_mut().for_each(|x| *x /= z);
                    p.sort_by(|a, b| b.partial_cmp(a).unwrap());
                    let mut acc = 0.0;
                    let n90 = p.iter().take_while(|x| {
                        let before = acc;
                        acc += **x;
                        before < 0.9
                    });
                    self.stats.mass90_sum += n90.count() as f64;
                    self.stats.top1_sum += p[0];
                    self.stats.keys_sum += p.len() as f64;
                    self.stats.count += 1;
                }
            }
            if self.perturb != 0.0 {
                for a in attn.iter_mut() {
                    let n = self.next_noise();
                    *a *= 1.0 + self.perturb * n;
                }
            }
            let mut o = matvec(self.t(&format!("{p}.self_attn.o_proj.weight"))?, &attn);
            if gemma {
                o = rms_norm(
                    &o,
                    &self
                        .t(&format!("{p}.post_attention_layernorm.weight"))?
                        .data,
                    sp.rms_norm_eps,
                    true,
                );
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            let norm2 = if gemma {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            };
            let xn = rms_norm(
                &x,
                &self.t(&format!("{p}.{norm2}.weight"))?.data,
                sp.rms_norm_eps,
                gemma,
            );
            let (gate, up) = if sp.arch == Arch::Phi3 {
                let gu = matvec(self.t(&format!("{p}.mlp.gate_up_proj.weight"))?, &xn);
                let i = sp.intermediate;
                (gu[..i].to_vec(), gu[i..].to_vec())
            } else {
                (
                    matvec(self.t(&format!("{p}.mlp.gate_proj.weight"))?, &xn),
                    matvec(self.t(&format!("{p}.mlp.up_proj.weight"))?, &xn),
                )
            };
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| if gemma { gelu_tanh(*g) } else { silu(*g) } * u)
                .collect();
            let mut m = matvec(self.t(&format!("{p}.mlp.down_proj.weight"))?, &act);
            if gemma {
                m = rms_norm(
                    &m,
                    &self
                        .t(&format!("{p}.post_feedforward_layernorm.weight"))?
                        .data,
                    sp.rms_norm_eps,
                    true,
                );
            }
            x.iter_mut().zip(&m).for_each(|(a, b)| *a += b);
        }
        let xn = rms_norm(
            &x,
            &self.t("model.norm.weight")?.data,
            sp.rms_norm_eps,
            gemma,
        );
        let lm = if gemma {
            self.t("model.embed_tokens.weight")?
        } else {
            self.t("lm_head.weight")?
        };
        let mut logits = matvec(lm, &xn);
        if gemma {
            let c = sp.final_softcap as f32;
            logits.iter_mut().for_each(|z| *z = (*z / c).tanh() * c);
        }
        Ok(logits)
    }

    /// softmax(scores) . V for one head, in the configured order.
    fn attend(&self, scores: &[f32], layer: usize, hk: usize, out: &mut [f32]) {
        let d = self.spec.head_dim;
        let vs = &self.v_cache[layer];
        match self.order {
            AttnOrder::Sequential => {
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut z = 0f32;
                for (s, vv) in scores.iter().zip(vs) {
                    let p = (s - m).exp();
                    z += p;
                    for (o, x) in out.iter_mut().zip(&vv[hk * d..(hk + 1) * d]) {
                        *o += p * x;
                    }
                }
                out.iter_mut().for_each(|o| *o /= z);
            }
            AttnOrder::BlockedReverse(b) => {
                let n = scores.len();
                let mut m_acc = f32::NEG_INFINITY;
                let mut z_acc = 0f32;
                let mut acc = vec![0f32; d];
                let nblocks = n.div_ceil(b);
                for blk in (0..nblocks).rev() {
                    let r = blk * b..((blk + 1) * b).min(n);
                    let m = scores[r.clone()]
                        .iter()
                        .cloned()
                        .fold(f32::NEG_INFINITY, f32::max);
                    let mut z = 0f32;
                    let mut part = vec![0f32; d];
                    for j in r {
                        let p = (scores[j] - m).exp();
                        z += p;
                        for (o, x) in part.iter_mut().zip(&vs[j][hk * d..(hk + 1) * d]) {
                            *o += p * x;
                        }
                    }
                    let m_new = m_acc.max(m);
                    let (ca, cb) = ((m_acc - m_new).exp(), (m - m_new).exp());
                    z_acc = z_acc * ca + z * cb;
                    for (a, p) in acc.iter_mut().zip(&part) {
                        *a = *a * ca + p * cb;
                    }
                    m_acc = m_new;
                }
                for (o, a) in out.iter_mut().zip(&acc) {
                    *o = a / z_acc;
                }
            }
        }
    }
}

/// What one greedy run looked like.
#[derive(Clone, Debug, Default)]
pub struct GreedyRun {
    pub tokens: Vec<u32>,
    /// top-1 minus top-2 logit, per generated token.
    pub margins: Vec<f32>,
    /// Logit std per generated token.
    pub logit_std: Vec<f32>,
}

impl GreedyRun {
    pub fn min_margin(&self) -> f32 {
        self.margins.iter().cloned().fold(f32::INFINITY, f32::min)
    }
    pub fn median_margin(&self) -> f32 {
        let mut m = self.margins.clone();
        m.sort_by(|a, b| a.partial_cmp(b).unwrap());
        m.get(m.len() / 2).copied().unwrap_or(0.0)
    }
    pub fn distinct(&self) -> usize {
        let mut t = self.tokens.clone();
        t.sort_unstable();
        t.dedup();
        t.len()
    }
    /// Fraction of generated tokens equal to the one before.
    pub fn immediate_repeats(&self) -> f64 {
        let r = self.tokens.windows(2).filter(|w| w[0] == w[1]).count();
        r as f64 / self.tokens.len().saturating_sub(1).max(1) as f64
    }
    /// The shortest period p such that the last half of the tokens repeats with period p
    /// (None: no period up to a quarter of the run, i.e. no short loop).
    pub fn tail_period(&self) -> Option<usize> {
        let t = &self.tokens;
        let half = t.len() / 2;
        let tail = &t[t.len() - half..];
        (1..=half / 2).find(|&p| tail.windows(p + 1).all(|w| w[0] == w[p]))
    }
}

/// Prefills `prompt` and greedily generates `n` tokens.
pub fn greedy(r: &mut Reference, prompt: &[u32], n: usize) -> Result<GreedyRun> {
    r.reset();
    let mut logits = Vec::new();
    for &t in prompt {
        logits = r.step(t)?;
    }
    let mut run = GreedyRun::default();
    for _ in 0..n {
        let (best, margin) = top2(&logits);
        let mean = logits.iter().sum::<f32>() / logits.len() as f32;
        let var = logits.iter().map(|z| (z - mean).powi(2)).sum::<f32>() / logits.len() as f32;
        run.tokens.push(best);
        run.margins.push(margin);
        run.logit_std.push(var.sqrt());
        logits = r.step(best)?;
    }
    Ok(run)
}

/// (argmax, top-1 minus top-2).
pub fn top2(logits: &[f32]) -> (u32, f32) {
    let (mut b1, mut v1, mut v2) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &z) in logits.iter().enumerate() {
        if z > v1 {
            v2 = v1;
            v1 = z;
            b1 = i;
        } else if z > v2 {
            v2 = z;
        }
    }
    (b1 as u32, v1 - v2)
}
