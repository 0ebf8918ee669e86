// Scalar fp16/bf16 <-> fp32 conversions for the CPU kernels (round to nearest even).
#pragma once
#include <cstdint>
#include <cstring>

#include "../common.h"

namespace ddpm_fast {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_float(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  int e = -1;  // subnormal half: normalise
  do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | ((112u - e) << 23) | ((mant & 0x3FFu) << 13));
}

// Element `i` of a buffer holding `dtype` (DType code), as fp32.
inline float load_as_float(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  const uint16_t v = static_cast<const uint16_t*>(p)[i];
  return dtype == kBFloat16 ? bf16_to_float(v) : half_to_float(v);
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t b = float_to_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline uint16_t float_to_half(float f) {  // round to nearest even
  const uint32_t b = float_to_bits(f);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t abs = b & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);           // NaN
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);          // overflow
  if (abs < 0x38800000u) {                                                        // subnormal
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = abs >> 23, mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  return static_cast<uint16_t>(sign | r);
}

// Store fp32 `v` as element `i` of a buffer holding `dtype`.
inline void store_from_float(void* p, int dtype, int64_t i, float v) {
  if (dtype == kFloat32) static_cast<float*>(p)[i] = v;
  else if (dtype == kBFloat16) static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  else static_cast<uint16_t*>(p)[i] = float_to_half(v);
}

}  // namespace ddpm_fast
