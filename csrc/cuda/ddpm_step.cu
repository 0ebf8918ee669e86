// CUDA sampler steps (DDPM/DDIM's and the few-step solvers') and Philox noise. One thread per group of four elements: a Philox call
// yields four normals, so each is used once. Coefficients and the step index are read from
// device memory, so a captured CUDA graph replays correctly for every step.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common.h"
#include "../ops.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_eps(const void* base, int dtype, int64_t offset) {
  switch (dtype) {
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[offset]);
    case kFloat16: return __half2float(static_cast<const __half*>(base)[offset]);
    default: return static_cast<const float*>(base)[offset];
  }
}

__global__ void ddpm_step_kernel(StepArgs a) {
  const int64_t chw = a.c * a.h * a.w;
  const int64_t groups_per_image = (chw + 3) / 4;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups_per_image * a.n) return;
  const int64_t n = g / groups_per_image, group = g % groups_per_image;
  if (a.step[0] < 0 || a.step[0] >= a.rows) {     // past the table: NaN, not a wild read
    for (int64_t e = group * 4; e < group * 4 + 4 && e < chw; ++e) a.out[n * chw + e] = NAN;
    return;
  }
  const float* coef = a.coef + a.step[0] * kCoefCols;
  float z[4] = {0.f, 0.f, 0.f, 0.f};
  if (coef[kSigma] != 0.0f && a.noise == nullptr) {
    philox_normals4(static_cast<uint64_t>(a.key[0]), static_cast<uint32_t>(a.key[1] + n),
             static_cast<uint32_t>(coef[kT]), group, z);
  }
  const int64_t hw = a.h * a.w;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t e = group * 4 + j;
    if (e >= chw) break;
    const int64_t idx = n * chw + e;
    const int64_t ch = e / hw, p = e % hw, y = p / a.w, xx = p % a.w;
    const float eps = load_eps(a.eps, a.eps_dtype,
                               n * a.eps_stride[0] + ch * a.eps_stride[1] +
                                   y * a.eps_stride[2] + xx * a.eps_stride[3]);
    const float zj = a.noise ? a.noise[idx] : z[j];
    a.out[idx] = sampler_update(a.x[idx], eps, zj, coef, a.clip);
  }
}

// One thread per group of four elements of one image, as ddpm_step_kernel.
__global__ void solver_step_kernel(SolverArgs a) {
  const int64_t chw = a.c * a.h * a.w;
  const int64_t groups_per_image = (chw + 3) / 4;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups_per_image * a.n) return;
  const int64_t n = g / groups_per_image, group = g % groups_per_image;
  if (a.step[0] < 0 || a.step[0] >= a.rows) {     // past the table: NaN, not a wild read
    for (int64_t e = group * 4; e < group * 4 + 4 && e < chw; ++e) a.x[n * chw + e] = NAN;
    return;
  }
  const float* coef = a.coef + a.step[0] * kSolverCols;
  float z[4] = {0.f, 0.f, 0.f, 0.f};
  if (a.stochastic) {
    philox_normals4(static_cast<uint64_t>(a.key[0]), static_cast<uint32_t>(a.key[1] + n),
                    static_cast<uint32_t>(coef[kWord]), group, z);
  }
  const int64_t hw = a.h * a.w;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t e = group * 4 + j;
    if (e >= chw) break;
    const int64_t idx = n * chw + e;
    const int64_t ch = e / hw, p = e % hw, y = p / a.w, xx = p % a.w;
    const float out = load_eps(a.out, a.out_dtype,
                               n * a.out_stride[0] + ch * a.out_stride[1] +
                                   y * a.out_stride[2] + xx * a.out_stride[3]);
    const SolverElem r = solver_update(
        SolverElem{a.x[idx], a.x_last[idx], a.m1[idx], a.m2[idx], a.m3[idx]}, out, z[j], coef,
        a.corrector, a.stochastic);
    a.x[idx] = r.x;
    a.x_last[idx] = r.x_last;
    a.m1[idx] = r.m1;
    a.m2[idx] = r.m2;
    a.m3[idx] = r.m3;
  }
}

__global__ void philox_normal_kernel(NoiseArgs a) {
  const int64_t groups_per_image = (a.per_image + 3) / 4;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups_per_image * a.n) return;
  const int64_t n = g / groups_per_image, group = g % groups_per_image;
  float z[4];
  philox_normals4(static_cast<uint64_t>(a.key[0]), static_cast<uint32_t>(a.key[1] + n),
           static_cast<uint32_t>(a.step[0]), group, z);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t e = group * 4 + j;
    if (e < a.per_image) a.out[n * a.per_image + e] = z[j];
  }
}

int blocks_for(int64_t items) { return static_cast<int>((items + kThreads - 1) / kThreads); }

}  // namespace

int ddpm_step_cuda(const StepArgs& a, uintptr_t stream) {
  const int64_t groups = (a.c * a.h * a.w + 3) / 4 * a.n;
  if (groups == 0) return 0;
  ddpm_step_kernel<<<blocks_for(groups), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}

int solver_step_cuda(const SolverArgs& a, uintptr_t stream) {
  const int64_t groups = (a.c * a.h * a.w + 3) / 4 * a.n;
  if (groups == 0) return 0;
  solver_step_kernel<<<blocks_for(groups), kThreads, 0,
                       reinterpret_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}

int philox_normal_cuda(const NoiseArgs& a, uintptr_t stream) {
  const int64_t groups = (a.per_image + 3) / 4 * a.n;
  if (groups == 0) return 0;
  philox_normal_kernel<<<blocks_for(groups), kThreads, 0,
                         reinterpret_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace ddpm_fast
