// Entry points of the native kernels. Arguments are raw addresses and sizes so that the module
// needs no libtorch; ddpm_fast/_native.py reads them off tensors.
#pragma once
#include <cstdint>

namespace ddpm_fast {

// Arguments of one fused sampler step over a batch of images, x/out fp32 NCHW contiguous.
struct StepArgs {
  const float* x;          // [N, C, H, W] current state x_t
  const void* eps;         // [N, C, H, W] model output, dtype eps_dtype, strides eps_stride
  int eps_dtype;           // DType code
  int64_t eps_stride[4];   // in elements
  const float* noise;      // [N, C, H, W] external noise, or null for in-kernel Philox
  float* out;              // [N, C, H, W] x_{t-1}; may alias x
  const float* coef;       // [rows, kCoefCols] table from schedule.py
  int64_t rows;            // a step index outside [0, rows) writes NaN, never reads past coef
  const int64_t* step;     // [1] index of the row to use (device memory on CUDA)
  const int64_t* key;      // [2] (seed, index of image 0); used when noise is null
  int64_t n, c, h, w;
  bool clip;
};

// Arguments of one few-step solver step (solvers/table.py), all state fp32 NCHW contiguous and
// updated in place: x <- x', x_last, m1, m2, m3 <- the shifted history.
struct SolverArgs {
  float* x;                // [N, C, H, W]
  float* x_last;           // [N, C, H, W] (read and written when corrector)
  float* m1;               // [N, C, H, W] converted outputs of the last three steps
  float* m2;
  float* m3;
  const void* out;         // [N, >= C, H, W] model output (its first C channels), out_dtype
  int out_dtype;           // DType code
  int64_t out_stride[4];   // in elements
  const float* coef;       // [rows, kSolverCols]
  int64_t rows;            // a step index outside [0, rows) writes NaN, never reads past coef
  const int64_t* step;     // [1] index of the row to use (device memory on CUDA)
  const int64_t* key;      // [2] (seed, index of image 0) of the Philox noise
  int64_t n, c, h, w;
  bool corrector, stochastic;
};

// Arguments of a standalone noise fill: out[n, :] = the normals of image first + n at `step`.
struct NoiseArgs {
  float* out;              // [N, per_image] contiguous
  const int64_t* key;      // [2] (seed, index of image 0)
  const int64_t* step;     // [1] Philox step word
  int64_t n, per_image;
};

// GroupNorm over x [N, C, H, W] (any strides; channels_last is one case) with fp32 statistics,
// optionally adding add[n, c] before the norm and applying SiLU after the affine transform.
struct GroupNormArgs {
  const void* x;           // [N, C, H, W], dtype
  int64_t x_stride[4];
  void* out;               // [N, C, H, W], dtype, strides out_stride
  int64_t out_stride[4];
  const float* weight;     // [C] fp32
  const float* bias;       // [C] fp32
  const float* add;        // [N, C] fp32 or null
  int dtype;               // DType code of x and out
  int64_t n, c, h, w, groups;
  float eps;
  bool silu;
};

void ddpm_step_cpu(const StepArgs& a);
void solver_step_cpu(const SolverArgs& a);
void group_norm_cpu(const GroupNormArgs& a);
void philox_normal_cpu(const NoiseArgs& a);
void philox_raw_cpu(uint32_t* out, int64_t count, uint32_t c1, uint32_t c2, uint32_t c3,
                    uint32_t k0, uint32_t k1);

#ifdef DDPM_FAST_WITH_CUDA
// Launch on the given stream (cudaStream_t passed as an integer); returns a CUDA error code.
int ddpm_step_cuda(const StepArgs& a, uintptr_t stream);
int solver_step_cuda(const SolverArgs& a, uintptr_t stream);
int philox_normal_cuda(const NoiseArgs& a, uintptr_t stream);
const char* cuda_error_string(int code);
int cuda_runtime_version();
#endif

}  // namespace ddpm_fast
