// Page selection on the device: scoring, group pooling, the top-k and the replacement plan
// (freekv_plan_pages, the CPU backend's `plan_replacement` exactly), correction flags. Only each
// head's plan (a few slot/page pairs) goes back to the host, which moves the chunks it names.
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

// Total-order bits of a float, as an unsigned integer that sorts as Rust's `f32::total_cmp`:
// -NaN < -inf < ... < -0 < +0 < ... < +inf < NaN.
__device__ __forceinline__ u32 order_bits(float x) {
  const u32 u = __float_as_uint(x);
  return u ^ ((u & 0x80000000u) ? 0xffffffffu : 0x80000000u);
}

// A candidate's rank key: larger is better (higher score, then the lower page: ties pick lower
// pages), and distinct for distinct candidates.
__device__ __forceinline__ u64 cand_key(const float* __restrict__ pooled, int j) {
  return ((u64)order_bits(pooled[j]) << 32) | (u64)(0xffffffffu - (u32)j);
}

// The relative gap between the last winner and the best candidate left out (0 on a tie, +inf
// when every candidate wins or an infinite winner beats a finite loser), as the CPU backend's
// `margin`; never NaN.
__device__ __forceinline__ float plan_margin(float worst_winner, float best_loser) {
  if (best_loser == FKV_NEG_INF && worst_winner > best_loser) return __int_as_float(0x7f800000);
  if (isnan(worst_winner) || isnan(best_loser) || worst_winner <= best_loser) return 0.0f;
  if (worst_winner == __int_as_float(0x7f800000)) return worst_winner;
  const float scale = fmaxf(fmaxf(fabsf(worst_winner), fabsf(best_loser)), 1.17549435e-38f);
  return (worst_winner - best_loser) / scale;
}

#define NO_PAGE 0xffffffffu

// The top-k and replacement plan of one (sequence, KV head) from its pooled scores, identical to
// the CPU backend's `plan_replacement` on the same scores:
// - winners: the k = min(sel_k, cand_count) best candidates (cand_key order), i.e. the keys >= the
//   k-th largest key, found by an 8-bit radix select over the 64-bit keys (8 passes);
// - a selected slot holding a winner keeps it (the first such slot, should a page be held twice);
//   every other selected slot may be replaced, lowest (score, slot) first, where an empty slot or
//   one holding a page that is no longer a candidate scores -inf;
// - the winners no slot holds, best first, go into those slots in that order; slots left over are
//   emptied; a pair that leaves its slot unchanged is omitted.
// Candidate j is page `cand_first[s] + j`. resident: [n_seq][n_kv][n_sel] u32, the selected slots'
// pages (NO_PAGE: empty); slot i is `slot0 + i`. plan: per (s, g) a row of 2 + 2 n_sel u32: the
// pair count, the margin (f32 bits), then (slot, page) pairs in the CPU backend's order.
// work: per (s, g) n_sel x (u64 evict key, u64 missing key, u32 evict order, u32 missing order).
// Launch: grid = (n_kv, n_seq), block = 256.
extern "C" __global__ void freekv_plan_pages(const float* __restrict__ pooled,
                                             const SeqDesc* __restrict__ descs,
                                             const int* __restrict__ cand_first,
                                             const u32* __restrict__ resident, u32* __restrict__ plan,
                                             unsigned char* __restrict__ work, int n_kv, int cand_stride,
                                             int n_sel, int sel_k, int slot0) {
  __shared__ u32 hist[256];
  __shared__ float scratch[32];
  __shared__ u64 s_prefix;
  __shared__ u32 s_remaining;
  __shared__ int n_evict, n_missing;
  const int g = blockIdx.x, s = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
  const i64 row = (i64)s * n_kv + g;
  const int n = descs[s].cand_count;
  const u32 first = (u32)cand_first[s];
  const float* __restrict__ sc = pooled + row * cand_stride;
  const u32* __restrict__ held = resident + row * n_sel;
  u32* __restrict__ out = plan + row * (2 + 2 * (i64)n_sel);
  u64* ekey = reinterpret_cast<u64*>(work + row * 24 * (i64)n_sel);
  u64* mkey = ekey + n_sel;
  u32* eorder = reinterpret_cast<u32*>(mkey + n_sel);
  u32* morder = eorder + n_sel;
  // At most one winner per selected slot (the lists below hold n_sel entries).
  const int k = min(min(sel_k, n), n_sel);

  // The k-th largest key (exact: keys are distinct). With k = 0 no key reaches it.
  u64 prefix = 0, mask = 0;
  u32 remaining = (u32)k;
  if (k > 0) {
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += nt) hist[i] = 0;
      __syncthreads();
      for (int j = tid; j < n; j += nt) {
        const u64 key = cand_key(sc, j);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid < 32) {
        // The bin holding the `remaining`-th largest key, walking the bins from the top: lane
        // l holds bins 255 - 8l down to 248 - 8l; a prefix sum over the lanes finds the lane,
        // which walks its 8 bins.
        u32 local[8], sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          local[i] = hist[255 - 8 * tid - i];
          sum += local[i];
        }
        u32 incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const u32 v = __shfl_up_sync(0xffffffffu, incl, o);
          if (tid >= o) incl += v;
        }
        const u32 excl = incl - sum;
        const u32 hit = __ballot_sync(0xffffffffu, excl < remaining && incl >= remaining);
        if (tid == __ffs(hit) - 1) {
          u32 acc = excl;
          int b = 248 - 8 * tid;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (acc + local[i] >= remaining) {
              b = 255 - 8 * tid - i;
              break;
            }
            acc += local[i];
          }
          s_prefix = prefix | ((u64)b << shift);
          s_remaining = remaining - acc;
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= (u64)255 << shift;
    }
  }
  // Winners: keys >= threshold (none when k = 0).
  const bool any = k > 0;
  const u64 threshold = prefix;

  // The margin: the worst winner's score against the best loser's.
  float worst = __int_as_float(0x7f800000), best_loser = FKV_NEG_INF;
  for (int j = tid; j < n; j += nt) {
    if (any && cand_key(sc, j) >= threshold) worst = fminf(worst, sc[j]);
    else best_loser = fmaxf(best_loser, sc[j]);
  }
  worst = -block_max(-worst, scratch);
  best_loser = block_max(best_loser, scratch);

  if (tid == 0) n_evict = n_missing = 0;
  __syncthreads();
  // The slots that may be replaced, with their scores.
  for (int i = tid; i < n_sel; i += nt) {
    const u32 p = held[i];
    const bool cand = p != NO_PAGE && p >= first && p - first < (u32)n;
    float score = FKV_NEG_INF;
    if (cand) {
      const int c = (int)(p - first);
      bool keep = any && cand_key(sc, c) >= threshold;
      for (int i2 = 0; keep && i2 < i; ++i2) keep = held[i2] != p;
      if (keep) continue;
      score = sc[c];
    }
    const int e = atomicAdd(&n_evict, 1);
    ekey[e] = ((u64)order_bits(score) << 32) | (u64)(u32)(slot0 + i);
  }
  // The winners no slot holds.
  for (int j = tid; any && j < n; j += nt) {
    if (cand_key(sc, j) < threshold) continue;
    const u32 page = first + (u32)j;
    bool is_held = false;
    for (int i = 0; !is_held && i < n_sel; ++i) is_held = held[i] == page;
    if (is_held) continue;
    const int m = atomicAdd(&n_missing, 1);
    mkey[m] = ((u64)order_bits(sc[j]) << 32) | (u64)(0xffffffffu - page);
  }
  __syncthreads();
  const int ne = n_evict, nm = n_missing;
  // Ranks (keys are distinct): evicted slots ascending, missing pages descending.
  for (int e = tid; e < ne; e += nt) {
    const u64 key = ekey[e];
    int r = 0;
    for (int x = 0; x < ne; ++x) r += ekey[x] < key;
    eorder[r] = (u32)key;
  }
  for (int m = tid; m < nm; m += nt) {
    const u64 key = mkey[m];
    int r = 0;
    for (int x = 0; x < nm; ++x) r += mkey[x] > key;
    morder[r] = 0xffffffffu - (u32)key;
  }
  __syncthreads();
  if (tid == 0) {
    u32 count = 0;
    for (int r = 0; r < ne; ++r) {
      const u32 slot = eorder[r];
      const u32 page = r < nm ? morder[r] : NO_PAGE;
      if (page != held[slot - (u32)slot0]) {
        out[2 + 2 * count] = slot;
        out[3 + 2 * count] = page;
        ++count;
      }
    }
    out[0] = count;
    out[1] = __float_as_uint(plan_margin(worst, best_loser));
  }
}
