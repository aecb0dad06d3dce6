// Page summaries: per full page and KV head, two vectors of length D that bound the page's keys.
//   mode 0 (min/max, the default):  upper = max_t k[t],  lower = min_t k[t]
//   mode 1 (centre +/- mean absolute deviation, ArkVale's box):
//            c = (max + min) / 2,  r = mean_t |k[t] - c|,  upper = c + r,  lower = c - r
//
// Launch: grid = n_jobs, block = min(1024, roundup32(n_kv * D8)). One block summarises one page
// (all KV heads); each thread owns 8 channels of one head and walks the page's PAGE tokens with
// 16-byte loads. The key source is strided so that both our NHD slots (token stride n_kv*D, head
// stride D) and HND pages (token stride D, head stride 2*PAGE*D) can be summarised.

extern "C" __global__ void freekv_summarize(const u64* __restrict__ src_keys,  // kv_t*: token 0, head 0
                                            const u64* __restrict__ dst,       // kv_t*: [n_kv][2][D]
                                            int n_jobs, int n_kv, i64 tok_stride, i64 head_stride,
                                            int mode) {
  const int job = blockIdx.x;
  if (job >= n_jobs) return;
  const kv_t* __restrict__ src = reinterpret_cast<const kv_t*>(src_keys[job]);
  kv_t* __restrict__ out = reinterpret_cast<kv_t*>(dst[job]);
  for (int t = threadIdx.x; t < n_kv * D8; t += blockDim.x) {
    const int head = t / D8, c8 = t % D8;
    const kv_t* base = src + head * head_stride + c8 * VEC;
    float mx[VEC], mn[VEC], k[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      mx[i] = FKV_NEG_INF;
      mn[i] = -FKV_NEG_INF;
    }
#pragma unroll 4
    for (int tok = 0; tok < PAGE; ++tok) {
      load8(base + tok * tok_stride, k);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        mx[i] = fmaxf(mx[i], k[i]);
        mn[i] = fminf(mn[i], k[i]);
      }
    }
    if (mode == 1) {
      float c[VEC], r[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        c[i] = 0.5f * (mx[i] + mn[i]);
        r[i] = 0.0f;
      }
#pragma unroll 4
      for (int tok = 0; tok < PAGE; ++tok) {
        load8(base + tok * tok_stride, k);
#pragma unroll
        for (int i = 0; i < VEC; ++i) r[i] += fabsf(k[i] - c[i]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        r[i] *= (1.0f / PAGE);
        mx[i] = c[i] + r[i];
        mn[i] = c[i] - r[i];
      }
    }
    kv_t* o = out + head * (2 * D) + c8 * VEC;
    store8(o, mx);
    store8(o + D, mn);
  }
}
