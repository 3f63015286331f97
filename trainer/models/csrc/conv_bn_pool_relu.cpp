// A first stage in one op: Conv2d (stride 1, at most 4 input channels, the input needs no gradient)
// -> training-mode BatchNorm2d -> MaxPool2d(2, 2) -> ReLU, for float32 input on x86-64 CPUs with
// AVX-512 (F, BW, VL). Output channels-last (B, Ho, Wo, O), float32 or bfloat16. Built with the
// other kernels (ops.cpp binds it).
//
// Why: fmnist_net's first stage, (256, 1, 28, 28) -> conv 16 channels -> BN -> pool -> ReLU, wrote
// and re-read its (256, 16, 28, 28) float32 conv output (12.8 MB) four times a step, and its gradient
// twice, plus two layout copies: ~13 ms of a ~65 ms step on 2 cores, bound by memory, not by its
// 29 M multiply-adds. Here the conv output is never stored: it is recomputed in registers (one
// 16-channel vector per pixel, the input pixels broadcast) by each pass:
//   forward 1: batch statistics; forward 2: normalize, 2x2 max, ReLU, store the pooled output and
//   a byte per value (argmax | 4 if the output is positive); backward (one pass): BatchNorm's and
//   the conv's weight-gradient sums together (see conv_bn_pool_relu_bwd).
// The same function as the modules (ATen's first-maximum tie rule, ReLU keeping NaN, unbiased
// variance into running_var); rounding differs by a few ulp (another summation order).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "simd.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {
using cnnstack::first16;
using cnnstack::pad_image;

struct Geom {
  int64_t B, C, H, W, O, K, pad;
  int64_t Hp, Wp;  // padded input planes (Wp has 32 spare floats per row)
  int64_t Hc, Wc;  // conv output
  int64_t Ho, Wo;  // pooled output
  int64_t NV;      // 16-channel vectors covering O
};

Geom geometry(const torch::Tensor& x, const torch::Tensor& w, int64_t pad) {
  Geom g{};
  g.B = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.O = w.size(0); g.K = w.size(2); g.pad = pad;
  g.Hp = g.H + 2 * pad; g.Wp = g.W + 2 * pad + 32;
  g.Hc = g.Hp - g.K + 1; g.Wc = g.W + 2 * pad - g.K + 1;
  g.Ho = g.Hc / 2; g.Wo = g.Wc / 2; g.NV = (g.O + 15) / 16;
  return g;
}

// weight (O, C, K, K) -> (C, K, K, NV * 16), zero past O: each tap is one vector of output channels.
std::vector<float> pack_weight(const float* w, const Geom& g) {
  const int64_t OP = g.NV * 16;
  std::vector<float> p(g.C * g.K * g.K * OP, 0.f);
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t t = 0; t < g.C * g.K * g.K; ++t) p[t * OP + o] = w[o * g.C * g.K * g.K + t];
  return p;
}

// The kernel size and input channels as compile-time constants for the common first layers (the
// tap loops then unroll: 1.3-1.6x faster), or read from Geom (KT, CT = 0).
template <int KT, int CT>
struct Taps {
  static int64_t K(const Geom& g) { return KT ? KT : g.K; }
  static int64_t C(const Geom& g) { return CT ? CT : g.C; }
};
template <typename F>
void with_taps(const Geom& g, F&& f) {
  if (g.C == 1 && g.K == 3) f(Taps<3, 1>{});
  else if (g.C == 1 && g.K == 5) f(Taps<5, 1>{});
  else if (g.C == 3 && g.K == 3) f(Taps<3, 3>{});
  else if (g.C == 3 && g.K == 5) f(Taps<5, 3>{});
  else f(Taps<0, 0>{});
}

// Conv outputs (channels 16v..16v+15) of an R x P tile of pixels at rows h.., columns w0..:
// acc[r * P + p]. buf: the image's padded planes; wv: the packed weight + 16 v.
template <int R, int P, typename D>
inline void conv_tile(const float* buf, const float* wv, __m512 bias, const Geom& g, int64_t h, int64_t w0, __m512* acc) {
  const int64_t OP = g.NV * 16, K = D::K(g), C = D::C(g);
  for (int i = 0; i < R * P; ++i) acc[i] = bias;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t kh = 0; kh < K; ++kh)
      for (int64_t kw = 0; kw < K; ++kw) {
        const __m512 wk = _mm512_loadu_ps(wv + ((c * K + kh) * K + kw) * OP);
        for (int r = 0; r < R; ++r) {
          const float* row = buf + (c * g.Hp + h + r + kh) * g.Wp + w0 + kw;
          for (int p = 0; p < P; ++p) acc[r * P + p] = _mm512_fmadd_ps(_mm512_set1_ps(row[p]), wk, acc[r * P + p]);
        }
      }
}

template <int N>
using Int = std::integral_constant<int, N>;

// Every pixel of the conv output as R x P tiles (2 x 4 where they fit): f(h, w0, acc, Int<R>, Int<P>).
template <typename D, typename F>
inline void for_each_tile(const float* buf, const float* wv, __m512 bias, const Geom& g, F&& f) {
  __m512 acc[8];
  int64_t h = 0;
  for (; h + 2 <= g.Hc; h += 2) {
    int64_t w = 0;
    for (; w + 4 <= g.Wc; w += 4) { conv_tile<2, 4, D>(buf, wv, bias, g, h, w, acc); f(h, w, acc, Int<2>{}, Int<4>{}); }
    for (; w < g.Wc; ++w) { conv_tile<2, 1, D>(buf, wv, bias, g, h, w, acc); f(h, w, acc, Int<2>{}, Int<1>{}); }
  }
  for (; h < g.Hc; ++h) {  // an odd last row
    int64_t w = 0;
    for (; w + 4 <= g.Wc; w += 4) { conv_tile<1, 4, D>(buf, wv, bias, g, h, w, acc); f(h, w, acc, Int<1>{}, Int<4>{}); }
    for (; w < g.Wc; ++w) { conv_tile<1, 1, D>(buf, wv, bias, g, h, w, acc); f(h, w, acc, Int<1>{}, Int<1>{}); }
  }
}

inline __m512 load_grad(const void* p, int64_t e, __mmask16 m, bool bf16) {
  if (bf16) {
    return cnnstack::from_bf16(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + e));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + e);
}

void check(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.dim() == dim && t.is_contiguous(),
              "conv_bn_pool_relu: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dimensions");
}
void check_vector(const torch::Tensor& v, int64_t n, const char* name) {
  check(v, 1, name);
  TORCH_CHECK(v.size(0) == n, "conv_bn_pool_relu: ", name, " must have ", n, " elements");
}
}  // namespace

// (x, conv weight, conv bias or None, padding, BN weight, bias, running_mean, running_var, momentum,
// eps, bf16 output, training) -> (out (B, O, Ho, Wo) channels-last, code (B, Ho, Wo, O) uint8, mean
// (O), invstd (O)). training = false: BatchNorm with its running statistics, and code is not stored
// (empty).
std::vector<torch::Tensor> conv_bn_pool_relu_fwd(torch::Tensor x, torch::Tensor cw, c10::optional<torch::Tensor> cb, int64_t pad,
                                                  torch::Tensor bw, torch::Tensor bb, torch::Tensor running_mean,
                                                  torch::Tensor running_var, double momentum, double eps, bool out_bf16,
                                                  bool training) {
  check(x, 4, "x");
  check(cw, 4, "conv weight");
  const Geom g = geometry(x, cw, pad);
  TORCH_CHECK(cw.size(1) == g.C && cw.size(3) == g.K && pad >= 0 && g.Hc >= 2 && g.Wc >= 2 && g.B > 0,
              "conv_bn_pool_relu: weight must be (O, C, K, K) and the conv output at least 2x2");
  if (cb.has_value()) check_vector(*cb, g.O, "conv bias");
  for (const auto* t : {&bw, &bb, &running_mean, &running_var}) check_vector(*t, g.O, "a BatchNorm parameter or buffer");
  const int64_t OP = g.NV * 16, CHW = g.C * g.H * g.W;
  const std::vector<float> wpk = pack_weight(cw.data_ptr<float>(), g);
  std::vector<float> bias(OP, 0.f);
  if (cb.has_value()) std::copy(cb->data_ptr<float>(), cb->data_ptr<float>() + g.O, bias.begin());
  const float* xp = x.data_ptr<float>();

  auto mean = torch::empty({g.O}, x.options()), invstd = torch::empty({g.O}, x.options());
  std::vector<float> scale(OP, 0.f), shift2(OP, 0.f);
  const float* bwp = bw.data_ptr<float>(); const float* bbp = bb.data_ptr<float>();
  float* rmp = running_mean.data_ptr<float>(); float* rvp = running_var.data_ptr<float>();
  if (!training) {  // inference: the running statistics, left as they are
    for (int64_t o = 0; o < g.O; ++o) {
      mean.data_ptr<float>()[o] = rmp[o];
      invstd.data_ptr<float>()[o] = float(1.0 / std::sqrt(double(rvp[o]) + eps));
      scale[o] = bwp[o] * invstd.data_ptr<float>()[o];
      shift2[o] = bbp[o] - rmp[o] * scale[o];
    }
  } else {
    // Pass 1: sums of (conv - shift) and its square per channel; shift = image 0's centre pixel, so
    // the sums cancel less when the mean is large against the spread.
    std::vector<float> shift(OP, 0.f);
    {
      std::vector<float> buf(g.C * g.Hp * g.Wp + 32);
      pad_image(xp, g.C, g.H, g.W, g.pad, g.Hp, g.Wp, buf.data());
      for (int64_t v = 0; v < g.NV; ++v) {
        __m512 acc[1];
        conv_tile<1, 1, Taps<0, 0>>(buf.data(), wpk.data() + v * 16, _mm512_loadu_ps(bias.data() + v * 16), g, g.Hc / 2, g.Wc / 2, acc);
        _mm512_storeu_ps(shift.data() + v * 16, acc[0]);
      }
    }
    const int nt = at::get_num_threads();
    std::vector<double> ps(int64_t(nt) * OP, 0.0), pq(int64_t(nt) * OP, 0.0);
    with_taps(g, [&](auto taps) {
      using D = decltype(taps);
      at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
        const int t = at::get_thread_num();
        std::vector<float> buf(g.C * g.Hp * g.Wp + 32);
        for (int64_t b = b0; b < b1; ++b) {
          pad_image(xp + b * CHW, g.C, g.H, g.W, g.pad, g.Hp, g.Wp, buf.data());
          for (int64_t v = 0; v < g.NV; ++v) {
            const __m512 sh = _mm512_loadu_ps(shift.data() + v * 16);
            __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps();
            for_each_tile<D>(buf.data(), wpk.data() + v * 16, _mm512_loadu_ps(bias.data() + v * 16), g,
                          [&](int64_t, int64_t, const __m512* acc, auto RR, auto PP) {
                            constexpr int R = decltype(RR)::value, P = decltype(PP)::value;
                            for (int i = 0; i < R * P; ++i) {
                              const __m512 d = _mm512_sub_ps(acc[i], sh);
                              s = _mm512_add_ps(s, d); q = _mm512_fmadd_ps(d, d, q);
                            }
                          });
            alignas(64) float sl[16], ql[16];
            _mm512_store_ps(sl, s); _mm512_store_ps(ql, q);
            for (int l = 0; l < 16; ++l) { ps[t * OP + v * 16 + l] += sl[l]; pq[t * OP + v * 16 + l] += ql[l]; }
          }
        }
      });
    });
    const double n = double(g.B * g.Hc * g.Wc);
    for (int64_t o = 0; o < g.O; ++o) {
      double a = 0, q = 0;
      for (int t = 0; t < nt; ++t) { a += ps[t * OP + o]; q += pq[t * OP + o]; }
      const double md = a / n, var = std::max(q / n - md * md, 0.0), m = md + shift[o];
      mean.data_ptr<float>()[o] = float(m);
      invstd.data_ptr<float>()[o] = float(1.0 / std::sqrt(var + eps));
      scale[o] = bwp[o] * invstd.data_ptr<float>()[o];
      shift2[o] = bbp[o] - float(m) * scale[o];
      rmp[o] = float((1 - momentum) * rmp[o] + momentum * m);
      rvp[o] = float((1 - momentum) * rvp[o] + momentum * var * n / std::max(n - 1, 1.0));
    }
  }

  // Pass 2: normalize, 2x2 max (ATen's first maximum in row-major order), ReLU; channels-last stores.
  auto opts = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  auto out = torch::empty({g.B, g.O, g.Ho, g.Wo}, out_bf16 ? opts.dtype(torch::kBFloat16) : opts);
  // What the backward needs (not stored in inference).
  const int64_t saved = training ? g.B * g.Ho * g.Wo * g.O : 0;
  auto code = torch::empty({saved}, x.options().dtype(torch::kUInt8));
  void* outp = out.data_ptr(); uint8_t* kp = code.data_ptr<uint8_t>();
  with_taps(g, [&](auto taps) {
    using D = decltype(taps);
    at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf(g.C * g.Hp * g.Wp + 32);
      const __m512 zero = _mm512_setzero_ps();
      const __m512i four = _mm512_set1_epi32(4);
      for (int64_t b = b0; b < b1; ++b) {
        pad_image(xp + b * CHW, g.C, g.H, g.W, g.pad, g.Hp, g.Wp, buf.data());
        for (int64_t v = 0; v < g.NV; ++v) {
          const __m512 sc = _mm512_loadu_ps(scale.data() + v * 16), sh = _mm512_loadu_ps(shift2.data() + v * 16);
          const __mmask16 mc = first16(g.O - v * 16);
          const __m512 bias_v = _mm512_loadu_ps(bias.data() + v * 16);
          // One window: x0..x3 = (top-left, top-right, bottom-left, bottom-right) conv outputs.
          auto window = [&](int64_t i, int64_t j, __m512 x0, __m512 x1, __m512 x2, __m512 x3) {
            const __m512 v0 = _mm512_fmadd_ps(x0, sc, sh), v1 = _mm512_fmadd_ps(x1, sc, sh);
            const __m512 v2 = _mm512_fmadd_ps(x2, sc, sh), v3 = _mm512_fmadd_ps(x3, sc, sh);
            const cnnstack::WindowMax wm = cnnstack::window_max(v0, v1, v2, v3);
            const __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(wm.m, zero, _CMP_LT_OQ), wm.m, zero);  // ReLU, NaN kept
            const __m512i k = _mm512_mask_or_epi32(wm.k, _mm512_cmp_ps_mask(wm.m, zero, _CMP_GT_OQ), wm.k, four);
            const int64_t e = ((b * g.Ho + i) * g.Wo + j) * g.O + v * 16;
            if (out_bf16) _mm256_mask_storeu_epi16(static_cast<uint16_t*>(outp) + e, mc, cnnstack::to_bf16(r));
            else _mm512_mask_storeu_ps(static_cast<float*>(outp) + e, mc, r);
            if (training) _mm_mask_storeu_epi8(kp + e, mc, _mm512_cvtepi32_epi8(k));
          };
          __m512 acc[8];
          for (int64_t i = 0; i < g.Ho; ++i) {
            int64_t j = 0;
            for (; j + 2 <= g.Wo; j += 2) {
              conv_tile<2, 4, D>(buf.data(), wpk.data() + v * 16, bias_v, g, 2 * i, 2 * j, acc);
              window(i, j, acc[0], acc[1], acc[4], acc[5]);
              window(i, j + 1, acc[2], acc[3], acc[6], acc[7]);
            }
            if (j < g.Wo) {
              conv_tile<2, 2, D>(buf.data(), wpk.data() + v * 16, bias_v, g, 2 * i, 2 * j, acc);
              window(i, j, acc[0], acc[1], acc[2], acc[3]);
            }
          }
        }
      }
    });
  });
  return {out, code, mean, invstd};
}

// (grad_out (B, O, Ho, Wo) channels-last, float32 or bfloat16; the forward's code, mean, invstd; x;
// conv weight, bias or None, padding; BN weight) -> (d conv weight, d conv bias (zeros without
// one), d BN weight, d BN bias).
//
// One pass: BatchNorm's backward gives the conv output's gradient dx = k1 dy - k2 - k3 (x - mean),
// with k2, k3 known only once the pass has summed dy and dy (x - mean). So the pass sums, per
// channel and tap t, S1 = sum dy in(t) and S3 = sum (x - mean) in(t), with S2 = sum in(t), and the
// weight gradient is k1 S1 - k2 S2 - k3 S3 at the end: x is recomputed once, nothing is stored.
std::vector<torch::Tensor> conv_bn_pool_relu_bwd(torch::Tensor gout, torch::Tensor code, torch::Tensor mean,
                                                  torch::Tensor invstd, torch::Tensor x, torch::Tensor cw,
                                                  c10::optional<torch::Tensor> cb, int64_t pad, torch::Tensor bw) {
  check(x, 4, "x");
  check(cw, 4, "conv weight");
  const Geom g = geometry(x, cw, pad);
  if (cb.has_value()) check_vector(*cb, g.O, "conv bias");
  TORCH_CHECK(gout.is_contiguous(at::MemoryFormat::ChannelsLast) && gout.dim() == 4 && gout.size(0) == g.B &&
                  gout.size(1) == g.O && gout.size(2) == g.Ho && gout.size(3) == g.Wo &&
                  (gout.scalar_type() == torch::kFloat || gout.scalar_type() == torch::kBFloat16),
              "conv_bn_pool_relu: grad_out must be a channels-last float32 or bfloat16 (B, O, Ho, Wo) tensor");
  TORCH_CHECK(code.is_contiguous() && code.numel() == gout.numel(), "conv_bn_pool_relu: saved code does not match grad_out");
  const bool bf16 = gout.scalar_type() == torch::kBFloat16;
  const int64_t OP = g.NV * 16, CHW = g.C * g.H * g.W, NW = g.C * g.K * g.K;
  const void* gp = gout.data_ptr(); const uint8_t* kp = code.data_ptr<uint8_t>();
  const float* mp = mean.data_ptr<float>(); const float* ip = invstd.data_ptr<float>(); const float* bwp = bw.data_ptr<float>();
  std::vector<float> meanv(OP, 0.f);
  std::copy(mp, mp + g.O, meanv.begin());
  const std::vector<float> wpk = pack_weight(cw.data_ptr<float>(), g);
  std::vector<float> bias(OP, 0.f);
  if (cb.has_value()) std::copy(cb->data_ptr<float>(), cb->data_ptr<float>() + g.O, bias.begin());
  const int nt = at::get_num_threads();
  // per thread: a, q, S4 = sum (x - mean) per channel; S1, S3 per tap and channel; S2 per tap
  const int64_t PT = 3 * OP + 2 * NW * OP + NW;
  std::vector<double> part(int64_t(nt) * PT, 0.0);
  const float* xp = x.data_ptr<float>();
  with_taps(g, [&](auto taps) {
    using D = decltype(taps);
    at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
      double* acc_t = part.data() + int64_t(at::get_thread_num()) * PT;
      double *pa = acc_t, *pq = acc_t + OP, *p4 = acc_t + 2 * OP, *p1 = acc_t + 3 * OP, *p3 = p1 + NW * OP;
      double* p2 = p3 + NW * OP;
      std::vector<float> buf(g.C * g.Hp * g.Wp + 32);
      std::vector<float> s1(NW * 16), s3(NW * 16);  // one image, one channel vector
      for (int64_t b = b0; b < b1; ++b) {
        pad_image(xp + b * CHW, g.C, g.H, g.W, g.pad, g.Hp, g.Wp, buf.data());
        for (int64_t c = 0; c < g.C; ++c)  // S2: each tap's input summed over the conv output's pixels
          for (int64_t kh = 0; kh < g.K; ++kh)
            for (int64_t kw = 0; kw < g.K; ++kw) {
              double sum = 0;
              for (int64_t h = 0; h < g.Hc; ++h) {
                const float* row = buf.data() + (c * g.Hp + h + kh) * g.Wp + kw;
                float rs = 0.f;
                for (int64_t w = 0; w < g.Wc; ++w) rs += row[w];
                sum += rs;
              }
              p2[(c * g.K + kh) * g.K + kw] += sum;
            }
        for (int64_t v = 0; v < g.NV; ++v) {
          const __mmask16 mc = first16(g.O - v * 16);
          const __m512 m = _mm512_loadu_ps(meanv.data() + v * 16), bias_v = _mm512_loadu_ps(bias.data() + v * 16);
          std::fill(s1.begin(), s1.end(), 0.f);
          std::fill(s3.begin(), s3.end(), 0.f);
          __m512 va = _mm512_setzero_ps(), vq = _mm512_setzero_ps(), v4 = _mm512_setzero_ps();
          for_each_tile<D>(buf.data(), wpk.data() + v * 16, bias_v, g, [&](int64_t h, int64_t w0, __m512* acc, auto RR, auto PP) {
            constexpr int R = decltype(RR)::value, P = decltype(PP)::value;
            const int64_t K = D::K(g), C = D::C(g);
            __m512 dy[R * P];
            bool done = false;
            if constexpr (R == 2 && P % 2 == 0) {  // whole windows: each one's code and gradient loaded once
              if (h + 2 <= 2 * g.Ho && w0 + P <= 2 * g.Wo) {
                for (int q = 0; q < P / 2; ++q) {
                  const int64_t e = ((b * g.Ho + h / 2) * g.Wo + w0 / 2 + q) * g.O + v * 16;
                  const __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mc, kp + e));
                  const __m512 gw = load_grad(gp, e, mc, bf16);
                  for (int r = 0; r < 2; ++r)
                    for (int p = 2 * q; p < 2 * q + 2; ++p)
                      dy[r * P + p] = _mm512_maskz_mov_ps(
                          _mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32((r * 2 + (p & 1)) | 4)), gw);
                }
                done = true;
              }
            }
            if (!done)
              for (int r = 0; r < R; ++r)
                for (int p = 0; p < P; ++p) {
                  const int64_t hh = h + r, ww = w0 + p;
                  dy[r * P + p] = _mm512_setzero_ps();
                  if (hh < 2 * g.Ho && ww < 2 * g.Wo) {  // pixels past an odd last row or column get none
                    const int64_t e = ((b * g.Ho + hh / 2) * g.Wo + ww / 2) * g.O + v * 16;
                    const __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mc, kp + e));
                    const __m512i want = _mm512_set1_epi32(int((hh & 1) * 2 + (ww & 1)) | 4);
                    dy[r * P + p] = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, want), load_grad(gp, e, mc, bf16));
                  }
                }
            for (int i = 0; i < R * P; ++i) {
              acc[i] = _mm512_sub_ps(acc[i], m);  // x - mean
              va = _mm512_add_ps(va, dy[i]);
              vq = _mm512_fmadd_ps(dy[i], acc[i], vq);
              v4 = _mm512_add_ps(v4, acc[i]);
            }
            for (int64_t c = 0; c < C; ++c)
              for (int64_t kh = 0; kh < K; ++kh)
                for (int64_t kw = 0; kw < K; ++kw) {
                  const int64_t t = ((c * K + kh) * K + kw) * 16;
                  __m512 t1 = _mm512_loadu_ps(s1.data() + t), t3 = _mm512_loadu_ps(s3.data() + t);
                  for (int r = 0; r < R; ++r) {
                    const float* row = buf.data() + (c * g.Hp + h + r + kh) * g.Wp + w0 + kw;
                    for (int p = 0; p < P; ++p) {
                      const __m512 in = _mm512_set1_ps(row[p]);
                      t1 = _mm512_fmadd_ps(dy[r * P + p], in, t1);
                      t3 = _mm512_fmadd_ps(acc[r * P + p], in, t3);
                    }
                  }
                  _mm512_storeu_ps(s1.data() + t, t1);
                  _mm512_storeu_ps(s3.data() + t, t3);
                }
          });
          alignas(64) float la[16], lq[16], l4[16];
          _mm512_store_ps(la, va); _mm512_store_ps(lq, vq); _mm512_store_ps(l4, v4);
          for (int l = 0; l < 16; ++l) { pa[v * 16 + l] += la[l]; pq[v * 16 + l] += lq[l]; p4[v * 16 + l] += l4[l]; }
          for (int64_t i = 0; i < NW; ++i)
            for (int l = 0; l < 16; ++l) {
              p1[i * OP + v * 16 + l] += s1[i * 16 + l];
              p3[i * OP + v * 16 + l] += s3[i * 16 + l];
            }
        }
      }
    });
  });
  std::vector<double> tot(PT, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t i = 0; i < PT; ++i) tot[i] += part[t * PT + i];
  const double *ta = tot.data(), *tq = ta + OP, *t4 = ta + 2 * OP, *t1 = ta + 3 * OP, *t3 = t1 + NW * OP, *t2 = t3 + NW * OP;
  const double n = double(g.B * g.Hc * g.Wc);
  auto dcw = torch::empty({g.O, g.C, g.K, g.K}, x.options()), dcb = torch::zeros({g.O}, x.options());
  auto dbw = torch::empty({g.O}, x.options()), dbb = torch::empty({g.O}, x.options());
  float* dwp = dcw.data_ptr<float>();
  for (int64_t o = 0; o < g.O; ++o) {
    const double is = ip[o], k1 = bwp[o] * is, k2 = k1 * ta[o] / n, k3 = k1 * tq[o] * is * is / n;
    dbb.data_ptr<float>()[o] = float(ta[o]);
    dbw.data_ptr<float>()[o] = float(tq[o] * is);
    for (int64_t i = 0; i < NW; ++i) dwp[o * NW + i] = float(k1 * t1[i * OP + o] - k2 * t2[i] - k3 * t3[i * OP + o]);
    if (cb.has_value()) dcb.data_ptr<float>()[o] = float(k1 * ta[o] - k2 * n - k3 * t4[o]);
  }
  return {dcw, dcb, dbw, dbb};
}
