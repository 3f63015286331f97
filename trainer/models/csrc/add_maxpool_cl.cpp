// MaxPool2d(2, 2) of a sum (a residual block's x + body(x)) on channels-last (B, H, W, C in memory)
// CPU tensors, float32 or bfloat16, for x86-64 CPUs with AVX-512 (F, BW, VL). Built with the other
// kernels (ops.cpp binds it).
//
// Why: in fmnist_net's bf16 stage 2 ATen wrote the (256, 32, 14, 14) sum, read it for the pool,
// and backward zero-filled a tensor of that size and scattered into it: ~4.5 ms a step on 2 cores.
// Here the forward writes only the pooled output and a byte per value (which of the 4 won); the
// backward writes the gradient once (it is the gradient of both addends).
//
// The same function as the modules: the sum rounded to the inputs' dtype, then ATen's channels-last
// max-pool rule in row-major window order (a later value wins if greater, or if it is NaN).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {
using cnnstack::first16;
using cnnstack::load16;
using cnnstack::store16;

template <typename T>
void fwd_impl(const T* ap, const T* bp, T* op, uint8_t* kp, int64_t B, int64_t C, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2, NV = (C + 15) / 16;
  at::parallel_for(0, B * Ho, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Ho, i = r % Ho;
      for (int64_t j = 0; j < Wo; ++j)
        for (int64_t v = 0; v < NV; ++v) {
          const __mmask16 m = first16(C - v * 16);
          const int64_t c = v * 16;
          // Window pixels in row-major order: (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
          const int64_t e[4] = {((b * H + 2 * i) * W + 2 * j) * C + c, ((b * H + 2 * i) * W + 2 * j + 1) * C + c,
                                ((b * H + 2 * i + 1) * W + 2 * j) * C + c, ((b * H + 2 * i + 1) * W + 2 * j + 1) * C + c};
          __m512 best = cnnstack::round_to<T>(_mm512_add_ps(load16<T>(ap + e[0], m), load16<T>(bp + e[0], m)));
          __m512i k = _mm512_setzero_si512();
          for (int t = 1; t < 4; ++t) {
            const __m512 s = cnnstack::round_to<T>(_mm512_add_ps(load16<T>(ap + e[t], m), load16<T>(bp + e[t], m)));
            const __mmask16 up = _mm512_cmp_ps_mask(s, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);
            best = _mm512_mask_blend_ps(up, best, s);
            k = _mm512_mask_blend_epi32(up, k, _mm512_set1_epi32(t));
          }
          const int64_t o = ((b * Ho + i) * Wo + j) * C + c;
          store16<T>(op + o, m, best);
          _mm_mask_storeu_epi8(kp + o, m, _mm512_cvtepi32_epi8(k));
        }
    }
  });
}

template <typename T>
void bwd_impl(const T* gp, const uint8_t* kp, T* dp, int64_t B, int64_t C, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2, NV = (C + 15) / 16;
  at::parallel_for(0, B * Ho, 1, [&](int64_t r0, int64_t r1) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Ho, i = r % Ho;
      for (int64_t j = 0; j < Wo; ++j)
        for (int64_t v = 0; v < NV; ++v) {
          const __mmask16 m = first16(C - v * 16);
          const int64_t c = v * 16, o = ((b * Ho + i) * Wo + j) * C + c;
          const __m512 g = load16<T>(gp + o, m);
          const __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, kp + o));
          const int64_t e[4] = {((b * H + 2 * i) * W + 2 * j) * C + c, ((b * H + 2 * i) * W + 2 * j + 1) * C + c,
                                ((b * H + 2 * i + 1) * W + 2 * j) * C + c, ((b * H + 2 * i + 1) * W + 2 * j + 1) * C + c};
          for (int t = 0; t < 4; ++t)
            store16<T>(dp + e[t], m, _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(t)), zero, g));
        }
      // An odd last column, then (for the last window row of an odd height) the last row, get no gradient.
      if (W % 2)
        for (int64_t h = 2 * i; h < 2 * i + 2; ++h) std::fill(dp + ((b * H + h) * W + W - 1) * C, dp + ((b * H + h) * W + W) * C, T(0));
      if (H % 2 && i == Ho - 1) std::fill(dp + ((b * H + H - 1) * W) * C, dp + ((b * H + H) * W) * C, T(0));
    }
  });
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16),
              "add_maxpool_cl: ", name, " must be a channels-last float32 or bfloat16 (B, C, H, W) CPU tensor");
}
}  // namespace

// (a, b) -> (maxpool2x2(a + b) channels-last, code (B, Ho, Wo, C) uint8: which window pixel won)
std::vector<torch::Tensor> add_maxpool_cl_fwd(torch::Tensor a, torch::Tensor b) {
  check(a, "a");
  check(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "add_maxpool_cl: a and b must match");
  TORCH_CHECK(a.size(0) > 0 && a.size(2) >= 2 && a.size(3) >= 2, "add_maxpool_cl: too small to pool");
  const int64_t B = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  auto out = torch::empty({B, C, H / 2, W / 2}, a.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto code = torch::empty({B, H / 2, W / 2, C}, a.options().dtype(torch::kUInt8));
  if (a.scalar_type() == torch::kBFloat16)
    fwd_impl<at::BFloat16>(static_cast<const at::BFloat16*>(a.data_ptr()), static_cast<const at::BFloat16*>(b.data_ptr()),
                           static_cast<at::BFloat16*>(out.data_ptr()), code.data_ptr<uint8_t>(), B, C, H, W);
  else
    fwd_impl<float>(a.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<float>(), code.data_ptr<uint8_t>(), B, C, H, W);
  return {out, code};
}

// (grad_out, code, input size (B, C, H, W)) -> the gradient of a and of b (one tensor)
torch::Tensor add_maxpool_cl_bwd(torch::Tensor gout, torch::Tensor code, std::vector<int64_t> size) {
  check(gout, "grad_out");
  TORCH_CHECK(size.size() == 4 && gout.size(2) == size[2] / 2 && gout.size(3) == size[3] / 2 && code.is_contiguous() &&
                  code.numel() == gout.numel(),
              "add_maxpool_cl: grad_out does not match the forward");
  const int64_t B = size[0], C = size[1], H = size[2], W = size[3];
  auto dx = torch::empty({B, C, H, W}, gout.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (gout.scalar_type() == torch::kBFloat16)
    bwd_impl<at::BFloat16>(static_cast<const at::BFloat16*>(gout.data_ptr()), code.data_ptr<uint8_t>(),
                           static_cast<at::BFloat16*>(dx.data_ptr()), B, C, H, W);
  else
    bwd_impl<float>(gout.data_ptr<float>(), code.data_ptr<uint8_t>(), dx.data_ptr<float>(), B, C, H, W);
  return dx;
}
