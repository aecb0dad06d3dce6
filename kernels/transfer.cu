// Recall: moving pages from the host tier into the device tier.
//
// A "chunk" is one KV head's part of one HND host page: [2][PAGE][D] contiguous elements (16 KiB at
// PAGE 32, D 128, 16-bit). Recall copies chunks host -> device staging buffer with the copy engines,
// then freekv_recall_scatter spreads each chunk into its NHD slot (one row of D elements per token,
// row stride n_kv * D).

// Mirrored by `RecallJob` in freekv-plugin/src/backend/cuda/kernels.rs.
struct RecallJob {
  u64 slots;     // kv_t*: the destination (sequence, layer) slot tensor [n_slots][2][PAGE][n_kv][D]
  u64 src;       // chunk source: offset in elements into the staging buffer
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
