// Shared by the .cu files of core/cuda: turning CUDA runtime errors into DeviceError.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "cvxq/cuda.hpp"

namespace cvxq {
namespace cuda {

constexpr unsigned kFull = 0xffffffffu;  // all lanes of a warp

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw DeviceError(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

}  // namespace cuda
}  // namespace cvxq
