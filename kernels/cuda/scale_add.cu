// y = a·y + b·x, element-wise over n f32 values: the dVAE's residual additions (y = post_gain·y +
// x in a block's forward pass; the residual path's incoming gradient post_gain·dy, with a = 0;
// the two paths' input gradients added, with a = b = 1). The CPU reference is
// kernels/src/scale_add.rs; the launcher is in kernels/src/gpu/scale_add.rs.
//
// Shapes: y, x [n] f32. y is overwritten (=). With a = 0, y is written only (b·x; a NaN left in
// y does not survive). The products and the sum are rounded separately (__fmul_rn, __fadd_rn:
// never contracted to a fused multiply-add), as the reference rounds them, so that with b = 1
// the result equals the trainer's host arithmetic a·y + x bit for bit. Grid-stride loop, 32-bit
// element counts (the launcher refuses more).
#include "common.cuh"

extern "C" __global__ void scale_add_f32(float* __restrict__ y, const float* __restrict__ x,
                                         float a, float b, int n) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float bx = __fmul_rn(b, x[i]);
        y[i] = a == 0.0f ? bx : __fadd_rn(__fmul_rn(a, y[i]), bx);
    }
}
