// Element-wise conversion of f32 values to a buffer's storage type: the fp16 scheme's rounding
// points where a product's f32 output (bias added) becomes the f16 input of the next product.
// The CPU reference is kernels/src/cast.rs; the launcher is in kernels/src/gpu/cast.rs.
//
// Shapes: inp [N] f32, out [N] f32 or f16. out is overwritten (=): out[i] = inp[i] rounded to
// nearest even; a value beyond f16's range becomes ±inf and NaN stays NaN (no filtering: the
// gradient scaling kernels of gradscale.cu are the ones that zero and flag non-finite values).
#include "common.cuh"

template <typename T>
__device__ void cast_from_f32(T* __restrict__ out, const float* __restrict__ inp, int n) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        ts_store(out, i, inp[i]);
    }
}

extern "C" __global__ void cast_from_f32_f32(float* out, const float* inp, int n) {
    cast_from_f32(out, inp, n);
}

extern "C" __global__ void cast_from_f32_f16(__half* out, const float* inp, int n) {
    cast_from_f32(out, inp, n);
}
