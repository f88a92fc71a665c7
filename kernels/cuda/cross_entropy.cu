// Fused softmax + cross-entropy over one vocabulary segment (llm.c's fused classifier). The
// transformer calls it once per segment with that segment's logits and loss weight: the text
// rows [B·(T_text − 1), V_text] and the image rows [B·T_image, V_image], each its own buffer.
// The CPU reference is kernels/src/cross_entropy.rs (`cross_entropy_fused`,
// `cross_entropy_forward`); the launchers are in kernels/src/gpu/cross_entropy.rs.
//
// Shapes: logits [N, V] f32; losses [N] f32; targets [N] u32 (each < V).
//
// cross_entropy_fused:   losses = logsumexp(logits[i]) − logits[i, target] (=), and the logits are
//                        overwritten in place (=) by scale · (softmax(logits[i]) − onehot(target)).
// cross_entropy_forward: losses only (=); the logits are read.
// A target outside [0, V) gives a NaN loss and no one-hot term (the CPU reference refuses it
// before running; here the targets live on the device).
//
// One block of 512 threads per row: the row's maximum and Σ exp(x − max) by block reductions
// (warp shuffles, then one partial per warp in shared memory, reduced in a fixed order: the
// result does not depend on scheduling), then the gradient in a third pass over the row, which
// a block of 512 threads reads coalesced (the re-reads of a row hit L1/L2).
#include "common.cuh"

#define CE_THREADS 512
#define CE_WARPS (CE_THREADS / 32)
#define CE_INF __int_as_float(0x7f800000)
#define CE_NAN __int_as_float(0x7fffffff)

// The block's maximum (MAX) or sum of `v`, returned to every thread. `part` holds CE_WARPS
// floats; the trailing barrier lets the caller reuse it.
template <bool MAX>
__device__ float ce_block_reduce(float v, float* part) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = MAX ? ts_warp_max(v) : ts_warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float identity = MAX ? -CE_INF : 0.0f;
    float r = lane < CE_WARPS ? part[lane] : identity;
    r = MAX ? ts_warp_max(r) : ts_warp_sum(r);
    __syncthreads();
    return r;
}

template <bool FUSED>
__device__ void cross_entropy_row(float* __restrict__ logits, float* __restrict__ losses,
                                  const unsigned* __restrict__ targets, float scale, int v) {
    TS_SHARED(float, part, CE_WARPS);
    long row = blockIdx.x;
    float* x = logits + row * v;
    unsigned t = targets[row];
    float xt = t < (unsigned)v ? x[t] : CE_NAN;  // read before overwriting

    float m = -CE_INF;
    for (int i = threadIdx.x; i < v; i += CE_THREADS) m = fmaxf(m, x[i]);
    m = ce_block_reduce<true>(m, part);

    float s = 0.0f;
    for (int i = threadIdx.x; i < v; i += CE_THREADS) s += expf(x[i] - m);
    s = ce_block_reduce<false>(s, part);

    if (threadIdx.x == 0) losses[row] = m + logf(s) - xt;
    if (FUSED) {
        float inv = scale / s;
        for (int i = threadIdx.x; i < v; i += CE_THREADS) {
            float g = expf(x[i] - m) * inv;
            if ((unsigned)i == t) g -= scale;
            x[i] = g;
        }
    }
}

extern "C" __global__ void cross_entropy_fused_f32(float* logits, float* losses,
                                                   const unsigned* targets, float scale, int v) {
    cross_entropy_row<true>(logits, losses, targets, scale, v);
}

extern "C" __global__ void cross_entropy_forward_f32(float* losses, const float* logits,
                                                     const unsigned* targets, int v) {
    // The forward row never writes the logits.
    cross_entropy_row<false>(const_cast<float*>(logits), losses, targets, 0.0f, v);
}
