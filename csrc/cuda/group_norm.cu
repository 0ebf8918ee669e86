// CUDA GroupNorm(+add, +SiLU) with the reduction split across blocks, so batch 1 x 32 groups
// still fills the GPU. Each (image, group) is cut into chunks of kChunk elements:
//   1. partial kernel, grid (chunks, N*G): two-pass mean / M2 of one chunk held in registers
//   2. apply kernel, same grid: merges the group's partials (Chan et al.), then normalises the
//      chunk, applies weight/bias and SiLU and stores in the input dtype.
// fp32 statistics throughout; element order in a group follows the memory layout (channel-major
// for NCHW, pixel-major for channels_last) so neighbouring threads touch neighbouring addresses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common.h"
#include "../ops.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int kChunk = kThreads * kPerThread;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// Element i of group g of image n -> (channel, pixel)
template <bool kChannelsLast>
__device__ __forceinline__ void locate(int64_t i, int64_t cpg, int64_t hw, int64_t g,
                                       int64_t* ch, int64_t* p) {
  if (kChannelsLast) { *p = i / cpg; *ch = g * cpg + i % cpg; }
  else { *ch = g * cpg + i / hw; *p = i % hw; }
}

__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

template <typename T, bool kChannelsLast>
__device__ __forceinline__ int load_chunk(const GroupNormArgs& a, int64_t n, int64_t g,
                                          int64_t chunk, float v[kPerThread]) {
  const int64_t cpg = a.c / a.groups, hw = a.h * a.w, count = cpg * hw;
  const T* x = static_cast<const T*>(a.x);
  int valid = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = chunk * kChunk + j * kThreads + threadIdx.x;
    v[j] = 0.f;
    if (i < count) {
      int64_t ch, p;
      locate<kChannelsLast>(i, cpg, hw, g, &ch, &p);
      const int64_t off = n * a.x_stride[0] + ch * a.x_stride[1] + (p / a.w) * a.x_stride[2] +
                          (p % a.w) * a.x_stride[3];
      v[j] = to_f<T>(x[off]) + (a.add ? a.add[n * a.c + ch] : 0.f);
      ++valid;
    }
  }
  return valid;
}

template <typename T, bool kChannelsLast>
__global__ void partial_kernel(GroupNormArgs a) {
  __shared__ float shared[kThreads / 32];
  const int64_t task = blockIdx.y, n = task / a.groups, g = task % a.groups, chunk = blockIdx.x;
  const int64_t count = (a.c / a.groups) * a.h * a.w;
  float v[kPerThread];
  const int valid = load_chunk<T, kChannelsLast>(a, n, g, chunk, v);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) s += v[j];
  const int64_t left = count - chunk * kChunk;
  const float cnt = static_cast<float>(left < kChunk ? left : kChunk);
  const float mean = block_sum(s, shared) / cnt;
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const float d = v[j] - mean;
    if (j < valid) m2 += d * d;
  }
  m2 = block_sum(m2, shared);
  if (threadIdx.x == 0) {
    float* out = a.partials + (task * gridDim.x + chunk) * 3;
    out[0] = cnt; out[1] = mean; out[2] = m2;
  }
}

template <typename T, bool kChannelsLast>
__global__ void apply_kernel(GroupNormArgs a) {
  __shared__ float stats[2];
  const int64_t task = blockIdx.y, n = task / a.groups, g = task % a.groups, chunk = blockIdx.x;
  if (threadIdx.x == 0) {  // merge the group's partials: a few dozen at most, from L2
    const float* p = a.partials + task * gridDim.x * 3;
    float cnt = 0.f, mean = 0.f, m2 = 0.f;
    for (unsigned k = 0; k < gridDim.x; ++k) {
      const float nb = p[3 * k], mb = p[3 * k + 1], total = cnt + nb, d = mb - mean;
      mean += d * nb / total;
      m2 += p[3 * k + 2] + d * d * cnt * nb / total;
      cnt = total;
    }
    stats[0] = mean;
    stats[1] = rsqrtf(m2 / cnt + a.eps);
  }
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];
  const int64_t cpg = a.c / a.groups, hw = a.h * a.w, count = cpg * hw;
  float v[kPerThread];
  load_chunk<T, kChannelsLast>(a, n, g, chunk, v);
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = chunk * kChunk + j * kThreads + threadIdx.x;
    if (i >= count) continue;
    int64_t ch, p;
    locate<kChannelsLast>(i, cpg, hw, g, &ch, &p);
    float r = (v[j] - mean) * rstd * a.weight[ch] + a.bias[ch];
    if (a.silu) r = r / (1.f + __expf(-r));
    out[n * a.out_stride[0] + ch * a.out_stride[1] + (p / a.w) * a.out_stride[2] +
        (p % a.w) * a.out_stride[3]] = from_f<T>(r);
  }
}

template <typename T, bool kChannelsLast>
int launch(const GroupNormArgs& a, int64_t chunks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(a.n * a.groups));
  partial_kernel<T, kChannelsLast><<<grid, kThreads, 0, stream>>>(a);
  apply_kernel<T, kChannelsLast><<<grid, kThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_layout(const GroupNormArgs& a, int64_t chunks, cudaStream_t stream) {
  return a.channels_last ? launch<T, true>(a, chunks, stream) : launch<T, false>(a, chunks, stream);
}

}  // namespace

int64_t group_norm_cuda_chunks(const GroupNormArgs& a) {
  const int64_t count = (a.c / a.groups) * a.h * a.w;
  return (count + kChunk - 1) / kChunk;
}

int group_norm_cuda(const GroupNormArgs& a, int64_t chunks, uintptr_t stream_handle) {
  if (a.n == 0) return 0;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.dtype) {
    case kBFloat16: return launch_layout<__nv_bfloat16>(a, chunks, stream);
    case kFloat16: return launch_layout<__half>(a, chunks, stream);
    default: return launch_layout<float>(a, chunks, stream);
  }
}

}  // namespace ddpm_fast
