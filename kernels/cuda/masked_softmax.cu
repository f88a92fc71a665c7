// Dense masked softmax over rows of T scores, forward and backward: the softmax of dense masked
// attention (S = Q Kᵀ and O = P V through cuBLAS around it), the baseline the GPU benchmark
// compares block-sparse attention against. The CPU reference is kernels/src/dense_attention.rs
// (masked_softmax_forward, masked_softmax_backward); the launchers are
// kernels/src/gpu/masked_softmax.rs.
//
// Shapes (R rows = B·NH·T; row r is query position p = r mod T):
//   s, dp   [R, T] f32 (scores and dP, as cuBLAS writes them)
//   p, ds   [R, T] in the storage type (f32 or f16: the next product's input)
//   mask    [T, W] u32, W = ceil(T / 32): bit q mod 32 of word q / 32 of row p is set iff query
//           p may attend key q (every row allows at least itself)
// Forward (= overwrites p): p[r, q] = exp(scale·s[r, q] − m) / l over the allowed q, 0 elsewhere,
//   with m the row's largest allowed scaled score and l the sum of the exponentials.
// Backward (= overwrites ds): ds[r, q] = scale · p[r, q] · (dp[r, q] − Σ_q' p[r, q'] dp[r, q']);
//   masked entries have p = 0, so ds = 0 there without reading the mask.
// One warp per row (MSM_WARPS rows per block); lane j takes columns j, j + 32, …; the row's
// statistics are warp butterflies (the same order on every lane and every run: deterministic).
// The forward pass reads s twice (online max and sum, then the output), the backward pass p and
// dp twice; a row of T = 1280 floats stays in L1 between the passes.
#include "common.cuh"

#define MSM_WARPS 4

__device__ __forceinline__ float msm_neg_inf() { return __uint_as_float(0xff800000u); }

template <typename T>
__device__ void masked_softmax_forward(T* __restrict__ p, const float* __restrict__ s,
                                       const unsigned* __restrict__ mask, int rows, int t,
                                       float scale) {
    const int lane = threadIdx.x % 32;
    const long r = (long)blockIdx.x * MSM_WARPS + threadIdx.x / 32;
    if (r >= rows) return;  // a whole warp leaves together; no block barrier follows
    const int words = (t + 31) / 32;
    const unsigned* m_row = mask + (long)(r % t) * words;
    const float* s_row = s + r * t;
    // Online maximum and sum per lane, then merged across the warp.
    float m = msm_neg_inf(), l = 0.0f;
    for (int q = lane; q < t; q += 32) {
        if (!((m_row[q / 32] >> (q % 32)) & 1u)) continue;
        const float x = scale * s_row[q];
        if (x > m) {
            l = l * __expf(m - x) + 1.0f;
            m = x;
        } else {
            l += __expf(x - m);
        }
    }
    const float row_max = ts_warp_max(m);
    const float part = m == msm_neg_inf() ? 0.0f : l * __expf(m - row_max);
    const float total = ts_warp_sum(part);
    // A row with nothing allowed (not produced by the layouts) gets zeros, not NaNs.
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    T* p_row = p + r * t;
    for (int q = lane; q < t; q += 32) {
        const bool ok = (m_row[q / 32] >> (q % 32)) & 1u;
        ts_store(p_row, q, ok ? __expf(scale * s_row[q] - row_max) * inv : 0.0f);
    }
}

template <typename T>
__device__ void masked_softmax_backward(T* __restrict__ ds, const T* __restrict__ p,
                                        const float* __restrict__ dp, int rows, int t,
                                        float scale) {
    const int lane = threadIdx.x % 32;
    const long r = (long)blockIdx.x * MSM_WARPS + threadIdx.x / 32;
    if (r >= rows) return;
    const T* p_row = p + r * t;
    const float* dp_row = dp + r * t;
    float d = 0.0f;
    for (int q = lane; q < t; q += 32) d += ts_load(p_row, q) * dp_row[q];
    d = ts_warp_sum(d);
    T* ds_row = ds + r * t;
    for (int q = lane; q < t; q += 32)
        ts_store(ds_row, q, scale * ts_load(p_row, q) * (dp_row[q] - d));
}

extern "C" __global__ void masked_softmax_forward_f32(float* p, const float* s, const unsigned* mask, int rows, int t, float scale) {
    masked_softmax_forward(p, s, mask, rows, t, scale);
}

extern "C" __global__ void masked_softmax_forward_f16(__half* p, const float* s, const unsigned* mask, int rows, int t, float scale) {
    masked_softmax_forward(p, s, mask, rows, t, scale);
}

extern "C" __global__ void masked_softmax_backward_f32(float* ds, const float* p, const float* dp, int rows, int t, float scale) {
    masked_softmax_backward(ds, p, dp, rows, t, scale);
}

extern "C" __global__ void masked_softmax_backward_f16(__half* ds, const __half* p, const float* dp, int rows, int t, float scale) {
    masked_softmax_backward(ds, p, dp, rows, t, scale);
}
