// One-pass Schedule-Free update on the CPU: reads y, g, z (and v) once and writes y, z (and v),
// for a whole list of tensors in one call. Same math as sf_dist/kernels.py (see its docstring).
// Also the gradients' finiteness check, one read pass over a whole list.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

// c = [lr, ckp1, y_coef, wd_y, wd_z, shrink, beta2, 1-beta2, 1/bias_correction2, eps, normalize,
// mu, 1-mu, 1/bias_correction1], each computed in double on the host: here they are only rounded
// once to A (float for fp32/bf16/fp16). HasV/Normalize/HasM are template arguments so that the
// inner loop has no branch and vectorises. HasM: AdamW's inner momentum m = mu*m + (1-mu)*g.
template <typename T, typename A, bool HasV, bool Normalize, bool HasM>
void update_range(T* __restrict y, const T* __restrict g, T* __restrict z, T* __restrict v, T* __restrict m,
                  int64_t begin, int64_t end, const double* c) {
  const A lr = c[0], ckp1 = c[1], y_coef = c[2], wd_y = c[3], wd_z = c[4], shrink = c[5];
  const A beta2 = c[6], one_minus_beta2 = c[7], inv_bc2 = c[8], eps = c[9];
  const A mu = c[11], one_minus_mu = c[12], inv_bc1 = c[13];
  for (int64_t i = begin; i < end; ++i) {
    const A gi = static_cast<A>(g[i]);
    const A y0 = static_cast<A>(y[i]) * shrink;
    const A z0 = static_cast<A>(z[i]) * shrink;
    A num = gi;
    if constexpr (HasM) {
      const A m1 = static_cast<A>(m[i]) * mu + gi * one_minus_mu;
      m[i] = static_cast<T>(m1);
      num = m1 * inv_bc1;
    }
    A gn = num;
    if constexpr (HasV) {
      const A v1 = static_cast<A>(v[i]) * beta2 + gi * gi * one_minus_beta2;
      v[i] = static_cast<T>(v1);
      if constexpr (Normalize) gn = num / (std::sqrt(v1 * inv_bc2) + eps);
    }
    gn += wd_y * y0 + wd_z * z0;
    y[i] = static_cast<T>(y0 + ckp1 * (z0 - y0) + y_coef * gn);
    z[i] = static_cast<T>(z0 - lr * gn);
  }
}

template <typename T, typename A, bool HasV, bool Normalize, bool HasM>
void update(T* y, const T* g, T* z, T* v, T* m, int64_t n, const double* c) {
  at::parallel_for(0, n, 65536, [=](int64_t begin, int64_t end) {
    update_range<T, A, HasV, Normalize, HasM>(y, g, z, v, m, begin, end, c);
  });
}

template <typename T, bool HasM>
void dispatch_v(T* y, const T* g, T* z, T* v, T* m, int64_t n, const double* c) {
  using A = at::opmath_type<T>;
  if (c[10] != 0.0) {
    update<T, A, true, true, HasM>(y, g, z, v, m, n, c);
  } else {
    update<T, A, true, false, HasM>(y, g, z, v, m, n, c);
  }
}

template <typename T>
void dispatch(T* y, const T* g, T* z, T* v, T* m, int64_t n, const double* c) {
  using A = at::opmath_type<T>;
  if (v == nullptr) {
    update<T, A, false, false, false>(y, g, z, v, m, n, c);
  } else if (m != nullptr) {
    dispatch_v<T, true>(y, g, z, v, m, n, c);
  } else {
    dispatch_v<T, false>(y, g, z, v, m, n, c);
  }
}

void step(const std::vector<at::Tensor>& ys, const std::vector<at::Tensor>& gs, const std::vector<at::Tensor>& zs,
          const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& ms, const at::Tensor& constants) {
  TORCH_CHECK(constants.scalar_type() == at::kDouble && constants.numel() == 14, "constants: 14 doubles");
  TORCH_CHECK(vs.empty() || vs.size() == ys.size(), "exp_avg_sqs must be empty or match params");
  TORCH_CHECK(ms.empty() || (ms.size() == ys.size() && !vs.empty()), "exp_avgs must be empty or match params");
  const double* c = constants.data_ptr<double>();
  for (size_t i = 0; i < ys.size(); ++i) {
    const at::Tensor& y = ys[i];
    for (const at::Tensor* t : {&y, &gs[i], &zs[i]}) {
      TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() && t->scalar_type() == y.scalar_type() &&
                  t->numel() == y.numel(), "fused CPU step needs contiguous CPU tensors of one dtype and size");
    }
    const int64_t n = y.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "sf_fused_step", [&] {
      scalar_t* v = vs.empty() ? nullptr : vs[i].data_ptr<scalar_t>();
      scalar_t* m = ms.empty() ? nullptr : ms[i].data_ptr<scalar_t>();
      dispatch<scalar_t>(y.data_ptr<scalar_t>(), gs[i].data_ptr<scalar_t>(), zs[i].data_ptr<scalar_t>(), v, m, n, c);
    });
  }
}

// True when every element is finite: x*0 is 0 for finite x and NaN for Inf/NaN. Sixteen
// independent lanes let the compiler vectorise without reassociating a floating-point sum.
template <typename T>
bool range_finite(const T* __restrict p, int64_t begin, int64_t end) {
  using A = at::opmath_type<T>;
  constexpr int kLanes = 16;
  A lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<A>(p[i + j]) * A(0);
  }
  A sum = 0;
  for (; i < end; ++i) sum += static_cast<A>(p[i]) * A(0);
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
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
        finite = range_finite<scalar_t>(t.const_data_ptr<scalar_t>(), start, end);
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
        "Tensor constants) -> ()", &step);
}
