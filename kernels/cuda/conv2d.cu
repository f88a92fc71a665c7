// im2col and col2im for the dVAE's convolutions (stride 1, "same" padding (k−1)/2, odd k; PyTorch's
// nn.Conv2d, cross-correlation): a convolution is im2col and one GEMM per image through cuBLAS,
// out_b [Co, H·W] = weight [Co, Ci·k·k] · col_b, and its input gradient is dcol_b = weightᵀ ·
// dout_b then col2im. The CPU reference is `im2col` / `col2im_add` in kernels/src/conv2d.rs (one
// image); the launchers are in kernels/src/gpu/conv2d.rs.
//
// Shapes: x, dx [B, Ci, H, W]; col [B, Ci·k·k, H·W], row (ci, kh, kw) of image b holding
// x[b, ci, y + kh − p, x + kw − p] at column y·W + x (0 outside the image), p = (k − 1)/2. All in
// the storage type T (f32, or f16 for fp16 matmul inputs); arithmetic in f32.
//
// im2col overwrites (=) col. col2im ACCUMULATES (+=) into dx (the caller zeroes dx for a plain
// input gradient): each dx element gathers its k·k column entries in (kh, kw) order, the
// reference's order, then stores once; no atomics, so results do not depend on scheduling.
//
// Launch: grid (⌈H·W / blockDim.x⌉, rows, B) with rows = Ci·k·k (im2col) or Ci (col2im), one
// thread per pixel; reads and writes are coalesced along the pixel index. No shared memory.
#include "common.cuh"

template <typename T>
__device__ void im2col(T* __restrict__ col, const T* __restrict__ x, int c_in, int h, int w,
                       int k) {
    int hw = h * w, pix = blockIdx.x * blockDim.x + threadIdx.x;
    if (pix >= hw) return;
    int row = blockIdx.y, b = blockIdx.z;  // row = (ci·k + kh)·k + kw
    int kw = row % k, kh = (row / k) % k, ci = row / (k * k), pad = (k - 1) / 2;
    int y = pix / w, xx = pix - y * w;
    int sy = y + kh - pad, sx = xx + kw - pad;
    float v = 0.0f;
    if (sy >= 0 && sy < h && sx >= 0 && sx < w) {
        v = ts_load(x, ((long)b * c_in + ci) * hw + sy * w + sx);
    }
    ts_store(col, ((long)b * c_in * k * k + row) * hw + pix, v);
}

extern "C" __global__ void conv2d_im2col_f32(float* col, const float* x, int c_in, int h, int w,
                                             int k) {
    im2col(col, x, c_in, h, w, k);
}

extern "C" __global__ void conv2d_im2col_f16(__half* col, const __half* x, int c_in, int h,
                                             int w, int k) {
    im2col(col, x, c_in, h, w, k);
}

// dx[b, ci, Y, X] += Σ_{kh, kw} col[b, (ci, kh, kw), Y − kh + p, X − kw + p] over the source
// pixels inside the image.
template <typename T>
__device__ void col2im_add(T* __restrict__ dx, const T* __restrict__ col, int c_in, int h, int w,
                           int k) {
    int hw = h * w, pix = blockIdx.x * blockDim.x + threadIdx.x;
    if (pix >= hw) return;
    int ci = blockIdx.y, b = blockIdx.z, pad = (k - 1) / 2;
    int y = pix / w, xx = pix - y * w;
    long out = ((long)b * c_in + ci) * hw + pix;
    const T* rows = col + ((long)b * c_in + ci) * k * k * hw;  // row (ci, 0, 0) of image b
    float acc = ts_load(dx, out);
    for (int kh = 0; kh < k; ++kh) {
        int sy = y - kh + pad;
        if (sy < 0 || sy >= h) continue;
        for (int kw = 0; kw < k; ++kw) {
            int sx = xx - kw + pad;
            if (sx >= 0 && sx < w) acc += ts_load(rows, (long)(kh * k + kw) * hw + sy * w + sx);
        }
    }
    ts_store(dx, out, acc);
}

extern "C" __global__ void conv2d_col2im_add_f32(float* dx, const float* col, int c_in, int h,
                                                  int w, int k) {
    col2im_add(dx, col, c_in, h, w, k);
}

extern "C" __global__ void conv2d_col2im_add_f16(__half* dx, const __half* col, int c_in, int h,
                                                  int w, int k) {
    col2im_add(dx, col, c_in, h, w, k);
}
