// Decode attention over per-head slots (split-K, "flash decoding").
//
// Each KV head's slice of a slot may hold a different logical page: decode needs no causal mask and
// keys are already rotated, so attention over "the tokens in my slots" is order-free and one slot
// list serves every head. slot_len[slot][head] tells which of the slot's PAGE tokens that head
// attends: tokens [lo, hi) with hi in the low 16 bits and lo in the high 16 bits (lo > 0 cuts the
// tokens before a sliding window; 0 = empty). With a slot index (a dense layer: its pages are slots of a per-layer pool
// in block order), logical slot i is read from slot slot_index[i] of the pool, its lengths from
// slot_len[i].
//
// freekv_decode_partial: grid = (n_chunks, n_kv, n_seq), block = DEC_WARPS * 32. Block (c, g, s)
//   attends the GROUP query heads of KV head g over slots [c * slots_per_chunk, ...) and writes, per
//   query head, the unnormalised partial output o (f32, D), its running max m and sum l.
//   Inside a block every warp takes TPW tokens per step (LPT = D/8 lanes per token, 16-byte K and V
//   loads, shuffle-reduced dot products), keeps an online softmax per query head in registers, then
//   merges lanes and warps. Query heads are processed in register tiles of DEC_HT (<= 8).
// freekv_decode_combine: grid = (n_q, n_seq), block = D: merges the chunks and writes kv_t output.
//
// Logits: s = scale * q.k, then softcap * tanh(s / softcap) when softcap > 0. f32 accumulation.

#define DEC_WARPS 4
#define LPT D8
#define TPW (32 / LPT)
#define DEC_HT (GROUP < 8 ? GROUP : 8)

struct DecodeState {
  float m[DEC_HT];
  float l[DEC_HT];
  float o[DEC_HT][VEC];
};

__device__ __forceinline__ void attend_token(DecodeState& st, const float (&qv)[DEC_HT][VEC], const float (&kf)[VEC],
                                             const float (&vf)[VEC], bool valid, int ht, float softcap) {
#pragma unroll
  for (int h = 0; h < DEC_HT; ++h) {
    float sdot = 0.0f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) sdot += qv[h][i] * kf[i];
    sdot = group_sum<LPT>(sdot);
    if (softcap > 0.0f) sdot = softcap * tanhf(sdot / softcap);
    if (valid && h < ht) {
      const float m_new = fmaxf(st.m[h], sdot);
      const float corr = exp_diff(st.m[h], m_new);
      const float p = __expf(sdot - m_new);
      st.l[h] = st.l[h] * corr + p;
#pragma unroll
      for (int i = 0; i < VEC; ++i) st.o[h][i] = st.o[h][i] * corr + p * vf[i];
      st.m[h] = m_new;
    }
  }
}

__device__ __forceinline__ bool load_token(const kv_t* __restrict__ slots, const int* __restrict__ lens,
                                           const int* __restrict__ index, int slot0, int ti, int n_tok, int n_kv,
                                           int g, int c8, float (&kf)[VEC], float (&vf)[VEC]) {
  bool valid = ti < n_tok;
  int slot = 0, t = 0;
  if (valid) {
    slot = slot0 + ti / PAGE;
    t = ti % PAGE;
    const int span = lens[(i64)slot * n_kv + g];
    valid = t < (span & 0xffff) && t >= (span >> 16);
  }
  if (valid) {
    const i64 stored = index != nullptr ? (i64)index[slot] : (i64)slot;
    const kv_t* kp = slots + (((stored * 2) * PAGE + t) * n_kv + g) * D + c8 * VEC;
    load8(kp, kf);
    load8(kp + (i64)PAGE * n_kv * D, vf);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) kf[i] = vf[i] = 0.0f;
  }
  return valid;
}

extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)
    freekv_decode_partial(const kv_t* __restrict__ q, i64 q_seq_stride, const SeqDesc* __restrict__ descs,
                          float* __restrict__ part_o, float* __restrict__ part_ml, int n_kv, int n_chunks,
                          int slots_per_chunk, float scale, float softcap) {
  __shared__ float sm_o[DEC_WARPS][DEC_HT][D];
  __shared__ float sm_m[DEC_WARPS][DEC_HT];
  __shared__ float sm_l[DEC_WARPS][DEC_HT];
  const int chunk = blockIdx.x, g = blockIdx.y, s = blockIdx.z;
  const SeqDesc desc = descs[s];
  const int slot0 = chunk * slots_per_chunk;
  const int slot1 = min(desc.n_slots, slot0 + slots_per_chunk);
  const int n_tok = max(0, slot1 - slot0) * PAGE;
  const int n_q = n_kv * GROUP;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / LPT, c8 = lane % LPT;
  const kv_t* __restrict__ slots = reinterpret_cast<const kv_t*>(desc.slots);
  const int* __restrict__ lens = reinterpret_cast<const int*>(desc.slot_len);
  const int* __restrict__ index = reinterpret_cast<const int*>(desc.slot_index);

  for (int h0 = 0; h0 < GROUP; h0 += DEC_HT) {
    const int ht = min(DEC_HT, GROUP - h0);
    float qv[DEC_HT][VEC];
    DecodeState st;
#pragma unroll
    for (int h = 0; h < DEC_HT; ++h) {
      if (h < ht) {
        load8(q + s * q_seq_stride + (i64)(g * GROUP + h0 + h) * D + c8 * VEC, qv[h]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) qv[h][i] *= scale;
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) qv[h][i] = 0.0f;
      }
      st.m[h] = FKV_NEG_INF;
      st.l[h] = 0.0f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) st.o[h][i] = 0.0f;
    }
    // Two tokens per sub-group and step, both loaded before either is used (more bytes in flight).
    const int stride = DEC_WARPS * TPW;
    for (int tb = warp * TPW; tb < n_tok; tb += 2 * stride) {
      float k0[VEC], v0[VEC], k1[VEC], v1[VEC];
      const bool ok0 = load_token(slots, lens, index, slot0, tb + sub, n_tok, n_kv, g, c8, k0, v0);
      const bool ok1 = load_token(slots, lens, index, slot0, tb + stride + sub, n_tok, n_kv, g, c8, k1, v1);
      attend_token(st, qv, k0, v0, ok0, ht, softcap);
      attend_token(st, qv, k1, v1, ok1, ht, softcap);
    }
    // Merge the sub-groups of the warp (lanes holding the same channels of other tokens).
#pragma unroll
    for (int off = LPT; off < 32; off <<= 1) {
#pragma unroll
      for (int h = 0; h < DEC_HT; ++h) {
        const float m_o = __shfl_xor_sync(0xffffffffu, st.m[h], off);
        const float l_o = __shfl_xor_sync(0xffffffffu, st.l[h], off);
        const float m_new = fmaxf(st.m[h], m_o);
        const float a = exp_diff(st.m[h], m_new), b = exp_diff(m_o, m_new);
        st.l[h] = st.l[h] * a + l_o * b;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float o_o = __shfl_xor_sync(0xffffffffu, st.o[h][i], off);
          st.o[h][i] = st.o[h][i] * a + o_o * b;
        }
        st.m[h] = m_new;
      }
    }
    if (sub == 0) {
#pragma unroll
      for (int h = 0; h < DEC_HT; ++h) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sm_o[warp][h][c8 * VEC + i] = st.o[h][i];
        if (c8 == 0) {
          sm_m[warp][h] = st.m[h];
          sm_l[warp][h] = st.l[h];
        }
      }
    }
    __syncthreads();
    // Merge the warps and write the partial of this chunk.
    for (int i = threadIdx.x; i < ht * D; i += blockDim.x) {
      const int h = i / D, c = i % D;
      float mm = FKV_NEG_INF;
#pragma unroll
      for (int w = 0; w < DEC_WARPS; ++w) mm = fmaxf(mm, sm_m[w][h]);
      float ll = 0.0f, oo = 0.0f;
#pragma unroll
      for (int w = 0; w < DEC_WARPS; ++w) {
        const float f = exp_diff(sm_m[w][h], mm);
        ll += sm_l[w][h] * f;
        oo += sm_o[w][h][c] * f;
      }
      const i64 row = ((i64)s * n_q + g * GROUP + h0 + h) * n_chunks + chunk;
      part_o[row * D + c] = oo;
      if (c == 0) {
        part_ml[row * 2 + 0] = mm;
        part_ml[row * 2 + 1] = ll;
      }
    }
    __syncthreads();
  }
}

extern "C" __global__ void freekv_decode_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                                 kv_t* __restrict__ out, i64 out_seq_stride, int n_kv,
                                                 int n_chunks) {
  const int h = blockIdx.x, s = blockIdx.y, c = threadIdx.x;
  const int n_q = n_kv * GROUP;
  const i64 row0 = ((i64)s * n_q + h) * n_chunks;
  float mm = FKV_NEG_INF;
  for (int k = 0; k < n_chunks; ++k) mm = fmaxf(mm, part_ml[(row0 + k) * 2]);
  float ll = 0.0f, oo = 0.0f;
  for (int k = 0; k < n_chunks; ++k) {
    const float f = exp_diff(part_ml[(row0 + k) * 2], mm);
    ll += part_ml[(row0 + k) * 2 + 1] * f;
    if (c < D) oo += part_o[(row0 + k) * D + c] * f;
  }
  if (c < D) out[s * out_seq_stride + (i64)h * D + c] = from_f(ll > 0.0f ? oo / ll : 0.0f);
}
