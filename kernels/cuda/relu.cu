// ReLU, element-wise over n values. The CPU reference is kernels/src/relu.rs; the launchers are in
// kernels/src/gpu/relu.rs.
//
// Shapes: inp, out, dout, dinp [n], in the storage type T (f32 or f16); arithmetic in f32.
// Forward: out = max(inp, 0) (fmaxf: a NaN input gives 0, as the reference's f32::max does).
// Backward: dinp = dout · [inp > 0], overwritten (an activation gradient; the derivative at 0 is
// 0, as PyTorch takes it). One thread per element (coalesced; memory-bound either way), 32-bit
// element counts (the launchers refuse more).
#include "common.cuh"

template <typename T>
__device__ void relu_forward(T* __restrict__ out, const T* __restrict__ inp, int n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ts_store(out, i, fmaxf(ts_load(inp, i), 0.0f));
}

template <typename T>
__device__ void relu_backward(T* __restrict__ dinp, const T* __restrict__ dout,
                              const T* __restrict__ inp, int n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ts_store(dinp, i, ts_load(inp, i) > 0.0f ? ts_load(dout, i) : 0.0f);
}

extern "C" __global__ void relu_forward_f32(float* out, const float* inp, int n) {
    relu_forward(out, inp, n);
}

extern "C" __global__ void relu_forward_f16(__half* out, const __half* inp, int n) {
    relu_forward(out, inp, n);
}

extern "C" __global__ void relu_backward_f32(float* dinp, const float* dout, const float* inp,
                                             int n) {
    relu_backward(dinp, dout, inp, n);
}

extern "C" __global__ void relu_backward_f16(__half* dinp, const __half* dout, const __half* inp,
                                             int n) {
    relu_backward(dinp, dout, inp, n);
}
