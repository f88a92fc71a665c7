// Per-resblock gradient scaling (DALL·E App. D; DESIGN.md "Precision"): each resblock's backward
// pass runs on its incoming gradient times the block's scale, stored in f16, and its outgoing
// gradient is divided by the scale before it joins the fp32 residual gradient. Non-finite values
// never propagate: they are zeroed and raise the resblock's flag, which the host reads to skip the
// update and lower that block's scale (the rule: kernels/src/gradscale.rs, `GradScaler`).
// The CPU reference is kernels/src/gradscale.rs; the launchers are in kernels/src/gpu/gradscale.rs.
//
// Shapes: dresid [N] f32 (the residual gradient, any layout); g [N] f16 (or f32); flags [R] u32,
// one per resblock (attention and MLP blocks of every layer); grads [P] f32, the flat parameter
// gradient, with one range (offsets[r], lens[r]) per resblock.
//
// What each kernel writes:
// - gradscale_scale:       g = (dresid · scale) rounded to g's type (=), overwritten;
// - gradscale_unscale_add: dresid += float(g) / scale (+=), accumulated;
// - gradscale_param_finite: only flags.
// Non-finite values (inf, NaN, and finite values that overflow in the cast to f16) are written as
// 0 (scale) or contribute 0 (unscale). A flag is only ever set to 1, never cleared here: every
// thread that writes it writes the same value, so the result does not depend on scheduling. The
// host clears the flags once per step.
//
// Element-wise, memory-bound: 256 threads per block, a grid-stride loop (the launcher caps the
// grid), coalesced accesses, one flag store per warp that saw a non-finite value.
#include "common.cuh"

// The value `v` takes once stored in the buffer's type, back as f32.
__device__ __forceinline__ float gs_round(const float*, float v) { return v; }
__device__ __forceinline__ float gs_round(const __half*, float v) {
    return __half2float(__float2half_rn(v));
}

// Every thread of the block calls this once, after its loop: one warp vote, one store per warp.
__device__ __forceinline__ void gs_raise(unsigned* flags, int block, bool bad) {
    if (__any_sync(TS_FULL_MASK, bad) && threadIdx.x % 32 == 0) flags[block] = 1u;
}

// g[i] = round(dresid[i] · scale); non-finite → 0 and flags[block] = 1.
template <typename G>
__device__ void gradscale_scale(G* __restrict__ g, unsigned* __restrict__ flags,
                                const float* __restrict__ dresid, float scale, int n,
                                int block) {
    bool bad = false;
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = gs_round(g, dresid[i] * scale);
        if (!isfinite(v)) {
            v = 0.0f;
            bad = true;
        }
        ts_store(g, i, v);
    }
    gs_raise(flags, block, bad);
}

extern "C" __global__ void gradscale_scale_f16(__half* g, unsigned* flags, const float* dresid,
                                               float scale, int n, int block) {
    gradscale_scale(g, flags, dresid, scale, n, block);
}

extern "C" __global__ void gradscale_scale_f32(float* g, unsigned* flags, const float* dresid,
                                               float scale, int n, int block) {
    gradscale_scale(g, flags, dresid, scale, n, block);
}

// dresid[i] += float(g[i]) / scale; non-finite → adds nothing and flags[block] = 1.
template <typename G>
__device__ void gradscale_unscale_add(float* __restrict__ dresid, unsigned* __restrict__ flags,
                                      const G* __restrict__ g, float scale, int n, int block) {
    bool bad = false;
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = ts_load(g, i) / scale;  // IEEE division, as the reference's
        if (isfinite(v)) {
            dresid[i] += v;
        } else {
            bad = true;
        }
    }
    gs_raise(flags, block, bad);
}

extern "C" __global__ void gradscale_unscale_add_f16(float* dresid, unsigned* flags,
                                                     const __half* g, float scale, int n,
                                                     int block) {
    gradscale_unscale_add(dresid, flags, g, scale, n, block);
}

extern "C" __global__ void gradscale_unscale_add_f32(float* dresid, unsigned* flags, const float* g,
                                                     float scale, int n, int block) {
    gradscale_unscale_add(dresid, flags, g, scale, n, block);
}

// flags[r] = 1 if grads[offsets[r] .. offsets[r] + lens[r]] holds a non-finite value; range r is
// blockIdx.y, striped over the blockIdx.x blocks.
extern "C" __global__ void gradscale_param_finite_f32(unsigned* flags, const float* grads,
                                                      const unsigned* offsets,
                                                      const unsigned* lens) {
    int r = blockIdx.y;
    const float* p = grads + offsets[r];
    long len = lens[r];
    bool bad = false;
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        if (!isfinite(p[i])) bad = true;
    }
    gs_raise(flags, r, bad);
}
