// Kernels that test the emulator itself (kernels/src/gpu/emu.rs tests), compiled by NVRTC like
// the rest so that they also run on a GPU: a block sum through shared memory and warp shuffles,
// the same sum with one barrier removed (a planted race that some schedule must expose), and a
// kernel whose threads leave before a barrier (an error the emulator must report), a read of
// another warp's writes with only a warp barrier between (a race across warps), and one WMMA
// product (tensor cores: the emulated fragments' loads, product and store).
#define TS_WMMA
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

// out[t] = what thread (t + 32) mod 64 wrote, in a block of 64 threads (two warps). RACY: only
// __syncwarp() between the write and the read, which orders nothing across warps.
template <bool RACY>
__device__ void cross_warp(float* out) {
    TS_SHARED(float, buf, 64);
    int t = threadIdx.x;
    buf[t] = (float)t;
    if (RACY) {
        __syncwarp(TS_FULL_MASK);
    } else {
        __syncthreads();
    }
    out[t] = buf[(t + 32) % 64];
}

extern "C" __global__ void testing_cross_warp_f32(float* out) { cross_warp<false>(out); }

extern "C" __global__ void testing_cross_warp_racy_f32(float* out) { cross_warp<true>(out); }

// One warp: c [16][16] f32 (row-major) += a [16][16] · b [16][16] (f16; a row-major, b row- or
// column-major as `b_col_major` says), through shared memory (2,560 bytes of dynamic shared
// memory: a at `a_off` halves from the start, b at byte 1024, c at byte 1536).
extern "C" __global__ void testing_wmma_f16(float* c, const __half* a, const __half* b,
                                            int b_col_major, int a_off) {
    using namespace nvcuda;
    TS_DYNAMIC_SHARED(unsigned char, smem);
    __half* sa = reinterpret_cast<__half*>(smem) + a_off;
    __half* sb = reinterpret_cast<__half*>(smem + 1024);
    float* sc = reinterpret_cast<float*>(smem + 1536);
    for (int i = threadIdx.x; i < 256; i += 32) {
        sa[i] = a[i];
        sb[i] = b[i];
        sc[i] = c[i];
    }
    __syncwarp(TS_FULL_MASK);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, sa, 16);
    wmma::load_matrix_sync(acc, sc, 16, wmma::mem_row_major);
    if (b_col_major) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, sb, 16);
        wmma::mma_sync(acc, fa, fb, acc);
    } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, sb, 16);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(sc, acc, 16, wmma::mem_row_major);
    __syncwarp(TS_FULL_MASK);
    for (int i = threadIdx.x; i < 256; i += 32) c[i] = sc[i];
}
