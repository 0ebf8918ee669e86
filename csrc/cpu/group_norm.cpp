// CPU GroupNorm(+add, +SiLU). Three kernels: fp32 NCHW (one OpenMP task per (image, group)),
// channels_last in fp32/bf16/fp16 (tasks per (image, pixel chunk), vectorised over channels),
// and a scalar one for any other strides. Statistics are two-pass (mean, then the sum of
// squared deviations; float partials merged in double), so fp16 inputs with |x| ~ 300 are
// exact enough and nothing overflows; the output pass fuses affine, SiLU and the dtype cast.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "convert.h"

namespace ddpm_fast {
namespace {

// Below this many elements one thread finishes before a parallel region would have woken the
// others (a fork/join costs several microseconds), so the smallest maps run serially.
constexpr int64_t kParallelMin = 1 << 13;

// exp for the SiLU, branch-free so `omp simd` loops vectorise (libm's expf does not):
// e^x = 2^n · e^r with n = round(x / ln 2), |r| ≤ ln 2 / 2, e^r by a degree-5 Taylor/Horner
// polynomial (relative error < 3.3e-6 on that interval: SiLU's error stays below 1e-6 · |x|;
// degree 6 measured 5-10 % slower for the whole op).
inline float exp_approx(float x) {
  // ternaries and the 1.5·2^23 rounding trick, not fminf/nearbyintf: those are libm calls
  // without SSE4.1 / -ffast-math and would stop the loop from vectorising
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

constexpr int64_t kChunk = 1024;   // float partial sums stay exact enough over this many

__attribute__((target_clones("avx512f", "avx2", "default")))
double chunked_sum(const float* p, int64_t n) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t end = std::min(n, i0 + kChunk);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < end; ++i) s += p[i];
    total += s;
  }
  return total;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
double chunked_squared_deviation(const float* p, int64_t n, float centre) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t end = std::min(n, i0 + kChunk);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < end; ++i) {
      const float d = p[i] - centre;
      s += d * d;
    }
    total += s;
  }
  return total;
}

// The common case, fp32 NCHW-contiguous: plain pointer loops that the compiler vectorises,
// cloned for AVX-512 and AVX2 (the best one is picked at load time; the default is SSE2).
__attribute__((target_clones("avx512f", "avx2", "default")))
void group_norm_nchw_f32(const GroupNormArgs& a) {
  const int64_t cpg = a.c / a.groups, hw = a.h * a.w, count = cpg * hw;
  const float* x = static_cast<const float*>(a.x);
  float* out = static_cast<float*>(a.out);
#pragma omp parallel if (a.n * a.c * hw >= kParallelMin)
  {
  // per thread: 1 + e^-v for a whole group, so the SiLU loops run over the group's contiguous
  // block (cpg·hw elements) instead of one short loop per channel (hw is 16 at 4×4 maps)
  std::vector<float> denom(a.silu ? count : 0);
#pragma omp for schedule(static)
  for (int64_t task = 0; task < a.n * a.groups; ++task) {
    const int64_t n = task / a.groups, g = task % a.groups;
    const int64_t c0 = g * cpg;
    // two passes over the group, which is one contiguous block in NCHW: sum, then the sum of
    // squared deviations (float partials over 1024-element chunks, merged in double). With a
    // per-channel add the deviations differ per channel, so that pass walks the channels.
    const float* block = x + (n * a.c + c0) * hw;
    double sum = chunked_sum(block, count);
    if (a.add)
      for (int64_t k = 0; k < cpg; ++k) sum += static_cast<double>(a.add[n * a.c + c0 + k]) * hw;
    const float mean = static_cast<float>(sum / count);
    double m2 = 0.0;
    if (!a.add) {
      m2 = chunked_squared_deviation(block, count, mean);
    } else {
      for (int64_t k = 0; k < cpg; ++k)
        m2 += chunked_squared_deviation(block + k * hw, hw, mean - a.add[n * a.c + c0 + k]);
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(m2 / count + a.eps));
    float* dst_block = out + (n * a.c + c0) * hw;
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t ch = c0 + k;
      const float centre = mean - (a.add ? a.add[n * a.c + ch] : 0.0f);
      const float scale = a.weight[ch] * rstd, offset = a.bias[ch] - centre * scale;
      const float* src = block + k * hw;
      float* dst = dst_block + k * hw;
#pragma omp simd
      for (int64_t p = 0; p < hw; ++p) dst[p] = src[p] * scale + offset;
    }
    if (a.silu) {
      // two loops: GCC's vector code for one fused exp-and-divide loop ran 2.7x slower
      float* den = denom.data();
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) den[i] = 1.0f + exp_approx(-dst_block[i]);
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) dst_block[i] = dst_block[i] / den[i];
    }
  }
  }
}

// Element access for the channels_last kernel: fp32, or bf16 / fp16 bits widened to fp32.
struct F32 {
  using T = float;
  static float load(T v) { return v; }
  static T store(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static float load(T v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
  // round to nearest even; a NaN stays a (quiet) NaN. Branch-free so that loops vectorise.
  static T store(float v) {
    const uint32_t b = float_to_bits(v);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return static_cast<T>((b & 0x7FFFFFFFu) > 0x7F800000u ? (b >> 16) | 0x40u : rounded);
  }
};
struct F16 {
  using T = uint16_t;
  static float load(T v) { return half_to_float(v); }
  static T store(float v) { return float_to_half(v); }
};

// Pixels per task of the channels_last kernel: a float partial sum per channel over this many
// pixels stays exact enough, and a 32×32 map still splits into 16 tasks for the threads.
constexpr int64_t kPixelChunk = 64;

// channels_last (NHWC) with each pixel's channels contiguous: a group is cpg channels of every
// pixel, so the loops run over pixels and vectorise over the channels. Three passes over x:
// per-channel sums, per-channel squared deviations from the group mean (both float per pixel
// chunk, merged per group in double), then affine (+ SiLU) and the store. Tasks are
// (image, pixel chunk), so batch 1 still spreads over the threads.
template <typename E>
__attribute__((target_clones("avx512f", "avx2", "default")))
void group_norm_nhwc(const GroupNormArgs& a) {
  using T = typename E::T;
  const int64_t C = a.c, hw = a.h * a.w, cpg = C / a.groups, count = cpg * hw;
  const int64_t chunks = (hw + kPixelChunk - 1) / kPixelChunk, tasks = a.n * chunks;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  std::vector<float> partial(tasks * C);              // per (image, chunk, channel)
  std::vector<float> centre(a.n * C), rstd(a.n * a.groups);
#pragma omp parallel if (a.n * C * hw >= kParallelMin)
  {
    std::vector<float> row(C), den(C), scale(C), offset(C);
    std::vector<double> total(a.groups);
    // image n's per-group totals of the chunks' per-channel partials, in double
    auto group_totals = [&](int64_t n) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t ch = 0; ch < C; ++ch) total[ch / cpg] += partial[(n * chunks + k) * C + ch];
    };
    // pass 1: per-channel sums of x
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / chunks, p0 = (task % chunks) * kPixelChunk;
      const int64_t p1 = std::min(hw, p0 + kPixelChunk);
      float* acc = partial.data() + task * C;
      std::fill(acc, acc + C, 0.0f);
      for (int64_t p = p0; p < p1; ++p) {
        const T* src = x + (n * hw + p) * C;
#pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) acc[ch] += E::load(src[ch]);
      }
    }
    // group means, kept as centre[n, c] = mean of c's group − add[n, c]: x − centre is then
    // the deviation of x + add from the mean
#pragma omp for schedule(static)
    for (int64_t n = 0; n < a.n; ++n) {
      group_totals(n);
      if (a.add)
        for (int64_t ch = 0; ch < C; ++ch) total[ch / cpg] += static_cast<double>(a.add[n * C + ch]) * hw;
      for (int64_t ch = 0; ch < C; ++ch)
        centre[n * C + ch] = static_cast<float>(total[ch / cpg] / count) -
                             (a.add ? a.add[n * C + ch] : 0.0f);
    }
    // pass 2: per-channel sums of squared deviations
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / chunks, p0 = (task % chunks) * kPixelChunk;
      const int64_t p1 = std::min(hw, p0 + kPixelChunk);
      float* acc = partial.data() + task * C;
      const float* ctr = centre.data() + n * C;
      std::fill(acc, acc + C, 0.0f);
      for (int64_t p = p0; p < p1; ++p) {
        const T* src = x + (n * hw + p) * C;
#pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) {
          const float d = E::load(src[ch]) - ctr[ch];
          acc[ch] += d * d;
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < a.n; ++n) {
      group_totals(n);
      for (int64_t g = 0; g < a.groups; ++g)
        rstd[n * a.groups + g] = static_cast<float>(1.0 / std::sqrt(total[g] / count + a.eps));
    }
    // pass 3: y = x · scale + offset (+ SiLU) with scale = weight · rstd of the channel's group
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / chunks, p0 = (task % chunks) * kPixelChunk;
      const int64_t p1 = std::min(hw, p0 + kPixelChunk);
      for (int64_t ch = 0; ch < C; ++ch) {
        scale[ch] = a.weight[ch] * rstd[n * a.groups + ch / cpg];
        offset[ch] = a.bias[ch] - centre[n * C + ch] * scale[ch];
      }
      const float *sc = scale.data(), *off = offset.data();
      float *r = row.data(), *d = den.data();
      for (int64_t p = p0; p < p1; ++p) {
        const T* src = x + (n * hw + p) * C;
        T* dst = out + (n * hw + p) * C;
#pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) r[ch] = E::load(src[ch]) * sc[ch] + off[ch];
        if (a.silu) {     // two loops, as in the NCHW kernel
#pragma omp simd
          for (int64_t ch = 0; ch < C; ++ch) d[ch] = 1.0f + exp_approx(-r[ch]);
#pragma omp simd
          for (int64_t ch = 0; ch < C; ++ch) r[ch] = r[ch] / d[ch];
        }
#pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) dst[ch] = E::store(r[ch]);
      }
    }
  }
}

bool is_nchw_contiguous(const int64_t* stride, const GroupNormArgs& a) {
  return stride[3] == 1 && stride[2] == a.w && stride[1] == a.h * a.w &&
         stride[0] == a.c * a.h * a.w;
}

bool is_nhwc_contiguous(const int64_t* stride, const GroupNormArgs& a) {
  return stride[1] == 1 && stride[3] == a.c && stride[2] == a.w * a.c &&
         stride[0] == a.h * a.w * a.c;
}

}  // namespace

void group_norm_cpu(const GroupNormArgs& a) {
  if (a.dtype == kFloat32 && is_nchw_contiguous(a.x_stride, a) &&
      is_nchw_contiguous(a.out_stride, a)) {
    group_norm_nchw_f32(a);
    return;
  }
  if (is_nhwc_contiguous(a.x_stride, a) && is_nhwc_contiguous(a.out_stride, a)) {
    if (a.dtype == kFloat32) group_norm_nhwc<F32>(a);
    else if (a.dtype == kBFloat16) group_norm_nhwc<BF16>(a);
    else group_norm_nhwc<F16>(a);
    return;
  }
  const int64_t cpg = a.c / a.groups, hw = a.h * a.w, count = cpg * hw;
#pragma omp parallel for schedule(static) if (a.n * a.c * hw >= kParallelMin)
  for (int64_t task = 0; task < a.n * a.groups; ++task) {
    const int64_t n = task / a.groups, g = task % a.groups;
    std::vector<float> v(count);
    // gather the group (+ add) into a contiguous fp32 buffer, channel-major
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t ch = g * cpg + k;
      const float shift = a.add ? a.add[n * a.c + ch] : 0.0f;
      const int64_t base = n * a.x_stride[0] + ch * a.x_stride[1];
      float* dst = v.data() + k * hw;
      for (int64_t y = 0; y < a.h; ++y)
        for (int64_t x = 0; x < a.w; ++x)
          dst[y * a.w + x] = load_as_float(a.x, a.dtype, base + y * a.x_stride[2] + x * a.x_stride[3]) + shift;
    }
    double sum = 0.0;
    for (int64_t i = 0; i < count; ++i) sum += v[i];
    const double mean = sum / static_cast<double>(count);
    double m2 = 0.0;
    for (int64_t i = 0; i < count; ++i) {
      const double d = v[i] - mean;
      m2 += d * d;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(m2 / static_cast<double>(count) + a.eps));
    const float meanf = static_cast<float>(mean);
    for (int64_t k = 0; k < cpg; ++k) {
      const int64_t ch = g * cpg + k;
      const float scale = a.weight[ch] * rstd, offset = a.bias[ch] - meanf * scale;
      const int64_t base = n * a.out_stride[0] + ch * a.out_stride[1];
      const float* src = v.data() + k * hw;
      for (int64_t y = 0; y < a.h; ++y)
        for (int64_t x = 0; x < a.w; ++x) {
          float r = src[y * a.w + x] * scale + offset;
          if (a.silu) r = r / (1.0f + exp_approx(-r));
          store_from_float(a.out, a.dtype, base + y * a.out_stride[2] + x * a.out_stride[3], r);
        }
    }
  }
}

}  // namespace ddpm_fast
