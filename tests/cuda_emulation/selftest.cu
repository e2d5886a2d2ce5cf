// Kernels that check the emulator itself, not fastdml (test_cuda_emulation.py::test_emulator_*):
// the shuffles against the hardware's lane arithmetic, __syncthreads_count, atomicAdd,
// cudaMemsetAsync, thread-block clusters and their occupancy, and that a kernel a GPU would hang
// on, give undefined results for, or refuse to launch is reported. Built like csrc/*.cu, so the
// rewrite of launches and shared memory is exercised too.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <bit>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "emulator.h"

namespace cg = cooperative_groups;

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// out[t] = the shuffle's result in thread t, whose value is 100 * t.
__global__ void shuffle_kernel(int* out, int kind, int arg, int width) {
  const int v = 100 * static_cast<int>(threadIdx.x);
  int r = 0;
  switch (kind) {
    case 0: r = __shfl_sync(kFullMask, v, arg, width); break;
    case 1: r = __shfl_up_sync(kFullMask, v, static_cast<unsigned>(arg), width); break;
    case 2: r = __shfl_down_sync(kFullMask, v, static_cast<unsigned>(arg), width); break;
    default: r = __shfl_xor_sync(kFullMask, v, arg, width); break;
  }
  out[threadIdx.x] = r;
}

// A double through a butterfly sum, as the kernels reduce: every lane ends with the total.
__global__ void butterfly_kernel(int* out) {
  double v = threadIdx.x + 0.5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  out[threadIdx.x] = static_cast<int>(v * 2);
}

// Reverses the block through dynamic shared memory.
__global__ void reverse_kernel(int* out) {
  extern __shared__ int buffer[];
  buffer[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = buffer[blockDim.x - 1 - threadIdx.x];
}

// Thread 0 writes, the others read: right only with the barrier.
__global__ void publish_kernel(int* out, bool barrier) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 42;
  if (barrier) __syncthreads();
  out[threadIdx.x] = value;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Two counts in a row, so that the second is not the first's: of the threads t with t % arg == 0
// (a predicate other than 1), then of those with t < arg. out[t] = 1000 * first + second.
__global__ void syncthreads_count_kernel(int* out, int arg) {
  const int t = static_cast<int>(threadIdx.x);
  const int first = __syncthreads_count(t % arg == 0 ? t + 1 : 0);
  const int second = __syncthreads_count(t < arg);
  out[t] = 1000 * first + second;
}

// Warp 0 waits at a __syncthreads, the others at a __syncthreads_count.
__global__ void divergent_syncthreads_count_kernel(int* out) {
  int n = 0;
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    n = __syncthreads_count(1);
  }
  out[threadIdx.x] = n;
}

// The last-block pattern: thread 0 of each block takes a ticket, block b writes out[b] = its
// ticket, and the block that takes the last one writes 1000 + its index into the rest of out.
__global__ void atomic_ticket_kernel(int* out, unsigned* ticket) {
  __shared__ unsigned mine;
  if (threadIdx.x == 0) {
    mine = atomicAdd(ticket, 1u);
    out[blockIdx.x] = static_cast<int>(mine);
  }
  __syncthreads();
  if (mine == gridDim.x - 1 && threadIdx.x >= gridDim.x) {
    out[threadIdx.x] = 1000 + static_cast<int>(blockIdx.x);
  }
}

// A counter of each type atomicAdd takes.
struct Counters {
  unsigned u;
  int i;
  unsigned long long ull;
  float f;
  float tiny;  // gets subnormals: flushed
  double d;
};

// Every thread adds to every counter. out[0..6]: the counters after a barrier; out[t] for t >= 7:
// what thread t's unsigned add returned (the order the threads ran in).
__global__ void atomic_add_kernel(int* out, Counters* c) {
  const unsigned ticket = atomicAdd(&c->u, 1u);
  atomicAdd(&c->i, 1);
  atomicAdd(&c->ull, (1ull << 32) + 1);
  atomicAdd(&c->f, 0.5f);
  atomicAdd(&c->tiny, 1e-40f);
  atomicAdd(&c->d, 0.25);
  __syncthreads();
  const int ends[] = {static_cast<int>(c->u), c->i, static_cast<int>(c->ull >> 32),
                      static_cast<int>(c->ull & 0xffffffffu), static_cast<int>(c->f),
                      std::bit_cast<int>(c->tiny), static_cast<int>(c->d)};
  out[threadIdx.x] = threadIdx.x < 7 ? ends[threadIdx.x] : static_cast<int>(ticket);
}

// An 8-byte atomicAdd 4 bytes past an 8-byte boundary.
__global__ void misaligned_atomic_kernel(int* out) {
  __shared__ unsigned long long words[2];
  auto* p = reinterpret_cast<unsigned long long*>(reinterpret_cast<int*>(words) + 1);
  out[threadIdx.x] = static_cast<int>(atomicAdd(p, 1ull));
}

// Half of each warp leaves before a full-mask shuffle.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, 1, 1);
}

// Thread 0 waits in __syncwarp for lanes that wait in __syncthreads for it.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// 1 KiB of static shared memory besides the launch's dynamic size (at least 1 KiB): what the
// launch rules count. out[t] = 1000 * (255 - t) + t.
__global__ void static_and_dynamic_smem_kernel(int* out) {
  __shared__ int words[256];
  extern __shared__ int buffer[];
  words[threadIdx.x] = 1000 * static_cast<int>(threadIdx.x);
  buffer[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = words[blockDim.x - 1 - threadIdx.x] + buffer[threadIdx.x];
}

// A 16-byte load from an address 4 bytes past a 16-byte boundary.
__global__ void misaligned_load_kernel(int* out) {
  __shared__ int4 words[2];
  const int4 v = __ldcs(reinterpret_cast<const int4*>(reinterpret_cast<const int*>(words) + 1));
  out[threadIdx.x] = v.x;
}

// Each block of a cluster publishes blockIdx.x + 1 (static shared memory) and 1000 * that + t in
// dynamic word t, then thread t sums both of every block of its cluster, in rank order, through
// map_shared_rank, plus 100000 * its warp's first thread's index / 32 (through a shuffle of its
// warp: none spans two blocks). Bit 0 of `barriers`: the cluster barrier before the reads; bit 1:
// the one after, that keeps every block's memory until all have read it.
__global__ void cluster_sum_kernel(int* out, int barriers) {
  __shared__ int published;
  extern __shared__ int words[];
  const cg::cluster_group cluster = cg::this_cluster();
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) published = static_cast<int>(blockIdx.x) + 1;
  words[t] = 1000 * (static_cast<int>(blockIdx.x) + 1) + t;
  if (barriers & 1) cluster.sync();
  int sum = 0;
  for (unsigned rank = 0; rank < cluster.num_blocks(); ++rank) {
    sum += *cluster.map_shared_rank(&published, static_cast<int>(rank));
    const int* remote = cluster.map_shared_rank(static_cast<const int*>(words), rank);
    sum += remote[t];
  }
  const int lanes = min(32, static_cast<int>(blockDim.x) - t / 32 * 32);
  const unsigned mask = lanes == 32 ? kFullMask : (1u << lanes) - 1;
  const int first = __shfl_sync(mask, t, 0);
  const bool rank_right = cluster.block_rank() == blockIdx.x % cluster.num_blocks();
  if (barriers & 2) cluster.sync();
  out[blockIdx.x * blockDim.x + t] = sum + 100000 * (first / 32) + (rank_right ? 0 : 1000000);
}

// The blocks of odd rank wait at another cluster barrier than the others.
__global__ void divergent_cluster_barrier_kernel(int* out) {
  if (cg::this_cluster().block_rank() % 2 == 1) {
    cg::this_cluster().sync();
  } else {
    cg::this_cluster().sync();
  }
  out[threadIdx.x] = 1;
}

// Warp 0 waits at a cluster barrier, the others at a __syncthreads: neither completes.
__global__ void cluster_deadlock_kernel(int* out) {
  if (threadIdx.x < 32) {
    cg::this_cluster().sync();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// map_shared_rank of shared memory to rank `rank`, or (rank < 0) of global memory to rank 0.
__global__ void map_shared_rank_kernel(int* out, int rank) {
  __shared__ int word;
  if (threadIdx.x == 0) word = 1;
  cg::this_cluster().sync();
  const int* p = rank < 0 ? cg::this_cluster().map_shared_rank(out, 0)
                          : cg::this_cluster().map_shared_rank(&word, rank);
  cg::this_cluster().sync();
  out[threadIdx.x] = *p;
}

// A launcher as csrc's launch clusters: `kernel` in clusters of cluster_x by cluster_y blocks.
template <typename... Params, typename... Args>
cudaError_t launch_clusters(void (*const kernel)(Params...), int blocks, int threads,
                            unsigned cluster_x, unsigned cluster_y, size_t smem, Args... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster_x;
  attribute.val.clusterDim.y = cluster_y;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = nullptr;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// cudaOccupancyMaxActiveClusters of cluster_sum_kernel in clusters of `cluster` blocks of
// `threads` threads with `smem` bytes of dynamic shared memory: out[0], its error out[1]; then,
// if `launch`, a launch of one such cluster, and the same query in out[2], its error in out[3].
cudaError_t occupancy(int* out, int threads, int cluster, size_t smem, bool launch) {
  const auto kernel = cluster_sum_kernel;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.attrs = &attribute;
  config.numAttrs = 1;
  out[1] = cudaOccupancyMaxActiveClusters(&out[0], kernel, &config);
  if (!launch) return cudaSuccess;
  std::vector<int> results(static_cast<size_t>(cluster * threads));
  const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, results.data(), 3);
  if (launched != cudaSuccess) return launched;
  out[3] = cudaOccupancyMaxActiveClusters(&out[2], kernel, &config);
  return cudaSuccess;
}

}  // namespace

extern "C" {

// Runs self-test `name` with 256 threads (one block) into out[256], on a device whose blocks may
// have `smem_per_block_optin` bytes of shared memory; returns 0, or 1 with the error (launch or
// kernel) in `error`. "static_and_dynamic_smem": `arg` bytes of dynamic shared memory, after
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kind) if kind >= 0.
// "atomic_ticket": `arg` blocks (at most 256) on a counter zeroed by cudaMemsetAsync.
// "memset_after_error": cudaMemsetAsync after a failed launch; its result and what it left in the
// word it was to zero (7 before) are the error. The cluster tests run on a device of `num_sms`
// multiprocessors with `smem_per_sm` bytes of shared memory each and thread-block clusters if
// `clusters`: "cluster_sum": `arg` blocks of `threads` threads in clusters of `cluster` (0: a
// plain <<<>>> launch), barriers `kind`; "cluster_2d": the same in clusters of (cluster, 2);
// "occupancy": kind bytes of dynamic shared memory, cudaFuncSetAttribute to that first if arg & 1,
// a launch between two queries if arg & 2; "map_shared_rank": to rank `arg` (-1: of global memory).
int emu_selftest(const char* name, int kind, int arg, int width, int schedule, int threads,
                 int cluster, int num_sms, int smem_per_sm, int smem_per_block_optin,
                 int clusters, int* out, char* error, int64_t error_size) {
  cuda_emu::reset();
  cuda_emu::configure(num_sms, static_cast<size_t>(smem_per_sm),
                      static_cast<size_t>(smem_per_block_optin), clusters != 0,
                      static_cast<cuda_emu::Schedule>(schedule));
  const std::string test = name;
  constexpr int kThreads = 256;
  if (test == "shuffle") {
    shuffle_kernel<<<1, kThreads>>>(out, kind, arg, width);
  } else if (test == "butterfly") {
    butterfly_kernel<<<1, kThreads>>>(out);
  } else if (test == "reverse") {
    reverse_kernel<<<1, kThreads, kThreads * sizeof(int)>>>(out);
  } else if (test == "too_much_dynamic_smem") {
    reverse_kernel<<<1, kThreads, 64 * 1024>>>(out);  // over 48 KiB without the attribute
  } else if (test == "empty_grid") {
    reverse_kernel<<<0, kThreads, kThreads * sizeof(int)>>>(out);
  } else if (test == "publish") {
    publish_kernel<<<1, kThreads>>>(out, arg != 0);
  } else if (test == "divergent_barrier") {
    divergent_barrier_kernel<<<1, kThreads>>>(out);
  } else if (test == "exited_lane") {
    exited_lane_kernel<<<1, kThreads>>>(out);
  } else if (test == "deadlock") {
    deadlock_kernel<<<1, kThreads>>>(out);
  } else if (test == "misaligned_load") {
    misaligned_load_kernel<<<1, kThreads>>>(out);
  } else if (test == "syncthreads_count") {
    syncthreads_count_kernel<<<1, kThreads>>>(out, arg);
  } else if (test == "divergent_syncthreads_count") {
    divergent_syncthreads_count_kernel<<<1, kThreads>>>(out);
  } else if (test == "atomic_ticket") {
    unsigned ticket = 0xdeadbeefu;  // what a reused workspace holds
    const cudaStream_t stream = nullptr;
    const cudaError_t set = cudaMemsetAsync(&ticket, 0, sizeof(ticket), stream);
    if (set != cudaSuccess) {
      std::snprintf(error, static_cast<size_t>(error_size), "cudaMemsetAsync: CUDA error %d",
                    int(set));
      return 1;
    }
    atomic_ticket_kernel<<<arg, kThreads, 0, stream>>>(out, &ticket);
  } else if (test == "atomic_add") {
    Counters counters{0, std::numeric_limits<int>::max() - 99, 0, 0.0f, 0.0f, 0.0};
    atomic_add_kernel<<<1, kThreads>>>(out, &counters);
  } else if (test == "misaligned_atomic") {
    misaligned_atomic_kernel<<<1, kThreads>>>(out);
  } else if (test == "memset_after_error") {
    divergent_barrier_kernel<<<1, kThreads>>>(out);
    int word = 7;
    const cudaError_t set = cudaMemsetAsync(&word, 0, sizeof(word));
    std::snprintf(error, static_cast<size_t>(error_size), "cudaMemsetAsync: CUDA error %d, word %d",
                  int(set), word);
    return 1;
  } else if (test == "static_and_dynamic_smem") {
    if (kind >= 0) {
      const cudaError_t set = cudaFuncSetAttribute(
          static_and_dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kind);
      if (set != cudaSuccess) {
        std::snprintf(error, static_cast<size_t>(error_size),
                      "cudaFuncSetAttribute: CUDA error %d", int(set));
        return 1;
      }
    }
    static_and_dynamic_smem_kernel<<<2, kThreads, static_cast<size_t>(arg)>>>(out);
  } else if (test == "cluster_sum" || test == "cluster_2d") {
    const size_t smem = static_cast<size_t>(threads) * sizeof(int);
    if (cluster == 0) {
      cluster_sum_kernel<<<arg, threads, smem>>>(out, kind);
    } else {
      const unsigned y = test == "cluster_2d" ? 2 : 1;
      const cudaError_t launched = launch_clusters(
          cluster_sum_kernel, arg, threads, static_cast<unsigned>(cluster), y, smem, out, kind);
      if (launched != cudaSuccess) {  // refused: the last error too
        const cudaError_t last = cudaGetLastError();
        std::snprintf(error, static_cast<size_t>(error_size),
                      "cudaLaunchKernelEx: CUDA error %d (last error %d): %s", int(launched),
                      int(last), cuda_emu::kernel_error().c_str());
        return 1;
      }
    }
  } else if (test == "divergent_cluster_barrier") {
    launch_clusters(divergent_cluster_barrier_kernel, 4, kThreads, 4, 1, 0, out);
  } else if (test == "cluster_deadlock") {
    launch_clusters(cluster_deadlock_kernel, 2, kThreads, 2, 1, 0, out);
  } else if (test == "map_shared_rank") {
    launch_clusters(map_shared_rank_kernel, 2, 128, 2, 1, 0, out, arg);
  } else if (test == "occupancy") {
    const size_t smem = static_cast<size_t>(kind);
    if (arg & 1) {
      cudaFuncSetAttribute(cluster_sum_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kind);
    }
    const cudaError_t launched = occupancy(out, threads, cluster, smem, (arg & 2) != 0);
    if (launched != cudaSuccess) {
      std::snprintf(error, static_cast<size_t>(error_size), "CUDA error %d: %s", int(launched),
                    cuda_emu::kernel_error().c_str());
      return 1;
    }
  } else {
    std::snprintf(error, static_cast<size_t>(error_size), "no self-test %s", name);
    return 1;
  }
  const cudaError_t last = cudaGetLastError();
  if (last == cudaSuccess) return 0;
  std::snprintf(error, static_cast<size_t>(error_size), "CUDA error %d: %s", int(last),
                cuda_emu::kernel_error().c_str());
  return 1;
}

}  // extern "C"
