// CUDA kernels of fastdml::fused_mutual_loss and fastdml::scale_grad_ (docs/design.md),
// and their launchers. Raw pointers and a stream only: no torch headers, so nvcc compiles the
// files that include this one alone. Each logits dtype has its own translation unit
// (mutual_loss_cuda_{float32,float64,float16,bfloat16}.cu) with the explicit instantiation of its
// launchers (declared in mutual_loss_cuda_launch.cuh), so that they build in parallel;
// mutual_loss_cuda_api.cu holds the public entry points (mutual_loss_cuda.h), which switch on
// the dtype.
//
// Forward (one launch): a team of threads (a warp for short rows, the whole 256-thread block for
// long ones) owns one row r and all K peers of it, so every class's K logits are in one thread's
// registers at once. Pass 1 folds each thread's classes into online (max, sum exp(z - max),
// sum exp((z - max) / T)) per peer (and, for ensemble_logits, the same for the others' mean
// logits), merged across the team by butterfly shuffles and a fixed-order pass over the warps.
// Pass 2 recomputes q, p and the mimicry target per class, accumulates the loss sums and writes
// s[k, r] * gradient: peer k's grad_scale in row r (none: 1; one value, or one per peer and row
// at any strides), times the factors of "mean" (row_factors), read once per row and peer, folded
// into the gradient's coefficients (GradCoefs). The per-class loops are lean: the hot option sets
// (pairwise or ensemble, T = 1 or not, label smoothing or not, the gradient or not) are template
// arguments (FixedOptions), so that no option is tested in the loops; the rest share one kernel
// (RuntimeOptions). In float the exponentials are ex2.approx of max-shifted differences in base 2
// (Log<float>); float64 stays exact. benchmarks/sass_report.py counts what the loops execute.
// The first `cached_iters` vectors each thread reads in pass 1 are kept in shared memory, so a
// row that fits is read from memory once; pass 2 reads the rest again, last read first, so that as
// much of it as possible comes from L2. On sm_90 a block team's row that does not fit goes to a
// thread-block cluster instead (launch_cluster): each CTA caches a chunk of it, all of it, and the
// CTAs combine their per-peer maxima, then their sums, then their loss sums through distributed
// shared memory in rank order (cluster_reduce), so that the row is read once at any length the
// cluster holds. Vector loads and stores (vector_bytes: 16 bytes, 8 with
// many peers) when every row is aligned, scalar ones otherwise. K is a template argument for 2..8
// (two blocks per multiprocessor up to 6 peers, one for 7 and 8, whose registers would spill);
// beyond it, and for float64, a simpler kernel loops over the peers with their statistics in
// shared memory. That kernel alone computes the loss family's options other than their defaults
// (docs/design.md, Other divergences): ce_weight, mimic_unlabeled, a normalizer read on the
// device, and the reverse KL and JSD, whose gradient q (d - <q, d>) needs <q, d> of the whole
// row first: a third pass over it, for each peer, from L1 and L2.
//
// Reductions "sum" and "mean", with no host sync and no launch besides the forward's: the grids
// are at most kMaxBlocksPerSm blocks per multiprocessor, and for "mean" each block counts the
// rows whose target is not ignore_index itself. A reduced loss keeps no per-row terms: each team
// adds its rows' terms, the block its teams', and the last block to finish (a ticket taken with
// atomicAdd, which it resets for the next forward) adds the blocks' sums. Every float sum has a
// fixed order that depends on the shape and the device only, so results are bit-identical run to
// run.
//
// Backward (one launch): a team per row (k, r) reads grad_loss[k, r] and leaves the row alone
// when it is 1; otherwise it multiplies the row by it.

#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mutual_loss_cuda.h"
#include "mutual_loss_cuda_launch.cuh"

namespace fastdml {
namespace gpu {
namespace detail {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxStaticK = 8;
constexpr int kMaxFixedK = 4;  // the most peers with FixedOptions kernels (launch_k)
constexpr unsigned kFullMask = 0xffffffffu;
// Loss sums per peer and row (class_step).
constexpr int kSums = 4;

// ---------------------------------------------------------------------------------------------
// Scalars: float accumulation, double for double.

template <typename S>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename S>
using acc_t = typename AccOf<S>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void from_acc(float x, float& out) { out = x; }
__device__ __forceinline__ void from_acc(double x, double& out) { out = x; }
__device__ __forceinline__ void from_acc(float x, __half& out) { out = __float2half_rn(x); }
__device__ __forceinline__ void from_acc(float x, __nv_bfloat16& out) {
  out = __float2bfloat16_rn(x);
}

// 2^x by the multiprocessor's approximate exponential: ex2.approx.ftz, one MUFU instruction,
// within 2 ulp, subnormal results flushed to 0. Where no GPU runs the code (the CPU emulation of
// these kernels), a model of it at its worst: the exact value rounded to float, flushed as the GPU
// flushes, then moved by 2 ulp, up or down by the last bit of x.
__device__ __forceinline__ float ex2_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = static_cast<float>(std::exp2(static_cast<double>(x)));
  if (!(y >= FLT_MIN)) return y != y ? y : 0.0f;  // NaN stays; subnormal results flush
  if (y == INFINITY) return y;
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return y * ((bits & 1u) ? 1.0f + 0x1p-22f : 1.0f - 0x1p-22f);
#endif
}

// log2(x) by the multiprocessor's approximate logarithm: lg2.approx.ftz, one MUFU instruction,
// within 2^-22 absolute. Elsewhere (the CPU emulation) a model of it at its worst, as ex2_approx.
__device__ __forceinline__ float lg2_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = static_cast<float>(std::log2(static_cast<double>(x < FLT_MIN ? 0.0f : x)));
  if (!std::isfinite(y)) return y;
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return y + ((bits & 1u) ? 0x1p-22f : -0x1p-22f);
#endif
}

// The logarithms the kernels work in: base 2 in float, with ex2_approx and lg2_approx (the
// per-class loops: 2 instructions where expf takes 9); base e in double, exact. A natural log
// times kUnit is in these units; a value in them times kToNatural is a natural log again. The
// once-per-row logs are accurate (acc_log, accurate_log), and so are the per-class logs of the
// divergences other than KL (accurate_log, log1p: docs/design.md, Other divergences).
template <typename A>
struct Log;
template <>
struct Log<float> {
  static constexpr float kUnit = 1.4426950408889634f;  // log2(e)
  static constexpr double kUnitExact = 1.4426950408889634;
  static constexpr float kToNatural = 0.6931471805599453f;
  static constexpr float kLowest = -FLT_MAX;
  static constexpr float kTiny = FLT_MIN;
  __device__ static __forceinline__ float pow(float x) { return ex2_approx(x); }
  __device__ static __forceinline__ float log(float x) { return lg2_approx(x); }
  __device__ static __forceinline__ float accurate_log(float x) { return log2f(x); }
  __device__ static __forceinline__ float log1p(float x) { return log1pf(x) * kUnit; }
};
template <>
struct Log<double> {
  static constexpr double kUnit = 1.0;
  static constexpr double kUnitExact = 1.0;
  static constexpr double kToNatural = 1.0;
  static constexpr double kLowest = -DBL_MAX;
  static constexpr double kTiny = DBL_MIN;
  __device__ static __forceinline__ double pow(double x) { return ::exp(x); }
  __device__ static __forceinline__ double log(double x) { return ::log(x); }
  __device__ static __forceinline__ double accurate_log(double x) { return ::log(x); }
  __device__ static __forceinline__ double log1p(double x) { return ::log1p(x); }
};

// Accurate natural logs, once per row (the cross-entropy's log-sum-exp).
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

// a * b + c * d rounded the same way whatever the order of the two products (no fma contraction),
// so that the two lanes of a butterfly shuffle compute the same value.
__device__ __forceinline__ float sum_of_products(float a, float b, float c, float d) {
  return __fadd_rn(__fmul_rn(a, b), __fmul_rn(c, d));
}
__device__ __forceinline__ double sum_of_products(double a, double b, double c, double d) {
  return __dadd_rn(__dmul_rn(a, b), __dmul_rn(c, d));
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return A(-INFINITY);
}

// IEEE maxima (one instruction) drop a NaN operand; a NaN logit still reaches the loss, through
// the sums of exponentials it is part of.
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }

// Maxima that propagate NaN (max.NaN, one instruction from sm_80 on), for the clamps of the
// per-class logs: a NaN there must reach the loss.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return a != a || b != b ? a + b : fmaxf(a, b);
#endif
}
__device__ __forceinline__ double max_nan(double a, double b) {
  return a != a || b != b ? a + b : fmax(a, b);
}

// ---------------------------------------------------------------------------------------------
// Vectors of VEC consecutive classes: 16 bytes when vectorized, one scalar otherwise.

template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

// The integer type of a Pack's bits, for the cache-hinted loads and stores (none: plain ones).
template <int kBytes>
struct RawOf {
  using type = void;
};
template <>
struct RawOf<16> {
  using type = int4;
};
template <>
struct RawOf<8> {
  using type = int2;
};
template <>
struct RawOf<4> {
  using type = int;
};

// kStream: the data is not read again from memory (evict first).
template <bool kStream, typename S, int VEC>
__device__ __forceinline__ Pack<S, VEC> load_pack(const S* p) {
  using P = Pack<S, VEC>;
  using Raw = typename RawOf<sizeof(P)>::type;
  if constexpr (kStream && !std::is_void_v<Raw>) {
    const Raw raw = __ldcs(reinterpret_cast<const Raw*>(p));
    P out;
    memcpy(&out, &raw, sizeof(P));
    return out;
  } else {
    return *reinterpret_cast<const P*>(p);
  }
}

template <bool kStream, typename S, int VEC>
__device__ __forceinline__ void store_pack(S* p, const Pack<S, VEC>& x) {
  using P = Pack<S, VEC>;
  using Raw = typename RawOf<sizeof(P)>::type;
  if constexpr (kStream && !std::is_void_v<Raw>) {
    Raw raw;
    memcpy(&raw, &x, sizeof(P));
    __stcs(reinterpret_cast<Raw*>(p), raw);
  } else {
    *reinterpret_cast<P*>(p) = x;
  }
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp: max m, s = sum exp(x - m) and (unless unit_t) s_t = sum exp((x - m) / T).
// The exponentials are Log<A>::pow of (x - m) in its units; a_t is 1 / T in them
// (Log<A>::kUnit / T).

template <typename A>
struct LseState {
  A m, s, s_t;

  __device__ __forceinline__ void reset() {
    m = neg_inf<A>();
    s = A(0);
    s_t = A(0);
  }

  // Folds N values with one rescale for all of them.
  template <int N>
  __device__ __forceinline__ void fold(const A (&x)[N], A a_t, bool unit_t) {
    using L = Log<A>;
    A mx = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) mx = max_of(mx, x[i]);
    const A m_new = max_of(m, mx);
    // Only -inf so far: shifted by 0 instead, so that no (-inf) - (-inf) is formed; every
    // exponential is then 0. No branch: the loop stays one basic block.
    const A shift = m_new == neg_inf<A>() ? A(0) : m_new;
    A add = L::pow((x[0] - shift) * L::kUnit);
    A add_t = unit_t ? A(0) : L::pow((x[0] - shift) * a_t);
#pragma unroll
    for (int i = 1; i < N; ++i) {
      const A d = x[i] - shift;
      add += L::pow(d * L::kUnit);
      if (!unit_t) add_t += L::pow(d * a_t);
    }
    const A dm = m - shift;  // -inf on the first fold: the old sums (0) get weight 0
    s = fma(s, L::pow(dm * L::kUnit), add);
    if (!unit_t) s_t = fma(s_t, L::pow(dm * a_t), add_t);
    m = m_new;
  }

  // A resident row's maxima come first: takes N values into m only.
  template <int N>
  __device__ __forceinline__ void take_max(const A (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) m = max_of(m, x[i]);
  }

  // Adds N values at a max m that is already the final one (a resident row: no rescale).
  template <int N>
  __device__ __forceinline__ void add(const A (&x)[N], A a_t, bool unit_t) {
    using L = Log<A>;
    const A shift = m == neg_inf<A>() ? A(0) : m;  // only -inf: every exponential is 0
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const A d = x[i] - shift;
      s += L::pow(d * L::kUnit);
      if (!unit_t) s_t += L::pow(d * a_t);
    }
  }

  // Symmetric in its two operands, bit for bit (see sum_of_products).
  __device__ __forceinline__ void merge(A o_m, A o_s, A o_s_t, A a_t, bool unit_t) {
    using L = Log<A>;
    const A m_new = max_of(m, o_m);
    if (m_new == neg_inf<A>()) return;  // both empty
    s = sum_of_products(s, L::pow((m - m_new) * L::kUnit), o_s, L::pow((o_m - m_new) * L::kUnit));
    if (!unit_t) {
      s_t = sum_of_products(s_t, L::pow((m - m_new) * a_t), o_s_t, L::pow((o_m - m_new) * a_t));
    }
    m = m_new;
  }
};

// ---------------------------------------------------------------------------------------------
// Team reductions. A team is one warp or the whole block (warps == kWarps); every thread of the
// team ends with the same result. scratch holds kWarps * 3 * N values.

// op: A(A, A), commutative (the two lanes of a butterfly get the same value).
template <int N, typename A, typename Op>
__device__ __forceinline__ void team_reduce(A (&v)[N], A* scratch, int warps, const Op& op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = op(v[i], __shfl_xor_sync(kFullMask, v[i], off));
  }
  if (warps > 1) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) scratch[warp * N + i] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A acc = scratch[i];
      for (int w = 1; w < warps; ++w) acc = op(acc, scratch[w * N + i]);
      v[i] = acc;
    }
    __syncthreads();
  }
}

template <typename A>
struct Add {
  __device__ __forceinline__ A operator()(A x, A y) const { return x + y; }
};
template <typename A>
struct Max {
  __device__ __forceinline__ A operator()(A x, A y) const { return max_of(x, y); }
};

template <int N, typename A>
__device__ __forceinline__ void team_sum(A (&v)[N], A* scratch, int warps) {
  team_reduce(v, scratch, warps, Add<A>());
}

template <int N, typename A>
__device__ __forceinline__ void team_lse(LseState<A> (&st)[N], A* scratch, int warps, A a_t,
                                         bool unit_t) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const A o_m = __shfl_xor_sync(kFullMask, st[i].m, off);
      const A o_s = __shfl_xor_sync(kFullMask, st[i].s, off);
      const A o_s_t = __shfl_xor_sync(kFullMask, st[i].s_t, off);
      st[i].merge(o_m, o_s, o_s_t, a_t, unit_t);
    }
  }
  if (warps > 1) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        A* dst = scratch + (warp * N + i) * 3;
        dst[0] = st[i].m;
        dst[1] = st[i].s;
        dst[2] = st[i].s_t;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      LseState<A> acc{scratch[i * 3], scratch[i * 3 + 1], scratch[i * 3 + 2]};
      for (int w = 1; w < warps; ++w) {
        const A* src = scratch + (w * N + i) * 3;
        acc.merge(src[0], src[1], src[2], a_t, unit_t);
      }
      st[i] = acc;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90 on): the CTAs of a cluster share a row, each holding a chunk of it
// in its shared memory, and exchange their partial statistics through distributed shared memory.
// The launchers launch clusters only where the device has them (DeviceInfo::clusters); for older
// architectures the cluster code compiles to nothing.

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define FASTDML_CLUSTERS 1
constexpr bool kHasClusters = true;
#else
constexpr bool kHasClusters = false;
#endif
// The most CTAs of a cluster without opting into non-portable sizes.
constexpr int kMaxClusterCtas = 8;

// Every thread of every CTA of the cluster waits here for all the others.
__device__ __forceinline__ void cluster_sync() {
#ifdef FASTDML_CLUSTERS
  cooperative_groups::this_cluster().sync();
#endif
}

// The address p (in this CTA's shared memory) has in the shared memory of the cluster's CTA `rank`.
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {
#ifdef FASTDML_CLUSTERS
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

// Every thread of every one of the cluster's `ctas` CTAs calls it, v the same in all the threads of
// a CTA; every thread ends with op over the CTAs' v in rank order, the same in every CTA.
// exchange and merged: N values each in shared memory.
template <int N, typename A, typename Op>
__device__ __forceinline__ void cluster_reduce(A (&v)[N], A* exchange, A* merged, int ctas,
                                               const Op& op) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) exchange[i] = v[i];
  }
  cluster_sync();  // every CTA's values are in place
  for (int i = threadIdx.x; i < N; i += kThreads) {
    A acc = *cluster_peer(exchange + i, 0);
    for (int c = 1; c < ctas; ++c) acc = op(acc, *cluster_peer(exchange + i, c));
    merged[i] = acc;
  }
  cluster_sync();  // every CTA is done reading `exchange` (the next call rewrites it), and `merged`
                   // is visible to the whole CTA
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = merged[i];
}

__device__ __forceinline__ void team_barrier(int warps) {
  if (warps > 1) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Problem description and the per-class math shared by both forward kernels.

template <typename A>
struct KernelArgs {
  const void* logits;
  int64_t stride_k, stride_r;
  const int64_t* target;
  int64_t target_stride;
  const A* weights;
  const A* row_scale;  // [K, R] at these strides (both 0: one value), or null; see grad_scale
  int64_t scale_stride_k, scale_stride_r;
  // Reduction None: each row's terms [K, R]; else the loss (0-dim) and each peer's cross-entropy
  // and mimicry [K].
  A* loss;
  A* ce;
  A* mimicry;
  void* grad;
  int64_t K, R, C;
  LossMode mode;
  LossReduction reduction;
  unsigned* ticket;  // reduced: the blocks done (zero before the launch, reset by its last block)
  A* block_sums;     // reduced: [gridDim.x][K][2], each block's sums of cross-entropy, mimicry
  A a_t;         // 1 / T in the units of Log<A> (exactly Log<A>::kUnit when unit_t)
  A alpha_t;     // alpha * T: the mimicry gradient's factor
  A alpha_t2;    // alpha * T^2: the mimicry loss's factor
  A eps;         // label smoothing
  A eps_over_c;  // eps / C
  A inv_km1;     // 1 / (K - 1)
  A u_scale;     // 1 / ((K - 1) T): the ensemble_logits target's logits per sum of others
  bool unit_t, smoothing, compute_grad;
  int64_t ignore_index;
  int warps_per_team;  // 1 or kWarps
  int cached_iters;    // vectors per thread and peer kept in shared memory (fast kernel)
  int cluster;         // CTAs per row (a cluster of them; 1: none), each caching a chunk of it
  int64_t chunks;      // split forward: chunks per row
  A* partials;         // split forward: [R][chunks][K][kPartialValues]
  // The loss family (MutualLossParams). Only the any-K kernels compute options other than the
  // defaults (family_options): the launchers leave the fixed-K kernels out for them.
  LossDivergence divergence;
  A ce_weight;
  bool mimic_unlabeled;
  const A* normalizer;
  A beta, one_minus_beta;             // the JSD's
  A log_beta, log_one_minus_beta;     // in the units of Log<A>
};

// The options the per-class loops test. FixedOptions makes them compile-time constants, so that
// no test of them is left in the loop (the hot option sets: each has a kernel of its own);
// RuntimeOptions reads them from the arguments (one kernel for every other set).
template <LossMode kMode, bool kUnitT, bool kSmoothing, bool kGrad>
struct FixedOptions {
  template <typename A>
  __device__ static constexpr LossMode mode(const KernelArgs<A>&) {
    return kMode;
  }
  template <typename A>
  __device__ static constexpr bool unit_t(const KernelArgs<A>&) {
    return kUnitT;
  }
  template <typename A>
  __device__ static constexpr bool smoothing(const KernelArgs<A>&) {
    return kSmoothing;
  }
  template <typename A>
  __device__ static constexpr bool grad(const KernelArgs<A>&) {
    return kGrad;
  }
};

struct RuntimeOptions {
  template <typename A>
  __device__ static LossMode mode(const KernelArgs<A>& a) {
    return a.mode;
  }
  template <typename A>
  __device__ static bool unit_t(const KernelArgs<A>& a) {
    return a.unit_t;
  }
  template <typename A>
  __device__ static bool smoothing(const KernelArgs<A>& a) {
    return a.smoothing;
  }
  template <typename A>
  __device__ static bool grad(const KernelArgs<A>& a) {
    return a.compute_grad;
  }
};

// Per-peer statistics of a row after pass 1. With d = z - m, in the units of Log<A>:
// log q = d a_t - b and log p = d kUnit - bs (p = softmax(z), q = softmax(z / T)).
template <typename A>
struct PeerRow {
  A m;    // max of z
  A ls;   // log sum exp(z - m), natural (the cross-entropy)
  A b;    // log sum exp((z - m) / T), in units (= bs when T = 1)
  A bs;   // log sum exp(z - m), in units
  A mu;   // ensemble_logits: max of the target's logits u
  A lsu;  //                  log sum exp(u - mu), natural
};

template <typename A>
__device__ __forceinline__ PeerRow<A> finish_row(const LseState<A>& st, const LseState<A>& su,
                                                 bool unit_t) {
  const A bs = Log<A>::accurate_log(st.s);
  return {st.m, acc_log(st.s), unit_t ? bs : Log<A>::accurate_log(st.s_t), bs, su.m, acc_log(su.s)};
}

// The gradient of peer k at one class with its two terms' scales s and m in its row (term_scales),
// s (p - (1 - eps) onehot - eps / C) + m alpha T (w_k q - t), is c_p p + c_q q + c_t t plus `on`
// at the label and `off` elsewhere; with T = 1, p = q and c_q holds c_p. (divergence_coefs: the
// same form for the other divergences.)
template <typename A>
struct GradCoefs {
  A c_p, c_q, c_t, on, off;
};

// grad_scale of peer k in row r: row_scale[k, r] (none: 1). Read once per row and peer.
template <typename A>
__device__ __forceinline__ A grad_scale(const KernelArgs<A>& a, int64_t k, int64_t r) {
  if (a.row_scale == nullptr) return A(1);
  return a.row_scale[k * a.scale_stride_k + r * a.scale_stride_r];
}

// ---------------------------------------------------------------------------------------------
// Reductions "sum" and "mean" (see the top of this file).

// A thread's count summed over its warp (every lane gets it).
__device__ __forceinline__ long long warp_count(long long n) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) n += __shfl_xor_sync(kFullMask, n, off);
  return n;
}

// Whether row r's target counts for the mean.
template <typename A>
__device__ __forceinline__ bool counted_row(const KernelArgs<A>& a, int64_t r) {
  return a.target[r * a.target_stride] != a.ignore_index;
}

// The rows whose target is not ignore_index, counted by the whole block of kThreads (every thread
// calls it): each thread's rows first, with no barrier between their loads, then one block sum.
template <typename A>
__device__ __forceinline__ long long count_rows_in_block(const KernelArgs<A>& a) {
  __shared__ long long warp_counts[kWarps];
  long long n = 0;
  // Four independent loads in flight a thread (every block reads all the targets).
  int64_t r = threadIdx.x;
  for (; r + 3 * kThreads < a.R; r += 4 * kThreads) {
    const bool c0 = counted_row(a, r), c1 = counted_row(a, r + kThreads);
    const bool c2 = counted_row(a, r + 2 * kThreads), c3 = counted_row(a, r + 3 * kThreads);
    n += int(c0) + int(c1) + int(c2) + int(c3);
  }
  for (; r < a.R; r += kThreads) n += counted_row(a, r);
  n = warp_count(n);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = n;
  __syncthreads();
  long long total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_counts[w];
  return total;
}

// A value for each of the loss's two terms: the cross-entropy and the mimicry.
template <typename A>
struct PerTerm {
  A ce, mimicry;
};

// What the rows' terms and their gradients are multiplied by besides grad_scale and the
// cross-entropy's weight. For "mean": 1 / normalizer (NaN where it is not positive: a host check
// would need a sync), or 1 / the rows each term covers (at least 1): the labeled rows (target not
// ignore_index) for the cross-entropy, and for the mimicry those too, or every row with
// mimic_unlabeled. Else 1. Every thread of the block calls it. Each block counts the rows itself,
// so that nothing runs before the forward; the forward's grids are at most the blocks a device
// holds at once, so the targets are read from L2 that many times at most.
template <typename A>
__device__ __forceinline__ PerTerm<A> row_factors(const KernelArgs<A>& a) {
  if (a.reduction != LossReduction::Mean) return {A(1), A(1)};
  if (a.normalizer != nullptr) {
    const A n = *a.normalizer;
    const A f = n > A(0) ? A(1) / n : A(NAN);
    return {f, f};
  }
  const A ce = A(1) / static_cast<A>(max(count_rows_in_block(a), 1LL));
  return {ce, a.mimic_unlabeled ? A(1) / static_cast<A>(max(a.R, int64_t(1))) : ce};
}

// Every thread of a block calls it once it is done: whether it is the last of the grid's blocks
// to be done, all the others' writes then visible to it.
__device__ __forceinline__ bool last_block_done(unsigned* ticket) {
  __shared__ int last;
  __threadfence();  // each thread's writes are visible to every block ...
  __syncthreads();  // ... before the block takes its ticket
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// A reduced loss keeps no per-row terms: each team adds its rows' cross-entropy and mimicry per
// peer, in its rows' order, into team_sums (its [K][2], in shared memory, written by the team's
// first thread: write_outputs and fill_row). Every thread of every block of a forward kernel calls
// this after the block's last row: the block adds its `teams` teams' sums in slot order into
// a.block_sums; the last block adds the blocks' in block order, times `factors` (row_factors),
// writes the outputs and resets the ticket for the next forward. The order depends on the shape
// and the device only: results are bit-identical run to run.
template <typename A>
__device__ __forceinline__ void reduce_if_last_block(const KernelArgs<A>& a, const A* team_sums,
                                                     int teams, PerTerm<A> factors) {
  if (a.reduction == LossReduction::None) return;
  const int n = 2 * static_cast<int>(a.K);
  __syncthreads();  // every team's sums are written
  for (int i = threadIdx.x; i < n; i += kThreads) {
    A sum = team_sums[i];
    for (int t = 1; t < teams; ++t) sum += team_sums[t * n + i];
    a.block_sums[static_cast<int64_t>(blockIdx.x) * n + i] = sum;
  }
  if (!last_block_done(a.ticket)) return;
  // A warp per value: lane l adds blocks l, l + 32, ... in order, then the warp's butterfly.
  const int lane = threadIdx.x & 31;
  for (int i = threadIdx.x >> 5; i < n; i += kWarps) {
    A sum = 0;
    for (unsigned b = lane; b < gridDim.x; b += 32) sum += __ldcg(a.block_sums + b * n + i);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
    if (lane == 0) {
      if (i % 2 == 0) {
        a.ce[i / 2] = sum * factors.ce;
      } else {
        a.mimicry[i / 2] = sum * factors.mimicry;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A loss = 0;
    for (int64_t k = 0; k < a.K; ++k) loss += a.ce_weight * a.ce[k] + a.alpha_t2 * a.mimicry[k];
    *a.loss = loss;
    *a.ticket = 0;
  }
}

// W[k, j] of the mimicry (the diagonal never counts: it adds KL(q_k || q_k) = 0).
template <typename O, typename A>
__device__ __forceinline__ A peer_weight(const KernelArgs<A>& a, const A* w, int K, int k, int j) {
  if (j == k) return A(0);
  return O::mode(a) == LossMode::Weights ? w[k * K + j] : a.inv_km1;
}

// w_k = sum_{j != k} W[k, j], the weight of q_k in peer k's mimicry gradient (1 if uniform).
template <typename O, typename A>
__device__ __forceinline__ A own_weight(const KernelArgs<A>& a, const A* w, int K, int k) {
  if (O::mode(a) != LossMode::Weights) return A(1);
  A sum = 0;
  for (int j = 0; j < K; ++j) sum += peer_weight<O>(a, w, K, k, j);
  return sum;
}

// sum_{j != k} x_j as a prefix plus a suffix sum, never total - own (NaN at -inf, and it cancels
// where peer k dominates). The same order as the CPU op and the reference. Each partial sum
// starts at its first term (not at 0 + it), so that with K and k known at compile time the
// compiler shares the partial sums of all k: about 2 additions per peer and class.
template <typename A, typename Get>
__device__ __forceinline__ A sum_others(int K, int k, const Get& x) {
  A prefix = 0, suffix = 0;
#pragma unroll
  for (int j = 0; j < k; ++j) prefix = j == 0 ? x(0) : prefix + x(j);
#pragma unroll
  for (int j = K - 1; j > k; --j) suffix = j == K - 1 ? x(j) : suffix + x(j);
  if (k == 0) return suffix;
  return k == K - 1 ? prefix : prefix + suffix;
}

// The mimicry target of peer k at one class: t_k / target_scale, given each peer's q (get_q) and
// logit (get_z); inv_km1 is 1 / (K - 1) (a constant where K is). For ensemble_logits also sets
// lt = log t_k in the units of Log<A>.
template <typename O, typename A, typename GetQ, typename GetZ>
__device__ __forceinline__ A peer_target(const KernelArgs<A>& a, const A* w, int K, int k,
                                         A inv_km1, const GetQ& get_q, const GetZ& get_z,
                                         const PeerRow<A>& pr, A& lt) {
  switch (O::mode(a)) {
    case LossMode::Weights: {
      A acc = 0;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        if (j != k) acc = fma(w[k * K + j], get_q(j), acc);
      }
      return acc;
    }
    case LossMode::EnsembleLogits:
      lt = ((sum_others<A>(K, k, get_z) * a.u_scale - pr.mu) - pr.lsu) * Log<A>::kUnit;
      return Log<A>::pow(lt);
    case LossMode::Pairwise:  // unscaled: target_scale
      return sum_others<A>(K, k, get_q);
    default:
      return sum_others<A>(K, k, get_q) * inv_km1;
  }
}

// What peer_target leaves out of t_k: 1 / (K - 1) in pairwise mode (folded into the gradient's
// coefficient and the loss sum, one multiplication a row instead of one a class), else 1.
template <typename O, typename A>
__device__ __forceinline__ A target_scale(const KernelArgs<A>& a) {
  return O::mode(a) == LossMode::Pairwise ? a.inv_km1 : A(1);
}

// The factors of peer k's two terms in row r in its gradient, when that is computed:
// grad_scale times `factors` (row_factors), and for the cross-entropy its weight, or 0 in a row
// without a label.
template <typename O, typename A>
__device__ __forceinline__ PerTerm<A> term_scales(const KernelArgs<A>& a, int64_t k, int64_t r,
                                                  PerTerm<A> factors, bool labeled) {
  const A s = O::grad(a) ? grad_scale(a, k, r) : A(1);
  return {labeled ? s * a.ce_weight * factors.ce : A(0), s * factors.mimicry};
}

// Peer k's gradient coefficients in a row, given its term_scales. w_k: the weight of q_k in the
// KL's gradient (own_weight); c_t is that of what peer_target returns (target_scale).
template <typename O, typename A>
__device__ __forceinline__ GradCoefs<A> grad_coefs(const KernelArgs<A>& a, A w_k,
                                                   PerTerm<A> scales) {
  const A s = scales.ce, m = scales.mimicry;
  const A off = -s * a.eps_over_c;
  return {s, fma(m, a.alpha_t * w_k, O::unit_t(a) ? s : A(0)), -m * a.alpha_t * target_scale<O>(a),
          off - s * (A(1) - a.eps), off};
}

// The coefficients of the other divergences (the any-K kernels). Their mimicry's gradient is
// alpha T factor q (d - <q, d>) (factor 1, or 1 - beta for the JSD), with d and inner = <q, d> in
// the units of Log<A>: c_t t + c_q q with t = q d.
template <typename A>
__device__ __forceinline__ GradCoefs<A> divergence_coefs(const KernelArgs<A>& a,
                                                         PerTerm<A> scales, A inner) {
  GradCoefs<A> gc = grad_coefs<RuntimeOptions>(a, A(0), {scales.ce, A(0)});
  const A factor = a.divergence == LossDivergence::JSD ? a.one_minus_beta : A(1);
  gc.c_t = scales.mimicry * a.alpha_t * factor * Log<A>::kToNatural;
  gc.c_q = fma(-gc.c_t, inner, gc.c_q);
  return gc;
}

// s * the gradient of peer k at one class (GradCoefs), given d = z - m, q and t.
template <typename O, typename A>
__device__ __forceinline__ A class_grad(const KernelArgs<A>& a, const PeerRow<A>& pr,
                                        const GradCoefs<A>& gc, bool is_label, A d, A q, A t) {
  // The label's term joins before the cast to a narrower dtype (p - 1 cancels at p ~ 1).
  A g = fma(gc.c_q, q, fma(gc.c_t, t, is_label ? gc.on : gc.off));
  if (!O::unit_t(a)) g = fma(gc.c_p, Log<A>::pow(fma(d, Log<A>::kUnit, -pr.bs)), g);
  return g;
}

// One class of peer k in pass 2, given d = z - m, l = log q (units; q = Log<A>::pow(l)), the
// target t and, for ensemble_logits, lt = log t (units). Adds to the loss sums, in units:
// sums[0]: sum q log q, or the KL for the ensemble modes; sums[1]: sum t log q; sums[2]: sum d;
// sums[3]: the mass of t where the logit is -inf (q = 0), where the KL is infinite. log q is
// clamped at the lowest finite value, and t at the smallest normal before its log, so that 0 log 0
// adds 0 and one FMA adds a term; sums[3] restores the infinite KL the clamp hides. Returns
// s * gradient (s: the row's scale).
template <typename O, typename A>
__device__ __forceinline__ A class_step(const KernelArgs<A>& a, const PeerRow<A>& pr,
                                        const GradCoefs<A>& gc, bool is_label, A d, A l, A q,
                                        A t, A lt, A* sums) {
  using L = Log<A>;
  const A lc = max_nan(l, L::kLowest);
  switch (O::mode(a)) {
    case LossMode::Pairwise:
    case LossMode::Weights:
      sums[0] = fma(q, lc, sums[0]);
      sums[1] = fma(t, lc, sums[1]);
      break;
    case LossMode::Ensemble:
      // t below the smallest normal counts as it (lg2.approx flushes subnormals): t log t of 0.
      sums[0] = fma(t, L::log(max_of(t, L::kTiny)) - lc, sums[0]);
      break;
    case LossMode::EnsembleLogits:
      sums[0] = fma(t, max_nan(lt, L::kLowest) - lc, sums[0]);
      break;
  }
  if (d == neg_inf<A>()) sums[3] += t;  // a -inf logit (not a finite one whose l overflows)
  if (O::smoothing(a)) sums[2] += d;
  if (!O::grad(a)) return A(0);
  return class_grad<O>(a, pr, gc, is_label, d, q, t);
}

// Stores peer k's loss terms of row r (reduction None), or adds them to its team's sums
// (team_sums, see reduce_if_last_block). The team's first thread calls it.
template <typename A>
__device__ __forceinline__ void put_terms(const KernelArgs<A>& a, A* team_sums, int64_t k,
                                          int64_t r, A ce, A mimicry) {
  if (a.reduction == LossReduction::None) {
    const int64_t i = k * a.R + r;
    a.ce[i] = ce;
    a.mimicry[i] = mimicry;
    a.loss[i] = a.ce_weight * ce + a.alpha_t2 * mimicry;
  } else {
    team_sums[2 * k] += ce;
    team_sums[2 * k + 1] += mimicry;
  }
}

// Peer k's loss terms of row r from its reduced sums (sums_of(j) gives peer j's four sums), put
// by put_terms. z_label: the label's logit, read by the caller where with_ce (else the
// cross-entropy is 0: a row without a label, or a weight of 0, when not even 0 * inf is formed).
// The other divergences' sums are block_divergence_sums'.
template <typename O, typename A, typename SumsOf>
__device__ __forceinline__ void write_outputs(const KernelArgs<A>& a, A* team_sums, const A* w,
                                              int K, int k, int64_t r, const PeerRow<A>& pr,
                                              bool with_ce, A z_label, const SumsOf& sums_of) {
  const A* own = sums_of(k);
  A ce = A(0);
  if (with_ce) {
    ce = (A(1) - a.eps) * ((pr.m - z_label) + pr.ls);
    // Skipped at eps = 0 so that -inf logits of other classes keep the loss finite.
    if (O::smoothing(a)) ce += a.eps * (pr.ls - own[2] / static_cast<A>(a.C));
  }
  A mimicry = own[0];
  if (a.divergence != LossDivergence::KL) {
    if (a.divergence == LossDivergence::JSD) {
      mimicry = a.beta * own[1] + a.one_minus_beta * own[0];
    }
  } else if (O::mode(a) == LossMode::Pairwise || O::mode(a) == LossMode::Weights) {
    mimicry = -own[1] * target_scale<O>(a);
    for (int j = 0; j < K; ++j) {
      if (j != k) mimicry += peer_weight<O>(a, w, K, k, j) * sums_of(j)[0];
    }
  }
  mimicry *= Log<A>::kToNatural;
  if (own[3] > A(0)) mimicry += INFINITY;
  put_terms(a, team_sums, k, r, ce, mimicry);
}

// Rows that are ignored (value 0) or whose target is out of range (NaN): no logits are read. The
// caller's vectors v0, v0 + nt, ... < v1 of the gradient are filled; `puts`: it puts the terms.
template <typename S, int VEC, typename A>
__device__ void fill_row(const KernelArgs<A>& a, A* team_sums, int64_t r, A value, bool puts,
                         int64_t v0, int64_t v1, int nt) {
  if (puts) {
    for (int64_t k = 0; k < a.K; ++k) put_terms(a, team_sums, k, r, value, value);
  }
  if (!a.compute_grad) return;
  Pack<S, VEC> x;
#pragma unroll
  for (int e = 0; e < VEC; ++e) from_acc(value, x.v[e]);
  for (int64_t k = 0; k < a.K; ++k) {
    S* g = static_cast<S*>(a.grad) + (k * a.R + r) * a.C;
    for (int64_t v = v0; v < v1; v += nt) store_pack<true, S, VEC>(g + v * VEC, x);
  }
}

// Loads are batched so that each thread has several vector loads in flight.
template <int KT>
struct BatchOf {
  static constexpr int value = KT <= 2 ? 2 : 1;
};

// Calls body(v, x) for the vectors v = v0, v0 + nt, ... < end of the KT rows row0 + k * stride
// (elements), x[k] holding row k's vector v; kReverse: from the last one down (pass 2 then first
// re-reads what pass 1 read last, which is the likeliest to be still in L2).
template <int VEC, int KT, bool kStream, bool kReverse, typename S, typename Body>
__device__ __forceinline__ void for_each_vector(const S* row0, int64_t stride, int64_t v0,
                                                int64_t end, int nt, const Body& body) {
  constexpr int B = BatchOf<KT>::value;
  const int64_t n = end > v0 ? (end - v0 + nt - 1) / nt : 0;
  // v steps through the vectors (an induction variable: no index is multiplied in the loop).
  const int64_t step = kReverse ? -nt : nt;
  int64_t v = kReverse ? v0 + (n - 1) * nt : v0;
  for (int64_t i = 0; i < n; i += B, v += B * step) {
    Pack<S, VEC> x[B][KT];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      if (i + b < n) {
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          x[b][k] = load_pack<kStream, S, VEC>(row0 + k * stride + (v + b * step) * VEC);
        }
      }
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
      if (i + b < n) body(v + b * step, x[b]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, K = KT in 2..8.

// Blocks per multiprocessor the kernel is built for: two (128 registers a thread) up to 6 peers;
// one beyond, where the values of 7 or 8 peers need 150 to 200 registers (ptxas, sm_90) and two
// blocks spilled 50 to 700 bytes of them to local memory.
template <int KT>
constexpr int blocks_per_sm() {
  return KT >= 7 ? 1 : 2;
}

// The per-row values pass 2 reads for each peer: its statistics and gradient coefficients.
template <typename A>
struct PeerPass2 {
  PeerRow<A> row;
  GradCoefs<A> coefs;
};

// O: FixedOptions (a hot option set) or RuntimeOptions. kClustered: launched in clusters of
// a.cluster CTAs (launch_cluster), a kernel of its own so that its registers are its own.
template <typename S, int KT, int VEC, typename O, bool kClustered>
__global__ void __launch_bounds__(kThreads, blocks_per_sm<KT>())
    mutual_loss_kernel(const KernelArgs<acc_t<S>> a) {
  using A = acc_t<S>;
  using L = Log<A>;
  using P = Pack<S, VEC>;
  __shared__ A scratch[kWarps * kSums * KT];
  __shared__ A w[KT * KT];
  // With many peers, registers run out (spills): the per-peer values of the row then live in
  // shared memory, one set per team.
  constexpr bool kRowsInSmem = KT >= 5;
  __shared__ PeerPass2<A> peers_smem[kRowsInSmem ? kWarps * KT : 1];
  PeerPass2<A> peers_regs[kRowsInSmem ? 1 : KT];
  extern __shared__ int4 dyn_smem[];
  // row_factors, read where they are used rather than held in registers through the rows.
  __shared__ PerTerm<A> factors;
  __shared__ A team_sums_smem[kWarps * 2 * KT];  // reduced: each team's sums (put_terms)
  __shared__ A cluster_smem[2][kSums * KT];      // a cluster's exchange (cluster_reduce)
  constexpr A kInvKm1 = static_cast<A>(1.0 / (KT - 1));

  if (O::mode(a) == LossMode::Weights) {
    for (int i = threadIdx.x; i < KT * KT; i += kThreads) w[i] = a.weights[i];
  }
  for (int i = threadIdx.x; i < kWarps * 2 * KT; i += kThreads) team_sums_smem[i] = A(0);
  const PerTerm<A> f = row_factors(a);
  if (threadIdx.x == 0) factors = f;
  __syncthreads();

  const int nt = a.warps_per_team * 32;
  const int slot = threadIdx.x / nt;
  const int tid = threadIdx.x - slot * nt;
  const int teams = kThreads / nt;
  const int64_t nv = a.C / VEC;
  P* const cache =
      reinterpret_cast<P*>(dyn_smem) + static_cast<int64_t>(slot) * a.cached_iters * KT * nt;
  A* const team_sums = team_sums_smem + slot * 2 * KT;
  PeerPass2<A>* pp;
  if constexpr (kRowsInSmem) {
    pp = peers_smem + slot * KT;
  } else {
    pp = peers_regs;
  }

  // The rows (a function of their own, so that a cluster kernel compiles to nothing where the
  // architecture has no clusters).
  const auto rows = [&]() {
    // A cluster of `ctas` CTAs (a team each) owns a row: CTA `rank` its vectors [v0, v1), all of
    // them in its shared memory (the launcher sized the cache so), the row's maxima taken before
    // its sums. Without a cluster, a team owns a row, and its first v_cached vectors are cached.
    // The passes index the CTA's chunk from 0 (vectors v0 + v): the cluster kernel's loops are
    // the other's, with no register more.
    const int ctas = kClustered ? a.cluster : 1;
    const int rank = kClustered ? static_cast<int>(blockIdx.x % ctas) : 0;
    const int64_t chunk = kClustered ? (nv + ctas - 1) / ctas : nv;
    const int64_t v0 = kClustered ? min(nv, rank * chunk) : 0;
    const int64_t v1 = kClustered ? min(nv, v0 + chunk) : nv;
    const int64_t n = v1 - v0;
    const int64_t v_cached = min(n, static_cast<int64_t>(a.cached_iters) * nt);
    // The cache slot of vector v of peer k.
    const auto cached = [&](int64_t v, int k) -> P& {
      return cache[(v - tid) * KT + k * nt + tid];
    };
    for (int64_t r = static_cast<int64_t>(blockIdx.x / ctas) * teams + slot; r < a.R;
         r += static_cast<int64_t>(gridDim.x / ctas) * teams) {
      const int64_t y = a.target[r * a.target_stride];
      if (y == a.ignore_index || y < 0 || y >= a.C) {
        fill_row<S, VEC>(a, team_sums, r, y == a.ignore_index ? A(0) : A(NAN),
                         tid == 0 && rank == 0, v0 + tid, v1, nt);
        continue;
      }
      // Peer k's logits at row0 + k * a.stride_k, its gradient at grad0 + k * R * C: a base and a
      // stride, not KT pointers (registers); chunk0 and grad0 start at the CTA's chunk.
      const S* const row0 = static_cast<const S*>(a.logits) + r * a.stride_r;
      const S* const chunk0 = row0 + v0 * VEC;

      // Pass 1: the log-sum-exps.
      LseState<A> lse[KT], lse_u[KT];
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        lse[k].reset();
        lse_u[k].reset();
      }
      // Calls f(state, values, a_t, unit_t) for each log-sum-exp of pass 1 at a vector: each
      // peer's, of its logits, and for ensemble_logits its target's, of the others' mean logits.
      const auto for_each_lse = [&](const P(&x)[KT], const auto& f) {
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          A z[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) z[e] = to_acc(x[k].v[e]);
          f(lse[k], z, a.a_t, O::unit_t(a));
        }
        if (O::mode(a) == LossMode::EnsembleLogits) {
#pragma unroll
          for (int k = 0; k < KT; ++k) {
            A u[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              u[e] = sum_others<A>(KT, k, [&](int j) { return to_acc(x[j].v[e]); }) * a.u_scale;
            }
            f(lse_u[k], u, L::kUnit, true);
          }
        }
      };
      const auto fold = [&](int64_t, const P(&x)[KT]) {
        for_each_lse(x, [](LseState<A>& st, const A(&vals)[VEC], A a_t, bool unit_t) {
          st.fold(vals, a_t, unit_t);
        });
      };
      if constexpr (!kClustered) {
        const auto cache_and_fold = [&](int64_t v, const P(&x)[KT]) {
#pragma unroll
          for (int k = 0; k < KT; ++k) cached(v, k) = x[k];
          fold(v, x);
        };
        for_each_vector<VEC, KT, true, false>(chunk0, a.stride_k, tid, v_cached, nt,
                                              cache_and_fold);
        for_each_vector<VEC, KT, false, false>(chunk0, a.stride_k, v_cached + tid, n, nt, fold);
        team_lse(lse, scratch, a.warps_per_team, a.a_t, O::unit_t(a));
        if (O::mode(a) == LossMode::EnsembleLogits) {
          team_lse(lse_u, scratch, a.warps_per_team, L::kUnit, true);
        }
      } else {
        // The chunk is resident: its maxima first, then the sums at the row's maxima.
        const auto cache_and_max = [&](int64_t v, const P(&x)[KT]) {
#pragma unroll
          for (int k = 0; k < KT; ++k) cached(v, k) = x[k];
          for_each_lse(x, [](LseState<A>& st, const A(&vals)[VEC], A, bool) { st.take_max(vals); });
        };
        for_each_vector<VEC, KT, true, false>(chunk0, a.stride_k, tid, n, nt, cache_and_max);
        A maxima[2 * KT];
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          maxima[k] = lse[k].m;
          maxima[KT + k] = lse_u[k].m;
        }
        team_reduce(maxima, scratch, kWarps, Max<A>());
        cluster_reduce(maxima, cluster_smem[0], cluster_smem[1], ctas, Max<A>());
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          lse[k].m = maxima[k];
          lse_u[k].m = maxima[KT + k];
        }
        const auto add_at_max = [&](int64_t v) {
          P x[KT];
#pragma unroll
          for (int k = 0; k < KT; ++k) x[k] = cached(v, k);
          for_each_lse(x, [](LseState<A>& st, const A(&vals)[VEC], A a_t, bool unit_t) {
            st.add(vals, a_t, unit_t);
          });
        };
        for (int64_t v = tid; v < n; v += nt) add_at_max(v);
        A sums[3 * KT];
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          sums[k] = lse[k].s;
          sums[KT + k] = lse[k].s_t;
          sums[2 * KT + k] = lse_u[k].s;
        }
        team_sum(sums, scratch, kWarps);
        cluster_reduce(sums, cluster_smem[0], cluster_smem[1], ctas, Add<A>());
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          lse[k].s = sums[k];
          lse[k].s_t = sums[KT + k];
          lse_u[k].s = sums[2 * KT + k];
        }
      }
      const auto finish = [&](int k) {
        pp[k] = {finish_row(lse[k], lse_u[k], O::unit_t(a)),
                 grad_coefs<O>(a, own_weight<O>(a, w, KT, k),
                               term_scales<O>(a, k, r, factors, true))};
      };
      if constexpr (kRowsInSmem) {
        team_barrier(a.warps_per_team);  // the team is done with the previous row's values
        if (tid == 0) {
#pragma unroll
          for (int k = 0; k < KT; ++k) finish(k);
        }
        team_barrier(a.warps_per_team);
      } else {
#pragma unroll
        for (int k = 0; k < KT; ++k) finish(k);
      }

      // Pass 2: loss sums and the gradient.
      A sums[kSums * KT];
#pragma unroll
      for (int i = 0; i < kSums * KT; ++i) sums[i] = A(0);
      S* const grad0 = O::grad(a) ? static_cast<S*>(a.grad) + r * a.C + v0 * VEC : nullptr;
      const int64_t grad_stride = a.R * a.C;
      // The label's place in the chunk; C < 2^31 (the launcher's check): 32-bit compares.
      const int y32 = static_cast<int>(y - v0 * VEC);
      const auto emit = [&](int64_t v, const P(&x)[KT]) {
        P g[KT];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          A z[KT], d[KT], l[KT], q[KT];
#pragma unroll
          for (int k = 0; k < KT; ++k) {
            z[k] = to_acc(x[k].v[e]);
            d[k] = z[k] - pp[k].row.m;
            l[k] = fma(d[k], a.a_t, -pp[k].row.b);
            q[k] = L::pow(l[k]);
          }
          const bool is_label = static_cast<int>(v) * VEC + e == y32;
#pragma unroll
          for (int k = 0; k < KT; ++k) {
            A lt = 0;
            const A t = peer_target<O>(
                a, w, KT, k, kInvKm1, [&](int j) { return q[j]; }, [&](int j) { return z[j]; },
                pp[k].row, lt);
            const A gk = class_step<O>(a, pp[k].row, pp[k].coefs, is_label, d[k], l[k], q[k], t,
                                       lt, sums + kSums * k);
            from_acc(gk, g[k].v[e]);
          }
        }
        if (O::grad(a)) {
#pragma unroll
          for (int k = 0; k < KT; ++k) {
            store_pack<true, S, VEC>(grad0 + k * grad_stride + v * VEC, g[k]);
          }
        }
      };
      if constexpr (!kClustered) {
        for_each_vector<VEC, KT, true, true>(chunk0, a.stride_k, v_cached + tid, n, nt, emit);
      }
      for (int64_t v = tid; v < v_cached; v += nt) {
        P x[KT];
#pragma unroll
        for (int k = 0; k < KT; ++k) x[k] = cached(v, k);
        emit(v, x);
      }

      team_sum(sums, scratch, a.warps_per_team);
      if constexpr (kClustered) {
        cluster_reduce(sums, cluster_smem[0], cluster_smem[1], ctas, Add<A>());
      }
      if (tid == 0 && rank == 0) {
#pragma unroll
        for (int k = 0; k < KT; ++k) {
          write_outputs<O>(a, team_sums, w, KT, k, r, pp[k].row, true,
                           to_acc(row0[k * a.stride_k + y]),
                           [&](int j) { return sums + kSums * j; });
        }
      }
    }
  };
  if constexpr (kHasClusters || !kClustered) rows();
  reduce_if_last_block(a, team_sums_smem, teams, factors);
}

// ---------------------------------------------------------------------------------------------
// Forward, any K: a block per row (or per chunk of a row, when few long rows are split across
// blocks), peers one after the other; the other peers' values at a class are recomputed from the
// logits (O(K^2 C) work, reads mostly from L1/L2). Scalar loads. Used beyond kMaxStaticK, for
// float64, and for the split.

template <typename S, typename A>
__device__ __forceinline__ A logit_at(const KernelArgs<A>& a, const S* row0, int j, int64_t c) {
  return to_acc(row0[j * a.stride_k + c]);
}

// Pass 1 of peer k over the classes [c0, c1) of a row: its online log-sum-exps (and those of the
// ensemble_logits target), reduced over the block.
template <typename S, typename A>
__device__ void block_stats(const KernelArgs<A>& a, const S* row0, int K, int k, int64_t c0,
                            int64_t c1, A* scratch, LseState<A> (&lse)[1],
                            LseState<A> (&lse_u)[1]) {
  lse[0].reset();
  lse_u[0].reset();
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
    const A z[1] = {logit_at(a, row0, k, c)};
    lse[0].fold(z, a.a_t, a.unit_t);
  }
  team_lse(lse, scratch, kWarps, a.a_t, a.unit_t);
  if (a.mode == LossMode::EnsembleLogits) {
    for (int64_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
      const A u[1] = {
          sum_others<A>(K, k, [&](int j) { return logit_at(a, row0, j, c); }) * a.u_scale};
      lse_u[0].fold(u, Log<A>::kUnit, true);
    }
    team_lse(lse_u, scratch, kWarps, A(1), true);
  }
}

// Pass 2 of peer k over the classes [c0, c1) of a row, given every peer's statistics prs and its
// gradient coefficients: writes the gradient there and returns the loss sums, reduced over the
// block. y: the label, or -1 in a row without one.
template <typename S, typename A>
__device__ void block_emit(const KernelArgs<A>& a, const GradCoefs<A>& gc, const S* row0, int K,
                           int k, int64_t r, int64_t y, int64_t c0, int64_t c1,
                           const PeerRow<A>* prs, A* scratch, A (&sums)[kSums]) {
  using O = RuntimeOptions;
  const PeerRow<A> pk = prs[k];
  for (int i = 0; i < kSums; ++i) sums[i] = A(0);
  S* const grad_row = a.compute_grad ? static_cast<S*>(a.grad) + (k * a.R + r) * a.C : nullptr;
  const auto log_q = [&](int j, A z) { return fma(z - prs[j].m, a.a_t, -prs[j].b); };
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
    const auto get_z = [&](int j) { return logit_at(a, row0, j, c); };
    const auto get_q = [&](int j) { return Log<A>::pow(log_q(j, get_z(j))); };
    const A z = get_z(k);
    const A l = log_q(k, z);
    A lt = 0;
    const A t = peer_target<O>(a, a.weights, K, k, a.inv_km1, get_q, get_z, pk, lt);
    const A g = class_step<O>(a, pk, gc, c == y, z - pk.m, l, Log<A>::pow(l), t, lt, sums);
    if (a.compute_grad) from_acc(g, grad_row[c]);
  }
  team_sum(sums, scratch, kWarps);
}

// The divergences other than KL (docs/design.md, Other divergences), in the any-K kernels.

// p * x with 0 * x = 0, also where x is infinite or NaN (a class that p does not cover).
template <typename A>
__device__ __forceinline__ A p_times(A p, A x) {
  return p == A(0) ? A(0) : p * x;
}

// log m - log t and log m - log q of the JSD's mixture m = beta t + (1 - beta) q at one class,
// given lt = log t and lq = log q (all in units), from the larger term b of m and the smaller s:
// log m = log b + log1p(s / b), with s / b in [0, 1], so that neither difference loses the digits
// that log m - log q loses next to log q near beta = 1 (or 0), and no ratio overflows.
template <typename A>
__device__ __forceinline__ void jsd_logs(const KernelArgs<A>& a, A t, A lt, A q, A lq, A& rel_t,
                                         A& rel_q) {
  const A bt = a.beta * t, oq = a.one_minus_beta * q;
  const bool t_larger = bt >= oq;
  const A larger = t_larger ? bt : oq, smaller = t_larger ? oq : bt;
  const A log1p_ratio = larger == A(0) ? neg_inf<A>() : Log<A>::log1p(smaller / larger);
  if (t_larger) {
    rel_t = a.log_beta + log1p_ratio;
    rel_q = rel_t + (lt - lq);
  } else {
    rel_q = a.log_one_minus_beta + log1p_ratio;
    rel_t = rel_q - (lt - lq);
  }
}

// Peer k's terms at class c: q = q_k; d, with which <q_k, d> and the gradient q_k (d - <q_k, d>)
// are formed: sum_j W[k, j] (log q_k - log t_j) for the reverse KL and -sum_j W[k, j]
// (log m_kj - log q_k) for the JSD (one target t_k in the ensemble modes; in units); and for the
// JSD the targets' KL to their mixtures, kl_t = sum_j W[k, j] t_j (log t_j - log m_kj).
template <typename A>
struct DivergenceTerms {
  A q, d, kl_t;
};

template <typename S, typename A>
__device__ __forceinline__ DivergenceTerms<A> divergence_terms(const KernelArgs<A>& a,
                                                               const S* row0, int K, int k,
                                                               int64_t c, const PeerRow<A>* prs) {
  using O = RuntimeOptions;
  using L = Log<A>;
  const auto get_z = [&](int j) { return logit_at(a, row0, j, c); };
  const auto log_q = [&](int j) { return fma(get_z(j) - prs[j].m, a.a_t, -prs[j].b); };
  const A lk = log_q(k);
  DivergenceTerms<A> out{L::pow(lk), A(0), A(0)};
  const auto add_target = [&](A w, A t, A lt) {
    if (a.divergence == LossDivergence::JSD) {
      A rel_t, rel_q;
      jsd_logs(a, t, lt, out.q, lk, rel_t, rel_q);
      out.d = fma(-w, rel_q, out.d);
      out.kl_t = fma(w, p_times(t, -rel_t), out.kl_t);
    } else {
      out.d = fma(w, lk - lt, out.d);
    }
  };
  if (a.mode == LossMode::Pairwise || a.mode == LossMode::Weights) {
    for (int j = 0; j < K; ++j) {
      const A w = peer_weight<O>(a, a.weights, K, k, j);
      if (w == A(0)) continue;  // j == k, or a peer that k does not imitate (log q_j may be -inf)
      const A lj = log_q(j);
      add_target(w, L::pow(lj), lj);
    }
  } else {
    A lt = 0;
    const A t = peer_target<O>(
        a, a.weights, K, k, a.inv_km1, [&](int j) { return L::pow(log_q(j)); }, get_z, prs[k],
        lt);
    add_target(A(1), t, a.mode == LossMode::Ensemble ? L::accurate_log(t) : lt);
  }
  return out;
}

// Pass 2 of such a divergence for peer k over the classes [c0, c1) of a row: its loss sums,
// reduced over the block: <q_k, d> (sums[0]), the JSD's kl_t (sums[1]) and, for label smoothing,
// the sum of z - m (sums[2]), as write_outputs reads them.
template <typename S, typename A>
__device__ void block_divergence_sums(const KernelArgs<A>& a, const S* row0, int K, int k,
                                      int64_t c0, int64_t c1, const PeerRow<A>* prs, A* scratch,
                                      A (&sums)[kSums]) {
  for (int i = 0; i < kSums; ++i) sums[i] = A(0);
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
    const DivergenceTerms<A> terms = divergence_terms(a, row0, K, k, c, prs);
    sums[0] += p_times(terms.q, terms.d);
    sums[1] += terms.kl_t;
    if (a.smoothing) sums[2] += logit_at(a, row0, k, c) - prs[k].m;
  }
  team_sum(sums, scratch, kWarps);
}

// Pass 3: peer k's gradient over the classes [c0, c1) of row r, its coefficients holding <q_k, d>
// of the whole row (divergence_coefs). y: as block_emit's.
template <typename S, typename A>
__device__ void block_divergence_grad(const KernelArgs<A>& a, const GradCoefs<A>& gc,
                                      const S* row0, int K, int k, int64_t r, int64_t y,
                                      int64_t c0, int64_t c1, const PeerRow<A>* prs) {
  S* const grad_row = static_cast<S*>(a.grad) + (k * a.R + r) * a.C;
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
    const DivergenceTerms<A> terms = divergence_terms(a, row0, K, k, c, prs);
    const A d = logit_at(a, row0, k, c) - prs[k].m;
    from_acc(class_grad<RuntimeOptions>(a, prs[k], gc, c == y, d, terms.q,
                                        p_times(terms.q, terms.d)),
             grad_row[c]);
  }
}

// Peer k's passes 2 (and 3) over the whole row r: its loss sums, reduced over the block, and its
// gradient. The other divergences' pass 3 needs <q_k, d> of the whole row: their pass 2's sum.
template <typename S, typename A>
__device__ void block_peer(const KernelArgs<A>& a, A w_k, PerTerm<A> scales, const S* row0,
                           int K, int k, int64_t r, int64_t y, const PeerRow<A>* prs, A* scratch,
                           A (&sums)[kSums]) {
  if (a.divergence == LossDivergence::KL) {
    block_emit(a, grad_coefs<RuntimeOptions>(a, w_k, scales), row0, K, k, r, y, 0, a.C, prs,
               scratch, sums);
    return;
  }
  block_divergence_sums(a, row0, K, k, 0, a.C, prs, scratch, sums);
  if (a.compute_grad) {
    block_divergence_grad(a, divergence_coefs(a, scales, sums[0]), row0, K, k, r, y, 0, a.C,
                          prs);
  }
}

// Shared memory of the any-K kernels: reduction scratch and, dynamic, prs [K],
// peer_sums [K][kSums], own [K] (own_weight), team_sums [K][2] (reduced: the block's one team's
// sums, see reduce_if_last_block).
template <typename A>
struct AnyKSmem {
  int K;
  A* scratch;
  PeerRow<A>* prs;
  A* peer_sums;
  A* own;
  A* team_sums;

  __device__ explicit AnyKSmem(int64_t peers) : K(static_cast<int>(peers)) {
    __shared__ A reduce[kWarps * kSums];
    extern __shared__ int4 dyn_smem[];
    scratch = reduce;
    prs = reinterpret_cast<PeerRow<A>*>(dyn_smem);
    peer_sums = reinterpret_cast<A*>(prs + K);
    own = peer_sums + kSums * K;
    team_sums = own + K;
  }
};

template <typename A>
constexpr size_t any_k_smem_bytes(int64_t K) {
  return static_cast<size_t>(K) * (sizeof(PeerRow<A>) + (kSums + 3) * sizeof(A));
}

// Whether the row of target y is left out of the computation: ignored (value 0; unless its
// mimicry is kept, mimic_unlabeled) or with a target out of range (value NaN). Such a row's
// logits are not read.
template <typename A>
__device__ __forceinline__ bool skipped_row(const KernelArgs<A>& a, int64_t y, A& value) {
  value = y == a.ignore_index ? A(0) : A(NAN);
  if (y == a.ignore_index) return !a.mimic_unlabeled;
  return y < 0 || y >= a.C;
}

// The cross-entropy's label in a computed row: y, or -1 where the row has none (mimic_unlabeled).
template <typename A>
__device__ __forceinline__ int64_t label_of(const KernelArgs<A>& a, int64_t y) {
  return y == a.ignore_index ? -1 : y;
}

// Peer k's terms of a computed row r of label y (label_of), put by write_outputs.
template <typename S, typename A>
__device__ __forceinline__ void write_row_outputs(const KernelArgs<A>& a, A* team_sums,
                                                  const S* row0, int K, int k, int64_t r,
                                                  int64_t y, const PeerRow<A>* prs,
                                                  const A* peer_sums) {
  const bool with_ce = y >= 0 && a.ce_weight != A(0);
  write_outputs<RuntimeOptions>(a, team_sums, a.weights, K, k, r, prs[k], with_ce,
                                with_ce ? logit_at(a, row0, k, y) : A(0),
                                [&](int j) { return peer_sums + kSums * j; });
}

template <typename S>
__global__ void __launch_bounds__(kThreads) mutual_loss_any_k_kernel(const KernelArgs<acc_t<S>> a) {
  using A = acc_t<S>;
  const AnyKSmem<A> sm(a.K);
  const int K = sm.K;
  const int tid = threadIdx.x;
  __shared__ PerTerm<A> factors;  // row_factors, as in the fixed-K kernel
  for (int k = tid; k < K; k += kThreads) {
    sm.own[k] = own_weight<RuntimeOptions>(a, a.weights, K, k);
    sm.team_sums[2 * k] = sm.team_sums[2 * k + 1] = A(0);
  }
  const PerTerm<A> f = row_factors(a);
  if (tid == 0) factors = f;
  __syncthreads();

  for (int64_t r = blockIdx.x; r < a.R; r += gridDim.x) {
    const int64_t target = a.target[r * a.target_stride];
    A value;
    if (skipped_row(a, target, value)) {
      fill_row<S, 1>(a, sm.team_sums, r, value, tid == 0, tid, a.C, kThreads);
      continue;
    }
    const int64_t y = label_of(a, target);
    const S* const row0 = static_cast<const S*>(a.logits) + r * a.stride_r;
    for (int k = 0; k < K; ++k) {
      LseState<A> lse[1], lse_u[1];
      block_stats(a, row0, K, k, 0, a.C, sm.scratch, lse, lse_u);
      if (tid == 0) sm.prs[k] = finish_row(lse[0], lse_u[0], a.unit_t);
    }
    __syncthreads();
    for (int k = 0; k < K; ++k) {
      A sums[kSums];
      block_peer(a, sm.own[k], term_scales<RuntimeOptions>(a, k, r, factors, y >= 0), row0, K, k,
                 r, y, sm.prs, sm.scratch, sums);
      if (tid == 0) {
        for (int i = 0; i < kSums; ++i) sm.peer_sums[kSums * k + i] = sums[i];
      }
    }
    __syncthreads();
    if (tid == 0) {
      for (int k = 0; k < K; ++k) {
        write_row_outputs(a, sm.team_sums, row0, K, k, r, y, sm.prs, sm.peer_sums);
      }
    }
    __syncthreads();  // prs and peer_sums are rewritten for the next row
  }
  reduce_if_last_block(a, sm.team_sums, 1, factors);
}

// ---------------------------------------------------------------------------------------------
// Split forward, for rows too few to fill the device with one block each: the classes of row r are
// cut into a.chunks chunks, block r * chunks + p owning chunk p. Three launches: each chunk's
// log-sum-exps; then each chunk merges all of its row's (in chunk order, so all chunks get the
// same statistics), writes its gradient and its loss sums; then a block per row adds the sums in
// chunk order and writes the loss terms. The divergences other than KL take a launch more before
// the gradient's: each chunk's loss sums, of which the gradient needs the row's <q_k, d>.
// a.partials holds kPartialValues per (row, chunk, peer): the five statistics (m, s, s_t, mu, su)
// and the kSums sums.

template <typename A>
__device__ __forceinline__ A* partial(const KernelArgs<A>& a, int64_t r, int64_t p, int64_t k) {
  return a.partials + ((r * a.chunks + p) * a.K + k) * kPartialValues;
}

template <typename A>
__device__ __forceinline__ void chunk_range(const KernelArgs<A>& a, int64_t p, int64_t& c0,
                                            int64_t& c1) {
  const int64_t len = (a.C + a.chunks - 1) / a.chunks;
  c0 = min(a.C, p * len);
  c1 = min(a.C, c0 + len);
}

template <typename A>
__device__ PeerRow<A> merged_row(const KernelArgs<A>& a, int64_t r, int k) {
  const A* first = partial(a, r, 0, k);
  LseState<A> lse{first[0], first[1], first[2]};
  LseState<A> lse_u{first[3], first[4], A(0)};
  for (int64_t p = 1; p < a.chunks; ++p) {
    const A* part = partial(a, r, p, k);
    lse.merge(part[0], part[1], part[2], a.a_t, a.unit_t);
    lse_u.merge(part[3], part[4], A(0), Log<A>::kUnit, true);
  }
  return finish_row(lse, lse_u, a.unit_t);
}

// Peer k's loss sum i of row r: its chunks' in chunk order.
template <typename A>
__device__ A row_sum(const KernelArgs<A>& a, int64_t r, int k, int i) {
  A sum = 0;
  for (int64_t p = 0; p < a.chunks; ++p) sum += partial(a, r, p, k)[5 + i];
  return sum;
}

// The block of chunk p of row r: its classes [c0, c1) and target.
template <typename A>
struct SplitBlock {
  int64_t r, p, target, c0, c1;

  __device__ explicit SplitBlock(const KernelArgs<A>& a)
      : r(blockIdx.x / static_cast<unsigned>(a.chunks)),  // 32 bits: no division routine
        p(blockIdx.x % static_cast<unsigned>(a.chunks)),
        target(a.target[r * a.target_stride]) {
    chunk_range(a, p, c0, c1);
  }
};

// At least one block a multiprocessor: without it, ptxas held the float64 kernel to 48 registers,
// which spilled in the loop over the classes.
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) split_stats_kernel(const KernelArgs<acc_t<S>> a) {
  using A = acc_t<S>;
  __shared__ A scratch[kWarps * 3];
  const SplitBlock<A> b(a);
  A value;
  if (skipped_row(a, b.target, value)) return;
  const S* const row0 = static_cast<const S*>(a.logits) + b.r * a.stride_r;
  for (int k = 0; k < static_cast<int>(a.K); ++k) {
    LseState<A> lse[1], lse_u[1];
    block_stats(a, row0, static_cast<int>(a.K), k, b.c0, b.c1, scratch, lse, lse_u);
    if (threadIdx.x == 0) {
      A* out = partial(a, b.r, b.p, k);
      out[0] = lse[0].m;
      out[1] = lse[0].s;
      out[2] = lse[0].s_t;
      out[3] = lse_u[0].m;
      out[4] = lse_u[0].s;
    }
  }
}

// Every peer's merged statistics (and own weight) of the block's row into shared memory.
template <typename A>
__device__ void merge_row_stats(const KernelArgs<A>& a, const SplitBlock<A>& b,
                                const AnyKSmem<A>& sm) {
  for (int k = threadIdx.x; k < sm.K; k += kThreads) {
    sm.prs[k] = merged_row(a, b.r, k);
    sm.own[k] = own_weight<RuntimeOptions>(a, a.weights, sm.K, k);
  }
  __syncthreads();
}

// The other divergences' pass 2 on a chunk: its loss sums.
template <typename S>
__global__ void __launch_bounds__(kThreads) split_sums_kernel(const KernelArgs<acc_t<S>> a) {
  using A = acc_t<S>;
  const AnyKSmem<A> sm(a.K);
  const SplitBlock<A> b(a);
  A value;
  if (skipped_row(a, b.target, value)) return;
  merge_row_stats(a, b, sm);
  const S* const row0 = static_cast<const S*>(a.logits) + b.r * a.stride_r;
  for (int k = 0; k < sm.K; ++k) {
    A sums[kSums];
    block_divergence_sums(a, row0, sm.K, k, b.c0, b.c1, sm.prs, sm.scratch, sums);
    if (threadIdx.x == 0) {
      for (int i = 0; i < kSums; ++i) partial(a, b.r, b.p, k)[5 + i] = sums[i];
    }
  }
}

// A chunk's gradient and, for KL, its loss sums.
template <typename S>
__global__ void __launch_bounds__(kThreads) split_emit_kernel(const KernelArgs<acc_t<S>> a) {
  using A = acc_t<S>;
  const AnyKSmem<A> sm(a.K);
  const SplitBlock<A> b(a);
  const PerTerm<A> factors = row_factors(a);
  A value;
  if (skipped_row(a, b.target, value)) {
    if (!a.compute_grad) return;
    S fill;
    from_acc(value, fill);
    for (int64_t k = 0; k < a.K; ++k) {
      S* const g = static_cast<S*>(a.grad) + (k * a.R + b.r) * a.C;
      for (int64_t c = b.c0 + threadIdx.x; c < b.c1; c += kThreads) g[c] = fill;
    }
    return;
  }
  merge_row_stats(a, b, sm);
  const int64_t y = label_of(a, b.target);
  const S* const row0 = static_cast<const S*>(a.logits) + b.r * a.stride_r;
  for (int k = 0; k < sm.K; ++k) {
    const PerTerm<A> scales = term_scales<RuntimeOptions>(a, k, b.r, factors, y >= 0);
    if (a.divergence != LossDivergence::KL) {
      const GradCoefs<A> gc = divergence_coefs(a, scales, row_sum(a, b.r, k, 0));
      block_divergence_grad(a, gc, row0, sm.K, k, b.r, y, b.c0, b.c1, sm.prs);
      continue;
    }
    A sums[kSums];
    block_emit(a, grad_coefs<RuntimeOptions>(a, sm.own[k], scales), row0, sm.K, k, b.r, y, b.c0,
               b.c1, sm.prs, sm.scratch, sums);
    if (threadIdx.x == 0) {
      for (int i = 0; i < kSums; ++i) partial(a, b.r, b.p, k)[5 + i] = sums[i];
    }
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) split_finish_kernel(const KernelArgs<acc_t<S>> a) {
  using A = acc_t<S>;
  const int64_t r = blockIdx.x;
  const int64_t target = a.target[r * a.target_stride];
  const AnyKSmem<A> sm(a.K);
  const int K = sm.K;
  // Thread k puts peer k's terms (put_terms): the block's sums start at 0.
  for (int k = threadIdx.x; k < K; k += kThreads) sm.team_sums[2 * k] = sm.team_sums[2 * k + 1] = 0;
  A value;
  if (skipped_row(a, target, value)) {
    for (int k = threadIdx.x; k < K; k += kThreads) put_terms(a, sm.team_sums, k, r, value, value);
  } else {
    for (int k = threadIdx.x; k < K; k += kThreads) {
      sm.prs[k] = merged_row(a, r, k);
      for (int i = 0; i < kSums; ++i) sm.peer_sums[kSums * k + i] = row_sum(a, r, k, i);
    }
    __syncthreads();
    const S* const row0 = static_cast<const S*>(a.logits) + r * a.stride_r;
    for (int k = threadIdx.x; k < K; k += kThreads) {
      write_row_outputs(a, sm.team_sums, row0, K, k, r, label_of(a, target), sm.prs,
                        sm.peer_sums);
    }
  }
  reduce_if_last_block(a, sm.team_sums, 1, row_factors(a));
}

// ---------------------------------------------------------------------------------------------
// Backward: grad[k, r, :] *= grad_loss[k, r] unless that is 1 (the forward wrote the gradient
// of the loss as it was reduced).

template <typename A>
struct ScaleArgs {
  void* grad;
  const A* grad_loss;
  int64_t stride_k, stride_r;
  int64_t K, R, C;
  int team_threads;  // 32 or kThreads
};

template <typename S, int VEC>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(const ScaleArgs<acc_t<S>> a) {
  using A = acc_t<S>;
  using P = Pack<S, VEC>;
  const int nt = a.team_threads;
  const int slot = threadIdx.x / nt;
  const int tid = threadIdx.x - slot * nt;
  const int teams = kThreads / nt;
  const int64_t nv = a.C / VEC;
  const int64_t rows = a.K * a.R;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * teams + slot; row < rows;
       row += static_cast<int64_t>(gridDim.x) * teams) {
    const int64_t k = row / a.R;
    const int64_t r = row - k * a.R;
    const A factor = a.grad_loss[k * a.stride_k + r * a.stride_r];
    if (factor == A(1)) continue;
    S* const p = static_cast<S*>(a.grad) + row * a.C;
#pragma unroll 4
    for (int64_t v = tid; v < nv; v += nt) {
      P x = load_pack<true, S, VEC>(p + v * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) from_acc(to_acc(x.v[e]) * factor, x.v[e]);
      store_pack<false, S, VEC>(p + v * VEC, x);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side


bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }


int grid_for(int64_t work_items, const DeviceInfo& device, int blocks_per_sm) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(work_items, int64_t(device.num_sms) * blocks_per_sm)));
}

// A bound on the static shared memory of every kernel here (about 4.9 KB at most: the fixed-K
// cluster kernel's scratch, weights, teams' sums, row values and cluster exchange for K = 8).
constexpr size_t kStaticSmemBound = 8 * 1024;

// A block whose shared memory, static and dynamic together, passes 48 KB needs the kernel's
// opt-in (else the launch fails with cudaErrorInvalidValue: 48 KB of dynamic memory alone is too
// much), so the attribute is set from 48 KB less the static bound.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes + kStaticSmemBound <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <typename A>
KernelArgs<A> make_args(const MutualLossParams& p, const DeviceInfo& device) {
  KernelArgs<A> a;
  a.logits = p.logits;
  a.stride_k = p.stride_k;
  a.stride_r = p.stride_r;
  a.target = p.target;
  a.target_stride = p.target_stride;
  a.weights = static_cast<const A*>(p.weights);
  a.row_scale = static_cast<const A*>(p.row_scale);
  a.scale_stride_k = p.row_scale_stride_k;
  a.scale_stride_r = p.row_scale_stride_r;
  a.grad = p.grad;
  a.K = p.K;
  a.R = p.R;
  a.C = p.C;
  a.mode = p.mode;
  a.reduction = p.reduction;
  char* const workspace = static_cast<char*>(p.workspace);
  const WorkspaceLayout layout = workspace_layout(p, device);
  a.loss = static_cast<A*>(p.loss);
  a.ce = static_cast<A*>(p.ce);
  a.mimicry = static_cast<A*>(p.mimicry);
  a.ticket = p.ticket;
  a.block_sums = reinterpret_cast<A*>(workspace + layout.block_sums);
  a.unit_t = p.temperature == 1.0;
  a.a_t = static_cast<A>(Log<A>::kUnitExact / p.temperature);
  a.alpha_t = static_cast<A>(p.alpha * p.temperature);
  a.alpha_t2 = static_cast<A>(p.alpha * p.temperature * p.temperature);
  a.eps = static_cast<A>(p.label_smoothing);
  a.eps_over_c = static_cast<A>(p.label_smoothing / static_cast<double>(p.C));
  a.inv_km1 = static_cast<A>(1.0 / static_cast<double>(p.K - 1));
  a.u_scale = static_cast<A>(1.0 / (static_cast<double>(p.K - 1) * p.temperature));
  a.smoothing = p.label_smoothing > 0;
  a.compute_grad = p.compute_grad;
  a.ignore_index = p.ignore_index;
  a.warps_per_team = kWarps;
  a.cached_iters = 0;
  a.cluster = 1;
  a.chunks = 1;
  a.partials = reinterpret_cast<A*>(workspace + layout.partials);
  a.divergence = p.divergence;
  a.ce_weight = static_cast<A>(p.ce_weight);
  a.mimic_unlabeled = p.mimic_unlabeled;
  a.normalizer = static_cast<const A*>(p.normalizer);
  a.beta = static_cast<A>(p.beta);
  a.one_minus_beta = static_cast<A>(1.0 - p.beta);
  // Each from the smaller of beta and 1 - beta: near beta = 1, log(beta) of the rounded beta
  // would lose the digits that 1 - beta keeps.
  const auto log_of = [](double x, double one_minus_x) {
    return x < 0.5 ? std::log(x) : std::log1p(-one_minus_x);
  };
  a.log_beta = static_cast<A>(log_of(p.beta, 1.0 - p.beta) * Log<A>::kUnitExact);
  a.log_one_minus_beta = static_cast<A>(log_of(1.0 - p.beta, p.beta) * Log<A>::kUnitExact);
  return a;
}

// Launches the kernel for rows of a block team that pass one block's cache (`iters` vectors a
// thread and peer, `iter_bytes` of shared memory each, `budget` a block) on clusters of CTAs that
// together hold the row in shared memory, a chunk each, if the device has clusters, the chunks
// fit at most kMaxClusterCtas CTAs, and the device can hold such a cluster. Sets `launched`;
// returns the error of a CUDA call.
template <typename S, int KT, int VEC, typename O>
cudaError_t launch_cluster(KernelArgs<acc_t<S>> a, const DeviceInfo& device, cudaStream_t stream,
                           int64_t iters, int64_t iter_bytes, int64_t budget, bool& launched) {
  const auto kernel = mutual_loss_kernel<S, KT, VEC, O, true>;
  launched = false;
  const int64_t max_iters = budget / iter_bytes;  // vectors a thread caches per peer, at most
  if (!device.clusters || max_iters == 0) return cudaSuccess;
  // A build without sm_90 code runs on an sm_90 device from an older architecture's PTX, where
  // the cluster kernel compiled to nothing.
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // not the launch's error: the cache-and-L2 path runs instead
    return cudaSuccess;
  }
  if (attributes.ptxVersion < 90) return cudaSuccess;
  const int64_t ctas = ceil_div(iters, max_iters);
  if (ctas > kMaxClusterCtas) return cudaSuccess;
  a.cluster = static_cast<int>(ctas);
  a.cached_iters = static_cast<int>(ceil_div(iters, ctas));  // each CTA's chunk, all of it
  const size_t smem = static_cast<size_t>(a.cached_iters * iter_bytes);
  cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(ctas);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  int active = 0;
  if (cudaOccupancyMaxActiveClusters(&active, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();  // not the launch's error: the cache-and-L2 path runs instead
    return cudaSuccess;
  }
  // Clusters at once, at most one a row and kMaxBlocksPerSm CTAs a multiprocessor (block_sums).
  const int64_t clusters = std::min<int64_t>(
      {a.R, active, int64_t(device.num_sms) * kMaxBlocksPerSm / ctas});
  if (clusters < 1) return cudaSuccess;
  config.gridDim = dim3(static_cast<unsigned>(clusters * ctas));
  launched = true;
  return cudaLaunchKernelEx(&config, kernel, a);
}

template <typename S, int KT, int VEC, typename O>
cudaError_t launch_static_k(KernelArgs<acc_t<S>> a, const DeviceInfo& device,
                            cudaStream_t stream) {
  const int64_t nv = a.C / VEC;
  // A warp per row while each lane has at most 8 vectors of it, else a block per row.
  a.warps_per_team = nv <= 8 * 32 ? 1 : kWarps;
  const int nt = a.warps_per_team * 32;
  const int teams = kThreads / nt;
  // Shared memory for the cache: what leaves room for blocks_per_sm blocks per multiprocessor.
  const int64_t iter_bytes = int64_t(teams) * KT * nt * sizeof(Pack<S, VEC>);
  const int64_t budget = std::max<int64_t>(
      0, std::min<int64_t>(device.smem_per_block_optin, device.smem_per_sm / blocks_per_sm<KT>()) -
             8 * 1024);
  const int64_t iters = ceil_div(nv, nt);  // vectors a thread reads per peer
  if constexpr (VEC > 1) {  // unaligned rows (a scalar kernel) never take a cluster
    if (teams == 1 && iters * iter_bytes > budget) {
      bool launched;
      const cudaError_t err =
          launch_cluster<S, KT, VEC, O>(a, device, stream, iters, iter_bytes, budget, launched);
      if (err != cudaSuccess || launched) return err;
    }
  }
  const auto kernel = mutual_loss_kernel<S, KT, VEC, O, false>;
  // Else the first vectors of each row are cached, the rest read again from L2 or memory.
  a.cached_iters = static_cast<int>(std::min<int64_t>(iters, budget / iter_bytes));
  const size_t smem = static_cast<size_t>(a.cached_iters * iter_bytes);
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid_for(ceil_div(a.R, teams), device, blocks_per_sm<KT>()), kThreads, smem, stream>>>(
      a);
  return cudaSuccess;
}

// Vectors of 16 bytes, or of 8 with 6 or more peers, or 4 or more of a 2-byte dtype (registers:
// 16 would spill).
template <typename S, int KT>
constexpr int vector_bytes() {
  return KT >= 6 || (sizeof(S) == 2 && KT >= 4) ? 8 : 16;
}

// Calls f(std::true_type()) or f(std::false_type()): a flag known at run time made a constant.
template <typename F>
cudaError_t with_flag(bool flag, const F& f) {
  return flag ? f(std::true_type()) : f(std::false_type());
}

// The kernel of the hot option set of mode M (FixedOptions), with V-element vectors.
template <typename S, int KT, int V, LossMode M>
cudaError_t launch_fixed(const KernelArgs<acc_t<S>>& a, const DeviceInfo& device,
                         cudaStream_t stream) {
  return with_flag(a.unit_t, [&](auto unit_t) {
    return with_flag(a.smoothing, [&](auto smoothing) {
      return with_flag(a.compute_grad, [&](auto grad) {
        using O = FixedOptions<M, decltype(unit_t)::value, decltype(smoothing)::value,
                               decltype(grad)::value>;
        return launch_static_k<S, KT, V, O>(a, device, stream);
      });
    });
  });
}

// The hot option sets (pairwise or ensemble, up to 4 peers, with rows aligned to vectors) have
// kernels of their own; more peers, peer weights, ensemble_logits and unaligned rows share the
// kernel of RuntimeOptions. Beyond 4 peers the fixed sets would spill in the ensemble loops and
// pass the instruction budget, and would more than double the build time.
template <typename S, int KT>
cudaError_t launch_k(const KernelArgs<acc_t<S>>& a, const DeviceInfo& device,
                     cudaStream_t stream) {
  constexpr int V = vector_bytes<S, KT>() / static_cast<int>(sizeof(S));
  const auto aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % (V * sizeof(S)) == 0;
  };
  const bool vectorized = a.C % V == 0 && a.stride_k % V == 0 && a.stride_r % V == 0 &&
                          aligned(a.logits) && (!a.compute_grad || aligned(a.grad));
  if (!vectorized) return launch_static_k<S, KT, 1, RuntimeOptions>(a, device, stream);
  if constexpr (KT > kMaxFixedK) {
    return launch_static_k<S, KT, V, RuntimeOptions>(a, device, stream);
  } else {
    switch (a.mode) {
      case LossMode::Pairwise: return launch_fixed<S, KT, V, LossMode::Pairwise>(a, device, stream);
      case LossMode::Ensemble: return launch_fixed<S, KT, V, LossMode::Ensemble>(a, device, stream);
      default: return launch_static_k<S, KT, V, RuntimeOptions>(a, device, stream);
    }
  }
}

template <typename S>
cudaError_t dispatch_k(const KernelArgs<acc_t<S>>& a, const DeviceInfo& device,
                       cudaStream_t stream) {
  switch (a.K) {
    case 2: return launch_k<S, 2>(a, device, stream);
    case 3: return launch_k<S, 3>(a, device, stream);
    case 4: return launch_k<S, 4>(a, device, stream);
    case 5: return launch_k<S, 5>(a, device, stream);
    case 6: return launch_k<S, 6>(a, device, stream);
    case 7: return launch_k<S, 7>(a, device, stream);
    default: return launch_k<S, 8>(a, device, stream);
  }
}

template <typename S>
cudaError_t launch_any_k(const KernelArgs<acc_t<S>>& a, const DeviceInfo& device,
                         cudaStream_t stream) {
  const size_t smem = any_k_smem_bytes<acc_t<S>>(a.K);
  const auto kernel = mutual_loss_any_k_kernel<S>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid_for(a.R, device, kMaxBlocksPerSm), kThreads, smem, stream>>>(a);
  return cudaSuccess;
}

template <typename S>
cudaError_t launch_split(KernelArgs<acc_t<S>> a, int64_t chunks, cudaStream_t stream) {
  a.chunks = chunks;
  const size_t smem = any_k_smem_bytes<acc_t<S>>(a.K);
  const bool kl = a.divergence == LossDivergence::KL;
  cudaError_t err = allow_dynamic_smem(split_emit_kernel<S>, smem);
  if (err == cudaSuccess) err = allow_dynamic_smem(split_finish_kernel<S>, smem);
  if (err == cudaSuccess && !kl) err = allow_dynamic_smem(split_sums_kernel<S>, smem);
  if (err != cudaSuccess) return err;
  const int blocks = static_cast<int>(a.R * chunks);
  split_stats_kernel<S><<<blocks, kThreads, 0, stream>>>(a);
  if (!kl) split_sums_kernel<S><<<blocks, kThreads, smem, stream>>>(a);
  // The other divergences' emit writes the gradient only.
  if (kl || a.compute_grad) split_emit_kernel<S><<<blocks, kThreads, smem, stream>>>(a);
  split_finish_kernel<S><<<static_cast<int>(a.R), kThreads, smem, stream>>>(a);
  return cudaSuccess;
}

// The kernel (or the split's three or four) that computes the rows.
template <typename S>
cudaError_t launch_rows(const KernelArgs<acc_t<S>>& a, const MutualLossParams& p,
                        const DeviceInfo& device, cudaStream_t stream) {
  const int64_t chunks = split_chunks(p, device);
  if (chunks > 1) return launch_split<S>(a, chunks, stream);
  if constexpr (std::is_same_v<S, double>) {
    // float64 (gradcheck, references) always takes the any-K kernel: the register-resident one
    // would spill with two registers per value, and leaving it out saves compile time.
    return launch_any_k<S>(a, device, stream);
  } else {
    // The loss family's options other than the defaults take the any-K kernel too: the fixed-K
    // kernels' loops stay those of the paper's loss.
    return p.K > kMaxStaticK || family_options(p) ? launch_any_k<S>(a, device, stream)
                                                  : dispatch_k<S>(a, device, stream);
  }
}

}  // namespace

template <typename S>
cudaError_t launch_forward(const MutualLossParams& p, const DeviceInfo& device,
                           cudaStream_t stream) {
  if ((p.workspace == nullptr && workspace_layout(p, device).bytes > 0) ||
      (p.reduction != LossReduction::None && p.ticket == nullptr) || p.C > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  return launch_rows<S>(make_args<acc_t<S>>(p, device), p, device, stream);
}

template <typename S>
cudaError_t launch_scale(const ScaleGradParams& p, const DeviceInfo& device, cudaStream_t stream) {
  using A = acc_t<S>;
  constexpr int V = static_cast<int>(16 / sizeof(S));
  const bool vectorized = p.C % V == 0 && aligned16(p.grad);
  const int vec = vectorized ? V : 1;
  ScaleArgs<A> a{p.grad,
                 static_cast<const A*>(p.grad_loss),
                 p.grad_loss_stride_k,
                 p.grad_loss_stride_r,
                 p.K,
                 p.R,
                 p.C,
                 p.C / vec <= 1024 ? 32 : kThreads};
  const int grid = grid_for(ceil_div(p.K * p.R, kThreads / a.team_threads), device, 32);
  if (vectorized) {
    scale_grad_kernel<S, V><<<grid, kThreads, 0, stream>>>(a);
  } else {
    scale_grad_kernel<S, 1><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaSuccess;
}

}  // namespace detail
}  // namespace gpu
}  // namespace fastdml
