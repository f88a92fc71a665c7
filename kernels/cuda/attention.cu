// Block-sparse causal attention (MODEL-SPEC.md §1), flash-style: no T × T buffer; each query
// block visits only the key blocks that its row of the layout table lists, with an online softmax.
// The CPU reference is kernels/src/attention.rs (attention_forward, attention_backward, and
// BlockLayout, whose tables the launcher uploads); the launchers are kernels/src/gpu/attention.rs.
//
// Shapes (B batch, T sequence, NH heads, HS head size, C = NH·HS; every value row-major):
//   qkv  [B, T, 3C]  q in columns 0..C, k in C..2C, v in 2C..3C; head h uses columns
//                    h·HS..(h+1)·HS of each
//   out  [B, T, C]   lse [B, NH, T] (f32: log-sum-exp of the scaled scores of each row)
// qkv, out, dout and dqkv are in the storage type (f16 on the GPU, the matmuls' inputs and
// outputs; f32 too, for tight parity tests); softmax statistics and all accumulation are f32.
// Scores are q·k / sqrt(HS), the scale applied to q once as it is loaded.
//
// Layout tables (u32, from BlockLayout; BLOCK = the layout's block, a template parameter):
//   row_start [NB+1], row_block [nnz], row_mask [nnz]: query block qb's key blocks are
//     row_block[row_start[qb]..row_start[qb+1]], sorted; row_mask is ATT_FULL for a block whose
//     pairs are all allowed, else the offset (in u64 words) of BLOCK mask words, word r holding
//     bit k iff query qb·BLOCK + r may attend key kb·BLOCK + k;
//   masks [2 · words]: each u64 mask word as (low, high) u32 halves;
//   col_start, col_block, col_mask: the same entries transposed (per key block, the query blocks
//     that see it, sorted), for the backward pass over key blocks.
//
// Forward (= overwrites out and lse): grid (NB, NH, B), ATT_THREADS threads; warp w owns query
// rows w·RPW..(w+1)·RPW of the block (RPW = BLOCK / 4), lane j key j (and j + 32) for the
// scores, head dims j (and j + 32) for the output.
//
// Backward (= overwrites every element of dqkv; flash-attention-2 with P recomputed from the
// saved lse, D = rowsum(dO ∘ O)). Deterministic without atomics: two kernels, each output element
// written by one block in a fixed order.
//   attention_backward_dq_*:  grid (NB, NH, B), one block per query block: D for its rows (also
//     written to d_buf [B, NH, T] for the next kernel), then dQ = scale · Σ_kb dS K;
//   attention_backward_dkv_*: grid (NB, NH, B), one block per key block, over the transposed
//     table: dV = Σ_qb Pᵀ dO, dK = Σ_qb dSᵀ (scale · Q). Launched after the first (reads D).
// with dP = dO Vᵀ, dS = P ∘ (dP − D).
//
// Shared memory is dynamic, sized by the launcher (forward: q, k, v tiles and BLOCK × BLOCK
// probabilities; dq: four tiles and dS; dkv: four tiles, Pᵀ, dSᵀ and two BLOCK vectors): tiles
// of BLOCK rows × HSP floats, HSP = HS rounded up to 32, plus 4, so that lane-distinct rows
// read as float4 fall in distinct banks; the padding columns hold zeros. At BLOCK 32, HS 64:
// 30, 39 and 43 KiB.
//
// Exported: attention_{forward,backward_dq,backward_dkv}_{f16,f32}_b{8,32} and the tensor-core
// attention_{forward,backward_dq,backward_dkv}_wmma_f16_b32. The GPU runs f16 at
// block 32; block 8 keeps the emulator tests small while still cutting T into many blocks.
// The products are SIMT f32 FMAs from shared memory (register tiles of BLOCK/4 rows × 1 key per
// thread): the f32 kernels, and the fallback for f16.
//
// Tensor cores: attention_forward_wmma_f16_b32 is the forward pass with its two products (S = Q Kᵀ
// and O += P V) on tensor cores through the WMMA API (m16n16k16, f16 in, f32 accumulate), the
// launcher's choice for f16 at block 32. Fragments are used layout-agnostically: loaded from and
// stored to shared memory only, never indexed, so that the emulator (whose fragments hold whole
// tiles in every lane) runs the same code; the scale, the mask, the exponentials and the rescaling
// of the output act on the tiles in shared memory.
#define TS_WMMA
#include "common.cuh"

// Full unrolling of the register-tile loops (the emulator's compiler does not know the pragma).
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define ATT_UNROLL _Pragma("unroll")
#else
#define ATT_UNROLL
#endif

#define ATT_WARPS 4
#define ATT_THREADS (32 * ATT_WARPS)
// Largest head size: each lane holds ATT_MAX_HS / 32 output columns in registers.
#define ATT_MAX_HS 64
#define ATT_DPL (ATT_MAX_HS / 32)
// row_mask / col_mask value of a block with every pair allowed.
#define ATT_FULL 0xffffffffu

__device__ __forceinline__ float att_neg_inf() { return __uint_as_float(0xff800000u); }

// Row stride (floats) of a shared tile for head size hs.
__device__ __forceinline__ int att_hsp(int hs) { return (hs + 31) / 32 * 32 + 4; }

// May row r of the query block attend key k of the key block? `valid_keys` is how many keys the
// key block has (the last block may be partial); `moff` the entry's mask offset or ATT_FULL.
__device__ __forceinline__ bool att_allowed(const unsigned* __restrict__ masks, unsigned moff,
                                            int r, int k, int valid_keys) {
    if (k >= valid_keys) return false;
    if (moff == ATT_FULL) return true;
    unsigned word = masks[2 * ((long)moff + r) + (k >> 5)];
    return (word >> (k & 31)) & 1u;
}

// Copies rows row0..row0+BLOCK (those below t) of one head's columns `src[row · stride + d]`,
// d < hs, into the shared tile dst [BLOCK][hsp] as f32 times `mult`; missing rows and the
// padding columns become zeros. Every thread of the block takes part.
template <int BLOCK, typename T>
__device__ __forceinline__ void att_load_tile(float* __restrict__ dst, const T* __restrict__ src,
                                              long stride, int row0, int t, int hs, int hsp,
                                              float mult) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = warp; r < BLOCK; r += ATT_WARPS) {
        bool row_ok = row0 + r < t;
        for (int d = lane; d < hsp; d += 32) {
            float v = 0.0f;
            if (row_ok && d < hs) v = ts_load(src, (long)(row0 + r) * stride + d) * mult;
            dst[r * hsp + d] = v;
        }
    }
}

// Dot product of two shared rows (length hsp, a multiple of 4, zero-padded), float4 at a time.
__device__ __forceinline__ float att_dot(const float* __restrict__ a, const float* __restrict__ b,
                                         int hsp) {
    float s = 0.0f;
    for (int d = 0; d < hsp; d += 4) {
        float4 x = *reinterpret_cast<const float4*>(a + d);
        float4 y = *reinterpret_cast<const float4*>(b + d);
        s += x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
    }
    return s;
}

// Four consecutive rows of a shared tile at the lane's head dims: out[dd] = rows 0..3 of column
// lane + 32·dd (zeros for columns at or past hs).
__device__ __forceinline__ void att_column4(float4 (&out)[ATT_DPL], const float* __restrict__ rows,
                                            int hsp, int lane, int hs) {
ATT_UNROLL
    for (int dd = 0; dd < ATT_DPL; ++dd) {
        const int d = lane + 32 * dd;
        out[dd] = d < hs ? make_float4(rows[d], rows[hsp + d], rows[2 * hsp + d], rows[3 * hsp + d])
                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T, int BLOCK>
__device__ void attention_forward(T* __restrict__ out, float* __restrict__ lse,
                                  const T* __restrict__ qkv,
                                  const unsigned* __restrict__ row_start,
                                  const unsigned* __restrict__ row_block,
                                  const unsigned* __restrict__ row_mask,
                                  const unsigned* __restrict__ masks, int t, int nh, int hs) {
    constexpr int RPW = BLOCK / ATT_WARPS;  // query rows per warp
    constexpr int KPL = (BLOCK + 31) / 32;  // keys per lane
    const int hsp = att_hsp(hs);
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long c = (long)nh * hs, stride = 3 * c;
    const T* q_src = qkv + (long)b * t * stride + (long)h * hs;
    const T* k_src = q_src + c;
    const T* v_src = q_src + 2 * c;

    TS_DYNAMIC_SHARED(float, smem);
    float* sq = smem;                // [BLOCK][hsp], scaled
    float* sk = sq + BLOCK * hsp;    // [BLOCK][hsp]
    float* sv = sk + BLOCK * hsp;    // [BLOCK][hsp]
    float* sp = sv + BLOCK * hsp;    // [BLOCK][BLOCK] probabilities, each warp its own rows

    const float scale = 1.0f / sqrtf((float)hs);
    att_load_tile<BLOCK>(sq, q_src, stride, qb * BLOCK, t, hs, hsp, scale);

    float m[RPW], l[RPW], acc[RPW][ATT_DPL];
ATT_UNROLL
    for (int i = 0; i < RPW; ++i) {
        m[i] = att_neg_inf();
        l[i] = 0.0f;
ATT_UNROLL
        for (int dd = 0; dd < ATT_DPL; ++dd) acc[i][dd] = 0.0f;
    }

    const unsigned e0 = row_start[qb], e1 = row_start[qb + 1];
    for (unsigned e = e0; e < e1; ++e) {
        const int kb = row_block[e];
        const unsigned moff = row_mask[e];
        const int valid_keys = min(BLOCK, t - kb * BLOCK);
        __syncthreads();  // the previous block's K and V are no longer read
        att_load_tile<BLOCK>(sk, k_src, stride, kb * BLOCK, t, hs, hsp, 1.0f);
        att_load_tile<BLOCK>(sv, v_src, stride, kb * BLOCK, t, hs, hsp, 1.0f);
        __syncthreads();

        // Scores of this warp's rows against the lane's keys.
        float s[RPW][KPL];
ATT_UNROLL
        for (int i = 0; i < RPW; ++i)
ATT_UNROLL
            for (int j = 0; j < KPL; ++j) s[i][j] = 0.0f;
ATT_UNROLL
        for (int j = 0; j < KPL; ++j) {
            const int k = lane + 32 * j;
            if (k < BLOCK) {
                for (int d = 0; d < hsp; d += 4) {
                    float4 kv = *reinterpret_cast<const float4*>(sk + k * hsp + d);
ATT_UNROLL
                    for (int i = 0; i < RPW; ++i) {
                        float4 qv =
                            *reinterpret_cast<const float4*>(sq + (warp * RPW + i) * hsp + d);
                        s[i][j] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                    }
                }
            }
        }

        // Online softmax, one row at a time (the row's scores are spread over the warp).
ATT_UNROLL
        for (int i = 0; i < RPW; ++i) {
            const int r = warp * RPW + i;
            float row_max = att_neg_inf();
ATT_UNROLL
            for (int j = 0; j < KPL; ++j) {
                const int k = lane + 32 * j;
                if (!att_allowed(masks, moff, r, k, valid_keys)) s[i][j] = att_neg_inf();
                row_max = fmaxf(row_max, s[i][j]);
            }
            const float m_new = fmaxf(m[i], ts_warp_max(row_max));
            // A row with nothing allowed so far keeps m = −inf and adds nothing.
            const bool none = m_new == att_neg_inf();
            const float alpha = none ? 1.0f : __expf(m[i] - m_new);
            float psum = 0.0f;
ATT_UNROLL
            for (int j = 0; j < KPL; ++j) {
                const int k = lane + 32 * j;
                const float p = s[i][j] == att_neg_inf() ? 0.0f : __expf(s[i][j] - m_new);
                psum += p;
                if (k < BLOCK) sp[r * BLOCK + k] = p;
            }
            l[i] = l[i] * alpha + ts_warp_sum(psum);
            m[i] = m_new;
ATT_UNROLL
            for (int dd = 0; dd < ATT_DPL; ++dd) acc[i][dd] *= alpha;
        }
        __syncwarp(TS_FULL_MASK);  // the warp's probabilities are in sp

        // acc += P V for the lane's head dims.
        for (int k = 0; k < BLOCK; k += 4) {
            float4 v[ATT_DPL];
            att_column4(v, sv + k * hsp, hsp, lane, hs);
ATT_UNROLL
            for (int i = 0; i < RPW; ++i) {
                float4 p = *reinterpret_cast<const float4*>(sp + (warp * RPW + i) * BLOCK + k);
ATT_UNROLL
                for (int dd = 0; dd < ATT_DPL; ++dd) {
                    acc[i][dd] += p.x * v[dd].x + p.y * v[dd].y + p.z * v[dd].z + p.w * v[dd].w;
                }
            }
        }
    }

ATT_UNROLL
    for (int i = 0; i < RPW; ++i) {
        const int p = qb * BLOCK + warp * RPW + i;
        if (p < t) {
            const float inv = 1.0f / l[i];
ATT_UNROLL
            for (int dd = 0; dd < ATT_DPL; ++dd) {
                const int d = lane + 32 * dd;
                if (d < hs) {
                    ts_store(out, ((long)b * t + p) * c + (long)h * hs + d, acc[i][dd] * inv);
                }
            }
            if (lane == 0) lse[((long)b * nh + h) * t + p] = m[i] + logf(l[i]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward on tensor cores (f16 storage, BLOCK 32).
//
// Warp w computes the score tile (rows 16·(w / 2), keys 16·(w mod 2)) of S = Q Kᵀ into shared f32;
// then, as in the SIMT kernel, owns query rows 8w..8w+7 for the online softmax (lane j = key j),
// writes P as f16 and rescales its rows of the shared f32 output tile O by exp(m_old − m_new);
// then the warps share the (2 × HS16/16) tiles of O += P V, loading O as the accumulator and
// storing it back. Shared memory (row strides: f16 tiles HS16 + 8, f32 tiles + 4, so that each
// tile row is a multiple of 16 bytes and the 16-row tiles start 32-byte aligned):
//   O [32][HS16 + 4] f32, S [32][36] f32, Q, K, V [32][HS16 + 8] f16, P [32][40] f16;
// HS16 = HS rounded up to 16, the padding columns zero. At HS 64: 29,696 bytes.
#define ATT_TC_BLOCK 32
#define ATT_TC_LDS (ATT_TC_BLOCK + 4)
#define ATT_TC_LDP (ATT_TC_BLOCK + 8)

__device__ __forceinline__ int att_tc_hs16(int hs) { return (hs + 15) / 16 * 16; }

// Rows row0..row0+32 (those below t) of one head's columns `src[row · stride + d]`, d < hs, into
// the shared f16 tile dst [32][ld]; missing rows and columns hs..ld become zeros.
__device__ __forceinline__ void att_tc_load_tile(__half* __restrict__ dst,
                                                 const __half* __restrict__ src, long stride,
                                                 int row0, int t, int hs, int ld) {
    for (int i = threadIdx.x; i < ATT_TC_BLOCK * ld; i += ATT_THREADS) {
        const int r = i / ld, d = i % ld;
        dst[i] = row0 + r < t && d < hs ? src[(long)(row0 + r) * stride + d] : __float2half_rn(0.0f);
    }
}

__device__ void attention_forward_wmma(__half* __restrict__ out, float* __restrict__ lse,
                                       const __half* __restrict__ qkv,
                                       const unsigned* __restrict__ row_start,
                                       const unsigned* __restrict__ row_block,
                                       const unsigned* __restrict__ row_mask,
                                       const unsigned* __restrict__ masks, int t, int nh, int hs) {
    using namespace nvcuda;
    constexpr int BLOCK = ATT_TC_BLOCK;
    constexpr int RPW = BLOCK / ATT_WARPS;
    typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> FragA;
    typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> FragBt;
    typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> FragB;
    typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;
    const int hs16 = att_tc_hs16(hs), ldh = hs16 + 8, ldo = hs16 + 4;
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long c = (long)nh * hs, stride = 3 * c;
    const __half* q_src = qkv + (long)b * t * stride + (long)h * hs;
    const __half* k_src = q_src + c;
    const __half* v_src = q_src + 2 * c;

    TS_DYNAMIC_SHARED(float, smem);
    float* so = smem;                                      // [BLOCK][ldo]
    float* ss = so + BLOCK * ldo;                          // [BLOCK][LDS]
    __half* sq = reinterpret_cast<__half*>(ss + BLOCK * ATT_TC_LDS);  // [BLOCK][ldh]
    __half* sk = sq + BLOCK * ldh;                         // [BLOCK][ldh]
    __half* sv = sk + BLOCK * ldh;                         // [BLOCK][ldh]
    __half* sp = sv + BLOCK * ldh;                         // [BLOCK][LDP]

    const float scale = 1.0f / sqrtf((float)hs);
    att_tc_load_tile(sq, q_src, stride, qb * BLOCK, t, hs, ldh);
    for (int i = threadIdx.x; i < BLOCK * ldo; i += ATT_THREADS) so[i] = 0.0f;

    float m[RPW], l[RPW];
ATT_UNROLL
    for (int i = 0; i < RPW; ++i) {
        m[i] = att_neg_inf();
        l[i] = 0.0f;
    }

    const int s_row = 16 * (warp / 2), s_col = 16 * (warp % 2);
    const int col_tiles = hs16 / 16;
    const unsigned e0 = row_start[qb], e1 = row_start[qb + 1];
    for (unsigned e = e0; e < e1; ++e) {
        const int kb = row_block[e];
        const unsigned moff = row_mask[e];
        const int valid_keys = min(BLOCK, t - kb * BLOCK);
        __syncthreads();  // the previous block's K, V, P and O tiles are no longer read
        att_tc_load_tile(sk, k_src, stride, kb * BLOCK, t, hs, ldh);
        att_tc_load_tile(sv, v_src, stride, kb * BLOCK, t, hs, ldh);
        __syncthreads();

        // S = Q Kᵀ, one 16 × 16 tile per warp (Kᵀ is K read column-major).
        FragC acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int d = 0; d < hs16; d += 16) {
            FragA a;
            FragBt bt;
            wmma::load_matrix_sync(a, sq + s_row * ldh + d, ldh);
            wmma::load_matrix_sync(bt, sk + s_col * ldh + d, ldh);
            wmma::mma_sync(acc, a, bt, acc);
        }
        wmma::store_matrix_sync(ss + s_row * ATT_TC_LDS + s_col, acc, ATT_TC_LDS,
                                wmma::mem_row_major);
        __syncthreads();

        // Online softmax of the warp's rows; P as f16, the rows of O rescaled.
ATT_UNROLL
        for (int i = 0; i < RPW; ++i) {
            const int r = warp * RPW + i;
            float s = ss[r * ATT_TC_LDS + lane] * scale;
            if (!att_allowed(masks, moff, r, lane, valid_keys)) s = att_neg_inf();
            const float m_new = fmaxf(m[i], ts_warp_max(s));
            // A row with nothing allowed so far keeps m = −inf and adds nothing.
            const bool none = m_new == att_neg_inf();
            const float alpha = none ? 1.0f : __expf(m[i] - m_new);
            const float p = s == att_neg_inf() ? 0.0f : __expf(s - m_new);
            l[i] = l[i] * alpha + ts_warp_sum(p);
            m[i] = m_new;
            sp[r * ATT_TC_LDP + lane] = __float2half_rn(p);
            for (int d = lane; d < hs16; d += 32) so[r * ldo + d] *= alpha;
        }
        __syncthreads();

        // O += P V over the output's (2 × col_tiles) tiles, shared round-robin by the warps.
        for (int x = warp; x < 2 * col_tiles; x += ATT_WARPS) {
            const int o_row = 16 * (x / col_tiles), o_col = 16 * (x % col_tiles);
            FragC o;
            wmma::load_matrix_sync(o, so + o_row * ldo + o_col, ldo, wmma::mem_row_major);
            for (int k = 0; k < BLOCK; k += 16) {
                FragA a;
                FragB bv;
                wmma::load_matrix_sync(a, sp + o_row * ATT_TC_LDP + k, ATT_TC_LDP);
                wmma::load_matrix_sync(bv, sv + k * ldh + o_col, ldh);
                wmma::mma_sync(o, a, bv, o);
            }
            wmma::store_matrix_sync(so + o_row * ldo + o_col, o, ldo, wmma::mem_row_major);
        }
    }
    __syncthreads();

ATT_UNROLL
    for (int i = 0; i < RPW; ++i) {
        const int r = warp * RPW + i;
        const int p = qb * BLOCK + r;
        if (p < t) {
            const float inv = 1.0f / l[i];
            for (int d = lane; d < hs; d += 32)
                ts_store(out, ((long)b * t + p) * c + (long)h * hs + d, so[r * ldo + d] * inv);
            if (lane == 0) lse[((long)b * nh + h) * t + p] = m[i] + logf(l[i]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, part 1: dQ and D, one block per query block (the forward's thread layout).

template <typename T, int BLOCK>
__device__ void attention_backward_dq(T* __restrict__ dqkv, float* __restrict__ d_buf,
                                      const T* __restrict__ dout, const T* __restrict__ qkv,
                                      const T* __restrict__ out, const float* __restrict__ lse,
                                      const unsigned* __restrict__ row_start,
                                      const unsigned* __restrict__ row_block,
                                      const unsigned* __restrict__ row_mask,
                                      const unsigned* __restrict__ masks, int t, int nh, int hs) {
    constexpr int RPW = BLOCK / ATT_WARPS;
    constexpr int KPL = (BLOCK + 31) / 32;
    const int hsp = att_hsp(hs);
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long c = (long)nh * hs, stride = 3 * c;
    const T* q_src = qkv + (long)b * t * stride + (long)h * hs;
    const T* k_src = q_src + c;
    const T* v_src = q_src + 2 * c;
    const long head_row0 = (long)b * t * c + (long)h * hs;  // out, dout: [B, T, C]
    const long stat0 = ((long)b * nh + h) * t;              // lse, d_buf: [B, NH, T]
    const int valid_rows = min(BLOCK, t - qb * BLOCK);

    TS_DYNAMIC_SHARED(float, smem);
    float* sq = smem;                 // [BLOCK][hsp], scaled
    float* sdo = sq + BLOCK * hsp;    // [BLOCK][hsp]
    float* sk = sdo + BLOCK * hsp;    // [BLOCK][hsp]
    float* sv = sk + BLOCK * hsp;     // [BLOCK][hsp]
    float* sds = sv + BLOCK * hsp;    // [BLOCK][BLOCK] dS, each warp its own rows

    const float scale = 1.0f / sqrtf((float)hs);
    att_load_tile<BLOCK>(sq, q_src, stride, qb * BLOCK, t, hs, hsp, scale);
    att_load_tile<BLOCK>(sdo, dout + head_row0, c, qb * BLOCK, t, hs, hsp, 1.0f);

    // D = rowsum(dO ∘ O) and the saved lse of this warp's rows (from global memory: no barrier).
    float row_lse[RPW], row_d[RPW], acc[RPW][ATT_DPL];
ATT_UNROLL
    for (int i = 0; i < RPW; ++i) {
        const int r = warp * RPW + i;
        const long p = (long)qb * BLOCK + r;
        float part = 0.0f;
        if (r < valid_rows) {
            for (int d = lane; d < hs; d += 32) {
                const long at = head_row0 + p * c + d;
                part += ts_load(dout, at) * ts_load(out, at);
            }
        }
        row_d[i] = ts_warp_sum(part);
        row_lse[i] = r < valid_rows ? lse[stat0 + p] : 0.0f;
        if (r < valid_rows && lane == 0) d_buf[stat0 + p] = row_d[i];
ATT_UNROLL
        for (int dd = 0; dd < ATT_DPL; ++dd) acc[i][dd] = 0.0f;
    }

    const unsigned e0 = row_start[qb], e1 = row_start[qb + 1];
    for (unsigned e = e0; e < e1; ++e) {
        const int kb = row_block[e];
        const unsigned moff = row_mask[e];
        const int valid_keys = min(BLOCK, t - kb * BLOCK);
        __syncthreads();  // the previous block's K and V are no longer read
        att_load_tile<BLOCK>(sk, k_src, stride, kb * BLOCK, t, hs, hsp, 1.0f);
        att_load_tile<BLOCK>(sv, v_src, stride, kb * BLOCK, t, hs, hsp, 1.0f);
        __syncthreads();

        // S = q·k and dP = dO·v for this warp's rows against the lane's keys.
        float s[RPW][KPL], dp[RPW][KPL];
ATT_UNROLL
        for (int i = 0; i < RPW; ++i)
ATT_UNROLL
            for (int j = 0; j < KPL; ++j) s[i][j] = dp[i][j] = 0.0f;
ATT_UNROLL
        for (int j = 0; j < KPL; ++j) {
            const int k = lane + 32 * j;
            if (k < BLOCK) {
                for (int d = 0; d < hsp; d += 4) {
                    float4 kv = *reinterpret_cast<const float4*>(sk + k * hsp + d);
                    float4 vv = *reinterpret_cast<const float4*>(sv + k * hsp + d);
ATT_UNROLL
                    for (int i = 0; i < RPW; ++i) {
                        const int r = warp * RPW + i;
                        float4 qv = *reinterpret_cast<const float4*>(sq + r * hsp + d);
                        float4 gv = *reinterpret_cast<const float4*>(sdo + r * hsp + d);
                        s[i][j] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                        dp[i][j] += gv.x * vv.x + gv.y * vv.y + gv.z * vv.z + gv.w * vv.w;
                    }
                }
            }
        }
        // dS = P ∘ (dP − D), P = exp(S − lse) where allowed, else 0.
ATT_UNROLL
        for (int i = 0; i < RPW; ++i) {
            const int r = warp * RPW + i;
ATT_UNROLL
            for (int j = 0; j < KPL; ++j) {
                const int k = lane + 32 * j;
                const bool ok = r < valid_rows && att_allowed(masks, moff, r, k, valid_keys);
                const float p = ok ? __expf(s[i][j] - row_lse[i]) : 0.0f;
                if (k < BLOCK) sds[r * BLOCK + k] = p * (dp[i][j] - row_d[i]);
            }
        }
        __syncwarp(TS_FULL_MASK);  // the warp's dS rows are in sds

        // acc += dS K for the lane's head dims.
        for (int k = 0; k < BLOCK; k += 4) {
            float4 kc[ATT_DPL];
            att_column4(kc, sk + k * hsp, hsp, lane, hs);
ATT_UNROLL
            for (int i = 0; i < RPW; ++i) {
                float4 g = *reinterpret_cast<const float4*>(sds + (warp * RPW + i) * BLOCK + k);
ATT_UNROLL
                for (int dd = 0; dd < ATT_DPL; ++dd) {
                    acc[i][dd] += g.x * kc[dd].x + g.y * kc[dd].y + g.z * kc[dd].z + g.w * kc[dd].w;
                }
            }
        }
    }

ATT_UNROLL
    for (int i = 0; i < RPW; ++i) {
        const int r = warp * RPW + i;
        if (r < valid_rows) {
            const long p = (long)qb * BLOCK + r;
ATT_UNROLL
            for (int dd = 0; dd < ATT_DPL; ++dd) {
                const int d = lane + 32 * dd;
                if (d < hs) {
                    ts_store(dqkv, ((long)b * t + p) * stride + (long)h * hs + d,
                             acc[i][dd] * scale);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, part 2: dK and dV, one block per key block over the transposed table. Warp w owns
// keys w·KPW..(w+1)·KPW of the block, lane j query row j (and j + 32) for Sᵀ and dPᵀ, head
// dims j (and j + 32) for dK and dV.

template <typename T, int BLOCK>
__device__ void attention_backward_dkv(T* __restrict__ dqkv, const T* __restrict__ dout,
                                       const T* __restrict__ qkv, const float* __restrict__ lse,
                                       const float* __restrict__ d_buf,
                                       const unsigned* __restrict__ col_start,
                                       const unsigned* __restrict__ col_block,
                                       const unsigned* __restrict__ col_mask,
                                       const unsigned* __restrict__ masks, int t, int nh,
                                       int hs) {
    constexpr int KPW = BLOCK / ATT_WARPS;  // keys per warp
    constexpr int QPL = (BLOCK + 31) / 32;  // query rows per lane
    const int hsp = att_hsp(hs);
    const int kb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long c = (long)nh * hs, stride = 3 * c;
    const T* q_src = qkv + (long)b * t * stride + (long)h * hs;
    const T* k_src = q_src + c;
    const T* v_src = q_src + 2 * c;
    const T* do_src = dout + (long)b * t * c + (long)h * hs;
    const long stat0 = ((long)b * nh + h) * t;
    const int valid_keys = min(BLOCK, t - kb * BLOCK);

    TS_DYNAMIC_SHARED(float, smem);
    float* sk = smem;                   // [BLOCK][hsp]
    float* sv = sk + BLOCK * hsp;       // [BLOCK][hsp]
    float* sq = sv + BLOCK * hsp;       // [BLOCK][hsp], scaled
    float* sdo = sq + BLOCK * hsp;      // [BLOCK][hsp]
    float* spt = sdo + BLOCK * hsp;     // [BLOCK keys][BLOCK rows] Pᵀ, each warp its own keys
    float* sdst = spt + BLOCK * BLOCK;  // [BLOCK keys][BLOCK rows] dSᵀ
    float* slse = sdst + BLOCK * BLOCK; // [BLOCK]
    float* sd = slse + BLOCK;           // [BLOCK]

    const float scale = 1.0f / sqrtf((float)hs);
    att_load_tile<BLOCK>(sk, k_src, stride, kb * BLOCK, t, hs, hsp, 1.0f);
    att_load_tile<BLOCK>(sv, v_src, stride, kb * BLOCK, t, hs, hsp, 1.0f);

    float dk[KPW][ATT_DPL], dv[KPW][ATT_DPL];
ATT_UNROLL
    for (int i = 0; i < KPW; ++i)
ATT_UNROLL
        for (int dd = 0; dd < ATT_DPL; ++dd) dk[i][dd] = dv[i][dd] = 0.0f;

    const unsigned e0 = col_start[kb], e1 = col_start[kb + 1];
    for (unsigned e = e0; e < e1; ++e) {
        const int qb = col_block[e];
        const unsigned moff = col_mask[e];
        const int valid_rows = min(BLOCK, t - qb * BLOCK);
        __syncthreads();  // the previous query block's tiles are no longer read
        att_load_tile<BLOCK>(sq, q_src, stride, qb * BLOCK, t, hs, hsp, scale);
        att_load_tile<BLOCK>(sdo, do_src, c, qb * BLOCK, t, hs, hsp, 1.0f);
        for (int r = threadIdx.x; r < BLOCK; r += ATT_THREADS) {
            const bool ok = r < valid_rows;
            slse[r] = ok ? lse[stat0 + (long)qb * BLOCK + r] : 0.0f;
            sd[r] = ok ? d_buf[stat0 + (long)qb * BLOCK + r] : 0.0f;
        }
        __syncthreads();

        // Sᵀ = k·q and dPᵀ = v·dO for this warp's keys against the lane's query rows.
        float s[KPW][QPL], dp[KPW][QPL];
ATT_UNROLL
        for (int i = 0; i < KPW; ++i)
ATT_UNROLL
            for (int j = 0; j < QPL; ++j) s[i][j] = dp[i][j] = 0.0f;
ATT_UNROLL
        for (int j = 0; j < QPL; ++j) {
            const int r = lane + 32 * j;
            if (r < BLOCK) {
                for (int d = 0; d < hsp; d += 4) {
                    float4 qv = *reinterpret_cast<const float4*>(sq + r * hsp + d);
                    float4 gv = *reinterpret_cast<const float4*>(sdo + r * hsp + d);
ATT_UNROLL
                    for (int i = 0; i < KPW; ++i) {
                        const int k = warp * KPW + i;
                        float4 kv = *reinterpret_cast<const float4*>(sk + k * hsp + d);
                        float4 vv = *reinterpret_cast<const float4*>(sv + k * hsp + d);
                        s[i][j] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                        dp[i][j] += gv.x * vv.x + gv.y * vv.y + gv.z * vv.z + gv.w * vv.w;
                    }
                }
            }
        }
ATT_UNROLL
        for (int i = 0; i < KPW; ++i) {
            const int k = warp * KPW + i;
ATT_UNROLL
            for (int j = 0; j < QPL; ++j) {
                const int r = lane + 32 * j;
                if (r < BLOCK) {
                    const bool ok = r < valid_rows && att_allowed(masks, moff, r, k, valid_keys);
                    const float p = ok ? __expf(s[i][j] - slse[r]) : 0.0f;
                    spt[k * BLOCK + r] = p;
                    sdst[k * BLOCK + r] = p * (dp[i][j] - sd[r]);
                }
            }
        }
        __syncwarp(TS_FULL_MASK);  // the warp's Pᵀ and dSᵀ rows are in shared memory

        // dV += Pᵀ dO, dK += dSᵀ q (q already scaled) for the lane's head dims.
        for (int r = 0; r < BLOCK; r += 4) {
            float4 go[ATT_DPL], qc[ATT_DPL];
            att_column4(go, sdo + r * hsp, hsp, lane, hs);
            att_column4(qc, sq + r * hsp, hsp, lane, hs);
ATT_UNROLL
            for (int i = 0; i < KPW; ++i) {
                const int k = warp * KPW + i;
                float4 p = *reinterpret_cast<const float4*>(spt + k * BLOCK + r);
                float4 g = *reinterpret_cast<const float4*>(sdst + k * BLOCK + r);
ATT_UNROLL
                for (int dd = 0; dd < ATT_DPL; ++dd) {
                    dv[i][dd] += p.x * go[dd].x + p.y * go[dd].y + p.z * go[dd].z + p.w * go[dd].w;
                    dk[i][dd] += g.x * qc[dd].x + g.y * qc[dd].y + g.z * qc[dd].z + g.w * qc[dd].w;
                }
            }
        }
    }

ATT_UNROLL
    for (int i = 0; i < KPW; ++i) {
        const int k = warp * KPW + i;
        if (k < valid_keys) {
            const long at = ((long)b * t + (long)kb * BLOCK + k) * stride + (long)h * hs;
ATT_UNROLL
            for (int dd = 0; dd < ATT_DPL; ++dd) {
                const int d = lane + 32 * dd;
                if (d < hs) {
                    ts_store(dqkv, at + c + d, dk[i][dd]);
                    ts_store(dqkv, at + 2 * c + d, dv[i][dd]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward on tensor cores (f16 storage, BLOCK 32): the two SIMT kernels' work and grids, with
// every product (S, dP, dS K; Sᵀ, dPᵀ, Pᵀ dO, dSᵀ Q) through WMMA. Score tiles go through shared
// f32 (warp w computes tile (16·(w / 2), 16·(w mod 2)) of each). The sums dQ = dS K, dK = dSᵀ Q
// and dV = Pᵀ dO cancel (dS sums to zero over a row; dO has both signs), so rounding dS or P to
// f16 once would cost them about 2⁻¹² of the terms' size, not of the result's: each goes in as
// two f16 tiles, high = f16(x) and low = f16(x − high), whose two products sum to x's product
// within f32 round-off. The output tiles (dQ; dK and dV) stay in accumulator fragments
// for the whole loop: warp w owns tiles w and w + 4 of the (2 × HS16/16) output tiles. At the end
// they are stored to shared memory (over the tiles no longer read) and written out scaled.
// Shared memory at HS 64: dq 32,768 bytes (S, dP [32][36] f32; Q, dO, K, V [32][72] f16,
// dS high and low [32][40] f16), dkv 38,144 (Sᵀ, dPᵀ, lse, D; K, V, Q, dO; Pᵀ and dSᵀ, high and low).

__device__ void attention_backward_dq_wmma(__half* __restrict__ dqkv, float* __restrict__ d_buf,
                                           const __half* __restrict__ dout,
                                           const __half* __restrict__ qkv,
                                           const __half* __restrict__ out,
                                           const float* __restrict__ lse,
                                           const unsigned* __restrict__ row_start,
                                           const unsigned* __restrict__ row_block,
                                           const unsigned* __restrict__ row_mask,
                                           const unsigned* __restrict__ masks, int t, int nh,
                                           int hs) {
    using namespace nvcuda;
    constexpr int BLOCK = ATT_TC_BLOCK;
    constexpr int RPW = BLOCK / ATT_WARPS;
    typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> FragA;
    typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> FragBt;
    typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> FragB;
    typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;
    const int hs16 = att_tc_hs16(hs), ldh = hs16 + 8, ldo = hs16 + 4;
    const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long c = (long)nh * hs, stride = 3 * c;
    const __half* q_src = qkv + (long)b * t * stride + (long)h * hs;
    const __half* k_src = q_src + c;
    const __half* v_src = q_src + 2 * c;
    const long head_row0 = (long)b * t * c + (long)h * hs;  // out, dout: [B, T, C]
    const long stat0 = ((long)b * nh + h) * t;              // lse, d_buf: [B, NH, T]
    const int valid_rows = min(BLOCK, t - qb * BLOCK);

    TS_DYNAMIC_SHARED(float, smem);
    float* ss = smem;                                                  // [BLOCK][LDS]
    float* sdp = ss + BLOCK * ATT_TC_LDS;                              // [BLOCK][LDS]
    __half* sq = reinterpret_cast<__half*>(sdp + BLOCK * ATT_TC_LDS);  // [BLOCK][ldh]
    __half* sdo = sq + BLOCK * ldh;                                    // [BLOCK][ldh]
    __half* sk = sdo + BLOCK * ldh;                                    // [BLOCK][ldh]
    __half* sv = sk + BLOCK * ldh;                                     // [BLOCK][ldh]
    __half* sds = sv + BLOCK * ldh;                                    // [BLOCK][LDP] dS, high
    __half* sdsl = sds + BLOCK * ATT_TC_LDP;                           // [BLOCK][LDP] dS, low
    float* sdq = smem;  // at the end: dQ [BLOCK][ldo], over S and dP

    const float scale = 1.0f / sqrtf((float)hs);
    att_tc_load_tile(sq, q_src, stride, qb * BLOCK, t, hs, ldh);
    att_tc_load_tile(sdo, dout + head_row0, c, qb * BLOCK, t, hs, ldh);

    // D = rowsum(dO ∘ O) and the saved lse of this warp's rows (from global memory: no barrier).
    float row_lse[RPW], row_d[RPW];
ATT_UNROLL
    for (int i = 0; i < RPW; ++i) {
        const int r = warp * RPW + i;
        const long p = (long)qb * BLOCK + r;
        float part = 0.0f;
        if (r < valid_rows) {
            for (int d = lane; d < hs; d += 32) {
                const long at = head_row0 + p * c + d;
                part += ts_load(dout, at) * ts_load(out, at);
            }
        }
        row_d[i] = ts_warp_sum(part);
        row_lse[i] = r < valid_rows ? lse[stat0 + p] : 0.0f;
        if (r < valid_rows && lane == 0) d_buf[stat0 + p] = row_d[i];
    }

    const int s_row = 16 * (warp / 2), s_col = 16 * (warp % 2);
    const int col_tiles = hs16 / 16;
    FragC acc[2];
ATT_UNROLL
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[j], 0.0f);

    const unsigned e0 = row_start[qb], e1 = row_start[qb + 1];
    for (unsigned e = e0; e < e1; ++e) {
        const int kb = row_block[e];
        const unsigned moff = row_mask[e];
        const int valid_keys = min(BLOCK, t - kb * BLOCK);
        __syncthreads();  // the previous block's K and dS are no longer read
        att_tc_load_tile(sk, k_src, stride, kb * BLOCK, t, hs, ldh);
        att_tc_load_tile(sv, v_src, stride, kb * BLOCK, t, hs, ldh);
        __syncthreads();

        // S = Q Kᵀ and dP = dO Vᵀ, one tile of each per warp.
        FragC fs, fdp;
        wmma::fill_fragment(fs, 0.0f);
        wmma::fill_fragment(fdp, 0.0f);
        for (int d = 0; d < hs16; d += 16) {
            FragA a;
            FragBt bt;
            wmma::load_matrix_sync(a, sq + s_row * ldh + d, ldh);
            wmma::load_matrix_sync(bt, sk + s_col * ldh + d, ldh);
            wmma::mma_sync(fs, a, bt, fs);
            wmma::load_matrix_sync(a, sdo + s_row * ldh + d, ldh);
            wmma::load_matrix_sync(bt, sv + s_col * ldh + d, ldh);
            wmma::mma_sync(fdp, a, bt, fdp);
        }
        wmma::store_matrix_sync(ss + s_row * ATT_TC_LDS + s_col, fs, ATT_TC_LDS,
                                wmma::mem_row_major);
        wmma::store_matrix_sync(sdp + s_row * ATT_TC_LDS + s_col, fdp, ATT_TC_LDS,
                                wmma::mem_row_major);
        __syncthreads();

        // dS = P ∘ (dP − D), P = exp(scale·S − lse) where allowed, else 0; as f16.
ATT_UNROLL
        for (int i = 0; i < RPW; ++i) {
            const int r = warp * RPW + i;
            const bool ok = r < valid_rows && att_allowed(masks, moff, r, lane, valid_keys);
            const int at = r * ATT_TC_LDS + lane;
            const float p = ok ? __expf(ss[at] * scale - row_lse[i]) : 0.0f;
            const float ds = p * (sdp[at] - row_d[i]);
            const __half hi = __float2half_rn(ds);
            sds[r * ATT_TC_LDP + lane] = hi;
            sdsl[r * ATT_TC_LDP + lane] = __float2half_rn(ds - __half2float(hi));
        }
        __syncthreads();

        // dQ += dS K on the warp's output tiles.
ATT_UNROLL
        for (int j = 0; j < 2; ++j) {
            const int x = warp + ATT_WARPS * j;
            if (x < 2 * col_tiles) {
                const int o_row = 16 * (x / col_tiles), o_col = 16 * (x % col_tiles);
                for (int k = 0; k < BLOCK; k += 16) {
                    FragA a;
                    FragB bk;
                    wmma::load_matrix_sync(bk, sk + k * ldh + o_col, ldh);
                    wmma::load_matrix_sync(a, sds + o_row * ATT_TC_LDP + k, ATT_TC_LDP);
                    wmma::mma_sync(acc[j], a, bk, acc[j]);
                    wmma::load_matrix_sync(a, sdsl + o_row * ATT_TC_LDP + k, ATT_TC_LDP);
                    wmma::mma_sync(acc[j], a, bk, acc[j]);
                }
            }
        }
    }
    __syncthreads();  // S and dP are no longer read: dQ goes there
ATT_UNROLL
    for (int j = 0; j < 2; ++j) {
        const int x = warp + ATT_WARPS * j;
        if (x < 2 * col_tiles) {
            const int o_row = 16 * (x / col_tiles), o_col = 16 * (x % col_tiles);
            wmma::store_matrix_sync(sdq + o_row * ldo + o_col, acc[j], ldo, wmma::mem_row_major);
        }
    }
    __syncthreads();
ATT_UNROLL
    for (int i = 0; i < RPW; ++i) {
        const int r = warp * RPW + i;
        if (r < valid_rows) {
            const long p = (long)qb * BLOCK + r;
            for (int d = lane; d < hs; d += 32)
                ts_store(dqkv, ((long)b * t + p) * stride + (long)h * hs + d,
                         sdq[r * ldo + d] * scale);
        }
    }
}

__device__ void attention_backward_dkv_wmma(__half* __restrict__ dqkv,
                                            const __half* __restrict__ dout,
                                            const __half* __restrict__ qkv,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ d_buf,
                                            const unsigned* __restrict__ col_start,
                                            const unsigned* __restrict__ col_block,
                                            const unsigned* __restrict__ col_mask,
                                            const unsigned* __restrict__ masks, int t, int nh,
                                            int hs) {
    using namespace nvcuda;
    constexpr int BLOCK = ATT_TC_BLOCK;
    constexpr int KPW = BLOCK / ATT_WARPS;
    typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> FragA;
    typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> FragBt;
    typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> FragB;
    typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;
    const int hs16 = att_tc_hs16(hs), ldh = hs16 + 8, ldo = hs16 + 4;
    const int kb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long c = (long)nh * hs, stride = 3 * c;
    const __half* q_src = qkv + (long)b * t * stride + (long)h * hs;
    const __half* k_src = q_src + c;
    const __half* v_src = q_src + 2 * c;
    const __half* do_src = dout + (long)b * t * c + (long)h * hs;
    const long stat0 = ((long)b * nh + h) * t;
    const int valid_keys = min(BLOCK, t - kb * BLOCK);

    TS_DYNAMIC_SHARED(float, smem);
    float* sst = smem;                                       // [BLOCK keys][LDS] Sᵀ
    float* sdpt = sst + BLOCK * ATT_TC_LDS;                  // [BLOCK keys][LDS] dPᵀ
    float* slse = sdpt + BLOCK * ATT_TC_LDS;                 // [BLOCK]
    float* sd = slse + BLOCK;                                // [BLOCK]
    __half* sk = reinterpret_cast<__half*>(sd + BLOCK);      // [BLOCK][ldh]
    __half* sv = sk + BLOCK * ldh;                           // [BLOCK][ldh]
    __half* sq = sv + BLOCK * ldh;                           // [BLOCK][ldh]
    __half* sdo = sq + BLOCK * ldh;                          // [BLOCK][ldh]
    __half* spt = sdo + BLOCK * ldh;                         // [BLOCK keys][LDP] Pᵀ
    __half* sdst = spt + BLOCK * ATT_TC_LDP;                 // [BLOCK keys][LDP] dSᵀ, high
    __half* sdstl = sdst + BLOCK * ATT_TC_LDP;               // [BLOCK keys][LDP] dSᵀ, low
    __half* sptl = sdstl + BLOCK * ATT_TC_LDP;               // [BLOCK keys][LDP] Pᵀ, low
    float* sdk = reinterpret_cast<float*>(sk);  // at the end: dK, dV [BLOCK][ldo], over K..dO
    float* sdv = sdk + BLOCK * ldo;

    const float scale = 1.0f / sqrtf((float)hs);
    att_tc_load_tile(sk, k_src, stride, kb * BLOCK, t, hs, ldh);
    att_tc_load_tile(sv, v_src, stride, kb * BLOCK, t, hs, ldh);

    const int s_row = 16 * (warp / 2), s_col = 16 * (warp % 2);
    const int col_tiles = hs16 / 16;
    FragC dk[2], dv[2];
ATT_UNROLL
    for (int j = 0; j < 2; ++j) {
        wmma::fill_fragment(dk[j], 0.0f);
        wmma::fill_fragment(dv[j], 0.0f);
    }

    const unsigned e0 = col_start[kb], e1 = col_start[kb + 1];
    for (unsigned e = e0; e < e1; ++e) {
        const int qb = col_block[e];
        const unsigned moff = col_mask[e];
        const int valid_rows = min(BLOCK, t - qb * BLOCK);
        __syncthreads();  // the previous query block's tiles are no longer read
        att_tc_load_tile(sq, q_src, stride, qb * BLOCK, t, hs, ldh);
        att_tc_load_tile(sdo, do_src, c, qb * BLOCK, t, hs, ldh);
        for (int r = threadIdx.x; r < BLOCK; r += ATT_THREADS) {
            const bool ok = r < valid_rows;
            slse[r] = ok ? lse[stat0 + (long)qb * BLOCK + r] : 0.0f;
            sd[r] = ok ? d_buf[stat0 + (long)qb * BLOCK + r] : 0.0f;
        }
        __syncthreads();

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, one tile of each per warp (rows keys, columns query rows).
        FragC fs, fdp;
        wmma::fill_fragment(fs, 0.0f);
        wmma::fill_fragment(fdp, 0.0f);
        for (int d = 0; d < hs16; d += 16) {
            FragA a;
            FragBt bt;
            wmma::load_matrix_sync(a, sk + s_row * ldh + d, ldh);
            wmma::load_matrix_sync(bt, sq + s_col * ldh + d, ldh);
            wmma::mma_sync(fs, a, bt, fs);
            wmma::load_matrix_sync(a, sv + s_row * ldh + d, ldh);
            wmma::load_matrix_sync(bt, sdo + s_col * ldh + d, ldh);
            wmma::mma_sync(fdp, a, bt, fdp);
        }
        wmma::store_matrix_sync(sst + s_row * ATT_TC_LDS + s_col, fs, ATT_TC_LDS,
                                wmma::mem_row_major);
        wmma::store_matrix_sync(sdpt + s_row * ATT_TC_LDS + s_col, fdp, ATT_TC_LDS,
                                wmma::mem_row_major);
        __syncthreads();

        // Pᵀ and dSᵀ = Pᵀ ∘ (dPᵀ − D) for the warp's keys against the lane's query row, as f16.
ATT_UNROLL
        for (int i = 0; i < KPW; ++i) {
            const int k = warp * KPW + i, r = lane;
            const bool ok = r < valid_rows && att_allowed(masks, moff, r, k, valid_keys);
            const int at = k * ATT_TC_LDS + r;
            const float p = ok ? __expf(sst[at] * scale - slse[r]) : 0.0f;
            const __half p_hi = __float2half_rn(p);
            spt[k * ATT_TC_LDP + r] = p_hi;
            sptl[k * ATT_TC_LDP + r] = __float2half_rn(p - __half2float(p_hi));
            const float ds = p * (sdpt[at] - sd[r]);
            const __half hi = __float2half_rn(ds);
            sdst[k * ATT_TC_LDP + r] = hi;
            sdstl[k * ATT_TC_LDP + r] = __float2half_rn(ds - __half2float(hi));
        }
        __syncthreads();

        // dV += Pᵀ dO, dK += dSᵀ Q (unscaled; scaled at the end) on the warp's output tiles.
ATT_UNROLL
        for (int j = 0; j < 2; ++j) {
            const int x = warp + ATT_WARPS * j;
            if (x < 2 * col_tiles) {
                const int o_row = 16 * (x / col_tiles), o_col = 16 * (x % col_tiles);
                for (int r = 0; r < BLOCK; r += 16) {
                    FragA a;
                    FragB bm;
                    wmma::load_matrix_sync(bm, sdo + r * ldh + o_col, ldh);
                    wmma::load_matrix_sync(a, spt + o_row * ATT_TC_LDP + r, ATT_TC_LDP);
                    wmma::mma_sync(dv[j], a, bm, dv[j]);
                    wmma::load_matrix_sync(a, sptl + o_row * ATT_TC_LDP + r, ATT_TC_LDP);
                    wmma::mma_sync(dv[j], a, bm, dv[j]);
                    wmma::load_matrix_sync(bm, sq + r * ldh + o_col, ldh);
                    wmma::load_matrix_sync(a, sdst + o_row * ATT_TC_LDP + r, ATT_TC_LDP);
                    wmma::mma_sync(dk[j], a, bm, dk[j]);
                    wmma::load_matrix_sync(a, sdstl + o_row * ATT_TC_LDP + r, ATT_TC_LDP);
                    wmma::mma_sync(dk[j], a, bm, dk[j]);
                }
            }
        }
    }
    __syncthreads();  // K, V, Q and dO are no longer read: dK and dV go there
ATT_UNROLL
    for (int j = 0; j < 2; ++j) {
        const int x = warp + ATT_WARPS * j;
        if (x < 2 * col_tiles) {
            const int o_row = 16 * (x / col_tiles), o_col = 16 * (x % col_tiles);
            wmma::store_matrix_sync(sdk + o_row * ldo + o_col, dk[j], ldo, wmma::mem_row_major);
            wmma::store_matrix_sync(sdv + o_row * ldo + o_col, dv[j], ldo, wmma::mem_row_major);
        }
    }
    __syncthreads();
ATT_UNROLL
    for (int i = 0; i < KPW; ++i) {
        const int k = warp * KPW + i;
        if (k < valid_keys) {
            const long at = ((long)b * t + (long)kb * BLOCK + k) * stride + (long)h * hs;
            for (int d = lane; d < hs; d += 32) {
                ts_store(dqkv, at + c + d, sdk[k * ldo + d] * scale);
                ts_store(dqkv, at + 2 * c + d, sdv[k * ldo + d]);
            }
        }
    }
}

extern "C" __global__ void attention_forward_f32_b8(float* out, float* lse, const float* qkv,
                                                   const unsigned* row_start,
                                                   const unsigned* row_block,
                                                   const unsigned* row_mask,
                                                   const unsigned* masks, int t, int nh, int hs) {
    attention_forward<float, 8>(out, lse, qkv, row_start, row_block, row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dq_f32_b8(float* dqkv, float* d_buf,
                                                       const float* dout,
                                                       const float* qkv, const float* out,
                                                       const float* lse,
                                                       const unsigned* row_start,
                                                       const unsigned* row_block,
                                                       const unsigned* row_mask,
                                                       const unsigned* masks, int t, int nh,
                                                       int hs) {
    attention_backward_dq<float, 8>(dqkv, d_buf, dout, qkv, out, lse, row_start, row_block,
                                    row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dkv_f32_b8(float* dqkv, const float* dout,
                                                        const float* qkv, const float* lse,
                                                        const float* d_buf,
                                                        const unsigned* col_start,
                                                        const unsigned* col_block,
                                                        const unsigned* col_mask,
                                                        const unsigned* masks, int t, int nh,
                                                        int hs) {
    attention_backward_dkv<float, 8>(dqkv, dout, qkv, lse, d_buf, col_start, col_block, col_mask,
                                     masks, t, nh, hs);
}

extern "C" __global__ void attention_forward_f32_b32(float* out, float* lse, const float* qkv,
                                                   const unsigned* row_start,
                                                   const unsigned* row_block,
                                                   const unsigned* row_mask,
                                                   const unsigned* masks, int t, int nh, int hs) {
    attention_forward<float, 32>(out, lse, qkv, row_start, row_block, row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dq_f32_b32(float* dqkv, float* d_buf,
                                                       const float* dout,
                                                       const float* qkv, const float* out,
                                                       const float* lse,
                                                       const unsigned* row_start,
                                                       const unsigned* row_block,
                                                       const unsigned* row_mask,
                                                       const unsigned* masks, int t, int nh,
                                                       int hs) {
    attention_backward_dq<float, 32>(dqkv, d_buf, dout, qkv, out, lse, row_start, row_block,
                                    row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dkv_f32_b32(float* dqkv, const float* dout,
                                                        const float* qkv, const float* lse,
                                                        const float* d_buf,
                                                        const unsigned* col_start,
                                                        const unsigned* col_block,
                                                        const unsigned* col_mask,
                                                        const unsigned* masks, int t, int nh,
                                                        int hs) {
    attention_backward_dkv<float, 32>(dqkv, dout, qkv, lse, d_buf, col_start, col_block, col_mask,
                                     masks, t, nh, hs);
}

extern "C" __global__ void attention_forward_f16_b8(__half* out, float* lse, const __half* qkv,
                                                   const unsigned* row_start,
                                                   const unsigned* row_block,
                                                   const unsigned* row_mask,
                                                   const unsigned* masks, int t, int nh, int hs) {
    attention_forward<__half, 8>(out, lse, qkv, row_start, row_block, row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dq_f16_b8(__half* dqkv, float* d_buf,
                                                       const __half* dout,
                                                       const __half* qkv, const __half* out,
                                                       const float* lse,
                                                       const unsigned* row_start,
                                                       const unsigned* row_block,
                                                       const unsigned* row_mask,
                                                       const unsigned* masks, int t, int nh,
                                                       int hs) {
    attention_backward_dq<__half, 8>(dqkv, d_buf, dout, qkv, out, lse, row_start, row_block,
                                    row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dkv_f16_b8(__half* dqkv, const __half* dout,
                                                        const __half* qkv, const float* lse,
                                                        const float* d_buf,
                                                        const unsigned* col_start,
                                                        const unsigned* col_block,
                                                        const unsigned* col_mask,
                                                        const unsigned* masks, int t, int nh,
                                                        int hs) {
    attention_backward_dkv<__half, 8>(dqkv, dout, qkv, lse, d_buf, col_start, col_block, col_mask,
                                     masks, t, nh, hs);
}

extern "C" __global__ void attention_forward_f16_b32(__half* out, float* lse, const __half* qkv,
                                                   const unsigned* row_start,
                                                   const unsigned* row_block,
                                                   const unsigned* row_mask,
                                                   const unsigned* masks, int t, int nh, int hs) {
    attention_forward<__half, 32>(out, lse, qkv, row_start, row_block, row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dq_f16_b32(__half* dqkv, float* d_buf,
                                                       const __half* dout,
                                                       const __half* qkv, const __half* out,
                                                       const float* lse,
                                                       const unsigned* row_start,
                                                       const unsigned* row_block,
                                                       const unsigned* row_mask,
                                                       const unsigned* masks, int t, int nh,
                                                       int hs) {
    attention_backward_dq<__half, 32>(dqkv, d_buf, dout, qkv, out, lse, row_start, row_block,
                                    row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dkv_f16_b32(__half* dqkv, const __half* dout,
                                                        const __half* qkv, const float* lse,
                                                        const float* d_buf,
                                                        const unsigned* col_start,
                                                        const unsigned* col_block,
                                                        const unsigned* col_mask,
                                                        const unsigned* masks, int t, int nh,
                                                        int hs) {
    attention_backward_dkv<__half, 32>(dqkv, dout, qkv, lse, d_buf, col_start, col_block, col_mask,
                                     masks, t, nh, hs);
}

extern "C" __global__ void attention_forward_wmma_f16_b32(__half* out, float* lse, const __half* qkv,
                                                        const unsigned* row_start,
                                                        const unsigned* row_block,
                                                        const unsigned* row_mask,
                                                        const unsigned* masks, int t, int nh,
                                                        int hs) {
    attention_forward_wmma(out, lse, qkv, row_start, row_block, row_mask, masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dq_wmma_f16_b32(__half* dqkv, float* d_buf,
                                                            const __half* dout, const __half* qkv,
                                                            const __half* out, const float* lse,
                                                            const unsigned* row_start,
                                                            const unsigned* row_block,
                                                            const unsigned* row_mask,
                                                            const unsigned* masks, int t, int nh,
                                                            int hs) {
    attention_backward_dq_wmma(dqkv, d_buf, dout, qkv, out, lse, row_start, row_block, row_mask,
                               masks, t, nh, hs);
}

extern "C" __global__ void attention_backward_dkv_wmma_f16_b32(__half* dqkv, const __half* dout,
                                                             const __half* qkv, const float* lse,
                                                             const float* d_buf,
                                                             const unsigned* col_start,
                                                             const unsigned* col_block,
                                                             const unsigned* col_mask,
                                                             const unsigned* masks, int t, int nh,
                                                             int hs) {
    attention_backward_dkv_wmma(dqkv, dout, qkv, lse, d_buf, col_start, col_block, col_mask, masks,
                                t, nh, hs);
}
