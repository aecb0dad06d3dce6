// Page selection on the device: scoring, group pooling, correction flags. The top-k and the
// replacement plan are the host's, from the pooled scores (every device makes the CPU's plans).
//
// A sequence has `cand_count` candidate pages (full pages that are neither sink nor window), in the
// order the host lists their blocks. Score buffers are indexed by candidate j with a fixed row stride `cand_stride` >= the largest cand_count of the batch.
//
// The scorer reads one layer's summaries by block, as the host tier lays them out and the product
// mirrors them on the device: `desc.summaries` is `[n_kv][n_blocks][2][D]` (upper then lower bound)
// and `cand_blocks[s * cand_stride + j]` is the block holding candidate j of sequence s.

// Query heads staged in shared memory at a time by the scorer (bounds shared memory for any group).
#define SCORE_HT (GROUP < 16 ? GROUP : 16)
// Lanes that share one page in the scorer (8 channels each) and pages a warp scores per step.
#define LPP D8
#define PPW (32 / LPP)

// Quest bound per query head: raw[s][h][j] = sum_c max(q[c] * upper_j[c], q[c] * lower_j[c]).
// No 1/sqrt(d). Launch: grid = (ceil(max_cand / pages_per_block), n_kv, n_seq), block = 128.
// Each warp scores PPW pages per step (LPP lanes per page, 16-byte summary loads, shuffle reduce);
// the group's queries sit in shared memory as f32.
extern "C" __global__ void freekv_score_pages(const kv_t* __restrict__ q, i64 q_seq_stride,
                                              const SeqDesc* __restrict__ descs,
                                              const int* __restrict__ cand_blocks, int n_blocks,
                                              float* __restrict__ raw, int n_kv, int cand_stride,
                                              int pages_per_block) {
  __shared__ float qs[SCORE_HT][D];
  const int g = blockIdx.y, s = blockIdx.z;
  const SeqDesc desc = descs[s];
  const int n = desc.cand_count;
  const int j0 = blockIdx.x * pages_per_block;
  if (j0 >= n) return;
  const int j1 = min(n, j0 + pages_per_block);
  const int n_q = n_kv * GROUP;
  const kv_t* __restrict__ summ = reinterpret_cast<const kv_t*>(desc.summaries);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int sub = lane / LPP, c8 = lane % LPP;

  for (int h0 = 0; h0 < GROUP; h0 += SCORE_HT) {
    const int ht = min(SCORE_HT, GROUP - h0);
    __syncthreads();
    for (int i = threadIdx.x; i < ht * D; i += blockDim.x) {
      const int h = i / D, c = i % D;
      qs[h][c] = to_f(q[s * q_seq_stride + (i64)(g * GROUP + h0 + h) * D + c]);
    }
    __syncthreads();
    // jb is warp-uniform so that every lane takes part in the shuffles.
    for (int jb = j0 + warp * PPW; jb < j1; jb += nw * PPW) {
      const int j = jb + sub;
      const bool valid = j < j1;
      float up[VEC], lo[VEC];
      if (valid) {
        const i64 block = cand_blocks[(i64)s * cand_stride + j];
        const kv_t* rec = summ + ((i64)g * n_blocks + block) * (2 * D) + c8 * VEC;
        load8(rec, up);
        load8(rec + D, lo);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) up[i] = lo[i] = 0.0f;
      }
      for (int h = 0; h < ht; ++h) {
        const float* qh = &qs[h][c8 * VEC];
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc += fmaxf(qh[i] * up[i], qh[i] * lo[i]);
        acc = group_sum<LPP>(acc);
        if (valid && c8 == 0) raw[((i64)s * n_q + g * GROUP + h0 + h) * cand_stride + j] = acc;
      }
    }
  }
}

// Group pooling to one score per (KV head, candidate):
//   mode 0: mean over the group of softmax over candidates (the paper's default)
//   mode 1: mean of raw scores       mode 2: max of raw scores
// Launch: grid = (n_kv, n_seq), block = 256.
extern "C" __global__ void freekv_pool_scores(const float* __restrict__ raw, const SeqDesc* __restrict__ descs,
                                              float* __restrict__ pooled, int n_kv, int cand_stride,
                                              int mode) {
  __shared__ float scratch[32];
  __shared__ float stat_m[GROUP];
  __shared__ float stat_inv_z[GROUP];
  const int g = blockIdx.x, s = blockIdx.y;
  const int n = descs[s].cand_count;
  const int n_q = n_kv * GROUP;
  const float* __restrict__ r0 = raw + ((i64)s * n_q + g * GROUP) * cand_stride;
  float* __restrict__ out = pooled + ((i64)s * n_kv + g) * cand_stride;
  if (mode == 0) {
    for (int h = 0; h < GROUP; ++h) {
      const float* r = r0 + (i64)h * cand_stride;
      float m = FKV_NEG_INF;
      for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, r[j]);
      m = block_max(m, scratch);
      float z = 0.0f;
      for (int j = threadIdx.x; j < n; j += blockDim.x) z += __expf(r[j] - m);
      z = block_sum(z, scratch);
      if (threadIdx.x == 0) {
        stat_m[h] = m;
        stat_inv_z[h] = z > 0.0f ? 1.0f / z : 0.0f;
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      float acc = 0.0f;
      for (int h = 0; h < GROUP; ++h) acc += __expf(r0[(i64)h * cand_stride + j] - stat_m[h]) * stat_inv_z[h];
      out[j] = acc * (1.0f / GROUP);
    }
  } else {
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      float acc = (mode == 1) ? 0.0f : FKV_NEG_INF;
      for (int h = 0; h < GROUP; ++h) {
        const float v = r0[(i64)h * cand_stride + j];
        acc = (mode == 1) ? acc + v : fmaxf(acc, v);
      }
      out[j] = (mode == 1) ? acc * (1.0f / GROUP) : acc;
    }
  }
}

// Correction test per (sequence, KV head): C = mean over the group of cos(q_cur[h], q_prev[h]),
// each cosine clamped to [-1, 1] and 1 where either vector is zero (no drift from a query never
// stored), as the CPU backend computes it; flags = C < tau. `queries[2 s]` and `queries[2 s + 1]`
// are the device addresses of sequence s's current query (a row of the engine's q) and of its
// stored one (each sequence keeps its own), both [n_q][D]. Launch: grid = (n_kv, n_seq),
// block = 128.
extern "C" __global__ void freekv_correction(const unsigned long long* __restrict__ queries,
                                             int n_kv, float tau, float* __restrict__ cos_out,
                                             int* __restrict__ flags) {
  __shared__ float part[32];
  const int g = blockIdx.x, s = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const kv_t* cur = reinterpret_cast<const kv_t*>(queries[2 * s]);
  const kv_t* prev = reinterpret_cast<const kv_t*>(queries[2 * s + 1]);
  float acc = 0.0f;
  for (int h = warp; h < GROUP; h += nw) {
    const i64 off = (i64)(g * GROUP + h) * D;
    float dot = 0.0f, na = 0.0f, nb = 0.0f;
    for (int c = lane; c < D; c += 32) {
      const float a = to_f(cur[off + c]), b = to_f(prev[off + c]);
      dot += a * b;
      na += a * a;
      nb += b * b;
    }
    dot = warp_sum(dot);
    na = warp_sum(na);
    nb = warp_sum(nb);
    const float den = sqrtf(na * nb);
    acc += den > 0.0f ? fminf(fmaxf(dot / den, -1.0f), 1.0f) : 1.0f;
  }
  if (lane == 0) part[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float c = 0.0f;
    for (int w = 0; w < nw; ++w) c += part[w];
    c *= 1.0f / GROUP;
    cos_out[s * n_kv + g] = c;
    flags[s * n_kv + g] = c < tau ? 1 : 0;
  }
}
