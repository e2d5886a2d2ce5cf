// CPU kernels of fastdml::fused_mutual_loss and fastdml::scale_grad_ (docs/design.md).
//
// The loss reads each row twice and writes its gradient once: pass 1 finds the log-sum-exps, pass 2
// computes the loss terms and the gradient of the reduced loss, so the backward only rescales it
// when the upstream gradient is not 1. The divergences other than KL read a row three times: their
// gradient needs a sum over the row (docs/design.md, Other divergences). The targets are checked,
// and counted for reduction "mean", in one pass before any row is computed; the reduction over rows
// has a fixed order.
//
// Rows are independent and split across threads; per-row results never depend on the split, and
// every reduction within a row has a fixed order, so outputs are bit-identical run to run.
// A row's K x C block is walked in chunks of classes. Each chunk's per-peer scratch (log q, q, the
// target distribution, ...) stays in L1 while two kinds of loops take turns on it: loops over one
// peer's classes, which call the vectorised exp/log, and loops across peers (target mixing), which
// make no calls so their K values per class stay in registers (K is a template parameter).
// Reduced-precision logits are converted to float one chunk at a time, so all dtypes share the
// float/double code.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "mutual_loss.h"

namespace fastdml {
namespace {

using at::vec::Vectorized;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ---------------------------------------------------------------------------------------------
// Vector helpers over one chunk of n classes. Every load and store is limited to the chunk, so the
// last, partial vector never touches memory past a row; its dead lanes load as zero.

// Calls body(c, cnt) for each vector of a chunk. For full vectors cnt is a compile-time constant,
// so their loads, stores and lane masks compile to plain instructions; the last, partial vector
// gets its lane count at run time.
template <typename T, typename Body>
inline void for_each_vector(int64_t n, const Body& body) {
  constexpr int W = Vectorized<T>::size();
  int64_t c = 0;
  for (; c + W <= n; c += W) body(c, std::integral_constant<int, W>{});
  if (c < n) body(c, static_cast<int>(n - c));
}

template <typename T, typename Cnt>
Vectorized<T> load(const T* p, Cnt cnt) {
  if constexpr (std::is_same_v<Cnt, int>) {
    return Vectorized<T>::loadu(p, cnt);
  } else {
    return Vectorized<T>::loadu(p);
  }
}

template <typename T, typename Cnt>
void store(const Vectorized<T>& v, T* p, Cnt cnt) {
  if constexpr (std::is_same_v<Cnt, int>) {
    v.store(p, cnt);
  } else {
    v.store(p);
  }
}

// Replaces the dead lanes of a partial vector (zero by default) before it enters a reduction.
template <typename T, typename Cnt>
Vectorized<T> live(const Vectorized<T>& v, Cnt cnt, T fill = T(0)) {
  if constexpr (std::is_same_v<Cnt, int>) {
    return Vectorized<T>::set(Vectorized<T>(fill), v, cnt);
  } else {
    return v;
  }
}

// For float, Vectorized::exp_u20 is an inline polynomial, about twice as fast as Sleef's expf
// (a call). Measured over every float x in [-86.5, 0]: max relative error 3.9e-7; below that it
// flushes to zero. For double it is Sleef's exp. It maps NaN to a finite number, so NaN lanes are
// passed through.
template <typename T>
Vectorized<T> vexp(const Vectorized<T>& x) {
  return Vectorized<T>::blendv(x.exp_u20(), x, x.isnan());
}

// p * log_q with 0 * log_q = 0, also where log_q = -inf (a class a peer masks with -inf logits).
template <typename T>
Vectorized<T> plogq(const Vectorized<T>& p, const Vectorized<T>& log_q) {
  return Vectorized<T>::blendv(p * log_q, Vectorized<T>(0), p == Vectorized<T>(0));
}

template <typename T>
T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v);
}

// Maxima propagate NaN (like torch.max), so a NaN logit reaches the loss instead of being skipped.
template <typename T>
T nan_max(T a, T b) {
  return (a > b || std::isnan(a)) ? a : b;
}

// Two accumulators in the loops below: each vector's maximum or exp-and-add depends on the last
// one only every other vector, which halves the loop's latency chain.
template <typename T>
T max_of(const T* x, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc0(kNegInf<T>), acc1(kNegInf<T>);
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    acc0 = at::vec::maximum(acc0, V::loadu(x + c));
    acc1 = at::vec::maximum(acc1, V::loadu(x + c + W));
  }
  for_each_vector<T>(n - c, [&](int64_t i, auto cnt) {
    acc0 = at::vec::maximum(acc0, live(load(x + c + i, cnt), cnt, kNegInf<T>));
  });
  return at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return at::vec::maximum(a, b); },
                                    at::vec::maximum(acc0, acc1));
}

// sum_c exp(a x[c] - b)
template <typename T>
T sum_exp(const T* x, int64_t n, T a, T b) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V va(a), nb(-b);
  V acc0(0), acc1(0);
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    acc0 += vexp(at::vec::fmadd(V::loadu(x + c), va, nb));
    acc1 += vexp(at::vec::fmadd(V::loadu(x + c + W), va, nb));
  }
  for_each_vector<T>(n - c, [&](int64_t i, auto cnt) {
    acc0 += live(vexp(at::vec::fmadd(load(x + c + i, cnt), va, nb)), cnt);
  });
  return hsum(acc0 + acc1);
}

// out[c] = exp(a x[c] - b); out may alias x.
template <typename T>
void exp_affine(const T* x, int64_t n, T a, T b, T* out) {
  using V = Vectorized<T>;
  const V va(a), nb(-b);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    store(vexp(at::vec::fmadd(load(x + c, cnt), va, nb)), out + c, cnt);
  });
}

// log q[c] = (a x[c] - a m) - log_sum and q[c] = exp(log q[c]): a log-softmax built from the
// shifted terms, never from log(q). Adds sum_c (x[c] - m) (label smoothing) to sum_d and
// sum_c q log q to h.
template <typename T>
void log_softmax(const T* x, int64_t n, T a, T m, T log_sum, T* log_q, T* q, double& sum_d,
                 double& h) {
  using V = Vectorized<T>;
  const V va(a), vm(m), nam(-(a * m)), vlog(log_sum);
  V acc_d(0), acc_h(0);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    const V z = load(x + c, cnt);
    const V lq = at::vec::fmadd(z, va, nam) - vlog;
    const V e = vexp(lq);
    store(lq, log_q + c, cnt);
    store(e, q + c, cnt);
    acc_d += live(z - vm, cnt);
    acc_h += live(plogq(e, lq), cnt);
  });
  sum_d += hsum(acc_d);
  h += hsum(acc_h);
}

// sum_c t log q with 0 log q = 0.
template <typename T>
T sum_plogq(const T* t, const T* log_q, int64_t n) {
  using V = Vectorized<T>;
  V acc(0);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    acc += plogq(load(t + c, cnt), load(log_q + c, cnt));
  });
  return hsum(acc);
}

// sum_c t (log t - log q) with 0 log 0 = 0.
template <typename T>
T kl_div(const T* t, const T* log_q, int64_t n) {
  using V = Vectorized<T>;
  V acc(0);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    const V tc = load(t + c, cnt);
    acc += plogq(tc, tc.log() - load(log_q + c, cnt));
  });
  return hsum(acc);
}

// sum_c r (log r - log q) for r = softmax(u) given u's max m and log_sum = log sum exp(u - m).
template <typename T>
T kl_div_logits(const T* u, T m, T log_sum, const T* log_q, int64_t n) {
  using V = Vectorized<T>;
  const V vm(m), vlog(log_sum);
  V acc(0);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    const V lr = (load(u + c, cnt) - vm) - vlog;
    acc += plogq(live(vexp(lr), cnt), lr - load(log_q + c, cnt));
  });
  return hsum(acc);
}

// g[c] = a p[c] + b q[c] + t_coef t[c] + d
template <typename T>
void gradient(const T* p, const T* q, const T* t, int64_t n, T a, T b, T t_coef, T d, T* g) {
  using V = Vectorized<T>;
  const V va(a), vb(b), vt(t_coef), vd(d);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    V acc = at::vec::fmadd(vt, load(t + c, cnt), vd);
    acc = at::vec::fmadd(vb, load(q + c, cnt), acc);
    store(at::vec::fmadd(va, load(p + c, cnt), acc), g + c, cnt);
  });
}

// out[c] = log x[c]
template <typename T>
void log_of(const T* x, int64_t n, T* out) {
  for_each_vector<T>(n, [&](int64_t c, auto cnt) { store(load(x + c, cnt).log(), out + c, cnt); });
}

// e[c] = q[c] (w log q[c] - L[c]), the q_k * d_k of a divergence's gradient (docs/design.md,
// Other divergences), 0 where q = 0 (where d is NaN if the target is 0 too); returns sum_c e,
// which is <q_k, d_k>. e may alias L.
template <typename T>
T log_ratio_terms(const T* q, const T* log_q, T w, const T* L, int64_t n, T* e) {
  using V = Vectorized<T>;
  const V vw(w);
  V acc(0);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    const V d = at::vec::fmsub(vw, load(log_q + c, cnt), load(L + c, cnt));
    const V term = plogq(load(q + c, cnt), d);  // dead lanes load q = 0: no live() needed
    store(term, e + c, cnt);
    acc += term;
  });
  return hsum(acc);
}

// One pair of the generalized JSD, target t and peer q, with the mixture m = beta t + (1 - beta) q:
// adds w (log m - log q) to L and returns sum_c t (log t - log m) (0 log 0 = 0) first. With a
// mirror (beta = 1/2, where the pair of target q and peer t has the same mixture) it also adds
// w_mirror (log m - log t) to L_mirror and returns sum_c q (log q - log m) second.
// Per class, log m is taken from its larger term b = max(beta t, (1 - beta) q) and the smaller s:
// log m = log b + log1p(s / b), with s / b in [0, 1]. So log m - log t and log m - log q keep the
// digits that log(beta t + (1 - beta) q) - log t loses near beta = 1 (or 0), and no ratio
// overflows. Where b = 0, m = 0 and log m = -inf. Non-finite terms land only where their own
// distribution is 0, whose products with it are taken as 0.
template <typename T>
std::pair<T, T> jsd_pair(const T* t, const T* log_t, const T* q, const T* log_q, int64_t n, T beta,
                         T one_minus_beta, T w, T* L, T w_mirror, T* L_mirror) {
  using V = Vectorized<T>;
  // log beta and log(1 - beta), each from the smaller of the two (in double): near beta = 1,
  // log(beta) of the rounded beta would lose the digits 1 - beta keeps.
  const auto log_of = [](double x, double one_minus_x) {
    return static_cast<T>(x < 0.5 ? std::log(x) : std::log1p(-one_minus_x));
  };
  const V vb(beta), vo(one_minus_beta);
  const V log_b(log_of(beta, one_minus_beta)), log_o(log_of(one_minus_beta, beta));
  const V vw(w), vw_mirror(w_mirror), zero(0), minus_inf(-std::numeric_limits<T>::infinity());
  V acc_t(0), acc_q(0);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    const V tc = load(t + c, cnt), qc = load(q + c, cnt);
    const V bt = vb * tc, oq = vo * qc;
    const V t_larger = bt >= oq;
    const V larger = at::vec::maximum(bt, oq), smaller = at::vec::minimum(bt, oq);
    const V log1p_ratio = V::blendv((smaller / larger).log1p(), minus_inf, larger == zero);
    const V log_ratio = load(log_t + c, cnt) - load(log_q + c, cnt);  // log t - log q
    const V from_t = log_b + log1p_ratio, from_q = log_o + log1p_ratio;
    const V rel_t = V::blendv(from_q - log_ratio, from_t, t_larger);  // log m - log t
    const V rel_q = V::blendv(from_q, from_t + log_ratio, t_larger);  // log m - log q
    store(at::vec::fmadd(vw, rel_q, load(L + c, cnt)), L + c, cnt);
    acc_t += plogq(tc, zero - rel_t);  // dead lanes load t = q = 0
    if (L_mirror != nullptr) {
      store(at::vec::fmadd(vw_mirror, rel_t, load(L_mirror + c, cnt)), L_mirror + c, cnt);
      acc_q += plogq(qc, zero - rel_q);
    }
  });
  return {hsum(acc_t), hsum(acc_q)};
}

// The K vectors of one class block, held in registers when K is a compile-time constant and in
// `spill` (K vectors of scratch) otherwise.
template <int KT, typename T>
struct PeerVectors {
  explicit PeerVectors(Vectorized<T>* spill) : v(KT > 0 ? local : spill) {}
  PeerVectors(const PeerVectors&) = delete;
  Vectorized<T>& operator[](int64_t k) { return v[k]; }
  Vectorized<T> local[KT > 0 ? KT : 1];
  Vectorized<T>* v;
};

// out_k[c] = scale * sum_{j != k} x_j[c]. Prefix plus suffix sums instead of (total - own), which
// would cancel badly when peer k dominates a class.
template <int KT, typename T>
void sum_others(const T* const* x, int64_t k_runtime, int64_t n, T scale, T* out, int64_t ld,
                Vectorized<T>* spill) {
  using V = Vectorized<T>;
  const int64_t K = KT > 0 ? KT : k_runtime;
  const V vs(scale);
  PeerVectors<KT, T> prefix(spill);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    V sum(0);
    for (int64_t k = 0; k < K; ++k) {
      prefix[k] = sum;
      sum += load(x[k] + c, cnt);
    }
    sum = V(0);
    for (int64_t k = K - 1; k >= 0; --k) {
      store((prefix[k] + sum) * vs, out + k * ld + c, cnt);
      sum += load(x[k] + c, cnt);
    }
  });
}

// out_k[c] = sum_{j != k} W[k, j] x_j[c]. The diagonal is left out: it cancels in the gradient
// (W_kk q_k - W_kk q_k) and adds KL(q_k || q_k) = 0 to the loss. So are the weights of 0: x may be
// log q, -inf at a class that a peer masks, and 0 * -inf is NaN.
template <int KT, typename T>
void mix_others(const T* const* x, const T* W, int64_t k_runtime, int64_t n, T* out, int64_t ld,
                Vectorized<T>* spill) {
  using V = Vectorized<T>;
  const int64_t K = KT > 0 ? KT : k_runtime;
  PeerVectors<KT, T> xs(spill);
  for_each_vector<T>(n, [&](int64_t c, auto cnt) {
    for (int64_t j = 0; j < K; ++j) xs[j] = load(x[j] + c, cnt);
    for (int64_t k = 0; k < K; ++k) {
      V acc(0);
      for (int64_t j = 0; j < K; ++j) {
        if (j != k && W[k * K + j] != T(0)) acc = at::vec::fmadd(V(W[k * K + j]), xs[j], acc);
      }
      store(acc, out + k * ld + c, cnt);
    }
  });
}

template <typename scalar_t>
void to_float(const scalar_t* src, int64_t n, float* dst) {
  using RV = Vectorized<scalar_t>;
  constexpr int64_t F = Vectorized<float>::size();
  for (int64_t c = 0; c < n; c += RV::size()) {
    const int cnt = static_cast<int>(std::min<int64_t>(Vectorized<scalar_t>::size(), n - c));
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RV::loadu(src + c, cnt));
    lo.store(dst + c, std::min<int64_t>(cnt, F));
    if (cnt > F) hi.store(dst + c + F, cnt - F);
  }
}

template <typename scalar_t>
void from_float(const float* src, int64_t n, scalar_t* dst) {
  using FV = Vectorized<float>;
  constexpr int64_t F = FV::size();
  for (int64_t c = 0; c < n; c += Vectorized<scalar_t>::size()) {
    const int cnt = static_cast<int>(std::min<int64_t>(Vectorized<scalar_t>::size(), n - c));
    const FV lo = FV::loadu(src + c, std::min<int64_t>(cnt, F));
    const FV hi = cnt > F ? FV::loadu(src + c + F, cnt - F) : FV(0);
    at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + c, cnt);
  }
}

// ---------------------------------------------------------------------------------------------
// Problem description and per-thread scratch.

template <typename scalar_t, typename T>
struct Problem {
  const scalar_t* logits;  // [K, R, C] contiguous
  const int64_t* target;   // [R]
  const T* weights;        // [K, K], mode "weights" only
  int64_t K, R, C;
  Mode mode;
  Divergence divergence;  // "jsd" at beta 0 or 1 comes as the KL it is
  T beta;
  T one_minus_beta;  // from beta in double: near beta = 1, 1 - (T)beta would lose its digits
  T inv_T;
  bool unit_T;  // T == 1: q = p, which saves half of the exps
  T eps;
  int64_t ignore_index;
  bool with_ce;          // ce_weight > 0: else no cross-entropy is computed at all
  bool mimic_unlabeled;  // rows whose target is ignore_index keep their mimicry

  const scalar_t* row(int64_t k, int64_t r) const { return logits + (k * R + r) * C; }
  int64_t idx(int64_t k, int64_t r) const { return k * R + r; }  // index into [K, R] tensors
};

template <typename T>
struct Workspace {
  // About 1024 values per buffer keeps a chunk's working set in L1 for any K. `whole_rows`: the
  // gradient of a divergence other than KL, which keeps q and q * d of the whole row.
  Workspace(int64_t K, int64_t C, bool whole_rows)
      : width(std::min<int64_t>(std::max<int64_t>(16, 1024 / K / 16 * 16), C)),
        z(K * width),
        a(K * width),
        b(K * width),
        t(K * width),
        u(K * width),
        log_t(K * width),
        ratio(K * width),
        row_q(whole_rows ? K * C : 0),
        row_e(whole_rows ? K * C : 0),
        x(K),
        a_rows(K),
        b_rows(K),
        spill(K) {
    for (int64_t k = 0; k < K; ++k) {
      a_rows[k] = row(a, k);
      b_rows[k] = row(b, k);
    }
  }

  T* row(std::vector<T>& buf, int64_t k) { return buf.data() + k * width; }

  // Points x[k] at classes [c0, c0 + n) of each peer's row r, converted to T when needed.
  template <typename scalar_t>
  void load_chunk(const Problem<scalar_t, T>& pb, int64_t r, int64_t c0, int64_t n) {
    for (int64_t k = 0; k < pb.K; ++k) {
      if constexpr (std::is_same_v<scalar_t, T>) {
        x[k] = pb.row(k, r) + c0;
      } else {
        to_float(pb.row(k, r) + c0, n, row(z, k));
        x[k] = row(z, k);
      }
    }
  }

  int64_t width;                // classes per chunk
  std::vector<T> z, a, b, t, u;  // K rows of `width` each
  // Only for the divergences other than KL: log t_k of the ensemble modes, and the log-target mix
  // L_k, then q_k * d_k (divergence_terms), K rows each.
  std::vector<T> log_t, ratio;
  // q_k and q_k * d_k of the whole row, K rows of C each, kept by pass 2 for pass 3: they cost
  // exps and logs to recompute, and at K x C of a few hundred KiB they are still in L2 cache.
  std::vector<T> row_q, row_e;
  std::vector<const T*> x;      // the current chunk of logits, per peer
  std::vector<const T*> a_rows, b_rows;
  std::vector<Vectorized<T>> spill;  // per-class peer vectors when K is not a template argument
};

// Target distributions t_k of one chunk from the peers' q (rows of ws.b) into ws.t; for
// ensemble_logits, the target's logits u_k = mean_{j != k} z_j / T instead.
template <int KT, typename scalar_t, typename T>
void peer_targets(const Problem<scalar_t, T>& pb, Workspace<T>& ws, int64_t n) {
  const T inv_km1 = T(1) / static_cast<T>(pb.K - 1);
  switch (pb.mode) {
    case Mode::Pairwise:
    case Mode::Ensemble:
      sum_others<KT>(ws.b_rows.data(), pb.K, n, inv_km1, ws.t.data(), ws.width, ws.spill.data());
      break;
    case Mode::Weights:
      mix_others<KT>(ws.b_rows.data(), pb.weights, pb.K, n, ws.t.data(), ws.width,
                     ws.spill.data());
      break;
    case Mode::EnsembleLogits:
      sum_others<KT>(ws.x.data(), pb.K, n, pb.inv_T * inv_km1, ws.t.data(), ws.width,
                     ws.spill.data());
      break;
  }
}

// Weight of peer j's self term h_j in peer k's mimicry (pairwise and weights modes).
template <typename scalar_t, typename T>
T peer_weight(const Problem<scalar_t, T>& pb, int64_t k, int64_t j) {
  if (j == k) return T(0);
  return pb.mode == Mode::Weights ? pb.weights[k * pb.K + j] : T(1) / static_cast<T>(pb.K - 1);
}

// w_k, the weight of peer k's own q in its mimicry gradient (1/T)(w_k q_k - t_k).
template <typename scalar_t, typename T>
T own_weight(const Problem<scalar_t, T>& pb, int64_t k) {
  if (pb.mode != Mode::Weights) return T(1);
  T w = 0;
  for (int64_t j = 0; j < pb.K; ++j) w += peer_weight(pb, k, j);
  return w;
}

// Online logsumexp of one chunk: folds it into the running max m and the sums s = sum exp(x - m)
// and, unless s_T is null, s_T = sum exp(x / T - m / T).
template <typename T>
void fold_chunk(const T* x, int64_t n, T inv_T, T& m, double& s, double* s_T) {
  const T m_new = nan_max(m, max_of(x, n));
  if (m_new == kNegInf<T>) return;  // only -inf so far: nothing to add, and no (-inf) - (-inf)
  // The first chunk of a row rescales nothing (and no exp of -inf is called for it).
  const bool first = m == kNegInf<T>;
  s = (first ? 0.0 : s * std::exp(double(m) - m_new)) + sum_exp(x, n, T(1), m_new);
  if (s_T != nullptr) {
    const T shift = m_new * inv_T;
    const double kept = first ? 0.0 : *s_T * std::exp(double(m * inv_T) - shift);
    *s_T = kept + sum_exp(x, n, inv_T, shift);
  }
  m = m_new;
}

// ---------------------------------------------------------------------------------------------
// Loss and gradient of one row

// Where the per-row results go. The gradient of row (k, r) is scaled by scale.at(k, r).
template <typename scalar_t, typename T>
struct RowOut {
  T* ce;          // [K, R]
  T* mimicry;     // [K, R]
  scalar_t* grad;  // [K, R, C], or null when no gradient is asked for
};

// The factors of each row's gradient: grad_scale[k, r] when one was given (0-dim: strides 0)
// times, for each term, its weight in the loss and its row weight (for reduction "mean",
// 1 / the rows the term covers, or 1 / normalizer; else 1).
template <typename T>
struct GradScale {
  const T* values;  // null: none given
  int64_t stride_k, stride_r;
  T ce;         // ce_weight times the cross-entropy's row weight
  T mimicry_T;  // alpha * T^2 / T times the mimicry's row weight (d log q / dz carries a 1 / T)
  T at(int64_t k, int64_t r) const {
    return values == nullptr ? T(1) : values[k * stride_k + r * stride_r];
  }
};

// Per-peer scalars of the row being processed. Sums over chunks are kept in double: in the
// pairwise and weights modes the mimicry is a difference of two sums of entropy size.
template <typename T>
struct PeerState {
  explicit PeerState(int64_t K)
      : m(K), m_u(K), s(K), s_T(K), s_u(K), sum_d(K), h(K), y(K), kl(K), inner(K), kl_t(K) {}
  void reset() {
    std::fill(m.begin(), m.end(), kNegInf<T>);
    std::fill(m_u.begin(), m_u.end(), kNegInf<T>);
    for (auto* v : {&s, &s_T, &s_u, &sum_d, &h, &y, &kl, &inner, &kl_t}) {
      std::fill(v->begin(), v->end(), 0.0);
    }
  }
  // Maxima of z and of the ensemble_logits target's logits u.
  std::vector<T> m, m_u;
  // Shifted sums of exp of z, z / T and u (replaced by their logs after pass 1); sum_c (z - m);
  // sum_c q log q; sum_c t log q; sum_c t (log t - log q); for the other divergences
  // <q_k, d_k> and the JSD's sum_j W[k, j] KL(t_j || m_kj).
  std::vector<double> s, s_T, s_u, sum_d, h, y, kl, inner, kl_t;
};

// The chunk's terms of a divergence other than KL, from every peer's log q (ws.a) and q (ws.b):
// the log-target mix L_k, such that d_k = w_k log q_k - L_k (docs/design.md, Other divergences),
// into ws.ratio, then q_k * d_k into e (row k at e + k * ld). Adds <q_k, d_k> to st.inner and the
// JSD's targets' KL to their mixtures to st.kl_t.
//   reverse KL: L_k = sum_j W[k, j] log q_j, or log t_k in the ensemble modes.
//   JSD: L_k = sum_j W[k, j] (log m_kj - log q_k) with m_kj = beta q_j + (1 - beta) q_k, and
//        w_k = 0: a logarithm per pair and class (per unordered pair at beta = 1/2), or the one
//        target's m_k in the ensemble modes.
template <int KT, typename scalar_t, typename T>
void divergence_terms(const Problem<scalar_t, T>& pb, Workspace<T>& ws, PeerState<T>& st,
                      int64_t n, T* e, int64_t ld) {
  const int64_t K = KT > 0 ? KT : pb.K;
  const bool one_target = pb.mode == Mode::Ensemble || pb.mode == Mode::EnsembleLogits;
  if (one_target) {  // t_k into ws.t and log t_k into ws.log_t
    peer_targets<KT>(pb, ws, n);
    for (int64_t k = 0; k < K; ++k) {
      T* t = ws.row(ws.t, k);
      if (pb.mode == Mode::Ensemble) {
        log_of(t, n, ws.row(ws.log_t, k));
      } else {  // from the target's logits, in place
        double unused_d = 0, unused_h = 0;
        log_softmax(t, n, T(1), st.m_u[k], static_cast<T>(st.s_u[k]), ws.row(ws.log_t, k), t,
                    unused_d, unused_h);
      }
    }
  }
  const T* L = ws.ratio.data();
  if (pb.divergence == Divergence::JSD) {  // L_k = sum_j W[k, j] (log m_kj - log q_k): d_k = -L_k
    std::fill(ws.ratio.begin(), ws.ratio.end(), T(0));
    const T beta = pb.beta, one_minus_beta = pb.one_minus_beta;
    // At beta = 1/2 the pairs (k, j) and (j, k) share their mixture: one logarithm serves both.
    const bool mirrored = !one_target && beta == T(0.5);
    for (int64_t k = 0; k < K; ++k) {
      const T* q = ws.row(ws.b, k);
      const T* log_q = ws.row(ws.a, k);
      T* L_k = ws.row(ws.ratio, k);
      if (one_target) {
        st.kl_t[k] += jsd_pair(ws.row(ws.t, k), ws.row(ws.log_t, k), q, log_q, n, beta,
                               one_minus_beta, T(1), L_k, T(0), static_cast<T*>(nullptr))
                          .first;
        continue;
      }
      for (int64_t j = mirrored ? k + 1 : 0; j < K; ++j) {
        const T w = peer_weight(pb, k, j), w_mirror = mirrored ? peer_weight(pb, j, k) : T(0);
        if (w == T(0) && w_mirror == T(0)) continue;  // j == k, or peers k does not imitate
        const auto [kl_j, kl_k] =
            jsd_pair(ws.row(ws.b, j), ws.row(ws.a, j), q, log_q, n, beta, one_minus_beta, w, L_k,
                     w_mirror, mirrored ? ws.row(ws.ratio, j) : nullptr);
        st.kl_t[k] += static_cast<double>(w) * kl_j;
        st.kl_t[j] += static_cast<double>(w_mirror) * kl_k;
      }
    }
  } else if (one_target) {
    L = ws.log_t.data();
  } else if (pb.mode == Mode::Pairwise) {
    sum_others<KT>(ws.a_rows.data(), K, n, T(1) / static_cast<T>(K - 1), ws.ratio.data(),
                   ws.width, ws.spill.data());
  } else {
    mix_others<KT>(ws.a_rows.data(), pb.weights, K, n, ws.ratio.data(), ws.width,
                   ws.spill.data());
  }
  for (int64_t k = 0; k < K; ++k) {
    const T w_k = pb.divergence == Divergence::JSD ? T(0) : own_weight(pb, k);
    st.inner[k] += log_ratio_terms(ws.row(ws.b, k), ws.row(ws.a, k), w_k, L + k * ws.width, n,
                                   e + k * ld);
  }
}

// One chunk's gradient for peer k: g = g_ce (p - (1 - eps) onehot - eps / C) + q_coef q
// + t_coef t, p computed from the chunk's logits (ws.x) when T != 1. The mimicry's part is
// (g_mim / T) (w_k q - t_k) for KL, and (g_mim / T) (q * d - <q, d> q) with t = q * d for the
// other divergences. label is -1 in rows without a cross-entropy.
template <typename scalar_t, typename T>
void chunk_gradient(const Problem<scalar_t, T>& pb, Workspace<T>& ws, int64_t k, int64_t label,
                    int64_t c0, int64_t n, T lse, T g_ce, const T* q, T q_coef, const T* t,
                    T t_coef, scalar_t* dst) {
  const T* p = q;
  if (!pb.unit_T && g_ce != T(0)) {  // without a cross-entropy p is multiplied by 0: q will do
    exp_affine(ws.x[k], n, T(1), lse, ws.row(ws.a, k));
    p = ws.row(ws.a, k);
  }
  T* g;
  if constexpr (std::is_same_v<scalar_t, T>) {
    g = dst;
  } else {
    g = ws.row(ws.u, k);
  }
  gradient(p, q, t, n, g_ce, q_coef, t_coef, -g_ce * pb.eps / static_cast<T>(pb.C), g);
  // The one-hot term, in T before any cast to a narrower dtype (p - 1 cancels at p ~ 1).
  if (label >= c0 && label < c0 + n) g[label - c0] -= g_ce * (T(1) - pb.eps);
  if constexpr (!std::is_same_v<scalar_t, T>) from_float(g, n, dst);
}

// Pass 1 finds each peer's maxima and sums of exp; pass 2 recomputes q, the targets and the
// loss sums and, for KL, writes the gradient: two reads of the row and one write. The other
// divergences' gradient needs <q_k, d_k>, a sum over the whole row: pass 2 keeps q_k and
// q_k * d_k of the whole row in the workspace (in L2 cache for rows of a few hundred KiB), and
// pass 3 writes the gradient from them, with no exp or log.
template <int KT, typename scalar_t, typename T>
void loss_row(const Problem<scalar_t, T>& pb, int64_t r, Workspace<T>& ws, PeerState<T>& st,
              const RowOut<scalar_t, T>& out, const GradScale<T>& scale) {
  const int64_t K = KT > 0 ? KT : pb.K;
  const int64_t C = pb.C, width = ws.width;
  const bool labeled = pb.target[r] != pb.ignore_index;
  if (!labeled && !pb.mimic_unlabeled) {
    for (int64_t k = 0; k < K; ++k) {
      out.ce[pb.idx(k, r)] = out.mimicry[pb.idx(k, r)] = T(0);
      if (out.grad != nullptr) std::fill_n(out.grad + pb.idx(k, r) * C, C, scalar_t(0));
    }
    return;
  }
  const bool with_ce = labeled && pb.with_ce;
  const int64_t label = with_ce ? pb.target[r] : -1;
  const T ce_scale = with_ce ? scale.ce : T(0);
  const bool logit_target = pb.mode == Mode::EnsembleLogits;
  st.reset();

  // Pass 1: per-peer maxima and sums of exp.
  for (int64_t c0 = 0; c0 < C; c0 += width) {
    const int64_t n = std::min(width, C - c0);
    ws.load_chunk(pb, r, c0, n);
    for (int64_t k = 0; k < K; ++k) {
      fold_chunk(ws.x[k], n, pb.inv_T, st.m[k], st.s[k], pb.unit_T ? nullptr : &st.s_T[k]);
    }
    if (logit_target) {
      peer_targets<KT>(pb, ws, n);
      for (int64_t k = 0; k < K; ++k) {
        fold_chunk(ws.row(ws.t, k), n, T(1), st.m_u[k], st.s_u[k], nullptr);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    st.s[k] = std::log(st.s[k]);
    st.s_T[k] = pb.unit_T ? st.s[k] : std::log(st.s_T[k]);
    if (logit_target) st.s_u[k] = std::log(st.s_u[k]);
  }
  const auto& log_s = st.s;
  const auto& log_s_T = st.s_T;
  const auto& log_s_u = st.s_u;
  // log q (ws.a) and q (ws.b) of a chunk's peers; their sums go to st in pass 2 only.
  const bool kl = pb.divergence == Divergence::KL;
  const bool whole_rows = !kl && out.grad != nullptr;  // pass 3 follows

  // Pass 2: log q (ws.a), q (ws.b), the targets (ws.t), the sums and, for KL, the gradient.
  for (int64_t c0 = 0; c0 < C; c0 += width) {
    const int64_t n = std::min(width, C - c0);
    ws.load_chunk(pb, r, c0, n);
    for (int64_t k = 0; k < K; ++k) {
      log_softmax(ws.x[k], n, pb.inv_T, st.m[k], static_cast<T>(log_s_T[k]), ws.row(ws.a, k),
                  ws.row(ws.b, k), st.sum_d[k], st.h[k]);
    }
    if (!kl) {
      if (whole_rows) {
        for (int64_t k = 0; k < K; ++k) {
          std::copy_n(ws.row(ws.b, k), n, ws.row_q.data() + k * C + c0);
        }
        divergence_terms<KT>(pb, ws, st, n, ws.row_e.data() + c0, C);
      } else {
        divergence_terms<KT>(pb, ws, st, n, ws.ratio.data(), width);
      }
      continue;
    }
    peer_targets<KT>(pb, ws, n);
    for (int64_t k = 0; k < K; ++k) {
      T* t = ws.row(ws.t, k);
      const T* log_q = ws.row(ws.a, k);
      switch (pb.mode) {
        case Mode::Pairwise:
        case Mode::Weights:
          st.y[k] += sum_plogq(t, log_q, n);
          break;
        case Mode::Ensemble:
          st.kl[k] += kl_div(t, log_q, n);
          break;
        case Mode::EnsembleLogits:
          st.kl[k] += kl_div_logits(t, st.m_u[k], static_cast<T>(log_s_u[k]), log_q, n);
          break;
      }
    }
    if (out.grad == nullptr) continue;
    for (int64_t k = 0; k < K; ++k) {
      T* t = ws.row(ws.t, k);
      if (logit_target) {  // the target distribution itself, from its logits
        exp_affine(t, n, T(1), static_cast<T>(st.m_u[k] + log_s_u[k]), t);
      }
      const T g_scale = scale.at(k, r), g_mim_T = scale.mimicry_T * g_scale;
      chunk_gradient(pb, ws, k, label, c0, n, static_cast<T>(st.m[k] + log_s[k]),
                     ce_scale * g_scale, ws.row(ws.b, k), g_mim_T * own_weight(pb, k), t,
                     -g_mim_T, out.grad + pb.idx(k, r) * C + c0);
    }
  }

  // Pass 3 (divergences other than KL): the gradient, (g_mim / T) * factor * q * (d - <q, d>),
  // from the row's q and q * d; the logits are read again only for the cross-entropy's p at T != 1.
  if (whole_rows) {
    const T factor = pb.divergence == Divergence::JSD ? pb.one_minus_beta : T(1);
    const bool needs_p = !pb.unit_T && ce_scale != T(0);
    for (int64_t c0 = 0; c0 < C; c0 += width) {
      const int64_t n = std::min(width, C - c0);
      if (needs_p) ws.load_chunk(pb, r, c0, n);
      for (int64_t k = 0; k < K; ++k) {
        const T g_scale = scale.at(k, r), coef = scale.mimicry_T * g_scale * factor;
        chunk_gradient(pb, ws, k, label, c0, n, static_cast<T>(st.m[k] + log_s[k]),
                       ce_scale * g_scale, ws.row_q.data() + k * C + c0,
                       static_cast<T>(-coef * st.inner[k]), ws.row_e.data() + k * C + c0, coef,
                       out.grad + pb.idx(k, r) * C + c0);
      }
    }
  }

  const double eps = pb.eps, beta = pb.beta, one_minus_beta = pb.one_minus_beta;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = pb.idx(k, r);
    double ce = 0;  // no cross-entropy at all where it has no weight: not even 0 * inf
    if (with_ce) {
      const double m = st.m[k], z_label = static_cast<T>(pb.row(k, r)[label]);
      ce = (1 - eps) * ((m - z_label) + log_s[k]);
      // Skipped at eps = 0 so that -inf logits of other classes keep the loss finite.
      if (eps > 0) ce += eps * (log_s[k] - st.sum_d[k] / static_cast<double>(C));
    }
    out.ce[i] = static_cast<T>(ce);

    double mimicry = 0;
    switch (pb.divergence) {
      case Divergence::KL:
        mimicry = st.kl[k];
        if (pb.mode == Mode::Pairwise || pb.mode == Mode::Weights) {
          mimicry = -st.y[k];
          for (int64_t j = 0; j < K; ++j) mimicry += peer_weight(pb, k, j) * st.h[j];
        }
        break;
      case Divergence::ReverseKL:
        mimicry = st.inner[k];
        break;
      case Divergence::JSD:
        mimicry = beta * st.kl_t[k] + one_minus_beta * st.inner[k];
        break;
    }
    out.mimicry[i] = static_cast<T>(mimicry);
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch and bindings

// Calls f(std::integral_constant<int, K>) for K = 2..8 and f(std::integral_constant<int, 0>)
// (K known only at run time) beyond.
template <typename F>
void dispatch_peers(int64_t K, const F& f) {
  switch (K) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// Enough rows per block that threads start only for enough work and claim blocks rarely.
// (at::parallel_for is inline: it only spreads work over threads when this file is compiled with
// OpenMP, -fopenmp.)
int64_t row_grain(int64_t K, int64_t C) {
  return std::max<int64_t>(1, 32768 / (K * C));
}

// Runs worker(claim) once on each thread, where claim() returns the first row of the next block
// of `grain` rows, R or more when none are left. Threads claim blocks as they go rather than take
// equal shares up front, so a thread that other work on the machine slows down takes fewer rows
// instead of holding the others up; per-row results do not depend on which thread computes them.
template <typename F>
void for_row_blocks(int64_t R, int64_t grain, const F& worker) {
  std::atomic<int64_t> next{0};
  const auto claim = [&] { return next.fetch_add(grain, std::memory_order_relaxed); };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), at::divup(R, grain));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(claim); });
}

// A fresh output is faulted in on first write. In 4 KiB pages that alone can cost more than the
// whole gradient computation (measured: ~1.5 ns per float on a 2-core VM); transparent huge pages
// cut the faults 512-fold. Only the 2 MiB-aligned interior of the untouched buffer is advised.
void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// One pass over the targets: each in [0, C) or ignore_index (else a ValueError); returns how
// many rows count.
int64_t count_valid_targets(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t* y = target.const_data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t r = 0; r < target.numel(); ++r) {
    if (y[r] == ignore_index) continue;
    TORCH_CHECK_VALUE(y[r] >= 0 && y[r] < C, "target values must be in [0, ", C,
                      ") or equal ignore_index=", ignore_index, ", found ", y[r], " (row ", r,
                      ")");
    ++valid;
  }
  return valid;
}

// Sums [K, R] per-row terms over the rows in a fixed order, times `factor`, into [K].
template <typename T>
void sum_rows(const T* rows, int64_t K, int64_t R, double factor, T* out) {
  for (int64_t k = 0; k < K; ++k) {
    double sum = 0;
    for (int64_t r = 0; r < R; ++r) sum += rows[k * R + r];
    out[k] = static_cast<T>(sum * factor);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_mutual_loss_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in,
    const std::optional<at::Tensor>& weights_in, const std::optional<at::Tensor>& grad_scale,
    c10::string_view mode_name, double temperature, double alpha, double label_smoothing,
    int64_t ignore_index, c10::string_view reduction_name, bool compute_grad,
    c10::string_view divergence_name, double beta, double ce_weight, bool mimic_unlabeled,
    const std::optional<at::Tensor>& normalizer) {
  const Mode mode = parse_mode(mode_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const Divergence divergence = computed_divergence(parse_divergence(divergence_name), beta);
  check_fused_args(logits_in, target_in, weights_in, grad_scale, mode, temperature, alpha,
                   label_smoothing, reduction, beta, ce_weight, normalizer);
  // On the CPU the normalizer is read on the host, so its value is checked here.
  const double normalizer_value = normalizer.has_value() ? normalizer->item<double>() : 1.0;
  TORCH_CHECK_VALUE(normalizer_value > 0, "fastdml: normalizer must be > 0, got ",
                    normalizer_value);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t K = logits.size(0), R = logits.size(1), C = logits.size(2);
  const int64_t labeled = count_valid_targets(target, C, ignore_index);
  const int64_t mimicked = mimic_unlabeled ? R : labeled;
  const at::Tensor weights = mode == Mode::Weights ? weights_in->contiguous() : at::Tensor();

  // The row weights of the two terms in the reduced loss. "mean": each peer's mean over the rows
  // the term covers (none: a loss of 0), or both sums divided by the normalizer.
  double ce_row_weight = 1.0, mimicry_row_weight = 1.0;
  if (reduction == Reduction::Mean) {
    const auto mean_over = [&](int64_t rows) {
      return 1.0 / (normalizer.has_value() ? normalizer_value
                                           : static_cast<double>(std::max<int64_t>(rows, 1)));
    };
    ce_row_weight = mean_over(labeled);
    mimicry_row_weight = mean_over(mimicked);
  }

  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  // Per-row cross-entropy and mimicry: the outputs of reduction "none".
  at::Tensor ce_rows = at::empty({K, R}, opts);
  at::Tensor mimicry_rows = at::empty({K, R}, opts);
  at::Tensor grad = at::empty(compute_grad ? logits.sizes() : at::IntArrayRef{0}, logits.options());
  if (compute_grad) advise_huge_pages(grad);
  at::Tensor loss, ce, mimicry;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "fused_mutual_loss_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        const Problem<scalar_t, T> pb{logits.const_data_ptr<scalar_t>(),
                                      target.const_data_ptr<int64_t>(),
                                      weights.defined() ? weights.const_data_ptr<T>() : nullptr,
                                      K,
                                      R,
                                      C,
                                      mode,
                                      divergence,
                                      static_cast<T>(beta),
                                      static_cast<T>(1.0 - beta),
                                      static_cast<T>(1.0 / temperature),
                                      temperature == 1.0,
                                      static_cast<T>(label_smoothing),
                                      ignore_index,
                                      ce_weight != 0,
                                      mimic_unlabeled};
        GradScale<T> scale{nullptr, 0, 0, static_cast<T>(ce_weight * ce_row_weight),
                           static_cast<T>(alpha * temperature * mimicry_row_weight)};
        if (grad_scale.has_value()) {
          scale.values = grad_scale->const_data_ptr<T>();
          if (grad_scale->dim() == 2) {
            scale.stride_k = grad_scale->stride(0);
            scale.stride_r = grad_scale->stride(1);
          }
        }
        const RowOut<scalar_t, T> out{ce_rows.mutable_data_ptr<T>(),
                                      mimicry_rows.mutable_data_ptr<T>(),
                                      compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr};
        dispatch_peers(K, [&](auto kt) {
          const int64_t grain = row_grain(K, C);
          for_row_blocks(R, grain, [&](const auto& claim) {
            Workspace<T> ws(K, C, divergence != Divergence::KL && compute_grad);
            PeerState<T> st(K);
            for (int64_t begin; (begin = claim()) < R;) {
              for (int64_t r = begin; r < std::min(begin + grain, R); ++r) {
                loss_row<decltype(kt)::value>(pb, r, ws, st, out, scale);
              }
            }
          });
        });
        const T ce_weight_T = static_cast<T>(ce_weight);
        const T weight_T2 = static_cast<T>(alpha * temperature * temperature);
        if (reduction == Reduction::None) {
          ce = ce_rows;
          mimicry = mimicry_rows;
          loss = at::empty({K, R}, opts);
          T* dst = loss.mutable_data_ptr<T>();
          for (int64_t i = 0; i < K * R; ++i) {
            dst[i] = ce_weight_T * out.ce[i] + weight_T2 * out.mimicry[i];
          }
          return;
        }
        ce = at::empty({K}, opts);
        mimicry = at::empty({K}, opts);
        loss = at::empty({}, opts);
        T* ce_k = ce.mutable_data_ptr<T>();
        T* mimicry_k = mimicry.mutable_data_ptr<T>();
        sum_rows(out.ce, K, R, ce_row_weight, ce_k);
        sum_rows(out.mimicry, K, R, mimicry_row_weight, mimicry_k);
        double total = 0;
        for (int64_t k = 0; k < K; ++k) total += ce_weight_T * ce_k[k] + weight_T2 * mimicry_k[k];
        *loss.mutable_data_ptr<T>() = static_cast<T>(total);
      });
  return {loss, ce, mimicry, grad};
}

// grad *= grad_loss, row by row ([K, R]) or as a whole (0-dim), leaving alone what is scaled by
// 1: the backward of "mean" and "sum" under loss.backward() reads the gradient not at all.
void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_loss) {
  check_scale_grad_args(grad, grad_loss);
  const int64_t K = grad.size(0), R = grad.size(1), C = grad.size(2);
  const auto [stride_k, stride_r] = row_strides(grad_loss);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cpu", [&] {
        using T = at::opmath_type<scalar_t>;
        const T* factor = grad_loss.const_data_ptr<T>();
        scalar_t* g = grad.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, K * R, std::max<int64_t>(1, 32768 / C), [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const T f = factor[(i / R) * stride_k + (i % R) * stride_r];
            if (f == T(1)) continue;
            scalar_t* row = g + i * C;
            for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(f * row[c]);
          }
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdml, CPU, m) {
  m.impl("fused_mutual_loss", &fused_mutual_loss_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace fastdml
