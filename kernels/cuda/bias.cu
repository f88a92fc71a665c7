// The bias of a linear layer, around the matmul (cuBLAS computes out = inp · weightᵀ without it).
// The CPU reference is kernels/src/linear.rs (`linear_forward`'s bias, `column_sums_add`); the
// launchers are in kernels/src/gpu/bias.rs.
//
// Shapes: out, dout [N, OC] in the storage type (f32, or f16 for an f16 matmul output); bias,
// dbias [OC] f32; partials [chunks, OC] f32.
//
// bias_add: out[r, j] += bias[j] (in f32, stored back in the storage type).
// Backward, a parameter gradient (+=): dbias[j] += Σ_r dout[r, j]. bias_column_partials writes
// the column sums of chunk `blockIdx.y` of `rows_per_chunk` rows (rows added in order, one
// thread per column: coalesced across the warp), and bias_column_reduce adds the chunks in order.
// No atomics: the result does not depend on scheduling.
#include "common.cuh"

template <typename T>
__device__ void bias_add(T* __restrict__ out, const float* __restrict__ bias, int n, int oc) {
    long total = (long)n * oc;
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        ts_store(out, i, ts_load(out, i) + bias[i % oc]);
    }
}

extern "C" __global__ void bias_add_f32(float* out, const float* bias, int n, int oc) {
    bias_add(out, bias, n, oc);
}

extern "C" __global__ void bias_add_f16(__half* out, const float* bias, int n, int oc) {
    bias_add(out, bias, n, oc);
}

template <typename G>
__device__ void bias_column_partials(float* __restrict__ partials, const G* __restrict__ dout,
                                     int n, int oc, int rows_per_chunk) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= oc) return;
    long r0 = (long)blockIdx.y * rows_per_chunk;
    long r1 = r0 + rows_per_chunk < n ? r0 + rows_per_chunk : n;
    float s = 0.0f;
    for (long r = r0; r < r1; ++r) s += ts_load(dout, r * oc + col);
    partials[(long)blockIdx.y * oc + col] = s;
}

extern "C" __global__ void bias_column_partials_f32(float* partials, const float* dout, int n,
                                                    int oc, int rows_per_chunk) {
    bias_column_partials(partials, dout, n, oc, rows_per_chunk);
}

extern "C" __global__ void bias_column_partials_f16(float* partials, const __half* dout, int n,
                                                    int oc, int rows_per_chunk) {
    bias_column_partials(partials, dout, n, oc, rows_per_chunk);
}

// dbias[j] += Σ_k partials[k, j], chunks k in order.
extern "C" __global__ void bias_column_reduce_f32(float* dbias, const float* partials, int chunks,
                                                  int oc) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= oc) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; ++k) s += partials[(long)k * oc + col];
    dbias[col] += s;
}
