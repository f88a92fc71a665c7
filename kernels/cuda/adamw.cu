// The optimizer's element-wise kernels over flat fp32 buffers: AdamW with an optional fp16 copy
// of the updated parameters, the squared norm for global-norm clipping, and the weight EMA.
// The CPU reference is kernels/src/adamw.rs; the launchers are in kernels/src/gpu/adamw.rs.
//
// Shapes: params, grads, m, v, ema [N] f32; params_f16 [N] f16 (or null: not written);
// partials [blocks] f64; out [1] f64.
//
// adamw_update_f32 overwrites params, m, v (and params_f16 when given) in place, with
// g = grad_scale · grads (PyTorch's AdamW, decoupled weight decay):
//   m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;  p −= lr·wd·p;  p −= step·m / (sqrt(v)/bc2_sqrt + ε)
// where step = lr / (1 − β1ᵗ) and bc2_sqrt = sqrt(1 − β2ᵗ) come from the host (computed in f64
// there, exactly as the CPU reference does).
//
// adamw_sum_squares_partials_f32 + adamw_sum_squares_reduce_f64: out[0] += Σ x² (accumulates, so
// several buffers can add into one total). Squares are exact in f64 (24 + 24 bits) and summed in
// f64: each block writes Σ over a fixed grid-stride slice of x, in a fixed tree order; the reduce
// kernel (one block) adds the partials in a fixed order. The grid size depends only on N (the
// launcher's rule), never on the device, so the result is the same on every run and every GPU.
// No atomics, and the total stays on the device: nothing forces a host sync.
//
// adamw_ema_update_f32 overwrites ema = decay·ema + (1 − decay)·params.
#include "common.cuh"

#define ADAMW_SUM_THREADS 256

extern "C" __global__ void adamw_update_f32(float* __restrict__ params,
                                            __half* __restrict__ params_f16,
                                            float* __restrict__ m, float* __restrict__ v,
                                            const float* __restrict__ grads, int n, float lr,
                                            float beta1, float beta2, float eps,
                                            float weight_decay, float step, float bc2_sqrt,
                                            float grad_scale) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float g = grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        float p = params[i];
        p -= lr * weight_decay * p;
        p -= step * mi / denom;
        m[i] = mi;
        v[i] = vi;
        params[i] = p;
        if (params_f16) params_f16[i] = __float2half_rn(p);
    }
}

__device__ __forceinline__ double adamw_warp_sum_f64(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(TS_FULL_MASK, v, off);
    return v;
}

// The sum of `v` over the block (blockDim.x = ADAMW_SUM_THREADS), valid in thread 0. Every
// thread of the block must call it (it holds a barrier).
__device__ __forceinline__ double adamw_block_sum_f64(double v) {
    TS_SHARED(double, warp_sums, ADAMW_SUM_THREADS / 32);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = adamw_warp_sum_f64(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0) {
        for (int w = 0; w < ADAMW_SUM_THREADS / 32; ++w) total += warp_sums[w];
    }
    return total;
}

// partials[blockIdx.x] = Σ x[i]² over i ≡ blockIdx.x·256 + threadIdx.x (mod gridDim.x·256).
extern "C" __global__ void adamw_sum_squares_partials_f32(double* __restrict__ partials,
                                                          const float* __restrict__ x, int n) {
    long stride = (long)gridDim.x * blockDim.x;
    double s = 0.0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double xi = x[i];
        s += xi * xi;
    }
    double total = adamw_block_sum_f64(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// out[0] += Σ partials, in a fixed order (one block).
extern "C" __global__ void adamw_sum_squares_reduce_f64(double* __restrict__ out,
                                                        const double* __restrict__ partials,
                                                        int blocks) {
    double s = 0.0;
    for (int i = threadIdx.x; i < blocks; i += blockDim.x) s += partials[i];
    double total = adamw_block_sum_f64(s);
    if (threadIdx.x == 0) out[0] += total;
}

extern "C" __global__ void adamw_ema_update_f32(float* __restrict__ ema,
                                                const float* __restrict__ params, int n,
                                                float decay) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        ema[i] = decay * ema[i] + (1.0f - decay) * params[i];
    }
}
