// Small helpers shared by the trainer's CPU kernels (bn_maxpool_relu.cpp, conv_small_cin.cpp,
// conv_bn_pool_relu.cpp, bn_relu_cl.cpp, add_maxpool_cl.cpp).
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace cnnstack {
// The mask of the first n of 16 float lanes (n <= 0: none, n >= 16: all): for rows whose length is
// not a multiple of 16.
inline __mmask16 first16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's rule), and back.
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline __m512 from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// 16 values of a float32 or bfloat16 buffer as float32 (masked lanes 0), and back.
template <typename T> inline __m512 load16(const T* p, __mmask16 m);
template <> inline __m512 load16<float>(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <> inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p, __mmask16 m) {
  return from_bf16(_mm256_maskz_loadu_epi16(m, p));
}
template <typename T> inline void store16(T* p, __mmask16 m, __m512 v);
template <> inline void store16<float>(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
template <> inline void store16<c10::BFloat16>(c10::BFloat16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, to_bf16(v));
}
// v rounded to T's precision (what storing and reloading it gives).
template <typename T> inline __m512 round_to(__m512 v) { return v; }
template <> inline __m512 round_to<c10::BFloat16>(__m512 v) { return from_bf16(to_bf16(v)); }

// The maximum of each lane's 2x2 window v0..v3 (top-left, top-right, bottom-left, bottom-right) and
// its index 0..3, by ATen's rule: the first maximum in row-major order. dl / dr: the bottom pixel
// won its column; right: the right column won; select() picks the same pixel from other vectors.
struct WindowMax {
  __m512 m;
  __m512i k;
  __mmask16 dl, dr, right;
  __m512 select(__m512 a0, __m512 a1, __m512 a2, __m512 a3) const {
    return _mm512_mask_blend_ps(right, _mm512_mask_blend_ps(dl, a0, a2), _mm512_mask_blend_ps(dr, a1, a3));
  }
};
inline WindowMax window_max(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  WindowMax w;
  w.dl = _mm512_cmp_ps_mask(v2, v0, _CMP_GT_OQ);
  w.dr = _mm512_cmp_ps_mask(v3, v1, _CMP_GT_OQ);
  const __m512 lv = _mm512_mask_blend_ps(w.dl, v0, v2), rv = _mm512_mask_blend_ps(w.dr, v1, v3);
  // Right wins if larger, or equal with the smaller row-major index (1 vs 2).
  w.right = _mm512_cmp_ps_mask(rv, lv, _CMP_GT_OQ) | (_mm512_cmp_ps_mask(rv, lv, _CMP_EQ_OQ) & w.dl & __mmask16(~w.dr));
  w.m = _mm512_mask_blend_ps(w.right, lv, rv);
  const __m512i li = _mm512_mask_blend_epi32(w.dl, _mm512_set1_epi32(0), _mm512_set1_epi32(2));
  const __m512i ri = _mm512_mask_blend_epi32(w.dr, _mm512_set1_epi32(1), _mm512_set1_epi32(3));
  w.k = _mm512_mask_blend_epi32(w.right, li, ri);
  return w;
}

// One image's input channels copied into zero-padded planes (Hp, Wp), with 32 spare floats per row
// end so every 32-wide load stays inside the buffer.
inline void pad_image(const float* x, int64_t C, int64_t H, int64_t W, int64_t pad, int64_t Hp, int64_t Wp, float* buf) {
  std::fill(buf, buf + C * Hp * Wp + 32, 0.f);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t h = 0; h < H; ++h)
      std::copy(x + (c * H + h) * W, x + (c * H + h) * W + W, buf + (c * Hp + h + pad) * Wp + pad);
}
}  // namespace cnnstack
