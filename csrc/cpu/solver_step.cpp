// CPU few-step solver step (solvers/table.py): OpenMP over images and channels, the inner loop
// over one plane's contiguous pixels; Philox noise drawn as ddpm_step.cpp draws it.
#include <algorithm>
#include <limits>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "convert.h"

namespace ddpm_fast {

void solver_step_cpu(const SolverArgs& a) {
  const int64_t total = a.n * a.c * a.h * a.w;
  if (a.step[0] < 0 || a.step[0] >= a.rows) {     // past the table: NaN, not a wild read
    std::fill(a.x, a.x + total, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float* coef = a.coef + a.step[0] * kSolverCols;
  const uint32_t word = static_cast<uint32_t>(coef[kWord]);
  const int64_t hw = a.h * a.w, chw = a.c * hw;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < a.n; ++n) {
    for (int64_t ch = 0; ch < a.c; ++ch) {
      std::vector<float> z(hw, 0.0f), o(hw);
      if (a.stochastic) {  // this plane's elements [ch·hw, ch·hw + hw), one Philox call per four
        const uint64_t seed = static_cast<uint64_t>(a.key[0]);
        const uint32_t image = static_cast<uint32_t>(a.key[1] + n);
        const int64_t first = ch * hw, lead = first & 3;
        float q[4];
        for (int64_t e0 = first - lead; e0 < first + hw; e0 += 4) {
          philox_normals4(seed, image, word, static_cast<uint64_t>(e0 >> 2), q);
          for (int j = 0; j < 4; ++j)
            if (e0 + j >= first && e0 + j < first + hw) z[e0 + j - first] = q[j];
        }
      }
      for (int64_t y = 0; y < a.h; ++y)
        for (int64_t xx = 0; xx < a.w; ++xx)
          o[y * a.w + xx] = load_as_float(a.out, a.out_dtype,
                                          n * a.out_stride[0] + ch * a.out_stride[1] +
                                              y * a.out_stride[2] + xx * a.out_stride[3]);
      const int64_t base = n * chw + ch * hw;
      float *x = a.x + base, *last = a.x_last + base;
      float *m1 = a.m1 + base, *m2 = a.m2 + base, *m3 = a.m3 + base;
      for (int64_t p = 0; p < hw; ++p) {
        const SolverElem r = solver_update(SolverElem{x[p], last[p], m1[p], m2[p], m3[p]}, o[p],
                                           z[p], coef, a.corrector, a.stochastic);
        x[p] = r.x;
        last[p] = r.x_last;
        m1[p] = r.m1;
        m2[p] = r.m2;
        m3[p] = r.m3;
      }
    }
  }
}

}  // namespace ddpm_fast
