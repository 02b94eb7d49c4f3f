// One-pass Schedule-Free update on the CPU: reads y, g, z (and v) once and writes y, z (and v),
// for a whole list of tensors in one call. Same math as sf_dist/kernels.py (see its docstring).
// State kept in bf16 under fp32/fp64 params (state_dtype=torch.bfloat16) is widened, stepped and
// rounded back stochastically in the same pass.
// Also the gradients' finiteness check, one read pass over a whole list.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// splitmix64's output function, to derive each tensor's stream from the step's seed.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A 32-bit integer hash (Wellons' lowbias32): 32-bit multiplies only, so the loop vectorises. The
// random bits of element i are hash(i ^ seed): a counter-based stream, so they depend on (seed, i)
// alone, not on how parallel_for splits the range.
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// Unbiased rounding of an fp32 value into bf16 (as sf_dist/kernels/rounding.py): 16 random bits
// added below the kept ones carry into them with probability equal to the dropped fraction.
// NaN and Inf stay what they are (a NaN keeps a nonzero mantissa). Integer selects, no branch.
inline c10::BFloat16 round_bf16(float x, uint32_t noise) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const bool special = (bits & 0x7F800000u) == 0x7F800000u;
  const uint32_t nan = (bits & 0x007FFFFFu) != 0 ? 0x40u : 0u;
  const uint32_t out = special ? (bits >> 16) | nan : (bits + (noise & 0xFFFFu)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(out), c10::BFloat16::from_bits());
}

// Store a computed state value: rounded stochastically (Round: bf16 state), else a plain cast.
template <typename S, bool Round, typename A>
inline S store(A x, uint32_t noise) {
  if constexpr (Round) {
    return round_bf16(static_cast<float>(x), noise);
  } else {
    return static_cast<S>(x);
  }
}

// c = [lr, ckp1, y_coef, wd_y, wd_z, shrink, beta2, 1-beta2, 1/bias_correction2, eps, normalize,
// mu, 1-mu, 1/bias_correction1], each computed in double on the host: here they are only rounded
// once to A (float for fp32/bf16/fp16). HasV/Normalize/HasM are template arguments so that the
// inner loop has no branch and vectorises. HasM: AdamW's inner momentum m = mu*m + (1-mu)*g.
// T: y and g; S: z, v and m (T, or bf16 rounded stochastically: z and v with the low and high
// half of the element's random word, m with a second word).
template <typename T, typename S, typename A, bool HasV, bool Normalize, bool HasM>
void update_range(T* __restrict y, const T* __restrict g, S* __restrict z, S* __restrict v, S* __restrict m,
                  int64_t begin, int64_t end, const double* c, uint64_t seed) {
  constexpr bool Round = !std::is_same_v<S, T>;
  const A lr = c[0], ckp1 = c[1], y_coef = c[2], wd_y = c[3], wd_z = c[4], shrink = c[5];
  const A beta2 = c[6], one_minus_beta2 = c[7], inv_bc2 = c[8], eps = c[9];
  const A mu = c[11], one_minus_mu = c[12], inv_bc1 = c[13];
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t index = static_cast<uint32_t>(i) ^ (static_cast<uint32_t>(i >> 32) * 0x9E3779B9u);
    const uint32_t noise = Round ? hash32(index ^ static_cast<uint32_t>(seed)) : 0;
    const A gi = static_cast<A>(g[i]);
    const A y0 = static_cast<A>(y[i]) * shrink;
    const A z0 = static_cast<A>(z[i]) * shrink;
    A num = gi;
    if constexpr (HasM) {
      const A m1 = static_cast<A>(m[i]) * mu + gi * one_minus_mu;
      m[i] = store<S, Round>(m1, Round ? hash32(noise ^ static_cast<uint32_t>(seed >> 32)) : 0);
      num = m1 * inv_bc1;
    }
    A gn = num;
    if constexpr (HasV) {
      const A v1 = static_cast<A>(v[i]) * beta2 + gi * gi * one_minus_beta2;
      v[i] = store<S, Round>(v1, noise >> 16);
      if constexpr (Normalize) gn = num / (std::sqrt(v1 * inv_bc2) + eps);
    }
    gn += wd_y * y0 + wd_z * z0;
    y[i] = static_cast<T>(y0 + ckp1 * (z0 - y0) + y_coef * gn);
    z[i] = store<S, Round>(z0 - lr * gn, noise);
  }
}

template <typename T, typename S, typename A, bool HasV, bool Normalize, bool HasM>
void update(T* y, const T* g, S* z, S* v, S* m, int64_t n, const double* c, uint64_t seed) {
  at::parallel_for(0, n, 65536, [=](int64_t begin, int64_t end) {
    update_range<T, S, A, HasV, Normalize, HasM>(y, g, z, v, m, begin, end, c, seed);
  });
}

template <typename T, typename S, bool HasM>
void dispatch_v(T* y, const T* g, S* z, S* v, S* m, int64_t n, const double* c, uint64_t seed) {
  using A = at::opmath_type<T>;
  if (c[10] != 0.0) {
    update<T, S, A, true, true, HasM>(y, g, z, v, m, n, c, seed);
  } else {
    update<T, S, A, true, false, HasM>(y, g, z, v, m, n, c, seed);
  }
}

template <typename T, typename S>
void dispatch(T* y, const T* g, S* z, S* v, S* m, int64_t n, const double* c, uint64_t seed) {
  using A = at::opmath_type<T>;
  if (v == nullptr) {
    update<T, S, A, false, false, false>(y, g, z, v, m, n, c, seed);
  } else if (m != nullptr) {
    dispatch_v<T, S, true>(y, g, z, v, m, n, c, seed);
  } else {
    dispatch_v<T, S, false>(y, g, z, v, m, n, c, seed);
  }
}

template <typename T, typename S>
void dispatch_tensor(const at::Tensor& y, const at::Tensor& g, const at::Tensor& z, const at::Tensor* v,
                     const at::Tensor* m, const double* c, uint64_t seed) {
  dispatch<T, S>(y.data_ptr<T>(), g.data_ptr<T>(), z.data_ptr<S>(), v ? v->data_ptr<S>() : nullptr,
                 m ? m->data_ptr<S>() : nullptr, y.numel(), c, seed);
}

// seed: the random stream of the stochastic rounding (used only where the state is bf16 and the
// params are fp32/fp64); each tensor of the list draws from its own stream.
void step(const std::vector<at::Tensor>& ys, const std::vector<at::Tensor>& gs, const std::vector<at::Tensor>& zs,
          const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& ms, const at::Tensor& constants,
          int64_t seed) {
  TORCH_CHECK(constants.scalar_type() == at::kDouble && constants.numel() == 14, "constants: 14 doubles");
  TORCH_CHECK(vs.empty() || vs.size() == ys.size(), "exp_avg_sqs must be empty or match params");
  TORCH_CHECK(ms.empty() || (ms.size() == ys.size() && !vs.empty()), "exp_avgs must be empty or match params");
  const double* c = constants.data_ptr<double>();
  for (size_t i = 0; i < ys.size(); ++i) {
    const at::Tensor& y = ys[i];
    const at::Tensor* v = vs.empty() ? nullptr : &vs[i];
    const at::Tensor* m = ms.empty() ? nullptr : &ms[i];
    const at::ScalarType state = zs[i].scalar_type();
    for (const at::Tensor* t : {&y, &gs[i], &zs[i], v, m}) {
      TORCH_CHECK(t == nullptr || (t->is_contiguous() && t->device().is_cpu() && t->numel() == y.numel() &&
                                   t->scalar_type() == (t == &y || t == &gs[i] ? y.scalar_type() : state)),
                  "fused CPU step needs contiguous CPU tensors of one size, params and grads of one dtype, "
                  "the state of one dtype");
    }
    const uint64_t stream = mix64(static_cast<uint64_t>(seed) + (i + 1) * 0xD1B54A32D192ED03ull);
    if (state == y.scalar_type()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "sf_fused_step", [&] {
        dispatch_tensor<scalar_t, scalar_t>(y, gs[i], zs[i], v, m, c, stream);
      });
    } else {
      TORCH_CHECK(state == at::kBFloat16, "fused CPU step: state narrower than the params must be bf16");
      AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "sf_fused_step_bf16_state", [&] {
        dispatch_tensor<scalar_t, c10::BFloat16>(y, gs[i], zs[i], v, m, c, stream);
      });
    }
  }
}

// True when every element is finite: x*0 is 0 for finite x and NaN for Inf/NaN. Sixteen
// independent lanes let the compiler vectorise without reassociating a floating-point sum; four
// streams over the range's quarters keep more cache misses in flight (a read from memory went from
// ~16 to ~21 GB/s at 2 threads, 4 streams better than 1, 2 or 8; software prefetch made it slower).
template <typename T>
bool range_finite(const T* __restrict p, int64_t n) {
  using A = at::opmath_type<T>;
  constexpr int kLanes = 16, kStreams = 4;
  A lanes[kStreams][kLanes] = {};
  const int64_t quarter = n / kStreams / kLanes * kLanes;
  for (int64_t i = 0; i < quarter; i += kLanes) {
    for (int s = 0; s < kStreams; ++s) {
      for (int j = 0; j < kLanes; ++j) lanes[s][j] += static_cast<A>(p[s * quarter + i + j]) * A(0);
    }
  }
  A sum = 0;
  for (int64_t i = kStreams * quarter; i < n; ++i) sum += static_cast<A>(p[i]) * A(0);
  for (int s = 0; s < kStreams; ++s) {
    for (int j = 0; j < kLanes; ++j) sum += lanes[s][j];
  }
  return sum == A(0);
}

// Index of the first tensor holding a NaN or Inf, -1 if none: one read pass, no temporaries, in ONE
// parallel region over blocks of every tensor (a region per tensor cost more than the reading on
// lists of many 1 MB tensors, most of all when a thread was descheduled at a region's barrier).
int64_t first_nonfinite(const std::vector<at::Tensor>& ts) {
  constexpr int64_t kBlock = 65536;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (tensor, first element)
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].is_contiguous() && ts[i].device().is_cpu(), "first_nonfinite needs contiguous CPU tensors");
    for (int64_t start = 0; start < ts[i].numel(); start += kBlock) blocks.emplace_back(i, start);
  }
  std::atomic<int64_t> first{INT64_MAX};
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [i, start] = blocks[b];
      if (i >= first.load(std::memory_order_relaxed)) continue;  // an earlier tensor is already bad
      const at::Tensor& t = ts[i];
      const int64_t end = std::min(start + kBlock, t.numel());
      bool finite = true;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "sf_first_nonfinite", [&] {
        finite = range_finite<scalar_t>(t.const_data_ptr<scalar_t>() + start, end - start);
      });
      for (int64_t seen = first.load(); !finite && i < seen && !first.compare_exchange_weak(seen, i);) {
      }
    }
  });
  return first == INT64_MAX ? -1 : first.load();
}

}  // namespace

TORCH_LIBRARY(sf_dist, m) {
  m.def("first_nonfinite(Tensor[] tensors) -> int", &first_nonfinite);
  m.def("fused_step(Tensor[] ys, Tensor[] grads, Tensor[] zs, Tensor[] exp_avg_sqs, Tensor[] exp_avgs, "
        "Tensor constants, int seed=0) -> ()", &step);
}
