// Small AVX-512 helpers shared by the trainer's CPU kernels (bn_maxpool_relu.cpp, conv_small_cin.cpp).
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace cnnstack {
// The mask of the first n of 16 float lanes (n <= 0: none, n >= 16: all): for rows whose length is
// not a multiple of 16.
inline __mmask16 first16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
}  // namespace cnnstack
