//! Drives a `FreeKv` and a brute-force model of the same sequences side by side, and checks
//! every prefill and decode step: the pages each head attended (from the step traces) against
//! the reference selection of the mode's query, and the output against reference attention
//! over exactly those pages.

use candle_core::{DType, Device, Tensor};
use freekv_plugin::{
    AttnParams, DecodeRow, FreeKv, FreeKvConfig, KvDType, Mode, ModelShape, PrefillRow, Qkv,
    Selector, StepTrace,
};
use half::{bf16, f16};

use crate::reference::{self, HeadKv};
use crate::rng::Rng;

/// Everything that defines a case.
#[derive(Clone, Debug)]
pub struct Setup {
    pub cfg: FreeKvConfig,
    pub shape: ModelShape,
    pub dtype: KvDType,
    pub num_blocks: usize,
    pub params: AttnParams,
}

impl Setup {
    pub fn p(&self) -> usize {
        self.cfg.page_size
    }
    pub fn group(&self) -> usize {
        self.shape.num_q_heads / self.shape.num_kv_heads
    }
    pub fn pages(&self, len: usize) -> usize {
        len.div_ceil(self.p())
    }
    pub fn slots(&self) -> usize {
        self.cfg.budget / self.p()
    }
    pub fn is_sparse(&self, len: usize) -> bool {
        self.pages(len) > self.slots()
    }
    pub fn sel_pages(&self) -> usize {
        (self.cfg.budget - self.cfg.sink - self.cfg.window) / self.p()
    }
    /// Sink and window pages of a context of `len` tokens.
    pub fn fixed_pages(&self, len: usize) -> Vec<usize> {
        let sink = self.cfg.sink / self.p();
        let ws = self.pages(len).saturating_sub(self.cfg.window / self.p());
        let mut v: Vec<usize> = (0..sink).chain(ws.max(sink)..self.pages(len)).collect();
        v.dedup();
        v
    }
    /// Candidate pages of a step with `len` tokens (computed independently of the crate).
    pub fn candidates(&self, len: usize) -> std::ops::Range<usize> {
        let p = self.p();
        let end = self.pages(len).saturating_sub(self.cfg.window / p);
        let mut start = self.cfg.sink / p;
        if let Some(w) = self.params.sliding_window {
            let qpos = len - 1;
            // First page with a key at a position > qpos - w.
            let first_vis = (qpos + 1).saturating_sub(w);
            start = start.max(first_vis / p);
        }
        start.min(end)..end
    }
    pub fn tolerance(&self) -> f32 {
        match self.dtype {
            KvDType::F32 => 2e-4,
            KvDType::F16 => 3e-3,
            KvDType::BF16 => 2e-2,
        }
    }
    pub fn candle_dtype(&self) -> DType {
        match self.dtype {
            KvDType::F32 => DType::F32,
            KvDType::F16 => DType::F16,
            KvDType::BF16 => DType::BF16,
        }
    }
}

/// Rounds through the storage dtype, as the engine's tensors and the host tier do.
pub fn round(x: f32, dt: KvDType) -> f32 {
    match dt {
        KvDType::F32 => x,
        KvDType::F16 => f16::from_f32(x).to_f32(),
        KvDType::BF16 => bf16::from_f32(x).to_f32(),
    }
}

/// One sequence as the reference sees it.
pub struct RefSeq {
    pub id: u64,
    pub table: Vec<u32>,
    pub len: usize,
    /// `[layer][kv head][pos][d]`.
    pub k: Vec<Vec<Vec<Vec<f32>>>>,
    pub v: Vec<Vec<Vec<Vec<f32>>>>,
    /// Per layer: the previous step's query `[q head][d]`.
    pub q_prev: Vec<Option<Vec<Vec<f32>>>>,
    /// Per layer: a speculative selection exists for the next step.
    pub has_sel: Vec<bool>,
}

/// A prompt row: (sequence id, new tokens, shared prefix as (source sequence, pages)).
pub type PromptSpec = (u64, usize, Option<(u64, usize)>);

/// How queries are drawn at a decode step.
#[derive(Clone, Copy, Debug)]
pub enum Queries {
    /// Independent of the previous step.
    Random,
    /// `q_i = a q_{i-1} + b noise` with a per-query-head cosine drawn from `lo..hi`.
    Drift { lo: f64, hi: f64 },
    /// KV heads whose bit is set get fresh random queries; the others repeat `q_{i-1}`.
    Drifting(u64),
}

/// What a step should do for one (sequence, layer), per the spec.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Dense,
    /// Per KV head: which query the selection used (true: current) and whether the cosine
    /// was too close to tau to tell.
    Sparse {
        blocking: bool,
        current: Vec<bool>,
        ambiguous: Vec<bool>,
    },
}

/// Counts of what was checked.
#[derive(Default, Debug, Clone, Copy)]
pub struct Checked {
    pub prefill_rows: usize,
    pub dense_steps: usize,
    pub sparse_steps: usize,
    pub heads_compared: usize,
    pub tie_resolved: usize,
    pub corrected: usize,
}

pub struct Harness {
    pub s: Setup,
    pub fk: FreeKv,
    pub seqs: Vec<RefSeq>,
    pub free: Vec<u32>,
    pub rng: Rng,
    pub checked: Checked,
    /// Outputs of the last decode, per layer (for cross-instance comparisons).
    pub last_outputs: Vec<Vec<f32>>,
    /// Traces of the last decode, per layer and row.
    pub last_traces: Vec<Vec<StepTrace>>,
    /// The correction thresholds `[layer][kv head]` the spec's rule gives so far: fixed at
    /// tau, or, with a correction rate, moved after every test by `0.005 * (rate - corrected)`.
    pub taus: Vec<Vec<f32>>,
}

impl Harness {
    pub fn new(s: Setup, seed: u64) -> Self {
        let fk = FreeKv::new(s.cfg.clone(), s.shape, s.num_blocks, s.dtype).expect("FreeKv::new");
        fk.set_tracing(true);
        let mut rng = Rng::new(seed);
        let free = rng
            .permutation(s.num_blocks)
            .into_iter()
            .map(|b| b as u32)
            .collect();
        Self {
            fk,
            seqs: Vec::new(),
            free,
            rng,
            checked: Checked::default(),
            last_outputs: Vec::new(),
            last_traces: Vec::new(),
            taus: vec![vec![s.cfg.tau; s.shape.num_kv_heads]; s.shape.num_layers],
            s,
        }
    }

    fn layers(&self) -> usize {
        self.s.shape.num_layers
    }

    pub fn seq(&self, id: u64) -> &RefSeq {
        self.seqs
            .iter()
            .find(|s| s.id == id)
            .expect("known sequence")
    }

    fn seq_index(&self, id: u64) -> usize {
        self.seqs
            .iter()
            .position(|s| s.id == id)
            .expect("known sequence")
    }

    fn alloc_block(&mut self) -> u32 {
        self.free.pop().expect("test pool has free blocks")
    }

    fn random_row(&mut self, n: usize) -> Vec<f32> {
        let dt = self.s.dtype;
        self.rng
            .normals(n)
            .into_iter()
            .map(|x| round(x, dt))
            .collect()
    }

    /// Prefills new sequences `(id, new tokens, shared prefix: (source id, pages))` on every
    /// layer and checks the output (when `want_output`) against causal reference attention.
    pub fn prefill(&mut self, rows: &[PromptSpec], want_output: bool) {
        let (n_kv, n_q, d) = (
            self.s.shape.num_kv_heads,
            self.s.shape.num_q_heads,
            self.s.shape.head_dim,
        );
        let p = self.s.p();
        let layers = self.layers();
        let lmax = rows.iter().map(|r| r.1).max().unwrap();
        let b = rows.len();
        // Build the reference sequences.
        let mut cached = Vec::new();
        for &(id, new_len, prefix) in rows {
            let (mut table, mut k, mut v, cached_len) = match prefix {
                Some((src, pages)) => {
                    let src = self.seq(src);
                    let c = pages * p;
                    assert!(c <= src.len);
                    let cut = |x: &Vec<Vec<Vec<Vec<f32>>>>| -> Vec<Vec<Vec<Vec<f32>>>> {
                        x.iter()
                            .map(|l| l.iter().map(|h| h[..c].to_vec()).collect())
                            .collect()
                    };
                    (src.table[..pages].to_vec(), cut(&src.k), cut(&src.v), c)
                }
                None => (
                    vec![],
                    vec![vec![vec![]; n_kv]; layers],
                    vec![vec![vec![]; n_kv]; layers],
                    0,
                ),
            };
            while table.len() < self.s.pages(cached_len + new_len) {
                table.push(self.alloc_block());
            }
            for l in 0..layers {
                for h in 0..n_kv {
                    for _ in 0..new_len {
                        let kr = self.random_row(d);
                        let vr = self.random_row(d);
                        k[l][h].push(kr);
                        v[l][h].push(vr);
                    }
                }
            }
            cached.push(cached_len);
            self.seqs.push(RefSeq {
                id,
                table,
                len: cached_len + new_len,
                k,
                v,
                q_prev: vec![None; layers],
                has_sel: vec![false; layers],
            });
        }
        let first = self.seqs.len() - b;
        for l in 0..layers {
            // q: (B, Hq, Lmax, D), k/v: (B, Hkv, Lmax, D), padded with zeros.
            let mut qs = vec![0f32; b * n_q * lmax * d];
            let mut ks = vec![0f32; b * n_kv * lmax * d];
            let mut vs = vec![0f32; b * n_kv * lmax * d];
            let mut queries: Vec<Vec<Vec<f32>>> = Vec::new(); // [row][t * n_q + h]
            for (r, &(_, new_len, _)) in rows.iter().enumerate() {
                let c = cached[r];
                let mut rq = vec![Vec::new(); new_len * n_q];
                for h in 0..n_q {
                    for t in 0..new_len {
                        let q = self.random_row(d);
                        qs[((r * n_q + h) * lmax + t) * d..][..d].copy_from_slice(&q);
                        rq[t * n_q + h] = q;
                    }
                }
                let seq = &self.seqs[first + r];
                for h in 0..n_kv {
                    for t in 0..new_len {
                        ks[((r * n_kv + h) * lmax + t) * d..][..d]
                            .copy_from_slice(&seq.k[l][h][c + t]);
                        vs[((r * n_kv + h) * lmax + t) * d..][..d]
                            .copy_from_slice(&seq.v[l][h][c + t]);
                    }
                }
                queries.push(rq);
            }
            let dt = self.s.candle_dtype();
            let tq = Tensor::from_vec(qs, (b, n_q, lmax, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let tk = Tensor::from_vec(ks, (b, n_kv, lmax, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let tv = Tensor::from_vec(vs, (b, n_kv, lmax, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let prow: Vec<PrefillRow> = rows
                .iter()
                .enumerate()
                .map(|(r, &(id, new_len, _))| PrefillRow {
                    seq_id: id,
                    block_table: &self.seqs[first + r].table,
                    cached_len: cached[r],
                    new_len,
                })
                .collect();
            let out = self
                .fk
                .prefill(
                    l,
                    &prow,
                    Qkv::new(&tq, &tk, &tv),
                    &self.s.params,
                    want_output,
                )
                .expect("prefill");
            assert_eq!(out.is_some(), want_output);
            if let Some(out) = out {
                assert_eq!(out.dims(), &[b, n_q, lmax, d]);
                assert_eq!(out.dtype(), dt);
                let out = out
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (r, &(id, new_len, _)) in rows.iter().enumerate() {
                    let seq = &self.seqs[first + r];
                    let positions: Vec<usize> = (0..seq.len).collect();
                    for h in 0..n_q {
                        let kvh = h / self.s.group();
                        let kv = HeadKv {
                            k: &seq.k[l][kvh],
                            v: &seq.v[l][kvh],
                        };
                        for t in 0..new_len {
                            let qpos = cached[r] + t;
                            let want = reference::attend(
                                &queries[r][t * n_q + h],
                                &kv,
                                &positions,
                                qpos,
                                &self.s.params,
                            );
                            let got = &out[((r * n_q + h) * lmax + t) * d..][..d];
                            self.compare(
                                got,
                                &want,
                                &format!("prefill seq {id} layer {l} head {h} token {t}"),
                            );
                        }
                    }
                    self.checked.prefill_rows += 1;
                }
            }
            // The reference state after prefill.
            for (r, &(_, new_len, _)) in rows.iter().enumerate() {
                let sparse_layer = !self.s.cfg.is_dense_layer(l);
                let seq = &mut self.seqs[first + r];
                seq.q_prev[l] = Some(
                    (0..n_q)
                        .map(|h| queries[r][(new_len - 1) * n_q + h].clone())
                        .collect(),
                );
                seq.has_sel[l] = sparse_layer && self.s.is_sparse(seq.len + 1);
            }
        }
    }

    fn compare(&self, got: &[f32], want: &[f64], what: &str) {
        let tol = self.s.tolerance() as f64;
        for c in 0..got.len() {
            let err = (got[c] as f64 - want[c]).abs();
            assert!(
                err <= tol * (1.0 + want[c].abs()),
                "{what}: channel {c}: got {} want {} (setup {:?})",
                got[c],
                want[c],
                self.s
            );
        }
    }

    /// Draws the queries of one step for a sequence on a layer: `[q head][d]`.
    fn draw_queries(&mut self, idx: usize, layer: usize, how: Queries) -> Vec<Vec<f32>> {
        let (n_q, d) = (self.s.shape.num_q_heads, self.s.shape.head_dim);
        let prev = self.seqs[idx].q_prev[layer].clone();
        let gs = self.s.group();
        (0..n_q)
            .map(|h| {
                let noise = self.random_row(d);
                match (how, &prev) {
                    (Queries::Drifting(mask), Some(prev)) if mask & (1 << (h / gs)) == 0 => {
                        prev[h].clone()
                    }
                    (Queries::Drift { lo, hi }, Some(prev)) => {
                        let cos = lo + (hi - lo) * self.rng.unit();
                        let prev = &prev[h];
                        // Remove the component along prev from the noise, then mix.
                        let pn: f64 = prev.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                        let dotp: f64 = prev
                            .iter()
                            .zip(&noise)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        let orth: Vec<f64> = noise
                            .iter()
                            .zip(prev)
                            .map(|(n, p)| *n as f64 - dotp / (pn * pn) * *p as f64)
                            .collect();
                        let on: f64 = orth.iter().map(|x| x * x).sum::<f64>().sqrt();
                        let sin = (1.0 - cos * cos).sqrt();
                        let dt = self.s.dtype;
                        prev.iter()
                            .zip(&orth)
                            .map(|(p, o)| round((cos * *p as f64 + sin * o / on * pn) as f32, dt))
                            .collect()
                    }
                    _ => noise,
                }
            })
            .collect()
    }

    /// What the spec says this step does for (seq, layer) given its queries.
    fn expect(&self, idx: usize, layer: usize, q: &[Vec<f32>], rebuild: bool) -> Expect {
        let seq = &self.seqs[idx];
        let len = seq.len;
        if self.s.cfg.is_dense_layer(layer) || !self.s.is_sparse(len) {
            return Expect::Dense;
        }
        let n_kv = self.s.shape.num_kv_heads;
        let gs = self.s.group();
        if !seq.has_sel[layer] || rebuild || self.s.cfg.mode == Mode::Sync {
            return Expect::Sparse {
                blocking: true,
                current: vec![true; n_kv],
                ambiguous: vec![false; n_kv],
            };
        }
        match self.s.cfg.mode {
            Mode::Speculative => Expect::Sparse {
                blocking: false,
                current: vec![false; n_kv],
                ambiguous: vec![false; n_kv],
            },
            Mode::FreeKv => {
                let prev = seq.q_prev[layer]
                    .as_ref()
                    .expect("a selection implies a previous query");
                let mut current = vec![false; n_kv];
                let mut ambiguous = vec![false; n_kv];
                for h in 0..n_kv {
                    let tau = self.taus[layer][h] as f64;
                    let a: Vec<&[f32]> = (h * gs..(h + 1) * gs).map(|i| &q[i][..]).collect();
                    let b: Vec<&[f32]> = (h * gs..(h + 1) * gs).map(|i| &prev[i][..]).collect();
                    let c = reference::mean_cosine(&a, &b);
                    current[h] = c < tau || tau >= 1.0;
                    ambiguous[h] = (c - tau).abs() < 1e-4 && tau < 1.0;
                }
                Expect::Sparse {
                    blocking: false,
                    current,
                    ambiguous,
                }
            }
            Mode::Dense | Mode::Sync => unreachable!(),
        }
    }

    /// One decode step for the sequences `ids` on every layer, checked. With `rebuild`, the
    /// step re-feeds each sequence's last token (context length not advancing), which FreeKV
    /// must answer by rebuilding from the host tier.
    pub fn decode(&mut self, ids: &[u64], how: Queries, rebuild: bool) {
        let (n_kv, n_q, d) = (
            self.s.shape.num_kv_heads,
            self.s.shape.num_q_heads,
            self.s.shape.head_dim,
        );
        let p = self.s.p();
        let layers = self.layers();
        let b = ids.len();
        let idxs: Vec<usize> = ids.iter().map(|&id| self.seq_index(id)).collect();
        // Append one token (or overwrite the last one when re-feeding).
        for &i in &idxs {
            if !rebuild {
                if self.seqs[i].len.is_multiple_of(p) {
                    let blk = self.alloc_block();
                    self.seqs[i].table.push(blk);
                }
                self.seqs[i].len += 1;
            }
            let pos = self.seqs[i].len - 1;
            for l in 0..layers {
                for h in 0..n_kv {
                    let kr = self.random_row(d);
                    let vr = self.random_row(d);
                    let seq = &mut self.seqs[i];
                    if rebuild {
                        seq.k[l][h][pos] = kr;
                        seq.v[l][h][pos] = vr;
                    } else {
                        seq.k[l][h].push(kr);
                        seq.v[l][h].push(vr);
                    }
                }
            }
        }
        self.last_outputs.clear();
        self.last_traces.clear();
        for l in 0..layers {
            let queries: Vec<Vec<Vec<f32>>> =
                idxs.iter().map(|&i| self.draw_queries(i, l, how)).collect();
            let expects: Vec<Expect> = idxs
                .iter()
                .zip(&queries)
                .map(|(&i, q)| self.expect(i, l, q, rebuild))
                .collect();
            let mut qv = Vec::with_capacity(b * n_q * d);
            let mut kv_k = Vec::with_capacity(b * n_kv * d);
            let mut kv_v = Vec::with_capacity(b * n_kv * d);
            for (r, &i) in idxs.iter().enumerate() {
                for q in &queries[r] {
                    qv.extend_from_slice(q);
                }
                let pos = self.seqs[i].len - 1;
                for h in 0..n_kv {
                    kv_k.extend_from_slice(&self.seqs[i].k[l][h][pos]);
                    kv_v.extend_from_slice(&self.seqs[i].v[l][h][pos]);
                }
            }
            let dt = self.s.candle_dtype();
            let tq = Tensor::from_vec(qv, (b, n_q, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let tk = Tensor::from_vec(kv_k, (b, n_kv, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let tv = Tensor::from_vec(kv_v, (b, n_kv, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let rows: Vec<DecodeRow> = idxs
                .iter()
                .map(|&i| DecodeRow {
                    seq_id: self.seqs[i].id,
                    block_table: &self.seqs[i].table,
                    context_len: self.seqs[i].len,
                })
                .collect();
            let out = self
                .fk
                .decode(l, &rows, Qkv::new(&tq, &tk, &tv), &self.s.params)
                .expect("decode");
            assert_eq!(out.dims(), &[b, n_q, d]);
            assert_eq!(out.dtype(), dt);
            let out = out
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut traces = Vec::new();
            for (r, &i) in idxs.iter().enumerate() {
                let trace = self
                    .fk
                    .step_trace(l, self.seqs[i].id)
                    .expect("tracing is on");
                // Adaptive thresholds move row by row, within the call too.
                let expect = if self.s.cfg.correction_rate > 0.0 {
                    self.expect(i, l, &queries[r], rebuild)
                } else {
                    expects[r].clone()
                };
                self.check_step(
                    i,
                    l,
                    &queries[r],
                    &expect,
                    &trace,
                    &out[r * n_q * d..(r + 1) * n_q * d],
                );
                traces.push(trace);
            }
            self.last_outputs.push(out);
            self.last_traces.push(traces);
            // The reference state after the step.
            for (r, &i) in idxs.iter().enumerate() {
                let sparse = matches!(expects[r], Expect::Sparse { .. });
                let seq = &mut self.seqs[i];
                seq.q_prev[l] = Some(queries[r].clone());
                seq.has_sel[l] = sparse;
            }
        }
    }

    fn check_step(
        &mut self,
        i: usize,
        l: usize,
        q: &[Vec<f32>],
        expect: &Expect,
        trace: &StepTrace,
        out: &[f32],
    ) {
        let (n_kv, d) = (self.s.shape.num_kv_heads, self.s.shape.head_dim);
        let gs = self.s.group();
        let p = self.s.p();
        let seq = &self.seqs[i];
        let len = seq.len;
        let what = format!("seq {} layer {l} len {len}", seq.id);
        assert_eq!(trace.len, len, "{what}");
        match expect {
            Expect::Dense => {
                assert!(
                    !trace.sparse,
                    "{what}: expected a dense step, trace {trace:?}"
                );
                let positions: Vec<usize> = (0..len).collect();
                for h in 0..self.s.shape.num_q_heads {
                    let kv = HeadKv {
                        k: &seq.k[l][h / gs],
                        v: &seq.v[l][h / gs],
                    };
                    let want = reference::attend(&q[h], &kv, &positions, len - 1, &self.s.params);
                    self.compare(
                        &out[h * d..(h + 1) * d],
                        &want,
                        &format!("{what} dense head {h}"),
                    );
                }
                self.checked.dense_steps += 1;
            }
            Expect::Sparse {
                blocking,
                current,
                ambiguous,
            } => {
                assert!(trace.sparse, "{what}: expected a sparse step");
                assert_eq!(trace.blocking, *blocking, "{what}: blocking");
                if self.s.cfg.mode == Mode::FreeKv && !blocking {
                    for h in 0..n_kv {
                        if !ambiguous[h] {
                            assert_eq!(
                                trace.corrected[h], current[h],
                                "{what}: correction of KV head {h}"
                            );
                        }
                    }
                    self.checked.corrected += trace.corrected.iter().filter(|&&c| c).count();
                    let rate = self.s.cfg.correction_rate;
                    if rate > 0.0 {
                        for (tau, &c) in self.taus[l].iter_mut().zip(&trace.corrected) {
                            *tau = (*tau + 0.005 * (rate - c as u8 as f32)).clamp(-1.0, 1.0);
                        }
                    }
                }
                let fixed = self.s.fixed_pages(len);
                let cand = self.s.candidates(len);
                let prev = seq.q_prev[l].as_ref();
                let mut tie_resolved = 0;
                for h in 0..n_kv {
                    let pages: Vec<usize> = trace.pages[h].iter().map(|&x| x as usize).collect();
                    for f in &fixed {
                        assert!(
                            pages.contains(f),
                            "{what}: head {h} misses sink/window page {f}: {pages:?}"
                        );
                    }
                    let selected: Vec<usize> = pages
                        .iter()
                        .copied()
                        .filter(|x| !fixed.contains(x))
                        .collect();
                    let kv = HeadKv {
                        k: &seq.k[l][h],
                        v: &seq.v[l][h],
                    };
                    let use_current = if ambiguous[h] {
                        trace.corrected[h]
                    } else {
                        current[h]
                    };
                    let qsrc: Vec<&[f32]> = if use_current {
                        (h * gs..(h + 1) * gs).map(|x| &q[x][..]).collect()
                    } else {
                        (h * gs..(h + 1) * gs)
                            .map(|x| &prev.unwrap()[x][..])
                            .collect()
                    };
                    let dt = self.s.dtype;
                    let store = move |x: f64| round(x as f32, dt) as f64;
                    let scoring = reference::Scoring {
                        page_size: p,
                        kind: self.s.cfg.summary,
                        pooling: self.s.cfg.pooling,
                        store: &store,
                    };
                    let scores = match self.s.cfg.selector {
                        Selector::Quest => {
                            reference::page_scores(&qsrc, &kv, cand.clone(), &scoring)
                        }
                        Selector::Rerank => reference::rerank_scores(
                            &qsrc,
                            &kv,
                            cand.clone(),
                            if use_current { len } else { len - 1 },
                            &self.s.params,
                            &scoring,
                            self.s.cfg.shortlist * self.s.sel_pages(),
                        ),
                        // The previous query was stored one token earlier.
                        Selector::Oracle => reference::oracle_scores(
                            &qsrc,
                            &kv,
                            cand.clone(),
                            p,
                            if use_current { len } else { len - 1 },
                            &self.s.params,
                        ),
                    };
                    let k = self.s.sel_pages().min(cand.len());
                    let want = reference::top_k(&scores, cand.start, k);
                    if selected != want {
                        // Only near ties may differ: same count, and the sorted score lists agree.
                        assert_eq!(
                            selected.len(),
                            want.len(),
                            "{what}: head {h} selected {selected:?}, reference {want:?}"
                        );
                        let score = |pg: &usize| {
                            assert!(
                                cand.contains(pg),
                                "{what}: head {h} selected non-candidate page {pg} ({cand:?})"
                            );
                            scores[pg - cand.start]
                        };
                        let mut a: Vec<f64> = selected.iter().map(score).collect();
                        let mut b: Vec<f64> = want.iter().map(score).collect();
                        a.sort_by(|x, y| x.partial_cmp(y).unwrap());
                        b.sort_by(|x, y| x.partial_cmp(y).unwrap());
                        // A page the reference scores -inf (outside a rerank's shortlist) is
                        // never a near tie.
                        assert!(
                            a.iter().all(|x| x.is_finite()),
                            "{what}: head {h} selected {selected:?} (scores {a:?}) outside the reference's shortlist"
                        );
                        let scale = scores
                            .iter()
                            .filter(|s| s.is_finite())
                            .fold(0f64, |m, s| m.max(s.abs()));
                        for (x, y) in a.iter().zip(&b) {
                            assert!(
                                (x - y).abs() <= 1e-4 * scale + 1e-12,
                                "{what}: head {h} selected {selected:?} (scores {a:?}), reference {want:?} (scores {b:?})"
                            );
                        }
                        tie_resolved += 1;
                    }
                    // Output of the group's query heads over exactly these pages.
                    let positions: Vec<usize> = pages
                        .iter()
                        .flat_map(|&pg| pg * p..((pg + 1) * p).min(len))
                        .collect();
                    for qh in h * gs..(h + 1) * gs {
                        let want =
                            reference::attend(&q[qh], &kv, &positions, len - 1, &self.s.params);
                        self.compare(
                            &out[qh * d..(qh + 1) * d],
                            &want,
                            &format!("{what} sparse head {qh}"),
                        );
                    }
                }
                self.checked.heads_compared += n_kv;
                self.checked.tie_resolved += tie_resolved;
                self.checked.sparse_steps += 1;
            }
        }
    }

    /// Frees a sequence in FreeKV and returns its blocks to the pool (unless shared).
    pub fn free(&mut self, id: u64) {
        self.fk.free_sequence(id);
        let i = self.seq_index(id);
        let seq = self.seqs.remove(i);
        let in_use: std::collections::HashSet<u32> = self
            .seqs
            .iter()
            .flat_map(|s| s.table.iter().copied())
            .collect();
        for b in seq.table {
            if !in_use.contains(&b) && !self.free.contains(&b) {
                self.free.push(b);
            }
        }
    }
}

/// A random valid setup within the given limits.
pub struct Limits {
    pub groups: &'static [usize],
    pub head_dims: &'static [usize],
    pub page_sizes: &'static [usize],
    pub dtypes: &'static [KvDType],
    pub modes: &'static [Mode],
    pub max_kv_heads: usize,
}

pub fn random_setup(rng: &mut Rng, lim: &Limits) -> Setup {
    let p = rng.pick(lim.page_sizes);
    let sink = rng.range(0, 2) * p;
    let window = rng.range(1, 2) * p;
    let sel = rng.range(1, 3);
    let n_kv = rng.range(1, lim.max_kv_heads);
    let g = rng.pick(lim.groups);
    let d = rng.pick(lim.head_dims);
    let cfg = FreeKvConfig {
        page_size: p,
        budget: sink + window + sel * p,
        sink,
        window,
        tau: [0.5, 0.8, 0.9, 0.95][rng.range(0, 3)],
        correction_rate: 0.0,
        summary: if rng.chance(0.3) {
            freekv_plugin::SummaryKind::CentreMad
        } else {
            Default::default()
        },
        pooling: [
            freekv_plugin::Pooling::SoftmaxMean,
            freekv_plugin::Pooling::Mean,
            freekv_plugin::Pooling::Max,
        ][rng.range(0, 2)],
        selector: Selector::Quest,
        shortlist: 2,
        dense_layers: vec![],
        mode: rng.pick(lim.modes),
        device_tier: if rng.chance(0.5) {
            freekv_plugin::DeviceTierLayout::Copy
        } else {
            freekv_plugin::DeviceTierLayout::InPlace
        },
        workers: 2,
        prefill_attention: Default::default(),
    };
    let params = AttnParams {
        softmax_scale: 1.0 / (d as f32).sqrt(),
        softcap: if rng.chance(0.15) {
            Some(rng.range(5, 30) as f32 / 10.0)
        } else {
            None
        },
        sliding_window: if rng.chance(0.15) {
            Some(rng.range(2 * p, 6 * p))
        } else {
            None
        },
    };
    Setup {
        cfg,
        shape: ModelShape {
            num_layers: 1,
            num_q_heads: n_kv * g,
            num_kv_heads: n_kv,
            head_dim: d,
        },
        dtype: rng.pick(lim.dtypes),
        num_blocks: 256,
        params,
    }
}

/// A tally of checks across cases, to show the tests exercised what they claim.
pub fn tally(all: &mut Checked, c: Checked) {
    all.prefill_rows += c.prefill_rows;
    all.dense_steps += c.dense_steps;
    all.sparse_steps += c.sparse_steps;
    all.heads_compared += c.heads_compared;
    all.tie_resolved += c.tie_resolved;
    all.corrected += c.corrected;
}
