// Loads and stores of the CPU twins: float <-> the tensor's dtype in forms the compiler vectorises. c10::BFloat16's
// own conversion to bf16 branches on NaN, which keeps a loop scalar; this one rounds to nearest even with integer
// arithmetic (a NaN stays a NaN unless its payload sits only in the 16 low bits). fp16 and fp32 use c10's.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace segkd {

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <>
inline float to_float(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float f) {
  return static_cast<T>(f);
}

template <>
inline c10::BFloat16 from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
}

// x[i * stride] as float; kUnit: stride 1 (a contiguous, vectorisable load)
template <typename T, bool kUnit>
inline float load(const T* p, int64_t i, int64_t stride) {
  return to_float(p[kUnit ? i : i * stride]);
}

}  // namespace segkd
