// GELU, tanh form, element-wise: gelu(u) = 0.5·u·(1 + tanh(sqrt(2/π)·(u + 0.044715·u³))).
// The CPU reference is kernels/src/gelu.rs; the launchers are in kernels/src/gpu/gelu.rs.
//
// Shapes: inp, out, dout, dinp [N], all in one storage type: f32, or f16 (the MLP's hidden
// activation in the paper's scheme: fc1's output is a matmul output stored in f16, and GELU's
// output is fc2's f16 matmul input; its gradient likewise). Arithmetic is f32 in both.
//
// Forward overwrites out (=); backward overwrites dinp (=, an activation gradient):
// dinp = dout · gelu'(inp).
//
// CLIP's other two activations, forward only, f32 (embedding on a device): quick_gelu,
// u·σ(1.702·u), and the exact GELU, ½·u·(1 + erf(u/√2)). References: quick_gelu_forward and
// gelu_erf_forward in kernels/src/gelu.rs.
#include "common.cuh"

#define GELU_SQRT_2_OVER_PI 0.7978846f
#define GELU_COEF 0.044715f

template <typename T>
__device__ void gelu_forward(T* __restrict__ out, const T* __restrict__ inp, int n) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float u = ts_load(inp, i);
        float t = tanhf(GELU_SQRT_2_OVER_PI * (GELU_COEF * u * u * u + u));
        ts_store(out, i, 0.5f * u * (1.0f + t));
    }
}

template <typename T>
__device__ void gelu_backward(T* __restrict__ dinp, const T* __restrict__ dout,
                              const T* __restrict__ inp, int n) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float u = ts_load(inp, i);
        float t = tanhf(GELU_SQRT_2_OVER_PI * (GELU_COEF * u * u * u + u));
        float sech2 = 1.0f - t * t;
        float d = 0.5f * (1.0f + t) +
                  0.5f * u * sech2 * GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_COEF * u * u);
        ts_store(dinp, i, ts_load(dout, i) * d);
    }
}

extern "C" __global__ void gelu_forward_f32(float* out, const float* inp, int n) {
    gelu_forward(out, inp, n);
}

extern "C" __global__ void gelu_forward_f16(__half* out, const __half* inp, int n) {
    gelu_forward(out, inp, n);
}

extern "C" __global__ void gelu_backward_f32(float* dinp, const float* dout, const float* inp,
                                             int n) {
    gelu_backward(dinp, dout, inp, n);
}

extern "C" __global__ void gelu_backward_f16(__half* dinp, const __half* dout,
                                             const __half* inp, int n) {
    gelu_backward(dinp, dout, inp, n);
}

extern "C" __global__ void quick_gelu_forward_f32(float* out, const float* inp, int n) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float u = inp[i];
        out[i] = u * (1.0f / (1.0f + expf(-1.702f * u)));
    }
}

extern "C" __global__ void gelu_erf_forward_f32(float* out, const float* inp, int n) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float u = inp[i];
        out[i] = 0.5f * u * (1.0f + erff(u * 0.70710678118654752f));
    }
}
