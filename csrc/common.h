// Shared definitions for the CPU and CUDA kernels: the Philox-4x32-10 generator, the Box-Muller
// transform and the sampler-step formula. Written once, compiled for host and device, so both
// backends compute the same bits (the torch and Triton versions in Python follow this file).
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#endif

namespace ddpm_fast {

// dtype codes shared with ddpm_fast/_native.py
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Columns of the per-step coefficient table (float32 [num_steps, kCoefCols]), see schedule.py;
// eps is the model output (noise, v or x0 prediction: D, A, B say which):
//   x0     = (D * x - A * eps) / B, optionally clipped to [-R, R]
//   x_prev = C0 * x0 + C1 * x + C2 * eps + SIGMA * z
// T holds the diffusion timestep (an integer stored exactly in float32); it is the Philox
// counter's step word, so noise depends on the timestep, not on the position in the loop.
enum CoefCol : int {
  kA = 0, kB = 1, kC0 = 2, kC1 = 3, kC2 = 4, kSigma = 5, kT = 6, kD = 7, kR = 8, kCoefCols = 12
};

struct Philox4 {
  uint32_t v[4];
};

DDPM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox-4x32-10 (Salmon et al., SC'11). key = (seed low word, image index),
// counter = (element group, step, seed high word, 0).
DDPM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                              uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(M0, c0), lo0 = M0 * c0;
    const uint32_t hi1 = mulhi32(M1, c2), lo1 = M1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += W0; k1 += W1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// uint32 -> uniform in (0, 1): the top 24 bits plus half a step, exact in float64.
DDPM_HD double uniform_open01(uint32_t x) {
  return (static_cast<double>(x >> 8) + 0.5) * 5.9604644775390625e-08;
}

// Box-Muller in float64, rounded once to float32: every backend's float64 log/sqrt/sin/cos is
// accurate to about one double ulp, so the rounded float32 values agree bit for bit across
// backends (a disagreement needs a double result within 1e-16 of a float rounding boundary).
DDPM_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const double r = sqrt(-2.0 * log(uniform_open01(a)));
  const double theta = 6.283185307179586 * uniform_open01(b);
  *z0 = static_cast<float>(r * cos(theta));
  *z1 = static_cast<float>(r * sin(theta));
}

// The four standard normals of Philox group `group` (elements 4·group … 4·group+3) of image
// `image` at diffusion step `step`: counter (group, step, seed >> 32, 0), key (seed, image).
DDPM_HD void philox_normals4(uint64_t seed, uint32_t image, uint32_t step, uint64_t group,
                             float z[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(group), step,
                                  static_cast<uint32_t>(seed >> 32), 0u,
                                  static_cast<uint32_t>(seed), image);
  box_muller(r.v[0], r.v[1], &z[0], &z[1]);
  box_muller(r.v[2], r.v[3], &z[2], &z[3]);
}

// Normals for elements [0, count) of one image, one Philox call per group of four.
inline void philox_normals(uint64_t seed, uint32_t image, uint32_t step, int64_t count,
                           float* out) {
  float z[4];
  for (int64_t g = 0; 4 * g < count; ++g) {
    philox_normals4(seed, image, step, static_cast<uint64_t>(g), z);
    for (int j = 0; j < 4 && 4 * g + j < count; ++j) out[4 * g + j] = z[j];
  }
}

// Columns of a few-step solver's table (float32 [num_steps, kSolverCols]), see
// ddpm_fast/solvers/table.py:
//   m    = P * x + Q * out
//   x_c  = KX * x + KL * x_last + K0 * m + K1 * m1 + K2 * m2 + K3 * m3   (with a corrector)
//   x'   = A * x_c + B0 * m + B1 * m1 + B2 * m2 + S * z
//   then x_last = x_c, m3 = m2, m2 = m1, m1 = m
// WORD is the Philox step word of the step's noise; C_IN scales the U-Net's input (not here).
enum SolverCol : int {
  kCIn = 0, kP = 1, kQ = 2, kKX = 3, kKL = 4, kK0 = 5, kK1 = 6, kK2 = 7, kK3 = 8, kSA = 9,
  kB0 = 10, kB1 = 11, kB2 = 12, kS = 13, kST = 14, kWord = 15, kOrder = 16, kThresh = 17,
  kSolverCols = 20
};

// The state of one element across a solver step: the sample and the history buffers.
struct SolverElem {
  float x, x_last, m1, m2, m3;
};

// One solver step for one element, in the torch reference's order of operations (left to
// right sums, no fused multiply-add on the CPU) so the CPU result is bit-equal to it.
DDPM_HD SolverElem solver_update(SolverElem s, float out, float z, const float* c,
                                 bool corrector, bool stochastic) {
  const float m = c[kP] * s.x + c[kQ] * out;
  float xc = s.x;
  if (corrector)
    xc = c[kKX] * s.x + c[kKL] * s.x_last + c[kK0] * m + c[kK1] * s.m1 + c[kK2] * s.m2 +
         c[kK3] * s.m3;
  float next = c[kSA] * xc + c[kB0] * m + c[kB1] * s.m1 + c[kB2] * s.m2;
  if (stochastic) next = next + c[kS] * z;
  return SolverElem{next, corrector ? xc : s.x_last, m, s.m1, s.m2};
}

// One sampler update for one element; coef points at the step's table row.
DDPM_HD float sampler_update(float x, float eps, float z, const float* coef, bool clip) {
  float x0 = (coef[kD] * x - coef[kA] * eps) / coef[kB];
  if (clip) x0 = fminf(fmaxf(x0, -coef[kR]), coef[kR]);
  const float mean = coef[kC0] * x0 + coef[kC1] * x + coef[kC2] * eps;
  return mean + coef[kSigma] * z;
}

}  // namespace ddpm_fast
