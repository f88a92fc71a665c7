// The portability header every kernel includes first. Under NVRTC (`__CUDACC_RTC__`) or nvcc it
// brings CUDA's own headers; compiled as plain C++ (the emulator's build, kernels/build.rs) it
// brings the emulation header instead, so one source runs on the GPU and on the CPU.
//
// Shared memory is declared through two macros, not `__shared__`, so that the emulator can give
// every block fresh, poisoned memory:
//   TS_SHARED(float, buf, 256);        // __shared__ float buf[256];
//   TS_DYNAMIC_SHARED(float, smem);    // extern __shared__ float smem[]; 128-byte aligned (the
//                                      // emulator's too): WMMA tiles need 32

// Warp-level code uses only the `*_sync` intrinsics with the full mask, and blocks whose size is
// a multiple of 32.
#pragma once

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#include <cuda_fp16.h>
// Tensor cores (nvcuda::wmma) for the files that define TS_WMMA before including this header;
// the emulation header always provides its version (layout-agnostic use only: see emu.h).
#ifdef TS_WMMA
#include <mma.h>
#endif
#define TS_SHARED(T, name, n) __shared__ T name[n]
#define TS_DYNAMIC_SHARED(T, name) extern __shared__ __align__(128) unsigned char name##_bytes[]; \
    T* name = reinterpret_cast<T*>(name##_bytes)
#else
#include "emu/emu.h"
#endif

#define TS_FULL_MASK 0xffffffffu

// Sum over the 32 lanes of a warp; every lane gets the total (the same on every lane: the
// butterfly adds in the same order everywhere).
__device__ __forceinline__ float ts_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(TS_FULL_MASK, v, off);
    return v;
}

__device__ __forceinline__ float ts_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(TS_FULL_MASK, v, off));
    return v;
}

// Loads and stores that convert between the storage type and f32.
__device__ __forceinline__ float ts_load(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ts_load(const __half* p, long i) { return __half2float(p[i]); }
__device__ __forceinline__ void ts_store(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void ts_store(__half* p, long i, float v) { p[i] = __float2half_rn(v); }
