// Moving pages between the tiers, and appending new tokens to the device tier.
//
// A "chunk" is one KV head's part of one HND host page: [2][PAGE][D] contiguous elements (16 KiB at
// PAGE 32, D 128, 16-bit). Recall copies chunks host -> device staging buffer with the copy engines,
// then freekv_recall_scatter spreads each chunk into its NHD slot (one row of D elements per token,
// row stride n_kv * D). Offload gathers an NHD page into HND order.

// Mirrored by `RecallJob` in freekv-plugin/src/backend/cuda/kernels.rs.
struct RecallJob {
  u64 slots;     // kv_t*: the destination (sequence, layer) slot tensor [n_slots][2][PAGE][n_kv][D]
  u64 slot_len;  // i32*:  its [n_slots][n_kv] valid-token table
  u64 src;       // chunk source: offset in elements into the staging buffer (scatter), or a host
                 // pointer (UVA, pinned) to the chunk (direct)
  i32 slot;
  i32 head;
};

#define CHUNK_VECS (2 * PAGE * D8)

__device__ __forceinline__ void scatter_chunk(const kv_t* __restrict__ src, const RecallJob& job, int n_kv) {
  kv_t* __restrict__ slots = reinterpret_cast<kv_t*>(job.slots);
  for (int v = threadIdx.x; v < CHUNK_VECS; v += blockDim.x) {
    const int kv = v / (PAGE * D8);
    const int t = (v / D8) % PAGE;
    const int c8 = v % D8;
    const uint4 x = load_raw16(src + (i64)v * VEC);
    kv_t* dst = slots + ((((i64)job.slot * 2 + kv) * PAGE + t) * n_kv + job.head) * D + c8 * VEC;
    store_raw16(dst, x);
  }
  if (threadIdx.x == 0) reinterpret_cast<int*>(job.slot_len)[(i64)job.slot * n_kv + job.head] = PAGE;
}

// Staging buffer (device) -> NHD slots. Launch: grid = n_jobs, block = 256; job i's chunk starts at
// staging + jobs[i].src.
extern "C" __global__ void freekv_recall_scatter(const kv_t* __restrict__ staging,
                                                 const RecallJob* __restrict__ jobs, int n_jobs, int n_kv) {
  const int i = blockIdx.x;
  if (i >= n_jobs) return;
  const RecallJob job = jobs[i];
  scatter_chunk(staging + job.src, job, n_kv);
}

// Host chunk (pinned, mapped into the device's address space) -> NHD slots, read by the SMs over
// the bus instead of the copy engines: no staging buffer and one launch for any number of chunks.
// The alternative recall engine, chosen by measurement. Launch: grid = n_jobs, block = 256.
extern "C" __global__ void freekv_recall_direct(const RecallJob* __restrict__ jobs, int n_jobs, int n_kv) {
  const int i = blockIdx.x;
  if (i >= n_jobs) return;
  const RecallJob job = jobs[i];
  scatter_chunk(reinterpret_cast<const kv_t*>(job.src), job, n_kv);
}

// Mirrored by `GatherJob` in freekv-plugin/src/backend/cuda/kernels.rs.
struct GatherJob {
  u64 src_k;  // kv_t*: key of token 0, head 0 of the page
  u64 src_v;  // kv_t*: value of token 0, head 0 of the page
  u64 dst;    // kv_t*: HND page [n_kv][2][PAGE][D] (device staging, or mapped pinned host memory)
};

// Offload gather: strided (e.g. NHD slot: tok_stride n_kv*D, head_stride D) -> HND page.
// Launch: grid = n_jobs, block = 256. Stores are contiguous; loads are 16-byte rows of D.
extern "C" __global__ void freekv_offload_gather(const GatherJob* __restrict__ jobs, int n_jobs, int n_kv,
                                                 i64 tok_stride, i64 head_stride) {
  const int i = blockIdx.x;
  if (i >= n_jobs) return;
  const GatherJob job = jobs[i];
  const kv_t* __restrict__ k = reinterpret_cast<const kv_t*>(job.src_k);
  const kv_t* __restrict__ vv = reinterpret_cast<const kv_t*>(job.src_v);
  kv_t* __restrict__ dst = reinterpret_cast<kv_t*>(job.dst);
  const int total = n_kv * CHUNK_VECS;
  for (int v = threadIdx.x; v < total; v += blockDim.x) {
    const int head = v / CHUNK_VECS;
    const int r = v % CHUNK_VECS;
    const int kv = r / (PAGE * D8);
    const int t = (r / D8) % PAGE;
    const int c8 = r % D8;
    const kv_t* src = (kv == 0 ? k : vv) + t * tok_stride + head * head_stride + c8 * VEC;
    store_raw16(dst + (i64)v * VEC, load_raw16(src));
  }
}

// Mirrored by `AppendJob` in freekv-plugin/src/backend/cuda/kernels.rs.
struct AppendJob {
  u64 slots;     // kv_t*: the sequence's slot tensor
  u64 slot_len;  // i32*
  i32 slot;      // window slot receiving the token
  i32 pos;       // token position inside that slot's page
};

// New decode token(s) -> window slot; sets the slot's length to pos + 1 for every head.
// k_new / v_new: [n_seq][n_kv][D] rows (sequence stride `seq_stride`). Launch: grid = n_seq,
// block = roundup32(n_kv * D8) (<= 1024).
extern "C" __global__ void freekv_append(const kv_t* __restrict__ k_new, const kv_t* __restrict__ v_new,
                                         i64 seq_stride, const AppendJob* __restrict__ jobs, int n_kv) {
  const int s = blockIdx.x;
  const AppendJob job = jobs[s];
  kv_t* __restrict__ slots = reinterpret_cast<kv_t*>(job.slots);
  for (int v = threadIdx.x; v < n_kv * D8; v += blockDim.x) {
    const int head = v / D8, c8 = v % D8;
    const i64 src = s * seq_stride + (i64)head * D + c8 * VEC;
    const i64 dk = ((((i64)job.slot * 2 + 0) * PAGE + job.pos) * n_kv + head) * D + c8 * VEC;
    const i64 dv = ((((i64)job.slot * 2 + 1) * PAGE + job.pos) * n_kv + head) * D + c8 * VEC;
    store_raw16(slots + dk, load_raw16(k_new + src));
    store_raw16(slots + dv, load_raw16(v_new + src));
  }
  for (int h = threadIdx.x; h < n_kv; h += blockDim.x)
    reinterpret_cast<int*>(job.slot_len)[(i64)job.slot * n_kv + h] = job.pos + 1;
}
