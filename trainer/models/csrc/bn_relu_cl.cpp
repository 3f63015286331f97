// Training-mode BatchNorm2d -> ReLU on a channels-last (B, H, W, C in memory) CPU tensor, float32 or
// bfloat16 (what a convolution hands on under bf16 autocast), for x86-64 CPUs with AVX-512 (F, BW,
// VL). Built with the other kernels (ops.cpp binds it).
//
// Why: in fmnist_net's bf16 channels-last residual stages ATen ran BatchNorm (a statistics pass and
// a normalize pass), the ReLU, then threshold_backward and BatchNorm's backward as separate ops:
// 2.7 ms forward + backward on (256, 32, 14, 14) on 2 cores, ~3.3 ms inside a step, six times a
// step, where copying the tensor once takes 0.05 ms. Here the forward reads x twice and writes y
// once; the backward reads dy, y and x twice and writes dx once, vectorized across channels.
//
// The same function as the two modules: batch statistics (biased variance to normalize, unbiased
// into running_var), y = max(x * scale + shift, 0) rounded once to x's dtype (NaN kept), and
// BatchNorm's backward of dy masked where y > 0 (ATen's threshold_backward on the ReLU's output).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {
using cnnstack::first16;
using cnnstack::load16;
using cnnstack::store16;
constexpr int64_t CHUNK = 256;  // pixels summed in float lanes before they are added into doubles

// Per-channel sums over all P pixels for one block of NV channel vectors (channels c0..c0+16 NV):
// f(p, a, q) adds pixel p into the float vectors a[NV], q[NV]; every CHUNK pixels they are added
// into doubles. NV is a template parameter so the accumulators stay in registers.
// Returns sums[0..NV*16) of a and sums[NV*16..2*NV*16) of q.
template <int NV, typename F>
std::vector<double> block_sums(int64_t P, F&& f) {
  const int nt = at::get_num_threads();
  std::vector<double> part(int64_t(nt) * 2 * NV * 16, 0.0);
  at::parallel_for(0, (P + CHUNK - 1) / CHUNK, 1, [&](int64_t c0, int64_t c1) {
    double* d = part.data() + int64_t(at::get_thread_num()) * 2 * NV * 16;
    alignas(64) float lanes[16];
    for (int64_t ch = c0; ch < c1; ++ch) {
      __m512 a[NV], q[NV];
      for (int v = 0; v < NV; ++v) { a[v] = _mm512_setzero_ps(); q[v] = _mm512_setzero_ps(); }
      const int64_t end = std::min(P, (ch + 1) * CHUNK);
      for (int64_t p = ch * CHUNK; p < end; ++p) f(p, a, q);
      for (int v = 0; v < NV; ++v) {
        _mm512_store_ps(lanes, a[v]);
        for (int l = 0; l < 16; ++l) d[v * 16 + l] += lanes[l];
        _mm512_store_ps(lanes, q[v]);
        for (int l = 0; l < 16; ++l) d[(NV + v) * 16 + l] += lanes[l];
      }
    }
  });
  std::vector<double> out(2 * NV * 16, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t i = 0; i < 2 * NV * 16; ++i) out[i] += part[t * 2 * NV * 16 + i];
  return out;
}

std::vector<float> padded(const float* v, int64_t n) {
  std::vector<float> p((n + 15) / 16 * 16 + 64, 0.f);  // + 64: a block's loads past C stay inside
  std::copy(v, v + n, p.begin());
  return p;
}

template <typename T, int NV>
void batch_stats(const T* xp, int64_t P, int64_t C, int64_t c0, const float* wp, const float* bp, float* rmp,
                 float* rvp, float* mp, float* ip, double momentum, double eps, const __mmask16* mk, float* scale,
                 float* shift);
template <typename T, int NV>
void normalize_relu(const T* xp, T* yp, int64_t P, int64_t C, int64_t c0, const __mmask16* mk, const float* scale,
                    const float* shift);

// The forward for channels c0..c0+16 NV: statistics (or the running ones), then y.
template <typename T, int NV>
void fwd_block(const T* xp, T* yp, int64_t P, int64_t C, int64_t c0, const float* wp, const float* bp, float* rmp,
               float* rvp, float* mp, float* ip, double momentum, double eps, bool training) {
  __mmask16 mk[NV];
  for (int v = 0; v < NV; ++v) mk[v] = first16(C - c0 - v * 16);
  alignas(64) float scale[NV * 16] = {}, shift[NV * 16] = {};
  if (training) {
    batch_stats<T, NV>(xp, P, C, c0, wp, bp, rmp, rvp, mp, ip, momentum, eps, mk, scale, shift);
  } else {  // inference: the running statistics, left as they are
    for (int64_t c = c0; c < std::min(C, c0 + NV * 16); ++c) {
      mp[c] = rmp[c];
      ip[c] = float(1.0 / std::sqrt(double(rvp[c]) + eps));
      scale[c - c0] = wp[c] * ip[c];
      shift[c - c0] = bp[c] - rmp[c] * scale[c - c0];
    }
  }
  normalize_relu<T, NV>(xp, yp, P, C, c0, mk, scale, shift);
}

// Batch statistics of channels c0..c0+16 NV: mean, invstd, the running buffers, and y's scale and shift.
template <typename T, int NV>
void batch_stats(const T* xp, int64_t P, int64_t C, int64_t c0, const float* wp, const float* bp, float* rmp,
                 float* rvp, float* mp, float* ip, double momentum, double eps, const __mmask16* mk, float* scale,
                 float* shift) {
  std::vector<float> shift0(NV * 16, 0.f);
  for (int64_t c = c0; c < std::min(C, c0 + NV * 16); ++c) shift0[c - c0] = float(xp[c]);  // the first pixel: sums of (x - it) cancel less
  __m512 s0[NV];
  for (int v = 0; v < NV; ++v) s0[v] = _mm512_loadu_ps(shift0.data() + v * 16);
  const std::vector<double> sums = block_sums<NV>(P, [&](int64_t p, __m512* a, __m512* q) {
    for (int v = 0; v < NV; ++v) {
      const __m512 d = _mm512_maskz_sub_ps(mk[v], load16<T>(xp + p * C + c0 + v * 16, mk[v]), s0[v]);
      a[v] = _mm512_add_ps(a[v], d); q[v] = _mm512_fmadd_ps(d, d, q[v]);
    }
  });
  const double n = double(P);
  for (int64_t c = c0; c < std::min(C, c0 + NV * 16); ++c) {
    const int64_t l = c - c0;
    const double md = sums[l] / n, var = std::max(sums[NV * 16 + l] / n - md * md, 0.0), m = md + shift0[l];
    mp[c] = float(m);
    ip[c] = float(1.0 / std::sqrt(var + eps));
    scale[l] = wp[c] * ip[c];
    shift[l] = bp[c] - float(m) * scale[l];
    rmp[c] = float((1 - momentum) * rmp[c] + momentum * m);
    rvp[c] = float((1 - momentum) * rvp[c] + momentum * var * n / std::max(n - 1, 1.0));
  }
}

// y = max(x * scale + shift, 0) for channels c0..c0+16 NV.
template <typename T, int NV>
void normalize_relu(const T* xp, T* yp, int64_t P, int64_t C, int64_t c0, const __mmask16* mk, const float* scale,
                    const float* shift) {
  at::parallel_for(0, P, 256, [&](int64_t p0, int64_t p1) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 sc[NV], sh[NV];
    for (int v = 0; v < NV; ++v) { sc[v] = _mm512_load_ps(scale + v * 16); sh[v] = _mm512_load_ps(shift + v * 16); }
    for (int64_t p = p0; p < p1; ++p)
      for (int v = 0; v < NV; ++v) {
        const int64_t e = p * C + c0 + v * 16;
        const __m512 t = _mm512_fmadd_ps(load16<T>(xp + e, mk[v]), sc[v], sh[v]);
        store16<T>(yp + e, mk[v], _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t, zero, _CMP_LT_OQ), t, zero));
      }
  });
}

// The backward for channels c0..c0+16 NV: BatchNorm's two sums of dy masked by y > 0, then dx.
template <typename T, int NV>
void bwd_block(const T* gp, const T* yp, const T* xp, T* dp, int64_t P, int64_t C, int64_t c0, const float* wp,
               const float* mp, const float* ip, float* dwp, float* dbp) {
  __mmask16 mk[NV];
  for (int v = 0; v < NV; ++v) mk[v] = first16(C - c0 - v * 16);
  const std::vector<float> mpad = padded(mp + c0, std::min<int64_t>(C - c0, NV * 16));
  __m512 mv[NV];
  for (int v = 0; v < NV; ++v) mv[v] = _mm512_loadu_ps(mpad.data() + v * 16);
  const __m512 zero = _mm512_setzero_ps();
  // sum of dy and of dy * (x - mean), dy masked where the ReLU passed (y > 0; false for NaN)
  const std::vector<double> sums = block_sums<NV>(P, [&](int64_t p, __m512* a, __m512* q) {
    for (int v = 0; v < NV; ++v) {
      const int64_t e = p * C + c0 + v * 16;
      const __mmask16 pos = _mm512_cmp_ps_mask(load16<T>(yp + e, mk[v]), zero, _CMP_GT_OQ);
      const __m512 g = _mm512_maskz_mov_ps(pos, load16<T>(gp + e, mk[v]));
      a[v] = _mm512_add_ps(a[v], g);
      q[v] = _mm512_fmadd_ps(g, _mm512_sub_ps(load16<T>(xp + e, mk[v]), mv[v]), q[v]);
    }
  });
  const double n = double(P);
  alignas(64) float k1[NV * 16] = {}, k2[NV * 16] = {}, k3[NV * 16] = {};
  for (int64_t c = c0; c < std::min(C, c0 + NV * 16); ++c) {
    const int64_t l = c - c0;
    const double is = ip[c], sc = wp[c] * is, a = sums[l], q = sums[NV * 16 + l];
    dbp[c] = float(a); dwp[c] = float(q * is);
    // dx = sc * (dy - sum(dy)/n - xhat * sum(dy * xhat)/n)
    k1[l] = float(sc); k2[l] = float(-sc * a / n); k3[l] = float(sc * q * is * is / n);
  }
  at::parallel_for(0, P, 256, [&](int64_t p0, int64_t p1) {
    __m512 a1[NV], a2[NV], a3[NV];
    for (int v = 0; v < NV; ++v) {
      a1[v] = _mm512_load_ps(k1 + v * 16); a2[v] = _mm512_load_ps(k2 + v * 16); a3[v] = _mm512_load_ps(k3 + v * 16);
    }
    for (int64_t p = p0; p < p1; ++p)
      for (int v = 0; v < NV; ++v) {
        const int64_t e = p * C + c0 + v * 16;
        const __mmask16 pos = _mm512_cmp_ps_mask(load16<T>(yp + e, mk[v]), zero, _CMP_GT_OQ);
        const __m512 g = _mm512_maskz_mov_ps(pos, load16<T>(gp + e, mk[v]));
        const __m512 xc = _mm512_sub_ps(load16<T>(xp + e, mk[v]), mv[v]);
        store16<T>(dp + e, mk[v], _mm512_fmadd_ps(a1[v], g, _mm512_fnmadd_ps(a3[v], xc, a2[v])));
      }
  });
}

// Channels in blocks of up to 64 (4 vectors in registers).
template <typename F>
void for_each_block(int64_t C, F&& f) {
  for (int64_t c0 = 0; c0 < C; c0 += 64) f(c0, std::min<int64_t>(4, (C - c0 + 15) / 16));
}

template <typename T>
std::vector<torch::Tensor> fwd_impl(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                    torch::Tensor& running_mean, torch::Tensor& running_var, double momentum, double eps,
                                    bool training) {
  const int64_t C = x.size(1), P = x.numel() / C;
  auto mean = torch::empty({C}, weight.options()), invstd = torch::empty({C}, weight.options());
  auto y = torch::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* xp = static_cast<const T*>(x.data_ptr()); T* yp = static_cast<T*>(y.data_ptr());
  const float* wp = weight.data_ptr<float>(); const float* bp = bias.data_ptr<float>();
  float* rmp = running_mean.data_ptr<float>(); float* rvp = running_var.data_ptr<float>();
  float* mp = mean.data_ptr<float>(); float* ip = invstd.data_ptr<float>();
  for_each_block(C, [&](int64_t c0, int64_t nv) {
    switch (nv) {
      case 4: fwd_block<T, 4>(xp, yp, P, C, c0, wp, bp, rmp, rvp, mp, ip, momentum, eps, training); break;
      case 3: fwd_block<T, 3>(xp, yp, P, C, c0, wp, bp, rmp, rvp, mp, ip, momentum, eps, training); break;
      case 2: fwd_block<T, 2>(xp, yp, P, C, c0, wp, bp, rmp, rvp, mp, ip, momentum, eps, training); break;
      default: fwd_block<T, 1>(xp, yp, P, C, c0, wp, bp, rmp, rvp, mp, ip, momentum, eps, training); break;
    }
  });
  return {y, mean, invstd};
}

template <typename T>
std::vector<torch::Tensor> bwd_impl(const torch::Tensor& dy, const torch::Tensor& y, const torch::Tensor& x,
                                    const torch::Tensor& weight, const torch::Tensor& mean, const torch::Tensor& invstd) {
  const int64_t C = x.size(1), P = x.numel() / C;
  auto dweight = torch::empty({C}, weight.options()), dbias = torch::empty({C}, weight.options());
  auto dx = torch::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* gp = static_cast<const T*>(dy.data_ptr()); const T* yp = static_cast<const T*>(y.data_ptr());
  const T* xp = static_cast<const T*>(x.data_ptr()); T* dp = static_cast<T*>(dx.data_ptr());
  const float* wp = weight.data_ptr<float>(); const float* mp = mean.data_ptr<float>(); const float* ip = invstd.data_ptr<float>();
  float* dwp = dweight.data_ptr<float>(); float* dbp = dbias.data_ptr<float>();
  for_each_block(C, [&](int64_t c0, int64_t nv) {
    switch (nv) {
      case 4: bwd_block<T, 4>(gp, yp, xp, dp, P, C, c0, wp, mp, ip, dwp, dbp); break;
      case 3: bwd_block<T, 3>(gp, yp, xp, dp, P, C, c0, wp, mp, ip, dwp, dbp); break;
      case 2: bwd_block<T, 2>(gp, yp, xp, dp, P, C, c0, wp, mp, ip, dwp, dbp); break;
      default: bwd_block<T, 1>(gp, yp, xp, dp, P, C, c0, wp, mp, ip, dwp, dbp); break;
    }
  });
  return {dx, dweight, dbias};
}

void check_cl(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16),
              "bn_relu_cl: ", name, " must be a channels-last float32 or bfloat16 (B, C, H, W) CPU tensor");
}
void check_vector(const torch::Tensor& v, int64_t c) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == torch::kFloat && v.dim() == 1 && v.size(0) == c && v.is_contiguous(),
              "bn_relu_cl: BatchNorm parameters and buffers must be float32 vectors of ", c);
}
}  // namespace

// training = false: BatchNorm with its running statistics (mean and invstd return those).
std::vector<torch::Tensor> bn_relu_cl_fwd(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, torch::Tensor running_mean,
                                          torch::Tensor running_var, double momentum, double eps, bool training) {
  check_cl(x, "x");
  TORCH_CHECK(!training || x.numel() > x.size(1), "bn_relu_cl: more than one value per channel is needed in training");
  for (const auto* t : {&weight, &bias, &running_mean, &running_var}) check_vector(*t, x.size(1));
  if (x.scalar_type() == torch::kBFloat16)
    return fwd_impl<at::BFloat16>(x, weight, bias, running_mean, running_var, momentum, eps, training);
  return fwd_impl<float>(x, weight, bias, running_mean, running_var, momentum, eps, training);
}

std::vector<torch::Tensor> bn_relu_cl_bwd(torch::Tensor dy, torch::Tensor y, torch::Tensor x, torch::Tensor weight,
                                          torch::Tensor mean, torch::Tensor invstd) {
  for (const auto& [t, name] : {std::pair{&dy, "grad_y"}, std::pair{&y, "y"}, std::pair{&x, "x"}}) check_cl(*t, name);
  TORCH_CHECK(dy.sizes() == x.sizes() && y.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                  y.scalar_type() == x.scalar_type(),
              "bn_relu_cl: grad_y, y and x must have one shape and dtype");
  for (const auto* t : {&weight, &mean, &invstd}) check_vector(*t, x.size(1));
  if (x.scalar_type() == torch::kBFloat16) return bwd_impl<at::BFloat16>(dy, y, x, weight, mean, invstd);
  return bwd_impl<float>(dy, y, x, weight, mean, invstd);
}
