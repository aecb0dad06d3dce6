// FreeKV CUDA kernels: shared definitions.
//
// Compiled at run time with NVRTC (freekv-plugin/src/backend/cuda/nvrtc.rs), which prepends this file
// to each kernel file. No host C++ headers are available there, so the fixed-width types are our own.
// Every kernel file is specialised with -D options:
//   FKV_DTYPE     0 = f16, 1 = bf16 (KV cache, queries, summaries and attention output)
//   FKV_HEAD_DIM  64, 128 or 256
//   FKV_PAGE      tokens per page (8, 16 or 32)
//   FKV_GROUP     query heads per KV head (any value >= 1)
//
// Layouts (element counts, row-major):
//   device slot  NHD  [2][PAGE][n_kv][D]   one per slot; K then V, token-major
//   host page    HND  [n_kv][2][PAGE][D]   one head's K+V of one page is contiguous
//   summary          [n_kv][2][D]          per page: upper then lower bound of the page's keys


typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

#ifndef FKV_DTYPE
#error "FKV_DTYPE must be defined (0 = f16, 1 = bf16)"
#endif
#ifndef FKV_HEAD_DIM
#error "FKV_HEAD_DIM must be defined"
#endif
#ifndef FKV_PAGE
#error "FKV_PAGE must be defined"
#endif
#ifndef FKV_GROUP
#error "FKV_GROUP must be defined"
#endif

#define D FKV_HEAD_DIM
#define PAGE FKV_PAGE
#define GROUP FKV_GROUP
// 16-byte vectors of 8 elements: the unit of every global load and store.
#define VEC 8
#define D8 (D / VEC)

#if (D != 64) && (D != 128) && (D != 256)
#error "FKV_HEAD_DIM must be 64, 128 or 256"
#endif
#if (PAGE != 8) && (PAGE != 16) && (PAGE != 32)
#error "FKV_PAGE must be 8, 16 or 32"
#endif
#if GROUP < 1
#error "FKV_GROUP must be >= 1"
#endif

#define FKV_NEG_INF (-__int_as_float(0x7f800000))

// The 16-bit element is stored as its raw bits; conversions are single PTX instructions. This keeps
// the kernels free of any header: NVRTC 13 does not ship cuda_fp16.h / cuda_bf16.h (they come with
// the toolkit), and a user's machine may have only the driver and libnvrtc.
typedef u16 kv_t;
#if FKV_DTYPE == 0
__device__ __forceinline__ float to_f(kv_t x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
}
__device__ __forceinline__ kv_t from_f(float x) {
  kv_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}
#elif FKV_DTYPE == 1
__device__ __forceinline__ float to_f(kv_t x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ kv_t from_f(float x) {
#if __CUDA_ARCH__ >= 800
  kv_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
#else
  // Round to nearest even; NaN stays a (quiet) NaN.
  const u32 u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (kv_t)((u >> 16) | 0x40u);
  return (kv_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}
#else
#error "FKV_DTYPE must be 0 (f16) or 1 (bf16)"
#endif

// 8 elements <-> 8 floats through one 16-byte access. `p` must be 16-byte aligned: every row we
// touch starts at a multiple of 8 elements (D is a multiple of 64).
__device__ __forceinline__ void load8(const kv_t* __restrict__ p, float out[VEC]) {
  uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const kv_t* e = reinterpret_cast<const kv_t*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f(e[i]);
}

// Like load8 but through the coherent path: for data written earlier in the same kernel or by a
// kernel that may still be resident in L1 on another stream (staging buffers).
__device__ __forceinline__ uint4 load_raw16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void store_raw16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over aligned groups of WIDTH consecutive lanes (WIDTH a power of two <= 32).
template <int WIDTH>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// exp(a - b) that is 0 when a is -inf (also when b is -inf): empty softmax partials.
__device__ __forceinline__ float exp_diff(float a, float b) {
  return (a == FKV_NEG_INF) ? 0.0f : __expf(a - b);
}

// Block-wide sum and max for blockDim.x a multiple of 32 and <= 1024. `scratch` holds 32 floats.
// Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = (lane < nw) ? scratch[lane] : 0.0f;
  return warp_sum(r);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = (lane < nw) ? scratch[lane] : FKV_NEG_INF;
  return warp_max(r);
}

// Per-sequence descriptor of one layer's device tier, built by the host for each step ("plan").
// Mirrored by `SeqDesc` in freekv-plugin/src/backend/cuda/kernels.rs: keep both in sync.
struct SeqDesc {
  u64 slots;      // kv_t*: [n_slots][2][PAGE][n_kv][D] (or a pool of slots, see slot_index)
  u64 slot_len;   // i32*:  [n_slots][n_kv] attended tokens [lo, hi) of each (logical) slot and KV head, packed (hi | lo << 16)
  u64 summaries;  // kv_t*: one layer's [n_kv][n_blocks][2][D] (by block; see select.cu)
  u64 slot_index; // i32*:  [n_slots] where logical slot i is stored in `slots`; 0 = slot i itself
  i32 n_slots;    // slots attended by decode (sink + selected + window, or a dense layer's pages)
  i32 cand_count; // number of candidate pages (scoring)
};
