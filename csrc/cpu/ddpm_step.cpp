// CPU sampler step and Philox noise: OpenMP over images and channels, the inner loop over
// contiguous pixels so the compiler can vectorise the update.
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "convert.h"

namespace ddpm_fast {

void ddpm_step_cpu(const StepArgs& a) {
  if (a.step[0] < 0 || a.step[0] >= a.rows) {     // past the table: NaN, not a wild read
    std::fill(a.out, a.out + a.n * a.c * a.h * a.w, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float* coef = a.coef + a.step[0] * kCoefCols;
  const bool add_noise = coef[kSigma] != 0.0f;
  const uint32_t t = static_cast<uint32_t>(coef[kT]);
  const int64_t hw = a.h * a.w, chw = a.c * hw;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < a.n; ++n) {
    for (int64_t ch = 0; ch < a.c; ++ch) {
      std::vector<float> z(hw, 0.0f), e(hw);
      const int64_t base = n * chw + ch * hw;
      if (add_noise) {
        if (a.noise) {
          std::memcpy(z.data(), a.noise + base, hw * sizeof(float));
        } else {  // this plane's elements [ch·hw, ch·hw + hw), one Philox call per four
          const uint64_t seed = static_cast<uint64_t>(a.key[0]);
          const uint32_t image = static_cast<uint32_t>(a.key[1] + n);
          const int64_t first = ch * hw, lead = first & 3;
          float q[4];
          for (int64_t e0 = first - lead; e0 < first + hw; e0 += 4) {
            philox_normals4(seed, image, t, static_cast<uint64_t>(e0 >> 2), q);
            for (int j = 0; j < 4; ++j)
              if (e0 + j >= first && e0 + j < first + hw) z[e0 + j - first] = q[j];
          }
        }
      }
      for (int64_t y = 0; y < a.h; ++y)
        for (int64_t xx = 0; xx < a.w; ++xx)
          e[y * a.w + xx] = load_as_float(a.eps, a.eps_dtype,
                                     n * a.eps_stride[0] + ch * a.eps_stride[1] +
                                         y * a.eps_stride[2] + xx * a.eps_stride[3]);
      const float* x = a.x + base;
      float* out = a.out + base;
      for (int64_t p = 0; p < hw; ++p) out[p] = sampler_update(x[p], e[p], z[p], coef, a.clip);
    }
  }
}

void philox_normal_cpu(const NoiseArgs& a) {
  const uint64_t seed = static_cast<uint64_t>(a.key[0]);
  const uint32_t step = static_cast<uint32_t>(a.step[0]);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < a.n; ++n) {
    const uint32_t image = static_cast<uint32_t>(a.key[1] + n);
    philox_normals(seed, image, step, a.per_image, a.out + n * a.per_image);
  }
}

void philox_raw_cpu(uint32_t* out, int64_t count, uint32_t c1, uint32_t c2, uint32_t c3,
                    uint32_t k0, uint32_t k1) {
  for (int64_t i = 0; i < count; ++i) {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(i), c1, c2, c3, k0, k1);
    for (int j = 0; j < 4; ++j) out[4 * i + j] = r.v[j];
  }
}

}  // namespace ddpm_fast
