// Global max-pool and global average-pool of one channels-last (B, H, W, C in memory) CPU tensor,
// concatenated, float32 or bfloat16, for x86-64 CPUs with AVX-512 (F, BW, VL). Built with the other
// kernels (ops.cpp binds it).
//
// Why: fmnist_net's head, MaxPool2d(7) and AvgPool2d(7) of its (256, 64, 7, 7) bf16 features and a
// cat, cost ~2.5 ms a step on 2 cores, mostly avg_pool2d's backward (1.2 ms for 1.6 MB) and layout
// copies. Here the forward reads the features once and the backward writes their gradient once.
//
// The same function as the modules: ATen's max-pool rule in row-major order (a later value wins if
// greater, or if it is NaN), the mean as the float sum over the plane divided by its size, each
// rounded once to the input's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"
#include <cstdint>
#include <vector>

namespace {
using cnnstack::first16;
using cnnstack::load16;
using cnnstack::store16;

template <typename T>
void fwd_impl(const T* xp, T* op, int32_t* ip, int64_t B, int64_t C, int64_t HW) {
  const int64_t NV = (C + 15) / 16;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t v = 0; v < NV; ++v) {
        const __mmask16 m = first16(C - v * 16);
        const T* p = xp + b * HW * C + v * 16;
        __m512 best = load16<T>(p, m), sum = best;
        __m512i arg = _mm512_setzero_si512();
        for (int64_t q = 1; q < HW; ++q) {
          const __m512 x = load16<T>(p + q * C, m);
          const __mmask16 up = _mm512_cmp_ps_mask(x, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
          best = _mm512_mask_blend_ps(up, best, x);
          arg = _mm512_mask_blend_epi32(up, arg, _mm512_set1_epi32(int32_t(q)));
          sum = _mm512_add_ps(sum, x);
        }
        T* o = op + b * 2 * C + v * 16;  // (B, 2C): max, then mean
        store16<T>(o, m, best);
        store16<T>(o + C, m, _mm512_div_ps(sum, _mm512_set1_ps(float(HW))));
        _mm512_mask_storeu_epi32(ip + b * C + v * 16, m, arg);
      }
  });
}

template <typename T>
void bwd_impl(const T* gp, const int32_t* ip, T* dp, int64_t B, int64_t C, int64_t HW) {
  const int64_t NV = (C + 15) / 16;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t v = 0; v < NV; ++v) {
        const __mmask16 m = first16(C - v * 16);
        const T* g = gp + b * 2 * C + v * 16;
        const __m512 gmax = load16<T>(g, m), gavg = _mm512_div_ps(load16<T>(g + C, m), _mm512_set1_ps(float(HW)));
        const __m512 both = _mm512_add_ps(gavg, gmax);
        const __m512i arg = _mm512_maskz_loadu_epi32(m, ip + b * C + v * 16);
        T* d = dp + b * HW * C + v * 16;
        for (int64_t q = 0; q < HW; ++q)
          store16<T>(d + q * C, m, _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(arg, _mm512_set1_epi32(int32_t(q))), gavg, both));
      }
  });
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16),
              "global_pool_cl: ", name, " must be a channels-last float32 or bfloat16 (B, C, H, W) CPU tensor");
}
}  // namespace

// x (B, C, H, W) channels-last -> (cat(max over H, W; mean over H, W) as (B, 2C, 1, 1), argmax (B, C) int32)
std::vector<torch::Tensor> global_pool_cl_fwd(torch::Tensor x) {
  check(x, "x");
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(B > 0 && HW > 0 && HW < (int64_t(1) << 31), "global_pool_cl: empty or too large input");
  auto out = torch::empty({B, 2 * C, 1, 1}, x.options());
  auto arg = torch::empty({B, C}, x.options().dtype(torch::kInt));
  if (x.scalar_type() == torch::kBFloat16)
    fwd_impl<at::BFloat16>(static_cast<const at::BFloat16*>(x.data_ptr()), static_cast<at::BFloat16*>(out.data_ptr()),
                           arg.data_ptr<int32_t>(), B, C, HW);
  else
    fwd_impl<float>(x.data_ptr<float>(), out.data_ptr<float>(), arg.data_ptr<int32_t>(), B, C, HW);
  return {out, arg};
}

// (grad_out (B, 2C, 1, 1), argmax, input size) -> grad of x, channels-last
torch::Tensor global_pool_cl_bwd(torch::Tensor gout, torch::Tensor arg, std::vector<int64_t> size) {
  TORCH_CHECK(size.size() == 4 && gout.numel() == size[0] * 2 * size[1] && arg.numel() == size[0] * size[1] &&
                  arg.scalar_type() == torch::kInt && arg.is_contiguous() &&
                  (gout.scalar_type() == torch::kFloat || gout.scalar_type() == torch::kBFloat16),
              "global_pool_cl: grad_out does not match the forward");
  auto g = gout.contiguous();
  const int64_t B = size[0], C = size[1], HW = size[2] * size[3];
  auto dx = torch::empty({B, C, size[2], size[3]}, g.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (g.scalar_type() == torch::kBFloat16)
    bwd_impl<at::BFloat16>(static_cast<const at::BFloat16*>(g.data_ptr()), arg.data_ptr<int32_t>(),
                           static_cast<at::BFloat16*>(dx.data_ptr()), B, C, HW);
  else
    bwd_impl<float>(g.data_ptr<float>(), arg.data_ptr<int32_t>(), dx.data_ptr<float>(), B, C, HW);
  return dx;
}
