// pybind11 module ddpm_fast._C. Functions take integers (addresses, sizes, strides, dtype codes,
// stream handles); ddpm_fast/_native.py turns tensors into these. No libtorch is linked, so the
// binary works with any torch version and builds without a CUDA build of torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>

#include "common.h"
#include "ops.h"

namespace py = pybind11;
using namespace ddpm_fast;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

StepArgs make_step_args(uintptr_t x, uintptr_t eps, int eps_dtype,
                        std::array<int64_t, 4> eps_stride, uintptr_t noise, uintptr_t out,
                        uintptr_t coef, int64_t rows, uintptr_t step, uintptr_t key,
                        std::array<int64_t, 4> shape, bool clip) {
  if (eps_dtype < kFloat32 || eps_dtype > kFloat16) throw std::invalid_argument("bad eps dtype code");
  StepArgs a;
  a.x = ptr<const float>(x);
  a.eps = ptr<const void>(eps);
  a.eps_dtype = eps_dtype;
  for (int i = 0; i < 4; ++i) a.eps_stride[i] = eps_stride[i];
  a.noise = ptr<const float>(noise);
  a.out = ptr<float>(out);
  a.coef = ptr<const float>(coef);
  a.rows = rows;
  a.step = ptr<const int64_t>(step);
  a.key = ptr<const int64_t>(key);
  a.n = shape[0]; a.c = shape[1]; a.h = shape[2]; a.w = shape[3];
  a.clip = clip;
  return a;
}

NoiseArgs make_noise_args(uintptr_t out, uintptr_t key, uintptr_t step, int64_t n,
                          int64_t per_image) {
  NoiseArgs a;
  a.out = ptr<float>(out);
  a.key = ptr<const int64_t>(key);
  a.step = ptr<const int64_t>(step);
  a.n = n;
  a.per_image = per_image;
  return a;
}

GroupNormArgs make_gn_args(uintptr_t x, std::array<int64_t, 4> x_stride, uintptr_t out,
                           std::array<int64_t, 4> out_stride, uintptr_t weight, uintptr_t bias,
                           uintptr_t add, int dtype, std::array<int64_t, 4> shape,
                           int64_t groups, double eps, bool silu) {
  if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("bad dtype code");
  if (groups <= 0 || shape[1] % groups != 0)
    throw std::invalid_argument("channels must be a multiple of groups");
  GroupNormArgs a;
  a.x = ptr<const void>(x);
  a.out = ptr<void>(out);
  for (int i = 0; i < 4; ++i) { a.x_stride[i] = x_stride[i]; a.out_stride[i] = out_stride[i]; }
  a.weight = ptr<const float>(weight);
  a.bias = ptr<const float>(bias);
  a.add = ptr<const float>(add);
  a.dtype = dtype;
  a.n = shape[0]; a.c = shape[1]; a.h = shape[2]; a.w = shape[3];
  a.groups = groups;
  a.eps = static_cast<float>(eps);
  a.silu = silu;
  return a;
}

#ifdef DDPM_FAST_WITH_CUDA
void check_cuda(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + ": " + cuda_error_string(code));
}
#endif

py::dict build_info() {
  py::dict d;
#ifdef DDPM_FAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_runtime_version"] = cuda_runtime_version();
  d["cuda_archs"] = std::string(DDPM_FAST_CUDA_ARCHS);
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["compiler"] = std::string(__VERSION__);
  d["coef_cols"] = static_cast<int>(kCoefCols);   // step-table width the kernels read
  d["step_row_bound"] = true;                     // the step kernels take the table's rows
  d["solver_cols"] = static_cast<int>(kSolverCols);  // few-step solver table width
  return d;
}

}  // namespace

SolverArgs make_solver_args(std::array<uintptr_t, 5> state, uintptr_t out, int out_dtype,
                            std::array<int64_t, 4> out_stride, uintptr_t coef, int64_t rows,
                            uintptr_t step, uintptr_t key, std::array<int64_t, 4> shape,
                            bool corrector, bool stochastic) {
  if (out_dtype < kFloat32 || out_dtype > kFloat16) throw std::invalid_argument("bad out dtype code");
  SolverArgs a;
  a.x = ptr<float>(state[0]);
  a.x_last = ptr<float>(state[1]);
  a.m1 = ptr<float>(state[2]);
  a.m2 = ptr<float>(state[3]);
  a.m3 = ptr<float>(state[4]);
  a.out = ptr<const void>(out);
  a.out_dtype = out_dtype;
  for (int i = 0; i < 4; ++i) a.out_stride[i] = out_stride[i];
  a.coef = ptr<const float>(coef);
  a.rows = rows;
  a.step = ptr<const int64_t>(step);
  a.key = ptr<const int64_t>(key);
  a.n = shape[0];
  a.c = shape[1];
  a.h = shape[2];
  a.w = shape[3];
  a.corrector = corrector;
  a.stochastic = stochastic;
  return a;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm_fast native kernels (CPU always; CUDA when built with nvcc)";
  m.def("build_info", &build_info, "What this binary was built with.");

  m.def("ddpm_step_cpu",
        [](uintptr_t x, uintptr_t eps, int eps_dtype, std::array<int64_t, 4> eps_stride,
           uintptr_t noise, uintptr_t out, uintptr_t coef, int64_t rows, uintptr_t step,
           uintptr_t key, std::array<int64_t, 4> shape, bool clip) {
          StepArgs a = make_step_args(x, eps, eps_dtype, eps_stride, noise, out, coef, rows, step,
                                      key, shape, clip);
          py::gil_scoped_release release;
          ddpm_step_cpu(a);
        });
  m.def("solver_step_cpu",
        [](std::array<uintptr_t, 5> state, uintptr_t out, int out_dtype,
           std::array<int64_t, 4> out_stride, uintptr_t coef, int64_t rows, uintptr_t step,
           uintptr_t key, std::array<int64_t, 4> shape, bool corrector, bool stochastic) {
          SolverArgs a = make_solver_args(state, out, out_dtype, out_stride, coef, rows, step,
                                          key, shape, corrector, stochastic);
          py::gil_scoped_release release;
          solver_step_cpu(a);
        }, "One few-step solver step; state = (x, x_last, m1, m2, m3) addresses, in place.");
  m.def("philox_normal_cpu",
        [](uintptr_t out, uintptr_t key, uintptr_t step, int64_t n, int64_t per_image) {
          NoiseArgs a = make_noise_args(out, key, step, n, per_image);
          py::gil_scoped_release release;
          philox_normal_cpu(a);
        });
  m.def("philox_raw_cpu", [](uintptr_t out, int64_t count, uint32_t c1, uint32_t c2, uint32_t c3,
                             uint32_t k0, uint32_t k1) {
    philox_raw_cpu(ptr<uint32_t>(out), count, c1, c2, c3, k0, k1);
  }, "Raw Philox-4x32-10 blocks for counters (i, c1, c2, c3), i < count: out[count, 4].");

  m.def("group_norm_cpu",
        [](uintptr_t x, std::array<int64_t, 4> x_stride, uintptr_t out,
           std::array<int64_t, 4> out_stride, uintptr_t weight, uintptr_t bias, uintptr_t add,
           int dtype, std::array<int64_t, 4> shape, int64_t groups, double eps, bool silu) {
          GroupNormArgs a = make_gn_args(x, x_stride, out, out_stride, weight, bias, add, dtype,
                                         shape, groups, eps, silu);
          py::gil_scoped_release release;
          group_norm_cpu(a);
        });

#ifdef DDPM_FAST_WITH_CUDA
  m.def("ddpm_step_cuda",
        [](uintptr_t x, uintptr_t eps, int eps_dtype, std::array<int64_t, 4> eps_stride,
           uintptr_t noise, uintptr_t out, uintptr_t coef, int64_t rows, uintptr_t step,
           uintptr_t key, std::array<int64_t, 4> shape, bool clip, uintptr_t stream) {
          StepArgs a = make_step_args(x, eps, eps_dtype, eps_stride, noise, out, coef, rows, step,
                                      key, shape, clip);
          check_cuda(ddpm_step_cuda(a, stream), "ddpm_step_cuda");
        });
  m.def("solver_step_cuda",
        [](std::array<uintptr_t, 5> state, uintptr_t out, int out_dtype,
           std::array<int64_t, 4> out_stride, uintptr_t coef, int64_t rows, uintptr_t step,
           uintptr_t key, std::array<int64_t, 4> shape, bool corrector, bool stochastic,
           uintptr_t stream) {
          SolverArgs a = make_solver_args(state, out, out_dtype, out_stride, coef, rows, step,
                                          key, shape, corrector, stochastic);
          check_cuda(solver_step_cuda(a, stream), "solver_step_cuda");
        });
  m.def("philox_normal_cuda", [](uintptr_t out, uintptr_t key, uintptr_t step, int64_t n,
                                 int64_t per_image, uintptr_t stream) {
    check_cuda(philox_normal_cuda(make_noise_args(out, key, step, n, per_image), stream),
               "philox_normal_cuda");
  });
#endif
}
