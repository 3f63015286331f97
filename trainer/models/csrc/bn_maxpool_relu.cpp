// Training-mode BatchNorm2d -> MaxPool2d(2, 2) -> ReLU in one pass each way, for float32 NCHW on
// x86-64 CPUs with AVX-512 (F, BW, VL). Built on first use by trainer/models/_fused.py (ops.cpp binds it).
//
// Why: on 2 cores, LeNet-5's (256, 6, 28, 28) conv1 output went through ATen's BatchNorm (a stats
// pass and a normalize pass), a copy into oneDNN's layout, oneDNN's max-pool, a copy back and the
// ReLU, and the same again backward: ~4 ms of a ~16 ms step. Here the forward reads x twice (the
// statistics, then normalize + 2x2 max + ReLU, writing only the pooled output and each window's
// argmax as one byte, and x at it) and the backward reads x once and writes dx once: ~0.5 ms.
//
// The same function as the three modules: batch statistics (biased variance to normalize, unbiased
// into running_var), the first maximum of each window in row-major order (ATen's tie rule), ReLU
// that keeps NaN, and BatchNorm's backward with dy non-zero only at each window's maximum whose
// output is positive. Rounding differs from ATen's by ~1 ulp (x * scale + shift with an FMA).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"
#include <vector>
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {
using cnnstack::first16;
// Columns 0, 2, ..., 30 and 1, 3, ..., 31 of a 32-float pair of vectors.
inline __m512i even_idx() { return _mm512_setr_epi32(0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30); }
inline __m512i odd_idx() { return _mm512_setr_epi32(1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31); }
// Interleave back: lane 2t of the result is a[t], lane 2t+1 is b[t] (lo: t < 8, hi: t >= 8).
inline __m512i ilv_lo() { return _mm512_setr_epi32(0,16,1,17,2,18,3,19,4,20,5,21,6,22,7,23); }
inline __m512i ilv_hi() { return _mm512_setr_epi32(8,24,9,25,10,26,11,27,12,28,13,29,14,30,15,31); }

// The four values of each 2x2 window in a 32-column chunk of two rows: (top-left, top-right, bottom-left, bottom-right).
struct Win { __m512 v0, v1, v2, v3; };
inline Win load_win(const float* r0, const float* r1, int64_t n) {  // n: input columns in this chunk (even, <= 32)
  const __mmask16 m0 = first16(n), m1 = first16(n - 16);
  const __m512 a0 = _mm512_maskz_loadu_ps(m0, r0), a1 = _mm512_maskz_loadu_ps(m1, r0 + 16);
  const __m512 b0 = _mm512_maskz_loadu_ps(m0, r1), b1 = _mm512_maskz_loadu_ps(m1, r1 + 16);
  return {_mm512_permutex2var_ps(a0, even_idx(), a1), _mm512_permutex2var_ps(a0, odd_idx(), a1),
          _mm512_permutex2var_ps(b0, even_idx(), b1), _mm512_permutex2var_ps(b0, odd_idx(), b1)};
}
void check_input(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 4 && x.is_contiguous(),
              "bn_maxpool_relu: ", name, " must be a contiguous float32 (B, C, H, W) CPU tensor");
  TORCH_CHECK(x.size(0) > 0 && x.size(2) >= 2 && x.size(3) >= 2, "bn_maxpool_relu: ", name, " is too small to pool");
}
void check_vector(const torch::Tensor& v, int64_t c) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == torch::kFloat && v.dim() == 1 && v.size(0) == c && v.is_contiguous(),
              "bn_maxpool_relu: BatchNorm parameters and buffers must be float32 vectors of ", c);
}
}  // namespace

std::vector<torch::Tensor> bn_pool_relu_fwd(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                                             torch::Tensor running_mean, torch::Tensor running_var,
                                             double momentum, double eps) {
  check_input(x, "x");
  for (const auto* t : {&weight, &bias, &running_mean, &running_var}) check_vector(*t, x.size(1));
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H / 2, Wo = W / 2, HW = H * W;
  const float* xp = x.data_ptr<float>();
  const int nt = at::get_num_threads();
  std::vector<double> ps(nt * C, 0.0), pq(nt * C, 0.0);
  std::vector<float> shift0(C);
  for (int64_t c = 0; c < C; ++c) shift0[c] = xp[c * HW];  // sums of (x - a sample) cancel less
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const float* p = xp + (b * C + c) * HW;
        const float s = shift0[c];
        float a = 0.f, q = 0.f;
#pragma omp simd reduction(+ : a, q)
        for (int64_t i = 0; i < HW; ++i) { float d = p[i] - s; a += d; q += d * d; }
        ps[t * C + c] += a; pq[t * C + c] += q;
      }
  });
  const double n = double(B * HW);
  auto mean = torch::empty({C}, x.options()), invstd = torch::empty({C}, x.options());
  float* mp = mean.data_ptr<float>(); float* ip = invstd.data_ptr<float>();
  std::vector<float> scale(C), shift(C);
  const float* wp = weight.data_ptr<float>(); const float* bp = bias.data_ptr<float>();
  float* rmp = running_mean.data_ptr<float>(); float* rvp = running_var.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, q = 0;
    for (int t = 0; t < nt; ++t) { a += ps[t * C + c]; q += pq[t * C + c]; }
    const double md = a / n, var = std::max(q / n - md * md, 0.0);
    const double m = md + shift0[c];
    mp[c] = float(m); ip[c] = float(1.0 / std::sqrt(var + eps));
    scale[c] = wp[c] * ip[c]; shift[c] = bp[c] - float(m) * scale[c];
    rmp[c] = float((1 - momentum) * rmp[c] + momentum * m);
    rvp[c] = float((1 - momentum) * rvp[c] + momentum * var * n / std::max(n - 1, 1.0));
  }
  auto out = torch::empty({B, C, Ho, Wo}, x.options());
  auto idx = torch::empty({B, C, Ho, Wo}, x.options().dtype(torch::kUInt8));
  auto xmax = torch::empty({B, C, Ho, Wo}, x.options());  // x at each window's argmax, for the backward
  float* op = out.data_ptr<float>(); uint8_t* kp = idx.data_ptr<uint8_t>(); float* xmp = xmax.data_ptr<float>();
  at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t pl = p0; pl < p1; ++pl) {
      const int64_t c = pl % C;
      const __m512 sc = _mm512_set1_ps(scale[c]), sh = _mm512_set1_ps(shift[c]);
      const float* p = xp + pl * HW;
      for (int64_t i = 0; i < Ho; ++i) {
        float* o = op + (pl * Ho + i) * Wo; uint8_t* k = kp + (pl * Ho + i) * Wo; float* xo = xmp + (pl * Ho + i) * Wo;
        for (int64_t j0 = 0; j0 < 2 * Wo; j0 += 32) {
          const int64_t nin = std::min<int64_t>(32, 2 * Wo - j0);
          Win w = load_win(p + 2 * i * W + j0, p + (2 * i + 1) * W + j0, nin);
          const __m512 v0 = _mm512_fmadd_ps(w.v0, sc, sh), v1 = _mm512_fmadd_ps(w.v1, sc, sh);
          const __m512 v2 = _mm512_fmadd_ps(w.v2, sc, sh), v3 = _mm512_fmadd_ps(w.v3, sc, sh);
          const cnnstack::WindowMax wm = cnnstack::window_max(v0, v1, v2, v3);
          const __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(wm.m, zero, _CMP_LT_OQ), wm.m, zero);  // ReLU, NaN kept
          const __mmask16 mo = first16(nin / 2);
          _mm512_mask_storeu_ps(o + j0 / 2, mo, r);
          _mm_mask_storeu_epi8(k + j0 / 2, mo, _mm512_cvtepi32_epi8(wm.k));
          _mm512_mask_storeu_ps(xo + j0 / 2, mo, wm.select(w.v0, w.v1, w.v2, w.v3));
        }
      }
    }
  });
  return {out, idx, xmax, mean, invstd};
}

std::vector<torch::Tensor> bn_pool_relu_bwd(torch::Tensor gout, torch::Tensor out, torch::Tensor idx,
                                             torch::Tensor xmax, torch::Tensor x, torch::Tensor weight, torch::Tensor mean,
                                             torch::Tensor invstd) {
  check_input(x, "x");
  TORCH_CHECK(gout.is_contiguous() && out.is_contiguous() && idx.is_contiguous(), "bn_maxpool_relu: contiguous gradients expected");
  TORCH_CHECK(gout.sizes() == out.sizes() && idx.sizes() == out.sizes() && xmax.sizes() == out.sizes() && xmax.is_contiguous(),
              "bn_maxpool_relu: gradient shape mismatch");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H / 2, Wo = W / 2, HW = H * W, P = Ho * Wo;
  const float* xp = x.data_ptr<float>(); const float* gp = gout.data_ptr<float>();
  const float* op = out.data_ptr<float>(); const uint8_t* kp = idx.data_ptr<uint8_t>();
  const float* mp = mean.data_ptr<float>(); const float* ip = invstd.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int nt = at::get_num_threads();
  std::vector<double> ps(nt * C, 0.0), pq(nt * C, 0.0);
  const float* xmp = xmax.data_ptr<float>();
  // Per channel: sum of dy and of dy * (x - mean) over the windows' maxima (dy is zero elsewhere).
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t pl = b * C + c;
        const __m512 m = _mm512_set1_ps(mp[c]);
        __m512 a = zero, q = zero;
        for (int64_t e = pl * P; e < (pl + 1) * P; e += 16) {
          const __mmask16 mo = first16((pl + 1) * P - e);
          const __m512 g = _mm512_maskz_loadu_ps(mo, gp + e), o = _mm512_maskz_loadu_ps(mo, op + e);
          const __m512 gg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(o, zero, _CMP_GT_OQ), g);  // ReLU backward
          a = _mm512_add_ps(a, gg);
          q = _mm512_fmadd_ps(gg, _mm512_sub_ps(_mm512_maskz_loadu_ps(mo, xmp + e), m), q);
        }
        ps[t * C + c] += _mm512_reduce_add_ps(a); pq[t * C + c] += _mm512_reduce_add_ps(q);
      }
  });
  const double n = double(B * HW);
  auto dweight = torch::empty({C}, x.options()), dbias = torch::empty({C}, x.options());
  std::vector<float> k1(C), k2(C), k3(C);
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, q = 0;
    for (int t = 0; t < nt; ++t) { a += ps[t * C + c]; q += pq[t * C + c]; }
    const double is = ip[c];
    dbias.data_ptr<float>()[c] = float(a); dweight.data_ptr<float>()[c] = float(q * is);
    const double sc = wp[c] * is;
    // BN backward with dy nonzero only at each window's maximum: dx = sc * (dy - a/n - xhat * q*is/n)
    k1[c] = float(sc); k2[c] = float(sc * a / n); k3[c] = float(sc * q * is * is / n);
  }
  auto dx = torch::empty_like(x);
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512i i0 = _mm512_set1_epi32(0), i1 = _mm512_set1_epi32(1), i2 = _mm512_set1_epi32(2), i3 = _mm512_set1_epi32(3);
    for (int64_t pl = p0; pl < p1; ++pl) {
      const int64_t c = pl % C; const float a2 = k2[c], a3 = k3[c], m = mp[c];
      const __m512 a1 = _mm512_set1_ps(k1[c]);
      const float* p = xp + pl * HW; float* d = dp + pl * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) d[i] = -a2 - a3 * (p[i] - m);
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j0 = 0; j0 < 2 * Wo; j0 += 32) {
          const int64_t nin = std::min<int64_t>(32, 2 * Wo - j0), e = (pl * Ho + i) * Wo + j0 / 2;
          const __mmask16 mo = first16(nin / 2);
          const __m512 g = _mm512_maskz_loadu_ps(mo, gp + e), o = _mm512_maskz_loadu_ps(mo, op + e);
          const __m512i kk = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mo, kp + e));
          const __m512 cg = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(o, zero, _CMP_GT_OQ), g, a1);
          const __m512 c0 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(kk, i0), cg);
          const __m512 c1 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(kk, i1), cg);
          const __m512 c2 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(kk, i2), cg);
          const __m512 c3 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(kk, i3), cg);
          const __mmask16 m0 = first16(nin), m1 = first16(nin - 16);
          float* d0 = d + 2 * i * W + j0; float* d1 = d0 + W;
          _mm512_mask_storeu_ps(d0, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, d0), _mm512_permutex2var_ps(c0, ilv_lo(), c1)));
          _mm512_mask_storeu_ps(d0 + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, d0 + 16), _mm512_permutex2var_ps(c0, ilv_hi(), c1)));
          _mm512_mask_storeu_ps(d1, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, d1), _mm512_permutex2var_ps(c2, ilv_lo(), c3)));
          _mm512_mask_storeu_ps(d1 + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, d1 + 16), _mm512_permutex2var_ps(c2, ilv_hi(), c3)));
        }
    }
  });
  return {dx, dweight, dbias};
}
