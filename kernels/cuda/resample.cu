// Spatial resampling by a factor of two over planes = B·C independent H×W planes (NCHW): 2×2
// max-pooling (stride 2; the first maximum in row-major window order wins ties, as PyTorch's
// nn.MaxPool2d(2)) and nearest ×2 upsampling. The CPU reference is kernels/src/resample.rs; the
// launchers are in kernels/src/gpu/resample.rs.
//
// Shapes: maxpool inp, dinp [planes, H, W] (H, W even), out, dout [planes, H/2, W/2];
// upsample inp, dinp [planes, H, W], out, dout [planes, 2H, 2W]. Every buffer is in the storage
// type T (f32 or f16); arithmetic is f32.
//
// All four overwrite (=) their output: the backward passes write activation gradients. The
// max-pool backward saves nothing from the forward pass: it finds each window's winner again from
// inp, with the same comparisons. One thread per output element of the forward kernels and per
// window / input pixel of the backward kernels; no shared memory, no atomics. Indices are 32-bit:
// the launchers refuse tensors of 2³¹ elements or more.
#include "common.cuh"

// The first maximum of the window (a, b on top, c, d below) in row-major order, and its position
// 0..4: strict `>` so that an equal later value never wins (and a NaN never wins over a number).
__device__ __forceinline__ int resample_first_max4(float a, float b, float c, float d, float* m) {
    float best = a;
    int at = 0;
    if (b > best) { best = b; at = 1; }
    if (c > best) { best = c; at = 2; }
    if (d > best) { best = d; at = 3; }
    *m = best;
    return at;
}

template <typename T>
__device__ void maxpool_forward(T* __restrict__ out, const T* __restrict__ inp, int planes, int h,
                                int w) {
    int oh = h / 2, ow = w / 2;
    long total = (long)planes * oh * ow;
    long gi = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (gi < total) {
        int i = (int)gi;
        int p = i / (oh * ow), r = i - p * oh * ow;
        int oy = r / ow, ox = r - oy * ow;
        int top = (p * h + 2 * oy) * w + 2 * ox;
        float m;
        resample_first_max4(ts_load(inp, top), ts_load(inp, top + 1), ts_load(inp, top + w),
                            ts_load(inp, top + w + 1), &m);
        ts_store(out, i, m);
    }
}

extern "C" __global__ void resample_maxpool_forward_f32(float* out, const float* inp, int planes,
                                                        int h, int w) {
    maxpool_forward(out, inp, planes, h, w);
}

extern "C" __global__ void resample_maxpool_forward_f16(__half* out, const __half* inp,
                                                        int planes, int h, int w) {
    maxpool_forward(out, inp, planes, h, w);
}

// dinp = dout at each window's first maximum, 0 at its other three pixels. One thread per window.
template <typename T>
__device__ void maxpool_backward(T* __restrict__ dinp, const T* __restrict__ dout,
                                 const T* __restrict__ inp, int planes, int h, int w) {
    int oh = h / 2, ow = w / 2;
    long total = (long)planes * oh * ow;
    long gi = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (gi < total) {
        int i = (int)gi;
        int p = i / (oh * ow), r = i - p * oh * ow;
        int oy = r / ow, ox = r - oy * ow;
        int top = (p * h + 2 * oy) * w + 2 * ox;
        float m;
        int at = resample_first_max4(ts_load(inp, top), ts_load(inp, top + 1),
                                     ts_load(inp, top + w), ts_load(inp, top + w + 1), &m);
        float g = ts_load(dout, i);
        ts_store(dinp, top, at == 0 ? g : 0.0f);
        ts_store(dinp, top + 1, at == 1 ? g : 0.0f);
        ts_store(dinp, top + w, at == 2 ? g : 0.0f);
        ts_store(dinp, top + w + 1, at == 3 ? g : 0.0f);
    }
}

extern "C" __global__ void resample_maxpool_backward_f32(float* dinp, const float* dout,
                                                         const float* inp, int planes, int h,
                                                         int w) {
    maxpool_backward(dinp, dout, inp, planes, h, w);
}

extern "C" __global__ void resample_maxpool_backward_f16(__half* dinp, const __half* dout,
                                                         const __half* inp, int planes, int h,
                                                         int w) {
    maxpool_backward(dinp, dout, inp, planes, h, w);
}

// out[p, y, x] = inp[p, y/2, x/2]: one thread per output element (coalesced writes; each input
// value is read by four neighbouring threads, from cache).
template <typename T>
__device__ void upsample_forward(T* __restrict__ out, const T* __restrict__ inp, int planes,
                                 int h, int w) {
    int uh = 2 * h, uw = 2 * w;
    long total = (long)planes * uh * uw;
    long gi = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (gi < total) {
        int i = (int)gi;
        int p = i / (uh * uw), r = i - p * uh * uw;
        int y = r / uw, x = r - y * uw;
        out[i] = inp[(p * h + y / 2) * w + x / 2];
    }
}

extern "C" __global__ void resample_upsample_forward_f32(float* out, const float* inp, int planes,
                                                         int h, int w) {
    upsample_forward(out, inp, planes, h, w);
}

extern "C" __global__ void resample_upsample_forward_f16(__half* out, const __half* inp,
                                                         int planes, int h, int w) {
    upsample_forward(out, inp, planes, h, w);
}

// dinp[p, y, x] = Σ of dout over its 2×2 square, added in the reference's order (top-left,
// top-right, bottom-left, bottom-right) so that f32 results are bit-identical.
template <typename T>
__device__ void upsample_backward(T* __restrict__ dinp, const T* __restrict__ dout, int planes,
                                  int h, int w) {
    long total = (long)planes * h * w;
    int uw = 2 * w;
    long gi = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (gi < total) {
        int i = (int)gi;
        int p = i / (h * w), r = i - p * h * w;
        int y = r / w, x = r - y * w;
        int top = (p * 2 * h + 2 * y) * uw + 2 * x;
        float s = ts_load(dout, top) + ts_load(dout, top + 1) + ts_load(dout, top + uw) +
                  ts_load(dout, top + uw + 1);
        ts_store(dinp, i, s);
    }
}

extern "C" __global__ void resample_upsample_backward_f32(float* dinp, const float* dout,
                                                          int planes, int h, int w) {
    upsample_backward(dinp, dout, planes, h, w);
}

extern "C" __global__ void resample_upsample_backward_f16(__half* dinp, const __half* dout,
                                                          int planes, int h, int w) {
    upsample_backward(dinp, dout, planes, h, w);
}
