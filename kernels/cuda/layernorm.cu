// Fused residual-add + layer normalisation over the last dimension (biased variance, eps 1e-5).
// The CPU reference is kernels/src/layernorm.rs; the launchers are in kernels/src/gpu/layernorm.rs.
//
// Shapes: x, delta, x_out [N, C] f32 (the residual stream); y [N, C] in the output type (f32, or
// f16 for the matmul that follows); weight, bias [C]; mean, rstd [N].
//
// Forward: x_out = x + delta (delta may be null: plain layernorm of x, x_out may then be null),
// y = (x_out − mean) · rstd · weight + bias. One warp per row; 8 rows per block of 256 threads.
//
// Backward (llm.c's invariant, with layernorm's exception): dinp += … (layernorm's input is the
// residual stream, and its gradient is one more term of the residual gradient); dweight and
// dbias get per-row-chunk partials (layernorm_param_partials), reduced in a fixed order by
// layernorm_param_reduce, which adds them (+=). Nothing here uses atomics: results do not depend
// on scheduling.
#include "common.cuh"

#define LN_ROWS_PER_BLOCK 8
#define LN_EPS 1e-5f

template <typename Out>
__device__ void layernorm_forward(float* __restrict__ x_out, Out* __restrict__ y,
                                  float* __restrict__ mean, float* __restrict__ rstd,
                                  const float* __restrict__ x, const float* __restrict__ delta,
                                  const float* __restrict__ weight,
                                  const float* __restrict__ bias, int n, int c) {
    int lane = threadIdx.x % 32;
    long row = (long)blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;  // whole warps leave together; no block barrier follows
    const float* xr = x + row * c;
    const float* dr = delta ? delta + row * c : nullptr;
    float sum = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float v = xr[i] + (dr ? dr[i] : 0.0f);
        if (dr) x_out[row * c + i] = v;
        sum += v;
    }
    float mu = ts_warp_sum(sum) / c;
    const float* src = dr ? x_out + row * c : xr;
    float sq = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float d = src[i] - mu;
        sq += d * d;
    }
    float s = rsqrtf(ts_warp_sum(sq) / c + LN_EPS);
    for (int i = lane; i < c; i += 32) {
        ts_store(y, row * c + i, (src[i] - mu) * s * weight[i] + bias[i]);
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = s;
    }
}

extern "C" __global__ void layernorm_forward_f32(float* x_out, float* y, float* mean, float* rstd,
                                                 const float* x, const float* delta,
                                                 const float* weight, const float* bias, int n,
                                                 int c) {
    layernorm_forward(x_out, y, mean, rstd, x, delta, weight, bias, n, c);
}

extern "C" __global__ void layernorm_forward_f16(float* x_out, __half* y, float* mean,
                                                 float* rstd, const float* x, const float* delta,
                                                 const float* weight, const float* bias, int n,
                                                 int c) {
    layernorm_forward(x_out, y, mean, rstd, x, delta, weight, bias, n, c);
}

// dinp += rstd · (g − mean(g) − xhat · mean(g · xhat)), g = dy · weight. One warp per row.
template <typename G>
__device__ void layernorm_backward_input(float* __restrict__ dinp, const G* __restrict__ dy,
                                         const float* __restrict__ x,
                                         const float* __restrict__ weight,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ rstd, int n, int c) {
    int lane = threadIdx.x % 32;
    long row = (long)blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    if (row >= n) return;
    float mu = mean[row], s = rstd[row];
    float g_sum = 0.0f, gx_sum = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float g = ts_load(dy, row * c + i) * weight[i];
        g_sum += g;
        gx_sum += g * (x[row * c + i] - mu) * s;
    }
    float g_mean = ts_warp_sum(g_sum) / c;
    float gx_mean = ts_warp_sum(gx_sum) / c;
    for (int i = lane; i < c; i += 32) {
        float xhat = (x[row * c + i] - mu) * s;
        float g = ts_load(dy, row * c + i) * weight[i];
        dinp[row * c + i] += s * (g - g_mean - xhat * gx_mean);
    }
}

extern "C" __global__ void layernorm_backward_f32(float* dinp, const float* dy, const float* x,
                                                  const float* weight, const float* mean,
                                                  const float* rstd, int n, int c) {
    layernorm_backward_input(dinp, dy, x, weight, mean, rstd, n, c);
}

extern "C" __global__ void layernorm_backward_f16(float* dinp, const __half* dy, const float* x,
                                                  const float* weight, const float* mean,
                                                  const float* rstd, int n, int c) {
    layernorm_backward_input(dinp, dy, x, weight, mean, rstd, n, c);
}

// Partials of dweight = Σ dy · xhat and dbias = Σ dy over chunk `blockIdx.y` of `rows_per_chunk`
// rows, one thread per column: partial_w, partial_b [chunks, C].
template <typename G>
__device__ void layernorm_param_partials(float* __restrict__ partial_w,
                                         float* __restrict__ partial_b, const G* __restrict__ dy,
                                         const float* __restrict__ x,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ rstd, int n, int c,
                                         int rows_per_chunk) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= c) return;
    long r0 = (long)blockIdx.y * rows_per_chunk;
    long r1 = r0 + rows_per_chunk < n ? r0 + rows_per_chunk : n;
    float dw = 0.0f, db = 0.0f;
    for (long r = r0; r < r1; ++r) {
        float g = ts_load(dy, r * c + col);
        dw += g * (x[r * c + col] - mean[r]) * rstd[r];
        db += g;
    }
    partial_w[(long)blockIdx.y * c + col] = dw;
    partial_b[(long)blockIdx.y * c + col] = db;
}

extern "C" __global__ void layernorm_param_partials_f32(float* partial_w, float* partial_b,
                                                        const float* dy, const float* x,
                                                        const float* mean, const float* rstd,
                                                        int n, int c, int rows_per_chunk) {
    layernorm_param_partials(partial_w, partial_b, dy, x, mean, rstd, n, c, rows_per_chunk);
}

extern "C" __global__ void layernorm_param_partials_f16(float* partial_w, float* partial_b,
                                                        const __half* dy, const float* x,
                                                        const float* mean, const float* rstd,
                                                        int n, int c, int rows_per_chunk) {
    layernorm_param_partials(partial_w, partial_b, dy, x, mean, rstd, n, c, rows_per_chunk);
}

// dweight += Σ_chunks partial_w, dbias += Σ_chunks partial_b, chunks added in order.
extern "C" __global__ void layernorm_param_reduce_f32(float* dweight, float* dbias,
                                                      const float* partial_w,
                                                      const float* partial_b, int chunks, int c) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= c) return;
    float dw = 0.0f, db = 0.0f;
    for (int k = 0; k < chunks; ++k) {
        dw += partial_w[(long)k * c + col];
        db += partial_b[(long)k * c + col];
    }
    dweight[col] += dw;
    dbias[col] += db;
}
