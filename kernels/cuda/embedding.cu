// The stage-2 transformer's input embeddings (MODEL-SPEC.md §1), forward and backward.
// The CPU reference is kernels/src/embedding.rs; the launchers are in kernels/src/gpu/embedding.rs.
//
// Shapes (T = Tt + G², C channels): text [B, Tt] and image [B, G²] ids (u32, checked on the host
// before any launch); text_emb [Vt + Tt, C], text_pos [Tt, C], image_emb [Vi, C],
// image_row [G, C], image_col [G, C]; out, dout [B, T, C]; all f32 (embeddings stay fp32).
//
// Forward overwrites out (=):
//   out[b, p]            = text_emb[text[b, p]] + text_pos[p]                       p < Tt
//   out[b, Tt + r·G + c] = image_emb[image[b, r·G + c]] + image_row[r] + image_col[c]
//
// Backward accumulates into the five table gradients (+=, parameter gradients) without atomics:
// every table row is owned by one thread per channel, which adds its contributions in the
// reference's order (batch row, then position), so the results are bit-identical to the CPU's.
// - token tables: the host groups the flat positions by id (a counting sort that keeps position
//   order): rows [K] distinct ids, starts [K + 1], positions [count] (flat row b·T + p of dout);
//   block x handles one distinct id. A frequent id is a serial loop over its positions (as long
//   as its count), which bounds the imbalance by the batch's most frequent token.
// - position tables: block x handles one row of text_pos, or of image_row / image_col
//   (blockIdx.z 0 / 1), looping over the batch (and the other grid coordinate) in order.
// blockIdx.y picks a chunk of blockDim.x channels.
#include "common.cuh"

extern "C" __global__ void embedding_forward_f32(float* __restrict__ out,
                                                 const unsigned* __restrict__ text,
                                                 const unsigned* __restrict__ image,
                                                 const float* __restrict__ text_emb,
                                                 const float* __restrict__ text_pos,
                                                 const float* __restrict__ image_emb,
                                                 const float* __restrict__ image_row,
                                                 const float* __restrict__ image_col, int text_len,
                                                 int grid, int c) {
    int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    long seq = text_len + (long)grid * grid;
    long row = blockIdx.x;  // b·T + p
    long b = row / seq, p = row % seq;
    float v;
    if (p < text_len) {
        long id = text[b * text_len + p];
        v = text_emb[id * c + ch] + text_pos[p * c + ch];
    } else {
        long i = p - text_len;
        long id = image[b * grid * grid + i];
        v = image_emb[id * c + ch] + image_row[(i / grid) * c + ch] + image_col[(i % grid) * c + ch];
    }
    out[row * c + ch] = v;
}

// dtable[rows[k]] += Σ_j dout[positions[j]] over j in [starts[k], starts[k+1]), j in order.
extern "C" __global__ void embedding_backward_tokens_f32(float* __restrict__ dtable,
                                                         const float* __restrict__ dout,
                                                         const unsigned* __restrict__ rows,
                                                         const unsigned* __restrict__ starts,
                                                         const unsigned* __restrict__ positions,
                                                         int c) {
    int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    int k = blockIdx.x;
    float* dst = dtable + (long)rows[k] * c + ch;
    float acc = *dst;
    for (unsigned j = starts[k]; j < starts[k + 1]; ++j) acc += dout[(long)positions[j] * c + ch];
    *dst = acc;
}

// dtext_pos[p] += Σ_b dout[b, p], b in order.
extern "C" __global__ void embedding_backward_text_pos_f32(float* __restrict__ dtext_pos,
                                                           const float* __restrict__ dout,
                                                           int batch, int text_len, int grid,
                                                           int c) {
    int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    long seq = text_len + (long)grid * grid;
    long p = blockIdx.x;
    float acc = dtext_pos[p * c + ch];
    for (long b = 0; b < batch; ++b) acc += dout[(b * seq + p) * c + ch];
    dtext_pos[p * c + ch] = acc;
}

// blockIdx.z == 0: dimage_row[r] += Σ_b Σ_col dout[b, Tt + r·G + col];
// blockIdx.z == 1: dimage_col[col] += Σ_b Σ_r dout[b, Tt + r·G + col]; sums in that order.
extern "C" __global__ void embedding_backward_image_pos_f32(float* __restrict__ dimage_row,
                                                            float* __restrict__ dimage_col,
                                                            const float* __restrict__ dout,
                                                            int batch, int text_len, int grid,
                                                            int c) {
    int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    long seq = text_len + (long)grid * grid;
    long k = blockIdx.x;
    bool by_row = blockIdx.z == 0;
    float* dst = (by_row ? dimage_row : dimage_col) + k * c + ch;
    float acc = *dst;
    for (long b = 0; b < batch; ++b) {
        for (long j = 0; j < grid; ++j) {
            long i = by_row ? k * grid + j : j * grid + k;
            acc += dout[(b * seq + text_len + i) * c + ch];
        }
    }
    *dst = acc;
}
