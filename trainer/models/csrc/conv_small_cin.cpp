// Stride-1 convolution of an input with few channels (a model's first layer: 1 or 3), forward and
// weight gradient, for float32 NCHW on x86-64 CPUs with AVX-512. Built with bn_maxpool_relu.cpp.
//
// Why: oneDNN computes such a layer in a channel-blocked layout and reorders to and from NCHW, and
// its weight gradient for 1-3 input channels is slow: LeNet-5's conv1 at batch 256 on 2 cores took
// 1.2 ms forward + 1.2-3 ms weight gradient; a 3-channel 32x32 one 3.5 + 15 ms. Here each image is
// copied into zero-padded planes, and each output row is accumulated in registers from 16-wide
// loads of the shifted input rows (6 output channels at a time): 0.4 + 0.8 ms and 1.2 + 2.1 ms.
// The input's gradient is not computed: the kernel is used only where the input needs none.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {
using cnnstack::first16;
using cnnstack::pad_image;
constexpr int64_t OG = 6;  // output channels per register block: 2 x 6 accumulators + loads fit in 32 zmm


// G output channels o0.. of one image: out (G, Ho, Wo). Accumulators stay in registers (G is a
// compile-time constant), two 16-wide vectors of each output row at a time.
template <int G>
void fwd_block(const float* buf, const float* wp, const float* bp, int64_t o0, int64_t C, int64_t K,
               int64_t Hp, int64_t Wp, int64_t Ho, int64_t Wo, float* out) {
  for (int64_t h = 0; h < Ho; ++h)
    for (int64_t j0 = 0; j0 < Wo; j0 += 32) {
      __m512 a0[G], a1[G];
      for (int o = 0; o < G; ++o) { a0[o] = _mm512_set1_ps(bp ? bp[o0 + o] : 0.f); a1[o] = a0[o]; }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t kh = 0; kh < K; ++kh) {
          const float* row = buf + (c * Hp + h + kh) * Wp + j0;
          const float* wk = wp + ((o0 * C + c) * K + kh) * K;  // weight[o0, c, kh, 0]
          for (int64_t kw = 0; kw < K; ++kw) {
            const __m512 v0 = _mm512_loadu_ps(row + kw), v1 = _mm512_loadu_ps(row + kw + 16);
            for (int o = 0; o < G; ++o) {
              const __m512 w = _mm512_set1_ps(wk[o * C * K * K + kw]);
              a0[o] = _mm512_fmadd_ps(w, v0, a0[o]); a1[o] = _mm512_fmadd_ps(w, v1, a1[o]);
            }
          }
        }
      const int64_t n = std::min<int64_t>(32, Wo - j0);
      for (int o = 0; o < G; ++o) {
        float* y = out + (o * Ho + h) * Wo + j0;
        _mm512_mask_storeu_ps(y, first16(n), a0[o]);
        _mm512_mask_storeu_ps(y + 16, first16(n - 16), a1[o]);
      }
    }
}

// Adds to acc_w (O, C, K, K) x 16 lanes the weight gradient of output channels o0..o0+G for one
// image; g: (G, Ho, Wo). The lanes are summed once at the end, not per image.
template <int G>
void wgrad_block(const float* buf, const float* g, int64_t o0, int64_t C, int64_t K, int64_t Hp,
                 int64_t Wp, int64_t Ho, int64_t Wo, float* acc_w) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t kh = 0; kh < K; ++kh)
      for (int64_t kw = 0; kw < K; ++kw) {
        __m512 a[G];
        for (int o = 0; o < G; ++o) a[o] = _mm512_setzero_ps();
        for (int64_t h = 0; h < Ho; ++h) {
          const float* row = buf + (c * Hp + h + kh) * Wp + kw;
          for (int64_t j0 = 0; j0 < Wo; j0 += 16) {
            const __mmask16 m = first16(Wo - j0);
            const __m512 v = _mm512_loadu_ps(row + j0);
            for (int o = 0; o < G; ++o)
              a[o] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, g + (o * Ho + h) * Wo + j0), v, a[o]);
          }
        }
        const int64_t C2 = C * K * K;
        for (int o = 0; o < G; ++o) {
          float* lanes = acc_w + ((o0 + o) * C2 + (c * K + kh) * K + kw) * 16;
          _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_loadu_ps(lanes), a[o]));
        }
      }
}
void check_float(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.dim() == dim && t.is_contiguous(),
              "conv_small_cin: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dimensions");
}
}  // namespace

// y = conv2d(x, weight, bias), stride 1, zero padding `pad`, x (B, C, H, W), weight (O, C, K, K).
torch::Tensor conv_first_fwd(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, int64_t pad) {
  check_float(x, 4, "x");
  check_float(weight, 4, "weight");
  if (bias.has_value()) check_float(*bias, 1, "bias");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = weight.size(0), K = weight.size(2);
  TORCH_CHECK(weight.size(1) == C && weight.size(3) == K && pad >= 0 && H + 2 * pad >= K && W + 2 * pad >= K,
              "conv_small_cin: weight must be (O, C, K, K) with K <= the padded input");
  TORCH_CHECK(!bias.has_value() || bias->size(0) == O, "conv_small_cin: bias must have O elements");
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad + 32, Ho = Hp - K + 1, Wo = W + 2 * pad - K + 1;
  auto y = torch::empty({B, O, Ho, Wo}, x.options());
  const float* xp = x.data_ptr<float>(); const float* wp = weight.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(C * Hp * Wp + 32);
    for (int64_t b = b0; b < b1; ++b) {
      pad_image(xp + b * C * H * W, C, H, W, pad, Hp, Wp, buf.data());
      for (int64_t o0 = 0; o0 < O; o0 += OG) {
        const int64_t og = std::min(OG, O - o0);
        float* yb = yp + (b * O + o0) * Ho * Wo;
        switch (og) {
          case 6: fwd_block<6>(buf.data(), wp, bp, o0, C, K, Hp, Wp, Ho, Wo, yb); break;
          case 5: fwd_block<5>(buf.data(), wp, bp, o0, C, K, Hp, Wp, Ho, Wo, yb); break;
          case 4: fwd_block<4>(buf.data(), wp, bp, o0, C, K, Hp, Wp, Ho, Wo, yb); break;
          case 3: fwd_block<3>(buf.data(), wp, bp, o0, C, K, Hp, Wp, Ho, Wo, yb); break;
          case 2: fwd_block<2>(buf.data(), wp, bp, o0, C, K, Hp, Wp, Ho, Wo, yb); break;
          default: fwd_block<1>(buf.data(), wp, bp, o0, C, K, Hp, Wp, Ho, Wo, yb); break;
        }
      }
    }
  });
  return y;
}

// (dweight, dbias) of conv_first_fwd given dy (B, O, Ho, Wo); the input's gradient is not computed.
std::vector<torch::Tensor> conv_first_wgrad(torch::Tensor dy, torch::Tensor x, int64_t K, int64_t pad, bool with_bias) {
  check_float(x, 4, "x");
  check_float(dy, 4, "grad_y");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = dy.size(1);
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad + 32, Ho = dy.size(2), Wo = dy.size(3);
  TORCH_CHECK(dy.size(0) == B && Ho == Hp - K + 1 && Wo == W + 2 * pad - K + 1,
              "conv_small_cin: grad_y's shape does not match the input, kernel size and padding");
  const float* xp = x.data_ptr<float>(); const float* gp = dy.data_ptr<float>();
  const int nt = at::get_num_threads();
  const int64_t NW = O * C * K * K;
  std::vector<float> lanes(int64_t(nt) * NW * 16, 0.f);  // per thread, per weight: 16 partial sums
  std::vector<double> part(int64_t(nt) * (NW + O), 0.0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    float* acc_w = lanes.data() + int64_t(t) * NW * 16;
    double* acc_b = part.data() + int64_t(t) * (NW + O) + NW;
    std::vector<float> buf(C * Hp * Wp + 32);
    for (int64_t b = b0; b < b1; ++b) {
      pad_image(xp + b * C * H * W, C, H, W, pad, Hp, Wp, buf.data());
      const float* g = gp + b * O * Ho * Wo;
      for (int64_t o0 = 0; o0 < O; o0 += OG) {
        const int64_t og = std::min(OG, O - o0);
        const float* gb = g + o0 * Ho * Wo;
        switch (og) {
          case 6: wgrad_block<6>(buf.data(), gb, o0, C, K, Hp, Wp, Ho, Wo, acc_w); break;
          case 5: wgrad_block<5>(buf.data(), gb, o0, C, K, Hp, Wp, Ho, Wo, acc_w); break;
          case 4: wgrad_block<4>(buf.data(), gb, o0, C, K, Hp, Wp, Ho, Wo, acc_w); break;
          case 3: wgrad_block<3>(buf.data(), gb, o0, C, K, Hp, Wp, Ho, Wo, acc_w); break;
          case 2: wgrad_block<2>(buf.data(), gb, o0, C, K, Hp, Wp, Ho, Wo, acc_w); break;
          default: wgrad_block<1>(buf.data(), gb, o0, C, K, Hp, Wp, Ho, Wo, acc_w); break;
        }
      }
      if (with_bias)
        for (int64_t o = 0; o < O; ++o) {
          __m512 s = _mm512_setzero_ps();
          const float* go = g + o * Ho * Wo;
          for (int64_t i = 0; i < Ho * Wo; i += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(first16(Ho * Wo - i), go + i));
          acc_b[o] += _mm512_reduce_add_ps(s);
        }
    }
    for (int64_t i = 0; i < NW; ++i) part[t * (NW + O) + i] = _mm512_reduce_add_ps(_mm512_loadu_ps(acc_w + i * 16));
  });
  auto dw = torch::zeros({O, C, K, K}, x.options()), db = torch::zeros({O}, x.options());
  float* dwp = dw.data_ptr<float>(); float* dbp = db.data_ptr<float>();
  for (int64_t i = 0; i < NW; ++i) { double s = 0; for (int t = 0; t < nt; ++t) s += part[t * (NW + O) + i]; dwp[i] = float(s); }
  for (int64_t o = 0; o < O; ++o) { double s = 0; for (int t = 0; t < nt; ++t) s += part[t * (NW + O) + NW + o]; dbp[o] = float(s); }
  return {dw, db};
}
