// Kernels that test the emulator itself (kernels/src/gpu/emu.rs tests), compiled by NVRTC like
// the rest so that they also run on a GPU: a block sum through shared memory and warp shuffles,
// the same sum with one barrier removed (a planted race that some schedule must expose), and a
// kernel whose threads leave before a barrier (an error the emulator must report).
#include "common.cuh"

#define TESTING_THREADS 128

// out[blockIdx.x] = Σ x[blockIdx.x·128 + i], i < 128 (blockDim.x = 128).
template <bool RACY>
__device__ void block_sum(float* out, const float* x) {
    TS_SHARED(float, part, TESTING_THREADS);
    int t = threadIdx.x;
    part[t] = x[blockIdx.x * TESTING_THREADS + t];
    if (!RACY) __syncthreads();
    // Tree over shared memory down to one warp, then shuffles.
    for (int s = TESTING_THREADS / 2; s >= 32; s >>= 1) {
        if (t < s) part[t] += part[t + s];
        __syncthreads();
    }
    if (t < 32) {
        float v = ts_warp_sum(part[t]);
        if (t == 0) out[blockIdx.x] = v;
    }
}

extern "C" __global__ void testing_block_sum_f32(float* out, const float* x) {
    block_sum<false>(out, x);
}

extern "C" __global__ void testing_block_sum_racy_f32(float* out, const float* x) {
    block_sum<true>(out, x);
}

// Threads past `n` return before the barrier the others wait at (undefined on a GPU).
extern "C" __global__ void testing_early_return_f32(float* out, int n) {
    TS_SHARED(float, buf, TESTING_THREADS);
    int t = threadIdx.x;
    if (t >= n) return;
    buf[t] = (float)t;
    __syncthreads();
    out[t] = buf[(t + 1) % n];
}

// out[i] = x[i ^ lanemask] within each warp: every lane's shuffle result.
extern "C" __global__ void testing_shfl_xor_f32(float* out, const float* x, int lanemask) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = __shfl_xor_sync(TS_FULL_MASK, x[i], lanemask);
}

// out[i] = __shfl_xor_sync(x[i], lanemask, width): groups of `width` lanes that may read earlier
// groups but get their own value back from a later one (CUDA's rule).
extern "C" __global__ void testing_shfl_xor_width_f32(float* out, const float* x, int lanemask,
                                                      int width) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = __shfl_xor_sync(TS_FULL_MASK, x[i], lanemask, width);
}
