// PowerSGD's orthonormalisation of the low-rank factors P (DALL·E App. E.2, step 5): each s × r
// matrix (r ≤ s, row-major f32, r small: 1 … 32 in practice) is replaced by the Q factor of the
// thin Householder QR of P + ε·‖P‖_F·I_{s×r}, computed in f64. The CPU reference is
// `orthonormalize` in kernels/src/powersgd.rs (re-exported by trainer::powersgd); the launcher is
// in kernels/src/gpu/powersgd.rs.
//
// Shapes: p, a flat f32 buffer holding a batch of matrices; meta [count, 4] u32, per matrix
// (offset in p, s, r, offset in ws); ws, f64 scratch: per matrix 2·s·r + r values (the
// column-major copy that becomes the Householder vectors, Q's columns, the β's).
// Each matrix in p is overwritten (=); nothing accumulates.
//
// One block of 256 threads (8 warps) per matrix. Column j belongs to warp j mod 8 throughout, so
// a reflection of a column (its dot product with v by warp shuffles, then the update) is
// warp-local; the block synchronises once per Householder step, after the step's vector and β
// are ready. Every reduction runs in a fixed order: the result does not depend on scheduling.
// It differs from the reference's sequential f64 sums by f64 round-off only.
#include "common.cuh"

#define PS_THREADS 256
#define PS_WARPS (PS_THREADS / 32)

__device__ __forceinline__ double ps_warp_sum(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(TS_FULL_MASK, v, off);
    return v;
}

// y ← (I − β·v·vᵀ)·y over `len` entries, by one whole warp; every lane sees the result after.
__device__ void ps_reflect(double* y, const double* v, int len, double beta, int lane) {
    double d = 0.0;
    for (int i = lane; i < len; i += 32) d += v[i] * y[i];
    double t = beta * ps_warp_sum(d);
    if (t != 0.0) {
        for (int i = lane; i < len; i += 32) y[i] -= t * v[i];
    }
    __syncwarp(TS_FULL_MASK);  // the next reflection reads these entries from other lanes
}

extern "C" __global__ void powersgd_orthonormalize_f32(float* p_all, double* ws_all,
                                                       const unsigned* meta, double eps) {
    TS_SHARED(double, part, PS_WARPS);
    const unsigned* m = meta + 4 * blockIdx.x;
    float* p = p_all + m[0];
    int s = (int)m[1], r = (int)m[2];
    long sr = (long)s * r;
    double* a = ws_all + m[3];  // column j is a[j·s .. (j+1)·s]
    double* q = a + sr;
    double* beta = q + sr;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    // ‖P‖_F², one partial per warp, the partials summed in order by every thread.
    double n2 = 0.0;
    for (long idx = threadIdx.x; idx < sr; idx += PS_THREADS) {
        double x = p[idx];
        n2 += x * x;
    }
    n2 = ps_warp_sum(n2);
    if (lane == 0) part[warp] = n2;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < PS_WARPS; ++w) total += part[w];
    double shift = eps * sqrt(total);
    for (long idx = threadIdx.x; idx < sr; idx += PS_THREADS) {
        int i = (int)(idx / r), j = (int)(idx % r);
        double x = p[idx];
        if (i == j) x += shift;
        a[(long)j * s + i] = x;
    }
    __syncthreads();

    // Householder vectors in place of the columns they annihilate (rows k..s of column k).
    for (int k = 0; k < r; ++k) {
        double* v = a + (long)k * s + k;
        int len = s - k;
        if (warp == k % PS_WARPS) {
            double ss = 0.0;
            for (int i = lane; i < len; i += 32) ss += v[i] * v[i];
            double sigma = sqrt(ps_warp_sum(ss));
            if (lane == 0) {
                if (sigma == 0.0) {
                    beta[k] = 0.0;  // H_k = I: nothing left to annihilate
                } else {
                    double alpha = v[0] >= 0.0 ? -sigma : sigma;
                    double v0 = v[0] - alpha;
                    v[0] = v0;
                    beta[k] = 1.0 / (sigma * (sigma + fabs(v0 + alpha)));
                }
            }
        }
        __syncthreads();  // v and β[k] ready for every warp
        double b = beta[k];
        if (b != 0.0) {
            for (int j = warp; j < r; j += PS_WARPS) {
                if (j > k) ps_reflect(a + (long)j * s + k, v, len, b, lane);
            }
        }
    }

    // Q = H_0 · H_1 ⋯ H_{r−1} · I_{s×r}, applied right to left, each warp on its own columns.
    for (int j = warp; j < r; j += PS_WARPS) {
        for (int i = lane; i < s; i += 32) q[(long)j * s + i] = i == j ? 1.0 : 0.0;
    }
    __syncwarp(TS_FULL_MASK);
    for (int k = r - 1; k >= 0; --k) {
        double b = beta[k];
        if (b == 0.0) continue;
        const double* v = a + (long)k * s + k;
        for (int j = warp; j < r; j += PS_WARPS) ps_reflect(q + (long)j * s + k, v, s - k, b, lane);
    }
    __syncthreads();  // the write-back reads every warp's columns

    for (long idx = threadIdx.x; idx < sr; idx += PS_THREADS) {
        int i = (int)(idx / r), j = (int)(idx % r);
        p[idx] = (float)q[(long)j * s + i];
    }
}
