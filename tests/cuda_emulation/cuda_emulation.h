// What nvcc and the CUDA runtime would give the kernels of csrc/*.cu, for g++ on the CPU
// (tests/test_cuda_emulation.py). Force-included (-include) before every emulated translation unit.
//
// A launch runs its clusters of blocks (thread-block clusters, cudaLaunchKernelEx; a plain launch
// has clusters of one block) one after another; the threads of a cluster are fibers of one OS
// thread, switched at every barrier (emulator.cpp), so __syncthreads, cluster.sync(), __syncwarp
// and the warp shuffles are exact and deterministic, and a barrier that not every thread reaches
// is reported, not hung on.
// The half types and their conversions are the real cuda_fp16.h / cuda_bf16.h host code; the
// runtime types (dim3, int4, cudaError_t, cudaStream_t) are the toolkit's own.
//
// build.py rewrites what is not C++ before compiling: `k<<<grid, block, smem, stream>>>(args)`
// and `cudaLaunchKernelEx(&config, k, args)` become cuda_emu::launch(...), and `__shared__` /
// `extern __shared__` declarations become references to the block's emulated shared memory
// (poisoned with NaN bytes at its cluster's start and its end, so that a read before any write or
// after the block ended shows).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <math.h>  // float overloads of fma, exp, log in the global namespace, as in device code
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __shared__
#undef __constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// Only for a declaration build.py did not rewrite: one static per kernel instantiation is right
// while clusters of one block run one at a time, just not poisoned.
#define __shared__ static
#define __constant__ static

// The built-in variables, set by the scheduler before it switches to a thread. Read after any
// barrier (an opaque call), so no compiler keeps another thread's value.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

namespace cuda_emu {

using Site = std::source_location;

// Barriers and the warp exchange of the current thread (emulator.cpp).
void syncthreads(const Site& site);
// __syncthreads that returns how many threads of the block passed a nonzero predicate.
int syncthreads_count(int predicate, const Site& site);
void syncwarp(unsigned mask, const Site& site);
// cooperative_groups::this_cluster(): its barrier (every live thread of every block of the
// cluster), the rank of the current block in it and its size in blocks, and the address in block
// `rank`'s shared memory of what `p` points to in the current block's.
void cluster_sync(const Site& site);
unsigned cluster_block_rank();
unsigned cluster_blocks();
void* map_shared_rank(const void* p, int rank, const Site& site);
enum class ShuffleKind : int { Idx, Up, Down, Xor };
uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t bits, int lane_arg, int width,
                 const Site& site);
void threadfence();
// Fails the kernel if p is not aligned to `bytes` (a power of two: the access's size).
void check_alignment(const void* p, size_t bytes, const Site& site);

// Shared memory of the running block: the dynamic buffer, and one buffer per __shared__
// declaration (keyed by its type and place), both poisoned at its cluster's start and when the
// block has ended (a read by another block of the cluster after that shows).
void* dynamic_shared_memory();
void* static_shared_memory(std::type_index type, const char* file, int line, size_t bytes,
                           size_t align);

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_memory());
}

template <typename T>
T& block_shared(const char* file, int line) {
  static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                "__shared__ variables have no constructors");
  return *static_cast<T*>(
      static_shared_memory(std::type_index(typeid(T)), file, line, sizeof(T), alignof(T)));
}

// atomicAdd. Fibers switch only at barriers and shuffles, so no other thread runs between the
// read and the write: a plain read-modify-write is atomic here.
template <typename T>
T atomic_add(T* address, T value, const Site& site) {
  check_alignment(address, sizeof(T), site);  // a misaligned atomic faults on a GPU
  const T old = *address;
  if constexpr (std::is_integral_v<T>) {
    // Wraps around as on a GPU (in C++, where signed overflow is undefined, by unsigned sums).
    using U = std::make_unsigned_t<T>;
    *address = static_cast<T>(static_cast<U>(old) + static_cast<U>(value));
  } else if constexpr (std::is_same_v<T, float>) {
    // atom.add.f32 flushes subnormal inputs and results to sign-preserving zero (SASS:
    // RED/ATOMG.ADD.F32.FTZ.RN); f64 does not.
    const auto flush = [](float x) {
      return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
    };
    *address = flush(flush(old) + flush(value));
  } else {
    *address = old + value;
  }
  return old;
}

template <typename T>
T shuffle_value(ShuffleKind kind, unsigned mask, T value, int lane_arg, int width,
                const Site& site) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "a shuffle moves at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(kind, mask, bits, lane_arg, width, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// One launch: grid, block, dynamic shared memory and stream, as between <<< and >>>, or as a
// cudaLaunchConfig_t of cudaLaunchKernelEx has them, with its cluster dimensions.
struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  dim3 cluster{1, 1, 1};
  bool cluster_attribute = false;   // whether the cluster dimensions were given
  int unsupported_attribute = -1;   // a launch attribute the emulator does not model, if any
  LaunchConfig(dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = nullptr)
      : grid(g), block(b), shared_bytes(smem), stream(s) {}
  explicit LaunchConfig(const cudaLaunchConfig_t& config);
};

// Runs body once per thread of every block (emulator.cpp); a bad configuration sets the error
// that cudaGetLastError returns, as a real launch does. Returns what the launch call returns:
// the error of a refused launch (or an earlier sticky one), else cudaSuccess.
cudaError_t run_grid(const char* where, const char* kernel, const void* entry,
                     const LaunchConfig& config, void (*body)(void*), void* context);

// What `kernel<<<config>>>(args...)` and `cudaLaunchKernelEx(&config, kernel, args...)` become.
// The arguments are converted to the kernel's parameter types once, as at a real launch, and
// every thread gets its own copy.
template <typename... Params, typename... Args>
cudaError_t launch(const char* where, const char* what, const LaunchConfig& config,
                   void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  struct Context {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } context{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  return run_grid(
      where, what, reinterpret_cast<const void*>(kernel), config,
      [](void* p) {
        auto* c = static_cast<Context*>(p);
        std::apply(c->kernel, c->params);
      },
      &context);
}

template <typename... Params, typename... Args>
cudaError_t launch(const char* where, const char* what, const cudaLaunchConfig_t* config,
                   void (*kernel)(Params...), Args&&... args) {
  return launch(where, what, LaunchConfig(*config), kernel, std::forward<Args>(args)...);
}

void set_function_attribute(const void* entry, cudaFuncAttribute attribute, int value,
                            cudaError_t& result);
cudaError_t max_active_clusters(int* clusters, const void* entry, const cudaLaunchConfig_t& config);
cudaError_t take_last_error();
cudaError_t peek_last_error();

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------------
// Device intrinsics.

inline void __syncthreads(const cuda_emu::Site& site = cuda_emu::Site::current()) {
  cuda_emu::syncthreads(site);
}
inline int __syncthreads_count(int predicate,
                               const cuda_emu::Site& site = cuda_emu::Site::current()) {
  return cuda_emu::syncthreads_count(predicate, site);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const cuda_emu::Site& site = cuda_emu::Site::current()) {
  cuda_emu::syncwarp(mask, site);
}
inline void __threadfence() { cuda_emu::threadfence(); }
inline void __threadfence_block() { cuda_emu::threadfence(); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const cuda_emu::Site& site = cuda_emu::Site::current()) {
  return cuda_emu::shuffle_value(cuda_emu::ShuffleKind::Idx, mask, var, src_lane, width, site);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const cuda_emu::Site& site = cuda_emu::Site::current()) {
  return cuda_emu::shuffle_value(cuda_emu::ShuffleKind::Up, mask, var, static_cast<int>(delta),
                                 width, site);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const cuda_emu::Site& site = cuda_emu::Site::current()) {
  return cuda_emu::shuffle_value(cuda_emu::ShuffleKind::Down, mask, var, static_cast<int>(delta),
                                 width, site);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const cuda_emu::Site& site = cuda_emu::Site::current()) {
  return cuda_emu::shuffle_value(cuda_emu::ShuffleKind::Xor, mask, var, lane_mask, width, site);
}

// CUDA's overloads, not a template, so that the value converts to the pointee's type as there.
#define CUDA_EMU_ATOMIC_ADD(T)                                                         \
  inline T atomicAdd(T* address, T value,                                              \
                     const cuda_emu::Site& site = cuda_emu::Site::current()) {         \
    return cuda_emu::atomic_add(address, value, site);                                 \
  }
CUDA_EMU_ATOMIC_ADD(int)
CUDA_EMU_ATOMIC_ADD(unsigned int)
CUDA_EMU_ATOMIC_ADD(unsigned long long)
CUDA_EMU_ATOMIC_ADD(float)
CUDA_EMU_ATOMIC_ADD(double)
#undef CUDA_EMU_ATOMIC_ADD

// Cache-hinted loads and stores: plain ones here, but for the check of the alignment the hardware
// needs (a misaligned vector access faults on a GPU).
#define CUDA_EMU_LOAD(name)                                                             \
  template <typename T>                                                                 \
  T name(const T* p, const cuda_emu::Site& site = cuda_emu::Site::current()) {          \
    cuda_emu::check_alignment(p, sizeof(T), site);                                      \
    return *p;                                                                          \
  }
#define CUDA_EMU_STORE(name)                                                            \
  template <typename T>                                                                 \
  void name(T* p, T v, const cuda_emu::Site& site = cuda_emu::Site::current()) {        \
    cuda_emu::check_alignment(p, sizeof(T), site);                                      \
    *p = v;                                                                             \
  }
CUDA_EMU_LOAD(__ldg)
CUDA_EMU_LOAD(__ldcs)
CUDA_EMU_LOAD(__ldcg)
CUDA_EMU_LOAD(__ldca)
CUDA_EMU_LOAD(__ldlu)
CUDA_EMU_LOAD(__ldcv)
CUDA_EMU_STORE(__stcs)
CUDA_EMU_STORE(__stcg)
CUDA_EMU_STORE(__stwb)
CUDA_EMU_STORE(__stwt)
#undef CUDA_EMU_LOAD
#undef CUDA_EMU_STORE

// Round-to-nearest arithmetic that nvcc never contracts into an fma (build.py compiles with
// -ffp-contract=off, so plain operators are these).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// The device min and max of the CUDA math API (global namespace, overloaded per type).
#define CUDA_EMU_MIN_MAX(T)                           \
  inline T min(T a, T b) { return b < a ? b : a; }  \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MIN_MAX(int)
CUDA_EMU_MIN_MAX(unsigned int)
CUDA_EMU_MIN_MAX(long)
CUDA_EMU_MIN_MAX(unsigned long)
CUDA_EMU_MIN_MAX(long long)
CUDA_EMU_MIN_MAX(unsigned long long)
#undef CUDA_EMU_MIN_MAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---------------------------------------------------------------------------------------------
// Runtime API.

inline cudaError_t cudaGetLastError() { return cuda_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::peek_last_error(); }
inline cudaError_t cudaDeviceSynchronize() { return cuda_emu::peek_last_error(); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cuda_emu::peek_last_error(); }
// Launches run synchronously, so now is its place in the stream's order. Not a launch, but like
// one after an error (run_grid): it writes nothing, and returns the error as cudaStreamSynchronize.
// The stream defaults to 0 in the toolkit's declaration (cuda_runtime_api.h, via cuda_fp16.h).
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  const cudaError_t error = cuda_emu::peek_last_error();
  if (error == cudaSuccess) std::memset(ptr, value, count);
  return error;
}

// The emulated kernels are compiled as for sm_90 (no __CUDA_ARCH__: the cluster code is in).
template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, T*) {
  *attributes = cudaFuncAttributes{};
  attributes->ptxVersion = 90;
  attributes->binaryVersion = 90;
  return cudaSuccess;
}

template <typename T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attribute, int value) {
  cudaError_t result = cudaSuccess;
  cuda_emu::set_function_attribute(reinterpret_cast<const void*>(entry), attribute, value, result);
  return result;
}
// How many clusters of config's size the device holds at once (emulator.cpp models it).
template <typename T>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, T* entry,
                                           const cudaLaunchConfig_t* config) {
  return cuda_emu::max_active_clusters(clusters, reinterpret_cast<const void*>(entry), *config);
}
