// Placeholder until the real CUDA kernels land (issue 5): proves the CUDA build path works.
#include <cuda_runtime.h>

namespace cvxq {
namespace cuda {

__global__ void scale_kernel(float* x, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= a;
}

// Returns a cudaError_t as int so callers need not include CUDA headers.
int scale_on_device(float* device_ptr, float a, int n) {
  scale_kernel<<<(n + 255) / 256, 256>>>(device_ptr, a, n);
  return (int)cudaGetLastError();
}

}  // namespace cuda
}  // namespace cvxq
