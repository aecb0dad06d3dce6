// Page selection: scoring, group pooling, exact top-k with resident-page reuse, correction flags.
//
// Candidates of a sequence are the pages [cand_begin, cand_begin + cand_count) (full pages that are
// neither sink nor window); candidate j is page cand_begin + j. Score buffers are indexed by j with a
// fixed row stride `cand_stride` >= the largest cand_count of the batch.
//
// The scorer reads one layer's summaries by block, as the host tier lays them out and the product
// mirrors them on the device: `desc.summaries` is `[n_kv][n_blocks][2][D]` (upper then lower bound)
// and `cand_blocks[s * cand_stride + j]` is the block holding candidate j of sequence s.

// Query heads staged in shared memory at a time by the scorer (bounds shared memory for any group).
#define SCORE_HT (GROUP < 16 ? GROUP : 16)
// Lanes that share one page in the scorer (8 channels each) and pages a warp scores per step.
#define LPP D8
#define PPW (32 / LPP)
#ifndef FKV_MAX_SEL
#define FKV_MAX_SEL 1024
#endif

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

// Monotone map of f32 onto u32 (larger float -> larger key); NaN sorts below everything.
__device__ __forceinline__ u32 order_key(float x) {
  if (x != x) return 0u;
  const u32 u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exact top-k per KV head with resident-page reuse.
//   1. k = min(n_sel, cand_count) best candidates by pooled score: radix select (4 passes of 8-bit
//      digits) for the k-th largest key, then an ordered compaction; ties at the threshold go to the
//      lower page index, so the result is deterministic.
//   2. Selectable slots whose page is among the winners keep it. The missing winners go, in page
//      order, into the remaining slots taken by ascending current score (empty slots first, then the
//      lowest-scored resident pages; ties by slot index). Slots left over are emptied.
//   3. sel_pages is updated to the new target state, emptied slots get slot_len 0, and the recall
//      list {page, absolute slot} of the missing pages is written with its count. The slot_len of
//      a refilled slot is set by the recall scatter once the page's data is in place.
// Launch: grid = (n_kv, n_seq), block = 512. n_sel <= FKV_MAX_SEL.
extern "C" __global__ void freekv_topk_replace(const float* __restrict__ pooled, const SeqDesc* __restrict__ descs,
                                               int n_kv, int cand_stride, int n_sel,
                                               int* __restrict__ recall_count, int2* __restrict__ recall_list) {
  __shared__ int hist[256];
  __shared__ int scan[33];
  __shared__ int misc[2];
  __shared__ int chosen[FKV_MAX_SEL];
  __shared__ int missing[FKV_MAX_SEL];
  __shared__ int cur[FKV_MAX_SEL];
  __shared__ float cur_score[FKV_MAX_SEL];
  __shared__ u8 kept[FKV_MAX_SEL];
  __shared__ u8 resident[FKV_MAX_SEL];

  const int g = blockIdx.x, s = blockIdx.y, tid = threadIdx.x;
  const SeqDesc desc = descs[s];
  const int n = desc.cand_count;
  const int kk = min(n_sel, n);
  const bool take_all = kk == n;
  const float* __restrict__ scores = pooled + ((i64)s * n_kv + g) * cand_stride;
  int* __restrict__ sel_pages = reinterpret_cast<int*>(desc.sel_pages) + (i64)g * n_sel;
  int* __restrict__ slot_len = reinterpret_cast<int*>(desc.slot_len);

  // 1a. Radix select of the kk-th largest key.
  u32 prefix = 0u, mask = 0u;
  int remaining = kk;
  if (!take_all) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int j = tid; j < n; j += blockDim.x) {
        const u32 u = order_key(scores[j]);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1);
      }
      __syncthreads();
      if (tid == 0) {
        int acc = 0;
        for (int b = 255; b >= 0; --b) {
          if (acc + hist[b] >= remaining) {
            misc[0] = b;
            misc[1] = remaining - acc;
            break;
          }
          acc += hist[b];
        }
      }
      __syncthreads();
      prefix |= (u32)misc[0] << shift;
      mask |= 255u << shift;
      remaining = misc[1];
      __syncthreads();
    }
  }
  // 1b. Ordered compaction: keys above the threshold, then the first `remaining` equal ones.
  int base = 0, ties = 0;
  for (int j0 = 0; j0 < n; j0 += blockDim.x) {
    const int j = j0 + tid;
    const bool in = j < n;
    const u32 u = in ? order_key(scores[j]) : 0u;
    const bool gt = in && (take_all || u > prefix);
    const bool eq = in && !take_all && u == prefix;
    int total_eq;
    const int eq_rank = block_exclusive_count(eq, scan, &total_eq);
    const bool take = gt || (eq && ties + eq_rank < remaining);
    int total;
    const int pos = block_exclusive_count(take, scan, &total);
    if (take) chosen[base + pos] = desc.cand_begin + j;
    base += total;
    ties += total_eq;
  }
  // 2. Which slots keep their page (chosen[] is sorted by page: binary search).
  for (int i = tid; i < kk; i += blockDim.x) resident[i] = 0;
  __syncthreads();
  for (int i = tid; i < n_sel; i += blockDim.x) {
    const int p = sel_pages[i];
    cur[i] = p;
    cur_score[i] = (p >= desc.cand_begin && p < desc.cand_begin + n) ? scores[p - desc.cand_begin] : FKV_NEG_INF;
    int lo = 0, hi = kk - 1, found = -1;
    while (p >= 0 && lo <= hi) {
      const int mid = (lo + hi) >> 1;
      const int v = chosen[mid];
      if (v == p) {
        found = mid;
        break;
      }
      if (v < p) lo = mid + 1;
      else hi = mid - 1;
    }
    kept[i] = found >= 0;
    if (found >= 0) resident[found] = 1;
  }
  __syncthreads();
  // Missing winners, in page order.
  int n_missing = 0;
  for (int i0 = 0; i0 < kk; i0 += blockDim.x) {
    const int i = i0 + tid;
    const bool miss = i < kk && !resident[i];
    int total;
    const int pos = block_exclusive_count(miss, scan, &total);
    if (miss) missing[n_missing + pos] = chosen[i];
    n_missing += total;
  }
  __syncthreads();
  // 3. Rank the free slots by (current score, slot index) and hand out the missing pages.
  int2* __restrict__ out = recall_list + ((i64)s * n_kv + g) * n_sel;
  for (int i = tid; i < n_sel; i += blockDim.x) {
    if (kept[i]) continue;
    const float si = cur_score[i];
    int rank = 0;
    for (int j = 0; j < n_sel; ++j) {
      if (kept[j]) continue;
      const float sj = cur_score[j];
      rank += (sj < si) || (sj == si && j < i);
    }
    const int slot = desc.sel_slot0 + i;
    if (rank < n_missing) {
      const int page = missing[rank];
      sel_pages[i] = page;
      out[rank] = make_int2(page, slot);
    } else {
      sel_pages[i] = -1;
      slot_len[(i64)slot * n_kv + g] = 0;
    }
  }
  if (tid == 0) recall_count[s * n_kv + g] = n_missing;
}

// Correction test per (sequence, KV head): C = mean over the group of cos(q_cur[h], q_prev[h]);
// flags = C < tau. cos is 0 when either vector is zero. Launch: grid = (n_kv, n_seq), block = 128.
extern "C" __global__ void freekv_correction(const kv_t* __restrict__ q_cur, const kv_t* __restrict__ q_prev,
                                             i64 q_seq_stride, int n_kv, float tau,
                                             float* __restrict__ cos_out, int* __restrict__ flags) {
  __shared__ float part[32];
  const int g = blockIdx.x, s = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float acc = 0.0f;
  for (int h = warp; h < GROUP; h += nw) {
    const i64 off = s * q_seq_stride + (i64)(g * GROUP + h) * D;
    float dot = 0.0f, na = 0.0f, nb = 0.0f;
    for (int c = lane; c < D; c += 32) {
      const float a = to_f(q_cur[off + c]), b = to_f(q_prev[off + c]);
      dot += a * b;
      na += a * a;
      nb += b * b;
    }
    dot = warp_sum(dot);
    na = warp_sum(na);
    nb = warp_sum(nb);
    const float den = sqrtf(na) * sqrtf(nb);
    acc += den > 0.0f ? dot / den : 0.0f;
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
