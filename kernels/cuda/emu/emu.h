// The CUDA emulation header: lets the kernels under kernels/cuda/ compile as ordinary C++ and run
// on the CPU, one block at a time, for the parity tests in CI (no GPU there).
//
// What it models, and how (the runtime is emu.cpp):
// - every thread of a block is a fiber (ucontext) with its own stack; `threadIdx`, `blockIdx`,
//   `blockDim`, `gridDim` read the running fiber's and block's values;
// - a fiber runs until it reaches a synchronisation point (`__syncthreads`, a warp intrinsic) or
//   returns; the scheduler then resumes the others in the launch's schedule (forward, reverse or
//   seeded random order), so code that reads what another thread writes without a barrier
//   between sees a different result under different schedules;
// - `__syncthreads()` releases the block only when every thread that has not returned waits at
//   the *same* barrier (file and line); a thread that returned while others wait, or threads
//   waiting at different barriers, end the launch with an error (CUDA leaves both undefined);
// - warp intrinsics (`__shfl*_sync`, `__ballot_sync`, `__any_sync`, `__all_sync`, `__syncwarp`)
//   need the full mask 0xffffffff and a block size that is a multiple of 32; all 32 lanes must
//   reach the same intrinsic, whose results the scheduler computes from every lane's input before
//   any lane goes on;
// - shared memory (`TS_SHARED`, `TS_DYNAMIC_SHARED`) is filled with a poison pattern (0xFF bytes:
//   a NaN for floats and halves, -1 for integers) at the start of every block;
// - atomics are plain read-modify-writes (one fiber runs at a time);
// - `__half` is `_Float16`, whose conversions round to nearest even, as the GPU's do.
//
// Not modelled: memory ordering between blocks, `__threadfence`, cooperative groups, tensor cores.
// Kernels written for the emulator keep to what is listed above (docs/kernels.md).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace emu {

// The calls the kernels make into the runtime (emu.cpp).
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads(const char* file, int line);
void* dynamic_shared();
void* static_shared(const void* key, size_t bytes);
[[noreturn]] void fail(const char* what, const char* file, int line);
// Ends the launch with an error naming `what` and the place (the kernel's thread stops here).
[[noreturn]] void fail_launch(const char* what, const char* file, int line);

enum class WarpOp : int { ShflIdx, ShflXor, ShflUp, ShflDown, Ballot, Any, All, Sync };
// Deposits this lane's `value` for `op` (with `arg`: source lane, lane mask or delta; `width`:
// the shuffle's segment), waits for all 32 lanes of the warp, and returns the lane's result.
uint64_t warp_exchange(WarpOp op, uint64_t value, int arg, int width, unsigned mask,
                       const char* file, int line);

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp exchange of values over 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
// Empty, not `__restrict`: the C++ compiler may keep a value read through a restrict pointer
// across a fiber switch, where another thread of the block may have written it.
#define __restrict__
#define __launch_bounds__(...)

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(mask) \
    ((void)::emu::warp_exchange(::emu::WarpOp::Sync, 0, 0, 32, (mask), __FILE__, __LINE__))

// Shared memory: see common.cuh for the CUDA spelling.
#define TS_SHARED(T, name, n) \
    T* name = static_cast<T*>(::emu::static_shared(__FILE__ ":" TS_EMU_STR(__LINE__), sizeof(T) * (n)))
#define TS_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::emu::dynamic_shared())
#define TS_EMU_STR2(x) #x
#define TS_EMU_STR(x) TS_EMU_STR2(x)

// Warp intrinsics.
#define __shfl_sync(mask, v, src, ...) \
    ::emu::shfl(::emu::WarpOp::ShflIdx, (mask), (v), (src), ##__VA_ARGS__, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lanemask, ...) \
    ::emu::shfl(::emu::WarpOp::ShflXor, (mask), (v), (lanemask), ##__VA_ARGS__, __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, delta, ...) \
    ::emu::shfl(::emu::WarpOp::ShflUp, (mask), (v), (delta), ##__VA_ARGS__, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, delta, ...) \
    ::emu::shfl(::emu::WarpOp::ShflDown, (mask), (v), (delta), ##__VA_ARGS__, __FILE__, __LINE__)
#define __ballot_sync(mask, pred)                                                          \
    (static_cast<unsigned>(::emu::warp_exchange(::emu::WarpOp::Ballot, (pred) ? 1 : 0, 0, \
                                                32, (mask), __FILE__, __LINE__)))
#define __any_sync(mask, pred)                                                              \
    (static_cast<int>(::emu::warp_exchange(::emu::WarpOp::Any, (pred) ? 1 : 0, 0, 32, (mask), \
                                           __FILE__, __LINE__)))
#define __all_sync(mask, pred)                                                              \
    (static_cast<int>(::emu::warp_exchange(::emu::WarpOp::All, (pred) ? 1 : 0, 0, 32, (mask), \
                                           __FILE__, __LINE__)))

namespace emu {
template <typename T>
inline T shfl(WarpOp op, unsigned mask, T v, int arg, int width, const char* file, int line) {
    return from_bits<T>(warp_exchange(op, to_bits(v), arg, width, mask, file, line));
}
template <typename T>
inline T shfl(WarpOp op, unsigned mask, T v, int arg, const char* file, int line) {
    return shfl(op, mask, v, arg, 32, file, line);
}
}  // namespace emu

// Atomics: one fiber runs at a time, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
    T old = *p;
    *p = old < v ? v : old;
    return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
    T old = *p;
    *p = v < old ? v : old;
    return old;
}
template <typename T>
inline T atomicOr(T* p, T v) {
    T old = *p;
    *p = old | v;
    return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
    T old = *p;
    *p = v;
    return old;
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
    T old = *p;
    if (old == cmp) *p = v;
    return old;
}

// Math: CUDA's device names for the C library's functions.
using std::isfinite;
using std::isinf;
using std::isnan;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float_as_int(float x) { return emu::from_bits<int>(emu::to_bits(x)); }
inline float __int_as_float(int x) { return emu::from_bits<float>(emu::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return emu::from_bits<unsigned>(emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return emu::from_bits<float>(emu::to_bits(x)); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

// Vector types with CUDA's sizes and alignments (8 and 16 bytes), for vectorised loads.
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Half precision: `_Float16` (IEEE binary16; conversions round to nearest even).
typedef _Float16 __half;
inline __half __float2half(float x) { return static_cast<_Float16>(x); }
inline __half __float2half_rn(float x) { return static_cast<_Float16>(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __hadd(__half a, __half b) { return static_cast<_Float16>(float(a) + float(b)); }
inline __half __hmul(__half a, __half b) { return static_cast<_Float16>(float(a) * float(b)); }
inline bool __hisinf(__half x) { return std::isinf(float(x)); }
inline bool __hisnan(__half x) { return std::isnan(float(x)); }
inline unsigned short __half_as_ushort(__half x) { return emu::from_bits<unsigned short>(emu::to_bits(x)); }
inline __half __ushort_as_half(unsigned short x) { return emu::from_bits<__half>(x); }

// Tensor cores: CUDA's WMMA API (nvcuda::wmma, mma.h), m16n16k16 with f16 inputs and f32 (or
// f16) accumulators, the subset the kernels use. On the GPU a fragment's elements are spread over
// the warp's lanes in an unspecified layout; here every lane holds the whole tile, and the
// fragment has no `x[]` or `num_elements`, so a kernel that touches elements (layout-dependent
// code) does not compile for the emulator. Every operation is warp-collective, as on the GPU:
// all 32 lanes must reach the same call (a warp synchronisation point, as `__syncwarp`), and
// - load_matrix_sync reads the tile after all lanes arrived (what they wrote before is seen),
//   checks the GPU's rules (a 32-byte aligned pointer; ldm a multiple of 8 elements for f16, of
//   4 for f32) and aborts on a violation;
// - store_matrix_sync checks that every lane holds the same tile, then each lane writes only its
//   share (elements i with i mod 32 = lane), so a lane that reads the tile back without a
//   __syncwarp sees another lane's share missing under some schedule, as it could on the GPU;
// - mma_sync multiplies in f32 (f16 products are exact in f32) in k order.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
    // The operand's logical shape: a is M × K, b is K × N, the accumulator M × N. Held as f32
    // whatever T is (f16 values are exact in f32; an f16 accumulator rounds at every mma_sync),
    // so that the products need no conversions.
    static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
    float tile_[kRows * kCols];

  public:
    // For the emulation's functions only (kernels may not index fragments).
    typedef T emu_type;
    static constexpr int emu_rows() { return kRows; }
    static constexpr int emu_cols() { return kCols; }
    float* emu_tile() { return tile_; }
    const float* emu_tile() const { return tile_; }
};

namespace detail {
inline void sync(const char* file, int line) {
    ::emu::warp_exchange(::emu::WarpOp::Sync, 0, 0, 32, 0xffffffffu, file, line);
}

template <typename T>
inline void check_ptr(const T* p, unsigned ldm, const char* file, int line) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
        ::emu::fail_launch("wmma: tile pointer not 32-byte aligned", file, line);
    if (ldm % (16 / sizeof(T)) != 0)
        ::emu::fail_launch("wmma: ldm not a multiple of 16 bytes (8 f16 or 4 f32 elements)", file, line);
}

// A 64-bit FNV-1a hash of a tile's bytes: every lane must hold the same tile.
inline uint64_t hash(const float* v, int n) {
    uint64_t h = 1469598103934665603ull;
    const unsigned char* b = reinterpret_cast<const unsigned char*>(v);
    for (size_t i = 0; i < sizeof(float) * n; ++i) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

template <typename Frag, typename T>
inline void load(Frag& f, const T* p, unsigned ldm, bool col, const char* file, int line) {
    static_assert(std::is_same<typename Frag::emu_type, T>::value, "wmma: pointer type differs");
    sync(file, line);
    check_ptr(p, ldm, file, line);
    float* t = f.emu_tile();
    const int rows = Frag::emu_rows(), cols = Frag::emu_cols();
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j)
            t[i * cols + j] = static_cast<float>(col ? p[i + (size_t)j * ldm] : p[(size_t)i * ldm + j]);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
    detail::sync(file, line);
    float* t = f.emu_tile();
    const float x = static_cast<float>(static_cast<T>(v));
    for (int i = 0; i < f.emu_rows() * f.emu_cols(); ++i) t[i] = x;
}

// matrix_a / matrix_b: the layout is the fragment's type parameter.
template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
    detail::load(f, p, ldm, std::is_same<L, col_major>::value, file, line);
}

// The accumulator: the memory layout is an argument.
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                             layout_t layout, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    detail::load(f, p, ldm, layout == mem_col_major, file, line);
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    const float* t = f.emu_tile();
    const uint64_t mine = detail::hash(t, M * N);
    const uint64_t lane0 =
        ::emu::warp_exchange(::emu::WarpOp::ShflIdx, mine, 0, 32, 0xffffffffu, file, line);
    if (mine != lane0) ::emu::fail_launch("wmma: lanes hold different accumulator tiles", file, line);
    detail::check_ptr(p, ldm, file, line);
    const int lane = static_cast<int>(threadIdx.x % 32);
    for (int e = lane; e < M * N; e += 32) {
        const int i = e / N, j = e % N;
        p[layout == mem_col_major ? i + (size_t)j * ldm : (size_t)i * ldm + j] = static_cast<T>(t[e]);
    }
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, TC>& c,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    detail::sync(file, line);
    const float* ta = a.emu_tile();
    const float* tb = b.emu_tile();
    float out[M * N];
    for (int e = 0; e < M * N; ++e) out[e] = c.emu_tile()[e];
    // Each element sums its k terms in k order (the j loop innermost only vectorises).
    for (int i = 0; i < M; ++i)
        for (int k = 0; k < K; ++k) {
            const float x = ta[i * K + k];
            for (int j = 0; j < N; ++j) out[i * N + j] += x * tb[k * N + j];
        }
    float* td = d.emu_tile();
    for (int e = 0; e < M * N; ++e) td[e] = static_cast<float>(static_cast<TC>(out[e]));
}

}  // namespace wmma
}  // namespace nvcuda
