// The dVAE's loss pieces (MODEL-SPEC.md §2): the Gumbel-softmax relaxation of the encoder's logits,
// the logit-Laplace negative log-likelihood of the decoder's statistics and the KL divergence of
// the codes from the uniform prior (dvae_kl_f32; the batch KL's three kernels after it), with
// gradients. The
// CPU reference is kernels/src/dvae.rs (the trainer's arithmetic); the launchers are in
// kernels/src/gpu/dvae.rs. All buffers f32.
//
// Shapes: logits, noise, y, dy, dlogits [B, K, hw] (the softmax runs over K, stride hw, at each
// (image, position)); images [B, 3, px] in [0, 1]; stats, dstats [B, 6, px] (μ, then ln b).
//
// Gumbel-softmax: y = softmax((logits + g)/τ) over K (noise g supplied, or null for none);
// backward dlogits = y·(dy − Σ_K y·dy)/τ. Both overwrite (=). Block = 32 positions × 8 slices of
// K: lane = position (coalesced along hw), each slice a strided share of K; the per-slice maxima
// and sums are combined in shared memory in slice order (deterministic). Grid (⌈hw/32⌉, B).
//
// Likelihood (logit-Laplace, or with `gaussian` ≠ 0 the unit Gaussian in logit space):
// dstats = scale · d nll / d stats (overwritten, optional); the nll sum in f64 (its
// terms nearly cancel): per-block partials of 256 pixels reduced in a fixed tree order, stored as
// f32 (hi, lo) pairs, then one block adds the partials in order (dvae_laplace_reduce_f32). The
// per-pixel terms in f64, as the reference. No atomics anywhere.
#include "common.cuh"

#define GS_LANES 32
#define GS_SLICES 8

__device__ __forceinline__ float gs_score(const float* logits, const float* noise, long i,
                                          float tau) {
    return (logits[i] + (noise ? noise[i] : 0.0f)) / tau;
}

extern "C" __global__ void dvae_gumbel_softmax_forward_f32(float* y, const float* logits,
                                                           const float* noise, float tau, int k,
                                                           int hw) {
    TS_SHARED(float, red, GS_LANES * GS_SLICES);
    int lane = threadIdx.x % GS_LANES, slice = threadIdx.x / GS_LANES;
    int pos = blockIdx.x * GS_LANES + lane;
    bool live = pos < hw;
    long base = (long)blockIdx.y * k * hw + pos;
    float m = __int_as_float(0xff800000);  // −∞
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) {
            m = fmaxf(m, gs_score(logits, noise, base + (long)c * hw, tau));
        }
    }
    red[threadIdx.x] = m;
    __syncthreads();
    float mx = red[lane];
    for (int s = 1; s < GS_SLICES; ++s) mx = fmaxf(mx, red[s * GS_LANES + lane]);
    __syncthreads();  // everyone has read the maxima before they are overwritten
    float z = 0.0f;
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) {
            z += expf(gs_score(logits, noise, base + (long)c * hw, tau) - mx);
        }
    }
    red[threadIdx.x] = z;
    __syncthreads();
    float zt = 0.0f;
    for (int s = 0; s < GS_SLICES; ++s) zt += red[s * GS_LANES + lane];
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) {
            long i = base + (long)c * hw;
            y[i] = expf(gs_score(logits, noise, i, tau) - mx) / zt;
        }
    }
}

extern "C" __global__ void dvae_gumbel_softmax_backward_f32(float* dlogits, const float* y,
                                                            const float* dy, float tau, int k,
                                                            int hw) {
    TS_SHARED(float, red, GS_LANES * GS_SLICES);
    int lane = threadIdx.x % GS_LANES, slice = threadIdx.x / GS_LANES;
    int pos = blockIdx.x * GS_LANES + lane;
    bool live = pos < hw;
    long base = (long)blockIdx.y * k * hw + pos;
    float part = 0.0f;
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) {
            long i = base + (long)c * hw;
            part += y[i] * dy[i];
        }
    }
    red[threadIdx.x] = part;
    __syncthreads();
    float ydy = 0.0f;
    for (int s = 0; s < GS_SLICES; ++s) ydy += red[s * GS_LANES + lane];
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) {
            long i = base + (long)c * hw;
            dlogits[i] = y[i] * (dy[i] - ydy) / tau;
        }
    }
}

#define LL_THREADS 256
#define LL_EPS 0.1

// A double as two floats, hi + lo (about 48 bits of it): the partial sums travel in f32 buffers.
__device__ __forceinline__ void ll_store_pair(float* p, double v) {
    float hi = (float)v;
    p[0] = hi;
    p[1] = (float)(v - (double)hi);
}

// Sum of red[0..LL_THREADS) into red[0], in a fixed tree order; every thread must call it.
__device__ __forceinline__ void ll_block_sum(double* red) {
    for (int half = LL_THREADS / 2; half > 0; half /= 2) {
        __syncthreads();
        if ((int)threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
    }
    __syncthreads();
}

// One thread per (image, pixel), its three channels; grid (⌈px/256⌉, B). partials [2·blocks]:
// block (bx, b) writes its nll sum as a (hi, lo) pair at 2·(b·gridDim.x + bx).
extern "C" __global__ void dvae_laplace_f32(float* dstats, float* partials, const float* stats,
                                            const float* images, float scale, int px,
                                            int gaussian) {
    TS_SHARED(double, red, LL_THREADS);
    int i = blockIdx.x * LL_THREADS + threadIdx.x;
    long b = blockIdx.y;
    double total = 0.0;
    if (i < px) {
        for (int ch = 0; ch < 3; ++ch) {
            double x = (1.0 - 2.0 * LL_EPS) * (double)images[(b * 3 + ch) * px + i] + LL_EPS;
            double t = log(x / (1.0 - x));
            long mu = (b * 6 + ch) * px + i, lnb = (b * 6 + 3 + ch) * px + i;
            double m = stats[mu], lb = stats[lnb];
            double r = t - m;
            if (gaussian) {
                // ½r² + ½·ln(2π) + ln(x'(1 − x')); ln b is not read and gets no gradient.
                total += 0.5 * r * r + 0.91893853320467274178 + log(x * (1.0 - x));
                if (dstats) {
                    dstats[mu] = (float)((double)scale * -r);
                    dstats[lnb] = 0.0f;
                }
                continue;
            }
            double inv_b = exp(-lb);
            total += 0.69314718055994530942 + lb + log(x * (1.0 - x)) + fabs(r) * inv_b;
            if (dstats) {
                // Rust's signum: ±1 also at ±0, NaN stays NaN.
                double sign = r != r ? r : copysign(1.0, r);
                dstats[mu] = (float)((double)scale * -sign * inv_b);
                dstats[lnb] = (float)((double)scale * (1.0 - fabs(r) * inv_b));
            }
        }
    }
    red[threadIdx.x] = total;
    ll_block_sum(red);
    if (threadIdx.x == 0) {
        ll_store_pair(partials + 2 * ((long)blockIdx.y * gridDim.x + blockIdx.x), red[0]);
    }
}

// out [2] = Σ of n (hi, lo) partial pairs, as a (hi, lo) pair; one block of 256 threads, each
// adding a strided share in order, then the fixed tree.
extern "C" __global__ void dvae_laplace_reduce_f32(float* out, const float* partials, int n) {
    TS_SHARED(double, red, LL_THREADS);
    double s = 0.0;
    for (int j = threadIdx.x; j < n; j += LL_THREADS) {
        s += (double)partials[2 * j] + (double)partials[2 * j + 1];
    }
    red[threadIdx.x] = s;
    ll_block_sum(red);
    if (threadIdx.x == 0) ll_store_pair(out, red[0]);
}

// The softmax over K (no noise) at this thread's position `base` (logits[base + c·hw]): its max
// and log-normaliser, each slice's share combined in slice order through `red` (deterministic).
// Every thread of the block calls it (it synchronises); `red` is free again when it returns.
__device__ __forceinline__ void dvae_softmax_stats(const float* logits, long base, int k, int hw,
                                                   bool live, float* red, float* mx_out,
                                                   float* lz_out) {
    int lane = threadIdx.x % GS_LANES, slice = threadIdx.x / GS_LANES;
    float m = __int_as_float(0xff800000);  // −∞
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) m = fmaxf(m, logits[base + (long)c * hw]);
    }
    red[threadIdx.x] = m;
    __syncthreads();
    float mx = red[lane];
    for (int s = 1; s < GS_SLICES; ++s) mx = fmaxf(mx, red[s * GS_LANES + lane]);
    __syncthreads();
    float z = 0.0f;
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) z += expf(logits[base + (long)c * hw] - mx);
    }
    red[threadIdx.x] = z;
    __syncthreads();
    float zt = 0.0f;
    for (int s = 0; s < GS_SLICES; ++s) zt += red[s * GS_LANES + lane];
    __syncthreads();
    *mx_out = mx;
    *lz_out = logf(zt);
}

// KL(q ‖ uniform) of q = softmax(logits) over K (no noise), per position Σ_K q·log q + log K:
// dlogits += coef · q·(log q − Σ_K q·log q) when dlogits is given (ACCUMULATES: it is the second
// term of the logits' gradient, after the relaxation's), and the KL summed over the block's 32
// positions as a (hi, lo) pair at partials[2·(b·gridDim.x + bx)] (reduced by
// dvae_laplace_reduce_f32). Element arithmetic in f32; the per-position KL and its block sum in
// f64. Block and grid as the softmax kernels.
extern "C" __global__ void dvae_kl_f32(float* dlogits, float* partials, const float* logits,
                                       float coef, int k, int hw) {
    TS_SHARED(float, red, GS_LANES * GS_SLICES);
    TS_SHARED(double, kl, GS_LANES);
    int lane = threadIdx.x % GS_LANES, slice = threadIdx.x / GS_LANES;
    int pos = blockIdx.x * GS_LANES + lane;
    bool live = pos < hw;
    long base = (long)blockIdx.y * k * hw + pos;
    float mx, lz;
    dvae_softmax_stats(logits, base, k, hw, live, red, &mx, &lz);
    float ne = 0.0f;  // Σ q·log q over this slice
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) {
            float lq = logits[base + (long)c * hw] - mx - lz;
            ne += expf(lq) * lq;
        }
    }
    red[threadIdx.x] = ne;
    __syncthreads();
    float neg_entropy = 0.0f;
    for (int s = 0; s < GS_SLICES; ++s) neg_entropy += red[s * GS_LANES + lane];
    if (live && dlogits) {
        for (int c = slice; c < k; c += GS_SLICES) {
            long i = base + (long)c * hw;
            float lq = logits[i] - mx - lz;
            dlogits[i] += coef * expf(lq) * (lq - neg_entropy);
        }
    }
    if (slice == 0) kl[lane] = live ? (double)neg_entropy + log((double)k) : 0.0;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int j = 0; j < GS_LANES; ++j) s += kl[j];
        ll_store_pair(partials + 2 * ((long)blockIdx.y * gridDim.x + blockIdx.x), s);
    }
}

// The batch KL (relaxation.kl: batch): N·KL(q̄ ‖ uniform) with q̄ the average over the
// micro-batch's N = B·hw positions of q = softmax(logits) over K. Three steps, no atomics:
//
// dvae_code_sum_f32: per block (32 positions of one image, grid and block as the softmax
// kernels), partials[block·K + c] = Σ over the block's positions of q(c), in f64, the positions
// added in order. The softmax's max and log-normaliser per position first (as dvae_kl_f32), then
// thread t adds codes t, t + 256, … over the 32 positions.
extern "C" __global__ void dvae_code_sum_f32(double* partials, const float* logits, int k,
                                             int hw) {
    TS_SHARED(float, red, GS_LANES * GS_SLICES);
    TS_SHARED(float, pmax, GS_LANES);
    TS_SHARED(float, plz, GS_LANES);
    int lane = threadIdx.x % GS_LANES, slice = threadIdx.x / GS_LANES;
    int pos0 = blockIdx.x * GS_LANES;
    int pos = pos0 + lane;
    bool live = pos < hw;
    long base = (long)blockIdx.y * k * hw + pos;
    float mx, lz;
    dvae_softmax_stats(logits, base, k, hw, live, red, &mx, &lz);
    if (slice == 0) {
        pmax[lane] = mx;
        plz[lane] = lz;
    }
    __syncthreads();
    int live_lanes = min(GS_LANES, hw - pos0);
    long img = (long)blockIdx.y * k * hw;
    long out = ((long)blockIdx.y * gridDim.x + blockIdx.x) * k;
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        double s = 0.0;
        for (int j = 0; j < live_lanes; ++j) {
            s += (double)expf(logits[img + (long)c * hw + pos0 + j] - pmax[j] - plz[j]);
        }
        partials[out + c] = s;
    }
}

// q_bar[c] = (Σ over the `blocks` partials of code c, in block order) / n: one thread per code.
extern "C" __global__ void dvae_code_mean_f64(double* q_bar, const double* partials, int blocks,
                                              int k, double n) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= k) return;
    double s = 0.0;
    for (int b = 0; b < blocks; ++b) s += partials[(long)b * k + c];
    q_bar[c] = s / n;
}

// dlogits += coef · q·(w − Σ_K q·w) with w[c] = ln(K·q̄[c]) (0 for a code no position uses),
// given by the launcher: the batch KL's gradient through each position's softmax (ACCUMULATES,
// after the relaxation's). Element arithmetic in f32. Block and grid as the softmax kernels.
extern "C" __global__ void dvae_kl_batch_backward_f32(float* dlogits, const float* logits,
                                                      const float* w, float coef, int k,
                                                      int hw) {
    TS_SHARED(float, red, GS_LANES * GS_SLICES);
    int lane = threadIdx.x % GS_LANES, slice = threadIdx.x / GS_LANES;
    int pos = blockIdx.x * GS_LANES + lane;
    bool live = pos < hw;
    long base = (long)blockIdx.y * k * hw + pos;
    float mx, lz;
    dvae_softmax_stats(logits, base, k, hw, live, red, &mx, &lz);
    float qw = 0.0f;  // Σ q·w over this slice
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) {
            qw += expf(logits[base + (long)c * hw] - mx - lz) * w[c];
        }
    }
    red[threadIdx.x] = qw;
    __syncthreads();
    float mean_w = 0.0f;
    for (int s = 0; s < GS_SLICES; ++s) mean_w += red[s * GS_LANES + lane];
    if (live) {
        for (int c = slice; c < k; c += GS_SLICES) {
            long i = base + (long)c * hw;
            dlogits[i] += coef * expf(logits[i] - mx - lz) * (w[c] - mean_w);
        }
    }
}
